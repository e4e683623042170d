"""Tables and plots of docs/results.md from the study's run directories (runs/study by default).

    mea study-report --runs runs/study --out docs/study      # or: python -m mea.study.report ...

Reads the learning-rate sweep, the convergence sweep, the zero-shot table and the compression tables
that configs/study/*.yaml produce, and writes:
  OUT/tables.md            every table of docs/results.md, numbers only
  OUT/summary.json         the same numbers, machine-readable
  OUT/loss_vs_lr.png       final validation loss against peak learning rate per variant
  OUT/convergence.png      validation loss against tokens at each variant's best rate (all seeds)
  OUT/downstream.png       zero-shot accuracy per task with 2-standard-error bars, against chance
  OUT/healing.png          training loss of the compression tables' healing runs
  OUT/metrics/...          each run's metrics.jsonl, config.yaml and status.json (small, committed)
Parts whose runs are missing are skipped with a note.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from ..train.metrics import read_metrics
from ..io.results import read_results
from ..train.sweep import best_lrs, plot_loss_vs_lr


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(x["tokens"], x["val_loss"]) for x in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in x]


def lr_table(rows: list[dict], tolerance: float) -> tuple[str, dict]:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lrs = sorted({r["lr"] for r in rows})
    best = best_lrs(rows)
    lines = ["| variant | " + " | ".join(f"{lr:.1e}" for lr in lrs) + " | best lr | largest stable lr | "
             f"largest lr within {tolerance} nats of best |", "|" + "---|" * (len(lrs) + 4)]
    summary = {}
    for v in variants:
        cells, stable, near = [], [], []
        for lr in lrs:
            r = next((x for x in rows if x["variant"] == v and x["lr"] == lr and x["seed"] == 0), None)
            if r is None or r["status"] == "missing":
                cells.append("not run")
            elif r["status"] == "diverged":
                cells.append(f"diverged (step {r['steps']})")
            elif r["final_val_loss"] is None:
                cells.append(r["status"])
            else:
                bold = v in best and lr == best[v][0]
                cells.append(f"**{r['final_val_loss']:.3f}**" if bold else f"{r['final_val_loss']:.3f}")
                if math.isfinite(r["final_val_loss"]):
                    stable.append(lr)
                    if v in best and r["final_val_loss"] <= best[v][1] + tolerance:
                        near.append(lr)
        b = best.get(v, (None, None))
        summary[v] = {"best_lr": b[0], "best_val_loss": b[1], "largest_stable_lr": max(stable) if stable else None,
                      "largest_near_best_lr": max(near) if near else None,
                      "losses": {f"{lr:.2e}": c for lr, c in zip(lrs, cells)}}
        fmt = lambda x: "-" if x is None else f"{x:.1e}"
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {fmt(b[0])} | {fmt(summary[v]['largest_stable_lr'])} | "
                     f"{fmt(summary[v]['largest_near_best_lr'])} |")
    return "\n".join(lines), summary


def tokens_to_reach(curve: list[tuple[int, float]], target: float):
    """First token count at which a validation curve reaches ``target`` (linear between evaluations)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target:
                return t0
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(n)]


