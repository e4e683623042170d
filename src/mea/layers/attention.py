"""Attention variants behind one interface.

Every variant maps hidden states (B, L, D) to (B, L, D) given an ``AttnInputs`` (rotary cos/sin,
mask, optional KV cache). Parameter names follow Hugging Face LLaMA (q_proj, k_proj, v_proj,
o_proj), plus ``k_mix``/``v_mix`` (MEA), ``pre_mix``/``post_mix`` (talking heads),
``lambda_*`` (differential) and ``head_norm``.

Each class also owns what is particular to its variant: which stored-head counts it allows
(``kv_heads_rule``), whether its head norm is on by default, and its attention FLOPs beyond the
projections (``score_flops``). Parameter counts and KV-cache bytes are read off the modules
themselves (``models.config``), so no formula is kept by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.attention import diff_attention, mix_heads, sdpa, talking_heads_attention
from ..ops.backend import fold_mixes
from ..ops.decode import mea_attention_cached
from .cache import KVCache
from .norm import HeadNorm
from .rope import apply_rope


@dataclass
class AttnInputs:
    """What every attention layer of one forward pass shares.

    ``mask`` is authoritative; ``spans`` is an optional exact description of it that fast kernels use
    instead of reading a boolean mask: query t of row b sees keys ``[starts[b], ends[b] - Lq + t]``
    (for every query that is not padding). It is given only where the mask has that form (a row's keys
    one contiguous run: left or right padding, never holes), and ``None`` means no such description.
    """

    cos: Tensor
    sin: Tensor
    mask: Optional[Tensor] = None  # bool (B, 1, Lq, T), True = attend; None = causal, queries aligned to the last keys
    cache: Optional[KVCache] = None
    positions: Optional[Tensor] = None  # (B, Lq) cache slots of the new tokens
    kv_len: int = 0  # keys to attend to when a cache is used
    spans: Optional[tuple[Tensor, Tensor]] = None  # (starts, ends), int (B,)


def _plain_linear(*mods: nn.Module) -> bool:
    """Whether a projection may be replaced by its weight: only a plain nn.Linear without hooks. A LoRA
    adapter (PEFT wraps the Linear) or a forward hook changes what the module computes, which the weight
    alone does not show."""
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in mods)


def mixing_init(n_kv_heads: int, n_heads: int) -> Tensor:
    """Identity for h' = h, else a GQA-style replication: query head i reads component floor(i h'/h)."""
    w = torch.zeros(n_kv_heads, n_heads)
    w[(torch.arange(n_heads) * n_kv_heads) // n_heads, torch.arange(n_heads)] = 1.0
    return w


class Attention(nn.Module):
    """Multi-head attention (``mha``): every head stores its keys and values."""

    # Stored key/value heads allowed: "all" (h' = h), "divisor" (h' divides h), "any" (1 <= h' <= h).
    kv_heads_rule = "all"
    head_norm_default = False

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads_at(layer_idx), config.head_dim
        self.backend = config.backend
        D, h, hk, d = config.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, h * d, bias=False)
        self.k_proj = nn.Linear(D, hk * d, bias=False)
        self.v_proj = nn.Linear(D, hk * d, bias=False)
        self.o_proj = nn.Linear(h * d, D, bias=False)
        self.head_norm = HeadNorm(h, d, config.head_norm_eps, config.head_norm_init) if config.head_norm else None

    def reset_parameters(self) -> None:
        """The variant's own parameters and derived buffers (projections and norms reset themselves)."""

    @staticmethod
    def score_flops(config, seq_len: int) -> float:
        """Forward FLOPs per token of one layer's scores and weighted sums (causal: half the square)."""
        return 2 * (2 * config.n_heads * config.head_dim * seq_len / 2)

    def _heads(self, t: Tensor, n: int) -> Tensor:
        B, L, _ = t.shape
        return t.view(B, L, n, -1).transpose(1, 2)

    def _qkv(self, x: Tensor, a: AttnInputs) -> tuple[Tensor, Tensor, Tensor]:
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), a.cos, a.sin)
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv_heads), a.cos, a.sin)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        if a.cache is not None:
            k, v = a.cache.update(self.layer_idx, k, v, a.positions, a.kv_len)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, a: AttnInputs) -> Tensor:
        return sdpa(q, k, v, mask=a.mask, causal=a.mask is None)

    def _out_scale(self) -> Optional[Tensor]:
        """A scalar on the (normed) heads before o_proj; None for none."""
        return None

    def _output(self, o: Tensor, a: AttnInputs) -> Tensor:
        """(B, h, L, d) attention output -> (B, L, D): the head norm, then o_proj."""
        o = o.transpose(1, 2)  # (B, L, h, d)
        scale = self._out_scale()
        if self.head_norm is not None and a.cache is None and _plain_linear(self.o_proj):
            # Full sequences (training): the norm's weight folds into o_proj's, W_O diag(g), so the token-sized
            # work is a scale per head and row and the weight's gradient a weight-sized product instead of a
            # reduction over every token (a third to a half of the norm's cost on an H200, docs/performance.md).
            gain = self.head_norm.weight.flatten()
            if scale is not None:
                gain = gain * scale
            w = self.o_proj.weight * gain.to(self.o_proj.weight.dtype)
            return nn.functional.linear(self.head_norm.normalize(o).flatten(2), w)
        if self.head_norm is not None:
            o = self.head_norm(o)
        o = o.flatten(2)
        if scale is not None:
            o = o * scale.to(o.dtype)
        return self.o_proj(o)

    def forward(self, x: Tensor, a: AttnInputs) -> Tensor:
        q, k, v = self._qkv(x, a)
        return self._output(self._attend(q, k, v, a), a)


