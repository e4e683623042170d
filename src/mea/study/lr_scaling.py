"""Experiment 5 of docs/results.md: the optimal learning rate at three sizes, a power law, a prediction.

    mea sweep --config configs/study/lr_scaling_s1.yaml      # and _s2, _s3
    mea study-lr-scaling                                     # -> runs/study/lr_scaling/fit
    mea pretrain --config runs/study/lr_scaling/fit/predicted_mha.yaml   # or the check sweep:
    mea sweep --config runs/study/lr_scaling/fit/check_mha.yaml          # predicted lr x 1/2, 1, 2
    mea study-lr-scaling                                     # again: adds the check to the table

(``python -m mea.study.lr_scaling`` takes the same arguments.)

For each sweep (one model size each; `mea sweep` writes SWEEP/results.csv, and each run's
config.yaml holds the resolved ModelConfig) and each variant:
  * the optimal learning rate: the vertex of the parabola through the grid's best point and its two
    neighbours in (log lr, final validation loss); at an edge of the grid (or with a diverged
    neighbour) the grid best itself, flagged, since it is then only a bound;
  * per variant, lr* = a * N^b by least squares in log-log (N = non-embedding parameters);
  * the predicted rate at a larger size (`--predict_preset`, default 125m, plus `--predict_for`
    ModelConfig overrides), with the standard error of the fit there.
Writes OUT/lr_scaling.json, OUT/lr_scaling.png (lr* against N, fit lines, prediction),
OUT/loss_vs_lr.png (the grids and the parabolas), OUT/predicted_<variant>.yaml (a `mea pretrain
--config` file for the larger size at the predicted rate, same data and training settings as the
sweeps) and OUT/check_<variant>.yaml (a `mea sweep --config` file at the predicted rate times
--check_factors; its middle run is the predicted_<variant>.yaml run, so either trains it once).
When the check sweeps have run, their measured optimum is reported next to the prediction.
Sweeps that are missing or unfinished are skipped with a note; a variant with fewer than 2 sizes
gets no fit.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from ..models.config import ModelConfig
from ..io.results import read_results
from ..train.sweep import parse_variant, run_name

DONE = ("finished", "diverged")
# Settings that may differ between the runs of one fit: the swept rate, the seed, the run directory.
PER_RUN = ("lr", "seed")


def note(msg: str) -> None:
    print(f"lr_scaling: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- math
def parabola_vertex(xs: list[float], ys: list[float]) -> Optional[tuple[float, float]]:
    """Vertex (x, y) of the parabola through three points, or None if it is not convex (flat/concave)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d0, d2 = x0 - x1, x2 - x1
    # y = y1 + p (x - x1) + q (x - x1)^2 through the two outer points
    q = ((y0 - y1) / d0 - (y2 - y1) / d2) / (d0 - d2)
    p = (y0 - y1) / d0 - q * d0
    if not q > 0:
        return None
    dx = -p / (2 * q)
    return x1 + dx, y1 + p * dx + q * dx * dx


def optimum(points: dict[float, float], diverged: list[float] = ()) -> dict:
    """Optimal rate of one grid: ``points`` maps lr -> final validation loss (finished runs only).

    Returns grid_best_lr/loss, lr_star/loss_star (the parabola's vertex in log lr, or the grid best
    at an edge) and ``edge``: None, "low" (best at the lowest rate), "high" (best at the highest
    finished rate; ``diverged_above`` says whether a higher one diverged), "flat" or "single".
    """
    lrs = sorted(points)
    i = min(range(len(lrs)), key=lambda j: points[lrs[j]])
    best, loss = lrs[i], points[lrs[i]]
    out = {"grid_best_lr": best, "grid_best_loss": loss, "lr_star": best, "loss_star": loss, "edge": None,
           "diverged_above": any(d > best for d in diverged), "used": [best]}
    if len(lrs) == 1:
        out["edge"] = "single"
    elif i == 0:
        out["edge"] = "low"
    elif i == len(lrs) - 1:
        out["edge"] = "high"
    else:
        used = lrs[i - 1:i + 2]
        v = parabola_vertex([math.log(x) for x in used], [points[x] for x in used])
        if v is None:
            out["edge"] = "flat"
        else:
            out.update(lr_star=math.exp(v[0]), loss_star=v[1], used=used)
    return out


