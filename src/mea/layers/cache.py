"""A preallocated KV cache with a length per sequence.

Each layer holds keys and values of shape (B, h_kv, max_len, d): for MEA the h' component heads
after RoPE, never the h composite heads; h_kv may differ between layers. New tokens of row b are written at positions
``seqlens[b], seqlens[b] + 1, ...``, so prompts of different lengths need no padding inside the
cache: a row's keys are always the prefix ``[0, seqlens[b])``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int | list[int], max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None):
        """``n_kv_heads``: one count for every layer, or one per layer (a partly compressed model)."""
        heads = [n_kv_heads] * n_layers if isinstance(n_kv_heads, int) else list(n_kv_heads)
        if len(heads) != n_layers:
            raise ValueError(f"n_kv_heads: needs one entry per layer ({n_layers}), got {len(heads)}")
        self.k = [torch.zeros(batch_size, hk, max_len, head_dim, dtype=dtype, device=device) for hk in heads]
        self.v = [torch.zeros(batch_size, hk, max_len, head_dim, dtype=dtype, device=device) for hk in heads]
        self.seqlens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype=torch.float32, device=None) -> "KVCache":
        heads = [config.kv_heads_at(i) for i in range(config.n_layers)]
        return cls(config.n_layers, batch_size, heads, max_len, config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def nbytes(self, used_only: bool = True) -> int:
        """Bytes held by keys and values: of the tokens stored so far, or of the whole buffer."""
        per_token = sum(t.element_size() * t.shape[1] * t.shape[3] for t in self.k + self.v)
        if used_only:
            return int(per_token * self.seqlens.sum().item())
        return per_token * self.batch_size * self.max_len

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, positions: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k_new/v_new (B, h_kv, Lq, d) at ``positions`` (B, Lq); return keys/values [0, kv_len)."""
        b = torch.arange(k_new.shape[0], device=k_new.device)[:, None]
        k, v = self.k[layer], self.v[layer]
        k[b, :, positions] = k_new.transpose(1, 2).to(k.dtype)
        v[b, :, positions] = v_new.transpose(1, 2).to(v.dtype)
        return k[:, :, :kv_len], v[:, :, :kv_len]