class GroupedQueryAttention(Attention):
    """Grouped-query attention (``gqa``): h' key/value heads, each shared by h / h' query heads (1 = MQA)."""

    kv_heads_rule = "divisor"


class MEAttention(Attention):
    """Multi-head Explicit Attention: keys and values are head-level linear compositions (HLC) of
    h' component heads, ``K_lc = einsum("n j d, j i -> n i d", K_comp, k_mix)``, then a head norm.

    Without a cache the mixing is folded into the projection weights (one SDPA call over h heads,
    MHA cost); with a cache only the h' component heads are stored, and a prefill over an empty cache
    mixes the chunk's own component heads into composite ones for one causal SDPA call.
    """

    kv_heads_rule = "any"
    head_norm_default = True

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.k_mix = nn.Parameter(torch.empty(self.n_kv_heads, self.n_heads))
        self.v_mix = nn.Parameter(torch.empty(self.n_kv_heads, self.n_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.k_mix, self.v_mix):
                p.copy_(mixing_init(self.n_kv_heads, self.n_heads))

    def forward(self, x: Tensor, a: AttnInputs) -> Tensor:
        if a.cache is None:
            q = apply_rope(self._heads(self.q_proj(x), self.n_heads), a.cos, a.sin)
            if _plain_linear(self.k_proj, self.v_proj):
                k_w, v_w = fold_mixes(self.backend, [(self.k_proj.weight, self.k_mix), (self.v_proj.weight, self.v_mix)],
                                      self.head_dim)
                k = apply_rope(self._heads(nn.functional.linear(x, k_w), self.n_heads), a.cos, a.sin)
                v = self._heads(nn.functional.linear(x, v_w), self.n_heads)
            else:  # the projection must run as its module: mix its component heads token by token
                k = apply_rope(mix_heads(self._heads(self.k_proj(x), self.n_kv_heads), self.k_mix), a.cos, a.sin)
                v = mix_heads(self._heads(self.v_proj(x), self.n_kv_heads), self.v_mix)
            return self._output(sdpa(q, k, v, mask=a.mask, causal=a.mask is None), a)
        q, k_comp, v_comp = self._qkv(x, a)
        if a.mask is None and q.shape[2] == k_comp.shape[2] and q.shape[2] > 1:
            # A prefill over an empty cache: the chunk attends to itself only, so its composite heads are
            # mixed from its own component heads (RoPE commutes with the mix) for one causal FlashAttention call.
            o = sdpa(q, mix_heads(k_comp, self.k_mix), mix_heads(v_comp, self.v_mix), causal=True)
        else:
            o = mea_attention_cached(q, k_comp, v_comp, self.k_mix, self.v_mix, mask=a.mask, spans=a.spans,
                                     backend=self.backend)
        return self._output(o, a)


class TalkingHeadsAttention(Attention):
    """Talking-heads attention (Shazeer et al. 2020): (h x h) mixing of logits before the softmax
    and of weights after it. Needs the materialized score matrix."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.pre_mix = nn.Parameter(torch.empty(self.n_heads, self.n_heads))
        self.post_mix = nn.Parameter(torch.empty(self.n_heads, self.n_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.eye_(self.pre_mix)
        nn.init.eye_(self.post_mix)

    @staticmethod
    def score_flops(config, seq_len: int) -> float:
        # the scores and weighted sums, plus mixing the (h x T) score matrix twice
        h = config.n_heads
        return Attention.score_flops(config, seq_len) + 2 * (2 * h * h * seq_len / 2)

    def _attend(self, q, k, v, a):
        return talking_heads_attention(q, k, v, self.pre_mix, self.post_mix, mask=a.mask, causal=a.mask is None)


def lambda_init_fn(layer_idx: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffAttention(Attention):
    """Differential attention (Ye et al. 2024): O = (A1 - lambda A2) V per head.

    Each head's query and key split into halves of d/2 (rotated as heads of d/2) that give the two
    softmax maps; values keep d. lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init with
    lambda_init = 0.8 - 0.6 exp(-0.3 layer_idx); the output is head-normed and scaled by
    (1 - lambda_init). Parameter count equals MHA's plus 4 vectors of d/2.
    """

    head_norm_default = True

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.lambda_init = lambda_init_fn(layer_idx)
        # A tensor rather than a Python float, so that torch.compile traces one graph for every
        # layer instead of specializing (and recompiling) on each layer's constant.
        self.register_buffer("lambda_init_t", torch.tensor(self.lambda_init), persistent=False)
        half = self.head_dim // 2
        self.lambda_q1 = nn.Parameter(torch.empty(half))
        self.lambda_k1 = nn.Parameter(torch.empty(half))
        self.lambda_q2 = nn.Parameter(torch.empty(half))
        self.lambda_k2 = nn.Parameter(torch.empty(half))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, 0.0, 0.1)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Derived, never saved: rebuilt after loading onto the meta device."""
        self.lambda_init_t = torch.tensor(self.lambda_init, device=self.lambda_q1.device)

    @staticmethod
    def score_flops(config, seq_len: int) -> float:
        return 1.5 * Attention.score_flops(config, seq_len)  # two (d/2)-wide score maps, two weighted sums of V

    def lambda_full(self) -> Tensor:
        l1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        l2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init_t.float()

    def _halves_rope(self, t: Tensor, a: AttnInputs) -> Tensor:
        B, n, L, d = t.shape
        t = apply_rope(t.reshape(B, n, L, 2, d // 2).transpose(2, 3).reshape(B, 2 * n, L, d // 2),
                       a.cos, a.sin)
        return t.view(B, n, 2, L, d // 2).transpose(2, 3).reshape(B, n, L, d)

    def _qkv(self, x, a):
        q = self._halves_rope(self._heads(self.q_proj(x), self.n_heads), a)
        k = self._halves_rope(self._heads(self.k_proj(x), self.n_kv_heads), a)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        if a.cache is not None:
            k, v = a.cache.update(self.layer_idx, k, v, a.positions, a.kv_len)
        return q, k, v

    def _attend(self, q, k, v, a):
        return diff_attention(q, k, v, self.lambda_full(), mask=a.mask, causal=a.mask is None)

    def _out_scale(self):
        return 1.0 - self.lambda_init_t


ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "mha": Attention,
    "gqa": GroupedQueryAttention,
    "mea": MEAttention,
    "talking_heads": TalkingHeadsAttention,
    "diff": DiffAttention,
}


def build_attention(config, layer_idx: int) -> Attention:
    return ATTENTION_CLASSES[config.attention](config, layer_idx)
