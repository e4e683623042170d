"""Shared timing for the benchmark scripts: CUDA events around repeated steps, after warm-up."""
from __future__ import annotations

from typing import Callable

import torch


def cuda_ms_per_step(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Mean device milliseconds of ``step()`` over ``steps`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def allow_compiled_variants(n: int = 64) -> None:
    """Let torch.compile keep ``n`` compiled versions per code object (default 8): variants timed
    round-robin all stay compiled at once, and recompiling one between repeats would be timed."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, n)


# Layer attributes (not ModelConfig fields) that benchmark variants set: MEA's fold as Triton kernels
# (mea.ops.triton_fold), and the head norm's weight folded into o_proj's (False: on the tokens).
LAYER_FLAGS = ("triton_fold", "fold_norm_gain")


def pop_layer_flags(kw: dict) -> dict:
    """Take the LAYER_FLAGS out of a variant's overrides (what is left goes to ModelConfig)."""
    return {f: kw.pop(f) for f in LAYER_FLAGS if f in kw}


def set_layer_flags(model, flags: dict) -> None:
    """Set each flag on every module of ``model`` (itself included) that has it."""
    for m in model.modules():
        for f, on in flags.items():
            if hasattr(m, f):
                setattr(m, f, on)
