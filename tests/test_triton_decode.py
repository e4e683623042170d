"""The Triton MEA decode kernel against the PyTorch references (CPU: TRITON_INTERPRET=1, tiny sizes)."""
import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_ref import DEV, rel_err  # noqa: E402

from mea import ModelConfig, Transformer  # noqa: E402
from mea.ops import decode as decode_mod  # noqa: E402
from mea.ops import triton_decode  # noqa: E402
from mea.ops.attention import mea_attention_absorbed, mea_attention_reference  # noqa: E402
from mea.ops.triton_decode import mea_decode_triton, to_paged  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def prefix_mask(seqlens: torch.Tensor, lq: int, t: int, starts=None) -> torch.Tensor:
    """The mask a KVCache step builds: query t of row b sees keys [starts[b], seqlens[b] - lq + t]
    (starts 0 without ``starts``)."""
    pos = seqlens.long()[:, None] - lq + torch.arange(lq, device=seqlens.device)
    keys = torch.arange(t, device=seqlens.device)[None, None, :]
    mask = keys <= pos[:, :, None]
    if starts is not None:
        mask = mask & (keys >= starts.long()[:, None, None])
    return mask[:, None]


def make_inputs(B, h, hk, lq, t, d, dtype, seqlens=None, max_len=None):
    """Fresh random inputs; the cache is a view of a longer buffer, as ``KVCache.update`` returns it."""
    max_len = max_len or t + 5
    q = torch.randn(B, h, lq, d, device=DEV, dtype=dtype)
    k = torch.randn(B, hk, max_len, d, device=DEV, dtype=dtype)[:, :, :t]
    v = torch.randn(B, hk, max_len, d, device=DEV, dtype=dtype)[:, :, :t]
    k_mix = torch.randn(hk, h, device=DEV) / math.sqrt(hk)
    v_mix = torch.randn(hk, h, device=DEV) / math.sqrt(hk)
    if seqlens is None:
        seqlens = torch.randint(lq, t + 1, (B,), device=DEV)
        seqlens[0] = t
    return q, k, v, k_mix, v_mix, seqlens.to(device=DEV, dtype=torch.int32)


def reference(q, k, v, k_mix, v_mix, seqlens, starts=None):
    """MEA by its definition (composite heads materialized), in float64."""
    f = lambda x: x.detach().double()  # noqa: E731
    mask = prefix_mask(seqlens, q.shape[2], k.shape[2], starts)
    return mea_attention_reference(f(q), f(k), f(v), f(k_mix), f(v_mix), mask=mask)


# ---------------------------------------------------------------------------- CPU (interpreter) + GPU
@pytest.mark.parametrize("B,h,hk,lq,t,d", [
    (3, 6, 4, 1, 40, 16),   # h' does not divide h
    (2, 4, 4, 3, 37, 32),   # h' = h, a few query tokens
    (3, 6, 4, 4, 50, 24),   # head_dim not a power of two, h' does not divide h
    (2, 8, 1, 2, 33, 16),   # one stored head (MQA-like)
    (1, 4, 3, 16, 48, 16),  # the most queries the decode path takes
])
@pytest.mark.parametrize("num_splits,keys_major", [(0, 0), (1, 0), (3, 0), (1, 1), (3, 1)])
def test_matches_reference_fp32(B, h, hk, lq, t, d, num_splits, keys_major):
    inputs = make_inputs(B, h, hk, lq, t, d, torch.float32)
    out = mea_decode_triton(*inputs, num_splits=num_splits, block_n=16, keys_major=keys_major)
    assert out.shape == (B, h, lq, d) and out.dtype == torch.float32
    assert rel_err(out, reference(*inputs)) < TOL[torch.float32]


