"""KL(original || other) per token over fixed token windows: how far a changed model's next-token
distributions are from the original's on the same text.

The companion of :mod:`mea.models.loss` (the loss over windows): a conversion's layer sensitivity
(``mea convert --kv_budget``) and the held-out KL of a compressed model (``mea.eval.kl``) both call
:func:`window_kl` or :func:`token_kl`. Forward KL, the original model as the reference distribution p:
``sum_v p(v) (log p(v) - log q(v))``, in nats, per predicted token, at temperature 1.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

# Rows of logits turned into log-probabilities at once: bounds the float32 temporaries (rows x vocab).
CHUNK_ROWS = 2048


def token_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) per position, float32, for logits (..., vocab) of the reference p and the model q."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits: the two models' shapes differ, {tuple(p_logits.shape)} and {tuple(q_logits.shape)}")
    p2, q2 = p_logits.reshape(-1, p_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    out = []
    for i in range(0, p2.shape[0], CHUNK_ROWS):
        lp = p2[i:i + CHUNK_ROWS].float().log_softmax(-1)
        lq = q2[i:i + CHUNK_ROWS].float().log_softmax(-1)
        out.append((lp.exp() * (lp - lq)).sum(-1))
    return (torch.cat(out) if out else p2.new_zeros(0, dtype=torch.float32)).view(p_logits.shape[:-1])


@dataclass
class WindowKL:
    """Sums over the predicted tokens of a set of windows.

    Attributes:
        kl: summed KL(original || model), nats.
        n_tokens: predicted tokens.
        nll: the model's summed next-token negative log-likelihood on the same tokens.
        nll_original: the original's.
    """

    kl: float
    n_tokens: int
    nll: float
    nll_original: float

    @property
    def mean_kl(self) -> float:
        """KL per token (nats)."""
        return self.kl / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n_tokens)

    @property
    def ppl_original(self) -> float:
        return math.exp(self.nll_original / self.n_tokens)


@torch.no_grad()
def window_kl(original, model, batches: Sequence[Tensor], device=None, autocast: Optional[Callable] = None,
              progress: bool = False, desc: str = "kl") -> WindowKL:
    """KL(original || model) per token, and both models' next-token loss, over ``batches`` of windows.

    Each window of L tokens is scored at its positions 0 .. L-2 (predicting tokens 1 .. L-1), as
    :func:`mea.models.loss.window_loss` scores it.

    Args:
        original: the reference model (p); a causal LM whose call gives logits (a tensor or ``.logits``).
        model: the model compared with it (q), same vocabulary.
        batches: (B, L) token-id tensors.
        device: where the batches go (default: ``model``'s first parameter's device).
        autocast: a context factory for the forward passes (e.g. bf16 autocast on CUDA).
        progress: show a progress bar labelled ``desc``.
    """
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    total = torch.zeros(3, dtype=torch.float64)
    n = 0
    modes = (original.training, model.training)
    original.eval()
    model.eval()
    try:
        for w in tqdm(list(batches), desc=desc, unit="batch", disable=not progress, leave=False):
            w = w.to(device)
            x, y = w[:, :-1], w[:, 1:]
            with autocast():
                p, q = _logits(original, x), _logits(model, x)
            total[0] += token_kl(p, q).double().sum().cpu()
            total[1] += F.cross_entropy(q.float().flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
            total[2] += F.cross_entropy(p.float().flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
            n += y.numel()
    finally:
        original.train(modes[0])
        model.train(modes[1])
    if n == 0:
        raise ValueError("batches: no windows to score")
    return WindowKL(float(total[0]), n, float(total[1]), float(total[2]))


def _logits(model, x: Tensor) -> Tensor:
    out = model(x)
    return getattr(out, "logits", out)
