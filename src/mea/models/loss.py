"""Losses of a causal language model, written once.

- :func:`window_loss`: the loss over fixed token windows (each window of ``L`` tokens is scored on
  predicting its tokens ``1 .. L-1`` from those before them). The trainer's validation loss, ``mea
  evaluate``'s perplexity and bits per byte, and the compression table's validation perplexity all
  call it.
- :func:`linear_cross_entropy`: the training loss (``Transformer.loss``, ``mea pretrain``): output
  layer and cross entropy, and optionally a distillation KL against a teacher, chunk by chunk, never
  holding the full fp32 logits.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class WindowLoss:
    """Sums over the predicted tokens of a set of windows.

    Attributes:
        nll: summed next-token negative log-likelihood, in nats.
        n_tokens: predicted tokens.
        nll_text: the part of ``nll`` on targets that are text (not the document separator); with
            ``n_bytes``, only when the loss was asked to count bytes.
        n_bytes: UTF-8 bytes of those text targets.
    """

    nll: float
    n_tokens: int
    nll_text: float = 0.0
    n_bytes: int = 0

    @property
    def loss(self) -> float:
        """Mean next-token loss (nats per token)."""
        return self.nll / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Bits per UTF-8 byte of the predicted text: comparable across tokenizers."""
        return self.nll_text / max(1, self.n_bytes) / math.log(2)


