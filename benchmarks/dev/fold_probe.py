"""Probe: the Triton fold's kernels (mea.ops.triton_fold, K and V in one launch each way) at several tile
shapes, against the matmul fold as autocast runs it, at the 125m shape and the large layer shape. Device
times of CUDA-graph replays (do_bench_cudagraph), in microseconds; errors against the bf16-operand
reference. ``--library`` times only the library's own choice of tiles.
Usage: PYTHONPATH=src python benchmarks/dev/fold_probe.py [--library] [--out FILE]"""
from __future__ import annotations

import itertools
import json
import sys

import torch
import triton

from mea.ops import triton_fold as tf


def fwd(ws, ms, hk, h, cfg):
    N = ws[0].numel() // hk
    out = torch.empty(2, h, N, dtype=torch.bfloat16, device=ws[0].device)
    tf._fold_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"] * cfg["SUB"]), 2)](
        ws[0], ws[1], ms[0], ms[1], out, N, hk, h, *ms[0].stride(), *ms[1].stride(), **cfg)
    return out


def bwd(g, ws, ms, hk, h, cfg):
    N = ws[0].numel() // hk
    gw = torch.empty(2, hk, N, device=ws[0].device)
    blocks = triton.cdiv(N, cfg["BLOCK_N"] * cfg["SUB"])
    part = torch.empty(blocks, 2, cfg["HK_P"], cfg["H_P"], device=ws[0].device)
    tf._fold_bwd_kernel[(blocks, 2)](g, ws[0], ws[1], ms[0], ms[1], gw, part, N, hk, h,
                                     *ms[0].stride(), *ms[1].stride(), **cfg)
    return gw, part.sum(0)[:, :hk, :h]


def bench(fn):
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=50) * 1000


def main():
    res = []
    for hk, h, d, D in [(12, 12, 64, 768), (16, 16, 128, 2048), (6, 12, 64, 768)]:
        N = d * D
        ws = [torch.randn(hk, N, device="cuda") * 0.02 for _ in range(2)]
        ms = [torch.randn(hk, h, device="cuda") for _ in range(2)]
        g = torch.randn(2, h, N, device="cuda").bfloat16()
        ref_o = torch.stack([m.t().bfloat16().float() @ w.bfloat16().float() for w, m in zip(ws, ms)])
        ref_gw = torch.stack([m.bfloat16().float() @ g[i].float() for i, m in enumerate(ms)])
        ref_gm = torch.stack([w.bfloat16().float() @ g[i].float().t() for i, w in enumerate(ws)])
        shape = f"hk{hk} h{h} d{d} D{D}"

        def err(a, b):
            return ((a.float() - b).norm() / b.norm()).item()

        def rec(kind, name, us, e):
            res.append(dict(shape=shape, kind=kind, name=name, us=round(us, 2), err=e))
            print(f"{shape:24s} {kind:4s} {name:32s} {us:8.2f} us  err {e:.2e}", flush=True)

        def mm_fwd():
            return [torch.matmul(m.t().bfloat16(), w.bfloat16()) for w, m in zip(ws, ms)]

        def mm_bwd():
            return ([(m.bfloat16() @ g[i]).float() for i, m in enumerate(ms)],
                    [(w.bfloat16() @ g[i].t()).float() for i, w in enumerate(ws)])
        rec("fwd", "matmul", bench(mm_fwd), 0.0)
        rec("bwd", "matmul", bench(mm_bwd), 0.0)

        lib_f, lib_b = tf._launch(hk, h, 2048, False), tf._launch(hk, h, 1024, False)
        cfgs = [("library", lib_f, lib_b)]
        if "--library" not in sys.argv:
            for (bn, sub), warps, stages in itertools.product([(64, 1), (128, 1), (256, 1), (128, 2), (128, 4),
                                                               (256, 2), (64, 4), (128, 8)], (4, 8), (1, 3)):
                c = dict(lib_f, BLOCK_N=bn, SUB=sub, num_warps=warps, num_stages=stages)
                cfgs.append((f"BN{bn} SUB{sub} w{warps} s{stages}", c, c))
        for name, cf, cb in cfgs:
            o = fwd(ws, ms, hk, h, cf)
            rec("fwd", name, bench(lambda: fwd(ws, ms, hk, h, cf)), err(o, ref_o))
            gw, gm = bwd(g, ws, ms, hk, h, cb)
            rec("bwd", name, bench(lambda: bwd(g, ws, ms, hk, h, cb)), max(err(gw, ref_gw), err(gm, ref_gm)))
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "fold_probe.json"
    json.dump(res, open(out, "w"), indent=1)
    best = {}
    for r in res:
        k = (r["shape"], r["kind"])
        if r["err"] < 2e-2 and (k not in best or r["us"] < best[k]["us"]):
            best[k] = r
    print("\nbest:")
    for k, r in best.items():
        print(k, r["name"], r["us"], "us")


if __name__ == "__main__":
    main()
