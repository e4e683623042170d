"""Fitting h' component heads and a head-level mix to a layer's h key (or value) heads.

Every attention layer that mea converts computes, per query head i, a key ``k_i = W_i x`` with
W_i of shape (d, D): for MHA its own weights, for GQA the weights of its group's KV head, for MEA
``sum_j k_mix[j, i] W_comp_j``. Stack them as M (h, d*D). A converted layer stores h' component
heads W_comp (h', d*D) and a mix (h', h), and its effective per-head weights are ``mix^T W_comp``.
Every init below picks ``mix`` first and then the least-squares ``W_comp`` for it, which is
``pinv(mix^T) M`` whatever the input distribution (see docs/compression.md):

- ``svd``: mix spans the top-h' left singular vectors of M: the best rank-h' fit of the weights
  (Eckart-Young), i.e. of the keys when inputs are isotropic.
- ``activation``: the same fit against the keys of real inputs with covariance C = sum_n x_n x_n^T:
  minimize sum_n ||(M - mix^T W_comp)(I_d (x) x_n)||^2, the SVD of M (I_d (x) C^{1/2}). Its left
  singular vectors are the top eigenvectors of the h x h Gram matrix of the keys,
  G[i, i'] = sum_n k_i(n) . k_i'(n) = tr(W_i C W_i'^T), so C^{1/2} is never formed.
- ``mean-pool``: GQA uptraining (Ainslie et al. 2023): mix is the 0/1 replication of
  ``mixing_init`` (groups of near-equal size) and each component head is its group's mean.

RoPE rotates every head by the same orthogonal map, so it commutes with the mix and leaves every
error below unchanged: a fit of pre-RoPE keys is the same fit of post-RoPE keys.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layers.attention import Attention, MEAttention, mixing_init
from ..ops.attention import fold_mix_into_proj

INITS = ("svd", "activation", "mean-pool")


def layer_mixes(attn: Attention) -> tuple[Tensor, Tensor]:
    """The (h_kv, h) key and value mixes a layer applies to its stored heads: MEA's own, or
    MHA/GQA's replication (query head i reads KV head floor(i h_kv / h), as ``sdpa`` repeats them)."""
    if isinstance(attn, MEAttention):
        return attn.k_mix.detach(), attn.v_mix.detach()
    rep = mixing_init(attn.n_kv_heads, attn.n_heads).to(attn.k_proj.weight.device)
    return rep, rep


def effective_head_weights(attn: Attention) -> tuple[Tensor, Tensor]:
    """Per-query-head key and value weights (h, d, D) in float64: what each head actually computes."""
    k_mix, v_mix = layer_mixes(attn)
    h, d = attn.n_heads, attn.head_dim
    wk = fold_mix_into_proj(attn.k_proj.weight.detach().double(), k_mix.double(), d)
    wv = fold_mix_into_proj(attn.v_proj.weight.detach().double(), v_mix.double(), d)
    return wk.view(h, d, -1), wv.view(h, d, -1)


def head_gram(w: Tensor, cov: Optional[Tensor] = None) -> Tensor:
    """G[i, i'] = tr(W_i C W_i'^T) for w (h, d, D); C = I (weight space) when ``cov`` is None."""
    if cov is None:
        m = w.reshape(w.shape[0], -1)
        return m @ m.T
    return torch.einsum("icD,DE,jcE->ij", w, cov.to(w.dtype), w)


def _canonical_signs(mix: Tensor) -> Tensor:
    # Eigenvectors are defined up to sign; make each row's largest entry positive so that a
    # conversion is reproducible across platforms.
    idx = mix.abs().argmax(dim=1)
    sign = torch.sign(mix[torch.arange(mix.shape[0]), idx])
    sign[sign == 0] = 1
    return mix * sign[:, None]


def fit_components(w: Tensor, n_components: int, init: str = "svd", cov: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Fit component heads and a mix to per-head weights ``w`` (h, d, D).

    Args:
        w: per-query-head projection weights (h, d, D).
        n_components: h', 1 <= h' <= h.
        init: ``svd``, ``activation`` or ``mean-pool`` (module docstring).
        cov: input second-moment matrix (D, D), needed by ``activation``.

    Returns:
        ``(w_comp, mix)``: (h', d, D) and (h', h), with ``mix^T w_comp`` the fitted per-head weights.
        For ``svd``/``activation`` the rows of mix are orthogonal with norm sqrt(h / h'), the norm of
        a GQA replication row, so a converted layer's mix starts on the scale of GQA's.
    """
    h = w.shape[0]
    if not 1 <= n_components <= h:
        raise ValueError(f"n_components: must satisfy 1 <= h' <= h={h}, got {n_components}")
    if init not in INITS:
        raise ValueError(f"init: unknown init {init!r}; expected one of {', '.join(INITS)}")
    m = w.reshape(h, -1)
    if init == "mean-pool":
        mix = mixing_init(n_components, h).to(w)
        w_comp = (mix @ m) / mix.sum(1, keepdim=True)
        return w_comp.view(n_components, *w.shape[1:]), mix
    if init == "activation" and cov is None:
        raise ValueError("cov: the activation init needs the input covariance of calibration text")
    gram = head_gram(w, cov if init == "activation" else None)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    u = vecs[:, -n_components:].flip(-1)  # (h, h'), orthonormal columns, largest first
    mix = _canonical_signs(math.sqrt(h / n_components) * u.T)
    # Least squares for this mix: pinv(mix^T) = mix / (h / h') since mix mix^T = (h / h') I.
    w_comp = (mix @ m) * (n_components / h)
    return w_comp.view(n_components, *w.shape[1:]), mix


def relative_error(w: Tensor, w_hat: Tensor, cov: Optional[Tensor] = None) -> float:
    """||K - K_hat|| / ||K|| over inputs with second moment ``cov`` (weight space when None)."""
    diff = w - w_hat
    num = torch.trace(head_gram(diff, cov)).clamp(min=0)
    den = torch.trace(head_gram(w, cov))
    return float(torch.sqrt(num / den)) if den > 0 else 0.0