def convergence_table(rows: list[dict]) -> tuple[str, dict]:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | lr | seeds | final val loss (mean) | spread (max - min) | per seed | ppl |",
             "|---|---|---|---|---|---|---|"]
    summary, curves = {}, {}
    for v in variants:
        done = [r for r in rows if r["variant"] == v and r["final_val_loss"] is not None]
        if not done:
            lines.append(f"| {v} | - | 0 | not run | | | |")
            continue
        losses = [r["final_val_loss"] for r in sorted(done, key=lambda r: r["seed"])]
        m = statistics.fmean(losses)
        curves[v] = mean_curve([val_curve(r["dir"]) for r in done])
        summary[v] = {"lr": done[0]["lr"], "seeds": len(done), "mean": m, "spread": max(losses) - min(losses),
                      "per_seed": losses, "tokens": curves[v][-1][0] if curves[v] else None}
        lines.append(f"| {v} | {done[0]['lr']:.1e} | {len(done)} | {m:.4f} | {max(losses) - min(losses):.4f} | "
                     + ", ".join(f"{x:.4f}" for x in losses) + f" | {math.exp(m):.2f} |")
    if "mha" in summary:
        target = summary["mha"]["mean"]
        lines += ["", f"Tokens each variant needs to reach mha's final validation loss ({target:.4f}, mean of its seeds), "
                  "from the seed-averaged curves (evaluations every 25 steps, linear between them):", "",
                  "| variant | tokens to reach | fraction of mha's budget |", "|---|---|---|"]
        total = summary["mha"]["tokens"]
        for v, c in curves.items():
            t = tokens_to_reach(c, target)
            summary[v]["tokens_to_mha_final"] = t
            lines.append(f"| {v} | " + ("not reached" if t is None else f"{t / 1e6:.2f}M") + " | "
                         + ("-" if t is None else f"{t / total:.2f}") + " |")
    return "\n".join(lines), summary


def budget(rows: list[dict]) -> str:
    tokens = max((r["tokens"] for r in rows if r["tokens"] and r["status"] == "finished"), default=0)
    return f"{tokens / 1e6:.2f}M tokens"


