"""Decode-step attention over a KV cache: the MEA Triton kernel against SDPA with GQA and MHA caches.

For each shape (batch B, cached tokens T, h query heads, h' stored heads, head size d, one new token)
it times, after warm-up, with CUDA events (``triton.testing.do_bench``, median) the replay of a CUDA
graph of the call (device time, as a graph-captured decoding loop sees it; ``mea_eager_ms`` adds
the host's launch overhead of an eager call):

- ``mea``: ``mea_decode_triton`` over a cache of h' component heads (mixing absorbed);
- ``gqa``: SDPA over a cache of h' KV heads shared by groups of the h query heads (the same bytes);
  when h' does not divide h, over h' query heads instead (same cache bytes, nothing to share);
- ``mha``: SDPA over a cache of h KV heads (twice the bytes at h' = h/2).

Each SDPA baseline is the fastest of the SDPA back-ends that accept the shape. The floor is the
bytes the step must read (K and V of every cached token, plus q and the output) over the measured
device-to-device copy bandwidth (bytes read + written per second). Small caches are rotated over
several buffer sets so the timings do not measure the L2 cache.

    PYTHONPATH=src python benchmarks/decode.py             # table + benchmarks/results/decode.json
    PYTHONPATH=src python benchmarks/decode.py --sweep tiles   # also tune launch parameters
    PYTHONPATH=src python benchmarks/decode.py --paged 16,64,256  # the main shape over a paged cache

Whole decoding loops as a user runs them (``generate()``, prefill included) are timed by
benchmarks/generate.py; serving at a fixed memory budget by benchmarks/serve.py.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

ROTATE_BYTES = 1 << 30  # rotate input sets until this many bytes are touched: far past the 60 MB L2


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton.testing

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    del x, y
    return 2 * (1 << 30) / (ms * 1e-3)


def bench(fns, warmup=25, rep=100) -> float:
    """Median ms of one call, cycling through the list of equivalent calls (one per buffer set)."""
    import triton.testing

    it = itertools.cycle(fns)
    return triton.testing.do_bench(lambda: next(it)(), warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fns) -> float:
    """Median ms of one call replayed from a CUDA graph (one capture over all buffer sets): device time
    without the host's launch overhead, as a graph-captured decoding loop runs."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms / len(fns)


def best_sdpa(make_fns):
    """(ms, backend) of the fastest SDPA back-end that runs the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.cuda.synchronize()
    best = (math.inf, None)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        if backend == SDPBackend.MATH and best[1] is not None:
            break  # the unfused fallback only when no fused kernel takes the shape
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fns = make_fns()
                fns[0]()
                torch.cuda.synchronize()
                ms = bench_graph(fns)
        except RuntimeError:
            continue
        if ms < best[0]:
            best = (ms, backend.name.lower())
    return best


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Problem:
    """Random inputs of one shape: ``n_sets`` caches of h' heads (rotated when small), q, mixing."""

    def __init__(self, B, T, h, hk, d, dtype, lq=1):
        self.B, self.T, self.h, self.hk, self.d, self.dtype, self.lq = B, T, h, hk, d, dtype, lq
        self.elt = torch.tensor([], dtype=dtype).element_size()
        dev = torch.device("cuda")
        self.mea_bytes = 2 * B * hk * T * d * self.elt + 2 * B * h * lq * d * self.elt
        self.n_sets = max(1, min(16, math.ceil(ROTATE_BYTES / self.mea_bytes)))
        self.q = torch.randn(B, h, lq, d, device=dev, dtype=dtype)
        self.k_mix = torch.randn(hk, h, device=dev) / math.sqrt(hk)
        self.v_mix = torch.randn(hk, h, device=dev) / math.sqrt(hk)
        self.seqlens = torch.full((B,), T, dtype=torch.int32, device=dev)
        self.kv = self.cache(hk)

    def cache(self, heads):
        return [tuple(torch.randn(self.B, heads, self.T, self.d, device="cuda", dtype=self.dtype) for _ in range(2))
                for _ in range(self.n_sets)]

    def mea_fns(self, **launch):
        from mea.ops.triton_decode import mea_decode_triton

        return [lambda k=k, v=v: mea_decode_triton(self.q, k, v, self.k_mix, self.v_mix, self.seqlens, **launch)
                for k, v in self.kv]

    def record(self):
        return dict(batch=self.B, cache_len=self.T, h=self.h, hk=self.hk, d=self.d, lq=self.lq,
                    dtype=str(self.dtype).replace("torch.", ""))


def launch_of(pb, launch):
    from mea.ops.triton_decode import decode_launch_config

    cfg = decode_launch_config(pb.B, pb.h * pb.lq, pb.T, pb.d, torch.device("cuda"), **launch)
    return {k: cfg[k] for k in ("num_splits", "block_n", "num_warps", "num_stages", "keys_major", "block_m")}


