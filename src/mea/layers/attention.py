"""Attention variants behind one interface.

Every variant maps hidden states (B, L, D) to (B, L, D) given an ``AttnInputs`` (rotary cos/sin,
mask, optional KV cache). Parameter names follow Hugging Face LLaMA (q_proj, k_proj, v_proj,
o_proj), plus ``k_mix``/``v_mix`` (MEA), ``pre_mix``/``post_mix`` (talking heads),
``lambda_*`` (differential, both versions), ``knock_*`` (knocking heads) and ``head_norm``.

Each class also owns what is particular to its variant: which stored-head counts it allows
(``kv_heads_rule``), whether its head norm is on by default, how many query heads feed one output
head (``queries_per_head``), its attention FLOPs beyond the projections (``score_flops``) and the
weight FLOPs that the parameter count does not show (``extra_flops``). Parameter counts and KV-cache
bytes are read off the modules themselves (``models.config``), so no formula is kept by hand.

Knocking heads (``ModelConfig.knock``) is written once, in the base class's projections, so every
variant takes it: a (d x d) map shared by all heads of a projection, after it and before RoPE and
attention, starting as the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.attention import (diff_attention, diff_v2_attention, fold_knock_into_proj, knock_heads, mix_heads, sdpa,
                             talking_heads_attention)
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
    # Query heads per output head: q_proj makes queries_per_head * h heads of width d.
    queries_per_head = 1

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads_at(layer_idx), config.head_dim
        self.n_q_heads = self.queries_per_head * self.n_heads
        self.backend = config.backend
        D, h, hk, d = config.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, self.n_q_heads * d, bias=False)
        self.k_proj = nn.Linear(D, hk * d, bias=False)
        self.v_proj = nn.Linear(D, hk * d, bias=False)
        self.o_proj = nn.Linear(h * d, D, bias=False)
        self.head_norm = HeadNorm(h, d, config.head_norm_eps, config.head_norm_init) if config.head_norm else None
        self.knock, self.knock_form = config.knock or "", config.knock_form
        for which in self.knock:
            for name in self._knock_names(which):
                self.register_parameter(name, nn.Parameter(torch.empty(d, d)))
        self._reset_knock()

    def reset_parameters(self) -> None:
        """The variant's own parameters and derived buffers (projections and norms reset themselves).
        Subclasses with parameters of their own reset them after calling this."""
        self._reset_knock()

    @staticmethod
    def score_flops(config, seq_len: int) -> float:
        """Forward FLOPs per token of one layer's scores and weighted sums (causal: half the square)."""
        return 2 * (2 * config.n_heads * config.head_dim * seq_len / 2)

    @classmethod
    def extra_flops(cls, config, n_kv_heads: int) -> float:
        """Forward FLOPs per token of one layer's weights beyond 2 per parameter (what the 6 N rule counts).

        The MLP form of knocking heads applies its three shared (d x d) matrices to every head of a
        projection, which 6 N counts once. The linear form folds into the projection's weight for training
        (``fold_knock_into_proj``): the tokens then cost what they cost without it, so its parameters, counted
        like any weight, over-count it by 6 d^2 a token (well under 0.1% of a layer)."""
        if not config.knock or config.knock_form != "mlp":
            return 0.0
        heads = {"q": cls.queries_per_head * config.n_heads, "k": n_kv_heads, "v": n_kv_heads}
        return sum(3 * 2 * (heads[w] - 1) * config.head_dim ** 2 for w in config.knock)

    # ------------------------------------------------------------------ knocking heads
    def _knock_names(self, which: str) -> tuple[str, ...]:
        if self.knock_form == "linear":
            return (f"knock_{which}",)
        return tuple(f"knock_{which}_{part}" for part in ("up", "gate", "down"))

    def _reset_knock(self) -> None:
        """Knocking heads starts as the identity (the paper's diagonal initialization): the linear map and the
        MLP's up and down matrices are I, its gate 0, so 2 sigmoid(0) = 1 and the layer is its base variant."""
        with torch.no_grad():
            for which in self.knock:
                for name in self._knock_names(which):
                    p = getattr(self, name)
                    if name.endswith("_gate"):
                        p.zero_()
                    else:
                        p.copy_(torch.eye(self.head_dim, device=p.device, dtype=p.dtype))

    def _knock(self, which: str) -> Optional[tuple[Tensor, ...]]:
        """The knocking-heads matrices of projection ``which`` ("q", "k" or "v"), or None."""
        if which not in self.knock:
            return None
        return tuple(getattr(self, name) for name in self._knock_names(which))

    def _heads(self, t: Tensor, n: int) -> Tensor:
        B, L, _ = t.shape
        return t.view(B, L, n, -1).transpose(1, 2)

    def _project(self, x: Tensor, which: str, fold: bool) -> Tensor:
        """Heads (B, n, L, d) of projection ``which`` ("q", "k" or "v"), knocked where asked, before RoPE.

        ``fold``: a linear knock is multiplied into the projection's weight (a weight-sized product, for
        full sequences) instead of into every token's heads (a d x d product per token and head, cheaper
        for a few tokens). Only a plain nn.Linear folds (see ``_plain_linear``)."""
        proj = getattr(self, f"{which}_proj")
        n = self.n_q_heads if which == "q" else self.n_kv_heads
        knock = self._knock(which)
        if knock is None:
            return self._heads(proj(x), n)
        if fold and len(knock) == 1 and _plain_linear(proj):
            return self._heads(nn.functional.linear(x, fold_knock_into_proj(proj.weight, knock[0], self.head_dim)), n)
        B, L, _ = x.shape
        # knocked in the projection's own (B, L, n, d) layout: the heads are then laid out as without a knock
        return self._heads(knock_heads(proj(x).view(B, L, n, self.head_dim), knock).flatten(2), n)

    def _qkv(self, x: Tensor, a: AttnInputs) -> tuple[Tensor, Tensor, Tensor]:
        fold = a.cache is None
        q = apply_rope(self._project(x, "q", fold), a.cos, a.sin)
        k = apply_rope(self._project(x, "k", fold), a.cos, a.sin)
        v = self._project(x, "v", fold)
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
        super().reset_parameters()
        with torch.no_grad():
            for p in (self.k_mix, self.v_mix):
                p.copy_(mixing_init(self.n_kv_heads, self.n_heads))

    def _composite(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Composite key and value heads (B, h, L, d) of full sequences, before RoPE.

        Where the projection is a plain nn.Linear and its knock (if any) linear, the mixing and the knock
        fold into its weight; else (an adapter, a hook, the MLP knock) the projection runs as its module
        and its component heads are knocked and mixed token by token. A knock acts on the h' component
        heads: the map the cache stores is the one a fresh sequence sees."""
        heads, folds = {}, []
        for which, mix in (("k", self.k_mix), ("v", self.v_mix)):
            proj, knock = getattr(self, f"{which}_proj"), self._knock(which)
            if _plain_linear(proj) and (knock is None or len(knock) == 1):
                w = proj.weight if knock is None else fold_knock_into_proj(proj.weight, knock[0], self.head_dim)
                folds.append((which, w, mix))
            else:
                heads[which] = mix_heads(self._project(x, which, fold=False), mix)
        if folds:
            weights = fold_mixes(self.backend, [(w, mix) for _, w, mix in folds], self.head_dim)
            for (which, _, _), w in zip(folds, weights):
                heads[which] = self._heads(nn.functional.linear(x, w), self.n_heads)
        return heads["k"], heads["v"]

    def forward(self, x: Tensor, a: AttnInputs) -> Tensor:
        if a.cache is None:
            q = apply_rope(self._project(x, "q", fold=True), a.cos, a.sin)
            k, v = self._composite(x)
            return self._output(sdpa(q, apply_rope(k, a.cos, a.sin), v, mask=a.mask, causal=a.mask is None), a)
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
        super().reset_parameters()
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
        super().reset_parameters()
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
        fold = a.cache is None
        q = self._halves_rope(self._project(x, "q", fold), a)
        k = self._halves_rope(self._project(x, "k", fold), a)
        v = self._project(x, "v", fold)
        if a.cache is not None:
            k, v = a.cache.update(self.layer_idx, k, v, a.positions, a.kv_len)
        return q, k, v

    def _attend(self, q, k, v, a):
        return diff_attention(q, k, v, self.lambda_full(), mask=a.mask, causal=a.mask is None)

    def _out_scale(self):
        return 1.0 - self.lambda_init_t


class DiffV2Attention(Attention):
    """Differential attention V2 (Microsoft's Differential Transformer V2, 2026): q_proj makes 2h query
    heads of width d over h' grouped key/value heads, one attention call serves all of them, and output
    head i is ``o_{2i} - sigmoid(lambda_i) o_{2i+1}``, with ``lambda = lambda_proj(x)`` (D -> h, one
    weight per token and head). Heads 2i and 2i+1 are neighbours in one GQA group, so they read the same
    keys and values, and the cache holds GQA's h' heads. No head norm and no output scale by default
    (the reference drops both); lambda_proj is initialized as every other projection."""

    kv_heads_rule = "divisor"
    queries_per_head = 2

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.lambda_proj = nn.Linear(config.d_model, self.n_heads, bias=False)

    @staticmethod
    def score_flops(config, seq_len: int) -> float:
        return 2 * Attention.score_flops(config, seq_len)  # 2h query heads

    def forward(self, x: Tensor, a: AttnInputs) -> Tensor:
        q, k, v = self._qkv(x, a)
        lam = self.lambda_proj(x).transpose(1, 2)  # (B, h, L)
        return self._output(diff_v2_attention(q, k, v, lam, mask=a.mask, causal=a.mask is None), a)


ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "mha": Attention,
    "gqa": GroupedQueryAttention,
    "mea": MEAttention,
    "talking_heads": TalkingHeadsAttention,
    "diff": DiffAttention,
    "diff_v2": DiffV2Attention,
}


def build_attention(config, layer_idx: int) -> Attention:
    return ATTENTION_CLASSES[config.attention](config, layer_idx)
