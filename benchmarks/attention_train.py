r"""Training cost of one attention layer (forward + backward) per variant, bf16.

    python benchmarks/attention_train.py                                   # prints a table, saves results/train.json
    python benchmarks/attention_train.py --shapes main --repeats 7 --profile --variants "mha,mea,mea@torch"
    python benchmarks/attention_train.py --smoke --out /tmp/a.json         # CPU: does the script run

Each variant's layer is built from ``timing.variant_fields`` names (``mha``, ``gqa(h/2)``, ``mea+nonorm``,
``mea@torch``: MEA's fold as PyTorch matmuls instead of its Triton kernels, ``diff_v2(h/2)``,
``mha+knock(v,mlp)``, ...) at each shape and torch.compile'd unless --eager. Times with CUDA events after
warm-up; with --repeats N the variants are timed round-robin N times and the median is kept, so slow drift
of the clock hits all alike. Each variant's tokens/s is also given relative to its base
(``timing.base_variant``: the variant without knocking heads; GQA with the same stored heads for diff_v2)
where that ran. ``--profile`` records each variant's GPU kernels (torch.profiler, ms per step) and prints
them side by side, to see where a variant's time above its base's goes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mea import ModelConfig  # noqa: E402
from mea.layers.attention import AttnInputs, build_attention  # noqa: E402
from mea.layers.rope import RotaryEmbedding  # noqa: E402
from timing import (allow_compiled_variants, base_variant, meta, ms_per_step, parse_variants, save_json,  # noqa: E402
                    variant_fields)

SHAPE_MAIN = dict(batch=8, seq=2048, d_model=2048, n_heads=16)
SHAPE_125M = dict(batch=16, seq=1024, d_model=768, n_heads=12)  # one layer of the 125m preset's training step
SHAPE_SMOKE = dict(batch=2, seq=32, d_model=64, n_heads=4)
SHAPES = {"main": [SHAPE_MAIN], "125m": [SHAPE_125M], "all": [SHAPE_MAIN, SHAPE_125M], "smoke": [SHAPE_SMOKE]}
DEFAULT_VARIANTS = ("mha,mha+norm,gqa(h/2),mea,mea+nonorm,mea@torch,mea(h/2),diff,diff_v2,diff_v2(h/2),"
                    "mha+knock(v),mha+knock(v,mlp),mha+knock(qkv),gqa(h/2)+knock(v),gqa(h/2)+knock(v,mlp),"
                    "mea+knock(v),mea+knock(v,mlp),mea(h/2)+knock(v),mea(h/2)+knock(v,mlp)")
SMOKE_VARIANTS = "mha,gqa(h/2),mea(h/2),diff,diff_v2(h/2),mha+knock(v),mea(h/2)+knock(qkv,mlp)"


def layer_step(variant: str, shape: dict, device: str, eager: bool):
    """The layer of ``variant`` at ``shape`` and one forward + backward step of it (bf16 autocast)."""
    cfg = ModelConfig(vocab_size=256, d_model=shape["d_model"], n_layers=1, n_heads=shape["n_heads"],
                      max_seq_len=shape["seq"], **variant_fields(variant, shape["n_heads"]))
    torch.manual_seed(0)
    layer = build_attention(cfg, 0).to(device)
    fn = layer if eager else torch.compile(layer)
    B, T = shape["batch"], shape["seq"]
    x = torch.randn(B, T, cfg.d_model, device=device, requires_grad=True)
    g = torch.randn_like(x)
    # Differential attention (diff) rotates each half-head as a head of its own, as Transformer sets it up.
    rope_dim = cfg.head_dim // 2 if cfg.attention == "diff" else cfg.head_dim
    cos, sin = RotaryEmbedding(rope_dim, cfg.rope_theta).to(device)(
        torch.arange(T, device=device)[None].expand(B, T), torch.bfloat16)
    a = AttnInputs(cos=cos, sin=sin)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(x, a)
        y.backward(g)

    return step


def kernel_profile(step, steps: int = 10) -> dict[str, float]:
    """GPU time per step of each kernel (by name) in ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        if us > 0 and e.device_type.name == "CUDA":
            out[e.key] = out.get(e.key, 0.0) + us / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def print_profiles(profiles: dict[str, dict[str, float]], top: int = 20) -> None:
    names = list(profiles)
    kernels = sorted({k for p in profiles.values() for k in p}, key=lambda k: -max(p.get(k, 0) for p in profiles.values()))
    print("\n| kernel (ms per step) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in kernels[:top]:
        print(f"| {k[:70]} | " + " | ".join(f"{profiles[n].get(k, 0):.3f}" for n in names) + " |")
    print("| total | " + " | ".join(f"{sum(profiles[n].values()):.3f}" for n in names) + " |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="time the variants round-robin this many times, keep medians")
    ap.add_argument("--shapes", choices=tuple(SHAPES), default="all")
    ap.add_argument("--variants", default=None, help=f"comma-separated variant names (default: {DEFAULT_VARIANTS})")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also record each variant's kernels (torch.profiler)")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, eager, on the CPU without CUDA: checks the "
                    "script, times nothing worth keeping (saves only with --out)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/train.json)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.shapes, args.eager, args.steps, args.warmup, args.profile = "smoke", True, 1, 1, False
        args.variants = args.variants or SMOKE_VARIANTS
    elif device != "cuda":
        sys.exit("needs a CUDA device (or --smoke)")
    else:
        args.out = args.out or str(Path(__file__).parent / "results" / "train.json")
    names = parse_variants(args.variants or DEFAULT_VARIANTS)
    for n in names:  # a typo fails before anything is compiled
        ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, **variant_fields(n, 4))
    allow_compiled_variants()
    result = {"meta": meta("one attention layer, forward + backward", compile=not args.eager, dtype="bf16 autocast",
                           repeats=args.repeats, steps=args.steps, warmup=args.warmup, smoke=args.smoke),
              "records": []}

    def save():  # after each part, so a run cut short keeps what it measured
        if args.out:
            save_json(result, args.out)

    for sh in SHAPES[args.shapes]:
        rec = dict(sh, tokens=sh["batch"] * sh["seq"], variants={})
        steps = {}
        for name in names:
            # Compile and run it once here: a variant that fails is reported and skipped, not fatal.
            try:
                steps[name] = layer_step(name, sh, device, args.eager)
                steps[name]()
            except Exception as e:  # noqa: BLE001
                print(f"{name}: failed ({type(e).__name__}: {str(e)[:200]}); skipped", flush=True)
                steps.pop(name, None)
        times = {n: [] for n in steps}
        for _ in range(max(1, args.repeats)):
            for name, step in steps.items():
                times[name].append(ms_per_step(step, args.steps, args.warmup, device))
        for name, ts in times.items():
            ms = statistics.median(ts)
            rec["variants"][name] = {"ms": ms, "ms_all": ts, "tokens_per_s": rec["tokens"] / (ms / 1e3),
                                     "base": base_variant(name)}
        for v in rec["variants"].values():
            base = rec["variants"].get(v["base"])
            v["vs_base"] = v["tokens_per_s"] / base["tokens_per_s"] if base else None
            v["vs_mha"] = v["tokens_per_s"] / rec["variants"]["mha"]["tokens_per_s"] if "mha" in rec["variants"] else None
        result["records"].append(rec)
        save()
        if args.profile:  # after the timings are saved: a profiler failure loses nothing else
            rec["profile_ms_per_step"] = {name: kernel_profile(step) for name, step in steps.items()}
            save()
            print_profiles(rec["profile_ms_per_step"])
        del steps
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"B={sh['batch']} T={sh['seq']} D={sh['d_model']} h={sh['n_heads']}: " +
              "  ".join(f"{n} {v['ms']:.3f}ms" for n, v in rec["variants"].items()), flush=True)
    print("\n| shape | variant | ms | vs mha | base | vs base |\n|---|---|---|---|---|---|")
    for r in result["records"]:
        for n, v in r["variants"].items():
            ratios = [("-" if x is None else f"{x:.3f}") for x in (v["vs_mha"], v["vs_base"])]
            print(f"| B{r['batch']} T{r['seq']} D{r['d_model']} h{r['n_heads']} | {n} | {v['ms']:.3f} | {ratios[0]} | "
                  f"{v['base']} | {ratios[1]} |")
    if args.out:
        print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
