"""The Triton MEA decode kernel against the PyTorch references (CPU: TRITON_INTERPRET=1, tiny sizes)."""
import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_ref import DEV, rel_err  # noqa: E402

from mea import ModelConfig, Transformer  # noqa: E402
from mea.ops import decode as decode_mod  # noqa: E402
from mea.ops.attention import mea_attention_absorbed, mea_attention_reference  # noqa: E402
from mea.ops.triton_decode import mea_decode_fast, mea_decode_triton, to_paged  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def prefix_mask(seqlens: torch.Tensor, lq: int, t: int) -> torch.Tensor:
    """The mask a KVCache step builds: query t of row b sees keys [0, seqlens[b] - lq + t]."""
    pos = seqlens.long()[:, None] - lq + torch.arange(lq, device=seqlens.device)
    return (torch.arange(t, device=seqlens.device)[None, None, :] <= pos[:, :, None])[:, None]


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


def reference(q, k, v, k_mix, v_mix, seqlens):
    """MEA by its definition (composite heads materialized), in float64."""
    f = lambda x: x.detach().double()  # noqa: E731
    mask = prefix_mask(seqlens, q.shape[2], k.shape[2])
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


def test_custom_op_opcheck():
    q, k, v, km, vm, sl = make_inputs(2, 4, 2, 1, 20, 16, torch.float32)
    torch.library.opcheck(torch.ops.mea.decode.default, (q, k, v, km, vm, sl, None, 0.25, 2, 16, 0, 0, -1),
                          test_utils=("test_schema", "test_faketensor"))
    kp, vp, bt = to_pages(k, v, 8)
    torch.library.opcheck(torch.ops.mea.decode.default, (q, kp, vp, km, vm, sl, bt, 0.25, 2, 16, 0, 0, -1),
                          test_utils=("test_schema", "test_faketensor"))


def test_adapter_through_mea_attention_cached(monkeypatch):
    q, k, v, km, vm, sl = make_inputs(3, 6, 4, 2, 30, 16, torch.float32)
    mask = prefix_mask(sl, 2, 30)
    calls = []

    def spy(*args):
        out = mea_decode_fast(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decode_mod, "_FAST_DECODE", [spy])
    with torch.no_grad():
        out = decode_mod.mea_attention_cached(q, k, v, km, vm, mask=mask)
    assert calls == [True]
    assert rel_err(out, reference(q, k, v, km, vm, sl)) < 1e-5
    # Gradients needed: the adapter declines and the differentiable PyTorch path runs.
    km.requires_grad_(True)
    out = decode_mod.mea_attention_cached(q, k, v, km, vm, mask=mask)
    assert calls == [True, False] and out.requires_grad


def test_adapter_declines_cpu_without_interpreter(monkeypatch):
    q, k, v, km, vm, sl = make_inputs(1, 4, 2, 1, 20, 16, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not q.is_cuda:
        assert mea_decode_fast(q, k, v, km, vm, None) is None
    assert mea_decode_fast(q, k, v, km, vm, torch.ones(1, 2, 1, 20, dtype=torch.bool, device=DEV)) is None


def test_model_decoding_uses_kernel(monkeypatch):
    """Greedy decoding of a small MEA model (h' = 3 of 4 heads): same tokens and logits with the kernel."""
    torch.manual_seed(3)
    cfg = ModelConfig(attention="mea", vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=3,
                      max_seq_len=64)
    model = Transformer(cfg).to(DEV).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    prompt = torch.randint(0, 101, (2, 5), device=DEV)
    am = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool, device=DEV)

    def run(fast):
        monkeypatch.setattr(decode_mod, "_FAST_DECODE", fast)
        return model.generate(prompt, max_new_tokens=4, attention_mask=am)

    calls = []

    def spy(*args):
        calls.append(1)
        return mea_decode_fast(*args)

    want = run([])
    got = run([spy])
    assert calls, "the kernel was never called"
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
def test_gpu_registered_on_import():
    assert mea_decode_fast in decode_mod._FAST_DECODE


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
