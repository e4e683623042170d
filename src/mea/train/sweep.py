"""`mea sweep`: a grid of (attention variant x learning rate x seed) pretraining runs.

Runs go sequentially on one device, or several at once (``--gpus 0,1 --procs_per_gpu 3``: each run is
a ``mea pretrain`` subprocess pinned to one GPU; small models leave a GPU idle enough that a few runs
share it well). The sweep is resumable: finished or diverged runs are kept, interrupted ones resume
from their checkpoints. ``lrs_from`` takes each variant's best learning rate from an earlier sweep
(and links its finished runs instead of training them again): the convergence experiment.
``points`` lists grid points one by one (each variant its own rates and seeds), ``choices`` reads each
variant's declared learning rate and model settings from a file (``mea study-scratch declare``), and
``until_diverged`` climbs the learning-rate grid of each variant until every seed diverges.
Results: ``results.csv``, a plot of final validation loss against learning rate per variant, and the
loss curves at each variant's best rate.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..io.results import FIELDS, read_results
from ..runtime import atomic_write_text, empty_folder
from .config import DataConfig, TrainConfig
from .metrics import read_metrics


def parse_variant(spec: str) -> dict[str, Any]:
    """``mea``, ``mea:n_kv_heads=4,head_norm=false`` -> pretrain keyword arguments."""
    from ..models.config import ATTENTION_VARIANTS

    name, _, rest = spec.partition(":")
    if name not in ATTENTION_VARIANTS:
        raise ValueError(f"variants: unknown attention {name!r} in {spec!r}; expected one of {', '.join(ATTENTION_VARIANTS)}")
    kw: dict[str, Any] = {"attention": name}
    model: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"variants: expected key=value in {spec!r}, got {item!r}")
        low = val.strip().lower()
        parsed: Any = {"true": True, "false": False, "none": None}.get(low, val)
        if parsed is val:
            try:
                parsed = int(val)
            except ValueError:
                try:
                    parsed = float(val)
                except ValueError:
                    parsed = val
        if key in ("n_kv_heads", "head_norm"):
            kw[key] = parsed
        else:
            model[key] = parsed
    if model:
        kw["model"] = model
    return kw


def run_name(variant: str, lr: float, seed: int) -> str:
    safe = variant.replace(":", "_").replace(",", "_").replace("=", "-")
    return f"{safe}/lr{lr:.2e}_s{seed}"


def read_choices(path: str | Path) -> dict[str, dict]:
    """A choices file: ``{variant spec: {lr: RATE, model: {setting: value}, ...}}`` (other keys are notes)."""
    import yaml

    from ..runtime import config_path

    f = config_path(path)
    if not f.is_file():
        raise FileNotFoundError(f"choices: {f} not found (it is written once the settings are chosen, e.g. by "
                                "`mea study-scratch declare` after the pilot sweep)")
    got = yaml.safe_load(f.read_text()) or {}
    if not isinstance(got, dict):
        raise ValueError(f"choices: {f} must map variant specs to {{lr, model}}, got {type(got).__name__}")
    for v, entry in got.items():
        if not isinstance(entry, dict) or isinstance(entry.get("lr"), bool) \
                or not isinstance(entry.get("lr"), (int, float)) or not entry["lr"] > 0 \
                or not isinstance(entry.get("model", {}), dict):
            raise ValueError(f"choices: {f}: {v!r} needs a positive lr and an optional model mapping, got {entry!r}")
    return got


def _points(points: list[dict], seeds: list[int], declared: dict) -> list[tuple[str, float, list[int]]]:
    """(variant, lr, seeds) of each explicit grid point."""
    out = []
    for i, p in enumerate(points):
        extra = set(p) - {"variant", "lr", "lr_mult", "seeds"} if isinstance(p, dict) else None
        if extra is None or extra or "variant" not in p:
            raise ValueError(f"points[{i}]: expected {{variant, seeds, lr or lr_mult}}, got {p!r}")
        if "lr" in p and "lr_mult" in p:
            raise ValueError(f"points[{i}]: give lr or lr_mult (a multiple of the declared rate), not both")
        if "lr" in p:
            lr = float(p["lr"])
        elif p["variant"] in declared:
            lr = declared[p["variant"]]["lr"] * float(p.get("lr_mult", 1.0))
        else:
            raise ValueError(f"points[{i}]: {p['variant']!r} has no lr, and no choices file declares one for it")
        if not lr > 0:
            raise ValueError(f"points[{i}]: the learning rate must be positive, got {lr!r}")
        out.append((p["variant"], lr, list(p.get("seeds", seeds))))
    return out


def sweep(out: str = "runs/sweep", variants: list[str] = ["mha", "mea"], lrs: list[float] = [1e-3, 3e-3, 1e-2],
          seeds: list[int] = [0], preset: str = "tiny", model: Optional[dict] = None, data: DataConfig = DataConfig(),
          train: TrainConfig = TrainConfig(), gpus: Optional[list[int]] = None, procs_per_gpu: int = 1,
          device: str = "auto", compile: bool = False, lrs_from: Optional[str] = None,
          deadline_s: Optional[float] = None, points: Optional[list[dict]] = None, choices: Optional[str] = None,
          until_diverged: bool = False, overwrite: bool = False) -> str:
    """Train every (variant, learning rate, seed); collect final validation losses and plot them.

    Args:
        out: sweep directory (one run directory per grid point, results.csv, PNG plots).
        variants: attention variants, each optionally with settings, e.g. ``mea:head_norm=false``.
        lrs: peak learning rates.
        seeds: seeds per grid point.
        preset: model preset shared by all runs.
        model: ModelConfig overrides shared by all runs.
        data: corpus and sequence length.
        train: optimization settings (train.lr and train.seed are set per run).
        gpus: run subprocesses on these GPUs at once; default: sequentially in this process.
        procs_per_gpu: runs sharing each GPU at once.
        device: device for sequential runs (auto, cpu, cuda).
        compile: torch.compile each model.
        lrs_from: an earlier sweep directory: instead of ``lrs``, train each variant at its best
            learning rate there; its finished runs with the same settings are linked, not retrained.
        deadline_s: start no new run after this many seconds (running ones finish); the sweep can be
            continued later by running it again.
        overwrite: replace what OUT holds (an earlier sweep, or a folder mea sweep did not write) instead
            of continuing it.
        points: explicit grid points instead of ``variants`` x ``lrs`` x ``seeds``, in the order given:
            each ``{variant: SPEC, seeds: [...], lr: RATE}``, or ``lr_mult: M`` for M times the rate
            ``choices`` declares for the variant (no ``lr`` and no ``lr_mult``: the declared rate).
        choices: a file of settings declared per variant spec, ``{SPEC: {lr: RATE, model: {...}}}``
            (``mea study-scratch declare`` writes one from a pilot sweep). Every variant trained must be
            in it: its model settings apply to the variant's runs, its rate to points without ``lr``.
        until_diverged: train ``lrs`` in increasing order, all variants at one rate before the next, and
            stop a variant after the first rate at which every one of its seeds diverged.
    """
    if points and (lrs_from or until_diverged):
        raise ValueError("points: explicit grid points go without lrs_from and until_diverged")
    t_start = time.time()
    out_dir, parsed = _check_arguments(out, variants, lrs, seeds, preset, model, data, gpus, procs_per_gpu, device,
                                       lrs_from, deadline_s, overwrite, points)
    declared = read_choices(choices) if choices else {}
    if choices:
        wanted = [p.get("variant") for p in points if isinstance(p, dict)] if points else variants
        missing = sorted({str(v) for v in wanted} - set(declared))
        if missing:
            raise ValueError(f"choices: {choices} declares nothing for {', '.join(missing)}")
    if points:
        grid = _points(points, seeds, declared)
    else:
        best = _best_from(Path(lrs_from), variants) if lrs_from else {}
        rates = sorted(lrs) if until_diverged else lrs
        # LR-major, so a sweep cut short by its deadline still covers every variant at the first rates.
        grid = [(v, best[v] if lrs_from else rates[i], seeds) for i in range(1 if lrs_from else len(rates))
                for v in variants]
    parsed.update({v: parse_variant(v) for v, _, _ in grid if v not in parsed})
    jobs = []
    for v, lr, point_seeds in grid:
        for seed in point_seeds:
            kw = dict(parsed[v])
            kw["model"] = {**(model or {}), **kw.get("model", {})}
            for key, val in declared.get(v, {}).get("model", {}).items():
                if key in kw["model"] and kw["model"][key] != val:
                    raise ValueError(f"choices: {v!r} declares {key}={val!r}, the sweep sets {kw['model'][key]!r}")
                kw["model"][key] = val
            jobs.append((v, lr, seed, out_dir / run_name(v, lr, seed), kw))
    seen: dict[Path, float] = {}
    unique = []
    for job in jobs:
        v, lr, seed, run_dir, _ = job
        if run_dir in seen and seen[run_dir] != lr:
            raise ValueError(f"lrs: {seen[run_dir]!r} and {lr!r} share the run directory {run_dir} (run names keep "
                             "3 significant digits); make the rates differ in those")
        if run_dir not in seen:  # a grid point listed twice (seeds [0, 0]) is one run
            unique.append(job)
        seen[run_dir] = lr
    jobs = unique
    if overwrite:
        empty_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if lrs_from:
        _link_finished(jobs, Path(lrs_from), preset, data, train)
    for v, lr, seed, run_dir, kw in jobs:  # a finished run counts only if it is the run asked for now
        if _done(run_dir) and not run_dir.is_symlink():
            diffs = _settings_differ(run_dir, preset, data, dataclasses.replace(train, lr=lr, seed=seed), kw)
            if diffs:
                raise ValueError(f"out: {run_dir} finished with other settings ({'; '.join(diffs[:3])}); use the "
                                 "settings it ran with, another --out, or --overwrite true to replace the sweep")
    deadline = t_start + deadline_s if deadline_s else None
    # until_diverged: one round per rate, lowest first, whose outcome decides which variants climb on
    rounds = [[j for j in jobs if j[1] == lr] for lr in sorted({j[1] for j in jobs})] if until_diverged else [jobs]
    listed, stopped = [], set()
    for i, rnd in enumerate(rounds):
        rnd = [j for j in rnd if j[0] not in stopped]
        if not rnd:
            break
        listed += rnd
        todo = [j for j in rnd if not _done(j[3])]
        print(f"sweep: {len(rnd)} runs" + (f" at lr {rnd[0][1]:.3g}" if until_diverged else "")
              + f", {len(rnd) - len(todo)} already done", file=sys.stderr)
        if todo and deadline and time.time() > deadline:
            # the later rounds stay listed as missing: the sweep is not complete, and a rerun continues it
            listed += [j for r in rounds[i + 1:] for j in r if j[0] not in stopped]
            print("sweep: deadline reached; run the sweep again to continue", file=sys.stderr)
            break
        _train_jobs(todo, preset, data, train, gpus, procs_per_gpu, device, compile, deadline)
        stopped |= {v for v in {j[0] for j in rnd}
                    if all(_status(j[3]).get("status") == "diverged" for j in rnd if j[0] == v)}
    rows = collect(listed)
    csv_path = out_dir / "results.csv"
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(csv_path, text.getvalue())
    plot_sweep(rows, out_dir)
    _print_table(rows)
    return str(csv_path)


def is_sweep(path: Path) -> bool:
    """A folder mea sweep wrote: its results.csv, or run directories named as :func:`run_name` names them."""
    return (path / "results.csv").is_file() or any(path.glob("*/lr*_s*"))


def _check_arguments(out, variants, lrs, seeds, preset, model, data: DataConfig, gpus, procs_per_gpu, device, lrs_from,
                     deadline_s, overwrite, points=None) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Every argument, checked before any run starts; returns the sweep folder and the parsed variants
    (those of ``points`` where grid points are given)."""
    from ..data.prepare import check_corpus
    from ..runtime import check_gpus, output_folder, resolve_device
    from .pretrain import resolve_model_config

    if points:
        variants = [str(p.get("variant")) for p in points if isinstance(p, dict)]
        if not variants:
            raise ValueError("points: needs at least one grid point {variant: SPEC, ...}")
    for name, given in (("variants", variants), ("seeds", seeds), ("lrs", points or lrs or lrs_from)):
        if not given:
            raise ValueError(f"{name}: needs at least one entry")
    bad = [lr for lr in lrs if not lr > 0] if not (lrs_from or points) else []
    if bad:
        raise ValueError(f"lrs: learning rates must be positive, got {bad[0]}")
    if procs_per_gpu < 1:
        raise ValueError(f"procs_per_gpu: must be >= 1, got {procs_per_gpu}")
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"deadline_s: must be positive, got {deadline_s}")
    check_gpus("gpus", gpus)
    if not gpus:
        resolve_device("device", device, index=False)
    check_corpus("data.corpus", data.corpus)
    if (Path(data.corpus).expanduser() / "manifest.json").is_file():  # its shards are checked now, not in a run
        from ..data.shards import TokenDataset
        from ..runtime import about

        with about("data.corpus"):
            for split in ("train", "val"):
                TokenDataset(Path(data.corpus).expanduser(), split)
    parsed = {v: parse_variant(v) for v in variants}
    for v, kw in parsed.items():  # each variant's model, built as its run will build it
        try:
            resolve_model_config(preset, kw["attention"], kw.get("n_kv_heads"), kw.get("head_norm"),
                                 {**(model or {}), **kw.get("model", {})}, data.seq_len)
        except ValueError as e:
            field = str(e).partition(":")[0]
            if field in ("preset", *kw, *kw.get("model", {})):
                raise ValueError(f"variants: {v}: {e}" if field != "preset" else str(e)) from e
            raise ValueError(f"model.{e}") from e
    out_dir = output_folder("out", out, "sweep", overwrite, own=is_sweep)
    return out_dir, parsed


