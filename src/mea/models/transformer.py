"""A LLaMA-style decoder (pre-RMSNorm, RoPE, SwiGLU) with a choice of attention variant.

Module names match Hugging Face's LlamaForCausalLM, so weights map onto HF checkpoints as they are.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..layers.attention import AttnInputs, build_attention
from ..layers.cache import KVCache
from ..layers.mlp import SwiGLU
from ..layers.norm import RMSNorm
from ..layers.rope import RotaryEmbedding
from .config import ModelConfig
from .sampling import sample_next_token


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: Tensor, a: AttnInputs) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), a)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # Recompute each layer's activations in the backward instead of keeping them (training only).
        # Kept here, on a module the Hugging Face wrapper registers, so gradient_checkpointing_enable() finds it.
        self.gradient_checkpointing = False


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Differential attention rotates each half-head (d/2) as a head of its own.
        rope_dim = config.head_dim // 2 if config.attention == "diff" else config.head_dim
        self.rotary = RotaryEmbedding(rope_dim, config.rope_theta)
        self.reset_parameters()

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each layer's activations in the backward (training only), trading compute for memory."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = bool(on)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for weights; residual output projections scaled by 1/sqrt(2 L) (GPT-2).
        Norms, mixing matrices and lambdas keep their own initialization."""
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(m.weight, 0.0, s)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)

    # ------------------------------------------------------------------ forward
    def _attn_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor],
                     cache: Optional[KVCache], dtype: torch.dtype, whole_cache: bool = False) -> AttnInputs:
        """``whole_cache``: attend over the cache's whole buffer, masked past each row's length, instead
        of its used prefix: every shape is then fixed and nothing waits for the host (what a CUDA graph
        needs), at the cost of attending over the unused tail. The caller makes sure it fits."""
        B, L = input_ids.shape
        dev = input_ids.device
        mask = positions = None
        kv_len = 0
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache: holds {cache.batch_size} rows, input has {B}")
            if cache.k[0].dtype != dtype:
                raise ValueError(f"cache: holds {cache.k[0].dtype} keys and values, the model computes in {dtype}; "
                                 "make the cache in the model's dtype (KVCache.for_model(..., dtype=...))")
            if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask: with a cache it covers the new tokens only, {(B, L)}; got "
                                 f"{tuple(attention_mask.shape)} (a mask over cached + new tokens, as in Hugging Face, "
                                 "is the wrapper's convention, not the core model's)")
            if attention_mask is not None and (attention_mask[:, 1:].long() > attention_mask[:, :-1].long()).any():
                raise ValueError("attention_mask: with a cache, new tokens must be right-padded (pads last)")
            positions = cache.seqlens[:, None] + torch.arange(L, device=dev)
            if whole_cache:
                kv_len = cache.max_len
            else:
                kv_len = int(positions.max()) + 1
                if kv_len > cache.max_len:
                    raise ValueError(f"cache: {kv_len} positions needed, the cache holds {cache.max_len}")
            if position_ids is None:
                position_ids = positions
            mask = (torch.arange(kv_len, device=dev)[None, None, :] <= positions[:, :, None])[:, None]
        elif attention_mask is not None:
            am = attention_mask.bool()
            if position_ids is None:
                position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
            mask = causal[None] & am[:, None, :]
            # A padding query sees no key; let it see itself so softmax stays finite (its output is unused).
            mask = mask | torch.eye(L, dtype=torch.bool, device=dev)[None]
            mask = mask[:, None]
        if position_ids is None:
            position_ids = torch.arange(L, device=dev)[None].expand(B, L)
        cos, sin = self.rotary(position_ids, dtype)
        return AttnInputs(cos=cos, sin=sin, mask=mask, cache=cache, positions=positions, kv_len=kv_len)

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                      whole_cache: bool = False, states: Optional[list] = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (batch, seq), got shape {tuple(input_ids.shape)}")
        x = self.model.embed_tokens(input_ids)
        a = self._attn_inputs(input_ids, attention_mask, position_ids, cache, x.dtype, whole_cache)
        x = self.run_layers(x, a, states)
        if cache is not None:
            n_new = attention_mask.long().sum(-1) if attention_mask is not None else input_ids.shape[1]
            cache.seqlens += n_new
        return x

    def run_layers(self, x: Tensor, a: AttnInputs, states: Optional[list] = None) -> Tensor:
        """The decoder layers over embeddings ``x``, then the final norm. ``states`` (a list) collects the
        input of every layer and the normed output (Hugging Face's ``hidden_states``)."""
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointed and a.cache is not None:
            raise ValueError("gradient_checkpointing: recomputing a layer would write its cache twice; train "
                             "without a cache (use_cache=False)")
        for layer in self.model.layers:
            if states is not None:
                states.append(x)
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(layer, x, a, use_reentrant=False)
            else:
                x = layer(x, a)
        x = self.model.norm(x)
        if states is not None:
            states.append(x)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> Tensor:
        """Logits (B, L, vocab). With ``cache``, the tokens are appended after each row's cached ones."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def loss(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Mean next-token cross entropy; ``labels`` are the targets aligned with ``input_ids`` (-100 ignored)."""
        logits = self(input_ids, attention_mask=attention_mask)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ generation
    def _decode_step(self, tok: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, vocab) of one new token per row, ``tok`` (B, 1), appended to ``cache``.

        The same computation as ``self(tok, cache=cache)[:, -1]`` but over the cache's whole buffer
        (``whole_cache``): fixed shapes, no host synchronization, so a CUDA graph can capture it.
        """
        return self.lm_head(self.hidden_states(tok, cache=cache, whole_cache=True))[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Optional[Tensor] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cuda_graph: Optional[bool] = None) -> Tensor:
        """Greedy (temperature 0) or sampled continuation; returns (B, L + new) like HF's generate.

        Prompts may be left- or right-padded (``attention_mask``): each row's real tokens are packed
        to the front of its cache row, so padding never enters attention. Rows that emit
        ``eos_token_id`` are filled with ``pad_token_id`` (default: the eos id) afterwards.

        ``cuda_graph``: capture one decoding step in a CUDA graph and replay it, which takes the
        host's per-launch overhead out of every step (each step then attends over the whole
        preallocated cache, masked; greedy tokens agree with the eager path up to floating-point
        rounding). None (default): on for CUDA inputs with at least ``GRAPH_MIN_STEPS`` decoding
        steps, off elsewhere; True forces it (CUDA only); False decodes eagerly. If capture fails, a
        warning says why and decoding continues eagerly. Sampling stays outside the graph.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        B, L = input_ids.shape
        dev = input_ids.device
        if cuda_graph and dev.type != "cuda":
            raise ValueError(f"cuda_graph=True: CUDA graphs need the model and input_ids on a CUDA device, "
                             f"got {dev}; pass cuda_graph=None or False")
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda" and max_new_tokens - 1 >= GRAPH_MIN_STEPS
        am = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = am.long().sum(-1)
        if (lengths == 0).any():
            raise ValueError("input_ids: every prompt needs at least one token (a row is all padding)")
        # Pack each row's tokens to the front (stable, so order is kept), whatever side was padded.
        order = torch.argsort((~am).to(torch.int8), dim=1, stable=True)
        packed = input_ids.gather(1, order)
        packed_mask = torch.arange(L, device=dev)[None] < lengths[:, None]
        dtype = next(self.parameters()).dtype
        cache = KVCache.for_model(self.config, B, L + max_new_tokens, dtype=dtype, device=dev)
        logits = self(packed, attention_mask=packed_mask, cache=cache)
        next_logits = logits[torch.arange(B, device=dev), lengths - 1]
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        graphed = _GraphedDecodeStep(self, cache) if cuda_graph else None
        out = []
        for step in range(max_new_tokens):
            tok = sample_next_token(next_logits, temperature, top_k, top_p, generator)
            done_before = finished.clone()
            out.append(torch.where(done_before, torch.full_like(tok, pad), tok))
            if eos_token_id is not None:
                finished |= tok == eos_token_id
                if bool(finished.all()):
                    break
            if step + 1 < max_new_tokens:
                # A finished row goes on reading eos, not the pad id: its output is unused, and a pad id
                # that is no token (-1) must not reach the embedding.
                feed = torch.where(done_before, torch.full_like(tok, eos_token_id), tok) if eos_token_id is not None else tok
                if graphed is not None and not graphed.failed:
                    next_logits = graphed(feed)
                else:
                    next_logits = self(feed[:, None], cache=cache)[:, -1]
        new = torch.stack(out, 1) if out else input_ids.new_zeros(B, 0)
        if new.shape[1] < max_new_tokens:
            new = F.pad(new, (0, max_new_tokens - new.shape[1]), value=pad)
        return torch.cat([input_ids, new], dim=1)

    def compile_layers(self, **kwargs) -> "Transformer":
        """torch.compile each decoder layer in place: every layer runs the same compiled code, so
        compile time does not grow with depth, and wrappers (DDP, FSDP) see plain modules."""
        for layer in self.model.layers:
            layer.compile(**kwargs)
        return self

    # ------------------------------------------------------------------ sizes
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n


