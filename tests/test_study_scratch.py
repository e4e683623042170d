"""mea.study.scratch on fabricated run directories: summary.json holds what the runs hold, the paired tests
and the three answers follow the numbers (never fixed ones), the pilot's choices are declared, the plan fits."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mea.runtime import config_path

from mea.models.config import ModelConfig
from mea.study import scratch
from mea.train.sweep import parse_variant, read_choices, run_name

MAIN_TOKENS = 15_700 * 32 * 512
PILOT_TOKENS = 400 * 32 * 512


def _run(root: Path, sweep: str, spec: str, lr: float, seed: int, final, tokens: int, split: str = "val",
         preset: str = "small", losses=None, logits=None, diverged_at=None) -> Path:
    """A run directory as `mea sweep` leaves it: config.yaml (the resolved model), status.json, metrics.jsonl
    with a validation curve falling to ``final``; ``final`` None: the run diverged at step ``diverged_at``."""
    kw = parse_variant(spec)
    model = ModelConfig.from_preset(preset, **{**kw.pop("model", {}), **kw})
    d = root / sweep / run_name(spec, lr, seed)
    d.mkdir(parents=True)
    steps = tokens // (32 * 512)
    conf = {"preset": preset, "model": model.to_dict(), "data": {"corpus": "mix", "seq_len": 512, "eval_split": split},
            "train": {"lr": lr, "seed": seed, "max_steps": steps, "warmup_steps": 40, "batch_size": 32}}
    (d / "config.yaml").write_text(yaml.safe_dump(conf))
    recs = [{"step": steps * k // 4, "tokens": tokens * k // 4, "val_loss": (final or 9.0) + 1.0 * (4 - k) / 4,
             "max_attn_logit": (logits or 5.0) * k / 4} for k in (1, 2, 3, 4)]
    for step, loss in losses or []:
        recs.append({"step": step, "tokens": step * 32 * 512, "loss": loss})
    if final is None:
        recs = [r for r in recs if r["step"] < diverged_at]
        status = {"status": "diverged", "step": diverged_at, "tokens": diverged_at * 32 * 512, "val_loss": None}
    else:
        status = {"status": "finished", "step": steps, "tokens": tokens, "val_loss": final}
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(recs, key=lambda r: r["step"])))
    (d / "status.json").write_text(json.dumps(status))
    return d


def _study(root: Path, mea_half=(3.50, 3.52, 3.51), gqa_half=(3.60, 3.61, 3.63), mea_h=(3.40, 3.41, 3.42),
           mha_norm=(3.405, 3.415, 3.41), mha=(3.50, 3.52, 3.51), mea_diverges=0.512, mha_diverges=0.128):
    lr = {"mha": 1e-3, "mha:head_norm=true": 2e-3, "gqa:n_kv_heads=4": 1e-3, "mea": 2e-3, "mea:n_kv_heads=4": 2e-3,
          "mea:n_kv_heads=2": 2e-3, "gqa:n_kv_heads=2": 1e-3}
    for spec, losses in (("mea:n_kv_heads=4", mea_half), ("gqa:n_kv_heads=4", gqa_half), ("mea", mea_h),
                         ("mha:head_norm=true", mha_norm), ("mha", mha)):
        for seed, loss in enumerate(losses):
            _run(root, f"main_s{seed}", spec, lr[spec], seed, loss, MAIN_TOKENS)
    for spec, loss in (("mea:n_kv_heads=2", 3.58), ("gqa:n_kv_heads=2", 3.70)):
        _run(root, "main_one", spec, lr[spec], 0, loss, MAIN_TOKENS)
    for mult, dl in ((0.5, 0.03), (2.0, 0.05)):  # the chosen rate's neighbours, one seed
        _run(root, "main_check", "mha", lr["mha"] * mult, 0, mha[0] + dl, MAIN_TOKENS)
    # stability grid: x2 rates from 1e-3 until both seeds diverge
    for spec, top in (("mha", mha_diverges), ("mea", mea_diverges), ("mea:n_kv_heads=4", 0.256)):
        rate = 1e-3
        while rate <= top * 1.0001:
            for seed in (0, 1):
                if rate >= top * 0.9999:
                    _run(root, "stability", spec, rate, seed, None, PILOT_TOKENS, diverged_at=120)
                else:
                    spike = [(s, 6.0) for s in range(41, 60)] + [(60, 7.0), (61, 6.0), (62, 7.2), (63, 6.0)]
                    _run(root, "stability", spec, rate, seed, 5.0 + abs(math.log2(rate / 4e-3)) * 0.05, PILOT_TOKENS,
                         losses=[(s, 11.0 - s * 0.1) for s in range(1, 41)] + spike, logits=10 * rate / 1e-3)
            rate *= 2
    # pilot runs are measured on select: never in summary.json
    _run(root, "pilot", "mha", 1e-3, 0, 4.0, PILOT_TOKENS, split="select")


def test_t_distribution_and_paired_test():
    for t, df in ((12.706, 1), (4.303, 2), (3.182, 3), (2.776, 4), (2.571, 5), (2.228, 10), (2.086, 20)):
        assert scratch.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4), (t, df)
    assert scratch.t_two_sided_p(0.0, 3) == pytest.approx(1.0)
    assert scratch.t_two_sided_p(1.0, 1) == pytest.approx(0.5)
    c = scratch.paired({0: 3.0, 1: 3.1, 2: 3.2}, {0: 3.1, 1: 3.25, 2: 3.3, 3: 9.0})
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2] and c["df"] == 2
    assert c["mean_diff"] == pytest.approx(-0.1166667) and c["spread_a"] == pytest.approx(0.2)
    assert c["spread_b"] == pytest.approx(5.9) and c["n_b"] == 4
    assert c["t"] == pytest.approx(-0.1166667 / (0.0288675 / math.sqrt(3)), rel=1e-4)
    assert scratch.paired({0: 3.0}, {0: 3.1})["p"] is None
    assert scratch.lower_beyond_spread(scratch.paired({0: 3.0}, {0: 3.1}))[0] == "unresolved"


def test_loss_spikes_count_excursions_after_warmup():
    losses = [(1, 10.0), (2, 12.0), (3, 6.0), (4, 6.2), (5, 7.0), (6, 7.1), (7, 6.1), (8, 6.8), (9, None), (10, 5.9)]
    assert scratch.spikes(losses, after_step=2) == (2, pytest.approx(1.1))
    assert scratch.spikes(losses, after_step=10) == (0, None)


def test_labels_name_the_study_variants():
    assert [scratch.label(*a) for a in (("mha", 8, 8, False), ("mha", 8, 8, True), ("gqa", 8, 4, False),
                                        ("mea", 8, 8, True), ("mea", 12, 6, True), ("mea", 8, 2, False),
                                        ("diff", 8, 8, True), ("diff", 8, 8, False))] == \
        ["mha", "mha + head norm", "gqa(h/2)", "mea(h)", "mea(h/2)", "mea(h/4), no norm", "diff", "diff, no norm"]
    for lab, spec in scratch.VARIANTS.items():
        kw = parse_variant(spec)
        cfg = ModelConfig.from_preset("small", **{**kw.pop("model", {}), **kw})
        assert scratch.label(cfg.attention, cfg.n_heads, cfg.n_kv_heads, bool(cfg.head_norm)) == lab


def test_report_summary_answers_and_plots(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "docs"
    _study(runs)
    scratch.report(runs=str(runs), out=str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"records"}
    recs = summary["records"]
    assert all(list(r) == scratch.FIELDS and r["split"] == "validation" for r in recs)
    stab = json.loads((out / "stability.json").read_text())
    n_main = 15 + 2 + 2
    assert len(recs) == n_main + sum(r["status"] == "finished" for r in stab)  # no pilot run, no diverged run
    mea_half = [r for r in recs if r["variant"] == "mea" and r["n_kv_heads"] == 4 and r["tokens"] == MAIN_TOKENS]
    assert sorted(r["final_val_loss"] for r in mea_half) == [3.50, 3.51, 3.52]
    assert mea_half[0]["non_embedding_params"] == 23_606_272 and mea_half[0]["head_norm"] is True
    assert json.loads((out / "selection.json").read_text())[0]["split"] == "selection"

    ans = scratch.answers(summary, stab)
    assert [a["answer"] for a in ans] == ["yes", "no", "yes"]
    assert "A - B = -0.1033" in ans[0]["numbers"] and "3 matched seeds" in ans[0]["numbers"]
    assert "The norm is the whole effect" in ans[1]["numbers"]
    assert "seed 0: mea(h) 0.256 > mha 0.064" in ans[2]["numbers"]
    text = (out / "report.md").read_text()
    assert "**Does MEA(h/2) reach a lower validation loss than GQA(h/2) at the same cache" in text
    assert "| mea(h/2) - gqa(h/2) | 3 | -0.1033 |" in text
    assert "| mea(h/4) - gqa(h/4) | 1 | -0.1200 | - | - | - | - |" in text  # one seed each: no test
    assert "| mha | 1.00e-03 | 3 | 3.5000, 3.5200, 3.5100 | 3.5100 | 0.0200 | 5.00e-04: 3.5300, 2.00e-03: 3.5500 |" in text
    assert "| mea(h) | s0: 0.256, s1: 0.256 |" in text
    for png in ("curves.png", "loss_vs_lr.png", "logits.png"):
        assert (out / png).stat().st_size > 1000
    spiky = [r for r in stab if r["status"] == "finished"]
    assert all(r["loss_spikes"] == 2 and r["max_loss_rise"] == pytest.approx(1.2) for r in spiky)


@pytest.mark.parametrize("case, want", [
    (dict(mea_half=(3.59, 3.62, 3.60)), ["no", "no", "yes"]),  # within the spread
    (dict(mea_half=(3.50, 3.53, 3.50), gqa_half=(3.56, 3.53, 3.56)), ["unresolved", "no", "yes"]),  # p >= 0.05
    (dict(mea_h=(3.30, 3.31, 3.32)), ["yes", "yes", "yes"]),  # the mixing beats the norm
    (dict(mha_norm=(3.505, 3.515, 3.51)), ["yes", "yes", "yes"]),
    (dict(mea_diverges=0.128), ["yes", "no", "no"]),  # same largest stable rate
    (dict(mea_diverges=0.064), ["yes", "no", "no"]),
])
def test_answers_follow_the_numbers(tmp_path, case, want):
    _study(tmp_path / "runs", **case)
    scratch.report(runs=str(tmp_path / "runs"), out=str(tmp_path / "docs"))
    summary = json.loads((tmp_path / "docs" / "summary.json").read_text())
    stab = json.loads((tmp_path / "docs" / "stability.json").read_text())
    assert [a["answer"] for a in scratch.answers(summary, stab)] == want


def test_answers_are_unresolved_without_the_runs():
    ans = scratch.answers({"records": []}, [])
    assert [a["answer"] for a in ans] == ["unresolved"] * 3
    assert "no main runs of both yet" in ans[0]["numbers"] and "no stability runs yet" in ans[2]["numbers"]


def _pilot(root: Path, losses: dict) -> Path:
    """A pilot sweep: results.csv as `mea sweep` writes it, and its runs (measured on select)."""
    sw = root / "pilot"
    rows = []
    for (spec, lr), loss in losses.items():
        d = _run(root, "pilot", spec, lr, 0, loss, PILOT_TOKENS, split="select")
        rows.append({"variant": spec, "lr": lr, "seed": 0, "status": "finished", "final_val_loss": loss,
                     "best_val_loss": loss, "steps": 400, "tokens": PILOT_TOKENS, "run_dir": str(d)})
    with open(sw / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return sw


def test_declare_picks_the_pilot_argmin_and_refuses_edges(tmp_path):
    grid = {}
    for lr, base in ((5e-4, 5.3), (1e-3, 5.1), (2e-3, 5.2)):
        grid["mha", lr] = base
        grid["gqa:n_kv_heads=4", lr] = base + 0.05
        for init, extra in ((0.03, 0.02), (0.1, 0.0), (0.3, 0.04)):
            grid[f"mea:n_kv_heads=4,head_norm_init={init}", lr] = base - 0.1 + extra
    pilot = _pilot(tmp_path / "runs", grid)
    out = tmp_path / "declared.yaml"
    got = scratch.declare(pilot=str(pilot), out=str(out))
    assert got["mha"] == {"lr": 1e-3, "model": {}, "select_loss": 5.1}
    assert got["mea:n_kv_heads=4"]["lr"] == 1e-3 and got["mea:n_kv_heads=4"]["model"] == {"head_norm_init": 0.1}
    n_small, n_big = 23_606_272, ModelConfig.from_preset("125m", attention="mea", n_kv_heads=6).num_params(True)
    assert got["mea:n_kv_heads=6"]["lr"] == pytest.approx(1e-3 * (n_big / n_small) ** -0.34, rel=1e-3)
    assert got["gqa:n_kv_heads=6"]["model"] == {}
    assert read_choices(out) == got  # the file the configs read
    # the best rate at the grid's edge is not declared unless asked
    grid["mha", 5e-4] = 5.0
    (tmp_path / "runs2").mkdir()
    pilot = _pilot(tmp_path / "runs2", grid)
    with pytest.raises(ValueError, match="^declare: mha: the best rate 5.00e-04 is at the grid's low edge"):
        scratch.declare(pilot=str(pilot), out=str(tmp_path / "d2.yaml"))
    assert scratch.declare(pilot=str(pilot), out=str(tmp_path / "d2.yaml"), allow_edge=True)["mha"]["lr"] == 5e-4
    assert scratch.base_spec("mea:n_kv_heads=4,head_norm_init=0.1") == ("mea:n_kv_heads=4", 0.1)
    assert scratch.base_spec("mha:head_norm=true,head_norm_init=0.03") == ("mha:head_norm=true", 0.03)
    assert scratch.base_spec("mha") == ("mha", None)


def test_the_study_configs_and_the_plan():
    """Every config of configs/study/scratch parses as a sweep, covers the design, and each block fits
    30 minutes at the measured throughput."""
    from mea.train.sweep import sweep  # noqa: F401  (the configs name its arguments)

    root = Path(scratch.CONFIGS)
    confs = {f.stem: yaml.safe_load(f.read_text()) for f in root.glob("*.yaml")}
    pilot = confs["pilot"]
    assert pilot["data"]["eval_split"] == "select" and pilot["data"]["corpus"] == "mix"
    assert {scratch.base_spec(v)[0] for v in pilot["variants"]} == set(scratch.VARIANTS.values())
    mains = [c for k, c in confs.items() if k.startswith("main_b")]
    runs = [(p["variant"], p.get("lr_mult", 1.0), s) for c in mains for p in c["points"] for s in p["seeds"]]
    assert len(runs) == len(set(runs)) == 25
    for spec in ("mha", "gqa:n_kv_heads=4", "mea:n_kv_heads=4", "mea", "mha:head_norm=true"):
        assert sorted(s for v, m, s in runs if v == spec and m == 1.0) == [0, 1, 2], spec
    for spec in ("gqa:n_kv_heads=2", "mea:n_kv_heads=2", "diff", "diff:head_norm=false"):
        assert [s for v, m, s in runs if v == spec] == [0], spec
    for spec in ("mha", "gqa:n_kv_heads=4", "mea:n_kv_heads=4"):
        assert sorted(m for v, m, s in runs if v == spec and m != 1.0) == [0.5, 2.0]
    for c in mains:
        tr = c["train"]
        assert c["data"]["eval_split"] == "val"
        # read through runtime.config_path: the shipped file that `declare` writes by default
        assert c["choices"] == "configs/study/scratch/declared.yaml"
        assert config_path(c["choices"]) == Path(scratch.CHOICES) or not Path(scratch.CHOICES).exists()
        assert tr["max_steps"] * tr["batch_size"] * c["data"]["seq_len"] >= 10 * 25_703_936  # the largest variant
        assert tr["max_steps"] % tr["eval_every"] == 0
    assert confs["stability"]["until_diverged"] and confs["stability"]["seeds"] == [0, 1]
    lrs = confs["stability"]["lrs"]
    assert all(b / a == pytest.approx(2.0) for a, b in zip(lrs, lrs[1:]))
    rows = scratch.plan(configs=str(root))
    assert {r["config"] for r in rows} == set(confs) - {"declared"}
    assert all(r["fits"] for r in rows) and [r["config"] for r in rows][:2] == ["pilot", "stability"]
    assert next(r for r in rows if r["config"] == "pilot")["runs"] == 100


def test_study_scratch_is_a_cli_command(tmp_path):
    _study(tmp_path / "runs")
    res = subprocess.run([sys.executable, "-m", "mea.cli", "study-scratch", "report", "--runs", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "The three questions" in res.stdout and (tmp_path / "out" / "summary.json").is_file()
    res = subprocess.run([sys.executable, "-m", "mea.cli", "study-scratch", "plan", "--tokens_per_s", "{small: 780000}"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    assert "small 780,000" in res.stdout and "| main_b01 | 2 |" in res.stdout
