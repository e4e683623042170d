"""The Triton fold (mea.ops.triton_fold) against fold_mix_into_proj (CPU: TRITON_INTERPRET=1, tiny sizes)."""
import pytest
import torch

pytest.importorskip("triton")

from kernel_ref import DEV, TOL, rel_err  # noqa: E402

from mea.ops.attention import fold_mix_into_proj  # noqa: E402
from mea.ops.triton_fold import fold_mix_bwd, fold_mix_fwd, fold_mix_triton, fold_mixes_triton  # noqa: E402


def make(hk, h, d, D, dtype=torch.float32):
    weight = torch.randn(hk * d, D, device=DEV, dtype=dtype)
    mix = torch.randn(hk, h, device=DEV)
    return weight, mix


def reference(weight, mix, d, grad, dtype=torch.float32):
    """The fold in float64 of the operands as the kernels take them: on the GPU rounded to the compute
    ``dtype``, as autocast's matmul fold rounds them (the products are then exact, the sums fp32); the
    interpreter keeps them fp32 (its bf16 casts truncate)."""
    dtype = dtype if DEV == "cuda" else torch.float32
    w = weight.detach().to(dtype).double().requires_grad_()
    m = mix.detach().to(dtype).double().requires_grad_()
    out = fold_mix_into_proj(w, m, d)
    out.backward(grad.double())
    return out.detach(), w.grad, m.grad


SHAPES = [  # (h', h, d, D): h' dividing h or not, head counts not powers of two, tails in d*D
    (4, 4, 8, 24),
    (2, 8, 16, 32),
    (3, 9, 8, 20),
    (5, 7, 12, 11),
    (1, 6, 16, 40),
    (16, 32, 4, 9),
]


