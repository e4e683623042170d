"""The training benchmarks run (their CPU smoke path) and name variants the way the GPU runs will."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import their shared helpers as `timing`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_names():
    timing = load("timing")
    assert timing.parse_variants("mha, mea(h/2)+knock(v,mlp),gqa(4)@torch") == [
        "mha", "mea(h/2)+knock(v,mlp)", "gqa(4)@torch"]
    assert timing.variant_fields("mea(h/2)+knock(v,mlp)@torch", 12) == dict(
        attention="mea", n_kv_heads=6, knock="v", knock_form="mlp", backend="torch")
    assert timing.variant_fields("mha+norm", 4) == dict(attention="mha", head_norm=True)
    assert timing.variant_fields("diff_v2(2)+nonorm", 4) == dict(attention="diff_v2", n_kv_heads=2, head_norm=False)
    with pytest.raises(ValueError, match="^variant:"):
        timing.variant_fields("mha+knocks(v)", 4)
    assert [timing.base_variant(v) for v in ("mha+knock(qkv)", "mea(h/2)+knock(v,mlp)@torch", "diff_v2",
                                              "diff_v2(h/2)", "diff_v2(h/2)+knock(v)", "mea+nonorm")] == [
        "mha", "mea(h/2)@torch", "mha", "gqa(h/2)", "diff_v2(h/2)", "mea+nonorm"]
    cfg = timing.variant_config("125m", "gqa(h/4)+knock(kv)")
    assert (cfg.attention, cfg.n_kv_heads, cfg.knock, cfg.knock_form) == ("gqa", 3, "kv", "linear")


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "t.json"
    variants = ["mha", "diff_v2(h/2)", "gqa(h/2)", "mha+knock(v)", "mea(h/2)+knock(v,mlp)"]
    load("train_throughput").main(["--smoke", "--variants", ",".join(variants), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["preset"] == "tiny" and result["meta"]["loss"] == "model.loss"
    recs = {r["variant"]: r for r in result["records"]}
    assert list(recs) == variants
    for r in recs.values():
        assert "mfu" in r and r["tokens_per_s"] > 0 and r["ratio_to_mha"] is not None
    assert recs["diff_v2(h/2)"]["base"] == "gqa(h/2)" and recs["diff_v2(h/2)"]["ratio_to_base"] is not None
    assert recs["mha+knock(v)"]["ratio_to_base"] is not None
    assert recs["mea(h/2)+knock(v,mlp)"]["ratio_to_base"] is None  # its base did not run
    assert recs["mea(h/2)+knock(v,mlp)"]["knock_form"] == "mlp"


def test_attention_train_smoke(tmp_path):
    out = tmp_path / "a.json"
    load("attention_train").main(["--smoke", "--variants", "mha,diff,diff_v2,mea(h/2)+knock(qkv,mlp)", "--out",
                                  str(out)])
    (rec,) = json.loads(out.read_text())["records"]
    assert list(rec["variants"]) == ["mha", "diff", "diff_v2", "mea(h/2)+knock(qkv,mlp)"]
    assert rec["variants"]["diff_v2"]["base"] == "mha" and rec["variants"]["diff_v2"]["vs_base"] > 0
