"""The training path's fold (``mea.ops.attention.fold_mix_into_proj``) as Triton kernels.

MEA's training forward folds each mixing matrix into its projection weight once per step,

    W_eff = mix^T @ W        W: (h', d*D) (the (h'*d, D) weight, row-major), mix: (h', h)

and autograd then needs grad_W = mix @ G and grad_mix = W @ G^T, with G = dL/dW_eff (h, d*D). Done
as matmuls, that is casts and three cuBLAS calls per weight on skinny shapes (a 16-row product; a
16 x 16 result reduced over d*D), which an H200 ran at about 3x their memory floor
(docs/performance.md). Here K's and V's folds share one launch each way: the forward reads each fp32
weight once and writes the folded weight in the compute dtype (the cast folded in); the backward reads
G and W once and writes both gradients (the mixing gradient as one partial sum per program, then one
small ``sum``: no atomics, so the result does not depend on scheduling). The products are tensor-core
``tl.dot``s over (heads x block-of-columns) tiles, with operands rounded to the compute dtype and fp32
accumulation: the arithmetic of the matmul fold under autocast. Head counts are padded to 16 inside a
tile (tl.dot's smallest side). fp32 data takes exact fp32 products (correct, but far slower: the layer
sends fp32 training to the matmul fold).

``mea::fold_mix`` and ``mea::fold_mix_bwd`` are torch.library ops with an autograd formula: on the GPU
``triton_op``s, which torch.compile traces into and launches from its own generated code; under the
interpreter ``custom_op``s with fake kernels. The kernels run on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .triton_util import cdiv, check_inputs, interpreting, next_pow2

__all__ = ["fold_mix_triton", "fold_mixes_triton", "fold_mix_fwd", "fold_mix_bwd"]

MAX_HEADS = 256  # the (h', h) mixing tile lives in registers; past this it would not compile in reasonable size


@triton.jit
def _pick(which, a, b):
    # which weight of the pair this program works on (grid axis 1): a pointer or stride, selected
    if which == 0:
        out = a
    else:
        out = b
    return out


@triton.jit
def _pair(which, W0, W1, M0, M1, sm0_k, sm0_h, sm1_k, sm1_h):
    """This program's weight, mixing matrix and the matrix's strides."""
    return _pick(which, W0, W1), _pick(which, M0, M1), _pick(which, sm0_k, sm1_k), _pick(which, sm0_h, sm1_h)


@triton.jit
def _operand(x, cdt, F32: tl.constexpr):
    """A product's operand: rounded to the compute dtype (autocast's matmul rounds the same way), or kept
    fp32 (fp32 data; the interpreter, whose bf16 casts truncate and whose bf16 products are wrong)."""
    if F32:
        out = x.to(tl.float32)
    else:
        out = x.to(cdt)
    return out


@triton.jit
def _mm(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation: on the tensor cores for half operands, exact fp32 products else."""
    if F32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _fold_fwd_kernel(W0, W1, M0, M1, OUT, N, HK, H, sm0_k, sm0_h, sm1_k, sm1_h,
                     HK_P: tl.constexpr, H_P: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
                     F32: tl.constexpr):
    which = tl.program_id(1)
    W, MIX, s_k, s_h = _pair(which, W0, W1, M0, M1, sm0_k, sm0_h, sm1_k, sm1_h)
    OUT += which * H * N  # the pairs' outputs are slices of one tensor (outputs are never picked by pointer)
    cdt = OUT.dtype.element_ty  # the compute dtype: both operands are rounded to it, as autocast's matmul does
    rk = tl.arange(0, HK_P)
    rh = tl.arange(0, H_P)
    k_ok = rk < HK
    h_ok = rh < H
    mix_t = tl.load(MIX + rk[None, :] * s_k + rh[:, None] * s_h, mask=h_ok[:, None] & k_ok[None, :], other=0.0)
    mix_t = _operand(mix_t, cdt, F32)
    # out[:, cols] = mix^T @ w[:, cols]: a (h, h') by (h', BLOCK_N) product per block of columns, SUB of
    # them per program, so a program's loads pipeline behind its products.
    for s in range(SUB):
        offs_n = ((tl.program_id(0) * SUB + s) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < N
        w = tl.load(W + rk[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        out = _mm(mix_t, _operand(w, cdt, F32), F32)
        tl.store(OUT + rh[:, None] * N + offs_n[None, :], out.to(cdt), mask=h_ok[:, None] & n_ok[None, :])


@triton.jit
def _fold_bwd_kernel(G, W0, W1, M0, M1, GW, GMIX_PART, N, HK, H, sm0_k, sm0_h, sm1_k, sm1_h,
                     HK_P: tl.constexpr, H_P: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
                     F32: tl.constexpr):
    which = tl.program_id(1)
    W, MIX, s_k, s_h = _pair(which, W0, W1, M0, M1, sm0_k, sm0_h, sm1_k, sm1_h)
    G += which * H * N
    GW += which * HK * N
    cdt = G.dtype.element_ty
    rk = tl.arange(0, HK_P)
    rh = tl.arange(0, H_P)
    k_ok = rk < HK
    h_ok = rh < H
    mix = tl.load(MIX + rk[:, None] * s_k + rh[None, :] * s_h, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
    mix = _operand(mix, cdt, F32)
    gmix = tl.zeros((HK_P, H_P), dtype=tl.float32)
    # Per block of columns: grad_W[:, cols] = mix @ G[:, cols], and this program's share of
    # grad_mix = W @ G^T accumulates in registers; one partial per program, summed afterwards by one
    # small ``sum`` (no atomics: the result does not depend on scheduling).
    for s in range(SUB):
        offs_n = ((tl.program_id(0) * SUB + s) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < N
        g = tl.load(G + rh[:, None] * N + offs_n[None, :], mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(W + rk[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        g = _operand(g, cdt, F32)
        gw = _mm(mix, g, F32)
        tl.store(GW + rk[:, None] * N + offs_n[None, :], gw.to(GW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
        gmix += _mm(_operand(w, cdt, F32), tl.trans(g), F32)
    part = GMIX_PART + (tl.program_id(0) * 2 + which) * HK_P * H_P
    tl.store(part + rk[:, None] * H_P + rh[None, :], gmix)


# ------------------------------------------------------------------------------------ launch
def _pad(n: int) -> int:
    """A head count padded for tl.dot: a power of two, at least 16."""
    return max(16, next_pow2(n))


def _launch(hk: int, h: int, tile: int, f32: bool) -> dict:
    """Tile sizes shared by both kernels: BLOCK_N columns per product (a (heads, BLOCK_N) tile of at most
    ``tile`` values), four blocks per program; fp32 operands for fp32 data and under the interpreter."""
    hk_p, h_p = _pad(hk), _pad(h)
    return dict(HK_P=hk_p, H_P=h_p, BLOCK_N=max(16, min(128, tile // max(hk_p, h_p))), SUB=4,
                F32=f32 or interpreting(), num_warps=4, num_stages=3)


def _rows(weight: Tensor, hk: int) -> Tensor:
    """The (h'*d, D) weight as (h', d*D) without a copy (nn.Linear weights are contiguous)."""
    return weight.contiguous().view(hk, -1)


def fold_mix_fwd(weights: Sequence[Tensor], mixes: Sequence[Tensor],
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The forward kernel, one launch for one or two (weight, mix) pairs of one shape: the W_eff (h*d, D)
    stacked, (pairs, h*d, D), in ``out_dtype`` (default: the weights' dtype), from operands rounded to
    that dtype. One tensor rather than one per pair: two outputs written by one launch would be two
    mutated kernel arguments, which torch.compile's functionalization may not alias."""
    hk, h = mixes[0].shape
    ws = [_rows(w, hk) for w in weights]
    N = ws[0].shape[1]
    out = torch.empty((len(ws), h * (weights[0].shape[0] // hk), weights[0].shape[1]),
                      dtype=out_dtype or weights[0].dtype, device=weights[0].device)
    if N:
        cfg = _launch(hk, h, 2048, out.dtype == torch.float32)
        wrap_triton(_fold_fwd_kernel)[(cdiv(N, cfg["BLOCK_N"] * cfg["SUB"]), len(ws))](
            ws[0], ws[-1], mixes[0], mixes[-1], out, N, hk, h, *mixes[0].stride(), *mixes[-1].stride(), **cfg)
    return out


def fold_mix_bwd(grad: Tensor, weights: Sequence[Tensor], mixes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The backward kernel, one launch for the pairs, from their W_eff gradients stacked (pairs, h*d, D):
    (the weights' gradients stacked, (pairs, h'*d, D) in their dtype; the mixing gradients stacked,
    (pairs, h', h) fp32). The products take their operands rounded to the gradient's dtype (what
    autocast's matmul fold does) and accumulate in fp32."""
    hk, h = mixes[0].shape
    ws = [_rows(w, hk) for w in weights]
    N = ws[0].shape[1]
    g = grad.contiguous()
    gw = torch.empty((len(ws),) + tuple(weights[0].shape), dtype=weights[0].dtype, device=weights[0].device)
    cfg = _launch(hk, h, 1024, g.dtype == torch.float32)
    blocks = cdiv(N, cfg["BLOCK_N"] * cfg["SUB"])
    part = torch.empty((blocks, 2, cfg["HK_P"], cfg["H_P"]), dtype=torch.float32, device=g.device)
    if N:
        wrap_triton(_fold_bwd_kernel)[(blocks, len(ws))](
            g, ws[0], ws[-1], mixes[0], mixes[-1], gw, part, N, hk, h,
            *mixes[0].stride(), *mixes[-1].stride(), **cfg)
        gmix = part[:, :len(ws), :hk, :h].sum(0)
    else:
        gmix = part.new_zeros((len(ws), hk, h))
    return gw, gmix


# ------------------------------------------------------------------------------------ custom ops
def _op(name: str):
    """triton_op on the GPU: torch.compile sees the kernels through it and launches them from its own
    generated code, without a Python op call per launch (which left the fold launch-bound on small
    models). Under the interpreter a custom_op with a fake kernel: there, tracing would run the
    interpreted kernels on fake tensors."""
    if interpreting():
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())


@_op("mea::fold_mix")
def _fwd_op(weights: list[Tensor], mixes: list[Tensor], out_dtype: torch.dtype) -> Tensor:
    return fold_mix_fwd(weights, mixes, out_dtype)


@_op("mea::fold_mix_bwd")
def _bwd_op(grad: Tensor, weights: list[Tensor], mixes: list[Tensor]) -> tuple[Tensor, Tensor]:
    return fold_mix_bwd(grad, weights, mixes)


if interpreting():  # a triton_op's fake form is its own function, traced
    @_fwd_op.register_fake
    def _(weights, mixes, out_dtype):
        hk, h = mixes[0].shape
        w = weights[0]
        return w.new_empty((len(weights), h * (w.shape[0] // hk), w.shape[1]), dtype=out_dtype)

    @_bwd_op.register_fake
    def _(grad, weights, mixes):
        hk, h = mixes[0].shape
        w = weights[0]
        return w.new_empty((len(weights),) + tuple(w.shape)), w.new_empty((len(weights), hk, h), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    weights, mixes, _ = inputs
    ctx.save_for_backward(*weights, *mixes)
    ctx.pairs = len(weights)


def _backward(ctx, grad):
    n = ctx.pairs
    weights, mixes = list(ctx.saved_tensors[:n]), list(ctx.saved_tensors[n:])
    gw, gmix = _bwd_op(grad, weights, mixes)
    return list(gw.unbind(0)), [gmix[i].to(m.dtype) for i, m in enumerate(mixes)], None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fold_mixes_triton(pairs: Sequence[tuple[Tensor, Tensor]], head_dim: int,
                      out_dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """``fold_mix_into_proj`` of one or two (weight, mix) pairs of one shape and dtype (MEA's K and V), one
    kernel launch each way for all of them; differentiable in every weight and mix.

    weight: (h' * head_dim, D); mix: (h', h). Returns each W_eff (h * head_dim, D) in ``out_dtype``
    (default: the autocast dtype inside an autocast region, else the weights' dtype), computed in fp32.
    """
    if not 1 <= len(pairs) <= 2:
        raise ValueError(f"fold_mixes_triton: one or two (weight, mix) pairs, got {len(pairs)}")
    weights, mixes = [w for w, _ in pairs], [m for _, m in pairs]
    weight, mix = pairs[0]
    for w, m in pairs:
        if w.dim() != 2 or m.dim() != 2 or w.shape[0] != m.shape[0] * head_dim:
            raise ValueError(f"fold_mixes_triton: weight {tuple(w.shape)} must be (h' * head_dim, D) for mix "
                             f"{tuple(m.shape)} = (h', h) and head_dim {head_dim}")
        if w.shape != weight.shape or m.shape != mix.shape or w.dtype != weight.dtype or m.dtype != mix.dtype:
            raise ValueError("fold_mixes_triton: the pairs must have one shape and dtype, got "
                             + " and ".join(f"{tuple(w.shape)} {w.dtype} / {tuple(m.shape)} {m.dtype}" for w, m in pairs))
        check_inputs("fold_mixes_triton", "mea.ops.attention.fold_mix_into_proj", weight=w, mix=m)
    if weight.device != mix.device or any(t.device != weight.device for t in weights + mixes):
        raise ValueError("fold_mixes_triton: all weights and mixes must be on one device")
    if mix.shape[0] > MAX_HEADS or mix.shape[1] > MAX_HEADS:
        raise ValueError(f"fold_mixes_triton: at most {MAX_HEADS} heads, got mix {tuple(mix.shape)}")
    if out_dtype is None:
        dev = weight.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    return list(_fwd_op(weights, mixes, out_dtype).unbind(0))


def fold_mix_triton(weight: Tensor, mix: Tensor, head_dim: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``fold_mix_into_proj`` of one weight as Triton kernels (see ``fold_mixes_triton``)."""
    return fold_mixes_triton([(weight, mix)], head_dim, out_dtype)[0]