@pytest.mark.parametrize("hk,h,d,D", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grads_match_reference(hk, h, d, D, out_dtype):
    weight, mix = make(hk, h, d, D)
    grad = torch.randn(h * d, D, device=DEV).to(out_dtype)
    ref, gw_ref, gm_ref = reference(weight, mix, d, grad, out_dtype)
    w, m = weight.clone().requires_grad_(), mix.clone().requires_grad_()
    out = fold_mix_triton(w, m, d, out_dtype)
    assert out.shape == (h * d, D) and out.dtype == out_dtype
    out.backward(grad)
    assert w.grad.dtype == weight.dtype and m.grad.dtype == mix.dtype
    assert rel_err(out, ref) < TOL[out_dtype]
    assert rel_err(w.grad, gw_ref) < 1e-6   # no rounding past the operands': the sums are fp32
    assert rel_err(m.grad, gm_ref) < 1e-6


@pytest.mark.parametrize("hk,h,d,D", [(3, 6, 8, 200), (4, 4, 8, 24)])
def test_k_and_v_in_one_launch_match_reference(hk, h, d, D):
    """Two (weight, mix) pairs (MEA's K and V) share each launch; each pair's results are its own, over
    several blocks of d*D (each block's share of the mixing gradient summed afterwards)."""
    pairs = [make(hk, h, d, D) for _ in range(2)]
    grads = [torch.randn(h * d, D, device=DEV) for _ in range(2)]
    leaves = [(w.clone().requires_grad_(), m.clone().requires_grad_()) for w, m in pairs]
    outs = fold_mixes_triton(leaves, d, torch.float32)
    torch.autograd.backward(outs, grads)
    for (w, m), out, grad in zip(leaves, outs, grads):
        ref, gw_ref, gm_ref = reference(w, m, d, grad)
        assert rel_err(out, ref) < 1e-6
        assert rel_err(w.grad, gw_ref) < 1e-6 and rel_err(m.grad, gm_ref) < 1e-6
    gw, gmix = fold_mix_bwd(torch.stack(grads), [w for w, _ in pairs], [m for _, m in pairs])
    assert gmix.shape == (2, hk, h) and gw.shape == (2,) + pairs[0][0].shape
    # an unused output (its gradient None) counts as zero
    w, m = pairs[0][0].clone().requires_grad_(), pairs[0][1].clone().requires_grad_()
    k_eff, _ = fold_mixes_triton([(w, m), (pairs[1][0], pairs[1][1])], d, torch.float32)
    k_eff.backward(grads[0])
    assert rel_err(m.grad, reference(w, m, d, grads[0])[2]) < 1e-6


def test_bf16_weight_and_autocast_dtype():
    weight, mix = make(2, 4, 8, 16, torch.bfloat16)
    ref = fold_mix_into_proj(weight.double(), mix.double(), 8)
    (out,) = fold_mix_fwd([weight], [mix])  # (pairs, h*d, D)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < TOL[torch.bfloat16]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = fold_mix_triton(weight.float(), mix, 8)
    assert out.dtype == torch.bfloat16


def test_identity_mixing_gives_the_weight_back():
    """h' = h with the identity: the folded weight is the projection itself (MEA's start is MHA)."""
    weight, _ = make(4, 4, 8, 12)
    out = fold_mix_triton(weight, torch.eye(4, device=DEV), 8)
    assert torch.equal(out, weight)


def test_non_contiguous_mix():
    weight, mix = make(3, 5, 8, 10)
    mix_t = torch.randn(5, 3, device=DEV).t()  # a (3, 5) view with strides (1, 3)
    assert not mix_t.is_contiguous()
    ref = fold_mix_into_proj(weight.double(), mix_t.double(), 8)
    assert rel_err(fold_mix_triton(weight, mix_t, 8), ref) < 1e-6


def test_bad_inputs_raise():
    weight, mix = make(2, 4, 8, 16)
    with pytest.raises(ValueError, match="head_dim"):
        fold_mix_triton(weight, mix, 5)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        fold_mix_triton(weight.double(), mix, 8)
    with pytest.raises(ValueError, match="at most"):
        fold_mix_triton(torch.zeros(300, 2, device=DEV), torch.zeros(300, 300, device=DEV), 1)
    with pytest.raises(ValueError, match="one shape and dtype"):
        fold_mixes_triton([(weight, mix), make(2, 4, 8, 12)], 8)
    with pytest.raises(ValueError, match="one or two"):
        fold_mixes_triton([(weight, mix)] * 3, 8)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        fold_mix_triton(torch.zeros(16, 4), torch.zeros(2, 4), 8)


def test_custom_op_opcheck():
    weight, mix = make(3, 6, 8, 12)
    weight2, mix2 = make(3, 6, 8, 12)
    torch.library.opcheck(torch.ops.mea.fold_mix.default, ([weight], [mix], torch.float32))
    torch.library.opcheck(torch.ops.mea.fold_mix.default,
                          ([weight.clone().requires_grad_(), weight2.clone().requires_grad_()],
                           [mix.clone().requires_grad_(), mix2.clone().requires_grad_()], torch.float32))
    grads = [torch.randn(6 * 8, 12, device=DEV) for _ in range(2)]
    torch.library.opcheck(torch.ops.mea.fold_mix_bwd.default, (torch.stack(grads), [weight, weight2], [mix, mix2]))
    torch.library.opcheck(torch.ops.mea.fold_mix_bwd.default, (grads[0][None], [weight], [mix]))


def test_torch_compile_fullgraph():
    weight, mix = make(2, 4, 8, 16)
    w, m = weight.clone().requires_grad_(), mix.clone().requires_grad_()
    backend = "inductor" if DEV == "cuda" else "aot_eager"
    f = torch.compile(lambda w, m: fold_mix_triton(w, m, 8, torch.float32).square().sum(), fullgraph=True,
                      backend=backend)
    f(w, m).backward()
    wr, mr = weight.clone().requires_grad_(), mix.clone().requires_grad_()
    fold_mix_into_proj(wr, mr, 8).square().sum().backward()
    assert rel_err(w.grad, wr.grad) < 1e-5 and rel_err(m.grad, mr.grad) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hk,h,d,D", [(16, 16, 128, 2048), (12, 12, 64, 768), (8, 32, 128, 4096)])
def test_gpu_real_sizes(hk, h, d, D):
    weight, mix = make(hk, h, d, D)
    grad = torch.randn(h * d, D, device="cuda").bfloat16()
    ref, gw_ref, gm_ref = reference(weight, mix, d, grad, torch.bfloat16)
    w, m = weight.clone().requires_grad_(), mix.clone().requires_grad_()
    out = fold_mix_triton(w, m, d, torch.bfloat16)
    out.backward(grad)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert rel_err(w.grad, gw_ref) < 1e-5 and rel_err(m.grad, gm_ref) < 1e-5


@pytest.fixture
def fold_calls(monkeypatch):
    """Counts the Triton fold launches that the layers make (through mea.ops.backend.fold_mixes)."""
    from mea.ops import triton_fold

    calls = []
    real = triton_fold.fold_mixes_triton
    monkeypatch.setattr(triton_fold, "fold_mixes_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _mea_layer(device, n_kv_heads=3, head_norm=True, d_model=64, n_heads=4):
    from mea import ModelConfig
    from mea.layers.attention import build_attention

    cfg = ModelConfig(vocab_size=256, d_model=d_model, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      attention="mea", head_norm=head_norm, max_seq_len=128)
    torch.manual_seed(0)
    layer = build_attention(cfg, 0).to(device)
    with torch.no_grad():
        layer.k_mix.add_(0.1 * torch.randn_like(layer.k_mix))
        layer.v_mix.add_(0.1 * torch.randn_like(layer.v_mix))
    return cfg, layer


def _layer_runs(layer, cfg, device, backends, compiled=False, autocast=False, L=100):
    from mea.layers.attention import AttnInputs
    from mea.layers.rope import RotaryEmbedding

    x = torch.randn(2, L, cfg.d_model, device=device)
    dy = torch.randn(2, L, cfg.d_model, device=device)
    dtype = torch.bfloat16 if autocast else torch.float32
    cos, sin = RotaryEmbedding(cfg.head_dim).to(device)(torch.arange(L, device=device)[None].expand(2, -1), dtype)
    results = []
    for backend in backends:
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        fn = torch.compile(layer) if compiled else layer
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, AttnInputs(cos=cos, sin=sin))
        y.backward(dy)
        results.append((y.float(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    return results


def test_mea_layer_backend_triton_matches_torch(fold_calls):
    """The training path's fold through the backend switch: ``triton`` (interpreted here, fp32) runs the
    kernels and gives the outputs and gradients of ``torch``, which runs none."""
    cfg, layer = _mea_layer(DEV)
    (y0, g0), (y1, g1) = _layer_runs(layer, cfg, DEV, ["torch", "triton"], L=12)
    assert len(fold_calls) == 1
    assert rel_err(y1, y0) < 1e-5
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_kv_heads,head_norm", [(8, True), (8, False), (3, True)])
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_mea_layer_with_the_triton_fold_matches_the_matmul_fold(n_kv_heads, head_norm, compiled, fold_calls):
    """The backend changes how W_eff is computed, not what the layer does: outputs and every parameter's
    gradient agree between ``triton`` (the kernels) and ``torch`` (the matmul fold) under bf16 autocast
    (and compiled)."""
    cfg, layer = _mea_layer("cuda", n_kv_heads, head_norm, d_model=512, n_heads=8)
    (y0, g0), (y1, g1) = _layer_runs(layer, cfg, "cuda", ["torch", "triton"], compiled=compiled, autocast=True)
    assert fold_calls
    assert rel_err(y1, y0) < 2e-2
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 3e-2, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_keeps_fp32_training_on_the_matmul_fold(fold_calls):
    """Without autocast the layer's products are fp32, which the Triton fold would take as exact fp32
    products (far slower than cuBLAS): ``auto`` then leaves the fold to the matmul form; under bf16
    autocast it takes the kernels."""
    cfg, layer = _mea_layer("cuda", 2)
    _layer_runs(layer, cfg, "cuda", ["auto"])
    assert not fold_calls
    _layer_runs(layer, cfg, "cuda", ["auto"], autocast=True)
    assert fold_calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fsdp2_sharded_model_with_the_triton_fold(tmp_path, fold_calls):
    """Under FSDP2 (one rank here; each layer fully_shard-ed) the layers' weights reach the fold as the
    unsharded parameters: the Triton fold runs there, and the loss and every gradient match the unsharded
    model's."""
    import copy

    import torch.distributed as dist
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    from mea import ModelConfig, Transformer

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, attention="mea",
                          max_seq_len=64)
        torch.manual_seed(0)
        ref = Transformer(cfg).cuda()
        sharded = copy.deepcopy(ref)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        ids = torch.randint(0, 256, (2, 64), device="cuda")
        losses = []
        for model in (ref, sharded):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(ids, ids)
            loss.backward()
            losses.append(loss.item())
        assert len(fold_calls) == 2 * cfg.n_layers
        assert abs(losses[0] - losses[1]) < 1e-5
        for (name, p), q in zip(ref.named_parameters(), sharded.parameters()):
            grad = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            assert rel_err(grad, p.grad) < 1e-5, name
    finally:
        dist.destroy_process_group()