@torch.no_grad()
def window_loss(model, batches: Sequence[Tensor], device=None, autocast: Optional[Callable] = None,
                forward: Optional[Callable[[Tensor], Tensor]] = None, rank: int = 0, world_size: int = 1,
                separator: Optional[int] = None, decode: Optional[Callable[[list[int]], str]] = None,
                progress: bool = False, desc: str = "loss") -> WindowLoss:
    """Next-token loss of ``model`` over ``batches`` of windows, split across ranks.

    Args:
        model: a causal LM whose call gives logits (a tensor, or an output with ``.logits``); it is
            run in eval mode and left in the mode it was in.
        batches: (B, L) token-id tensors, each row one window; every rank passes the same list.
        device: where the batches go (default: the model's first parameter's device).
        autocast: a context factory for the forward pass (e.g. bf16 autocast on CUDA); none by default.
        forward: windows -> logits, instead of calling ``model`` (e.g. to pass ``use_cache=False``).
        rank, world_size: this process's share: rank r scores batches r, r + world_size, ... . Every
            rank runs the same number of forward passes (a rank short of a batch repeats the first one
            and does not count it): a DDP or FSDP forward holds collectives, and ranks that ran
            different numbers of them would wait on each other forever. The sums are all-reduced.
        separator: with ``decode``, the document separator id, left out of ``nll_text`` and ``n_bytes``.
        decode: ids -> text; given, the UTF-8 bytes of the text targets are counted (bits per byte).
        progress: show a progress bar labelled ``desc``.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    forward = forward or model
    batches = list(batches)
    # nll, n_tokens, nll_text, n_bytes: float64 on the device, so one all_reduce sums them exactly.
    total = torch.zeros(4, device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for j in tqdm(range(-(-len(batches) // world_size)), desc=desc, unit="batch", disable=not progress,
                      leave=False):
            i = j * world_size + rank
            w = (batches[i] if i < len(batches) else batches[0]).to(device)
            x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
            with autocast():
                out = forward(x)
            logits = getattr(out, "logits", out)
            if i >= len(batches):
                continue
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
            total[0] += losses.sum().double()
            total[1] += y.numel()
            if decode is not None:
                text = (y != separator) if separator is not None else torch.ones_like(y, dtype=torch.bool)
                total[2] += losses[text].sum().double()
                total[3] += sum(len(decode(row[keep].tolist()).encode("utf-8")) for row, keep in zip(y.cpu(), text.cpu()))
    finally:
        model.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    nll, n_tokens, nll_text, n_bytes = total.tolist()
    return WindowLoss(nll, int(n_tokens), nll_text, int(n_bytes))


# ------------------------------------------------------------------------------------------------
# The training loss: the final linear layer and the cross entropy (and a distillation KL) in chunks
# of rows, so the (tokens x vocab) logits never exist in fp32 at once: at 16 x 1,024 tokens and
# GPT-2's 50,257 ids they are 3.3 GB in fp32, written and read several times per step.

# fp32 logits per chunk (2**27 floats, 512 MiB): about 2,670 rows of a 50k vocabulary.
CHUNK_ELEMENTS = 2 ** 27


class Distill(NamedTuple):
    """What the loss needs of a teacher for distillation: its final (normed) hidden states over the
    same tokens, (..., d_teacher), and its output-layer weight (vocab, d_teacher); neither needs
    gradients. ``temperature`` T softens both distributions; ``alpha`` weighs the KL term, T^2 x
    KL(teacher || student), against the next-token loss (1 - alpha)."""

    hidden: Tensor
    weight: Tensor
    temperature: float = 1.0
    alpha: float = 0.5


class LMLoss(NamedTuple):
    """``loss``: what to minimize (differentiable): ``(1 - alpha) * lm_loss + alpha * T^2 * kl``, or
    ``lm_loss`` alone without a teacher. ``lm_loss``: mean next-token cross entropy; ``kl``: mean
    KL(teacher || student) per counted token at temperature T (None without a teacher); both detached."""

    loss: Tensor
    lm_loss: Tensor
    kl: Optional[Tensor]


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per chunk: as many as keep one chunk's fp32 logits at ``CHUNK_ELEMENTS``."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _chunk(z: Tensor, tgt: Tensor, valid: Tensor, zt: Optional[Tensor], inv_t: float, w_ce: float, w_kl: float,
           need_grad: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One chunk's (summed CE, summed KL, d loss_sum / d logits) from fp32 student logits ``z`` and,
    with a teacher, its fp32 logits ``zt``. ``w_ce``/``w_kl`` scale the gradient of each sum."""
    lse = torch.logsumexp(z, -1)
    picked = z.gather(1, tgt.clamp(min=0)[:, None])[:, 0]
    ce = ((lse - picked) * valid).sum()
    kl = z.new_zeros(())
    grad = None
    if need_grad:
        grad = torch.exp(z - lse[:, None])
        grad.scatter_add_(1, tgt.clamp(min=0)[:, None], -torch.ones_like(grad[:, :1]))
        grad *= (valid * w_ce)[:, None]
    if zt is not None:
        log_ps = torch.log_softmax(z * inv_t, -1)
        log_pt = torch.log_softmax(zt * inv_t, -1)
        pt = log_pt.exp()
        kl = ((pt * (log_pt - log_ps)).sum(-1) * valid).sum()
        if need_grad:  # d/dz of T^2 KL(pt || softmax(z / T)) = T (ps - pt)
            grad += (log_ps.exp() - pt) * (valid * w_kl)[:, None]
    return ce, kl, grad


_compiled_chunk = None


def _chunk_fn(compiled: bool):
    global _compiled_chunk
    if not compiled:
        return _chunk
    if _compiled_chunk is None:  # one fused kernel or two per chunk instead of ten passes over (rows x vocab)
        _compiled_chunk = torch.compile(_chunk, dynamic=False)
    return _compiled_chunk


