"""The loss of a causal language model over fixed token windows, written once.

Each window of ``L`` tokens is scored on predicting its tokens ``1 .. L-1`` from those before them.
The trainer's validation loss, ``mea evaluate``'s perplexity and bits per byte, and the compression
table's validation perplexity all call :func:`window_loss`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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
