"""The head norm (an RMSNorm over each head's d channels, weight (h, d)) as Triton kernels.

MEA and differential attention normalize every head of the attention output on its own:

    y[t, i, :] = x[t, i, :] * rsqrt(mean(x[t, i, :]^2) + eps) * w[i, :]

Under torch.compile the PyTorch form (``mea.layers.norm.rms_norm``) already becomes one fused
kernel per direction; what these kernels add is a backward that makes one pass over x and dy
(the input gradient and the weight gradient's partial sums together, no fp32 copy of x saved),
and an eager path with one launch instead of a chain of elementwise ops. Both kernels accumulate
in fp32 whatever the input dtype (fp16, bf16, fp32) and read x through its strides, so the
attention output ``o.transpose(1, 2)`` (B, L, h, d) is normalized where it lies, without a copy.

One program takes a block of tokens of ONE head: the head's weight row is loaded once, and in the
backward its weight gradient is summed over the program's tokens in registers, then over programs
by one small ``sum`` (no atomics, so the result does not depend on scheduling).

``mea::head_rms_norm`` and ``mea::head_rms_norm_bwd`` are torch.library custom ops with fake
(meta) kernels and an autograd formula, so torch.compile keeps them as single nodes in the graph
(no graph break) and differentiates through them. The kernels run on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_util import cdiv, check_inputs, next_pow2, sm_count

__all__ = ["head_rms_norm", "head_rms_norm_fwd", "head_rms_norm_bwd"]

MAX_HEAD_DIM = 8192  # a row of BLOCK_D fp32 values per token must fit in registers


@triton.jit
def _head_rms_norm_fwd_kernel(
    X, W, Y,
    stride_xa, stride_xl, stride_xh, stride_xd,
    stride_wh, stride_wd,
    n_tokens, L, H, eps,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    toks = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = toks < n_tokens
    d_ok = offs_d < D
    ok = t_ok[:, None] & d_ok[None, :]
    # Token t is x[t // L, t % L]: the two leading dims need not be mergeable (a transposed view).
    x_row = (toks // L) * stride_xa + (toks % L) * stride_xl + head * stride_xh
    x = tl.load(X + x_row[:, None] + offs_d[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + head * stride_wh + offs_d * stride_wd, mask=d_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    # Same order as the reference: normalize, then scale by the weight.
    y = (x * rstd[:, None]) * w[None, :]
    # Y is contiguous (n_tokens, H, D).
    tl.store(Y + (toks * H + head)[:, None] * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _head_rms_norm_bwd_kernel(
    DY, X, W, DX, DW_PART,
    stride_ga, stride_gl, stride_gh, stride_gd,
    stride_xa, stride_xl, stride_xh, stride_xd,
    stride_wh, stride_wd,
    n_tokens, L, H, eps, tokens_per_program,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # With xh = x * rstd and g = dy * w:
    #   dx = rstd * (g - xh * mean(g * xh)),   dw = sum over tokens of dy * xh.
    # rstd is recomputed from x (already loaded for xh) rather than saved by the forward.
    pid = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    w = tl.load(W + head * stride_wh + offs_d * stride_wd, mask=d_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    start = pid * tokens_per_program
    end = tl.minimum(start + tokens_per_program, n_tokens)
    for t0 in range(start, end, BLOCK_T):
        toks = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        ok = (toks < end)[:, None] & d_ok[None, :]
        a = toks // L
        l = toks % L  # noqa: E741
        x = tl.load(X + (a * stride_xa + l * stride_xl + head * stride_xh)[:, None] + offs_d[None, :] * stride_xd,
                    mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + (a * stride_ga + l * stride_gl + head * stride_gh)[:, None] + offs_d[None, :] * stride_gd,
                     mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        xh = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xh, 1) / D
        dx = (g - xh * c[:, None]) * rstd[:, None]
        tl.store(DX + (toks * H + head)[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xh  # masked lanes load 0, so they add 0
    tl.store(DW_PART + (pid * H + head) * D + offs_d, tl.sum(dw, 0), mask=d_ok)


# ------------------------------------------------------------------------------------ launch
def _as_4d(t: Tensor) -> Tensor:
    """(..., h, d) -> (A, L, h, d) without copying where the strides allow (always for 2-4 dims)."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, t.shape[-3], t.shape[-2], t.shape[-1])


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


