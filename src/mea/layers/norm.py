"""RMSNorm over the model width, and the head-level norm (an RMSNorm over each head's channels)."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..ops.triton_util import KERNEL_DTYPES

# The head norm's fused Triton kernel (mea.ops.triton_norm) takes CUDA tensors when this is True
# (MEA_TRITON_NORM=1 in the environment). Off by default: inside a compiled H200 training layer it
# was no faster than the torch.compile'd PyTorch form (0.1% apart, docs/performance.md), which needs
# no Triton of our own. Where the attention layer folds the weight into o_proj (its training path by
# default, ``fold_norm_gain``), only ``normalize`` runs and this kernel does not. torch.compile guards on
# it; flipping it recompiles.
TRITON_HEAD_NORM = os.environ.get("MEA_TRITON_NORM", "0") == "1"

# Loaded only where CUDA is present, so a CPU-only `import mea` never imports triton.
_triton_head_norm = None
try:
    if torch.cuda.is_available():
        from ..ops.triton_norm import head_rms_norm as _triton_head_norm
except ImportError:  # no triton: the PyTorch form serves
    pass


def _normalize(x: Tensor, eps: float) -> Tensor:
    # In fp32 at least: bf16's 8-bit mantissa makes the mean of squares visibly noisy.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    y = _normalize(x, eps)
    return (y * weight.to(y.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class HeadNorm(nn.Module):
    """Per-head RMSNorm over the head dimension with a learnable weight per head and channel.

    The paper's "head-level GroupNorm": each head's output is normalized on its own. It is the
    nonlinearity that keeps a head-level mix of outputs from folding into W_O.
    Input (..., h, d). ``rms_norm`` (the reference, fused by torch.compile); with ``TRITON_HEAD_NORM``
    on CUDA tensors, one Triton kernel per direction instead.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5, init: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((n_heads, head_dim), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        if (_triton_head_norm is not None and TRITON_HEAD_NORM and x.is_cuda and x.dtype in KERNEL_DTYPES
                and self.weight.dtype in KERNEL_DTYPES):
            return _triton_head_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def normalize(self, x: Tensor) -> Tensor:
        """The norm without its weight, for a caller that folds the weight into the next projection."""
        return _normalize(x, self.eps).to(x.dtype)