def plot_convergence(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        color = f"C{i}"
        for r in rows:
            if r["variant"] == v and r["final_val_loss"] is not None:
                c = val_curve(r["dir"])
                kw = dict(color=color, alpha=0.9 if r["seed"] == 0 else 0.5, ls="-" if r["seed"] == 0 else "--",
                          label=f"{v} (lr {r['lr']:.1e})" if r["seed"] == 0 else None)
                for a in (ax, zoom):
                    a.plot([t / 1e6 for t, _ in c], [x for _, x in c], **kw)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss at each variant's best lr (dashed: seed 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    zoom.set_xlabel("tokens (M)")
    zoom.set_title("last half")
    zoom.grid(alpha=0.3)
    lows = [r["final_val_loss"] for r in rows if r["final_val_loss"] is not None]
    if lows:
        zoom.set_ylim(min(lows) - 0.05, min(lows) + 0.6)
        zoom.set_xlim(left=max(t for r in rows if r["final_val_loss"] is not None for t, _ in val_curve(r["dir"])) / 2e6)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


CHANCE = {"piqa": 0.5, "openbookqa": 0.25, "winogrande": 0.5, "hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25}


def plot_downstream(csv_file: Path, out: Path) -> None:
    """Experiment 3: accuracy per task and model with 2-standard-error bars, against chance."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_file.open()))
    tasks = [t for t in CHANCE if f"{t}_value" in rows[0]]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        # An empty cell (a task the model lacks, lm-eval's "N/A" stderr) draws no bar or no error bar.
        num = lambda v: float(v) if v not in ("", None) else float("nan")  # noqa: E731
        ax.bar(xs, [100 * num(r[f"{t}_value"]) for t in tasks], width,
               yerr=[0.0 if r[f"{t}_stderr"] in ("", None) else 200 * num(r[f"{t}_stderr"]) for t in tasks],
               capsize=2, label=r["model"], color=f"C{i}")
    for j, t in enumerate(tasks):
        ax.hlines(100 * CHANCE[t], j - 0.45, j + 0.45, colors="k", linestyles=":", lw=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%), bars: 2 standard errors")
    ax.set_title("Zero-shot accuracy of experiment 2's models (dotted: chance)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_healing(root: Path, out: Path) -> bool:
    """Experiment 4: training loss of every healing run against tokens, one panel per cache size; color
    is the init, line style the healing (one lr, mixing at 300x, middle layers only). False if none."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {"smollm2_all": ("SmolLM2", "-"), "smollm2_mixlr": ("SmolLM2", "--"), "smollm2_middle": ("SmolLM2", ":"),
              "compress_own": ("our MHA model", "-"), "compress_own_mixlr": ("our MHA model", "--")}
    colors = {"svd": "C0", "activation": "C1", "mean-pool": "C2", "original": "k"}
    curves = []
    for name, (model, style) in tables.items():
        for run in sorted((root / name).glob("*-healed")):
            m = re.fullmatch(r"kv(\d+)-(.+)-healed|(original)-healed", run.name)
            if not m or not (run / "metrics.jsonl").is_file():
                continue
            pts = [(r["tokens"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "tokens" in r]
            h, init = (int(m.group(1)), m.group(2)) if m.group(1) else (None, "original")
            status = json.loads((run / "status.json").read_text()).get("status") if (run / "status.json").is_file() else None
            curves.append((model, h, init, style, name + ("" if status == "finished" else ", unfinished"), pts))
    if not curves:
        return False
    # One panel per model and cache size; the uncompressed control (h None) is drawn in each of its model's.
    panels = list(dict.fromkeys((c[0], c[1]) for c in curves if c[1] is not None))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (model, h) in zip(axes[0], panels):
        for _, _, init, style, name, pts in (c for c in curves if c[0] == model and c[1] in (h, None)):
            k = max(1, len(pts) // 25)  # a running mean over a few logged steps: the curves are noisy
            ys = [sum(y for _, y in pts[max(0, i - k + 1): i + 1]) / len(pts[max(0, i - k + 1): i + 1]) for i in range(len(pts))]
            ax.plot([t / 1e6 for t, _ in pts], ys, color=colors.get(init, "C3"), ls=style, label=f"{init} ({name})")
        panel = f"{model}, h' = {h}"
        ax.set_title(panel)
        ax.set_xlabel("healing tokens (M)")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Healing after conversion (solid: one lr; dashed: mixing at 300x the lr; dotted: middle layers only)")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return True


def scaling_table(fit: dict) -> str:
    """Per variant and size the optimal rate; the power law; the prediction and, once run, its check."""
    lines = ["| variant | size | N non-emb. | grid-best lr | lr* (parabola) | note |", "|---|---|---|---|---|---|"]
    tail = []
    for v, res in fit["variants"].items():
        for p in res["points"]:
            lines.append(f"| {v} | {p['size']} | {p['N']:,} | {p['grid_best_lr']:.2e} | {p['lr_star']:.2e} | "
                         + (f"at the grid's {p['edge']} edge" if p.get("edge") else "") + " |")
        f, pred, check = res.get("fit"), res.get("prediction"), res.get("check")
        if f:
            tail.append(f"- {v}: lr* = {f['a']:.4g} N^{f['b']:.3f} (b ± {f.get('b_se') or 0:.3f}, {f['n_points']} sizes)"
                        + (f"; predicted at {pred['size']} (N = {pred['N']:,}): {pred['lr']:.2e}" if pred else "")
                        + (f"; measured there: {check['lr_star']:.2e} ({check['ratio_measured_to_predicted']:.2f}x the "
                           "prediction)" if check and check.get("ratio_measured_to_predicted") else ""))
    return "\n".join(lines + [""] + tail)


def copy_run(run: Path, dest: Path) -> None:
    """A run's small files (metrics.jsonl, config.yaml, status.json) into ``dest``; no weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "config.yaml", "status.json"):
        if (run / f).is_file():
            shutil.copy(run / f, dest / f)


def copy_metrics(sweep_dir: Path, dest: Path) -> None:
    for status in sweep_dir.glob("*/*/status.json"):
        run = status.parent
        if run.is_symlink():
            continue  # linked from another sweep: copied there
        copy_run(run, dest / sweep_dir.name / run.parent.name / run.name)
    if (sweep_dir / "results.csv").is_file():
        (dest / sweep_dir.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(sweep_dir / "results.csv", dest / sweep_dir.name / "results.csv")


def compression_section(path: Path) -> str:
    from .compression_table import collect_zero_shot  # the table of a call stopped while scoring, completed

    collect_zero_shot(path)
    res = json.loads((path / "results.json").read_text())
    s = res["settings"]
    head = (f"Source: `{Path(s['model']).name}`; layers: {s['layers']}; validation: {s['val_windows'][0]} windows of "
            f"{s['val_windows'][1]} tokens; healing: {s['heal_steps']} steps x {s['heal_batch_size']} x "
            f"{s['heal_seq_len']} = {s['heal_steps'] * s['heal_batch_size'] * s['heal_seq_len']:,} tokens at lr "
            f"{s['heal_lr']}; zero-shot limit: {s.get('limit') or 'none'}.")
    return head + "\n\n" + (path / "table.md").read_text() + zero_shot_gaps(res["rows"])


def zero_shot_gaps(rows: list[dict]) -> str:
    """Per task, the zero-shot differences of each compressed model beyond 2 combined standard errors,
    from the original and (where the table has it) from the original healed on the same tokens."""
    from ..eval.evaluate import TASK_LABELS
    from ..eval.many import beyond_error_bars

    scored = [r for r in rows if (r.get("zero_shot") or {}).get("metrics")]
    refs = [("the original", next((r for r in scored if r["model"] == "original"), None)),
            ("the original healed on the same tokens", next((r for r in scored if r["init"] == "-" and
                                                             r["model"] != "original"), None))]
    lines = []
    for name, ref in refs:
        if ref is None:
            continue
        notes = []
        for r in scored:
            if r["init"] == "-":
                continue
            gaps = beyond_error_bars(ref["zero_shot"]["metrics"], r["zero_shot"]["metrics"])
            if gaps:
                label = f"{r['kv_heads']} {r['init']}{', healed' if r['model'] == 'healed' else ''}"
                notes.append(f"{label}: " + ", ".join(f"{TASK_LABELS.get(t, t)} {100 * d:+.1f} ({z:.1f} SE)"
                                                      for t, d, z in gaps))
        lines.append(f"- from {name}: " + ("; ".join(notes) if notes else "none"))
    if not lines:
        return ""
    return "\nZero-shot differences beyond 2 standard errors (h' init: task, points):\n\n" + "\n".join(lines) + "\n"


def main(runs: str = "runs/study", out: str = "docs/study", tolerance: float = 0.1, overwrite: bool = False) -> None:
    """Write the study's tables, plots and compact metrics.

    Args:
        runs: the study's run directory.
        out: where tables.md, summary.json, the PNGs and metrics/ go.
        tolerance: a learning rate counts as near-best within this many nats of the best final loss.
        overwrite: replace what OUT holds when mea study-report did not write it.
    """
    from ..runtime import empty_folder, holding, output_folder

    root = Path(runs).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"runs: {root} is a file; give the study's run directory")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: must be >= 0, got {tolerance}")
    dest = output_folder("out", out, "study-report", overwrite, own=holding("tables.md", "summary.json"))
    if overwrite and dest.exists():
        empty_folder(dest)
    dest.mkdir(parents=True, exist_ok=True)
    parts, summary = [], {}
    sweep_rows = read_results(root / "lr_sweep") if (root / "lr_sweep" / "results.csv").is_file() else None
    if sweep_rows:
        rows = sweep_rows
        table, summary["lr_sweep"] = lr_table(rows, tolerance)
        parts += ["## Experiment 1: final validation loss by peak learning rate (seed 0)", "", table, ""]
        plot_loss_vs_lr(rows, dest / "loss_vs_lr.png",
                        f"Learning-rate sweep, 25.7M non-embedding params, {budget(rows)} (x: diverged)")
        copy_metrics(root / "lr_sweep", dest / "metrics")
    else:
        parts += ["## Experiment 1: not run yet", ""]
    if (root / "convergence" / "results.csv").is_file():
        rows = read_results(root / "convergence")
        for r in rows:  # seed-0 runs are links into the learning-rate sweep
            if not r["dir"].exists():
                r["dir"] = root / "lr_sweep" / r["dir"].relative_to(root / "convergence")
        # Variants the convergence sweep did not repeat: their best run of the learning-rate sweep.
        if sweep_rows:
            have = {r["variant"] for r in rows}
            for v, (lr, _) in best_lrs(sweep_rows).items():
                if v not in have:
                    rows += [r for r in sweep_rows if r["variant"] == v and r["lr"] == lr]
        table, summary["convergence"] = convergence_table(rows)
        parts += ["## Experiment 2: convergence at each variant's best learning rate", "", table, ""]
        plot_convergence(rows, dest / "convergence.png")
        copy_metrics(root / "convergence", dest / "metrics")
    else:
        parts += ["## Experiment 2: not run yet", ""]
    if (root / "downstream" / "table.md").is_file():
        parts += ["## Experiment 3: zero-shot accuracy (%, ± standard error)", "",
                  (root / "downstream" / "table.md").read_text(), ""]
        shutil.copy(root / "downstream" / "results.csv", dest / "downstream.csv")
        plot_downstream(dest / "downstream.csv", dest / "downstream.png")
    else:
        parts += ["## Experiment 3: not run yet", ""]
    if (root / "head_norm_init" / "results.csv").is_file():
        rows = read_results(root / "head_norm_init")
        table, summary["head_norm_init"] = lr_table(rows, tolerance)
        parts += ["## Follow-up: the head norm's initial scale (seed 0)", "", table, ""]
        copy_metrics(root / "head_norm_init", dest / "metrics")
    if (root / "head_norm_seeds" / "results.csv").is_file():
        table, summary["head_norm_seeds"] = convergence_table(read_results(root / "head_norm_seeds"))
        parts += ["## Follow-up: the head norm started at 0.1, three seeds at lr 1e-3", "", table, ""]
        copy_metrics(root / "head_norm_seeds", dest / "metrics")
    fit = root / "lr_scaling" / "fit" / "lr_scaling.json"
    if fit.is_file():
        parts += ["## Experiment 5: learning rate from a scaling fit", "", scaling_table(json.loads(fit.read_text())), ""]
        for f in ("lr_scaling.json", "lr_scaling.png", "loss_vs_lr.png"):
            if (fit.parent / f).is_file():
                shutil.copy(fit.parent / f, dest / ("lr_scaling_grids.png" if f == "loss_vs_lr.png" else f))
        for sweep_dir in sorted((root / "lr_scaling").glob("s*")) + sorted((root / "lr_scaling" / "check").glob("*")):
            copy_metrics(sweep_dir, dest / "metrics" / "lr_scaling")
    else:
        parts += ["## Experiment 5: not run yet", ""]
    for name, title in (("compress_own", "Experiment 4a: our MHA model at h' = h/2"),
                        ("compress_own_mixlr", "Experiment 4a follow-up: healed with the mixing at 300x the lr"),
                        ("smollm2_all", "Experiment 4b: SmolLM2-135M, all layers"),
                        ("smollm2_middle", "Experiment 4c: SmolLM2-135M, middle layers only"),
                        ("smollm2_mixlr", "Experiment 4b follow-up: SmolLM2-135M healed with the mixing at 300x the lr")):
        if (root / name / "results.json").is_file():
            parts += [f"## {title}", "", compression_section(root / name), ""]
            shutil.copy(root / name / "results.json", dest / f"{name}.json")
            summary[name] = json.loads((root / name / "results.json").read_text())["rows"]
            # The healing runs' loss curves (the table keeps only their final perplexity).
            for run in sorted((root / name).glob("*-healed")):
                copy_run(run, dest / "metrics" / name / run.name)
        else:
            parts += [f"## {title}: not run yet", ""]
    if plot_healing(root, dest / "healing.png"):
        parts += ["Healing curves: healing.png", ""]
    (dest / "tables.md").write_text("\n".join(parts))
    (dest / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(parts))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
