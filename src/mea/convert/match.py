"""Attention-output matching: a converted layer trained to give the original layer's attention output.

The closed-form fits of ``heads`` minimize an error of the keys and values (or of the logits and of
what o_proj reads) one projection at a time; what the model needs is the layer's output after the
softmax and o_proj. This stage trains exactly the parameters the conversion changed, each compressed
layer's ``k_proj``, ``v_proj``, ``k_mix`` and ``v_mix`` (queries, o_proj and the head norm stay the
original's), to minimize

    || attn_converted(x) - attn_original(x) ||^2 / || attn_original(x) ||^2

over the original model's own inputs x to that layer on calibration text. Layers are independent (each
sees the original's inputs, not its converted predecessors'), so the stage costs one forward of the
original over the windows plus, per layer, ``steps`` forward/backward passes of one attention module:
far less than end-to-end distillation, and it runs before it.

A sixteenth of the windows (at least one) is held out: each layer reports the relative error on them
before and after, and keeps its fitted weights unless training made the held-out error worse.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layers.attention import AttnInputs
from ..models.transformer import Transformer

TRAINED = ("k_proj.weight", "v_proj.weight", "k_mix", "v_mix")


@torch.no_grad()
def layer_inputs(model: Transformer, windows: Tensor, layers: list[int], batch_size: int,
                 device: torch.device) -> tuple[dict[int, Tensor], AttnInputs]:
    """The input of each of ``layers``' attention modules over ``windows`` (n, L) of token ids, (n, L, D)
    float32 on the CPU, and the (position-only) :class:`AttnInputs` of one window batch."""
    store: dict[int, list[Tensor]] = {i: [] for i in layers}
    shared: list[AttnInputs] = []

    def hook(i):
        def fn(module, args):
            store[i].append(args[0].detach().float().cpu())
            if not shared:
                shared.append(args[1])
        return fn

    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(hook(i)) for i in layers]
    was_training = model.training
    model.eval()
    try:
        for ids in windows.split(batch_size):
            model.hidden_states(ids.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    a = shared[0]  # every window has positions 0..L-1: one row of the rotations serves any batch
    return {i: torch.cat(xs) for i, xs in store.items()}, AttnInputs(cos=a.cos[:1], sin=a.sin[:1])


def _rel_err(student, teacher, xs: Tensor, a: AttnInputs, batch_size: int, device) -> float:
    num = den = 0.0
    with torch.no_grad():
        for x in xs.split(batch_size):
            x = x.to(device)
            y = teacher(x, a).double()
            num += (student(x, a).double() - y).pow(2).sum().item()
            den += y.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-300))


def match_attention(original: Transformer, converted: Transformer, windows: Tensor, layers: list[int],
                    steps: int, lr: float = 3e-3, mixing_lr_mult: float = 10.0, batch_size: int = 8,
                    device: Optional[str] = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Train ``converted``'s compressed ``layers`` (in place) to match ``original``'s attention outputs.

    Args:
        original: the model before conversion (left unchanged).
        converted: its conversion (same layers, queries and output projections).
        windows: calibration token ids (n, L); a sixteenth (at least one window) is held out.
        layers: the compressed layers.
        steps: optimizer steps per layer (AdamW, no weight decay, cosine decay to zero).
        lr: learning rate of k_proj and v_proj.
        mixing_lr_mult: the mixing matrices' learning rate as a multiple of ``lr`` (their entries are
            O(1), the projections' O(1 / sqrt(D))); 0 leaves them as they are (a GQA conversion stays GQA).
        batch_size: windows per step.
        device: where it runs (default: where ``converted`` is).
        seed: the order of the windows.
        progress: show a tqdm bar.

    Returns:
        Per layer ``{"layer", "out_rel_err_before", "out_rel_err_trained", "out_rel_err_after", "kept"}``:
        the held-out relative errors of the attention output (of the fit, of the trained weights, of what
        the layer keeps), and whether the trained weights were kept.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"match_steps: must be >= 1, got {steps}")
    if not lr > 0 or not mixing_lr_mult >= 0:
        raise ValueError(f"match_lr: the learning rate must be > 0 and its mixing multiplier >= 0, got {lr} and "
                         f"{mixing_lr_mult}")
    trained = TRAINED if mixing_lr_mult > 0 else TRAINED[:2]
    if windows is None or windows.shape[0] < 2:
        raise ValueError("match_steps: matching needs at least 2 calibration windows (calib_tokens)")
    dev = torch.device(device) if device is not None else next(converted.parameters()).device
    homes = [next(m.parameters()).device for m in (original, converted)]
    original.to(dev)
    converted.to(dev)
    n_hold = max(1, windows.shape[0] // 16)
    rows = []
    try:
        inputs, a = layer_inputs(original, windows, layers, batch_size, dev)
        a = AttnInputs(cos=a.cos.to(dev), sin=a.sin.to(dev))
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(total=steps * len(layers), desc="match attention", unit="step", disable=not progress)
        for i in layers:
            teacher = original.model.layers[i].self_attn.eval()
            student = converted.model.layers[i].self_attn
            xs = inputs.pop(i)
            train_x, held_x = xs[:-n_hold], xs[-n_hold:]
            before = _rel_err(student, teacher, held_x, a, batch_size, dev)
            named = dict(student.named_parameters())
            saved = {n: named[n].detach().clone() for n in trained}
            flags = {n: p.requires_grad for n, p in named.items()}
            for n, p in named.items():
                p.requires_grad_(n in trained)
            groups = [{"params": [named["k_proj.weight"], named["v_proj.weight"]], "lr": lr}]
            if mixing_lr_mult > 0:
                groups.append({"params": [named["k_mix"], named["v_mix"]], "lr": lr * mixing_lr_mult})
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            was_training = student.training
            student.train()
            try:
                for _ in range(steps):
                    idx = torch.randint(train_x.shape[0], (min(batch_size, train_x.shape[0]),), generator=gen)
                    x = train_x[idx].to(dev)
                    with torch.no_grad():
                        y = teacher(x, a)
                    loss = (student(x, a) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    bar.update()
            finally:
                student.train(was_training)
                for n, p in named.items():
                    p.requires_grad_(flags[n])
            after = _rel_err(student.eval(), teacher, held_x, a, batch_size, dev)
            student.train(was_training)
            kept = after <= before
            if not kept:  # training made the held-out error worse: the closed-form fit stays
                with torch.no_grad():
                    for n in trained:
                        named[n].copy_(saved[n])
            rows.append({"layer": i, "out_rel_err_before": before, "out_rel_err_trained": after,
                         "out_rel_err_after": after if kept else before, "kept": kept})
        bar.close()
    finally:
        original.to(homes[0])
        converted.to(homes[1])
    return rows