def test_matches_absorbed_torch_path():
    q, k, v, km, vm, sl = make_inputs(3, 6, 4, 2, 30, 16, torch.float32)
    mask = prefix_mask(sl, 2, 30)
    want = mea_attention_absorbed(q, k, v, km, vm, mask=mask)
    got = mea_decode_triton(q, k, v, km, vm, sl, block_n=16, num_splits=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    if dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("the Triton interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)")
    inputs = make_inputs(3, 6, 4, 2, 45, 32, dtype)
    out = mea_decode_triton(*inputs, num_splits=2, block_n=16)
    assert out.dtype == dtype
    assert rel_err(out, reference(*inputs)) < TOL[dtype]


def test_empty_rows_and_queries_give_zeros():
    # Row 1 holds no key; in row 2 (2 keys, 3 queries) the first query sees none.
    q, k, v, km, vm, _ = make_inputs(3, 4, 2, 3, 20, 16, torch.float32)
    sl = torch.tensor([20, 0, 2], dtype=torch.int32, device=DEV)
    out = mea_decode_triton(q, k, v, km, vm, sl, block_n=16, num_splits=2)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[2, :, 0].abs().max() == 0
    ref = reference(q[:1], k[:1], v[:1], km, vm, sl[:1])
    assert rel_err(out[:1], ref) < 1e-5
    ref2 = reference(q[2:, :, 1:], k[2:], v[2:], km, vm, sl[2:])
    assert rel_err(out[2:, :, 1:], ref2) < 1e-5


def test_seqlens_default_and_clamped():
    q, k, v, km, vm, _ = make_inputs(2, 4, 2, 1, 25, 16, torch.float32)
    full = torch.full((2,), 25, dtype=torch.int32, device=DEV)
    want = mea_decode_triton(q, k, v, km, vm, full, block_n=16)
    torch.testing.assert_close(mea_decode_triton(q, k, v, km, vm, block_n=16), want)
    torch.testing.assert_close(mea_decode_triton(q, k, v, km, vm, full + 100, block_n=16), want)


def test_bad_inputs_raise():
    q, k, v, km, vm, sl = make_inputs(2, 4, 2, 1, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="k_mix"):
        mea_decode_triton(q, k, v, km.t(), vm, sl)
    with pytest.raises(ValueError, match="dtype|fp16"):
        mea_decode_triton(q.double(), k.double(), v.double(), km, vm, sl)
    with pytest.raises(ValueError, match="k_cache"):
        mea_decode_triton(q, k[:1], v, km, vm, sl)
    with pytest.raises(ValueError, match="cache_seqlens"):
        mea_decode_triton(q, k, v, km, vm, sl.float())
    with pytest.raises(ValueError, match="contiguous"):
        mea_decode_triton(q, torch.randn(2, 2, 16, 20, device=DEV).transpose(2, 3), v, km, vm, sl)


def to_pages(k, v, page):
    """``to_paged`` with 3 spare pages of noise and a fixed shuffle."""
    return to_paged(k, v, page, spare_pages=3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("page,block_n", [(8, 16), (16, 16), (32, 16), (5, 16)])
@pytest.mark.parametrize("keys_major", [0, 1])
def test_paged_cache_matches_contiguous(page, block_n, keys_major):
    """A paged cache (pages smaller than, equal to, larger than a key tile, and not a power of two)
    gives the contiguous cache's output; ragged lengths, h' not dividing h, several slices."""
    q, k, v, km, vm, sl = make_inputs(3, 6, 4, 2, 45, 16, torch.float32)
    kp, vp, bt = to_pages(k.contiguous(), v.contiguous(), page)
    for splits in (1, 3):
        want = mea_decode_triton(q, k, v, km, vm, sl, block_n=block_n, num_splits=splits, keys_major=keys_major)
        got = mea_decode_triton(q, kp, vp, km, vm, sl, block_table=bt, block_n=block_n, num_splits=splits,
                                keys_major=keys_major)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert rel_err(got, reference(q, k, v, km, vm, sl)) < TOL[torch.float32]


def test_paged_cache_bad_inputs_raise():
    q, k, v, km, vm, sl = make_inputs(2, 4, 2, 1, 20, 16, torch.float32)
    kp, vp, bt = to_pages(k.contiguous(), v.contiguous(), 8)
    with pytest.raises(ValueError, match="needs cache_seqlens"):
        mea_decode_triton(q, kp, vp, km, vm, block_table=bt)
    with pytest.raises(ValueError, match="block_table must be"):
        mea_decode_triton(q, kp, vp, km, vm, sl, block_table=bt.float())
    with pytest.raises(ValueError, match="block_table must be"):
        mea_decode_triton(q, kp, vp, km, vm, sl, block_table=bt[:1])
    with pytest.raises(ValueError, match="pages, h', page_size"):
        mea_decode_triton(q, kp[..., :8], vp[..., :8], km, vm, sl, block_table=bt)


@pytest.mark.parametrize("lq,num_splits", [(1, 0), (1, 3), (3, 1), (4, 3)])
def test_row_starts_match_reference(lq, num_splits):
    """Left padding: row b's keys start at ``cache_starts[b]`` (a Hugging Face batch keeps its padding at
    the front of the cache); a start inside a slice, at a slice edge and past the first slice."""
    B, t = 4, 45
    q, k, v, km, vm, sl = make_inputs(B, 6, 4, lq, t, 16, torch.float32)
    starts = torch.tensor([0, 5, 16, 29], dtype=torch.int32, device=DEV)
    sl = torch.tensor([45, 40, 45, 37], dtype=torch.int32, device=DEV)
    out = mea_decode_triton(q, k, v, km, vm, sl, cache_starts=starts, num_splits=num_splits, block_n=16)
    assert rel_err(out, reference(q, k, v, km, vm, sl, starts)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="cache_starts must be"):
        mea_decode_triton(q, k, v, km, vm, sl, cache_starts=starts[:2])


def test_custom_op_opcheck():
    q, k, v, km, vm, sl = make_inputs(2, 4, 2, 1, 20, 16, torch.float32)
    starts = torch.tensor([0, 3], dtype=torch.int32, device=DEV)
    for st in (None, starts):
        torch.library.opcheck(torch.ops.mea.decode.default, (q, k, v, km, vm, sl, st, None, 0.25, 2, 16, 0, 0, -1),
                              test_utils=("test_schema", "test_faketensor"))
    kp, vp, bt = to_pages(k, v, 8)
    torch.library.opcheck(torch.ops.mea.decode.default, (q, kp, vp, km, vm, sl, None, bt, 0.25, 2, 16, 0, 0, -1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the launches of the decode kernel that ``mea_attention_cached`` makes."""
    calls = []
    real = triton_decode.mea_decode_triton

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(triton_decode, "mea_decode_triton", spy)
    return calls


def test_backend_switch_picks_the_path(kernel_calls):
    """``backend`` alone decides: triton runs the kernel (here interpreted), torch never does, auto takes it
    on CUDA tensors only; every path gives the definition's numbers."""
    q, k, v, km, vm, sl = make_inputs(3, 6, 4, 2, 30, 16, torch.float32,
                                      seqlens=torch.tensor([30, 25, 28], dtype=torch.int32))
    starts = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)
    mask = prefix_mask(sl, 2, 30, starts)
    want = reference(q, k, v, km, vm, sl, starts)
    for backend, launches in (("triton", 1), ("torch", 0), ("auto", int(q.is_cuda))):
        kernel_calls.clear()
        with torch.no_grad():
            out = decode_mod.mea_attention_cached(q, k, v, km, vm, mask=mask, spans=(starts, sl), backend=backend)
        assert len(kernel_calls) == launches, backend
        assert rel_err(out, want) < 1e-5, backend


def test_backend_triton_refuses_what_the_kernel_cannot_do(kernel_calls):
    """Gradients and masks with holes: ``triton`` says so (no silent fallback), ``auto`` takes PyTorch."""
    q, k, v, km, vm, sl = make_inputs(2, 4, 2, 1, 20, 16, torch.float32)
    mask = prefix_mask(sl, 1, 20)
    km.requires_grad_(True)
    with pytest.raises(ValueError, match="no backward"):
        decode_mod.mea_attention_cached(q, k, v, km, vm, mask=mask, spans=(None, sl), backend="triton")
    out = decode_mod.mea_attention_cached(q, k, v, km, vm, mask=mask, spans=(None, sl), backend="auto")
    assert out.requires_grad and not kernel_calls
    holes = mask.clone()
    holes[..., 3] = False
    with torch.no_grad(), pytest.raises(ValueError, match="holes"):
        decode_mod.mea_attention_cached(q, k, v, km, vm, mask=holes, spans=None, backend="triton")
    with torch.no_grad():
        out = decode_mod.mea_attention_cached(q, k, v, km, vm, mask=holes, spans=None, backend="auto")
    assert not kernel_calls
    assert rel_err(out, mea_attention_reference(*(x.detach().double() for x in (q, k, v, km, vm)),
                                                mask=holes)) < 1e-5


def test_backend_triton_needs_cuda_or_the_interpreter(monkeypatch):
    from mea.ops.backend import use_triton

    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA"):
        use_triton("triton", "cached attention", x)
    assert not use_triton("auto", "cached attention", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", "cached attention", x)
    assert not use_triton("auto", "cached attention", x)  # auto never picks the interpreter
    with pytest.raises(ValueError, match="backend: unknown"):
        use_triton("cuda", "cached attention", x)


def test_model_decoding_uses_kernel(kernel_calls):
    """Greedy decoding of a small MEA model (h' = 3 of 4 heads), left-padded: the same tokens with the
    kernel (backend triton) as with PyTorch (backend torch)."""
    torch.manual_seed(3)
    cfg = ModelConfig(attention="mea", vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=3,
                      max_seq_len=64)
    model = Transformer(cfg).to(DEV).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    prompt = torch.randint(0, 101, (2, 5), device=DEV)
    am = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool, device=DEV)
    want = model.set_backend("torch").generate(prompt, max_new_tokens=4, attention_mask=am)
    assert not kernel_calls
    got = model.set_backend("triton").generate(prompt, max_new_tokens=4, attention_mask=am)
    assert len(kernel_calls) == 3 * 2, "three decoding steps, two layers"
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- GPU, realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("keys_major", [0, 1])
def test_gpu_paged_matches_contiguous(page, keys_major):
    q, k, v, km, vm, sl = make_inputs(6, 32, 16, 1, 3000, 128, torch.bfloat16, max_len=4096)
    kp, vp, bt = to_pages(k.contiguous(), v.contiguous(), page)
    want = mea_decode_triton(q, k, v, km, vm, sl, keys_major=keys_major)
    got = mea_decode_triton(q, kp, vp, km, vm, sl, block_table=bt, keys_major=keys_major)
    assert (got.float() - want.float()).abs().max().item() < 1e-2
    assert rel_err(got, reference(q, k, v, km, vm, sl)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("h,hk,d", [(32, 16, 128), (32, 24, 128), (32, 8, 64), (12, 5, 128)])
@pytest.mark.parametrize("lq", [1, 16])
@pytest.mark.parametrize("keys_major", [0, 1])
def test_gpu_matches_reference(h, hk, d, lq, keys_major):
    inputs = make_inputs(6, h, hk, lq, 3000, d, torch.bfloat16, max_len=4096)
    out = mea_decode_triton(*inputs, keys_major=keys_major)
    assert rel_err(out, reference(*inputs)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("lq", [1, 4])
def test_gpu_fp16(lq):
    inputs = make_inputs(5, 32, 16, lq, 2500, 128, torch.float16)
    assert rel_err(mea_decode_triton(*inputs), reference(*inputs)) < TOL[torch.float16]


@pytest.mark.gpu
def test_gpu_fp32_and_many_splits():
    inputs = make_inputs(2, 32, 16, 1, 20000, 128, torch.float32)
    assert rel_err(mea_decode_triton(*inputs, num_splits=64), reference(*inputs)) < 1e-5


@pytest.mark.gpu
def test_gpu_torch_compile():
    q, k, v, km, vm, sl = make_inputs(4, 32, 16, 1, 1000, 128, torch.bfloat16, max_len=1024)
    want = mea_decode_triton(q, k, v, km, vm, sl)
    fn = torch.compile(lambda *a: mea_decode_triton(*a) * 2, fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, km, vm, sl), want * 2)


@pytest.mark.gpu
def test_gpu_auto_takes_the_kernel_for_decoding(kernel_calls):
    q, k, v, km, vm, sl = make_inputs(4, 8, 2, 1, 300, 64, torch.bfloat16)
    with torch.no_grad():
        decode_mod.mea_attention_cached(q, k, v, km, vm, mask=prefix_mask(sl, 1, 300), spans=(None, sl))
    assert kernel_calls == [1]


@pytest.mark.gpu
def test_gpu_row_starts_bf16():
    q, k, v, km, vm, sl = make_inputs(6, 32, 16, 1, 3000, 128, torch.bfloat16, max_len=4096)
    starts = torch.randint(0, 2000, (6,), device=DEV, dtype=torch.int32)
    out = mea_decode_triton(q, k, v, km, vm, sl, cache_starts=starts)
    assert rel_err(out, reference(q, k, v, km, vm, sl, starts)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.float32, 128), (torch.bfloat16, 16),
                                     (torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 256)])
def test_launch_tiles_fit_shared_memory(dtype, d):
    """Key tiles stay 16 KB whatever the dtype and head dim (fp32 at d=16 once asked for 234 KB of
    shared memory on an H200, over its 227 KB), and the tuned bf16 tiles are kept."""
    from mea.ops.triton_decode import decode_launch_config

    esize = torch.tensor([], dtype=dtype).element_size()
    cfg = decode_launch_config(8, 16, 4096, d, torch.device("cpu"), elem_bytes=esize)
    assert cfg["block_n"] * cfg["block_d"] * esize <= 16384
    assert 2 * cfg["num_stages"] * cfg["block_n"] * cfg["block_d"] * esize <= 160 * 1024
    if dtype == torch.bfloat16 and d in (64, 128):
        assert cfg["block_n"] == {64: 128, 128: 64}[d]


@pytest.mark.gpu
def test_gpu_fp32_small_head_dim_decoding():
    """The shape that overflowed shared memory: fp32, d=16, a prompt of 7 tokens."""
    inputs = make_inputs(3, 6, 4, 7, 100, 16, torch.float32, max_len=128)
    assert rel_err(mea_decode_triton(*inputs), reference(*inputs)) < 1e-5
