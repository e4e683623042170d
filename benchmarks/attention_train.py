r"""Training cost of one attention layer (forward + backward) per variant, bf16.

    python benchmarks/attention_train.py            # prints a table, saves results/train.json
    python benchmarks/attention_train.py --shapes main --norm-kernel --repeats 3 \
        --variants mha,mha+norm,mha+norm-tritonnorm,mea,mea-tritonnorm,mea-nonorm   # the head-norm comparison

Compares MHA, GQA and MEA (folded mixing: one SDPA call over h heads) with and without the head
norm, and MEA with a materialized per-token mixing pass (what the fold avoids). The head norm runs
in its PyTorch form, which torch.compile fuses on its own (the library's default); the
``-tritonnorm`` variants run the fused Triton kernel (``mea.ops.triton_norm``) instead. Each layer is
torch.compile'd unless --eager. Times with CUDA events after warm-up; with --repeats N the variants
are timed round-robin N times and the median is kept, so slow drift of the clock hits all alike.
``--norm-kernel`` also times the head norm alone at the main shape's attention output.
``--profile`` records each variant's GPU kernels (torch.profiler, ms per step) and prints them side by
side, to see where MEA's time above MHA's goes.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mea import ModelConfig  # noqa: E402
from mea.layers import norm as norm_mod  # noqa: E402
from mea.layers.attention import AttnInputs, MEAttention, build_attention  # noqa: E402
from mea.layers.rope import RotaryEmbedding, apply_rope  # noqa: E402
from mea.ops.attention import fold_mix_into_proj, mix_heads, sdpa  # noqa: E402
from timing import allow_compiled_variants, cuda_ms_per_step, pop_layer_flags, set_layer_flags  # noqa: E402

SHAPE_MAIN = dict(batch=8, seq=2048, d_model=2048, n_heads=16)
SHAPE_125M = dict(batch=16, seq=1024, d_model=768, n_heads=12)  # one layer of the 125m preset's training step
SHAPES = {"main": [SHAPE_MAIN], "125m": [SHAPE_125M], "all": [SHAPE_MAIN, SHAPE_125M]}


class MEAMaterialized(MEAttention):
    """MEA computing component heads and then mixing them token by token (the unfolded path)."""

    def forward(self, x, a):
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), a.cos, a.sin)
        kc = apply_rope(self._heads(self.k_proj(x), self.n_kv_heads), a.cos, a.sin)
        vc = self._heads(self.v_proj(x), self.n_kv_heads)
        k, v = mix_heads(kc, self.k_mix), mix_heads(vc, self.v_mix)
        return self._output(sdpa(q, k, v, causal=True), a)


class _ChunkedFold(torch.autograd.Function):
    """``fold_mix_into_proj`` whose mixing gradient, an (h' x h) result reduced over d x D (262k at
    the main shape), is computed as 256 slices side by side and then summed. As one GEMM with a
    16 x 16 output and that inner dimension it may keep only a few SMs busy; the profile says
    whether that is where MEA's time above MHA's goes."""

    @staticmethod
    def forward(ctx, weight, mix, head_dim):
        ctx.save_for_backward(weight, mix)
        return fold_mix_into_proj(weight, mix, head_dim)

    @staticmethod
    def backward(ctx, g):
        weight, mix = ctx.saved_tensors
        hk, h = mix.shape
        gg = g.reshape(h, -1)
        w = weight.reshape(hk, -1).to(gg.dtype)
        c = w.shape[1]
        n = 256 if c % 256 == 0 else 1
        g_weight = (mix.to(gg.dtype) @ gg).view(weight.shape).to(weight.dtype)
        g_mix = torch.bmm(w.view(hk, n, c // n).transpose(0, 1), gg.view(h, n, c // n).permute(1, 2, 0)).sum(0)
        return g_weight, g_mix.to(mix.dtype), None


class MEAChunkedFoldGrad(MEAttention):
    """MEA (training path) with the fold's mixing gradient in slices (``_ChunkedFold``)."""

    def _fold(self, weight, mix):
        return _ChunkedFold.apply(weight, mix, self.head_dim)