def fit_power_law(ns: list[float], lrs: list[float], predict_n: Optional[float] = None) -> dict:
    """lr = a * N^b by least squares on (log10 N, log10 lr); with >= 3 points the standard errors."""
    xs, ys = [math.log10(n) for n in ns], [math.log10(v) for v in lrs]
    n = len(xs)
    xm, ym = sum(xs) / n, sum(ys) / n
    sxx = sum((x - xm) ** 2 for x in xs)
    b = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sxx
    c = ym - b * xm
    res = [y - (c + b * x) for x, y in zip(xs, ys)]
    out: dict[str, Any] = {"a": 10 ** c, "b": b, "n_points": n, "rms_log10": math.sqrt(sum(r * r for r in res) / n),
                           "b_se": None, "pred_se_log10": None}
    s2 = sum(r * r for r in res) / (n - 2) if n > 2 else None
    if s2 is not None:
        out["b_se"] = math.sqrt(s2 / sxx)
    if predict_n is not None:
        x0 = math.log10(predict_n)
        out["predicted_lr"] = 10 ** (c + b * x0)
        if s2 is not None:
            out["pred_se_log10"] = math.sqrt(s2 * (1 / n + (x0 - xm) ** 2 / sxx))
    return out


# ------------------------------------------------------------------------------------- reading
def run_config(run_dir: Path) -> Optional[dict]:
    """The run's config as `mea pretrain` wrote it (config.yaml, the full ModelConfig under model:),
    or, for a run that never started, rebuilt from the sweep's sweep_args.yaml."""
    import yaml

    if (run_dir / "config.yaml").is_file():
        return yaml.safe_load((run_dir / "config.yaml").read_text())
    if (run_dir / "sweep_args.yaml").is_file():
        from ..train.pretrain import resolve_model_config

        c = yaml.safe_load((run_dir / "sweep_args.yaml").read_text())
        cfg = resolve_model_config(c.get("preset", "tiny"), c.get("attention"), c.get("n_kv_heads"),
                                   c.get("head_norm"), c.get("model"), c.get("data", {}).get("seq_len", 128))
        return {**c, "model": cfg.to_dict()}
    return None


def non_embedding_params(model: dict) -> int:
    return ModelConfig.from_dict(model).num_params(non_embedding=True)


def size_label(model: dict) -> str:
    return f"{model['d_model']}/{model['n_layers']}/{model['n_heads']}"


def settings_of(conf: dict) -> dict:
    """What must agree between the runs of one fit (all but the rate and seed): data, train, compile."""
    train = {k: v for k, v in conf.get("train", {}).items() if k not in PER_RUN}
    return {"data": conf.get("data"), "train": train, "compile": conf.get("compile")}


def collect(sweeps: list[str], variants: Optional[list[str]], allow_partial: bool,
            skipped: list[str]) -> dict[str, dict[int, dict]]:
    """variant -> N -> {label, model, sweeps, points {lr: [losses]}, diverged, settings}."""
    groups: dict[str, dict[int, dict]] = {}
    for s in sweeps:
        sweep = Path(s).expanduser()
        if not (sweep / "results.csv").is_file():
            why = ("not run yet (no such directory)" if not sweep.exists() else
                   "unfinished (no results.csv: `mea sweep` writes it when all its runs are done)")
            skipped.append(f"{sweep}: {why}; skipped")
            note(skipped[-1])
            continue
        rows = read_results(sweep)
        for v in dict.fromkeys(r["variant"] for r in rows):
            if variants is not None and v not in variants:
                continue
            vrows = [r for r in rows if r["variant"] == v]
            undone = [r for r in vrows if r["status"] not in DONE]
            if undone and not allow_partial:
                skipped.append(f"{sweep} {v}: {len(undone)} of {len(vrows)} runs unfinished "
                               f"({', '.join(sorted({r['status'] for r in undone}))}: "
                               f"{', '.join(r['dir'].name for r in undone)}); run the sweep again to finish them, "
                               "or pass --allow_partial true; skipped")
                note(skipped[-1])
                continue
            confs = [(r, run_config(r["dir"])) for r in vrows if r["status"] in DONE]
            missing = [r["dir"] for r, c in confs if c is None]
            if missing:
                skipped.append(f"{sweep} {v}: no config.yaml in {', '.join(map(str, missing))}; those runs skipped")
                note(skipped[-1])
            for r, conf in confs:
                if conf is None:
                    continue
                n = non_embedding_params(conf["model"])
                g = groups.setdefault(v, {}).setdefault(n, {
                    "label": size_label(conf["model"]), "model": conf["model"], "sweeps": [], "points": {},
                    "diverged": set(), "settings": settings_of(conf), "conf": conf})
                if str(sweep) not in g["sweeps"]:
                    g["sweeps"].append(str(sweep))
                if settings_of(conf) != g["settings"]:
                    note(f"{r['dir']}: its data/train settings differ from the other runs of {v} at {g['label']} "
                         "(merged anyway: check that the sweeps are comparable)")
                if r["status"] == "finished" and r["final_val_loss"] is not None:
                    g["points"].setdefault(r["lr"], []).append(r["final_val_loss"])
                elif r["status"] == "diverged":
                    g["diverged"].add(r["lr"])
    return groups


