"""Multi-GPU scaling of training: tokens/s per GPU at 1, 2, 4 (and 8) GPUs, at a fixed per-GPU batch.

    python benchmarks/scaling.py                         # 350m FSDP2 and 125m DDP, mha and mea, 1/2/4/8 GPUs
    python benchmarks/scaling.py --gpus 1,2,4 --steps 30 # only these counts
    python benchmarks/scaling.py --configs 125m:ddp --variants mea

Each point is one torchrun job (``--standalone --nproc_per_node G``) running this file as a worker: the
trainer's own pieces (mea.train.distributed's wrap, the AdamW of mea.train.optim, the chunked loss
through the model's forward, bf16 autocast, per-layer torch.compile) on random tokens, timed after
warm-up. Efficiency is per-GPU tokens/s over the same variant's, preset's and strategy's at one GPU.
At 4 GPUs (or the largest count run) the worker also times one checkpoint save of each format
(sharded DCP and full) of the model and optimizer state. Results go to benchmarks/results/scaling.json:

    {"meta": {..., "checkpoint_save": [{"preset", "parallel", "variant", "gpus", "sharded_s", "full_s"}]},
     "records": [{"variant", "preset", "parallel", "gpus", "tokens_per_s", "tokens_per_s_per_gpu",
                  "efficiency"}]}

Points that need more GPUs than the machine has are skipped and listed in meta.skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_CONFIGS = ("350m:fsdp", "125m:ddp")
DEFAULT_VARIANTS = ("mha", "mea")
RECORD_FIELDS = ("variant", "preset", "parallel", "gpus", "tokens_per_s", "tokens_per_s_per_gpu", "efficiency")


def plan(configs, variants, gpu_counts, available: int) -> tuple[list[dict], list[dict]]:
    """(points to run, points skipped for want of GPUs), one per (config, variant, GPU count)."""
    run, skipped = [], []
    for conf in configs:
        preset, _, parallel = conf.partition(":")
        if parallel not in ("ddp", "fsdp"):
            raise SystemExit(f"--configs: {conf!r}: expected PRESET:ddp or PRESET:fsdp")
        for variant in variants:
            for g in gpu_counts:
                point = {"preset": preset, "parallel": parallel, "variant": variant, "gpus": g}
                (run if g <= available else skipped).append(point)
    return run, skipped


def worker_command(point: dict, args, result: Path, save_bench: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={point['gpus']}",
           str(Path(__file__).resolve()), "--worker", f"--result={result}", f"--preset={point['preset']}",
           f"--parallel={point['parallel']}", f"--variants={point['variant']}", f"--batch={args.batch}",
           f"--seq={args.seq}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--device={args.device}"]
    if args.no_compile:
        cmd.append("--no_compile")
    if save_bench:
        cmd.append("--save_bench")
    return cmd


def summarize(points: list[dict]) -> list[dict]:
    """Records with efficiency = per-GPU tokens/s over the one-GPU point of the same variant, preset and
    strategy (None where that point is missing)."""
    base = {(p["variant"], p["preset"], p["parallel"]): p["tokens_per_s"] for p in points if p["gpus"] == 1}
    out = []
    for p in sorted(points, key=lambda p: (p["preset"], p["parallel"], p["variant"], p["gpus"])):
        per_gpu = p["tokens_per_s"] / p["gpus"]
        one = base.get((p["variant"], p["preset"], p["parallel"]))
        out.append({"variant": p["variant"], "preset": p["preset"], "parallel": p["parallel"], "gpus": p["gpus"],
                    "tokens_per_s": p["tokens_per_s"], "tokens_per_s_per_gpu": per_gpu,
                    "efficiency": per_gpu / one if one else None})
    return out


def drive(args) -> None:
    import torch

    available = torch.cuda.device_count() if args.device == "cuda" else args.cpu_ranks
    counts = [int(g) for g in args.gpus.split(",")]
    todo, skipped = plan(args.configs.split(","), args.variants.split(","), counts, available)
    if not todo:
        raise SystemExit(f"nothing to run: {available} GPU(s) here, counts asked {counts}")
    save_at = 4 if 4 in {p["gpus"] for p in todo} else max(p["gpus"] for p in todo)
    points, saves, failed = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i, point in enumerate(todo):
            result = Path(d) / f"{i}.json"
            save_bench = point["gpus"] == save_at and not args.no_save_bench
            print(f"{point['preset']} {point['parallel']} {point['variant']} x{point['gpus']} ...", flush=True)
            r = subprocess.run(worker_command(point, args, result, save_bench), env=dict(os.environ, OMP_NUM_THREADS="1"),
                               capture_output=True, text=True)
            if r.returncode != 0 or not result.exists():
                print(r.stderr[-3000:], file=sys.stderr)
                failed.append({**point, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]})
                continue
            got = json.loads(result.read_text())
            points.append({**point, "tokens_per_s": got["tokens_per_s"]})
            if "save" in got:
                saves.append({**point, **got["save"]})
            print(f"  {got['tokens_per_s']:,.0f} tokens/s ({got['tokens_per_s'] / point['gpus']:,.0f} per GPU)"
                  + (f"; save sharded {got['save']['sharded_s']:.2f} s, full {got['save']['full_s']:.2f} s"
                     if "save" in got else ""), flush=True)
    records = summarize(points)
    print("\n| preset | parallel | variant | GPUs | tokens/s | per GPU | efficiency |\n|---|---|---|---|---|---|---|")
    for rec in records:
        eff = f"{rec['efficiency']:.3f}" if rec["efficiency"] is not None else "-"
        print(f"| {rec['preset']} | {rec['parallel']} | {rec['variant']} | {rec['gpus']} | {rec['tokens_per_s']:,.0f} | "
              f"{rec['tokens_per_s_per_gpu']:,.0f} | {eff} |")
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "gpus_available": available, "batch_per_gpu": args.batch, "seq": args.seq, "steps": args.steps,
            "warmup": args.warmup, "compile": not args.no_compile, "dtype": "bf16 autocast" if args.device == "cuda" else "fp32",
            "checkpoint_save": saves, "skipped": skipped, "failed": failed}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(f"saved {out}")


def work(args) -> None:
    """One point, under torchrun: every rank trains; rank 0 writes the result."""
    import contextlib

    import torch
    import torch.distributed as dist

    from mea import ModelConfig, Transformer
    from mea.train import distributed as D
    from mea.train.config import TrainConfig
    from mea.train.optim import build_optimizer

    info = D.setup(args.device)
    dev = f"cuda:{info.local_rank}" if args.device == "cuda" else "cpu"
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, attention=args.variants, max_seq_len=args.seq)
    net = Transformer(cfg).to(dev)
    if not args.no_compile:
        net.compile_layers()
        net.compile_loss = True
    wrapped = D.wrap(net, info, args.parallel, args.device)
    opt = build_optimizer(wrapped, TrainConfig(max_steps=max(1, args.steps), warmup_steps=0), args.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.device == "cuda" else contextlib.nullcontext
    g = torch.Generator().manual_seed(info.rank)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with autocast():
            loss = wrapped(inp, labels=tgt).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()
        if info.enabled:
            dist.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    result = {"tokens_per_s": info.world_size * args.batch * args.seq * args.steps / elapsed}
    if args.save_bench:
        result["save"] = _time_saves(args, wrapped, opt, cfg, info, sync)
    if info.is_main:
        Path(args.result).write_text(json.dumps(result))
    D.teardown(info)


def _time_saves(args, wrapped, opt, cfg, info, sync) -> dict:
    """Seconds for one checkpoint save of each format, into a folder beside the result (rank 0 makes
    it; it must be on a file system every rank sees, as a run directory must)."""
    import shutil

    import torch

    from mea.io.checkpoint import save_checkpoint, save_sharded_checkpoint
    from mea.train import distributed as D

    run_dir = Path(args.result).with_suffix(".ckpt")
    state = {"step": 1, "tokens": 0, "world_size": info.world_size}
    times = {}
    for fmt in ("sharded", "full"):
        sync()
        t0 = time.perf_counter()
        if fmt == "sharded":
            save_sharded_checkpoint(run_dir / fmt, 1, D.sharded_state(wrapped, opt), cfg, {"rng": torch.get_rng_state()},
                                    state)
        else:
            model_sd, optim_sd = D.full_state(wrapped, opt)
            if info.is_main:
                save_checkpoint(run_dir / fmt, 1, model_sd, cfg, {"optimizer": optim_sd}, state)
        sync()
        times[f"{fmt}_s"] = time.perf_counter() - t0
    if info.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="PRESET:ddp|fsdp, comma-separated")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--gpus", default="1,2,4,8", help="GPU counts; those above the machine's are skipped")
    ap.add_argument("--batch", type=int, default=8, help="sequences per GPU per step (fixed across counts)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no_compile", action="store_true")
    ap.add_argument("--no_save_bench", action="store_true", help="skip the checkpoint save timing")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: gloo ranks on the CPU, to check the script itself (not a measurement)")
    ap.add_argument("--cpu_ranks", type=int, default=2, help="with --device cpu: the 'GPUs' available")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", help=argparse.SUPPRESS)
    ap.add_argument("--save_bench", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        work(args)
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA GPUs (--device cpu only checks the script)")
    drive(args)


if __name__ == "__main__":
    main()
