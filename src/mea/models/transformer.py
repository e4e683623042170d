"""A LLaMA-style decoder (pre-RMSNorm, RoPE, SwiGLU) with a choice of attention variant.

Module names match Hugging Face's LlamaForCausalLM, so weights map onto HF checkpoints as they are.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..layers.attention import Attention, AttnInputs, build_attention
from ..layers.cache import KVCache
from ..layers.mlp import SwiGLU
from ..layers.norm import HeadNorm, RMSNorm
from ..layers.rope import RotaryEmbedding
from ..ops.backend import check_backend
from .config import ModelConfig
from .loss import Distill, linear_cross_entropy


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
        residual_scale = 1.0 / math.sqrt(2 * config.n_layers)
        for layer in self.model.layers:  # GPT-2's scaling of the projections that write the residual stream
            layer.self_attn.o_proj._mea_std_scale = residual_scale
            layer.mlp.down_proj._mea_std_scale = residual_scale
        self.reset_parameters()

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each layer's activations in the backward (training only), trading compute for memory."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = bool(on)

    def set_backend(self, backend: str) -> "Transformer":
        """Choose the implementation of MEA's ops for this model: ``auto``, ``torch`` or ``triton``
        (:mod:`mea.ops.backend`); the model's config records it."""
        self.config.backend = check_backend(backend)
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
        return self

    @property
    def backend(self) -> str:
        return self.config.backend

    def reset_parameters(self) -> None:
        """Every parameter as a fresh model has it (see :meth:`init_module`)."""
        for m in self.modules():
            self.init_module(m)

    def init_module(self, module: nn.Module) -> None:
        """(Re)initialize the parameters ``module`` itself owns (not its children's): Normal(0, init_std) for
        linear and embedding weights, with the residual output projections (o_proj, down_proj) scaled by
        1/sqrt(2 L) as in GPT-2; norms, mixing matrices and lambdas by their own ``reset_parameters``.
        The Hugging Face wrapper initializes through this too, so both build the same fresh model."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std * getattr(module, "_mea_std_scale", 1.0))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (RMSNorm, HeadNorm, Attention)):
            module.reset_parameters()
        if isinstance(module, (RotaryEmbedding, Attention)) and hasattr(module, "reset_buffers"):
            module.reset_buffers()

    # ------------------------------------------------------------------ forward
    def _attn_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor],
                     cache: Optional[KVCache], dtype: torch.dtype, whole_cache: int = 0) -> AttnInputs:
        """``whole_cache`` (a key count): attend over the cache's first ``whole_cache`` slots, masked past
        each row's length, instead of its used prefix: every shape is then fixed and nothing waits for the
        host (what a CUDA graph needs). The caller makes sure every row's keys fit."""
        B, L = input_ids.shape
        dev = input_ids.device
        mask = positions = spans = None
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
                kv_len = whole_cache
            else:
                kv_len = int(positions.max()) + 1
                if kv_len > cache.max_len:
                    raise ValueError(f"cache: {kv_len} positions needed, the cache holds {cache.max_len}")
            if position_ids is None:
                position_ids = positions
            if whole_cache or kv_len != L:
                mask = (torch.arange(kv_len, device=dev)[None, None, :] <= positions[:, :, None])[:, None]
                spans = (None, positions[:, -1] + 1)  # every row's keys start at slot 0
            # else: a prefill over an empty cache; right padding comes after every real token, so the
            # plain causal square (mask None: FlashAttention) is exact for every real token.
        elif attention_mask is not None:
            mask, _, pos = padding_mask(attention_mask, L)
            if position_ids is None:
                position_ids = pos
        if position_ids is None:
            position_ids = torch.arange(L, device=dev)[None].expand(B, L)
        cos, sin = self.rotary(position_ids, dtype)
        return AttnInputs(cos=cos, sin=sin, mask=mask, cache=cache, positions=positions, kv_len=kv_len, spans=spans)

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                      whole_cache: int = 0, states: Optional[list] = None) -> Tensor:
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
                position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                labels: Optional[Tensor] = None, distill: Optional[Distill] = None):
        """Logits (B, L, vocab). With ``cache``, the tokens are appended after each row's cached ones.
        With ``labels``, the training loss instead (:meth:`loss`; an :class:`~mea.models.loss.LMLoss`):
        through ``forward`` so that DDP and FSDP wrappers see it."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if labels is None:
            return self.lm_head(h)
        return linear_cross_entropy(h, self.lm_head.weight, labels, distill, compiled=self.compile_loss)

    # torch.compile the per-chunk softmax arithmetic of the loss (set by the trainer's --compile on GPUs).
    compile_loss = False

    def loss(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None,
             distill: Optional[Distill] = None) -> Tensor:
        """Mean next-token cross entropy; ``labels`` are the targets aligned with ``input_ids`` (-100 ignored).

        Computed chunk by chunk with the output layer (:func:`mea.models.loss.linear_cross_entropy`),
        never holding the full fp32 logits; equal to the cross entropy of ``self(input_ids)`` to fp32
        rounding. ``distill``: mix in the KL to a teacher (``self(input_ids, labels=..., distill=...)``
        returns the terms apart)."""
        return self(input_ids, attention_mask=attention_mask, labels=labels, distill=distill).loss

    # ------------------------------------------------------------------ generation
    def decode_step(self, tok: Tensor, cache: KVCache, keys: int) -> Tensor:
        """Logits (B, vocab) of one new token per row, ``tok`` (B, 1), appended to ``cache``.

        The same computation as ``self(tok, cache=cache)[:, -1]`` but over the cache's first ``keys``
        slots (``whole_cache``): fixed shapes, no host synchronization, so a CUDA graph can capture it.
        """
        return self.lm_head(self.hidden_states(tok, cache=cache, whole_cache=keys))[:, -1]

    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Optional[Tensor] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cuda_graph: Optional[bool] = None,
                 on_token: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        """Greedy (temperature 0) or sampled continuation; returns (B, L + new) like HF's generate.

        Prompts may be left- or right-padded (``attention_mask``): each row's real tokens are packed
        to the front of its cache row, so padding never enters attention. Rows that emit
        ``eos_token_id`` are filled with ``pad_token_id`` (default: the eos id) afterwards.

        ``cuda_graph``: capture decoding steps in CUDA graphs and replay them, which takes the host's
        per-launch overhead out of every step (greedy tokens agree with the eager path up to
        floating-point rounding). None (default): on for CUDA inputs with at least ``GRAPH_MIN_STEPS``
        decoding steps, off elsewhere; True forces it (CUDA only); False decodes eagerly. If capture
        fails, a warning says why and decoding continues eagerly. Sampling stays outside the graph.
        ``on_token``: called with each step's tokens (B,) as they come (streaming).
        """
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p, eos_token_id,
                        pad_token_id, generator, cuda_graph, on_token)

    def compile_for_training(self, mode: str = "layers") -> "Transformer":
        """What ``mea pretrain --compile`` does, in one place for the trainer and the benchmarks: the loss's
        per-chunk arithmetic compiled, and each decoder layer (``mode="layers"``) or the whole model
        (``"model"``)."""
        if mode not in ("layers", "model"):
            raise ValueError(f"compile_mode: unknown mode {mode!r}; expected layers or model")
        self.compile_loss = True
        if mode == "model":
            self.compile()
        else:
            self.compile_layers()
        return self

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


def padding_mask(attention_mask: Tensor, n_new: int, spans: bool = False
                 ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]], Tensor]:
    """Attention over padded rows, from a (B, T) 0/1 mask over past + new tokens (Hugging Face's
    convention): (mask (B, 1, n_new, T), spans, position_ids (B, n_new)).

    A new token sees the earlier and same-position keys its row marks real; a padding token sees only
    itself, so softmax stays finite (its output is unused). Positions count a row's real tokens.
    ``spans=True`` also describes the mask as one span per row, ``(starts, ends)`` (see ``AttnInputs``),
    where each row's real tokens are one run ending at the last slot (left padding); else None. That
    check costs a host sync.
    """
    am = attention_mask.bool()
    B, T = am.shape
    dev = am.device
    q = torch.arange(T - n_new, T, device=dev)[:, None]
    k = torch.arange(T, device=dev)[None, :]
    mask = (((k <= q)[None] & am[:, None, :]) | (k == q)[None])[:, None]
    position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -n_new:]
    described = None
    if spans:
        starts = T - am.long().sum(-1)
        if bool((am == (k >= starts[:, None])).all()):
            described = (starts, torch.full_like(starts, T))
    return mask, described, position_ids