def _train_jobs(todo, preset, data, train, gpus, procs_per_gpu, device, compile, deadline) -> None:
    if gpus:
        _run_parallel(todo, preset, data, train, [g for _ in range(procs_per_gpu) for g in gpus], compile, deadline)
        return
    from tqdm.auto import tqdm

    from .pretrain import pretrain

    for v, lr, seed, run_dir, kw in tqdm(todo, desc="sweep", dynamic_ncols=True):
        if deadline and time.time() > deadline:
            print("sweep: deadline reached; run the sweep again to continue", file=sys.stderr)
            break
        tr = dataclasses.replace(train, lr=lr, seed=seed)
        resume = (run_dir / "config.yaml").exists()
        pretrain(out=str(run_dir), preset=preset, data=data, train=tr, resume=resume, device=device,
                 compile=compile, progress=False, **kw)


def _status(run_dir: Path) -> dict:
    """A run's status.json ({} if there is none, or if it cannot be read: the run is then resumed)."""
    f = run_dir / "status.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"sweep: {f} is unreadable; the run resumes from its last checkpoint", file=sys.stderr)
        return {}


def _done(run_dir: Path) -> bool:
    return _status(run_dir).get("status") in ("finished", "diverged")


def _best_from(sweep_dir: Path, variants: list[str]) -> dict[str, float]:
    csv_path = sweep_dir / "results.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"lrs_from: {csv_path} not found (run that sweep first)")
    best = best_lrs(read_results(sweep_dir))
    missing = [v for v in variants if v not in best]
    if missing:
        raise ValueError(f"lrs_from: {csv_path} has no finished run of {', '.join(missing)}")
    return {v: best[v][0] for v in variants}


