"""Shared timing for the benchmark scripts: CUDA events around repeated steps, after warm-up; variants by name."""
from __future__ import annotations

import time
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


def ms_per_step(step: Callable[[], None], steps: int, warmup: int, device: str) -> float:
    """``cuda_ms_per_step`` on a GPU; the host clock elsewhere (the CPU smoke runs of the scripts)."""
    if device == "cuda":
        return cuda_ms_per_step(step, steps, warmup)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def allow_compiled_variants(n: int = 64) -> None:
    """Let torch.compile keep ``n`` compiled versions per code object (default 8): variants timed
    round-robin all stay compiled at once, and recompiling one between repeats would be timed."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, n)


def split_top(spec: str, sep: str) -> list[str]:
    """Split ``spec`` at ``sep`` outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == sep and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def parse_variants(spec: str) -> list[str]:
    """Split a comma-separated variant list, keeping commas inside parentheses."""
    return [v for v in split_top(spec, ",") if v]


def variant_fields(variant: str, n_heads: int) -> dict:
    """ModelConfig fields of a variant name, for a model of ``n_heads`` query heads.

    ``ATTENTION[(N)][+MODIFIER...][@BACKEND]``: an attention variant (``mha``, ``gqa``, ``mea``, ``diff``,
    ``diff_v2``, ``talking_heads``); N stored key/value heads, a count or ``h/2``, ``h/4``...; modifiers
    ``norm`` / ``nonorm`` (head norm on / off), ``knock(LETTERS)`` or ``knock(LETTERS,FORM)`` (knocking heads
    on the projections q, k, v named, linear or mlp); a backend (``torch``, ``triton``, ``auto``).
    Examples: ``gqa(h/2)``, ``mea+nonorm@torch``, ``mea(h/2)+knock(v,mlp)``, ``diff_v2(2)``.
    """
    name, _, backend = variant.partition("@")
    parts = split_top(name, "+")
    attention, _, arg = parts[0].partition("(")
    kw = {"attention": attention}
    if backend:
        kw["backend"] = backend
    if arg:
        arg = arg.rstrip(")")
        kw["n_kv_heads"] = n_heads // int(arg[2:]) if arg.startswith("h/") else int(arg)
    for mod in parts[1:]:
        if mod in ("norm", "nonorm"):
            kw["head_norm"] = mod == "norm"
        elif mod.startswith("knock(") and mod.endswith(")"):
            letters, _, form = mod[len("knock("):-1].partition(",")
            kw["knock"] = letters.strip()
            if form:
                kw["knock_form"] = form.strip()
        else:
            raise ValueError(f"variant: unknown modifier {mod!r} in {variant!r} (norm, nonorm, knock(LETTERS[,FORM]))")
    return kw


def base_variant(variant: str) -> str:
    """The variant a knocking-heads or diff_v2 variant is measured against: the name without its knock
    (``mea(h/2)+knock(v)`` -> ``mea(h/2)``), and for ``diff_v2(N)`` GQA with the same stored heads
    (``gqa(N)``; ``mha`` for ``diff_v2``); any other variant is its own base."""
    name, at, backend = variant.partition("@")
    parts = split_top(name, "+")
    kept = [p for p in parts if not p.startswith("knock(")]
    attention, paren, arg = kept[0].partition("(")
    if len(kept) == len(parts) and attention == "diff_v2":
        kept[0] = f"gqa({arg}" if paren else "mha"
    return "+".join(kept) + at + backend


def variant_config(preset: str, variant: str, **overrides):
    """A ModelConfig of ``preset`` from a variant name (see ``variant_fields``)."""
    from mea import ModelConfig

    fields = variant_fields(variant, ModelConfig.from_preset(preset).n_heads)
    return ModelConfig.from_preset(preset, **{**fields, **overrides})


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

        root = __file__.rsplit("/", 2)[0]
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=root).stdout.strip()  # noqa: E731
        info["commit"] = git("rev-parse", "--short", "HEAD") or None
        # A copy of the tree (a rented GPU box) may carry other git metadata than its files: say so.
        info["uncommitted_changes"] = bool(git("status", "--porcelain", "--untracked-files=no"))
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
