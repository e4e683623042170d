"""benchmarks/scaling.py without GPUs: the plan of torchrun jobs, the efficiency table, and the whole
script on gloo CPU ranks (a check of the script, not a measurement)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_skips_counts_above_the_machine_and_efficiency_is_per_gpu_over_one_gpu():
    S = scaling()
    todo, skipped = S.plan(["350m:fsdp", "125m:ddp"], ["mha", "mea"], [1, 2, 4, 8], available=4)
    assert len(todo) == 12 and len(skipped) == 4 and {p["gpus"] for p in skipped} == {8}
    with pytest.raises(SystemExit, match="350m:zero"):
        S.plan(["350m:zero"], ["mha"], [1], 1)
    points = [{"preset": "125m", "parallel": "ddp", "variant": "mea", "gpus": g, "tokens_per_s": t}
              for g, t in ((1, 100.0), (2, 190.0), (4, 360.0))]
    points.append({"preset": "350m", "parallel": "fsdp", "variant": "mha", "gpus": 2, "tokens_per_s": 50.0})
    recs = S.summarize(points)
    assert all(tuple(r) == S.RECORD_FIELDS for r in recs)
    by = {(r["preset"], r["gpus"]): r for r in recs}
    assert by["125m", 4]["tokens_per_s_per_gpu"] == 90.0 and by["125m", 4]["efficiency"] == pytest.approx(0.9)
    assert by["125m", 1]["efficiency"] == 1.0 and by["350m", 2]["efficiency"] is None  # no one-GPU point


@pytest.mark.slow
def test_the_script_end_to_end_on_cpu_ranks(tmp_path):
    S = scaling()
    out = tmp_path / "scaling.json"
    S.main(["--device", "cpu", "--cpu_ranks", "2", "--configs", "tiny:fsdp", "--variants", "mha", "--gpus", "1,2,4",
            "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--no_compile", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [(r["gpus"], r["parallel"]) for r in res["records"]] == [(1, "fsdp"), (2, "fsdp")]
    assert all(tuple(r) == S.RECORD_FIELDS and r["tokens_per_s"] > 0 for r in res["records"])
    assert res["meta"]["skipped"] == [{"preset": "tiny", "parallel": "fsdp", "variant": "mha", "gpus": 4}]
    save = res["meta"]["checkpoint_save"]
    assert len(save) == 1 and save[0]["gpus"] == 2 and save[0]["sharded_s"] > 0 and save[0]["full_s"] > 0
    assert not res["meta"]["failed"]