def run_shape(B, T, h, hk, d, dtype, lq=1, copy_bw=None, baselines=True):
    from mea.ops.attention import mea_attention_reference

    pb = Problem(B, T, h, hk, d, dtype, lq)
    rec = pb.record()
    rec["launch"] = launch_of(pb, {})
    mea_fns = pb.mea_fns()
    # Against the definition (composite heads materialized, fp32), on the first two rows.
    b = min(B, 2)
    k0, v0 = pb.kv[0][0][:b], pb.kv[0][1][:b]
    ref = mea_attention_reference(pb.q[:b].float(), k0.float(), v0.float(), pb.k_mix, pb.v_mix, causal=lq > 1)
    rec["rel_err"] = rel_err(mea_fns[0]()[:b], ref)
    del ref, k0, v0
    rec["mea_ms"] = bench_graph(mea_fns)
    rec["mea_eager_ms"] = bench(mea_fns)
    rec["mea_bytes"] = pb.mea_bytes
    rec["mea_tb_s"] = pb.mea_bytes / (rec["mea_ms"] * 1e-3) / 1e12
    if copy_bw:
        rec["floor_ms"] = pb.mea_bytes / copy_bw * 1e3
        rec["mea_over_floor"] = rec["mea_ms"] / rec["floor_ms"]
    if baselines and lq == 1:
        q, elt = pb.q, pb.elt
        gq = h if h % hk == 0 else hk
        qg = q[:, :gq]
        rec["gqa_q_heads"], rec["gqa_kv_heads"] = gq, hk
        rec["gqa_ms"], rec["gqa_backend"] = best_sdpa(
            lambda: [lambda k=k, v=v: F.scaled_dot_product_attention(qg, k, v, enable_gqa=gq != hk) for k, v in pb.kv])
        gqa_bytes = 2 * B * hk * T * d * elt + 2 * B * gq * d * elt
        rec["gqa_tb_s"] = gqa_bytes / (rec["gqa_ms"] * 1e-3) / 1e12
        pb.kv = mea_fns = None
        torch.cuda.empty_cache()
        kv_mha = pb.cache(h)
        rec["mha_ms"], rec["mha_backend"] = best_sdpa(
            lambda: [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v) for k, v in kv_mha])
        mha_bytes = 2 * B * h * T * d * elt + 2 * B * h * d * elt
        rec["mha_tb_s"] = mha_bytes / (rec["mha_ms"] * 1e-3) / 1e12
        rec["mea_over_gqa"] = rec["mea_ms"] / rec["gqa_ms"]
        rec["mea_over_mha"] = rec["mea_ms"] / rec["mha_ms"]
        del kv_mha
    del pb, mea_fns
    torch.cuda.empty_cache()
    return rec


def run_paged(page_sizes, dtype, copy_bw, B=64, T=4096, h=32, hk=16, d=128):
    """The main shape with the cache in pages (shuffled in a pool, as a serving engine leaves them)
    against the same cache contiguous: time per step and the largest output difference."""
    from mea.ops.triton_decode import mea_decode_triton, to_paged

    pb = Problem(B, T, h, hk, d, dtype)
    base = bench_graph(pb.mea_fns())
    recs = []
    for page in page_sizes:
        paged = [to_paged(k, v, page) for k, v in pb.kv]
        fns = [lambda kp=kp, vp=vp, bt=bt: mea_decode_triton(pb.q, kp, vp, pb.k_mix, pb.v_mix, pb.seqlens, block_table=bt)
               for kp, vp, bt in paged]
        diff = (fns[0]().float() - pb.mea_fns()[0]().float()).abs().max().item()
        ms = bench_graph(fns)
        recs.append(dict(pb.record(), page_size=page, paged_ms=ms, mea_ms=base, paged_over_contiguous=ms / base,
                         paged_tb_s=pb.mea_bytes / (ms * 1e-3) / 1e12, floor_ms=pb.mea_bytes / copy_bw * 1e3,
                         max_abs_diff=diff))
        print(f"page {page:>4}: {ms:.4f} ms vs contiguous {base:.4f} ms ({ms / base:.3f}x), "
              f"{recs[-1]['paged_tb_s']:.2f} TB/s, max |diff| {diff:.1e}", flush=True)
        del paged, fns
        torch.cuda.empty_cache()
    return recs


