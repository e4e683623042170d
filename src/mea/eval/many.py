"""`mea evaluate-many`: zero-shot evaluation of several models (e.g. every run of a sweep) into one table.

Each model is scored by `mea evaluate` (in this process, or one subprocess per GPU slot at once with
``--gpus``); finished models are skipped on a re-run. The combined table puts the models side by side
with their standard errors, and lists, per task, which differences from the first model exceed
twice the combined standard error (at small scale most scores sit near chance; this says which gaps
the data can tell apart).
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

from .evaluate import DEFAULT_TASKS


def sweep_models(sweep: str) -> list[tuple[str, str]]:
    """(name, run directory) of every finished run of a `mea sweep` (its results.csv)."""
    return [(name, path) for name, path, _ in _finished_runs(sweep)]


def _finished_runs(sweep: str, option: str = "sweep") -> list[tuple[str, str, float]]:
    from ..io.results import read_results

    csv_path = Path(sweep) / "results.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{option}: {csv_path} not found (run the sweep first)")
    rows = [r for r in read_results(sweep) if r["status"] == "finished"]
    if not rows:
        raise ValueError(f"{option}: {csv_path} lists no finished run")
    # r["dir"]: the run under the given sweep folder, which also holds for a sweep copied from elsewhere
    return [(f"{r['variant']} lr={r['lr']:.2e} s{r['seed']}", str(r["dir"]), r["final_val_loss"]) for r in rows]


def result_dirname(name: str) -> str:
    """The folder of a model's results under OUT: its name with path-unsafe characters replaced."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def best_models(sweep: str) -> list[tuple[str, str]]:
    """(name, run directory) of each variant's best run (lowest final validation loss) of a sweep."""
    best: dict[str, tuple[str, str, float]] = {}
    for name, path, loss in _finished_runs(sweep, "best_of"):
        variant = name.split(" lr=")[0]
        if loss is not None and (variant not in best or loss < best[variant][2]):
            best[variant] = (name, path, loss)
    return [(n, p) for n, p, _ in best.values()]


def evaluate_many(models: Optional[list[str]] = None, sweep: Optional[str] = None, best_of: Optional[str] = None,
                  out: str = "runs/evaluate-many",
                  tasks: str = DEFAULT_TASKS, limit: Optional[int] = None, batch_size: int = 32,
                  gpus: Optional[list[int]] = None, procs_per_gpu: int = 1, device: str = "auto",
                  perplexity: bool = False, corpus: str = "prose", overwrite: bool = False) -> str:
    """Evaluate several models on the same tasks; write OUT/table.md and OUT/results.csv.

    Args:
        models: model folders or run directories (anything `mea evaluate` takes).
        sweep: a `mea sweep` directory: evaluate each of its finished runs (after ``models``).
        best_of: a `mea sweep` directory: evaluate each variant's best run there (before ``sweep``'s).
        out: folder for one sub-folder of results per model and the combined table.
        tasks: comma-separated tasks (see `mea evaluate`).
        limit: score only the first N examples of each task.
        batch_size: sequences per forward pass.
        gpus: evaluate on these GPUs at once, one subprocess per slot; default: one after another here.
        procs_per_gpu: evaluations sharing each GPU at once.
        device: device for in-process evaluation.
        perplexity: also report validation perplexity and bits per byte (columns of the table).
        corpus: prepared corpus name or directory for the perplexity.
        overwrite: replace what OUT holds (earlier results, or a folder mea evaluate-many did not write)
            instead of continuing it.

    Returns:
        The path of the combined table.
    """
    from ..data.prepare import check_corpus
    from ..io.load import check_model_path
    from ..runtime import check_gpus, empty_folder, output_folder, resolve_device
    from .data import parse_tasks

    todo: list[tuple[str, str]] = [(Path(m).name, m) for m in (models or [])]
    if best_of:
        todo += best_models(best_of)
    if sweep:
        todo += sweep_models(sweep)
    seen: set[Path] = set()  # one model reached twice (a run linked into another sweep) is scored once
    todo = [(n, p) for n, p in todo if not (Path(p).resolve() in seen or seen.add(Path(p).resolve()))]
    if not todo:
        raise ValueError("models: nothing to evaluate (give models or a sweep)")
    for name, path in todo:
        check_model_path("models", path)
    if tasks and str(tasks).strip():
        parse_tasks(tasks)
    elif not perplexity:
        raise ValueError("tasks: empty and perplexity off: nothing to evaluate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if procs_per_gpu < 1:
        raise ValueError(f"procs_per_gpu: must be >= 1, got {procs_per_gpu}")
    check_gpus("gpus", gpus)
    if not gpus:
        resolve_device("device", device)
    if perplexity:
        check_corpus("corpus", corpus)
    out_dir = output_folder("out", out, "evaluate-many", overwrite, own=is_evaluation_table)
    todo = _unique_names(todo)
    jobs = [(name, path, out_dir / result_dirname(name)) for name, path in todo]
    if len({j[2] for j in jobs}) < len(jobs):
        raise ValueError("models: two model names map to one results folder under OUT; rename one of the folders")
    if overwrite:
        empty_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"tasks": tasks, "limit": limit, "batch_size": batch_size, "perplexity": perplexity, "corpus": corpus}
    pending = [j for j in jobs if not _scored_as_asked(j[2] / "results.json", j[1], common)]
    print(f"evaluate-many: {len(jobs)} models, {len(jobs) - len(pending)} already done", file=sys.stderr)
    if gpus:
        _run_parallel(pending, common, [g for _ in range(procs_per_gpu) for g in gpus])
    else:
        from .evaluate import evaluate

        from ..runtime import about

        for name, path, res_dir in pending:
            with about("models", aka=("model",)):
                evaluate(path, device=device, out=str(res_dir), name=name, **common)
    runs = []
    for name, _, res_dir in jobs:
        f = res_dir / "results.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()))
        else:
            print(f"evaluate-many: {name} has no results (see {res_dir / 'stdout.log'})", file=sys.stderr)
    if not runs:
        raise RuntimeError("evaluate-many: no model was evaluated")
    table = combined_table(runs)
    (out_dir / "table.md").write_text(table + "\n")
    write_csv(runs, out_dir / "results.csv")
    print(table)
    return str(out_dir / "table.md")


