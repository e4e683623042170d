"""Attention math in plain PyTorch: the reference every fast path is tested against.

Shapes: queries (B, h, Lq, d); keys/values (B, h_kv, T, d); mixing matrices (h', h) used as in
the paper, ``HLC(W, T) = einsum("n j d, j i -> n i d", T, W)``. Masks are boolean, True = attend,
broadcastable to (B, h, Lq, T); ``None`` with ``causal=True`` means a plain causal mask with queries
aligned to the last keys.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def mix_heads(x: Tensor, mix: Tensor, dim: int = 1) -> Tensor:
    """Head-level linear composition: out[..., i, ...] = sum_j x[..., j, ...] * mix[j, i] along ``dim``.

    Along dim 1 of (B, h', ...) heads the result is contiguous, (B, h, ...), as attention kernels read it
    (a transposed view would send SDPA to its slow math path)."""
    if dim == 1:
        B, hk = x.shape[:2]
        out = torch.matmul(mix.t().to(x.dtype), x.reshape(B, hk, -1))
        return out.view(B, mix.shape[1], *x.shape[2:])
    x = x.movedim(dim, -1)
    out = torch.matmul(x, mix.to(x.dtype))
    return out.movedim(-1, dim)


def fold_mix_into_proj(weight: Tensor, mix: Tensor, head_dim: int) -> Tensor:
    """Effective projection weight W_eff = W (mix (x) I_d), in nn.Linear layout (out, in).

    ``weight`` is (h' * d, D); the result is (h * d, D), so ``x @ W_eff.T`` gives the composite heads
    directly: HLC is linear in x, so training and prefill need no per-token mixing pass.
    """
    hk, h = mix.shape
    # (h'*d, D) is row-major (h', d*D): the fold is one (h, h') @ (h', d*D) product, no transposes.
    w = torch.matmul(mix.t().to(weight.dtype), weight.reshape(hk, head_dim * weight.shape[-1]))
    return w.view(h * head_dim, weight.shape[-1])


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, causal: bool = False,
         scale: Optional[float] = None) -> Tensor:
    """Scaled dot-product attention; keys/values with fewer heads are shared by groups of queries.

    Grouped keys are never copied: a plain causal square (training, prefill) goes to SDPA with
    ``enable_gqa`` (FlashAttention reads the groups in place). Masked calls (decoding over a cache,
    padded batches) on a GPU in half precision try cuDNN's kernel first, which takes the groups in place
    too: on an H200 it read a 4k-token cache 1.6-2.4x faster than the memory-efficient kernel SDPA picks
    by default (docs/performance.md). Elsewhere each group's query heads fold into the query rows of
    one key/value head, an ordinary attention over h' heads that every back-end takes.
    """
    h, hk = q.shape[1], k.shape[1]
    if hk != h and h % hk:
        raise ValueError(f"sdpa: {hk} key/value heads do not divide {h} query heads")
    Lq, T = q.shape[2], k.shape[2]
    if mask is None and causal and Lq > 1 and Lq != T:
        mask = causal_mask(Lq, T, q.device)
    if mask is None:
        square = causal and Lq > 1
        if hk == h:
            return F.scaled_dot_product_attention(q, k, v, is_causal=square, scale=scale)
        if square:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    elif _cudnn_first(q):
        with sdpa_kernel(_MASKED_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=hk != h)
    elif hk == h:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # The grouped view: (B, h, Lq, d) -> (B, h', g * Lq, d), rows ordered (head in group, token).
    B, g, d = q.shape[0], h // hk, q.shape[-1]
    qg = q.reshape(B, hk, g * Lq, d)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if mask.shape[1] == 1:  # every head alike: each group's rows repeat the token rows
            mask = mask.expand(-1, -1, Lq, T).repeat(1, 1, g, 1)
        else:
            mask = mask.expand(-1, h, Lq, T).reshape(mask.shape[0], hk, g * Lq, T)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(B, h, Lq, d)


_MASKED_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.MATH]


def _cudnn_first(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.cudnn_sdp_enabled()


def causal_mask(lq: int, t: int, device=None) -> Tensor:
    """(Lq, T) boolean mask with the queries aligned to the last Lq keys."""
    i = torch.arange(lq, device=device)[:, None] + (t - lq)
    j = torch.arange(t, device=device)[None, :]
    return j <= i


def attention_naive(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, causal: bool = False,
                    scale: Optional[float] = None) -> Tensor:
    """Materialized softmax(q k^T) v, fp32 softmax. The slowest and most obviously right version."""
    h, hk = q.shape[1], k.shape[1]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is None and causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float()).to(q.dtype)


def mea_attention_reference(q: Tensor, k_comp: Tensor, v_comp: Tensor, k_mix: Tensor, v_mix: Tensor,
                            mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
    """MEA over component heads by materializing the composite keys and values (the definition)."""
    k = mix_heads(k_comp, k_mix)
    v = mix_heads(v_comp, v_mix)
    return sdpa(q, k, v, mask=mask, causal=causal)


def mea_attention_absorbed(q: Tensor, k_comp: Tensor, v_comp: Tensor, k_mix: Tensor, v_mix: Tensor,
                           mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
    """MEA with the mixing absorbed: one wide head of size h'*d over the stored component heads.

    q_i . k_lc,i = [W^K[1,i] q_i, ..., W^K[h',i] q_i] . [k_1; ...; k_h'], and the values are
    attended as concatenated component heads and then contracted with W^V. The cache of h' heads is
    read once per query head group, never expanded: memory traffic equals GQA with h' KV heads.
    """
    B, h, Lq, d = q.shape
    hk, T = k_comp.shape[1], k_comp.shape[2]
    # q_wide[b, i, l] = [W^K[0, i] q_i, ..., W^K[h'-1, i] q_i]: (B, h, Lq, h'*d)
    q_wide = (q.unsqueeze(3) * k_mix.t().to(q.dtype)[None, :, None, :, None]).reshape(B, h, Lq, hk * d)
    k_wide = k_comp.transpose(1, 2).reshape(B, 1, T, hk * d)
    v_wide = v_comp.transpose(1, 2).reshape(B, 1, T, hk * d)
    # One key/value head: fold the h query heads into the query rows (MQA), never copying the cache.
    if mask is None and causal:
        mask = causal_mask(Lq, T, q.device)
    if mask is not None:
        mask = mask.expand(B, h, Lq, T).reshape(B, 1, h * Lq, T)
    o_wide = sdpa(q_wide.reshape(B, 1, h * Lq, hk * d), k_wide, v_wide, mask=mask, scale=1.0 / math.sqrt(d))
    o = o_wide.view(B, h, Lq, hk, d)
    # o_i = sum_j W^V[j, i] (A_i V_j)
    return torch.einsum("bhljd,jh->bhld", o, v_mix.to(o.dtype))


def talking_heads_attention(q: Tensor, k: Tensor, v: Tensor, pre_mix: Tensor, post_mix: Tensor,
                            mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
    """Talking-heads attention: logits mixed across heads before softmax, weights mixed after."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, h, Lq, T)
    s = mix_heads(s, pre_mix)
    if mask is None and causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    p = mix_heads(p, post_mix)
    return torch.matmul(p, v)


def diff_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Optional[Tensor] = None,
                   causal: bool = False) -> Tensor:
    """Differential attention (Ye et al. 2024): (A1 - lambda A2) V, where A1 and A2 are the softmax maps of
    the first and second halves of each head's query and key channels (d/2 each; values keep d)."""
    half = q.shape[-1] // 2
    o1 = sdpa(q[..., :half], k[..., :half], v, mask=mask, causal=causal)
    o2 = sdpa(q[..., half:], k[..., half:], v, mask=mask, causal=causal)
    return o1 - lam.to(o1.dtype) * o2


def diff_v2_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, mask: Optional[Tensor] = None,
                      causal: bool = False) -> Tensor:
    """Differential attention V2 (Microsoft's Differential Transformer V2): one attention call with 2h query
    heads over the (grouped) keys and values, then ``out_i = o_{2i} - sigmoid(lam_i) o_{2i+1}`` per head and
    token. ``q`` (B, 2h, Lq, d): heads 2i and 2i+1 are a pair and read the same key/value head (they are
    neighbours in one GQA group); ``lam`` (B, h, Lq): the pre-sigmoid weights. Returns (B, h, Lq, d)."""
    o = sdpa(q, k, v, mask=mask, causal=causal)
    B, h2, L, d = o.shape
    o = o.view(B, h2 // 2, 2, L, d)
    return o[:, :, 0] - torch.sigmoid(lam).to(o.dtype).unsqueeze(-1) * o[:, :, 1]


def knock_heads(x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
    """Knocking-heads projection (Zhou et al. 2025), one map shared by every head, on heads x (..., d).

    ``(T,)``: the linear form, ``x T``. ``(W_up, W_gate, W_down)``: the MLP form,
    ``2 (x W_up * sigmoid(x W_gate)) W_down``. Every matrix is (d, d), applied as ``x @ W``."""
    if len(weights) == 1:
        return torch.matmul(x, weights[0].to(x.dtype))
    up, gate, down = (w.to(x.dtype) for w in weights)
    # up and gate as one product: the heads are read once for both
    u, g = torch.matmul(x, torch.cat([up, gate], dim=1)).chunk(2, dim=-1)
    return torch.matmul(2 * u * torch.sigmoid(g), down)


def fold_knock_into_proj(weight: Tensor, t: Tensor, head_dim: int) -> Tensor:
    """Projection weight whose heads come out knocked by the linear map ``t``: ``W'_i = W_i t`` for every
    head i, in nn.Linear layout (n * d, D), so ``x @ W'.T`` equals ``knock_heads(heads(x @ W.T), (t,))``.
    A weight-sized product per step instead of a d x d product per token and head. It runs in the weight's
    dtype whatever autocast says: the result is a weight (MEA's fold takes it next, in one dtype with its mix)."""
    n = weight.shape[0] // head_dim
    with torch.autocast(weight.device.type, enabled=False):
        w = torch.matmul(t.t().to(weight.dtype), weight.view(n, head_dim, weight.shape[-1]))
    return w.view(weight.shape)
