r"""Serving at a fixed KV-cache budget: each variant's largest batch that fits, generated end to end.

    python benchmarks/serve.py                          # 24 GiB; 1,024 + 1,024 and 2,048 + 256 tokens
    python benchmarks/serve.py --budget-gib 16 --presets 125m --workloads 1024:1024

A smaller cache is worth what it buys at equal memory: more sequences per batch. For a KV budget
and a workload (prompt + new tokens per sequence) the batch is the most sequences whose whole cache
(bf16, ``Transformer.generate`` preallocates prompt + new slots per row) fits the budget. Then one
``generate`` call at that batch (random weights, bf16, greedy, CUDA graphs as by default), after a
short warm-up call, is timed on the host clock: the prefill until the first token is out, then
the decoding of the rest.

- ``decode_tokens_per_s``: batch x (new - 1) over the decoding time;
- ``tokens_per_s`` (end to end): batch x new over prefill + decoding time (``total_s``).

Results go to benchmarks/results/serve.json (``--out``) with the device, versions and date.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import build_variant, meta, parse_variants, save_json, variant_config  # noqa: E402

GIB = 1 << 30


def max_batch(cfg, budget_gib: float, seq_tokens: int) -> int:
    return int(budget_gib * GIB // (cfg.kv_cache_bytes_per_token * seq_tokens))


def serve_once(model, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds until the first token, total seconds) of one generate call."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    first = []

    def on_token(tok):
        if not first:
            torch.cuda.synchronize()
            first.append(time.perf_counter())

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, on_token=on_token)
    torch.cuda.synchronize()
    return first[0] - t0, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--workloads", default="1024:1024,2048:256", help="comma-separated prompt:new")
    p.add_argument("--presets", default="125m,350m")
    p.add_argument("--variants", default="mha,gqa(h/2),mea(h/2),gqa(h/4),mea(h/4)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serve.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/serve.py needs a CUDA device")
    result = dict(meta=meta(f"generate() at the largest batch whose KV cache fits {args.budget_gib} GiB",
                            budget_gib=args.budget_gib), records=[])
    hdr = (f"{'preset':>6} {'prompt+new':>10} {'variant':>9} {'batch':>5} | {'prefill s':>9} {'total s':>8} "
           f"{'decode tok/s':>12} {'e2e tok/s':>9} | {'vs mha':>6} {'vs gqa':>6}")
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    for preset in args.presets.split(","):
        for wl in args.workloads.split(","):
            prompt_len, new_tokens = map(int, wl.split(":"))
            seq = prompt_len + new_tokens
            rows = {}
            for variant in parse_variants(args.variants):
                cfg = variant_config(preset, variant, max_seq_len=seq)
                batch = max_batch(cfg, args.budget_gib, seq)
                model = build_variant(preset, variant, max_seq_len=seq)
                serve_once(model, min(batch, 8), prompt_len, 8)  # warm-up: kernels compiled, libraries set up
                prefill, total = serve_once(model, batch, prompt_len, new_tokens)
                rec = dict(variant=variant, preset=preset, attention=cfg.attention, n_heads=cfg.n_heads,
                           n_kv_heads=cfg.n_kv_heads, kv_budget_gib=args.budget_gib, prompt_len=prompt_len,
                           new_tokens=new_tokens, max_batch=batch, kv_bytes_per_token=cfg.kv_cache_bytes_per_token,
                           prefill_s=prefill, total_s=total,
                           decode_tokens_per_s=batch * (new_tokens - 1) / (total - prefill),
                           tokens_per_s=batch * new_tokens / total,
                           peak_memory_gib=torch.cuda.max_memory_allocated() / GIB)
                rows[variant] = rec
                kind = variant.split("(")[0]
                ref_gqa = rows.get(variant.replace("mea", "gqa")) if kind == "mea" else None
                rec["decode_vs_mha"] = rec["decode_tokens_per_s"] / rows["mha"]["decode_tokens_per_s"] if "mha" in rows else None
                rec["e2e_vs_mha"] = rec["tokens_per_s"] / rows["mha"]["tokens_per_s"] if "mha" in rows else None
                rec["decode_vs_gqa"] = rec["decode_tokens_per_s"] / ref_gqa["decode_tokens_per_s"] if ref_gqa else None
                rec["e2e_vs_gqa"] = rec["tokens_per_s"] / ref_gqa["tokens_per_s"] if ref_gqa else None
                result["records"].append(rec)
                save_json(result, args.out)
                vm = f"{rec['e2e_vs_mha']:6.2f}" if rec["e2e_vs_mha"] else f"{'-':>6}"
                vg = f"{rec['e2e_vs_gqa']:6.2f}" if rec["e2e_vs_gqa"] else f"{'-':>6}"
                print(f"{preset:>6} {wl:>10} {variant:>9} {batch:>5} | {prefill:9.3f} {total:8.3f} "
                      f"{rec['decode_tokens_per_s']:12.0f} {rec['tokens_per_s']:9.0f} | {vm} {vg}", flush=True)
                del model
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    print(f"saved {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
