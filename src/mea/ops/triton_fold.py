"""The training path's fold (``mea.ops.attention.fold_mix_into_proj``) as Triton kernels.

MEA's training forward folds each mixing matrix into its projection weight once per step,

    W_eff = mix^T @ W        W: (h', d*D) (the (h'*d, D) weight, row-major), mix: (h', h)

and autograd then needs grad_W = mix @ G and grad_mix = W @ G^T, with G = dL/dW_eff (h, d*D). Done
as matmuls, that is a weight cast and three cuBLAS calls per weight on skinny shapes (a 16-row
product; a 16 x 16 result reduced over d*D), which an H200 ran at about 3x their memory floor
(docs/performance.md). Here the forward is one kernel that reads the fp32 weight once and writes the
folded weight in the compute dtype (the cast folded in), and the backward is one kernel that reads G
and W once and writes both gradients (the mixing gradient as per-program partial sums, then one small
``sum``: no atomics, so the result does not depend on scheduling). Arithmetic is fp32 throughout.

``mea::fold_mix`` and ``mea::fold_mix_bwd`` are torch.library custom ops with fake kernels and an
autograd formula, so torch.compile keeps each one a single node. The kernels run on CUDA, and on CPU
tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_util import check_inputs, sm_count

__all__ = ["fold_mix_triton", "fold_mix_fwd", "fold_mix_bwd"]

MAX_HEADS = 256  # an (h, BLOCK_N) fp32 tile per program must fit in registers


@triton.jit
def _fold_fwd_kernel(W, MIX, OUT, N, HK, H, stride_mk, stride_mh,
                     HK_P: tl.constexpr, H_P: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, HK_P)
    rh = tl.arange(0, H_P)
    n_ok = offs_n < N
    w = tl.load(W + rk[:, None] * N + offs_n[None, :], mask=(rk < HK)[:, None] & n_ok[None, :], other=0.0)
    # mix^T as an (H_P, HK_P) tile; the padding rows and columns are zero.
    mix_t = tl.load(MIX + rk[None, :] * stride_mk + rh[:, None] * stride_mh,
                    mask=(rh < H)[:, None] & (rk < HK)[None, :], other=0.0)
    out = tl.dot(mix_t.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    tl.store(OUT + rh[:, None] * N + offs_n[None, :], out.to(OUT.dtype.element_ty),
             mask=(rh < H)[:, None] & n_ok[None, :])


@triton.jit
def _fold_bwd_kernel(G, W, MIX, GW, GMIX_PART, N, HK, H, stride_mk, stride_mh, blocks_per_prog,
                     HK_P: tl.constexpr, H_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rk = tl.arange(0, HK_P)
    rh = tl.arange(0, H_P)
    k_ok = rk < HK
    h_ok = rh < H
    mix = tl.load(MIX + rk[:, None] * stride_mk + rh[None, :] * stride_mh,
                  mask=k_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((HK_P, H_P), dtype=tl.float32)
    for b in range(blocks_per_prog):
        offs_n = ((pid * blocks_per_prog + b) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < N
        g = tl.load(G + rh[:, None] * N + offs_n[None, :], mask=h_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(W + rk[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        gw = tl.dot(mix, g, input_precision="ieee")                 # (HK_P, BLOCK_N): mix @ G
        tl.store(GW + rk[:, None] * N + offs_n[None, :], gw.to(GW.dtype.element_ty),
                 mask=k_ok[:, None] & n_ok[None, :])
        # tf32x3 (three tensor-core products, about fp32 accuracy): the fp32 FMA form of a dot whose inner
        # dimension is BLOCK_N spilled registers, 40x slower than the memory floor on an H200.
        acc += tl.dot(w, tl.trans(g), input_precision="tf32x3")    # (HK_P, H_P): W @ G^T, this block
    # unpadded, so that summing the partials gives grad_mix as it is, with no slice or copy after
    tl.store(GMIX_PART + pid * HK * H + rk[:, None] * H + rh[None, :], acc, mask=k_ok[:, None] & h_ok[None, :])


# ------------------------------------------------------------------------------------ launch
def _pad(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())  # tl.dot wants every dimension >= 16


def _block_n(hk_p: int, h_p: int) -> int:
    return max(32, min(256, 4096 // max(hk_p, h_p)))


def _rows(weight: Tensor, hk: int) -> Tensor:
    """The (h'*d, D) weight as (h', d*D) without a copy (nn.Linear weights are contiguous)."""
    return weight.contiguous().view(hk, -1)


def fold_mix_fwd(weight: Tensor, mix: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The forward kernel: W_eff (h*d, D) in ``out_dtype`` (default: the weight's)."""
    hk, h = mix.shape
    w = _rows(weight, hk)
    N = w.shape[1]
    out = torch.empty((h * (weight.shape[0] // hk), weight.shape[1]), dtype=out_dtype or weight.dtype,
                      device=weight.device)
    if N == 0:
        return out
    hk_p, h_p = _pad(hk), _pad(h)
    bn = _block_n(hk_p, h_p)
    _fold_fwd_kernel[(triton.cdiv(N, bn),)](w, mix, out, N, hk, h, *mix.stride(),
                                              HK_P=hk_p, H_P=h_p, BLOCK_N=bn, num_warps=4)
    return out


def fold_mix_bwd(grad: Tensor, weight: Tensor, mix: Tensor, programs: int = 0) -> tuple[Tensor, Tensor]:
    """The backward kernel: (grad_weight in the weight's dtype and shape, grad_mix in the mix's dtype).
    ``programs``: how many slices of d*D reduce their own partial grad_mix (0 = two per multiprocessor)."""
    hk, h = mix.shape
    w = _rows(weight, hk)
    N = w.shape[1]
    g = grad.contiguous().view(h, N)
    gw = torch.empty_like(w)
    hk_p, h_p = _pad(hk), _pad(h)
    bn = _block_n(hk_p, h_p)
    blocks = triton.cdiv(N, bn)
    if not programs:
        programs = 2 * sm_count(weight.device)
    per_prog = triton.cdiv(blocks, max(1, min(programs, blocks)))
    n_prog = triton.cdiv(blocks, per_prog)
    part = torch.empty((n_prog, hk, h), dtype=torch.float32, device=weight.device)
    if N:
        _fold_bwd_kernel[(n_prog,)](g, w, mix, gw, part, N, hk, h, *mix.stride(), per_prog,
                                    HK_P=hk_p, H_P=h_p, BLOCK_N=bn, num_warps=4)
    else:
        part.zero_()
    return gw.view(weight.shape), part.sum(0).to(mix.dtype)


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("mea::fold_mix", mutates_args=())
def _fwd_op(weight: Tensor, mix: Tensor, out_dtype: torch.dtype) -> Tensor:
    return fold_mix_fwd(weight, mix, out_dtype)


@_fwd_op.register_fake
def _(weight, mix, out_dtype):
    hk, h = mix.shape
    return weight.new_empty((h * (weight.shape[0] // hk), weight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("mea::fold_mix_bwd", mutates_args=())
def _bwd_op(grad: Tensor, weight: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
    return fold_mix_bwd(grad, weight, mix)


@_bwd_op.register_fake
def _(grad, weight, mix):
    return weight.new_empty(weight.shape), mix.new_empty(mix.shape)


def _setup_context(ctx, inputs, output):
    weight, mix, _ = inputs
    ctx.save_for_backward(weight, mix)


def _backward(ctx, grad):
    weight, mix = ctx.saved_tensors
    gw, gmix = _bwd_op(grad, weight, mix)
    return gw, gmix, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fold_mix_triton(weight: Tensor, mix: Tensor, head_dim: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``fold_mix_into_proj`` as one kernel each way, differentiable in weight and mix.

    weight: (h' * head_dim, D); mix: (h', h). Returns W_eff (h * head_dim, D) in ``out_dtype`` (default:
    the autocast dtype inside an autocast region, else the weight's dtype), computed in fp32.
    """
    if weight.dim() != 2 or mix.dim() != 2 or weight.shape[0] != mix.shape[0] * head_dim:
        raise ValueError(f"fold_mix_triton: weight {tuple(weight.shape)} must be (h' * head_dim, D) for mix "
                         f"{tuple(mix.shape)} = (h', h) and head_dim {head_dim}")
    if mix.shape[0] > MAX_HEADS or mix.shape[1] > MAX_HEADS:
        raise ValueError(f"fold_mix_triton: at most {MAX_HEADS} heads, got mix {tuple(mix.shape)}")
    check_inputs("fold_mix_triton", "mea.ops.attention.fold_mix_into_proj", weight=weight, mix=mix)
    if out_dtype is None:
        dev = weight.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    return _fwd_op(weight, mix, out_dtype)
