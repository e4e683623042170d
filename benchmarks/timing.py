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


def parse_variants(spec: str) -> list[str]:
    """Split a comma-separated variant list, keeping commas inside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [v for v in out + [cur.strip()] if v]


def variant_config(preset: str, variant: str, **overrides):
    """A ModelConfig from a variant name: ``mha``, ``gqa(N)``, ``mea(N)`` or ``mea`` (h' = h), where N is
    a stored-head count or ``h/2``, ``h/4``; ``@torch`` / ``@triton`` at the end picks the backend."""
    from mea import ModelConfig

    name, _, backend = variant.partition("@")
    attention, _, arg = name.partition("(")
    kw = dict(overrides)
    if backend:
        kw["backend"] = backend
    if arg:
        arg = arg.rstrip(")")
        h = ModelConfig.from_preset(preset).n_heads
        kw["n_kv_heads"] = h // int(arg[2:]) if arg.startswith("h/") else int(arg)
    return ModelConfig.from_preset(preset, attention=attention, **kw)


def build_variant(preset: str, variant: str, dtype=torch.bfloat16, device: str = "cuda", seed: int = 0, **overrides):
    """A randomly initialized model of ``variant`` (see ``variant_config``), in ``dtype`` on ``device``, eval."""
    from mea import Transformer

    torch.manual_seed(seed)
    return Transformer(variant_config(preset, variant, **overrides)).to(device=device, dtype=dtype).eval()


def meta(what: str, **extra) -> dict:
    """Device, versions and date for a results file."""
    import datetime
    import platform

    info = dict(what=what, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import subprocess

        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=__file__.rsplit("/", 2)[0]).stdout.strip() or None
    except OSError:
        pass
    return {**info, **extra}


def save_json(result: dict, path) -> None:
    """Write ``result`` atomically (a run cut short keeps what it had measured)."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


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
