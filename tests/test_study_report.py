"""mea.study.report on fabricated sweep directories: the tables say what the runs say."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mea.study import report


def _sweep(root: Path, name: str, runs: dict) -> None:
    """runs: (variant, lr, seed) -> final loss, or None for a diverged run. Curves fall linearly to it."""
    lines = ["variant,lr,seed,status,final_val_loss,best_val_loss,steps,tokens,run_dir"]
    for (variant, lr, seed), final in runs.items():
        d = root / name / variant.replace(":", "_").replace("=", "-") / f"lr{lr:.2e}_s{seed}"
        d.mkdir(parents=True)
        status = "finished" if final is not None else "diverged"
        recs = [{"step": s, "tokens": s * 100, "loss": 8.0, "val_loss": 8.0 - (8.0 - (final or 9.0)) * s / 4}
                for s in (1, 2, 3, 4)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "status.json").write_text(json.dumps({"status": status, "val_loss": final}))
        (d / "config.yaml").write_text("preset: tiny\n")
        lines.append(f"{variant},{lr},{seed},{status},{final if final is not None else ''},{final or ''},4,400,"
                     f"runs/study/{name}/{d.parent.name}/{d.name}")
    (root / name / "results.csv").write_text("\n".join(lines) + "\n")


def test_report_tables_and_plots(tmp_path):
    runs = tmp_path / "runs"
    _sweep(runs, "lr_sweep", {("mha", 1e-3, 0): 5.0, ("mha", 3e-3, 0): 4.8, ("mha", 1e-2, 0): None,
                              ("mea", 1e-3, 0): 4.9, ("mea", 3e-3, 0): 4.7, ("mea", 1e-2, 0): 4.75})
    _sweep(runs, "convergence", {("mha", 3e-3, 1): 4.82, ("mea", 3e-3, 1): 4.72})
    # seed 0 of the convergence sweep is a link into the learning-rate sweep, as `lrs_from` makes it
    for v in ("mha", "mea"):
        (runs / "convergence" / v / "lr3.00e-03_s0").symlink_to(runs / "lr_sweep" / v / "lr3.00e-03_s0")
    with open(runs / "convergence" / "results.csv", "a") as f:
        f.write("mha,0.003,0,finished,4.8,4.8,4,400,runs/study/convergence/mha/lr3.00e-03_s0\n")
        f.write("mea,0.003,0,finished,4.7,4.7,4,400,runs/study/convergence/mea/lr3.00e-03_s0\n")
    _sweep(runs, "head_norm_seeds", {("mha", 1e-3, 0): 4.9, ("mha", 1e-3, 1): 4.92,
                                     ("mea:head_norm_init=0.1", 1e-3, 0): 4.88, ("mea:head_norm_init=0.1", 1e-3, 1): 4.86})
    # a compression table with one healing run
    comp = runs / "compress_own"
    (comp / "kv4-svd-healed").mkdir(parents=True)
    (comp / "kv4-svd-healed" / "metrics.jsonl").write_text('{"step": 1, "tokens": 100, "loss": 5.0}\n'
                                                          '{"step": 2, "tokens": 200, "loss": 4.9}\n')
    settings = {"model": "runs/study/mha_base", "layers": "all", "val_windows": [128, 512], "heal_steps": 8,
                "heal_batch_size": 32, "heal_seq_len": 512, "heal_lr": 1e-4, "limit": 1000}
    (comp / "results.json").write_text(json.dumps({"settings": settings, "rows": [{"model": "original"}]}))
    (comp / "table.md").write_text("| model |\n|---|\n| original |\n")
    out = tmp_path / "docs"
    report.main(runs=str(runs), out=str(out), tolerance=0.1)
    text = (out / "tables.md").read_text()
    assert "## Experiment 4a: our MHA model at h' = h/2" in text and "8 steps x 32 x 512 = 131,072 tokens" in text
    assert (out / "metrics" / "compress_own" / "kv4-svd-healed" / "metrics.jsonl").is_file()
    assert (out / "compress_own.json").is_file() and "Experiment 4c: SmolLM2-135M, middle layers only: not run yet" in text
    assert "| mha | 5.000 | **4.800** | diverged (step 4) | 3.0e-03 | 3.0e-03 | 3.0e-03 |" in text
    assert "| mea | 4.900 | **4.700** | 4.750 | 3.0e-03 | 1.0e-02 | 1.0e-02 |" in text
    assert "| mha | 3.0e-03 | 2 | 4.8100 | 0.0200 | 4.8000, 4.8200 |" in text
    assert "| mea | 3.0e-03 | 2 | 4.7100 | 0.0200 | 4.7000, 4.7200 |" in text
    # mea's mean curve reaches mha's final 4.81 before the end of its budget
    row = next(line for line in text.splitlines() if line.startswith("| mea |") and "M |" in line)
    assert float(row.split("|")[3]) < 1.0
    assert "## Follow-up: the head norm started at 0.1, three seeds at lr 1e-3" in text
    assert "| mea:head_norm_init=0.1 | 1.0e-03 | 2 | 4.8700 | 0.0200 | 4.8800, 4.8600 |" in text
    assert "Experiment 3: not run yet" in text and "Experiment 5: not run yet" in text
    for png in ("loss_vs_lr.png", "convergence.png", "healing.png"):
        assert (out / png).stat().st_size > 1000
    # compact per-run metrics are copied, links are not duplicated
    assert (out / "metrics" / "lr_sweep" / "mha" / "lr3.00e-03_s0" / "metrics.jsonl").is_file()
    assert not (out / "metrics" / "convergence" / "mha" / "lr3.00e-03_s0").exists()
    assert (out / "metrics" / "convergence" / "mha" / "lr3.00e-03_s1" / "metrics.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_sweep"]["mea"]["best_lr"] == pytest.approx(3e-3)


def test_tokens_to_reach_interpolates():
    curve = [(100, 6.0), (200, 5.0), (300, 4.0)]
    assert report.tokens_to_reach(curve, 4.5) == pytest.approx(250)
    assert report.tokens_to_reach(curve, 3.0) is None
    assert report.tokens_to_reach(curve, 7.0) == 100


def test_downstream_plot(tmp_path):
    """The zero-shot plot reads the evaluate-many CSV (value and standard error per task)."""
    head = ",".join(f"{t}_metric,{t}_value,{t}_stderr,{t}_n" for t in report.CHANCE)
    row = ",".join(f"acc,0.3,0.01,100" for _ in report.CHANCE)
    # evaluate-many writes empty cells for a task a model lacks and for lm-eval's "N/A" stderr
    gaps = ",".join("acc,,,0" if i == 0 else "acc,0.3,,1" for i, _ in enumerate(report.CHANCE))
    (tmp_path / "d.csv").write_text(f"model,{head},average\nmha lr=1e-3 s0,{row},0.3\nmea,{gaps},\n")
    report.plot_downstream(tmp_path / "d.csv", tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_zero_shot_gaps_name_differences_beyond_two_standard_errors():
    """A compressed model 10 points below the original on PIQA (SE 1.5 each: 4.7 SE) is listed, one 1 point
    below is not; the healed-original control, when present, is a second reference."""
    def row(model, init, piqa, hella=0.40):
        m = {"piqa": {"n": 1000, "acc": piqa, "acc_stderr": 0.015, "acc_norm": piqa, "acc_norm_stderr": 0.015},
             "hellaswag": {"n": 1000, "acc": hella, "acc_stderr": 0.015, "acc_norm": hella, "acc_norm_stderr": 0.015}}
        return {"model": model, "kv_heads": 2, "init": init, "zero_shot": {"metrics": m}}

    text = report.zero_shot_gaps([row("original", "-", 0.66), row("converted", "svd", 0.56),
                                  row("healed", "activation", 0.65)])
    assert "from the original: 2 svd: PIQA -10.0 (4.7 SE)" in text
    assert "activation" not in text and "same tokens" not in text
    text = report.zero_shot_gaps([row("original", "-", 0.66), row("healed", "-", 0.66, hella=0.50),
                                  row("healed", "activation", 0.65, hella=0.40)])
    assert "from the original: none" in text
    assert "from the original healed on the same tokens: 2 activation, healed: HellaSwag -10.0 (4.7 SE)" in text
    assert report.zero_shot_gaps([row("original", "-", 0.66)]).count("none") == 1


def test_the_pipelines_are_cli_commands(tmp_path):
    """`mea study-report` (and its two siblings) run through the one CLI; with no runs yet every part says so."""
    from mea.cli import _commands

    cmds = _commands()
    assert cmds["study-lr-scaling"].__module__ == "mea.study.lr_scaling"
    assert cmds["study-compression"].__name__ == "compression_table"
    res = subprocess.run([sys.executable, "-m", "mea.cli", "study-report", "--runs", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Experiment 5: not run yet" in res.stdout and (tmp_path / "out" / "tables.md").is_file()