def check_chunked_fold() -> None:
    """The sliced gradient equals autograd's on the plain fold (fp32, a random layer) before it is timed."""
    w = torch.randn(4 * 8, 512, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6 * 8, 512, dtype=torch.float64)
    want = torch.autograd.grad(fold_mix_into_proj(w, m, 8), (w, m), g)
    got = torch.autograd.grad(_ChunkedFold.apply(w, m, 8), (w, m), g)
    for a_, b_ in zip(got, want):
        torch.testing.assert_close(a_, b_)


def variant_specs(h: int) -> dict[str, dict]:
    """Name -> ModelConfig overrides; ``triton_norm=True`` runs the head norm's Triton kernel, and the
    layer attributes of timing.LAYER_FLAGS are set on the layer: ``triton_fold`` (False: MEA's fold as
    matmuls, not the Triton kernels of mea.ops.triton_fold) and ``fold_norm_gain`` (False: the head
    norm's weight on the tokens, not folded into o_proj's)."""
    return {"mha": dict(attention="mha", head_norm=False),
            "mha+norm": dict(attention="mha", head_norm=True),
            "mha+norm-tritonnorm": dict(attention="mha", head_norm=True, triton_norm=True, fold_norm_gain=False),
            "gqa": dict(attention="gqa", n_kv_heads=h // 2, head_norm=False),
            "mea": dict(attention="mea", head_norm=True),
            "mea-tritonnorm": dict(attention="mea", head_norm=True, triton_norm=True, fold_norm_gain=False),
            "mea-nonorm": dict(attention="mea", head_norm=False),
            "mha+norm-unfoldedgain": dict(attention="mha", head_norm=True, fold_norm_gain=False),
            "mea-matmulfold": dict(attention="mea", head_norm=True, triton_fold=False),
            "mea-nonorm-matmulfold": dict(attention="mea", head_norm=False, triton_fold=False),
            "mea-unfoldedgain": dict(attention="mea", head_norm=True, fold_norm_gain=False),
            "mea-half": dict(attention="mea", n_kv_heads=h // 2, head_norm=True),
            # these three replace the matmul fold's pieces, so they keep it
            "mea-materialized": dict(attention="mea", head_norm=True, triton_fold=False),
            "mea-chunkedgrad": dict(attention="mea", head_norm=True, triton_fold=False),
            "mea-nonorm-chunkedgrad": dict(attention="mea", head_norm=False, triton_fold=False)}


def time_layer(layer, x, a, steps, warmup):
    g = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, a)
        y.backward(g)

    return cuda_ms_per_step(step, steps, warmup)


def kernel_profile(layer, x, a, steps: int = 10) -> dict[str, float]:
    """GPU time per step of each kernel (by name) in ``steps`` forward + backward steps."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, a)
        y.backward(g)

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


def head_norm_kernel_bench(B: int, T: int, h: int, d: int, copy_bw: float) -> dict:
    """The head norm alone on a bf16 (B, T, h, d) tensor: forward, and forward + backward (grads of x
    and the weight), as the Triton op, as torch.compile'd PyTorch and as eager PyTorch. Bytes: the
    forward reads x and writes y, the backward reads x and dy and writes dx (the weight is tiny)."""
    import triton.testing

    from mea.layers.norm import rms_norm

    x = torch.randn(B, T, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(h, d, device="cuda")).requires_grad_()
    dy = torch.randn_like(x)
    elt = x.element_size()
    rec = dict(shape=[B, T, h, d], dtype="bfloat16", fwd_bytes=2 * x.numel() * elt,
               fwd_bwd_bytes=5 * x.numel() * elt)
    rec["fwd_floor_ms"] = rec["fwd_bytes"] / copy_bw * 1e3
    rec["fwd_bwd_floor_ms"] = rec["fwd_bwd_bytes"] / copy_bw * 1e3
    impls = {"torch_compiled": torch.compile(rms_norm), "torch_eager": rms_norm}
    if norm_mod._triton_head_norm is not None:
        impls = {"triton": norm_mod._triton_head_norm, **impls}
    ref = None
    for name, fn in impls.items():
        y = fn(x, w, 1e-5)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        if ref is None:
            ref = (y.float(), gx.float(), gw.float())
        else:  # agreement with the first implementation, relative
            rec[f"{name}_rel_err_vs_{next(iter(impls))}"] = max(
                ((a.float() - b).norm() / b.norm()).item() for a, b in zip((y, gx, gw), ref))
        with torch.no_grad():
            rec[f"{name}_fwd_ms"] = triton.testing.do_bench(lambda: fn(x, w, 1e-5), warmup=25, rep=100,
                                                            return_mode="median")
        # autograd.grad, not backward: no accumulation into x.grad (an extra read and write).
        rec[f"{name}_fwd_bwd_ms"] = triton.testing.do_bench(
            lambda: torch.autograd.grad(fn(x, w, 1e-5), (x, w), dy), warmup=25, rep=100, return_mode="median")
        rec[f"{name}_fwd_tb_s"] = rec["fwd_bytes"] / (rec[f"{name}_fwd_ms"] * 1e-3) / 1e12
        rec[f"{name}_fwd_bwd_tb_s"] = rec["fwd_bwd_bytes"] / (rec[f"{name}_fwd_bwd_ms"] * 1e-3) / 1e12
    print(f"\nhead norm alone, bf16 {B}x{T}x{h}x{d}: floor fwd {rec['fwd_floor_ms']:.4f} ms, "
          f"fwd+bwd {rec['fwd_bwd_floor_ms']:.4f} ms (copy bandwidth {copy_bw / 1e12:.2f} TB/s)")
    print("| impl | fwd ms | fwd TB/s | fwd+bwd ms | fwd+bwd TB/s |\n|---|---|---|---|---|")
    for name in impls:
        print(f"| {name} | {rec[name + '_fwd_ms']:.4f} | {rec[name + '_fwd_tb_s']:.2f} | "
              f"{rec[name + '_fwd_bwd_ms']:.4f} | {rec[name + '_fwd_bwd_tb_s']:.2f} |")
    return rec


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (as benchmarks/decode.py)."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="time the variants round-robin this many times, keep medians")
    ap.add_argument("--shapes", choices=tuple(SHAPES), default="all")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(variant_specs(2)))
    ap.add_argument("--norm-kernel", action="store_true", help="also time the head norm alone (main shape)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also record each variant's kernels (torch.profiler)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import triton

    allow_compiled_variants()
    check_chunked_fold()
    has_triton_norm = norm_mod._triton_head_norm is not None
    if not has_triton_norm:
        print("note: the Triton head norm is unavailable here; '-tritonnorm' variants equal the others")
    copy_bw = copy_bandwidth()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "compile": not args.eager, "dtype": "bf16 autocast", "what": "one attention layer, forward + backward",
            "triton_head_norm": has_triton_norm and norm_mod.TRITON_HEAD_NORM, "repeats": args.repeats,
            "steps": args.steps, "warmup": args.warmup, "copy_tb_s": copy_bw / 1e12}
    records = []
    result = {"meta": meta, "records": records}

    def save():  # after each part, so a run cut short keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    if args.norm_kernel:
        sh = SHAPE_MAIN
        result["head_norm_kernel"] = head_norm_kernel_bench(sh["batch"], sh["seq"], sh["n_heads"],
                                                            sh["d_model"] // sh["n_heads"], copy_bw)
        save()
    for sh in SHAPES[args.shapes]:
        h = sh["n_heads"]
        specs = variant_specs(h)
        names = args.variants.split(",") if args.variants else list(specs)
        bad = [n for n in names if n not in specs]
        if bad:
            sys.exit(f"--variants: unknown {bad}; expected some of {', '.join(specs)}")
        rec = dict(sh, tokens=sh["batch"] * sh["seq"])
        x = torch.randn(sh["batch"], sh["seq"], sh["d_model"], device="cuda", requires_grad=True)
        steps = {}
        for name in names:
            kw = dict(specs[name])
            use_triton = kw.pop("triton_norm", False) and has_triton_norm
            flags = pop_layer_flags(kw)
            cfg = ModelConfig(vocab_size=256, d_model=sh["d_model"], n_layers=1, n_heads=h, max_seq_len=sh["seq"], **kw)
            torch.manual_seed(0)
            cls = (MEAMaterialized if name == "mea-materialized" else
                   MEAChunkedFoldGrad if name.endswith("chunkedgrad") else None)
            layer = (cls(cfg, 0) if cls else build_attention(cfg, 0)).cuda()
            set_layer_flags(layer, flags)
            fn = layer if args.eager else torch.compile(layer)
            pos = torch.arange(sh["seq"], device="cuda")[None].expand(sh["batch"], -1)
            cos, sin = RotaryEmbedding(cfg.head_dim).cuda()(pos, torch.bfloat16)
            # Compile and run it once here: a variant that fails is reported and skipped, not fatal.
            saved_flag = norm_mod.TRITON_HEAD_NORM
            try:
                norm_mod.TRITON_HEAD_NORM = use_triton
                time_layer(fn, x, AttnInputs(cos=cos, sin=sin), 1, 1)
            except Exception as e:  # noqa: BLE001
                print(f"{name}: failed ({type(e).__name__}: {str(e)[:200]}); skipped", flush=True)
                continue
            finally:
                norm_mod.TRITON_HEAD_NORM = saved_flag
            steps[name] = (fn, AttnInputs(cos=cos, sin=sin), use_triton)
        names = [n for n in names if n in steps]
        times = {n: [] for n in names}
        saved_flag = norm_mod.TRITON_HEAD_NORM
        try:
            for _ in range(max(1, args.repeats)):
                for name in names:
                    fn, a, use_triton = steps[name]
                    # Compiled code guards on this flag: set it the way this variant was compiled.
                    norm_mod.TRITON_HEAD_NORM = use_triton
                    times[name].append(time_layer(fn, x, a, args.steps, args.warmup))
        finally:
            norm_mod.TRITON_HEAD_NORM = saved_flag
        for name in names:
            ms = statistics.median(times[name])
            rec[f"{name}_ms"] = ms
            if len(times[name]) > 1:
                rec[f"{name}_ms_all"] = times[name]
            rec.setdefault("tokens_per_s", {})[name] = rec["tokens"] / (ms / 1e3)
        tps = rec["tokens_per_s"]
        for a_, b_, key in (("mea", "mha", "mea_vs_mha_tokens_per_s"),
                            ("mea", "mha+norm", "mea_vs_mha_norm_tokens_per_s"),
                            ("mea-tritonnorm", "mha", "mea_tritonnorm_vs_mha_tokens_per_s"),
                            ("mea-tritonnorm", "mea", "mea_triton_vs_torch_norm_tokens_per_s")):
            if a_ in tps and b_ in tps:
                rec[key] = tps[a_] / tps[b_]
        records.append(rec)
        save()
        if args.profile:  # after the timings are saved: a profiler failure loses nothing else
            rec["profile_ms_per_step"] = {}
            try:
                for name in names:
                    fn, a, use_triton = steps[name]
                    norm_mod.TRITON_HEAD_NORM = use_triton
                    rec["profile_ms_per_step"][name] = kernel_profile(fn, x, a)
            finally:
                norm_mod.TRITON_HEAD_NORM = saved_flag
            save()
            print_profiles(rec["profile_ms_per_step"])
        del steps, x
        torch.cuda.empty_cache()
        print(f"B={sh['batch']} T={sh['seq']} D={sh['d_model']} h={h}: " +
              "  ".join(f"{n} {rec[n + '_ms']:.3f}ms" for n in names) +
              (f"  | mea/mha tokens/s {rec['mea_vs_mha_tokens_per_s']:.3f}" if "mea_vs_mha_tokens_per_s" in rec else ""),
              flush=True)
    # Every variant that ran at some shape: one skipped at one shape (it failed there) shows "-" there.
    names = list(dict.fromkeys(n for r in records for n in r.get("tokens_per_s", {})))
    print("\n| shape | " + " | ".join(f"{n} ms" for n in names) + " | mea vs mha |")
    print("|---|" + "---|" * (len(names) + 1))
    for r in records:
        ratio = f"{r['mea_vs_mha_tokens_per_s']:.3f}" if "mea_vs_mha_tokens_per_s" in r else "-"
        print(f"| B{r['batch']} T{r['seq']} D{r['d_model']} h{r['n_heads']} | " +
              " | ".join(f"{r[n + '_ms']:.3f}" if n + "_ms" in r else "-" for n in names) + f" | {ratio} |")
    save()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