def size_point(v: str, n: int, g: dict) -> Optional[dict]:
    means = {lr: sum(ls) / len(ls) for lr, ls in g["points"].items()}
    diverged = sorted(lr for lr in g["diverged"] if lr not in means)
    if not means:
        return None
    opt = optimum(means, diverged)
    return {"variant": v, "size": g["label"], "N": n, "sweeps": g["sweeps"],
            "grid": [[lr, means[lr]] for lr in sorted(means)], "diverged": diverged, **opt}


def edge_note(p: dict) -> str:
    return {None: "", "low": "EDGE: best at the lowest rate (lr* is an upper bound)",
            "high": "EDGE: best at the highest finished rate (lr* is a lower bound)"
                    + ("; the next rate diverged" if p["diverged_above"] else ""),
            "flat": "FLAT: no convex parabola through the best point and its neighbours",
            "single": "one finished rate only"}[p["edge"]]


# ------------------------------------------------------------------------------------- writing
def _fmt_lr(x: float) -> str:
    return f"{x:.2e}"


def predicted_configs(v: str, lr: float, base_conf: dict, predict_preset: str, predict_for: Optional[dict],
                      check_root: str, check_factors: list[float], check_gpus: list[int],
                      procs_per_gpu: int) -> tuple[dict, dict]:
    """(pretrain config at lr, sweep config at lr x check_factors) for the larger size."""
    kw = parse_variant(v)
    model = {**(predict_for or {}), **kw.pop("model", {})}
    safe = v.replace(":", "_").replace(",", "_").replace("=", "-")
    train = {**base_conf["train"], "lr": lr, "seed": 0}
    common: dict[str, Any] = {"preset": predict_preset}
    if model:
        common["model"] = model
    pre = {"out": f"{check_root}/{safe}/{run_name(v, lr, 0)}", **common, **kw, "data": base_conf["data"],
           "train": train, "compile": bool(base_conf.get("compile", False))}
    others = [float(f"{lr * f:.3g}") for f in check_factors if f != 1]
    lrs = [lr] + sorted(others, key=lambda x: abs(math.log(x / lr)))  # middle-out
    sw = {"out": f"{check_root}/{safe}", **common, "variants": [v], "lrs": lrs, "seeds": [0],
          "data": base_conf["data"], "train": {k: x for k, x in train.items() if k not in PER_RUN},
          "compile": bool(base_conf.get("compile", False)), "gpus": list(check_gpus), "procs_per_gpu": procs_per_gpu}
    return pre, sw


