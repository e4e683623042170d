r"""Training throughput of whole models per attention variant: tokens/s and MFU of the step `mea pretrain` runs.

    python benchmarks/train_throughput.py --compile                                  # every default variant once
    python benchmarks/train_throughput.py --compile --repeats 5 --variants "mha,mha+knock(v),mha+knock(v,mlp)"
    python benchmarks/train_throughput.py --smoke --out /tmp/t.json                  # CPU: does the script run

One full optimizer step per iteration on random tokens: bf16 autocast, the model's own loss
(``model.loss(ids, targets)``, what ``mea pretrain`` calls), backward, fused AdamW. Timed with CUDA events
after warm-up. ``--repeats 1`` builds, compiles and times one variant at a time; ``--repeats N`` builds all
of them, then times them round-robin N times and keeps medians, so slow drift of the clock hits all alike.

Variants are named as in ``timing.variant_fields``: ``mha``, ``gqa(h/2)``, ``mea``, ``mea+nonorm``,
``mea@torch`` (MEA's fold as PyTorch matmuls instead of its Triton kernels), ``diff_v2(h/2)``,
``mea(h/2)+knock(v,mlp)``... Each record carries its tokens/s relative to mha's and to its base's
(``timing.base_variant``: the same variant without knocking heads; GQA with the same stored heads for
diff_v2) where that base ran too, and MFU (``ModelConfig.flops_per_token`` against the GPU's dense bf16
peak). Results (``--out``, default benchmarks/results/train_throughput.json) carry ``meta`` (device,
versions, date, commit, preset, batch, seq, steps, ...) and ``records``, written after every variant.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mea import Transformer  # noqa: E402
from mea.train.pretrain import peak_flops  # noqa: E402
from timing import (allow_compiled_variants, base_variant, meta, ms_per_step, parse_variants, save_json,  # noqa: E402
                    variant_config)

DEFAULT_VARIANTS = ("mha,mha+norm,gqa(h/2),mea,mea+nonorm,mea@torch,mea(h/2),diff,talking_heads,"
                    "diff_v2,diff_v2(h/2),mha+knock(v),mha+knock(v,mlp),mha+knock(qkv),gqa(h/2)+knock(v),"
                    "gqa(h/2)+knock(v,mlp),mea+knock(v),mea+knock(v,mlp),mea(h/2)+knock(v),mea(h/2)+knock(v,mlp)")
SMOKE_VARIANTS = "mha,gqa(h/2),mea(h/2),diff_v2(h/2),mha+knock(v),mea(h/2)+knock(qkv,mlp)"


def build(preset: str, variant: str, batch: int, seq: int, compile_model: bool, device: str,
          compile_mode: str = "layers", **overrides):
    """One variant's config and training step (a full optimizer update on fixed random tokens)."""
    torch.manual_seed(0)
    cfg = variant_config(preset, variant, max_seq_len=seq, **overrides)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    if compile_model:
        model.compile_for_training(compile_mode)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model.loss(inp, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, step


def record(variant: str, cfg, ms: float, batch: int, seq: int, device: str) -> dict:
    tps = batch * seq / (ms / 1e3)
    peak = peak_flops(device)
    fpt = cfg.flops_per_token(seq)
    return {"variant": variant, "base": base_variant(variant), "step_ms": ms, "tokens_per_s": tps,
            "mfu": tps * fpt / peak if peak else None, "flops_per_token": fpt, "params": cfg.num_params(),
            "kv_bytes_per_token": cfg.kv_cache_bytes_per_token, "attention": cfg.attention,
            "n_kv_heads": cfg.n_kv_heads, "head_norm": cfg.head_norm, "knock": cfg.knock,
            "knock_form": cfg.knock_form if cfg.knock else None, "backend": cfg.backend}


def add_ratios(records: list[dict]) -> None:
    """Each record's tokens/s over mha's and over its base's, where those ran."""
    tps = {r["variant"]: r["tokens_per_s"] for r in records}
    for r in records:
        r["ratio_to_mha"] = r["tokens_per_s"] / tps["mha"] if "mha" in tps else None
        r["ratio_to_base"] = r["tokens_per_s"] / tps[r["base"]] if r["base"] in tps else None


def print_table(records: list[dict]) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print("\n| variant | ms/step | tokens/s | MFU | vs mha | base | vs base |\n|---|---|---|---|---|---|---|")
    for r in records:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {fmt(mfu, '.1f')}% | "
              f"{fmt(r['ratio_to_mha'], '.3f')} | {r['base']} | {fmt(r['ratio_to_base'], '.3f')} |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile as mea pretrain --compile does")
    ap.add_argument("--compile_mode", default="layers", choices=("layers", "model"),
                    help="with --compile: each decoder layer (mea pretrain's default) or the whole model")
    ap.add_argument("--variants", default=None, help=f"comma-separated variant names (default: {DEFAULT_VARIANTS})")
    ap.add_argument("--repeats", type=int, default=1,
                    help="build every variant once and time them round-robin this many times, keep medians")
    ap.add_argument("--smoke", action="store_true", help="a few steps of the tiny preset, on the CPU without CUDA: "
                    "checks the script, times nothing worth keeping (saves only with --out)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/train_throughput.json)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = {}
    if args.smoke:  # the tiny preset with a small vocabulary: the lm head would take all the time
        args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 32, 1, 1
        args.variants = args.variants or SMOKE_VARIANTS
        overrides = {"vocab_size": 512}
    elif device != "cuda":
        sys.exit("needs a CUDA device (or --smoke)")
    else:
        args.out = args.out or str(Path(__file__).parent / "results" / "train_throughput.json")
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = parse_variants(args.variants or DEFAULT_VARIANTS)
    for v in variants:  # a typo fails before anything is built or compiled
        variant_config(args.preset, v)
    result = {"meta": meta("training step of whole models per attention variant", preset=args.preset,
                           batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                           repeats=args.repeats, compile=args.compile, compile_mode=args.compile_mode,
                           dtype="bf16 autocast",
                           loss="model.loss", smoke=args.smoke, overrides=overrides),
              "records": []}
    records = result["records"]

    def save():  # after every variant: a run cut short keeps what it measured
        add_ratios(records)
        if args.out:
            save_json(result, args.out)

    if args.repeats <= 1:  # one variant at a time, each compiled afresh
        for variant in variants:
            torch._dynamo.reset()
            cfg, step = build(args.preset, variant, args.batch, args.seq, args.compile, device, args.compile_mode, **overrides)
            records.append(record(variant, cfg, ms_per_step(step, args.steps, args.warmup, device), args.batch,
                                  args.seq, device))
            del step
            if device == "cuda":
                torch.cuda.empty_cache()
            r = records[-1]
            print(f"{variant:<24} {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:>12,.0f} tok/s", flush=True)
            save()
    else:  # all variants alive at once, timed round-robin, medians
        allow_compiled_variants()
        built = [(v, *build(args.preset, v, args.batch, args.seq, args.compile, device, args.compile_mode, **overrides)) for v in variants]
        times = {v: [] for v in variants}
        for i in range(args.repeats):
            for variant, cfg, step in built:
                times[variant].append(ms_per_step(step, args.steps, args.warmup, device))
            print(f"repeat {i + 1}/{args.repeats}: " + "  ".join(f"{k} {t[-1]:.1f}" for k, t in times.items()),
                  flush=True)
        for variant, cfg, step in built:
            records.append(dict(record(variant, cfg, statistics.median(times[variant]), args.batch, args.seq, device),
                                step_ms_all=times[variant]))
        save()
    print_table(records)
    if args.out:
        print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