def is_evaluation_table(path: Path) -> bool:
    """A folder mea evaluate-many wrote: its table and one folder of results per model."""
    from .evaluate import is_evaluation

    return all(e.name in ("table.md", "results.csv") or (e.is_dir() and is_evaluation(e)) for e in path.iterdir())


def _unique_names(todo: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Row names that tell models apart: two folders both called ``final`` (or two sweeps' runs of one
    variant, rate and seed) get the shortest tail of their paths that differs, e.g. ``final (a/final)``."""
    out = []
    for i, (name, path) in enumerate(todo):
        others = [Path(q).resolve().parts for j, (m, q) in enumerate(todo) if m == name and j != i]
        if others:
            parts = Path(path).resolve().parts
            k = 1
            while k < len(parts) and any(o[-k:] == parts[-k:] for o in others):
                k += 1
            name = f"{name} ({'/'.join(parts[-k:])})"
        out.append((name, path))
    return out


def _scored_as_asked(results: Path, model: str, common: dict) -> bool:
    """Whether OUT/<model>/results.json holds this model scored on these tasks and settings (a re-run with
    other tasks or another limit scores it again instead of reusing the old numbers)."""
    from .data import TASKS_REVISION, parse_tasks

    if not results.is_file():
        return False
    try:
        run = json.loads(results.read_text())
    except json.JSONDecodeError:
        return False
    got = run.get("settings", {})
    want = parse_tasks(common["tasks"]) if common["tasks"] and str(common["tasks"]).strip() else []
    same = (Path(run.get("model", "")) == Path(model).resolve() and list(got.get("tasks", [])) == want
            and got.get("limit") == common["limit"] and (not want or got.get("tasks_revision") == TASKS_REVISION))
    if same and common["perplexity"]:  # and on the same corpus
        from ..data.prepare import corpus_dir

        ppl = run.get("perplexity") or {}
        same = bool(ppl) and Path(ppl.get("corpus", "")) == Path(corpus_dir(common["corpus"]))
    if not same:
        print(f"evaluate-many: {results} was scored with other settings or for another model; scoring again",
              file=sys.stderr)
    return same


def _run_parallel(pending, common, slots) -> None:
    from ..procs import Job, run_on_gpus

    jobs = []
    for name, path, res_dir in pending:
        args = [sys.executable, "-m", "mea.cli", "evaluate", str(path), "--out", str(res_dir), "--name", name,
                "--device", "cuda", "--tasks", common["tasks"], "--batch_size", str(common["batch_size"]),
                "--perplexity", str(common["perplexity"]).lower(), "--corpus", str(common["corpus"])]
        if common["limit"]:
            args += ["--limit", str(common["limit"])]
        jobs.append(Job(name, args, res_dir / "stdout.log"))
    for name, code in run_on_gpus(jobs, slots).items():
        if code:
            print(f"evaluate-many: {name} failed with exit code {code}", file=sys.stderr)


def headline(row: dict) -> tuple[Optional[float], Optional[float], str]:
    """The paper's number for a task: acc_norm where the task has it, else acc; with its stderr."""
    if row.get("acc_norm") is not None:
        return row["acc_norm"], row.get("acc_norm_stderr"), "acc_norm"
    return row.get("acc"), row.get("acc_stderr"), "acc"


def beyond_error_bars(ref: dict, other: dict, k: float = 2.0) -> list[tuple[str, float, float]]:
    """Tasks on which ``other`` differs from ``ref`` by more than ``k`` combined standard errors, as
    (task, other - ref, |difference| in standard errors). Both map task -> lm-eval metrics."""
    out = []
    for t in dict.fromkeys([*ref, *other]):
        a, sa, _ = headline(ref.get(t, {}))
        b, sb, _ = headline(other.get(t, {}))
        if None in (a, b, sa, sb):
            continue
        se = math.sqrt(sa ** 2 + sb ** 2)
        if se > 0 and abs(b - a) > k * se:
            out.append((t, b - a, abs(b - a) / se))
    return out


def combined_table(runs: list[dict]) -> str:
    """Models as rows, tasks as columns: headline accuracy ± stderr (percent) and the average, and the
    validation perplexity and bits per byte where they were measured; then the differences from the
    first model that exceed twice their combined standard error."""
    from .evaluate import TASK_LABELS, _pct

    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    ppl = any(r.get("perplexity") for r in runs)
    head = [f"{TASK_LABELS.get(t, t)} ({headline(runs[0]['tasks'].get(t, {}))[2]})" for t in tasks]
    head += ["Avg."] if tasks else []
    head += ["val ppl", "bits/byte"] if ppl else []
    lines = ["| Model | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for r in runs:
        cells, vals = [], []
        for t in tasks:
            v, se, _ = headline(r["tasks"].get(t, {}))
            vals.append(v)
            cells.append("—" if v is None else f"{_pct(v)} ± {_pct(se)}")
        if tasks:
            got = [v for v in vals if v is not None]
            cells.append(_pct(sum(got) / len(got) if got and len(got) == len(vals) else None))
        if ppl:
            p = r.get("perplexity") or {}
            cells += [f"{p['ppl']:.2f}" if p else "—", f"{p['bits_per_byte']:.4f}" if p else "—"]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if not tasks:
        return "\n".join(lines)
    ref = runs[0]
    notes = [f"{r['name']} vs {ref['name']} on {TASK_LABELS.get(t, t)}: {100 * diff:+.2f} points ({z:.1f} standard errors)"
             for r in runs[1:] for t, diff, z in beyond_error_bars(ref["tasks"], r["tasks"])]
    n = {t: max(r["tasks"].get(t, {}).get("n", 0) for r in runs) for t in tasks}
    lines += ["", "Examples per task: " + ", ".join(f"{TASK_LABELS.get(t, t)} {n[t]:,}" for t in tasks) + ".",
              "Differences from the first row beyond 2 standard errors: "
              + ("; ".join(notes) if notes else "none") + "."]
    return "\n".join(lines)


def write_csv(runs: list[dict], path: Path) -> None:
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    ppl = any(r.get("perplexity") for r in runs)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *[f"{t}_{k}" for t in tasks for k in ("metric", "value", "stderr", "n")], "average",
                    *(["val_ppl", "bits_per_byte"] if ppl else [])])
        for r in runs:
            row, vals = [r["name"]], []
            for t in tasks:
                v, se, metric = headline(r["tasks"].get(t, {}))
                row += [metric, v, se, r["tasks"].get(t, {}).get("n")]
                vals.append(v)
            row.append(sum(vals) / len(vals) if vals and None not in vals else None)
            if ppl:
                p = r.get("perplexity") or {}
                row += [p.get("ppl"), p.get("bits_per_byte")]
            w.writerow(row)
