"""Training throughput of whole models per attention variant: tokens/s and MFU.

    python benchmarks/train_throughput.py --preset 125m --batch 16 --seq 1024 --compile
    python benchmarks/train_throughput.py --compile --only mha,mea --repeats 5   # round-robin, medians

One full optimizer step (bf16 autocast, fused AdamW) per iteration on random tokens, timed with
CUDA events after warm-up; prints a table and saves benchmarks/results/train_throughput.json with
the device, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mea import ModelConfig, Transformer  # noqa: E402
from mea.train.pretrain import peak_flops  # noqa: E402
from timing import allow_compiled_variants, cuda_ms_per_step, pop_layer_flags, set_layer_flags  # noqa: E402


def variants(preset: str) -> list[tuple[str, dict]]:
    h = ModelConfig.from_preset(preset).n_heads
    half = h // 2
    return [("mha", {"attention": "mha"}),
            ("mha+norm", {"attention": "mha", "head_norm": True}),
            (f"gqa(h'={half})", {"attention": "gqa", "n_kv_heads": half}),
            ("mea", {"attention": "mea"}),
            ("mea-nonorm", {"attention": "mea", "head_norm": False}),
            # the fold as matmuls rather than the Triton kernels of mea.ops.triton_fold
            ("mea-matmulfold", {"attention": "mea", "triton_fold": False}),
            ("mea-nonorm-matmulfold", {"attention": "mea", "head_norm": False, "triton_fold": False}),
            # the head norm's weight applied to the tokens rather than folded into o_proj's
            ("mha+norm-unfoldedgain", {"attention": "mha", "head_norm": True, "fold_norm_gain": False}),
            ("mea-unfoldedgain", {"attention": "mea", "fold_norm_gain": False}),
            (f"mea(h'={half})", {"attention": "mea", "n_kv_heads": half}),
            ("diff", {"attention": "diff"}),
            ("talking_heads", {"attention": "talking_heads"})]


def build(preset, kw, batch, seq, compile_model, device):
    """One variant's model, optimizer and training step (the step runs a full optimizer update)."""
    torch.manual_seed(0)
    kw = dict(kw)
    flags = pop_layer_flags(kw)
    cfg = ModelConfig.from_preset(preset, max_seq_len=seq, **kw)
    model = Transformer(cfg).to(device)
    set_layer_flags(model, flags)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    if compile_model:
        model.compile_layers()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inp)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, step


def record(cfg, ms, batch, seq):
    tps = batch * seq / (ms / 1e3)
    peak = peak_flops("cuda")
    mfu = tps * cfg.flops_per_token(seq) / peak if peak else None
    return {"step_ms": ms, "tokens_per_s": tps, "mfu": mfu, "params": cfg.num_params(),
            "kv_bytes_per_token": cfg.kv_cache_bytes_per_token, "flops_per_token": cfg.flops_per_token(seq)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated variant labels")
    ap.add_argument("--repeats", type=int, default=1,
                    help="build every variant once and time them round-robin this many times, keep medians")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    records = []
    chosen = [(label, kw) for label, kw in variants(args.preset) if not args.only or label in args.only.split(",")]
    if args.repeats <= 1:  # one variant at a time, each compiled afresh
        for label, kw in chosen:
            torch._dynamo.reset()
            cfg, step = build(args.preset, kw, args.batch, args.seq, args.compile, "cuda")
            records.append(dict(record(cfg, cuda_ms_per_step(step, args.steps, args.warmup), args.batch, args.seq),
                                variant=label, **kw))
            del step
            torch.cuda.empty_cache()
            r = records[-1]
            print(f"{label:<16} {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:>12,.0f} tok/s  "
                  f"MFU {100 * (r['mfu'] or 0):5.1f}%", flush=True)
    else:  # all variants alive at once, timed round-robin, medians: slow clock drift hits all alike
        allow_compiled_variants()
        built = [(label, kw, *build(args.preset, kw, args.batch, args.seq, args.compile, "cuda")) for label, kw in chosen]
        times = {label: [] for label, *_ in built}
        for i in range(args.repeats):
            for label, kw, cfg, step in built:
                times[label].append(cuda_ms_per_step(step, args.steps, args.warmup))
            print(f"repeat {i + 1}/{args.repeats}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()), flush=True)
        for label, kw, cfg, step in built:
            records.append(dict(record(cfg, statistics.median(times[label]), args.batch, args.seq), variant=label,
                                step_ms_all=times[label], **kw))
    base = next((r["tokens_per_s"] for r in records if r["variant"] == "mha"), None)
    print("\n| variant | ms/step | tokens/s | MFU | vs mha |\n|---|---|---|---|---|")
    for r in records:
        r["ratio_to_mha"] = r["tokens_per_s"] / base if base else None
        ratio = f"{r['ratio_to_mha']:.3f}" if base else "-"
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {100 * (r['mfu'] or 0):.1f}% | {ratio} |")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": getattr(__import__("triton"), "__version__", None) if args.compile else None,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps, "repeats": args.repeats,
            "compile": args.compile, "dtype": "bf16 autocast"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
