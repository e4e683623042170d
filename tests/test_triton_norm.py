"""The Triton head norm against the PyTorch reference (CPU: TRITON_INTERPRET=1, tiny sizes)."""
import pytest
import torch

pytest.importorskip("triton")

from kernel_ref import DEV, TOL, rel_err  # noqa: E402

from mea import ModelConfig  # noqa: E402
from mea.layers import norm as norm_mod  # noqa: E402
from mea.layers.attention import AttnInputs, build_attention  # noqa: E402
from mea.layers.norm import HeadNorm, rms_norm  # noqa: E402
from mea.layers.rope import RotaryEmbedding  # noqa: E402
from mea.ops.triton_norm import head_rms_norm, head_rms_norm_bwd, head_rms_norm_fwd  # noqa: E402


def make_inputs(shape, dtype, transposed=False):
    """Fresh random x (..., h, d) and weight (h, d); ``transposed``: x is the (B, L, h, d) view of a
    (B, h, L, d) tensor, as the attention output reaches the norm."""
    if transposed:
        B, L, h, d = shape
        x = torch.randn(B, h, L, d, device=DEV, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(*shape, device=DEV, dtype=dtype)
    x = x * 3 + 0.5  # not unit scale, so the normalization matters
    w = 1 + 0.5 * torch.randn(shape[-2:], device=DEV)
    return x, w


def reference(x, w, dy, eps=1e-5):
    """Output and gradients of the PyTorch head norm, in float64."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    y = rms_norm(xr, wr, eps)
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad


SHAPES = [
    ((2, 5, 6, 24), True),    # odd head_dim, non-power-of-two head count, a transposed view
    ((3, 7, 4, 32), True),
    ((1, 9, 3, 16), False),   # contiguous
    ((2, 3, 5, 40), False),
    ((11, 5, 8), False),      # 3-D input (L, h, d)
    ((2, 2, 3, 2, 16), False),  # 5-D input
]


@pytest.mark.parametrize("shape,transposed", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grads_match_reference(shape, transposed, dtype):
    x, w = make_inputs(shape, dtype, transposed)
    dy = torch.randn(x.shape, device=DEV, dtype=dtype)
    y_ref, dx_ref, dw_ref = reference(x, w, dy)
    xg, wg = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    y = head_rms_norm(xg, wg, 1e-5)
    y.backward(dy)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert xg.grad.dtype == dtype and wg.grad.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(xg.grad, dx_ref) < TOL[dtype]
    # The weight gradient sums over tokens in fp32; only dy's and x's rounding enter.
    assert rel_err(wg.grad, dw_ref) < 1e-5


@pytest.mark.parametrize("block_t,programs", [(1, 1), (2, 3), (4, 100), (16, 2)])
def test_backward_tilings(block_t, programs):
    # Ragged tails: 13 tokens over tiles of 1-16 tokens and 1 to more programs than tiles.
    x, w = make_inputs((1, 13, 3, 24), torch.float32, transposed=True)
    dy = torch.randn(x.shape, device=DEV)
    _, dx_ref, dw_ref = reference(x, w, dy)
    dx, dw = head_rms_norm_bwd(dy, x, w, 1e-5, block_t=block_t, programs=programs)
    assert rel_err(dx, dx_ref) < 1e-6 and rel_err(dw, dw_ref) < 1e-6


@pytest.mark.parametrize("block_t", [1, 4, 64])
def test_forward_tilings(block_t):
    x, w = make_inputs((2, 7, 3, 24), torch.float32, transposed=True)
    y = head_rms_norm_fwd(x, w, 1e-5, block_t=block_t)
    assert rel_err(y, reference(x, w, torch.zeros_like(x))[0]) < 1e-6


def test_fp16_and_mixed_weight_dtype():
    x, w = make_inputs((2, 5, 6, 24), torch.float16, transposed=True)
    dy = torch.randn(x.shape, device=DEV, dtype=torch.float16)
    y_ref, dx_ref, dw_ref = reference(x, w.half(), dy)
    xg, wg = x.clone().requires_grad_(), w.half().requires_grad_()
    y = head_rms_norm(xg, wg)
    y.backward(dy)
    assert wg.grad.dtype == torch.float16
    assert rel_err(y, y_ref) < TOL[torch.float16] and rel_err(xg.grad, dx_ref) < TOL[torch.float16]
    assert rel_err(wg.grad, dw_ref) < TOL[torch.float16]


def test_eps_is_used():
    x, w = make_inputs((1, 3, 2, 16), torch.float32)
    x = x * 1e-3  # mean square ~1e-5: eps changes the result visibly
    for eps in (1e-5, 1e-2):
        assert rel_err(head_rms_norm(x, w, eps), reference(x, w, torch.zeros_like(x), eps)[0]) < 1e-6


def test_no_grad_path_skips_the_dispatcher_and_agrees():
    x, w = make_inputs((2, 5, 6, 24), torch.float32, transposed=True)
    with torch.no_grad():
        a = head_rms_norm(x, w)
    b = torch.ops.mea.head_rms_norm(x, w, 1e-5)
    assert torch.equal(a, b)


def test_bad_inputs_raise():
    x, w = make_inputs((2, 3, 4, 16), torch.float32)
    with pytest.raises(ValueError, match="shape"):
        head_rms_norm(x, w.t())
    with pytest.raises(ValueError, match="fp16"):
        head_rms_norm(x.double(), w)
    with pytest.raises(ValueError, match="fp16"):
        head_rms_norm(x.to(torch.int32), w)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        head_rms_norm(torch.randn(2, 3, 16), torch.ones(3, 16))


def test_custom_op_opcheck():
    x, w = make_inputs((2, 3, 4, 16), torch.float32, transposed=True)
    dy = torch.randn(x.shape, device=DEV)
    torch.library.opcheck(torch.ops.mea.head_rms_norm.default, (x, w, 1e-5))
    # With gradients: checks the registered autograd formula's plumbing.
    torch.library.opcheck(torch.ops.mea.head_rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-5))
    torch.library.opcheck(torch.ops.mea.head_rms_norm_bwd.default, (dy, x.detach(), w.detach(), 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """No graph break: the op is one node, forward and backward (aot_eager on CPU: no C++ build)."""
    torch._dynamo.reset()
    x, w = make_inputs((2, 5, 3, 24), torch.float32, transposed=True)
    dy = torch.randn(x.shape, device=DEV)
    backend = "inductor" if DEV == "cuda" else "aot_eager"
    fn = torch.compile(lambda x, w: head_rms_norm(x, w, 1e-5) * 2, fullgraph=True, backend=backend)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn(xg, wg).backward(dy)
    y_ref, dx_ref, dw_ref = reference(x, w, 2 * dy)
    assert rel_err(fn(x, w), 2 * y_ref) < 1e-6
    assert rel_err(xg.grad, dx_ref) < 1e-6 and rel_err(wg.grad, dw_ref) < 1e-6


def test_head_norm_module_keeps_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(norm_mod, "_triton_head_norm", lambda *a: calls.append(1))
    HeadNorm(3, 16)(torch.randn(2, 4, 3, 16))
    assert not calls


# ---------------------------------------------------------------------------- GPU, realistic sizes
def _attention_layer(attention, **kw):
    cfg = ModelConfig(attention=attention, vocab_size=64, d_model=256, n_layers=1, n_heads=8, max_seq_len=128,
                      head_norm=True, **kw)
    torch.manual_seed(1)
    layer = build_attention(cfg, 0).cuda()
    layer.fold_norm_gain = False  # the kernel normalizes with the weight on the tokens; folded, no norm kernel runs
    with torch.no_grad():
        layer.head_norm.weight.add_(0.3 * torch.randn_like(layer.head_norm.weight))
    return cfg, layer


@pytest.mark.gpu
@pytest.mark.parametrize("attention,kw", [("mea", {"n_kv_heads": 3}), ("mea", {}), ("diff", {}), ("mha", {})])
def test_gpu_attention_layer_triton_vs_torch_norm(monkeypatch, attention, kw):
    """A layer with the kernel gives the torch form's output and gradients (bf16 autocast)."""
    cfg, layer = _attention_layer(attention, **kw)
    x = torch.randn(2, 100, cfg.d_model, device="cuda")
    cos, sin = RotaryEmbedding(cfg.head_dim // 2 if attention == "diff" else cfg.head_dim).cuda()(
        torch.arange(100, device="cuda")[None].expand(2, -1), torch.bfloat16)
    dy = torch.randn(2, 100, cfg.d_model, device="cuda")
    calls = []
    fast = norm_mod._triton_head_norm
    monkeypatch.setattr(norm_mod, "_triton_head_norm", lambda *a: calls.append(1) or fast(*a))

    def run(use_triton):
        monkeypatch.setattr(norm_mod, "TRITON_HEAD_NORM", use_triton)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, AttnInputs(cos=cos, sin=sin))
        y.float().backward(dy)
        return y.float(), {n: p.grad.float().clone() for n, p in layer.named_parameters()}

    y0, g0 = run(False)
    assert not calls
    y1, g1 = run(True)
    assert calls
    assert rel_err(y1, y0) < 1e-2
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 2e-2, n


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,h,d", [(torch.bfloat16, 16, 128), (torch.bfloat16, 32, 256), (torch.bfloat16, 5, 96),
                                       (torch.float16, 12, 64), (torch.float32, 5, 96), (torch.float32, 16, 128)])
def test_gpu_large(dtype, h, d):
    x, w = make_inputs((4, 1000, h, d), dtype, transposed=True)
    dy = torch.randn(x.shape, device=DEV, dtype=dtype)
    y_ref, dx_ref, dw_ref = reference(x, w, dy)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = head_rms_norm(xg, wg)
    y.backward(dy)
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(xg.grad, dx_ref) < TOL[dtype]
    assert rel_err(wg.grad, dw_ref) < 1e-5


@pytest.mark.gpu
def test_gpu_head_norm_module_dispatches():
    assert norm_mod._triton_head_norm is head_rms_norm
    m = HeadNorm(4, 32).cuda()
    x = torch.randn(3, 5, 4, 32, device="cuda")
    torch.testing.assert_close(m(x), rms_norm(x, m.weight, m.eps), rtol=1e-5, atol=1e-5)