# With cuda_graph=None, generate() captures a graph only for at least this many decoding steps: the
# first step runs eagerly as the warm-up and capturing costs about as much as a few eager steps.
GRAPH_MIN_STEPS = 4


class _GraphedDecodeStep:
    """``Transformer._decode_step`` over one cache, captured in a CUDA graph on the first call and
    replayed on the next ones: the new token goes through a static input buffer, the logits come
    back in a static output buffer (overwritten by the next call: read it before calling again).

    Everything the step touches keeps its address: the parameters, the cache's preallocated K/V
    buffers and its per-row lengths (a device tensor, advanced in place by the graph itself).
    """

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failed = False
        self.replays = 0

    def __call__(self, tok: Tensor) -> Tensor:
        """tok (B,) -> logits (B, vocab) of that token appended to the cache."""
        if self.graph is None:
            return self._warm_up_and_capture(tok)
        self.tok.copy_(tok[:, None])
        self.graph.replay()
        self.replays += 1
        return self.logits

    def _warm_up_and_capture(self, tok: Tensor) -> Tensor:
        self.tok = tok[:, None].clone()
        # The warm-up is this step itself (the cache advances once), run on a side stream as
        # torch.cuda.graph asks: it compiles Triton kernels and sets up library handles, which
        # must not happen during capture.
        side = torch.cuda.Stream(device=tok.device)
        side.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(side):
            logits = self.model._decode_step(self.tok, self.cache)
        torch.cuda.current_stream(tok.device).wait_stream(side)
        logits.record_stream(torch.cuda.current_stream(tok.device))
        # Capturing records the kernels without running them: the cache is untouched until a replay.
        # (By hand rather than `with torch.cuda.graph(...)`: if capture fails, that context manager
        # leaves its capture stream current, and the eager fallback would then run on it.)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(tok.device)
        failure: Optional[Exception] = None
        with torch.cuda.stream(torch.cuda.Stream(device=tok.device)):
            graph.capture_begin()
            try:
                self.logits = self.model._decode_step(self.tok, self.cache)
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
        self.graph = graph
        return logits