def sweep_configs(pb, launches, label):
    rows = []
    for launch in launches:
        try:
            fns = pb.mea_fns(**launch)
            fns[0]()
            torch.cuda.synchronize()
            ms = bench(fns, warmup=10, rep=40)
        except Exception as e:  # noqa: BLE001 -- a config that does not compile (shared memory) is skipped
            print(f"  skip {launch}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
            continue
        rows.append(dict(pb.record(), requested=launch, launch=launch_of(pb, launch), mea_ms=ms,
                         mea_tb_s=pb.mea_bytes / (ms * 1e-3) / 1e12))
    rows.sort(key=lambda r: r["mea_ms"])
    print(f"\nsweep {label} B={pb.B} T={pb.T} h={pb.h} h'={pb.hk} d={pb.d}: best of {len(rows)}")
    for r in rows[:6]:
        print(f"  {r['mea_ms']:.4f} ms  {r['mea_tb_s']:.2f} TB/s  {r['launch']}")
    return rows


def sweep(dtype, what):
    """``tiles``: tile shapes and pipelining on the main shape, then slice counts of the best three;
    ``splits``: slice counts around the default choice at the default tiles, on four shapes."""
    out, top = [], [{}]
    if what == "tiles":
        pb = Problem(64, 4096, 32, 16, 128, dtype)
        tiles = [dict(keys_major=km, block_n=bn, num_warps=w, num_stages=st)
                 for km, bn, w, st in itertools.product((0, 1), (64, 128), (4, 8), (2, 3, 4))]
        tiles += [dict(keys_major=km, block_n=32, num_warps=4, num_stages=3) for km in (0, 1)]
        base = sweep_configs(pb, tiles, "tiles")
        out += base
        top = [r["requested"] for r in base[:3]]
        del pb
    for shape, splits in (((64, 4096, 32, 16, 128), (2, 4, 8, 16)), ((8, 16384, 32, 16, 128), (8, 16, 32, 64)),
                          ((1, 32768, 32, 16, 128), (64, 128, 256, 512)), ((1, 4096, 32, 16, 128), (16, 32, 64))):
        pb = Problem(*shape, dtype)
        out += sweep_configs(pb, [dict(t, num_splits=ns) for t in top for ns in (0,) + splits], "splits")
        del pb
        torch.cuda.empty_cache()
    return out


SHAPES_MAIN = [(64, 4096, 32, 16, 128)]
SHAPES_ALL = (
    [(64, 4096, 32, 16, 128), (64, 4096, 32, 8, 128), (64, 4096, 32, 24, 128), (64, 4096, 32, 16, 64)]
    + [(B, T, 32, 16, 128) for B in (1, 8, 64) for T in (1024, 4096, 16384, 32768) if (B, T) != (64, 4096)]
    + [(8, 32768, 32, 8, 128), (8, 32768, 32, 24, 128)]
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=("main", "all"), default="all")
    p.add_argument("--sweep", choices=("none", "splits", "tiles"), default="none",
                   help="also time launch parameters, before the table: slice counts, or tiles and slice counts")
    p.add_argument("--paged", default=None, metavar="PAGE_SIZES",
                   help="instead of the table: the main shape with a paged cache, e.g. 16,64,256 keys per page")
    p.add_argument("--out", default=None, help="default benchmarks/results/decode.json (decode_paged.json with --paged)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA device")
    import triton

    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    args.out = args.out or os.path.join(results_dir, "decode_paged.json" if args.paged else "decode.json")

    dtype = torch.bfloat16
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy {copy_bw / 1e12:.2f} TB/s")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  copy_tb_s=copy_bw / 1e12, dtype="bfloat16", records=[])
    if args.paged:
        result["records"] = run_paged([int(x) for x in args.paged.split(",")], dtype, copy_bw)
        save(result, args.out)
        print(f"saved {args.out}")
        return
    if args.sweep != "none":
        result["sweep"] = sweep(dtype, args.sweep)
    shapes = SHAPES_MAIN if args.shapes == "main" else SHAPES_ALL
    hdr = (f"{'B':>3} {'T':>6} {'h':>3} {'hk':>3} {'d':>4} | {'mea ms':>8} {'eager':>7} {'TB/s':>5} {'floor':>7} | "
           f"{'gqa ms':>8} {'mha ms':>8} | {'/gqa':>5} {'/mha':>5} {'/floor':>6} | err")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for shape in shapes:
        r = run_shape(*shape, dtype, copy_bw=copy_bw)
        result["records"].append(r)
        save(result, args.out)
        print(f"{r['batch']:>3} {r['cache_len']:>6} {r['h']:>3} {r['hk']:>3} {r['d']:>4} | {r['mea_ms']:8.4f} {r['mea_eager_ms']:7.4f} "
              f"{r['mea_tb_s']:5.2f} {r['floor_ms']:7.4f} | {r['gqa_ms']:8.4f} {r['mha_ms']:8.4f} | "
              f"{r['mea_over_gqa']:5.2f} {r['mea_over_mha']:5.2f} {r['mea_over_floor']:6.2f} | {r['rel_err']:.1e}",
              flush=True)
    # Speculative decoding / a few tokens at once: MEA only (SDPA needs an explicit mask there).
    for lq in (4, 16):
        r = run_shape(64, 4096, 32, 16, 128, dtype, lq=lq, copy_bw=copy_bw, baselines=False)
        result["records"].append(r)
        print(f"Lq={lq}: mea {r['mea_ms']:.4f} ms ({r['mea_tb_s']:.2f} TB/s, floor {r['floor_ms']:.4f}) err {r['rel_err']:.1e}")
    save(result, args.out)
    print(f"saved {args.out}")


def save(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