def write_yaml(path: Path, conf: dict, header: list[str]) -> None:
    import yaml

    path.write_text("".join(f"# {h}\n" for h in header) + yaml.safe_dump(conf, sort_keys=False))


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for k, (v, r) in enumerate(result["variants"].items()):
        color = f"C{k}"
        pts = r["points"]
        if not pts:
            continue
        inner = [p for p in pts if p["edge"] is None]
        edge = [p for p in pts if p["edge"] is not None]
        ax.plot([p["N"] for p in inner], [p["lr_star"] for p in inner], "o", color=color, label=f"{v}: optimum")
        if edge:
            ax.plot([p["N"] for p in edge], [p["lr_star"] for p in edge], "o", mfc="none", color=color,
                    label=f"{v}: grid edge (bound)")
        ax.plot([p["N"] for p in pts], [p["grid_best_lr"] for p in pts], "_", color=color, ms=12)
        fit, pred = r.get("fit"), r.get("prediction")
        if fit:
            ns = [p["N"] for p in pts] + ([pred["N"]] if pred else [])
            lo, hi = min(ns) / 1.3, max(ns) * 1.3
            xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            ax.plot(xs, [fit["a"] * x ** fit["b"] for x in xs], "-", color=color, alpha=0.7,
                    label=f"{v}: lr* = {fit['a']:.3g} N^{fit['b']:.3f}")
        if pred:
            ax.plot([pred["N"]], [pred["lr"]], "*", color=color, ms=14, mec="k",
                    label=f"{v}: predicted {pred['lr']:.2e}")
        chk = r.get("check")
        if chk and chk.get("lr_star"):
            ax.plot([chk["N"]], [chk["lr_star"]], "D", color=color, mfc="none" if chk["edge"] else color, mec="k",
                    label=f"{v}: measured {chk['lr_star']:.2e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("optimal peak learning rate")
    ax.set_title("optimal learning rate vs size (bars: grid best)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_scaling.png", dpi=120)
    plt.close(fig)

    names = [v for v, r in result["variants"].items() if r["points"]]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, v in zip(axes[0], names):
        r = result["variants"][v]
        rows = r["points"] + ([r["check"]] if r.get("check") else [])
        for k, p in enumerate(rows):
            color = f"C{k}"
            xs, ys = zip(*p["grid"])
            ax.plot(xs, ys, "o", color=color, label=f"{p['size']} (N={p['N'] / 1e6:.1f}M)")
            if p["edge"] is None:
                u = p["used"]
                lx = [math.log(x) for x in u]
                ly = [dict(p["grid"])[x] for x in u]
                grid = [lx[0] + (lx[2] - lx[0]) * i / 40 for i in range(41)]
                ax.plot([math.exp(g) for g in grid], [_lagrange(lx, ly, g) for g in grid], "-", color=color, alpha=0.7)
                ax.plot([p["lr_star"]], [p["loss_star"]], "x", color=color, ms=9, mew=2)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"{v}: grid and parabola (x = lr*)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_lr.png", dpi=120)
    plt.close(fig)


def _lagrange(xs: list[float], ys: list[float], x: float) -> float:
    return sum(ys[i] * math.prod((x - xs[j]) / (xs[i] - xs[j]) for j in range(3) if j != i) for i in range(3))


