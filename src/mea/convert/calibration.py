"""Calibration statistics: what each layer's attention reads and does on real text.

k_proj and v_proj of a layer read the same input (the output of ``input_layernorm``), so one
(D, D) matrix C = sum_n x_n x_n^T per layer gives the key and value errors of any fit on that
text exactly, and the activation-aware fit (``heads.fit_components(init="activation")``).

The query-aware fit (``heads.fit_weighted``) also needs what attention does with the keys and values
(:class:`AttentionStats`): the queries that meet the keys, and the inputs as the attention weights
average them for the values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.rope import apply_rope
from ..models.transformer import Transformer
from .heads import effective_head_weights


@dataclass
class AttentionStats:
    """One layer's attention on calibration text (sums over tokens, float64, on CPU).

    Attributes:
        query: (h, d, d): per query head, sum_n q_i(n) q_i(n)^T of its queries before RoPE.
        attn_input: (D, D): sum over tokens n and heads i of xbar_i(n) xbar_i(n)^T / h, where
            xbar_i(n) = sum_m a_i(n, m) x_m is the layer input averaged by head i's attention weights:
            head i's output is V_i xbar_i(n), so this is the input second moment the values act on.
    """

    query: Tensor
    attn_input: Tensor


@torch.no_grad()
def collect_statistics(model: Transformer, batches: Iterable[Tensor], layers: Optional[list[int]] = None,
                       attention: bool = False, progress: bool = True
                       ) -> tuple[list[Optional[Tensor]], list[Optional[AttentionStats]], int]:
    """Per-layer C = X^T X of the attention inputs over ``batches`` of token ids, and with ``attention``
    each layer's :class:`AttentionStats`.

    Args:
        model: the original (unconverted) model: its activations are the fit's targets.
        batches: token-id tensors (B, L), each row one window of text.
        layers: layers to collect (default all); the others get ``None``.
        attention: also collect the query and attention-weighted input moments (an L x L score matrix
            per head and window: a few times the cost of the forward pass).
        progress: show a tqdm bar.

    Returns:
        (covariances, attention statistics (all None without ``attention``), n_tokens).
    """
    from tqdm.auto import tqdm

    n_layers = model.config.n_layers
    wanted = set(range(n_layers) if layers is None else layers)
    covs: list[Optional[Tensor]] = [None] * n_layers
    stats: list[Optional[AttentionStats]] = [None] * n_layers
    device = next(model.parameters()).device
    hooks = []

    def add(acc: Optional[Tensor], x: Tensor) -> Tensor:
        x = x.cpu()
        return x if acc is None else acc + x

    def make_hook(i: int):
        def hook(module, args):
            x, a = args[0].detach(), args[1]
            flat = x.reshape(-1, x.shape[-1]).double()
            covs[i] = add(covs[i], flat.T @ flat)
            if attention:
                q, xbar = _queries_and_averaged_inputs(module, x, a)
                qs = torch.einsum("nhc,nhe->hce", q, q).double()
                xs = xbar.reshape(-1, xbar.shape[-1])
                xx = (xs.T @ xs).double() / q.shape[1]  # float32 products, summed per batch in float64
                s = stats[i]
                stats[i] = AttentionStats(add(None if s is None else s.query, qs),
                                          add(None if s is None else s.attn_input, xx))
        return hook

    for i, layer in enumerate(model.model.layers):
        if i in wanted:
            hooks.append(layer.self_attn.register_forward_pre_hook(make_hook(i)))
    was_training = model.training
    model.eval()
    n_tokens = 0
    try:
        for ids in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            ids = ids.to(device)
            # Only the attention inputs are needed: run the layers, skip the vocabulary projection.
            model.hidden_states(ids)
            n_tokens += ids.numel()
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return covs, stats, n_tokens


def _queries_and_averaged_inputs(attn, x: Tensor, a) -> tuple[Tensor, Tensor]:
    """(queries before RoPE (B*L, h, d), attention-averaged inputs (B, h, L, D)), float32, of one layer's
    forward on ``x`` (B, L, D), with the keys every query head actually reads."""
    B, L, D = x.shape
    h, d = attn.n_heads, attn.head_dim
    xf = x.float()
    q = F.linear(xf, attn.q_proj.weight.float()).view(B, L, h, d)
    wk, _ = effective_head_weights(attn)
    k = F.linear(xf, wk.reshape(h * d, D).to(xf)).view(B, L, h, d)
    cos, sin = a.cos.float(), a.sin.float()
    qr, kr = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    scores = (qr @ kr.transpose(-1, -2)) / math.sqrt(d)
    mask = a.mask if a.mask is not None else torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    xbar = probs @ xf[:, None]
    return q.reshape(B * L, h, d), xbar


def input_covariances(model: Transformer, batches: Iterable[Tensor], layers: Optional[list[int]] = None,
                      progress: bool = True) -> tuple[list[Optional[Tensor]], int]:
    """Per-layer C = X^T X (float64, on CPU) of the attention inputs over ``batches`` of token ids:
    :func:`collect_statistics` without the attention statistics. Returns (covariances, n_tokens)."""
    covs, _, n = collect_statistics(model, batches, layers, attention=False, progress=progress)
    return covs, n
