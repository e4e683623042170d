"""Probe: forms of the Triton fold (K and V in one launch each way) against the library's kernels and the
matmul fold, at the 125m shape and the large layer shape. Device times via CUDA-graph do_bench.
Usage: PYTHONPATH=src python benchmarks/dev/fold_probe.py [--quick | --library] [--out FILE]"""
from __future__ import annotations

import itertools
import json
import sys

import torch
import triton
import triton.language as tl

from mea.ops.triton_fold import fold_mix_bwd, fold_mix_fwd


@triton.jit
def _pick(which, a, b):
    if which == 0:
        out = a
    else:
        out = b
    return out


@triton.jit
def _fwd_dot(W0, W1, M0, M1, O0, O1, N, HK, H, s_k, s_h,
             HK_P: tl.constexpr, H_P: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr):
    which = tl.program_id(1)
    W = _pick(which, W0, W1)
    MIX = _pick(which, M0, M1)
    OUT = _pick(which, O0, O1)
    rk = tl.arange(0, HK_P)
    rh = tl.arange(0, H_P)
    k_ok = rk < HK
    h_ok = rh < H
    mt = tl.load(MIX + rk[None, :] * s_k + rh[:, None] * s_h, mask=h_ok[:, None] & k_ok[None, :], other=0.0)
    mt = mt.to(OUT.dtype.element_ty)
    for s in range(SUB):
        offs = ((tl.program_id(0) * SUB + s) * BN + tl.arange(0, BN)).to(tl.int64)
        n_ok = offs < N
        w = tl.load(W + rk[:, None] * N + offs[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        o = tl.dot(mt, w.to(OUT.dtype.element_ty))
        tl.store(OUT + rh[:, None] * N + offs[None, :], o.to(OUT.dtype.element_ty), mask=h_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_dot(G0, G1, W0, W1, M0, M1, GW0, GW1, PART, N, HK, H, s_k, s_h,
             HK_P: tl.constexpr, H_P: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr):
    which = tl.program_id(1)
    W = _pick(which, W0, W1)
    MIX = _pick(which, M0, M1)
    G = _pick(which, G0, G1)
    GW = _pick(which, GW0, GW1)
    rk = tl.arange(0, HK_P)
    rh = tl.arange(0, H_P)
    k_ok = rk < HK
    h_ok = rh < H
    m = tl.load(MIX + rk[:, None] * s_k + rh[None, :] * s_h, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
    m = m.to(G.dtype.element_ty)
    acc = tl.zeros((HK_P, H_P), dtype=tl.float32)
    for s in range(SUB):
        offs = ((tl.program_id(0) * SUB + s) * BN + tl.arange(0, BN)).to(tl.int64)
        n_ok = offs < N
        g = tl.load(G + rh[:, None] * N + offs[None, :], mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(W + rk[:, None] * N + offs[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        gw = tl.dot(m, g)
        tl.store(GW + rk[:, None] * N + offs[None, :], gw, mask=k_ok[:, None] & n_ok[None, :])
        acc += tl.dot(w.to(G.dtype.element_ty), tl.trans(g))
    part = PART + (tl.program_id(0) * 2 + which) * HK_P * H_P
    tl.store(part + rk[:, None] * H_P + rh[None, :], acc)


@triton.jit
def _fwd_fma(W0, W1, M0, M1, O0, O1, N, s_k, s_h, HK: tl.constexpr, H: tl.constexpr,
             H_P: tl.constexpr, BN: tl.constexpr):
    which = tl.program_id(1)
    W = _pick(which, W0, W1)
    MIX = _pick(which, M0, M1)
    OUT = _pick(which, O0, O1)
    offs = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    rh = tl.arange(0, H_P)
    n_ok = offs < N
    h_ok = rh < H
    acc = tl.zeros((H_P, BN), dtype=tl.float32)
    for k in tl.static_range(HK):
        w_k = tl.load(W + k * N + offs, mask=n_ok, other=0.0).to(tl.float32)
        m_k = tl.load(MIX + k * s_k + rh * s_h, mask=h_ok, other=0.0).to(tl.float32)
        acc += m_k[:, None] * w_k[None, :]
    tl.store(OUT + rh[:, None] * N + offs[None, :], acc.to(OUT.dtype.element_ty), mask=h_ok[:, None] & n_ok[None, :])


def p2(n):
    return max(16, 1 << (n - 1).bit_length())


def fwd_dot(ws, ms, hk, h, out_dtype, BN, SUB, warps, stages):
    N = ws[0].numel() // hk
    outs = [torch.empty(h, N, dtype=out_dtype, device=ws[0].device) for _ in ws]
    _fwd_dot[(triton.cdiv(N, BN * SUB), 2)](ws[0], ws[1], ms[0], ms[1], outs[0], outs[1], N, hk, h, *ms[0].stride(),
                                            HK_P=p2(hk), H_P=p2(h), BN=BN, SUB=SUB, num_warps=warps, num_stages=stages)
    return outs


def bwd_dot(gs, ws, ms, hk, h, BN, SUB, warps, stages):
    N = ws[0].numel() // hk
    gws = [torch.empty_like(w) for w in ws]
    blocks = triton.cdiv(N, BN * SUB)
    part = torch.empty(blocks, 2, p2(hk), p2(h), device=ws[0].device)
    _bwd_dot[(blocks, 2)](gs[0], gs[1], ws[0], ws[1], ms[0], ms[1], gws[0], gws[1], part, N, hk, h, *ms[0].stride(),
                          HK_P=p2(hk), H_P=p2(h), BN=BN, SUB=SUB, num_warps=warps, num_stages=stages)
    return gws, part.sum(0)[:, :hk, :h]


def fwd_fma(ws, ms, hk, h, out_dtype, BN, warps):
    N = ws[0].numel() // hk
    outs = [torch.empty(h, N, dtype=out_dtype, device=ws[0].device) for _ in ws]
    _fwd_fma[(triton.cdiv(N, BN), 2)](ws[0], ws[1], ms[0], ms[1], outs[0], outs[1], N, *ms[0].stride(), HK=hk, H=h,
                                      H_P=1 << (h - 1).bit_length(), BN=BN, num_warps=warps)
    return outs


def bench(fn):
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=50) * 1000  # us


def main():
    quick = "--quick" in sys.argv
    dev = "cuda"
    res = []
    for hk, h, d, D in [(12, 12, 64, 768), (16, 16, 128, 2048), (6, 12, 64, 768)]:
        N = d * D
        ws = [torch.randn(hk, N, device=dev) * 0.02 for _ in range(2)]
        ms = [torch.randn(hk, h, device=dev) for _ in range(2)]
        gs = [torch.randn(h, N, device=dev).bfloat16() for _ in range(2)]
        ref_o = [(m.t().bfloat16().float() @ w.bfloat16().float()) for w, m in zip(ws, ms)]
        ref_gw = [m.bfloat16().float() @ g.float() for g, m in zip(gs, ms)]
        ref_gm = [w.bfloat16().float() @ g.float().t() for g, w in zip(gs, ws)]
        shape = f"hk{hk} h{h} d{d} D{D}"

        def err(a, b):
            return ((a.float() - b).norm() / b.norm()).item()

        def rec(kind, name, us, e):
            res.append(dict(shape=shape, kind=kind, name=name, us=round(us, 2), err=e))
            print(f"{shape:24s} {kind:4s} {name:40s} {us:8.2f} us  err {e:.2e}", flush=True)

        # library kernels
        o = fold_mix_fwd([w.view(hk * d, D) for w in ws], ms, torch.bfloat16).unbind(0)
        rec("fwd", "library", bench(lambda: fold_mix_fwd([w.view(hk * d, D) for w in ws], ms, torch.bfloat16)),
            max(err(a.view(h, N), b) for a, b in zip(o, ref_o)))
        g_st = torch.stack(gs)
        gw, gm = fold_mix_bwd(g_st, [w.view(hk * d, D) for w in ws], ms)
        gw = gw.view(2, hk, N)
        rec("bwd", "library", bench(lambda: fold_mix_bwd(g_st, [w.view(hk * d, D) for w in ws], ms)),
            max(max(err(a.view(hk, N), b) for a, b in zip(gw, ref_gw)), max(err(gm[i], ref_gm[i]) for i in range(2))))

        # matmul fold as autocast runs it: casts, then bf16 GEMMs; grads cast back to fp32
        def mm_fwd():
            return [torch.matmul(m.t().bfloat16(), w.bfloat16()) for w, m in zip(ws, ms)]

        def mm_bwd():
            return ([(m.bfloat16() @ g).float() for g, m in zip(gs, ms)],
                    [(w.bfloat16() @ g.t()).float() for g, w in zip(gs, ws)])
        rec("fwd", "matmul", bench(mm_fwd), 0.0)
        rec("bwd", "matmul", bench(mm_bwd), 0.0)

        if "--library" in sys.argv:
            continue
        cfgs = [(64, 1), (128, 1), (256, 1), (128, 2), (128, 4), (256, 2), (64, 4), (128, 8)]
        if quick:
            cfgs = cfgs[:3]
        for (BN, SUB), warps, stages in itertools.product(cfgs, (4, 8), (1, 3)):
            name = f"dot BN{BN} SUB{SUB} w{warps} s{stages}"
            try:
                o = fwd_dot(ws, ms, hk, h, torch.bfloat16, BN, SUB, warps, stages)
                rec("fwd", name, bench(lambda: fwd_dot(ws, ms, hk, h, torch.bfloat16, BN, SUB, warps, stages)),
                    max(err(a, b) for a, b in zip(o, ref_o)))
                gw, gm = bwd_dot(gs, ws, ms, hk, h, BN, SUB, warps, stages)
                rec("bwd", name, bench(lambda: bwd_dot(gs, ws, ms, hk, h, BN, SUB, warps, stages)),
                    max(max(err(a, b) for a, b in zip(gw, ref_gw)), max(err(gm[i], ref_gm[i]) for i in range(2))))
            except Exception as e:  # noqa: BLE001
                print(name, "failed:", repr(e)[:300], flush=True)
        for BN, warps in itertools.product((128, 256, 512), (4, 8)):
            name = f"fma-unrolled BN{BN} w{warps}"
            try:
                o = fwd_fma(ws, ms, hk, h, torch.bfloat16, BN, warps)
                rec("fwd", name, bench(lambda: fwd_fma(ws, ms, hk, h, torch.bfloat16, BN, warps)),
                    max(err(a, b) for a, b in zip(o, ref_o)))
            except Exception as e:  # noqa: BLE001
                print(name, "failed:", repr(e)[:300], flush=True)
        # the partial-sum reduction alone, for the smallest grid tried
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