def _link_finished(jobs, src_dir: Path, preset: str, data: DataConfig, train: TrainConfig) -> None:
    """Link runs the earlier sweep already finished (same variant, rate and seed) into this sweep, where
    they were trained with the settings this sweep would use; the others are trained here."""
    for v, lr, seed, run_dir, kw in jobs:
        src = src_dir / run_name(v, lr, seed)
        if run_dir.exists() or not _done(src):
            continue
        diffs = _settings_differ(src, preset, data, dataclasses.replace(train, lr=lr, seed=seed), kw)
        if diffs:
            print(f"lrs_from: not reusing {src} ({'; '.join(diffs[:3])}); training it here", file=sys.stderr)
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.symlink_to(os.path.relpath(src.resolve(), run_dir.parent.resolve()), target_is_directory=True)


def _settings_differ(run_dir: Path, preset: str, data: DataConfig, train: TrainConfig, kw: dict) -> list[str]:
    """What differs between a finished run's config.yaml and a run of these settings (empty: the same run)."""
    import yaml

    from .pretrain import resolve_model_config

    f = run_dir / "config.yaml"
    if not f.is_file():
        return [f"{f} is missing"]
    conf = yaml.safe_load(f.read_text())
    cfg = resolve_model_config(preset, kw.get("attention"), kw.get("n_kv_heads"), kw.get("head_norm"),
                               kw.get("model"), data.seq_len)
    want = {"preset": preset, "model": cfg.to_dict(), "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(train)}
    diffs = []
    for key in ("preset", "model", "data", "train"):
        have, need = conf.get(key), want[key]
        if isinstance(need, dict) and isinstance(have, dict):
            # a key the saved config lacks is an option added since that run: not a difference
            diffs += [f"{key}.{k}: {have.get(k)!r} there, {v!r} here" for k, v in need.items()
                      if k != "name" and k in have and have[k] != v]
        elif have != need:
            diffs.append(f"{key}: {have!r} there, {need!r} here")
    return diffs


def _run_parallel(todo, preset, data, train, slots, compile, deadline=None) -> None:
    """`mea pretrain` subprocesses on GPU slots (a GPU id, repeated for runs sharing a GPU)."""
    import yaml

    from ..procs import Job, run_on_gpus

    jobs, dirs = [], {}
    for v, lr, seed, run_dir, kw in todo:
        run_dir.mkdir(parents=True, exist_ok=True)
        conf = {"out": str(run_dir), "preset": preset, "data": dataclasses.asdict(data),
                "train": dataclasses.asdict(dataclasses.replace(train, lr=lr, seed=seed)),
                "compile": compile, "progress": False, **kw}
        conf_file = run_dir / "sweep_args.yaml"
        conf_file.write_text(yaml.safe_dump(conf))
        args = [sys.executable, "-m", "mea.cli", "pretrain", "--config", str(conf_file)]
        if (run_dir / "config.yaml").exists():
            args.append("--resume=true")
        jobs.append(Job(str(run_dir), args, run_dir / "stdout.log"))
        dirs[str(run_dir)] = run_dir
    codes = run_on_gpus(jobs, slots, deadline)
    if len(codes) < len(jobs):
        print("sweep: run the sweep again to start the rest", file=sys.stderr)
    for name, code in codes.items():
        if code != 0 and not _done(dirs[name]):  # a diverged run exits 1 but is done
            print(f"sweep: {name} failed with exit code {code}; see {dirs[name] / 'stdout.log'}", file=sys.stderr)


def collect(jobs) -> list[dict]:
    rows = []
    for v, lr, seed, run_dir, _ in jobs:
        recs = read_metrics(run_dir / "metrics.jsonl")
        vals = [r["val_loss"] for r in recs if "val_loss" in r]
        status = _status(run_dir).get("status", "missing")
        last = recs[-1] if recs else {}
        rows.append({"variant": v, "lr": lr, "seed": seed, "status": status,
                     "final_val_loss": vals[-1] if vals and status == "finished" else None,
                     "best_val_loss": min(vals) if vals else None, "steps": last.get("step"),
                     "tokens": last.get("tokens"), "run_dir": str(run_dir)})
    return rows


def best_lrs(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """variant -> (best learning rate, its final validation loss averaged over seeds)."""
    by: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        if r["final_val_loss"] is not None:
            by.setdefault((r["variant"], r["lr"]), []).append(r["final_val_loss"])
    best: dict[str, tuple[float, float]] = {}
    for (v, lr), losses in by.items():
        m = sum(losses) / len(losses)
        if v not in best or m < best[v][1]:
            best[v] = (lr, m)
    return best


def plot_loss_vs_lr(rows: list[dict], path: Path, title: str = "final loss vs learning rate (x = diverged)") -> None:
    """Final validation loss (mean over seeds) against peak learning rate, one line per variant;
    diverged rates are marked x above the highest finite loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    finite = [r["final_val_loss"] for r in rows if r["final_val_loss"] is not None]
    top = max(finite) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for v in variants:
        pts: dict[float, list[float]] = {}
        for r in rows:
            if r["variant"] == v and r["final_val_loss"] is not None:
                pts.setdefault(r["lr"], []).append(r["final_val_loss"])
        xs = sorted(pts)
        line = ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], "o-", label=v)[0]
        bad = sorted({r["lr"] for r in rows if r["variant"] == v and r["status"] == "diverged"})
        if bad:
            ax.plot(bad, [top * 1.02] * len(bad), "x", color=line.get_color(), ms=9, mew=2)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_loss_vs_lr(rows, out_dir / "loss_vs_lr.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for v, (lr, _) in best_lrs(rows).items():
        for r in rows:
            if r["variant"] == v and r["lr"] == lr:
                recs = read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
                pts = [(x["tokens"], x["val_loss"]) for x in recs if "val_loss" in x]
                if pts:
                    ax.plot(*zip(*pts), label=f"{v} lr={lr:.1e} s{r['seed']}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss at each variant's best learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curves_best_lr.png", dpi=120)
    plt.close(fig)


def _print_table(rows: list[dict]) -> None:
    print(f"{'variant':<28} {'lr':>9} {'seed':>4} {'status':>9} {'final val':>10}")
    for r in rows:
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        print(f"{r['variant']:<28} {r['lr']:>9.2e} {r['seed']:>4} {r['status']:>9} {val:>10}")
    for v, (lr, loss) in best_lrs(rows).items():
        print(f"best {v}: lr {lr:.2e}, val loss {loss:.4f} (ppl {math.exp(loss):.1f})")
