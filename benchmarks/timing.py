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
