"""RMSNorm over the model width, and the head-level norm (an RMSNorm over each head's channels)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalize in fp32: bf16's 8-bit mantissa makes the mean of squares visibly noisy.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


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
    Input (..., h, d).
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