def _chunked_loss(hidden: Tensor, weight: Tensor, targets: Tensor, distill: Optional[Distill], ignore_index: int,
                  chunk_rows: int, need_grad: bool, compiled: bool):
    """(loss, ce mean, kl mean, grad of loss w.r.t. hidden, grad w.r.t. weight) over rows ``hidden``
    (N, d); the logits of one chunk of rows at a time, in the compute dtype (autocast's, if on), then
    in fp32 for the softmax. The gradients are those of ``loss`` itself (scaled by the caller)."""
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(hidden.dtype, weight.dtype)
    alpha = distill.alpha if distill is not None else 0.0
    inv_t = 1.0 / distill.temperature if distill is not None else 1.0
    fn = _chunk_fn(compiled)
    with torch.autocast(dev, enabled=False):
        valid_all = targets != ignore_index
        n = valid_all.sum()
        nf = n.to(torch.float32)
        w = weight.to(cdt)
        tw = distill.weight.to(cdt) if distill is not None else None
        ce_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        kl_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_grad else None
        # d loss / d (summed term): tensors on the device, so the loop never waits for the host
        w_ce = (1.0 - alpha) / nf if need_grad else 0.0
        w_kl = alpha * distill.temperature / nf if (need_grad and distill is not None) else 0.0
        for i in range(0, hidden.shape[0], chunk_rows):
            h = hidden[i:i + chunk_rows].to(cdt)
            z = (h @ w.t()).float()
            zt = (distill.hidden[i:i + chunk_rows].to(cdt) @ tw.t()).float() if distill is not None else None
            valid = valid_all[i:i + chunk_rows].to(torch.float32)
            ce, kl, g = fn(z, targets[i:i + chunk_rows], valid, zt, inv_t, w_ce, w_kl, need_grad)
            ce_sum += ce
            kl_sum += kl
            if need_grad:
                g = g.to(cdt)
                grad_h[i:i + chunk_rows] = (g @ w).to(hidden.dtype)
                grad_w += (g.t() @ h).float()
        ce_mean = ce_sum / nf
        kl_mean = kl_sum / nf if distill is not None else None
        # (a copy: the autograd Function marks lm_loss non-differentiable, and must not mark loss with it)
        loss = ce_mean.clone() if distill is None else (1.0 - alpha) * ce_mean + alpha * distill.temperature ** 2 * kl_mean
    return loss, ce_mean, kl_mean, grad_h, (grad_w.to(weight.dtype) if need_grad else None)


class _LinearLoss(torch.autograd.Function):
    """The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are
    at hand (storing them, or recomputing them in the backward, is what this avoids); the backward
    only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, distill, ignore_index, chunk_rows, compiled):
        loss, ce, kl, grad_h, grad_w = _chunked_loss(hidden, weight, targets, distill, ignore_index, chunk_rows,
                                                     True, compiled)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, *([kl] if kl is not None else []))
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, distill: Optional[Distill] = None,
                         ignore_index: int = -100, chunk_rows: Optional[int] = None, compiled: bool = False) -> LMLoss:
    """Mean next-token cross entropy of the logits ``hidden @ weight.T`` against ``targets`` (ids, or
    ``ignore_index`` for positions that do not count), computed ``chunk_rows`` rows at a time without
    ever holding the full logits: the same value as ``F.cross_entropy(F.linear(hidden,
    weight).float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)`` (mean over the
    counted targets; NaN when none counts), to fp32 rounding, and the same gradients w.r.t. ``hidden``
    and ``weight``. With ``distill``, also the temperature-scaled KL(teacher || student) over the same
    rows, mixed in as :class:`Distill` says.

    Args:
        hidden: (..., d) final hidden states (what the output layer reads).
        weight: (vocab, d) output-layer weight (a tied embedding's too: its gradient reaches both uses).
        targets: (...) target ids, the shape of ``hidden`` without its last dimension.
        distill: the teacher's hidden states over the same positions, its output weight, T and alpha.
        ignore_index: targets with this value count nowhere.
        chunk_rows: rows per chunk (default: :func:`chunk_rows_for` the vocabulary).
        compiled: fuse each chunk's softmax arithmetic with ``torch.compile`` (GPU training).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match the hidden states' {tuple(hidden.shape[:-1])}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if distill is not None:
        if distill.hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"distill: the teacher's hidden states {tuple(distill.hidden.shape)} do not cover the "
                             f"student's positions {tuple(hidden.shape[:-1])}")
        if distill.weight.shape[0] != weight.shape[0]:
            raise ValueError(f"distill: the teacher has {distill.weight.shape[0]} output ids, the student {weight.shape[0]}")
        distill = distill._replace(hidden=distill.hidden.reshape(-1, distill.hidden.shape[-1]).detach(),
                                   weight=distill.weight.detach())
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LMLoss(*_LinearLoss.apply(h, weight, t, distill, ignore_index, rows, compiled))
    loss, ce, kl, _, _ = _chunked_loss(h, weight, t, distill, ignore_index, rows, False, compiled)
    return LMLoss(loss, ce, kl)
