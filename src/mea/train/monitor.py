"""Training-stability signals beside the loss: the largest attention logit of each layer.

Attention logit growth (scores ``q.k / sqrt(d)`` whose size keeps rising until the softmax saturates)
comes before the loss spikes and divergence of training at too large a learning rate. FlashAttention
never materializes the scores, so :func:`attention_logit_record` recomputes them at each evaluation,
on the first windows of the validation split: the layer inputs from one no-grad forward pass (the
evaluation's own batch shape and autocast, so a compiled model runs the graph evaluation compiled),
then each layer's queries and keys as the layer makes them (RoPE, MEA's mixing of component keys,
DFA's two half-width maps, the talking-heads pre-softmax mix) and the largest ``|logit|`` over the
causal positions.

The trainer calls it where it writes the validation loss::

    rec.update(attention_logit_record(net, val_ds, train.batch_size, data.seq_len, dev, autocast,
                                      info.is_main and parallel != "fsdp"))
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..layers.attention import DiffAttention, MEAttention, TalkingHeadsAttention
from ..ops.attention import mix_heads

ROWS = 8  # windows whose scores are formed: (ROWS, h, L, L) per layer at a time


def layer_logits(attn, x: Tensor, a) -> list[Tensor]:
    """The pre-softmax score maps ``(B, h, L, L)`` of one attention layer on its (normed) input ``x``."""
    q, k, _ = attn._qkv(x, a)
    if isinstance(attn, MEAttention):
        k = mix_heads(k, attn.k_mix)  # composite keys; RoPE commutes with the mix over heads
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: query head i reads kv head i // group
    if isinstance(attn, DiffAttention):
        half = q.shape[-1] // 2
        return [q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(half) for s in (slice(None, half), slice(half, None))]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return [mix_heads(s, attn.pre_mix) if isinstance(attn, TalkingHeadsAttention) else s]


@torch.no_grad()
def max_attention_logits(model, input_ids: Tensor, autocast: Callable = None, rows: int = ROWS) -> list[float]:
    """Per decoder layer, the largest ``|q.k| / sqrt(d)`` over the causal positions of the first
    ``rows`` sequences of ``input_ids`` (the forward pass that gives the layer inputs sees them all)."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    try:
        with autocast():
            states: list[Tensor] = []
            model.hidden_states(input_ids, states=states)
            ids = input_ids[:rows]
            a = model._attn_inputs(ids, None, None, None, states[0].dtype)
            L = ids.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
            out = []
            for layer, x in zip(model.model.layers, states):
                maps = layer_logits(layer.self_attn, layer.input_layernorm(x[:rows]), a)
                out.append(max(float(m.float().abs().masked_fill(~causal, 0).amax()) for m in maps))
    finally:
        model.train(was_training)
    return out


def attention_logit_record(model, val, batch_size: int, seq_len: int, device, autocast: Callable,
                           enabled: bool = True) -> dict:
    """``{"max_attn_logit": largest over layers, "attn_logit_per_layer": [...]}`` on the first validation
    batch, or ``{}`` when not ``enabled`` (another rank than the main one; weights sharded by FSDP, which
    only a collective forward could gather)."""
    if not enabled:
        return {}
    from ..data.windows import validation_batches

    batch = validation_batches(val, batch_size, seq_len, 1)[0][:, :-1].to(device)
    per_layer = max_attention_logits(model, batch, autocast)
    return {"max_attn_logit": max(per_layer), "attn_logit_per_layer": per_layer}
