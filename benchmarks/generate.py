r"""End-to-end generation as a user runs it: ``Transformer.generate`` and the Hugging Face wrapper's
``generate``, per attention variant, with random weights in bf16, greedy, on one GPU.

    python benchmarks/generate.py                  # the issue's three shapes, mha / gqa(h/2) / mea(h/2)
    python benchmarks/generate.py --loops core,hf --shapes 125m:64:512:128
    python benchmarks/generate.py --variants "mea,mea(4),gqa(4)" --repeats 5

For each (preset, batch, prompt length, new tokens) and variant it times whole ``generate`` calls
(host clock around each call, after a synchronize and a warm-up call; medians of ``--repeats``):

- ``prefill_s``: a call that makes one token (the prefill, its last-token logits, one sample);
- ``step_ms``: the steady decoding step, (T(N) - T(N/2)) / (N - N/2), so that the prefill (and CUDA
  graph capture, one graph per 256-key bucket, the same count for both) cancels;
  (transformers' own loop, ``--loops hf``, syncs every step: there the median gap between steps'
  tokens, noted by a streamer, is the step);
- ``total_s`` = T(N), and ``tokens_per_s`` = batch x N / T(N), everything included;
- ``kv_bytes``: the bytes of the KV cache the call holds (bf16, prompt + N tokens per row).

Results go to benchmarks/results/generate_e2e.json (``--out``) with the device, versions and date.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import build_variant, meta, parse_variants, save_json  # noqa: E402

DEFAULT_SHAPES = "125m:64:512:128,125m:64:3968:128,350m:32:1920:128"


def timed_generate(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()``, synchronized before and after each call."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class StepClock:
    """A transformers streamer that only notes when each step's tokens arrive (the prompt comes first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def median_step_ms(self) -> float:
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:])]
        return statistics.median(gaps) * 1e3


def run(preset: str, batch: int, prompt_len: int, new_tokens: int, variant: str, loop: str, repeats: int) -> dict:
    model = build_variant(preset, variant, max_seq_len=prompt_len + new_tokens)
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda", generator=g)
    if loop == "core":
        def gen(n, streamer=None):
            return model.generate(prompt, max_new_tokens=n)
    else:
        from mea.models.modeling_mea import MEAForCausalLM

        hf = MEAForCausalLM.from_core(model)

        def gen(n, streamer=None):
            return hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0,
                               loop="hf" if loop == "hf" else "auto", **({"streamer": streamer} if streamer else {}))
    half = max(2, new_tokens // 2)
    gen(4)  # warm-up: Triton compiles, cuBLAS and cuDNN pick their kernels
    prefill = timed_generate(lambda: gen(1), repeats)
    t_half = timed_generate(lambda: gen(half), repeats)
    total = timed_generate(lambda: gen(new_tokens), repeats)
    step_ms = (total - t_half) / (new_tokens - half) * 1e3
    if loop == "hf":  # transformers' loop syncs every step: its steps are timed one by one instead
        stamps = StepClock()
        gen(new_tokens, stamps)
        step_ms = stamps.median_step_ms()
    rec = dict(variant=variant, loop=loop, preset=preset, attention=cfg.attention, n_heads=cfg.n_heads,
               n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, batch=batch, prompt_len=prompt_len,
               new_tokens=new_tokens, prefill_s=prefill, step_ms=step_ms, total_s=total,
               tokens_per_s=batch * new_tokens / total, kv_bytes=cfg.kv_cache_bytes_per_token * batch *
               (prompt_len + new_tokens), kv_bytes_per_token=cfg.kv_cache_bytes_per_token, backend=cfg.backend,
               repeats=repeats)
    del model
    torch.cuda.empty_cache()
    return rec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated preset:batch:prompt:new")
    p.add_argument("--variants", default="mha,gqa(h/2),mea(h/2)",
                   help="comma-separated: mha, gqa(N), mea(N), with N a count or h/2, h/4 (stored heads)")
    p.add_argument("--loops", default="core", help="comma-separated of core (Transformer.generate), hf-auto "
                   "(MEAForCausalLM.generate, which runs mea's loop for such requests) and hf (transformers' loop)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "generate_e2e.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/generate.py needs a CUDA device")
    result = dict(meta=meta("end-to-end generate(): random weights, bf16, greedy"), records=[])
    hdr = (f"{'preset':>6} {'B':>3} {'prompt':>6} {'new':>4} {'loop':>4} {'variant':>10} | {'prefill s':>9} "
           f"{'ms/step':>8} {'total s':>8} {'tok/s':>8} | {'vs mha total':>12}")
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    for shape in args.shapes.split(","):
        preset, b, pl, n = shape.split(":")
        for loop in args.loops.split(","):
            base = None
            for variant in parse_variants(args.variants):
                r = run(preset, int(b), int(pl), int(n), variant, loop, args.repeats)
                base = r if variant == "mha" else base
                r["total_vs_mha"] = r["total_s"] / base["total_s"] if base else None
                result["records"].append(r)
                save_json(result, args.out)
                vs = f"{r['total_vs_mha']:12.3f}" if base else f"{'-':>12}"
                print(f"{preset:>6} {b:>3} {pl:>6} {n:>4} {loop:>4} {variant:>10} | {r['prefill_s']:9.3f} "
                      f"{r['step_ms']:8.3f} {r['total_s']:8.3f} {r['tokens_per_s']:8.0f} | {vs}", flush=True)
    print(f"saved {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
