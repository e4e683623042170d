"""Training cost of one attention layer (forward + backward) per variant, bf16.

    python benchmarks/attention_train.py            # prints a table, saves results/train.json

Compares MHA, GQA and MEA (folded mixing: one SDPA call over h heads) with and without the head
norm, and MEA with a materialized per-token mixing pass (what the fold avoids). Each layer is
torch.compile'd unless --eager. Times with CUDA events after warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mea import ModelConfig  # noqa: E402
from mea.layers.attention import AttnInputs, MEAttention, build_attention  # noqa: E402
from mea.layers.rope import RotaryEmbedding, apply_rope  # noqa: E402
from mea.ops.attention import mix_heads, sdpa  # noqa: E402
from timing import cuda_ms_per_step  # noqa: E402


class MEAMaterialized(MEAttention):
    """MEA computing component heads and then mixing them token by token (the unfolded path)."""

    def forward(self, x, a):
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), a.cos, a.sin)
        kc = apply_rope(self._heads(self.k_proj(x), self.n_kv_heads), a.cos, a.sin)
        vc = self._heads(self.v_proj(x), self.n_kv_heads)
        k, v = mix_heads(kc, self.k_mix), mix_heads(vc, self.v_mix)
        return self._output(sdpa(q, k, v, causal=True))


def time_layer(layer, x, a, steps, warmup):
    g = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, a)
        y.backward(g)

    return cuda_ms_per_step(step, steps, warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    shapes = [dict(batch=8, seq=2048, d_model=2048, n_heads=16), dict(batch=16, seq=1024, d_model=768, n_heads=12)]
    records = []
    for sh in shapes:
        h = sh["n_heads"]
        variants = {"mha": dict(attention="mha", head_norm=False), "mha+norm": dict(attention="mha", head_norm=True),
                    "gqa": dict(attention="gqa", n_kv_heads=h // 2, head_norm=False),
                    "mea": dict(attention="mea", head_norm=True), "mea-nonorm": dict(attention="mea", head_norm=False),
                    "mea-half": dict(attention="mea", n_kv_heads=h // 2, head_norm=True),
                    "mea-materialized": dict(attention="mea", head_norm=True)}
        rec = dict(sh, tokens=sh["batch"] * sh["seq"])
        for name, kw in variants.items():
            cfg = ModelConfig(vocab_size=256, d_model=sh["d_model"], n_layers=1, n_heads=h, max_seq_len=sh["seq"], **kw)
            torch.manual_seed(0)
            layer = (MEAMaterialized(cfg, 0) if name == "mea-materialized" else build_attention(cfg, 0)).cuda()
            fn = layer if args.eager else torch.compile(layer)
            x = torch.randn(sh["batch"], sh["seq"], sh["d_model"], device="cuda", requires_grad=True)
            pos = torch.arange(sh["seq"], device="cuda")[None].expand(sh["batch"], -1)
            cos, sin = RotaryEmbedding(cfg.head_dim).cuda()(pos, torch.bfloat16)
            ms = time_layer(fn, x, AttnInputs(cos=cos, sin=sin), args.steps, args.warmup)
            rec[f"{name}_ms"] = ms
            rec.setdefault("tokens_per_s", {})[name] = rec["tokens"] / (ms / 1e3)
            del layer, fn, x
            torch.cuda.empty_cache()
        rec["mea_vs_mha_tokens_per_s"] = rec["tokens_per_s"]["mea"] / rec["tokens_per_s"]["mha"]
        rec["mea_vs_mha_norm_tokens_per_s"] = rec["tokens_per_s"]["mea"] / rec["tokens_per_s"]["mha+norm"]
        records.append(rec)
        print(f"B={sh['batch']} T={sh['seq']} D={sh['d_model']} h={h}: " +
              "  ".join(f"{n} {rec[n + '_ms']:.2f}ms" for n in variants) +
              f"  | mea/mha tokens/s {rec['mea_vs_mha_tokens_per_s']:.3f}", flush=True)
    print("\n| shape | mha ms | mha+norm ms | gqa ms | mea ms | mea-nonorm ms | mea h/2 ms | mea materialized ms | mea vs mha |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| B{r['batch']} T{r['seq']} D{r['d_model']} h{r['n_heads']} | {r['mha_ms']:.2f} | {r['mha+norm_ms']:.2f} | "
              f"{r['gqa_ms']:.2f} | {r['mea_ms']:.2f} | {r['mea-nonorm_ms']:.2f} | {r['mea-half_ms']:.2f} | "
              f"{r['mea-materialized_ms']:.2f} | {r['mea_vs_mha_tokens_per_s']:.3f} |")
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "compile": not args.eager, "dtype": "bf16 autocast", "what": "one attention layer, forward + backward"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
