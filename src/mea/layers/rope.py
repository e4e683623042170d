"""Rotary position embedding in the rotate-half convention of Hugging Face LLaMA checkpoints."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> Tensor:
        d = self.head_dim
        return 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def reset_buffers(self) -> None:
        """Derived from the config, never saved: rebuilt after loading onto the meta device."""
        self.inv_freq = self._inv_freq(self.inv_freq.device if self.inv_freq.device.type != "meta" else None)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts floating buffers too; the frequencies stay fp32, as Hugging Face's
        # loader keeps them: rounded to bf16 they rotate positions in the thousands by visibly wrong angles.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, L, d) for integer positions (B, L)."""
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, h, L, d) by positions given as cos/sin (B, L, d). Every head rotates alike,
    which is why RoPE commutes with head mixing."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
