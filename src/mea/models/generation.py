"""Autoregressive generation for the core :class:`mea.Transformer`: one prefill, then decoding steps.

The prefill packs each prompt's tokens to the front of its cache row and runs one causal forward over
an empty cache (FlashAttention, no mask; only the last real token's logits are computed). Decoding
steps append one token per row; on CUDA each step is captured in a CUDA graph and replayed, one graph
per bucket of cache lengths (``GRAPH_BUCKET`` tokens), so that a step attends over the keys it has
rather than the whole preallocated buffer while every shape in a graph stays fixed.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.cache import KVCache

# With cuda_graph=None, generate() captures graphs only for at least this many decoding steps: the first
# step of each bucket runs eagerly as its warm-up, and capturing costs about as much as a few eager steps.
GRAPH_MIN_STEPS = 4
# Decoding steps attend over the cache up to the next multiple of this many keys (one graph each): at most
# this many masked keys are read per step, and a 2,048-token run captures 8 graphs.
GRAPH_BUCKET = 256


def sample_next_token(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (B, V) -> token ids (B,). Temperature 0 is greedy."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Optional[Tensor] = None,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, cuda_graph: Optional[bool] = None,
             on_token: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """See :meth:`mea.Transformer.generate`."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected (batch, seq), got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    dev = input_ids.device
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True: CUDA graphs need the model and input_ids on a CUDA device, "
                         f"got {dev}; pass cuda_graph=None or False")
    if cuda_graph is None:
        cuda_graph = dev.type == "cuda" and max_new_tokens - 1 >= GRAPH_MIN_STEPS
    am = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if am.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(am.shape)}")
    lengths = am.long().sum(-1)
    longest = int(lengths.max()) if B else 0  # one host sync, at the start
    if B and int(lengths.min()) == 0:
        raise ValueError("input_ids: every prompt needs at least one token (a row is all padding)")
    # Pack each row's tokens to the front (stable, so order is kept), whatever side was padded.
    order = torch.argsort((~am).to(torch.int8), dim=1, stable=True)
    packed = input_ids.gather(1, order)
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_model(model.config, B, L + max_new_tokens, dtype=dtype, device=dev)
    packed_mask = torch.arange(L, device=dev)[None] < lengths[:, None]
    # Padding sits after each row's tokens, so a plain causal prefill never lets a real token see it.
    h = model.hidden_states(packed, attention_mask=packed_mask, cache=cache)
    next_logits = model.lm_head(h[torch.arange(B, device=dev), lengths - 1])
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    graphs = GraphedDecoder(model, cache) if cuda_graph else None
    out = []
    for step in range(max_new_tokens):
        tok = sample_next_token(next_logits, temperature, top_k, top_p, generator)
        done_before = finished.clone()
        emitted = torch.where(done_before, torch.full_like(tok, pad), tok)
        out.append(emitted)
        if on_token is not None:
            on_token(emitted)
        if eos_token_id is not None:
            finished |= tok == eos_token_id
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            # A finished row goes on reading eos, not the pad id: its output is unused, and a pad id
            # that is no token (-1) must not reach the embedding.
            feed = torch.where(done_before, torch.full_like(tok, eos_token_id), tok) if eos_token_id is not None else tok
            keys = longest + step + 1  # the most keys any row holds once this token is written
            if graphs is not None and not graphs.failed:
                next_logits = graphs(feed, keys)
            else:
                next_logits = model(feed[:, None], cache=cache)[:, -1]
    new = torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)
    if new.shape[1] < max_new_tokens:
        new = F.pad(new, (0, max_new_tokens - new.shape[1]), value=pad)
    return torch.cat([input_ids, new], dim=1)


class GraphedDecoder:
    """``Transformer.decode_step`` over one cache, captured in CUDA graphs and replayed: one graph per
    bucket of key counts (each step attends over the cache's first ``bucket`` slots, masked past each
    row's length). The new token goes through a static input buffer; the logits come back in the
    bucket's static output buffer (overwritten by its next replay: read it before calling again).

    Everything a step touches keeps its address: the parameters, the cache's preallocated K/V buffers
    and its per-row lengths (a device tensor, advanced in place by the graph itself). Graphs share one
    memory pool: buckets are captured in increasing order and never replayed after a larger one.
    """

    def __init__(self, model, cache: KVCache, bucket: Optional[int] = None):
        self.model, self.cache, self.bucket = model, cache, bucket or GRAPH_BUCKET
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.tok: Optional[Tensor] = None
        self.pool = None
        self.failed = False
        self.replays = 0

    def bucket_of(self, keys: int) -> int:
        return min(self.cache.max_len, -(-keys // self.bucket) * self.bucket)

    def __call__(self, tok: Tensor, keys: int) -> Tensor:
        """tok (B,) -> logits (B, vocab) of that token appended to the cache, whose rows then hold at
        most ``keys`` keys."""
        n = self.bucket_of(keys)
        if n not in self.graphs:
            return self._warm_up_and_capture(tok, n)
        graph, logits = self.graphs[n]
        self.tok.copy_(tok[:, None])
        graph.replay()
        self.replays += 1
        return logits

    def _warm_up_and_capture(self, tok: Tensor, n: int) -> Tensor:
        if self.tok is None:
            self.tok = tok[:, None].clone()
            self.pool = torch.cuda.graph_pool_handle()
        else:
            self.tok.copy_(tok[:, None])
        dev = tok.device
        # The warm-up is this step itself (the cache advances once), run on a side stream as
        # torch.cuda.graph asks: it compiles Triton kernels and sets up library handles, which
        # must not happen during capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            logits = self.model.decode_step(self.tok, self.cache, n)
        torch.cuda.current_stream(dev).wait_stream(side)
        logits.record_stream(torch.cuda.current_stream(dev))
        # Capturing records the kernels without running them: the cache is untouched until a replay.
        # (By hand rather than `with torch.cuda.graph(...)`: if capture fails, that context manager
        # leaves its capture stream current, and the eager fallback would then run on it.)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(dev)
        failure: Optional[Exception] = None
        out = None
        with torch.cuda.stream(torch.cuda.Stream(device=dev)):
            graph.capture_begin(pool=self.pool)
            try:
                out = self.model.decode_step(self.tok, self.cache, n)
            except Exception as e:  # end the capture whatever happened, then decide
                failure = e
            try:
                graph.capture_end()
            except RuntimeError as e:
                failure = failure or e
        if failure is not None:
            if not isinstance(failure, RuntimeError):
                raise failure
            # An op that syncs with the host or cannot be captured (CUDA reports it as a RuntimeError).
            self.failed = True
            msg = str(failure).strip().splitlines()
            warnings.warn(f"generate: capturing the decoding step in a CUDA graph failed, decoding eagerly "
                          f"instead ({type(failure).__name__}: {msg[0] if msg else ''})", RuntimeWarning,
                          stacklevel=3)
            return logits
        self.graphs[n] = (graph, out)
        return logits