# ---------------------------------------------------------------------------------------- main
def main(sweeps: list[str] = ["runs/study/lr_scaling/s1", "runs/study/lr_scaling/s2", "runs/study/lr_scaling/s3"],
         out: str = "runs/study/lr_scaling/fit", variants: Optional[list[str]] = None, predict_preset: str = "125m",
         predict_for: Optional[dict] = None, exclude_edges: bool = False, allow_partial: bool = False,
         check_root: str = "runs/study/lr_scaling/check", check_factors: list[float] = [0.5, 1.0, 2.0],
         check_gpus: list[int] = [0], procs_per_gpu: int = 3, plots: bool = True, overwrite: bool = False) -> dict:
    """Fit lr* = a N^b per variant from learning-rate sweeps at several sizes; predict a larger size.

    Args:
        sweeps: sweep directories (`mea sweep` OUT, one model size each; sweeps of the same size merge).
        out: where lr_scaling.json, the PNGs and the predicted YAML files go.
        variants: variants to fit (default: every variant in the sweeps).
        predict_preset: preset of the larger size to predict for.
        predict_for: ModelConfig overrides on that preset, e.g. {d_model: 1024, n_layers: 16, n_heads: 16}.
        exclude_edges: leave sizes whose optimum is at the grid's edge (a bound) out of the fit.
        allow_partial: use sweeps with unfinished runs (their finished runs only).
        check_root: run directories of the check at the larger size (in the written YAML files); the
            check's results are read back from CHECK_ROOT/<variant>/results.csv when they exist.
        check_factors: the check sweep trains at the predicted rate times these.
        check_gpus: `gpus` of the check sweep YAML.
        procs_per_gpu: `procs_per_gpu` of the check sweep YAML.
        plots: draw lr_scaling.png and loss_vs_lr.png.
        overwrite: replace what OUT holds when mea study-lr-scaling did not write it.
    """
    from ..runtime import empty_folder, holding_only, option_names, output_folder
    from ..train.pretrain import resolve_model_config

    if not sweeps:
        raise ValueError("sweeps: needs at least one sweep directory")
    for v in variants or []:
        parse_variant(v)
    from ..models.config import PRESETS

    if predict_preset not in PRESETS:
        raise ValueError(f"predict_preset: unknown preset {predict_preset!r}; expected one of {', '.join(PRESETS)}")
    with option_names("predict_for"):
        ModelConfig.from_preset(predict_preset, **(predict_for or {}))
    if not check_factors or not all(f > 0 for f in check_factors):
        raise ValueError(f"check_factors: must be positive, got {check_factors}")
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in check_gpus):
        raise ValueError(f"check_gpus: GPU indices are integers >= 0, got {check_gpus}")
    if procs_per_gpu < 1:
        raise ValueError(f"procs_per_gpu: must be >= 1, got {procs_per_gpu}")
    dest = output_folder("out", out, "study-lr-scaling", overwrite,
                         own=holding_only("lr_scaling.json", "*.png", "predicted_*.yaml", "check_*.yaml", "*.tmp"))
    skipped: list[str] = []
    groups = collect(sweeps, variants, allow_partial, skipped)
    result: dict[str, Any] = {"sweeps": sweeps, "skipped": skipped, "predict_preset": predict_preset,
                              "predict_for": predict_for, "exclude_edges": exclude_edges, "variants": {}}
    if not groups:
        note("no finished sweep to fit; nothing written")
        return result
    if overwrite and dest.exists():
        empty_folder(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = ["| variant | size (d/L/h) | N non-emb. | grid-best lr | its loss | fitted lr* | loss at lr* | note |",
             "|---|---|---|---|---|---|---|---|"]
    fits = []
    for v, by_n in groups.items():
        pts = [p for n in sorted(by_n) if (p := size_point(v, n, by_n[n])) is not None]
        r: dict[str, Any] = {"points": pts, "fit": None, "prediction": None, "check": None}
        result["variants"][v] = r
        for p in pts:
            lines.append(f"| {v} | {p['size']} | {p['N']:,} | {_fmt_lr(p['grid_best_lr'])} | {p['grid_best_loss']:.4f} "
                         f"| {_fmt_lr(p['lr_star'])} | {p['loss_star']:.4f} | {edge_note(p)} |")
        use = [p for p in pts if not (exclude_edges and p["edge"] is not None)]
        if len(use) < 2:
            r["no_fit"] = (f"{v}: no fit possible: {len(use)} size(s) with an optimum"
                           + (" (edge optima excluded)" if exclude_edges and len(use) < len(pts) else "")
                           + "; the fit needs at least 2")
            fits.append(r["no_fit"])
            continue
        base = by_n[max(p["N"] for p in use)]["conf"]
        kw = parse_variant(v)
        pcfg = resolve_model_config(predict_preset, kw["attention"], kw.get("n_kv_heads"), kw.get("head_norm"),
                                    {**(predict_for or {}), **kw.get("model", {})}, base["data"]["seq_len"])
        pn = pcfg.num_params(non_embedding=True)
        fit = fit_power_law([p["N"] for p in use], [p["lr_star"] for p in use], pn)
        r["fit"] = {k: x for k, x in fit.items() if k != "predicted_lr"}
        r["fit"]["sizes"] = [p["size"] for p in use]
        lr = float(f"{fit['predicted_lr']:.3g}")
        pre, sw = predicted_configs(v, lr, base, predict_preset, predict_for, check_root, check_factors, check_gpus,
                                    procs_per_gpu)
        safe = v.replace(":", "_").replace(",", "_").replace("=", "-")
        se = fit["pred_se_log10"]
        law = f"lr* = {fit['a']:.4g} * N^{fit['b']:.4f} from {len(use)} sizes ({', '.join(r['fit']['sizes'])})"
        header = [f"Generated by mea study-lr-scaling (experiment 5 of docs/results.md), variant {v}:",
                  law + ",", f"predicted for {predict_preset}{' + ' + json.dumps(predict_for) if predict_for else ''} "
                  f"(N = {pn:,} non-embedding): lr = {lr:.3g}"
                  + (f" (x/ {10 ** se:.2f} one standard error of the fit)" if se is not None else "") + ".",
                  "Data and training settings: those of the sweeps (same token budget)."]
        write_yaml(dest / f"predicted_{safe}.yaml", pre,
                   header + [f"Run: mea pretrain --config {dest / f'predicted_{safe}.yaml'}"])
        write_yaml(dest / f"check_{safe}.yaml", sw, header + [
            f"Check: the predicted rate x {check_factors}; its run at the predicted rate is the same directory",
            f"as predicted_{safe}.yaml's. Run: mea sweep --config {dest / f'check_{safe}.yaml'}"])
        r["prediction"] = {"N": pn, "size": size_label(pcfg.to_dict()), "preset": predict_preset,
                           "model": predict_for, "lr": lr, "lr_unrounded": fit["predicted_lr"],
                           "se_factor": 10 ** se if se is not None else None,
                           "extrapolation": pn / max(p["N"] for p in use),
                           "pretrain_yaml": str(dest / f"predicted_{safe}.yaml"),
                           "check_yaml": str(dest / f"check_{safe}.yaml"), "run_dir": pre["out"]}
        edges = [p["size"] for p in use if p["edge"] is not None]
        fits.append(f"{v}: {law}"
                    + (f"; b = {fit['b']:.3f} +- {fit['b_se']:.3f}, rms residual x{10 ** fit['rms_log10']:.2f}"
                       if fit["b_se"] is not None else " (2 points: exact, no error estimate)")
                    + (f"; WARNING: {', '.join(edges)} at the grid's edge (bounds, not optima): widen those grids"
                       if edges else ""))
        pdesc = predict_preset + (" with overrides" if predict_for else "")
        fits.append(f"  predicted at {r['prediction']['size']} ({pdesc}, N = {pn:,}, "
                    f"x{r['prediction']['extrapolation']:.1f} beyond the largest fitted size): lr = {lr:.3g}"
                    + (f" (x/ {10 ** se:.2f})" if se is not None else "")
                    + f" -> {r['prediction']['pretrain_yaml']}, check sweep {r['prediction']['check_yaml']}")
        # The check at the larger size, if it has run.
        chk_dir = Path(check_root) / safe
        if (chk_dir / "results.csv").is_file():
            chk_skipped: list[str] = []
            cg = collect([str(chk_dir)], [v], allow_partial, chk_skipped).get(v, {})
            cp = size_point(v, pn, cg[pn]) if pn in cg else None
            if cp is not None:
                at = dict(map(tuple, cp["grid"])).get(lr)
                cp.update(loss_at_predicted=at, ratio_measured_to_predicted=cp["lr_star"] / lr)
                r["check"] = cp
                lines.append(f"| {v} (check) | {cp['size']} | {cp['N']:,} | {_fmt_lr(cp['grid_best_lr'])} "
                             f"| {cp['grid_best_loss']:.4f} | {_fmt_lr(cp['lr_star'])} | {cp['loss_star']:.4f} "
                             f"| measured; predicted {lr:.2e}"
                             + (f" (loss {at:.4f})" if at is not None else "")
                             + (f"; {edge_note(cp)}" if cp["edge"] else "") + " |")
                fits.append(f"  check at {cp['size']}: measured lr* = {cp['lr_star']:.3g}, "
                            f"{cp['lr_star'] / lr:.2f}x the prediction" + (f" ({edge_note(cp)})" if cp["edge"] else ""))
            else:
                fits.append(f"  check at {r['prediction']['size']}: {chk_dir} has no finished run of this size yet")
        elif chk_dir.exists():
            fits.append(f"  check at {r['prediction']['size']}: {chk_dir} unfinished (no results.csv yet)")
    (dest / "lr_scaling.json").write_text(json.dumps(result, indent=2, default=str))
    if plots:
        plot(result, dest)
    print("\n".join(lines + [""] + fits))
    for s in skipped:
        print(f"skipped: {s}")
    pngs = f", {dest / 'lr_scaling.png'}, {dest / 'loss_vs_lr.png'}" if plots else ""
    print(f"wrote {dest / 'lr_scaling.json'}{pngs}")
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