def head_rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, block_t: int = 0, num_warps: int = 4) -> Tensor:
    """The forward kernel: y (contiguous, shape and dtype of x). ``block_t``: tokens per program
    (a power of two; 0 = about 4k elements per tile)."""
    H, D = weight.shape
    x4 = _as_4d(x)
    A, L = x4.shape[0], x4.shape[1]
    n_tokens = A * L
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return y
    bd = _block_d(D)
    bt = block_t or max(1, 4096 // bd)
    _head_rms_norm_fwd_kernel[(cdiv(n_tokens, bt), H)](
        x4, weight, y, *x4.stride(), *weight.stride(), n_tokens, L, H, float(eps),
        D=D, BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps,
    )
    return y


def head_rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, eps: float, block_t: int = 0, programs: int = 0,
                      num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """The backward kernel: (dx in x's dtype, contiguous; dw in weight's dtype). ``programs``: token
    slices per head (0 = about 8 programs per multiprocessor in all), each reducing its own partial dw."""
    H, D = weight.shape
    x4, g4 = _as_4d(x), _as_4d(dy)
    A, L = x4.shape[0], x4.shape[1]
    n_tokens = A * L
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return dx, torch.zeros_like(weight)
    bd = _block_d(D)
    bt = block_t or max(1, 2048 // bd)
    if not programs:
        sms = sm_count(x.device)
        programs = max(1, (8 * sms) // H)
    # Whole tiles per program, so only the last program has a ragged tail.
    per_prog = cdiv(cdiv(n_tokens, min(programs, cdiv(n_tokens, bt))), bt) * bt
    n_prog = cdiv(n_tokens, per_prog)
    dw_part = torch.empty((n_prog, H, D), dtype=torch.float32, device=x.device)
    _head_rms_norm_bwd_kernel[(n_prog, H)](
        g4, x4, weight, dx, dw_part, *g4.stride(), *x4.stride(), *weight.stride(),
        n_tokens, L, H, float(eps), per_prog,
        D=D, BLOCK_T=bt, BLOCK_D=bd, num_warps=num_warps,
    )
    return dx, dw_part.sum(0).to(weight.dtype)


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("mea::head_rms_norm", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return head_rms_norm_fwd(x, weight, eps)


@_fwd_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("mea::head_rms_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return head_rms_norm_bwd(dy, x, weight, eps)


@_bwd_op.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)  # x in its own dtype: no fp32 copy kept for the backward
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _bwd_op(dy, x, weight, ctx.eps)
    return dx, dw, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def head_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-head RMSNorm of x (..., h, d) with weight (h, d), differentiable in x and weight.

    Returns a contiguous tensor of x's shape and dtype (the reference, ``rms_norm``, computes in fp32
    and casts back the same way). x may be any strided view whose last two dims are (h, d).
    """
    if weight.dim() != 2 or x.dim() < 2 or tuple(x.shape[-2:]) != tuple(weight.shape):
        raise ValueError(f"head_rms_norm: x {tuple(x.shape)} must end in the weight's shape (h, d) "
                         f"= {tuple(weight.shape)}")
    check_inputs("head_rms_norm", "mea.layers.norm.rms_norm", x=x, weight=weight)
    if weight.shape[1] > MAX_HEAD_DIM:
        raise ValueError(f"head_rms_norm: head_dim {weight.shape[1]} exceeds {MAX_HEAD_DIM}")
    # Through the op dispatcher only where it is needed (compile tracing, autograd): its Python
    # overhead is comparable to the kernel itself at decoding sizes.
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _fwd_op(x, weight, eps)
    return head_rms_norm_fwd(x, weight, eps)
