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
- ``query``: what attention does with the keys and values, not the keys and values themselves
  (:func:`fit_weighted`): keys minimize the error of the logits q_i . k_i, i.e. the key error weighted
  by each query head's second moment of queries; values minimize the error that ``o_proj`` reads of
  each head's attention output. Both are ``sum_i tr(L_i dW_i R dW_i^T)`` with a per-head weight L_i
  on the head's channels and a shared weight R on the input side (calibration statistics,
  ``mea.convert.calibration``).

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

INITS = ("svd", "activation", "mean-pool", "query")


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
    if init not in INITS or init == "query":
        raise ValueError(f"init: unknown init {init!r} for a reconstruction fit; expected svd, activation or "
                         "mean-pool (query is fit_weighted)")
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


# ---------------------------------------------------------------------------------------- weighted fits
def rope_plane_average(s: Tensor) -> Tensor:
    """The part of a head-channel second moment (..., d, d) that RoPE leaves in the logits.

    RoPE rotates each plane of channels (c, c + d/2) (the rotate-half layout) by an angle that grows
    with the distance between query and key. A logit error q . R(delta) dk, summed over many distances,
    sees within a plane only the plane's energy (the rotation average of a 2x2 block is its trace / 2
    times the identity), and between two planes of different frequencies an oscillating term that
    averages out. So the weight is diagonal: each plane's two channels get the mean of their
    diagonal entries. (The lowest frequencies barely turn over a context; there this is an
    approximation.)
    """
    d = s.shape[-1]
    diag = torch.diagonal(s, dim1=-2, dim2=-1)
    plane = (diag[..., : d // 2] + diag[..., d // 2:]) / 2
    return torch.diag_embed(torch.cat([plane, plane], -1))


def weighted_error(w: Tensor, w_hat: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """sum_i tr(L_i (W_i - What_i) R (W_i - What_i)^T) for w, w_hat (h, d, D), left (h, d, d), right (D, D)."""
    diff = w - w_hat
    return ((left @ diff) * (diff @ right)).sum()  # <L dW, dW R> = tr(L dW R dW^T), L and R symmetric


def relative_weighted_error(w: Tensor, w_hat: Tensor, left: Tensor, right: Tensor) -> float:
    """sqrt(weighted_error(w, w_hat) / weighted_error(w, 0)): e.g. the relative error of the logits."""
    den = float(weighted_error(w, torch.zeros_like(w), left, right))
    return math.sqrt(max(0.0, float(weighted_error(w, w_hat, left, right))) / den) if den > 0 else 0.0


def _ridge(a: Tensor, rel: float = 1e-10) -> Tensor:
    # A weight that is singular (a channel no query uses) leaves the solution free along it: the tiny
    # ridge picks the smallest one instead of failing.
    n = a.shape[-1]
    return a + (rel * torch.diagonal(a, dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-300))[..., None, None] * torch.eye(
        n, dtype=a.dtype, device=a.device)


def _components_for_mix(mix: Tensor, left: Tensor, lw: Tensor) -> Tensor:
    """The best component heads (h', d, D) for a given mix under sum_i tr(L_i dW_i R dW_i^T); ``lw`` is
    L_i W_i (h, d, D).

    Setting the gradient to zero gives, for each component j, sum_i mix[j,i] L_i (W_i - sum_k mix[k,i]
    Wc_k) R = 0; R multiplies from the right only, so the solution does not depend on it: one (h'd x h'd)
    system shared by all D input channels."""
    hp, h = mix.shape
    d = left.shape[-1]
    g = ((mix[:, None, :] * mix[None, :, :]) @ left.reshape(h, d * d)).view(hp, hp, d, d)
    g = g.permute(0, 2, 1, 3).reshape(hp * d, hp * d)
    b = (mix @ lw.reshape(h, -1)).view(hp * d, -1)
    return torch.linalg.solve(_ridge(g), b).view(hp, d, -1)


def _mix_system(w: Tensor, comp: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """(gram (h, h', h'), rhs (h, h')) of the per-query-head least squares for the mix given the
    components: gram[i, j, k] = tr(L_i Wc_j R Wc_k^T), rhs[i, j] = tr(L_i Wc_j R W_i^T)."""
    hp, d, D = comp.shape
    lcr = (left[:, None] @ (comp @ right)[None]).reshape(-1, hp, d * D)  # L_i Wc_j R
    return lcr @ comp.reshape(hp, d * D).T, (lcr @ w.reshape(-1, d * D, 1))[..., 0]


def fit_weighted(w: Tensor, n_components: int, left: Tensor, right: Tensor, iters: int = 30,
                 tol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Fit component heads and a mix to per-head weights ``w`` (h, d, D) minimizing
    ``sum_i tr(L_i (W_i - What_i) R (W_i - What_i)^T)``, ``What = mix^T w_comp``.

    With L_i = I it is the ``activation`` fit (R = the input second moment). With a different L_i per
    head there is no closed form: alternating least squares (the components for the mix, then the mix
    for the components, each step lowering the error), started from the activation fit's mix and from
    mean-pool's, keeping the better. At the end the mix is brought to orthogonal rows of norm
    sqrt(h / h') (GQA's scale; the product mix^T w_comp is unchanged) with each row's largest entry
    positive.

    Args:
        w: per-query-head weights (h, d, D).
        n_components: h'.
        left: (h, d, d) PSD weight on each head's output channels.
        right: (D, D) PSD weight on the input side.
        iters: alternations at most, per start.
        tol: stop when an alternation lowers the error by less than this fraction of it.

    Returns:
        ``(w_comp, mix)`` as :func:`fit_components` returns them.
    """
    h = w.shape[0]
    if not 1 <= n_components <= h:
        raise ValueError(f"n_components: must satisfy 1 <= h' <= h={h}, got {n_components}")
    w, left, right = w.double(), left.double().to(w.device), right.double().to(w.device)
    lw = left @ w
    total = float((lw * (w @ right)).sum())  # the error of What = 0
    best = None
    for mix in (fit_components(w, n_components, "activation", right)[1], mixing_init(n_components, h).to(w)):
        err = math.inf
        for _ in range(iters):
            comp = _components_for_mix(mix, left, lw)
            gram, rhs = _mix_system(w, comp, left, right)
            mix = torch.linalg.solve(_ridge(gram), rhs[..., None])[..., 0].T
            # the error of (mix, comp) from the same sums: total - 2 <mix, rhs> + sum_i mix_i^T gram_i mix_i
            new = total - 2 * float((mix.T * rhs).sum()) + float(torch.einsum("ji,ijk,ki->", mix, gram, mix))
            done = err - new <= tol * abs(new)
            err = min(err, new)
            if done:
                break
        comp = _components_for_mix(mix, left, lw)
        err = float(weighted_error(w, rebuilt_heads(mix, comp), left, right))
        if best is None or err < best[0]:
            best = (err, comp, mix)
    _, comp, mix = best
    # Gauge: (T mix)^T (T^-T comp) = mix^T comp for any invertible T; T = sqrt(h/h') (mix mix^T)^(-1/2)
    # gives orthogonal rows of GQA's norm.
    evals, evecs = torch.linalg.eigh(mix @ mix.T)
    t = math.sqrt(h / n_components) * (evecs * evals.clamp(min=1e-300).rsqrt()) @ evecs.T
    mix = t @ mix
    comp = (torch.linalg.inv(t).T @ comp.reshape(n_components, -1)).view_as(comp)
    idx = mix.abs().argmax(dim=1)
    sign = torch.sign(mix[torch.arange(n_components), idx])
    sign[sign == 0] = 1
    return comp * sign[:, None, None], mix * sign[:, None]


def rebuilt_heads(mix: Tensor, w_comp: Tensor) -> Tensor:
    """The per-query-head weights (h, d, D) that a mix (h', h) of component heads (h', d, D) gives."""
    return torch.einsum("ji,jcD->icD", mix, w_comp)
