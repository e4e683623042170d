"""Which SDPA back-end decodes GQA fastest (a probe for choosing the library's path, not a result).

One decoding step (one query token per row) over a cache, bf16, CUDA-graph replay, medians: the
grouped view (query heads of a group folded into query rows of one KV head) with a boolean mask, on
each SDPA back-end that accepts it; ``enable_gqa`` with the mask; MHA over twice the heads; and MEA's
Triton kernel over the same bytes as GQA.

    python benchmarks/dev/sdpa_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def graph_ms(fn) -> float:
    import triton.testing

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def main() -> None:
    from mea.ops.triton_decode import mea_decode_triton

    torch.manual_seed(0)
    for B, T, h, hk, d in [(64, 4096, 12, 6, 64), (64, 640, 12, 6, 64), (32, 2048, 16, 8, 64)]:
        q = torch.randn(B, h, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, hk, T, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kf = torch.randn(B, h, T, d, device="cuda", dtype=torch.bfloat16)
        vf = torch.randn_like(kf)
        lens = torch.full((B,), T - 100, device="cuda")
        mask = (torch.arange(T, device="cuda")[None] < lens[:, None])[:, None, None]  # (B, 1, 1, T)
        g = h // hk
        qg = q.reshape(B, hk, g, d)
        mg = mask.expand(B, 1, g, T)
        rows = []
        for name, be in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)]:
            for label, fn in [("grouped+mask", lambda: F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)),
                              ("enable_gqa+mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                         enable_gqa=True)),
                              ("grouped nomask", lambda: F.scaled_dot_product_attention(qg, k, v)),
                              ("mha+mask", lambda: F.scaled_dot_product_attention(q, kf, vf, attn_mask=mask))]:
                try:
                    with sdpa_kernel([be]):
                        ms = graph_ms(fn)
                except RuntimeError as e:
                    ms = None
                rows.append((label, name, ms))
        wk = torch.randn(hk, h, device="cuda")
        rows.append(("mea kernel", "triton", graph_ms(lambda: mea_decode_triton(q, k, v, wk, wk, lens.int()))))
        kv_bytes = 2 * B * hk * T * d * 2
        print(f"\nB {B} T {T} h {h} h' {hk} d {d}: GQA cache {kv_bytes / 1e6:.0f} MB, floor "
              f"{kv_bytes / 4.3e12 * 1e3:.3f} ms at 4.3 TB/s")
        for label, name, ms in rows:
            print(f"  {label:>16} {name:>10}: " + (f"{ms:.4f} ms" if ms else "not supported"))


if __name__ == "__main__":
    main()
