"""RMSNorm over the model width, and the head-level norm (an RMSNorm over each head's channels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class HeadNorm(nn.Module):
    """Per-head RMSNorm over the head dimension with a learnable weight per head and channel.

    The paper's "head-level GroupNorm": each head's output is normalized on its own. It is the
    nonlinearity that keeps a head-level mix of outputs from folding into W_O.
    Input (..., h, d).
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5, init: float = 1.0):
        super().__init__()
        self.eps = eps
        self.init = float(init)
        self.weight = nn.Parameter(torch.full((n_heads, head_dim), self.init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x) * self.weight.to(x.dtype)

    def normalize(self, x: Tensor) -> Tensor:
        """The norm without its weight (for a caller that folds the weight into the next projection).

        PyTorch's rms_norm: one fused kernel on a GPU, accumulating in fp32 whatever the input's dtype (the
        composite form, in fp32, cost MEA's eager prefill and decoding steps several elementwise passes per
        layer, docs/performance.md)."""
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)
