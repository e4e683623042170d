"""The from-scratch study of docs/results.md: MEA against GQA at h' < h, at 10 tokens per parameter.

    mea sweep --config configs/study/scratch/pilot.yaml        # (a) rates and head-norm scales, on `select`
    mea study-scratch declare                                 # -> configs/study/scratch/declared.yaml
    mea sweep --config configs/study/scratch/stability.yaml    # (c) each variant's largest stable rate
    mea sweep --config configs/study/scratch/main_b01.yaml     # (b, d) ... main_b13.yaml
    mea sweep --config configs/study/scratch/m125_b01.yaml     # (e) if budget remains ... m125_b04.yaml
    mea study-scratch report                                  # -> docs/study/scratch/
    mea study-scratch plan                                    # the GPU plan: blocks and hours

``declare`` picks, per variant, the pilot's lowest final loss on the ``select`` split (its learning rate
and its head norm's initial weight) and refuses a choice at the edge of the grid. ``report`` reads the
finished runs and writes OUT/summary.json (one record per finished run measured on ``val``, in the
issue's fields exactly), OUT/stability.json (every run of the stability sweep: divergence, loss spikes,
attention logits), OUT/selection.json (the pilot, on ``select``), OUT/report.md (tables, paired tests
over seeds, and the three questions answered yes / no / unresolved by :func:`answers`, which reads the
two JSON files and nothing else) and the plots. ``plan`` turns the configs into GPU blocks and hours.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from ..models.config import ModelConfig
from ..train.metrics import read_metrics
from ..io.results import read_results
from ..runtime import SHIPPED_CONFIGS
from ..train.sweep import parse_variant

CONFIGS = str(SHIPPED_CONFIGS / "study" / "scratch")  # the study's configs, shipped with mea
CHOICES = f"{CONFIGS}/declared.yaml"  # written once by `declare`, committed beside them
# The study's variants at the small preset (8 heads): label -> sweep spec, the keys of declared.yaml.
VARIANTS = {"mha": "mha", "mha + head norm": "mha:head_norm=true", "gqa(h/2)": "gqa:n_kv_heads=4",
            "gqa(h/4)": "gqa:n_kv_heads=2", "mea(h)": "mea", "mea(h/2)": "mea:n_kv_heads=4",
            "mea(h/4)": "mea:n_kv_heads=2", "diff": "diff", "diff, no norm": "diff:head_norm=false"}
# Part (e) at 125m (12 heads): its specs and the small-preset choice each is scaled from, by
# experiment 5's fit for mea, lr* proportional to N^-0.34 (exponent +- 0.06).
SCALED = {"mea:n_kv_heads=6": "mea:n_kv_heads=4", "gqa:n_kv_heads=6": "gqa:n_kv_heads=4"}
SCALED_PRESET = "125m"
LR_EXPONENT = -0.34
# Comparisons (A, B) of the report, A - B per matched seed; made wherever both arms ran at one scale.
COMPARISONS = [("mea(h/2)", "gqa(h/2)"), ("mea(h)", "mha + head norm"), ("mha + head norm", "mha"), ("mea(h)", "mha"),
               ("mea(h/4)", "gqa(h/4)"), ("mea(h/2)", "mea(h)"), ("gqa(h/2)", "mha"), ("diff", "mha"),
               ("diff", "diff, no norm"), ("diff, no norm", "mha")]
TOKENS_PER_PARAM = 10  # the main runs' budget; runs with at least this many tokens per parameter are "main"
SPIKE_NATS = 0.5  # a loss spike: the training loss this far above its lowest value so far
NEAR_BEST_NATS = 0.1
ALPHA = 0.05
FIELDS = ["variant", "n_heads", "n_kv_heads", "head_norm", "seed", "lr", "tokens", "non_embedding_params",
          "final_val_loss", "split"]


def note(msg: str) -> None:
    print(f"study-scratch: {msg}", file=sys.stderr)


def _atomic(path: Path, text: str) -> None:
    from ..runtime import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------- statistics
def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer ``df`` >= 1 (Abramowitz and Stegun 26.7.3-4, exact)."""
    if df < 1:
        raise ValueError(f"df: must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, series = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired comparison of two arms' final losses by seed: A - B on the seeds both have.

    ``n`` matched seeds, ``mean_diff`` (negative: A lower), ``sd_diff``, a paired t-test (``t``, ``df`` = n - 1,
    two-sided ``p``; None below 2 seeds), each arm's mean and seed spread (max - min over all its seeds)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out = {"n": len(seeds), "seeds": seeds, "mean_a": statistics.fmean(a.values()) if a else None,
           "mean_b": statistics.fmean(b.values()) if b else None, "n_a": len(a), "n_b": len(b),
           "spread_a": max(a.values()) - min(a.values()) if a else None,
           "spread_b": max(b.values()) - min(b.values()) if b else None,
           "mean_diff": statistics.fmean(d) if d else None, "sd_diff": None, "t": None, "df": None, "p": None}
    if len(d) >= 2:
        sd = statistics.stdev(d)
        t = out["mean_diff"] / (sd / math.sqrt(len(d))) if sd > 0 else math.copysign(math.inf, out["mean_diff"] or 1)
        out.update(sd_diff=sd, t=t if math.isfinite(t) else None, df=len(d) - 1, p=t_two_sided_p(t, len(d) - 1))
    return out


def lower_beyond_spread(c: Optional[dict]) -> tuple[str, str]:
    """Whether arm A ends lower than arm B by more than the seed spread: ("yes" | "no" | "unresolved", why).

    yes: A - B < 0 on average over matched seeds, by more than the larger of the two arms' seed spreads,
    and a paired t-test gives p < 0.05. no: A is not lower by more than that spread (higher, equal, or
    within it). unresolved: fewer than 2 matched seeds, or lower beyond the spread with p >= 0.05."""
    if not c or c["n"] < 2:
        return "unresolved", f"{c['n'] if c else 0} matched seed(s); a paired test needs at least 2"
    gap, spread = c["mean_diff"], max(c["spread_a"], c["spread_b"])
    nums = (f"A - B = {gap:+.4f} nats (mean of {c['n']} matched seeds, sd {c['sd_diff']:.4f}); seed spread "
            f"{spread:.4f}; paired t = {_fmt(c['t'], '.2f', 'inf')}, df {c['df']}, p = {c['p']:.3g}")
    if gap < 0 and -gap > spread and c["p"] < ALPHA:
        return "yes", nums
    if gap >= 0 or -gap <= spread:
        return "no", nums
    return "unresolved", nums + f" (beyond the spread, but p >= {ALPHA})"


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


# ----------------------------------------------------------------------------------------- runs
def label(attention: str, n_heads: int, n_kv_heads: int, head_norm: bool) -> str:
    """The study's name of a variant: mha, mha + head norm, gqa(h/2), mea(h), mea(h/4), diff, ..."""
    share = "h" if n_kv_heads == n_heads else (f"h/{n_heads // n_kv_heads}" if n_heads % n_kv_heads == 0
                                               else f"h'={n_kv_heads}")
    if attention in ("gqa", "mea"):
        name = f"{attention}({share})"
        return name if head_norm == (attention == "mea") else name + (", no norm" if attention == "mea" else " + head norm")
    if attention == "mha":
        return "mha + head norm" if head_norm else "mha"
    if attention == "diff":
        return "diff" if head_norm else "diff, no norm"
    return attention + (" + head norm" if head_norm else "")


def read_runs(root: str | Path) -> list[dict]:
    """Every run directory under ``root`` (``root/<sweep>/<variant>/<lr_seed>/``): settings, status, metrics."""
    import yaml

    runs = []
    for conf_file in sorted(Path(root).glob("*/*/*/config.yaml")):
        d = conf_file.parent
        conf = yaml.safe_load(conf_file.read_text())
        status_file = d / "status.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        cfg = ModelConfig.from_dict(conf["model"])
        recs = read_metrics(d / "metrics.jsonl")
        state = status.get("status", "missing")
        runs.append({
            "sweep": d.parent.parent.name, "dir": d, "attention": cfg.attention, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "head_norm": bool(cfg.head_norm), "head_norm_init": cfg.head_norm_init,
            "label": label(cfg.attention, cfg.n_heads, cfg.n_kv_heads, bool(cfg.head_norm)),
            "seed": int(conf["train"]["seed"]), "lr": float(conf["train"]["lr"]),
            "warmup_steps": int(conf["train"].get("warmup_steps", 0)), "max_steps": int(conf["train"]["max_steps"]),
            "split": (conf.get("data") or {}).get("eval_split", "val"), "status": state,
            "tokens": status.get("tokens"), "non_embedding_params": cfg.num_params(non_embedding=True),
            "final_val_loss": status.get("val_loss") if state == "finished" else None,
            "diverged_step": status.get("step") if state == "diverged" else None,
            "curve": [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r],
            "losses": [(r["step"], r["loss"]) for r in recs if "loss" in r and "event" not in r],
            "logits": [(r["step"], r["max_attn_logit"]) for r in recs if "max_attn_logit" in r],
        })
    return runs


def summary_records(runs: list[dict]) -> list[dict]:
    """One record per finished run measured on the validation split, in the issue's fields exactly."""
    out = []
    for r in runs:
        if r["status"] == "finished" and r["split"] == "val" and r["final_val_loss"] is not None:
            out.append({"variant": r["attention"], "n_heads": r["n_heads"], "n_kv_heads": r["n_kv_heads"],
                        "head_norm": r["head_norm"], "seed": r["seed"], "lr": r["lr"], "tokens": r["tokens"],
                        "non_embedding_params": r["non_embedding_params"], "final_val_loss": r["final_val_loss"],
                        "split": "validation"})
    return out


def spikes(losses: list[tuple[int, Optional[float]]], after_step: int) -> tuple[int, Optional[float]]:
    """(number of loss spikes, largest rise in nats) of a training-loss series: a spike is an excursion of
    the loss more than SPIKE_NATS above its lowest value so far, counted once until it comes back; only
    steps after ``after_step`` (the warm-up) count."""
    low, n, rise, inside = math.inf, 0, None, False
    for step, loss in losses:
        if loss is None or not math.isfinite(loss):
            continue
        if step > after_step and math.isfinite(low):
            up = loss - low
            rise = up if rise is None else max(rise, up)
            if up > SPIKE_NATS and not inside:
                n += 1
            inside = up > SPIKE_NATS
        low = min(low, loss)
    return n, rise


def stability_records(runs: list[dict], sweep: str = "stability") -> list[dict]:
    """Every run of the stability sweep, diverged ones included."""
    out = []
    for r in runs:
        if r["sweep"] != sweep or r["status"] not in ("finished", "diverged"):
            continue
        n, rise = spikes(r["losses"], r["warmup_steps"])
        out.append({"label": r["label"], "variant": r["attention"], "n_heads": r["n_heads"],
                    "n_kv_heads": r["n_kv_heads"], "head_norm": r["head_norm"], "head_norm_init": r["head_norm_init"],
                    "seed": r["seed"], "lr": r["lr"], "status": r["status"], "split": r["split"],
                    "diverged_step": r["diverged_step"], "final_val_loss": r["final_val_loss"],
                    "loss_spikes": n, "max_loss_rise": rise,
                    "max_attn_logit": max((v for _, v in r["logits"]), default=None),
                    "final_attn_logit": r["logits"][-1][1] if r["logits"] else None})
    return out


# ----------------------------------------------------------------------------------------- arms
def _arms(records: list[dict]) -> dict[tuple, dict[float, dict[int, float]]]:
    """(label, n_heads, tokens) -> lr -> seed -> final loss."""
    arms: dict[tuple, dict] = {}
    for r in records:
        key = (label(r["variant"], r["n_heads"], r["n_kv_heads"], r["head_norm"]), r["n_heads"], r["tokens"])
        arms.setdefault(key, {}).setdefault(r["lr"], {})[r["seed"]] = r["final_val_loss"]
    return arms


def chosen_rate(rates: dict[float, dict[int, float]]) -> float:
    """The declared rate of an arm: the one with the most seeds (the x0.5 and x2 checks have one); on a
    tie, the middle one."""
    most = max(len(s) for s in rates.values())
    tied = sorted(lr for lr, s in rates.items() if len(s) == most)
    return tied[(len(tied) - 1) // 2]


def scales(records: list[dict]) -> dict[tuple, dict]:
    """(n_heads, tokens) -> {label: {"lr", "seeds": {seed: loss}, "rates": {lr: {seed: loss}}, "params"}}, for
    the runs of at least one token per parameter (main, 125m), each trained at its declared rate (the
    stability grid, at a fraction of a token per parameter, is read by rate instead)."""
    out: dict[tuple, dict] = {}
    params = {(label(r["variant"], r["n_heads"], r["n_kv_heads"], r["head_norm"]), r["n_heads"], r["tokens"]):
              r["non_embedding_params"] for r in records}
    for (lab, h, tokens), rates in _arms(records).items():
        if tokens < params[(lab, h, tokens)]:
            continue
        lr = chosen_rate(rates)
        out.setdefault((h, tokens), {})[lab] = {"lr": lr, "seeds": rates[lr], "rates": rates,
                                                "params": params[(lab, h, tokens)]}
    return out


def main_scale(records: list[dict]) -> Optional[tuple]:
    """The scale of the main runs: at least TOKENS_PER_PARAM tokens per parameter; of several, the one
    with the most runs."""
    by = scales(records)
    main = [(k, v) for k, v in by.items() if all(k[1] >= TOKENS_PER_PARAM * a["params"] for a in v.values())]
    return max(main, key=lambda kv: sum(len(a["seeds"]) for a in kv[1].values()))[0] if main else None


def comparisons(records: list[dict]) -> list[dict]:
    """Every pair of COMPARISONS present at one scale, at each arm's declared rate."""
    out = []
    for (h, tokens), arms in scales(records).items():
        for a, b in COMPARISONS:
            if a in arms and b in arms:
                c = paired(arms[a]["seeds"], arms[b]["seeds"])
                verdict, why = lower_beyond_spread(c)
                out.append({"a": a, "b": b, "n_heads": h, "tokens": tokens, "lr_a": arms[a]["lr"],
                            "lr_b": arms[b]["lr"], **c, "a_lower_beyond_spread": verdict, "why": why})
    return out


def largest_stable(stab: list[dict], lab: str, seed: int) -> Optional[tuple[Optional[float], bool]]:
    """(largest rate finished below the first rate that diverged, whether no rate diverged: then it is a
    lower bound) of one variant and seed in the stability grid; None without runs."""
    mine = sorted((r for r in stab if r["label"] == lab and r["seed"] == seed), key=lambda r: r["lr"])
    if not mine:
        return None
    best = None
    for r in mine:
        if r["status"] == "diverged":
            return best, False
        best = r["lr"]
    return best, True


def compare_stability(stab: list[dict], a: str, b: str) -> dict:
    """Per seed, whether A's largest stable rate is above (>), below (<), equal to (=) or undecided against
    (?: neither diverged on the grid) B's; yes if above on every seed (2 at least), no if never above."""
    per_seed = {}
    for seed in sorted({r["seed"] for r in stab if r["label"] in (a, b)}):
        la, lb = largest_stable(stab, a, seed), largest_stable(stab, b, seed)
        if la is None or lb is None:
            continue
        (ra, capped_a), (rb, capped_b) = la, lb
        ra_, rb_ = ra or 0.0, rb or 0.0
        if capped_a and capped_b:
            cmp = "?"
        elif ra_ > rb_ or (ra_ == rb_ and capped_a):
            cmp = ">"
        elif ra_ < rb_ or (ra_ == rb_ and capped_b):
            cmp = "<"
        else:
            cmp = "="
        per_seed[seed] = {"a": ra, "a_capped": capped_a, "b": rb, "b_capped": capped_b, "cmp": cmp}
    cmps = [v["cmp"] for v in per_seed.values()]
    if len(cmps) < 2 or "?" in cmps:
        verdict = "unresolved"
    elif all(c == ">" for c in cmps):
        verdict = "yes"
    elif all(c in "<=" for c in cmps):
        verdict = "no"
    else:
        verdict = "unresolved"
    return {"a": a, "b": b, "per_seed": per_seed, "verdict": verdict}


def near_best(stab: list[dict], lab: str) -> dict:
    """Mean final loss over the finished seeds at each rate, the best rate, and the largest rate within
    NEAR_BEST_NATS of it at which no seed diverged."""
    by: dict[float, list] = {}
    for r in stab:
        if r["label"] == lab:
            by.setdefault(r["lr"], []).append(r)
    means = {lr: statistics.fmean(x["final_val_loss"] for x in rs) for lr, rs in by.items()
             if all(x["status"] == "finished" for x in rs)}
    if not means:
        return {"best_lr": None, "best_loss": None, "largest_near_best_lr": None, "means": {}}
    best = min(means, key=means.get)
    near = [lr for lr, m in means.items() if m <= means[best] + NEAR_BEST_NATS]
    return {"best_lr": best, "best_loss": means[best], "largest_near_best_lr": max(near), "means": means}


# ----------------------------------------------------------------------------------------- answers
def answers(summary: dict, stability: list[dict]) -> list[dict]:
    """The issue's three questions, each answered yes / no / unresolved with its numbers, from
    summary.json's records (final validation losses) and stability.json's runs only."""
    records = summary["records"]
    key = main_scale(records)
    arms = scales(records).get(key, {}) if key else {}

    def comp(a, b):
        return paired(arms[a]["seeds"], arms[b]["seeds"]) if a in arms and b in arms else None

    out = []
    c1 = comp("mea(h/2)", "gqa(h/2)")
    v1, why1 = lower_beyond_spread(c1)
    out.append({"question": "Does MEA(h/2) reach a lower validation loss than GQA(h/2) at the same cache, by more "
                            "than the seed spread?", "answer": v1,
                "numbers": (f"mea(h/2) {_arm_text(arms, 'mea(h/2)')}, gqa(h/2) {_arm_text(arms, 'gqa(h/2)')}; "
                            + why1) if c1 else "no main runs of both yet"})
    c2, c_norm = comp("mea(h)", "mha + head norm"), comp("mha + head norm", "mha")
    v2, why2 = lower_beyond_spread(c2)
    vn, whyn = lower_beyond_spread(c_norm)
    if c2 is None:
        text, ans = "no main runs of both yet", "unresolved"
    else:
        ans = v2
        text = (f"mea(h) {_arm_text(arms, 'mea(h)')}, mha + head norm {_arm_text(arms, 'mha + head norm')}; "
                f"mea(h) - (mha + head norm): {why2}.")
        if c_norm is not None:
            text += f" The norm alone, (mha + head norm) - mha: {whyn}."
        if v2 == "no":
            text += (" The norm is the whole effect: it beats mha beyond the spread, and the mixing adds nothing "
                     "beyond it." if vn == "yes" else " Neither the mixing nor the norm is lower beyond the spread here.")
    out.append({"question": "Does MEA(h) beat MHA + head norm, or is the norm the whole effect?", "answer": ans,
                "numbers": text})
    s3 = compare_stability(stability, "mea(h)", "mha")
    extra = [compare_stability(stability, a, "mha") for a in ("mea(h/2)", "mha + head norm")]
    if s3["per_seed"]:
        text = f"largest rate before divergence, per seed: {_stable_text(s3)}"
        for e in extra:
            if e["per_seed"]:
                text += f"; {e['a']} against mha: {_stable_text(e)} ({e['verdict']})"
    else:
        text = "no stability runs yet"
    out.append({"question": "Does MEA tolerate a larger learning rate than MHA?", "answer": s3["verdict"],
                "numbers": text})
    return out


def _arm_text(arms: dict, lab: str) -> str:
    a = arms[lab]
    losses = [a["seeds"][s] for s in sorted(a["seeds"])]
    return (f"{statistics.fmean(losses):.4f} (lr {a['lr']:.2e}, {len(losses)} seed(s): "
            + ", ".join(f"{x:.4f}" for x in losses) + ")")


def _stable_text(c: dict) -> str:
    def one(x, capped):
        return ("none" if x is None else f"{x:.3g}") + ("+ (never diverged)" if capped else "")

    return "; ".join(f"seed {s}: {c['a']} {one(v['a'], v['a_capped'])} {v['cmp']} {c['b']} {one(v['b'], v['b_capped'])}"
                     for s, v in c["per_seed"].items())


# ----------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[dict], records: list[dict], path: Path) -> bool:
    """Validation loss against tokens of the main runs at each arm's declared rate: the mean over seeds,
    with a band from the lowest to the highest seed."""
    key = main_scale(records)
    if key is None:
        return False
    arms = scales(records)[key]
    plt = _plt()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.6))
    lows = []
    for i, (lab, arm) in enumerate(sorted(arms.items())):
        curves = [r["curve"] for r in runs if r["label"] == lab and r["n_heads"] == key[0] and r["tokens"] == key[1]
                  and r["lr"] == arm["lr"] and r["status"] == "finished" and r["split"] == "val" and r["curve"]]
        if not curves:
            continue
        n = min(map(len, curves))
        xs = [curves[0][j][0] / 1e6 for j in range(n)]
        ys = [[c[j][1] for c in curves] for j in range(n)]
        mean = [statistics.fmean(y) for y in ys]
        lows.append(mean[-1])
        for a in (ax, zoom):
            a.plot(xs, mean, color=f"C{i}", label=f"{lab} (lr {arm['lr']:.1e}, {len(curves)} seed(s))")
            if len(curves) > 1:
                a.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.25, lw=0)
    if not lows:
        plt.close(fig)
        return False
    for a, title in ((ax, "Validation loss (band: lowest to highest seed)"), (zoom, "last half")):
        a.set_xlabel("tokens (M)")
        a.grid(alpha=0.3)
        a.set_title(title)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7)
    zoom.set_xlim(left=key[1] / 2e6)
    zoom.set_ylim(min(lows) - 0.05, max(lows) + 0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def plot_loss_vs_lr(stability: list[dict], records: list[dict], path: Path) -> bool:
    """Final validation loss against the peak rate: the stability grid (mean over seeds; x: a seed
    diverged there, drawn above the curves) and the main runs' declared rate x0.5, x1, x2."""
    key = main_scale(records)
    checks = {lab: a for lab, a in scales(records).get(key, {}).items() if len(a["rates"]) > 1} if key else {}
    if not stability and not checks:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    finite = [r["final_val_loss"] for r in stability if r["final_val_loss"] is not None]
    top = max(finite) + 0.1 if finite else 1.0
    for i, lab in enumerate(sorted({r["label"] for r in stability})):
        nb = near_best(stability, lab)
        xs = sorted(nb["means"])
        line = axes[0].plot(xs, [nb["means"][x] for x in xs], "o-", color=f"C{i}", ms=3, label=lab)[0]
        bad = sorted({r["lr"] for r in stability if r["label"] == lab and r["status"] == "diverged"})
        if bad:
            axes[0].plot(bad, [top] * len(bad), "x", color=line.get_color(), ms=8, mew=2)
    axes[0].set_title("Stability grid (pilot scale; x: diverged)")
    for i, (lab, a) in enumerate(sorted(checks.items())):
        xs = sorted(a["rates"])
        axes[1].plot(xs, [statistics.fmean(a["rates"][x].values()) for x in xs], "o-", color=f"C{i}", label=lab)
    axes[1].set_title("Main runs: declared rate x0.5, x1, x2")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("final validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def plot_logits(stability: list[dict], path: Path) -> bool:
    """The largest attention logit a run reached against its peak rate (x: the run diverged)."""
    pts = [r for r in stability if r["max_attn_logit"] is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, lab in enumerate(sorted({r["label"] for r in pts})):
        mine = sorted((r for r in pts if r["label"] == lab), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in mine], [r["max_attn_logit"] for r in mine], "o", color=f"C{i}", ms=4, label=lab)
        bad = [r for r in mine if r["status"] == "diverged"]
        ax.plot([r["lr"] for r in bad], [r["max_attn_logit"] for r in bad], "x", color=f"C{i}", ms=9, mew=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("largest |attention logit| over the run")
    ax.set_title("Attention logits in the stability grid (x: diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------- report
def report_text(summary: dict, stability: list[dict], selection: list[dict]) -> str:
    """report.md: the answers, then every table, from the three JSON files' contents."""
    records = summary["records"]
    lines = ["# From scratch at 10 tokens per parameter: results", "",
             "Generated by `mea study-scratch report` from summary.json (validation split), stability.json and "
             "selection.json (the pilot, on the select split). Every number is a final loss in nats/token.", "",
             "## The three questions", ""]
    for a in answers(summary, stability):
        lines += [f"- **{a['question']}** {a['answer'].upper()}. {a['numbers']}"]
    lines += ["", f"Rules: *yes* needs A below B on average over matched seeds by more than the larger seed spread "
              f"(max - min) of the two arms, and a paired t-test p < {ALPHA}; *no*: not lower by more than the spread; "
              "*unresolved*: fewer than 2 matched seeds, or lower beyond the spread at p >= "
              f"{ALPHA}. With n matched seeds the paired t-test has n - 1 degrees of freedom: at n = 3 it needs "
              "t > 4.30 (a mean gap 2.5 times the sd of the per-seed gaps), and a sign test could not go below "
              "p = 0.25; at n = 2, t > 12.7. Learning-rate tolerance: the largest rate of the x2 grid finished below "
              "the first rate that diverged, per seed; yes if MEA's is higher on every seed.", ""]
    by = scales(records)
    for (h, tokens), arms in sorted(by.items(), key=lambda kv: -kv[0][1]):
        n_params = {a["params"] for a in arms.values()}
        lines += [f"## {h} heads, {tokens / 1e6:.1f}M tokens ({tokens / max(n_params):.1f}-{tokens / min(n_params):.1f} "
                  "tokens per non-embedding parameter)", "",
                  "| variant | declared lr | seeds | final val loss per seed | mean | spread | other rates (seed 0) |",
                  "|---|---|---|---|---|---|---|"]
        for lab, a in sorted(arms.items()):
            losses = [a["seeds"][s] for s in sorted(a["seeds"])]
            other = ", ".join(f"{lr:.2e}: {statistics.fmean(s.values()):.4f}" for lr, s in sorted(a["rates"].items())
                              if lr != a["lr"])
            lines.append(f"| {lab} | {a['lr']:.2e} | {len(losses)} | " + ", ".join(f"{x:.4f}" for x in losses)
                         + f" | {statistics.fmean(losses):.4f} | {max(losses) - min(losses):.4f} | {other or '-'} |")
        comps = [c for c in comparisons(records) if c["n_heads"] == h and c["tokens"] == tokens]
        if comps:
            lines += ["", "| A - B | matched seeds | mean A - B | sd | paired t | df | p | spread A / B | A lower beyond spread |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for c in comps:
                b = f"({c['b']})" if " " in c["b"] else c["b"]
                lines.append(f"| {c['a']} - {b} | {c['n']} | {_fmt(c['mean_diff'], '+.4f')} | "
                             f"{_fmt(c['sd_diff'], '.4f')} | {_fmt(c['t'], '.2f', 'inf' if c['df'] else '-')} | "
                             f"{_fmt(c['df'], 'd')} | {_fmt(c['p'], '.3g')} | {c['spread_a']:.4f} / {c['spread_b']:.4f} | "
                             f"{c['a_lower_beyond_spread']} |")
        lines.append("")
    if stability:
        lines += ["## Stability: the x2 learning-rate grid up to divergence (pilot scale)", "",
                  "| variant | largest rate before divergence, per seed | best rate (mean loss) | largest rate within "
                  f"{NEAR_BEST_NATS} nats of best | loss spikes (> {SPIKE_NATS} nats) at the rates that finished | "
                  "largest attention logit at the largest stable rate |", "|---|---|---|---|---|---|"]
        for lab in sorted({r["label"] for r in stability}):
            seeds = sorted({r["seed"] for r in stability if r["label"] == lab})
            stable = [largest_stable(stability, lab, s) for s in seeds]
            nb = near_best(stability, lab)
            top = [r for r in stability if r["label"] == lab and r["status"] == "finished"
                   and any(r["lr"] == st[0] and r["seed"] == s for s, st in zip(seeds, stable) if st)]
            spikes_n = sum(r["loss_spikes"] for r in stability if r["label"] == lab and r["status"] == "finished")
            lines.append(f"| {lab} | " + ", ".join(f"s{s}: " + ("-" if st is None or st[0] is None else f"{st[0]:.3g}")
                                                   + ("+" if st and st[1] else "") for s, st in zip(seeds, stable))
                         + f" | {_fmt(nb['best_lr'], '.2e')} ({_fmt(nb['best_loss'], '.4f')}) | "
                         f"{_fmt(nb['largest_near_best_lr'], '.2e')} | {spikes_n} | "
                         + ", ".join(_fmt(r["max_attn_logit"], ".1f") for r in top) + " |")
        lines += ["", "(+: no rate of the grid diverged for that seed; the value is then a lower bound.)", ""]
    if selection:
        lines += ["## Pilot (select split): final loss by rate", "",
                  "| variant | head_norm_init | " + " | ".join(f"{lr:.1e}" for lr in sorted({r['lr'] for r in selection}))
                  + " |", "|---|---|" + "---|" * len({r['lr'] for r in selection})]
        rows: dict[tuple, dict] = {}
        for r in selection:
            rows.setdefault((r["label"], r["head_norm_init"] if r["head_norm"] else None), {})[r["lr"]] = r
        for (lab, init), by_lr in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            cells = []
            for lr in sorted({r['lr'] for r in selection}):
                r = by_lr.get(lr)
                cells.append("-" if r is None else ("diverged" if r["status"] == "diverged" else
                                                    _fmt(r["final_loss"], ".4f")))
            lines.append(f"| {lab} | {'-' if init is None else init} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def selection_records(runs: list[dict], sweep: str = "pilot") -> list[dict]:
    return [{"label": r["label"], "variant": r["attention"], "n_heads": r["n_heads"], "n_kv_heads": r["n_kv_heads"],
             "head_norm": r["head_norm"], "head_norm_init": r["head_norm_init"], "seed": r["seed"], "lr": r["lr"],
             "status": r["status"], "final_loss": r["final_val_loss"], "split": "selection"}
            for r in runs if r["sweep"] == sweep and r["split"] == "select" and r["status"] in ("finished", "diverged")]


def report(runs: str = "runs/study/scratch", out: str = "docs/study/scratch", overwrite: bool = False) -> dict:
    """Summarize the study's finished runs: summary.json, stability.json, selection.json, report.md, plots.

    Args:
        runs: the study's run directory (one sweep directory per config).
        out: where the files go (docs/study/scratch in the repository); a report written there before is
            replaced, a folder holding anything else is refused.
        overwrite: write into OUT even when mea study-scratch report did not write it.
    """
    from ..runtime import holding, output_folder

    root = Path(runs).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"runs: {root} " + ("is a file" if root.exists() else "does not exist")
                                + "; give the study's run directory (one sweep folder per config)")
    dest = output_folder("out", out, "study-scratch report", overwrite, own=holding("report.md", "summary.json"))
    all_runs = read_runs(root)
    summary = {"records": summary_records(all_runs)}
    stab = stability_records(all_runs)
    sel = selection_records(all_runs)
    _atomic(dest / "summary.json", json.dumps(summary, indent=1) + "\n")
    _atomic(dest / "stability.json", json.dumps(stab, indent=1) + "\n")
    _atomic(dest / "selection.json", json.dumps(sel, indent=1) + "\n")
    text = report_text(summary, stab, sel)
    _atomic(dest / "report.md", text)
    made = [name for name, ok in (("curves.png", plot_curves(all_runs, summary["records"], dest / "curves.png")),
                                  ("loss_vs_lr.png", plot_loss_vs_lr(stab, summary["records"], dest / "loss_vs_lr.png")),
                                  ("logits.png", plot_logits(stab, dest / "logits.png"))) if ok]
    note(f"{len(summary['records'])} finished runs on the validation split, {len(stab)} stability runs, "
         f"{len(sel)} pilot runs; wrote {dest}/summary.json, report.md" + (", " + ", ".join(made) if made else ""))
    print(text)
    return summary


# ----------------------------------------------------------------------------------------- declare
def base_spec(spec: str) -> tuple[str, Optional[float]]:
    """A pilot variant spec without its head_norm_init, and that value: ("mea:n_kv_heads=4", 0.1)."""
    name, _, rest = spec.partition(":")
    keep, init = [], None
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key == "head_norm_init":
            init = float(val)
        else:
            keep.append(item)
    return name + (":" + ",".join(keep) if keep else ""), init


def declare(pilot: str = "runs/study/scratch/pilot", out: str = CHOICES, allow_edge: bool = False) -> dict:
    """Declare each variant's learning rate and head-norm scale from the pilot: its lowest final loss on
    the select split. Writes the choices file the later configs read.

    Args:
        pilot: the pilot sweep's directory (results.csv and its runs).
        out: the choices file to write.
        allow_edge: declare even where the best rate or scale lies at the edge of the grid (by default
            that is an error: the grid must be extended first, e.g. one more rate in pilot.yaml's lrs).
    """
    import yaml

    from ..runtime import output_file

    if Path(out).is_dir() or (Path(out).exists()
                              and not Path(out).read_text(errors="replace").startswith("# Declared by `mea study-scratch")):
        output_file("out", out, "study-scratch declare")  # a file declare did not write is refused
    if not (Path(pilot).expanduser() / "results.csv").is_file():
        raise FileNotFoundError(f"pilot: {pilot} holds no results.csv; give the pilot sweep's folder "
                                "(mea sweep --config study/scratch/pilot writes it)")
    rows = read_results(pilot)
    groups: dict[str, list] = {}
    for r in rows:
        conf = yaml.safe_load((r["dir"] / "config.yaml").read_text()) if (r["dir"] / "config.yaml").is_file() else {}
        split = (conf.get("data") or {}).get("eval_split", "val")
        if conf and split != "select":
            raise ValueError(f"pilot: {r['dir']} was measured on the {split!r} split; choices are made on 'select'")
        base, init = base_spec(r["variant"])
        groups.setdefault(base, []).append({**r, "init": init})
    declared, problems = {}, []
    for base, grid in groups.items():
        done = [g for g in grid if g["status"] == "finished" and g["final_val_loss"] is not None]
        if not done or len(done) < len(grid) - sum(g["status"] == "diverged" for g in grid):
            problems.append(f"{base}: {len(grid) - len(done)} of {len(grid)} pilot runs are not finished")
            continue
        best = min(done, key=lambda g: g["final_val_loss"])
        lrs, inits = sorted({g["lr"] for g in grid}), sorted({g["init"] for g in grid if g["init"] is not None})
        if best["lr"] in (lrs[0], lrs[-1]) and len(lrs) > 1:
            problems.append(f"{base}: the best rate {best['lr']:.2e} is at the grid's {'low' if best['lr'] == lrs[0] else 'high'} "
                            "edge; add the next rate beyond it to the pilot's lrs")
        if best["init"] is not None and len(inits) > 1 and best["init"] in (inits[0], inits[-1]):
            problems.append(f"{base}: the best head_norm_init {best['init']} is at the edge of {inits}; add the next "
                            "scale beyond it to the pilot's variants")
        declared[base] = {"lr": best["lr"], "model": {"head_norm_init": best["init"]} if best["init"] is not None else {},
                          "select_loss": round(best["final_val_loss"], 5)}
    blocking = [p for p in problems if "not finished" in p or not allow_edge]
    if blocking:
        raise ValueError("declare: " + "; ".join(blocking))
    for p in problems:
        note(f"declared at an edge (allow_edge): {p}")
    for spec, src in SCALED.items():
        if src in declared:
            n_small = ModelConfig.from_preset("small", **_model_kw(src)).num_params(non_embedding=True)
            n_big = ModelConfig.from_preset(SCALED_PRESET, **_model_kw(spec)).num_params(non_embedding=True)
            declared[spec] = {"lr": float(f"{declared[src]['lr'] * (n_big / n_small) ** LR_EXPONENT:.4g}"),
                              "model": dict(declared[src]["model"]),
                              "from": f"{src} at the small preset, x ({n_big:,} / {n_small:,})^{LR_EXPONENT}"}
    head = (f"# Declared by `mea study-scratch declare` from {pilot} on {time.strftime('%Y-%m-%d')}: per variant, the\n"
            "# pilot's lowest final loss on the select split (rate and head norm's initial weight). Read by the\n"
            "# stability, main and 125m configs (choices); docs/results.md lists the same numbers.\n")
    _atomic(Path(out), head + yaml.safe_dump(declared, sort_keys=False))
    table = ["| variant | spec | lr | head_norm_init | pilot loss (select) |", "|---|---|---|---|---|"]
    names = {spec: lab for lab, spec in VARIANTS.items()}
    names.update({spec: f"{names[src]} at {SCALED_PRESET}" for spec, src in SCALED.items()})
    for spec, d in declared.items():
        table.append(f"| {names.get(spec, spec)} | `{spec}` | {d['lr']:.3g} | {d['model'].get('head_norm_init', '-')} | "
                     f"{d.get('select_loss', '-')} |")
    print("\n".join(table))
    return declared


def _model_kw(spec: str) -> dict:
    kw = parse_variant(spec)
    return {**kw.pop("model", {}), **kw}


# ----------------------------------------------------------------------------------------- plan
# Measured throughput of one H200 (tokens/s summed over the runs sharing it) with bf16 autocast and
# per-layer compilation, at 32 x 512 tokens per step: small, the logged tokens_per_s of the committed
# runs of docs/study/metrics (convergence: 2 runs at 259-265k each; head_norm_seeds: 5 at about 112k);
# 125m, benchmarks/results/train_throughput_b16.json (mha, 16 x 1024, one process).
TOKENS_PER_S = {"small": 520_000.0, "125m": 387_000.0}


def _config_runs(conf: dict) -> int:
    if conf.get("points"):
        return sum(len(p.get("seeds", conf.get("seeds", [0]))) for p in conf["points"])
    return len(conf["variants"]) * len(conf["lrs"]) * len(conf.get("seeds", [0]))


def _held_out_tokens(corpus: str, split: str) -> int:
    """The split's size: from the prepared corpus where this machine has it, else the corpus's holdout."""
    from ..data.fetch import cache_dir
    from ..data.sources import HOLDOUT

    manifest = cache_dir() / "data" / corpus / "manifest.json"
    if manifest.is_file():
        splits = json.loads(manifest.read_text()).get("splits", {})
        if split in splits:
            return int(splits[split]["tokens"])
    return HOLDOUT.get(corpus, {}).get(split, 65_536)


def plan(configs: str = CONFIGS, tokens_per_s: Optional[dict[str, float]] = None, run_overhead_s: float = 6.0,
         block_overhead_s: float = 120.0, command_s: float = 600.0, resume_s: float = 90.0,
         block_s: float = 1800.0) -> list[dict]:
    """The GPU plan: per config its runs, tokens and estimated H200 time, and the blocks it needs.

    A config whose runs each take most of a block (main, 125m) is one block: its time is the training
    (tokens plus a third of each evaluation's forward tokens, at ``tokens_per_s``), ``run_overhead_s``
    per run (start and compilation), ``block_overhead_s`` (machine start, copying the corpus, packing
    the results) and ``resume_s`` lost at each ``command_s`` boundary (runs resume from the last
    checkpoint). A config of many short runs (pilot, stability; with --deadline_s) fills as many blocks
    as its work needs.

    Args:
        configs: the study's config directory.
        tokens_per_s: tokens/s of one H200 per preset, summed over the runs sharing it (default: the
            measured TOKENS_PER_S).
        run_overhead_s: seconds per run beyond its tokens.
        block_overhead_s: seconds per block beyond its runs.
        command_s: the longest command of a block.
        resume_s: seconds lost where a command ends inside a run.
        block_s: the longest block.
    """
    import yaml

    if not Path(configs).is_dir():
        raise FileNotFoundError(f"configs: {configs} is not a folder of study configs")
    for name, v in (("run_overhead_s", run_overhead_s), ("block_overhead_s", block_overhead_s), ("resume_s", resume_s)):
        if not v >= 0:
            raise ValueError(f"{name}: must be >= 0 seconds, got {v}")
    for name, v in (("command_s", command_s), ("block_s", block_s)):
        if not v > 0:
            raise ValueError(f"{name}: must be > 0 seconds, got {v}")
    for preset, v in (tokens_per_s or {}).items():
        if not v > 0:
            raise ValueError(f"tokens_per_s.{preset}: must be > 0, got {v}")
    tps = {**TOKENS_PER_S, **(tokens_per_s or {})}
    rows, fit = [], {}
    order = ("pilot", "stability", "main", "m125")  # the order they run in
    for f in sorted(Path(configs).glob("*.yaml"), key=lambda f: (next((i for i, o in enumerate(order)
                                                                        if f.stem.startswith(o)), len(order)), f.stem)):
        conf = yaml.safe_load(f.read_text())
        if not isinstance(conf, dict) or "train" not in conf:
            continue  # declared.yaml
        tr, data = conf["train"], conf.get("data", {})
        seq, batch = data.get("seq_len", 128), tr.get("batch_size", 8)
        tokens = tr["max_steps"] * batch * seq
        evals = tr["max_steps"] // tr.get("eval_every", 50) + (tr["max_steps"] % tr.get("eval_every", 50) > 0)
        held = _held_out_tokens(data.get("corpus", "prose"), data.get("eval_split", "val"))
        eval_tokens = evals * min(tr.get("eval_batches", 10) * batch * seq, held // seq * seq)
        n = _config_runs(conf)
        per_run = (tokens + eval_tokens / 3) / tps[conf["preset"]] + run_overhead_s
        work = n * per_run

        def block_time(k: int) -> float:  # k long runs sharing one block, resumed at each command's end
            t = block_overhead_s + k * per_run
            for _ in range(10):
                t = block_overhead_s + k * per_run + resume_s * max(0, math.ceil((t - block_overhead_s) / command_s) - 1)
            return t

        if tokens / tps[conf["preset"]] > command_s / 4:  # long runs: one block, cut into commands
            blocks, gpu_s = 1, block_time(n)
            fit[(conf["preset"], tokens)] = max([k for k in range(1, 9) if block_time(k) <= block_s], default=0)
        else:
            usable = block_s - block_overhead_s - (block_s // command_s) * resume_s
            blocks = math.ceil(work / usable)
            gpu_s = work + blocks * block_overhead_s
        rows.append({"config": f.stem, "preset": conf["preset"], "runs": n, "upper_bound": bool(conf.get("until_diverged")),
                     "tokens_per_run": tokens, "eval_tokens_per_run": eval_tokens, "tokens": n * tokens,
                     "gpu_minutes": gpu_s / 60, "blocks": blocks, "fits": gpu_s / blocks <= block_s})
    lines = [f"| config | runs | tokens per run | tokens | est. H200 minutes | blocks of <= {block_s / 60:.0f} min |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['runs']}{' (at most)' if r['upper_bound'] else ''} | "
                     f"{r['tokens_per_run'] / 1e6:.1f}M | {r['tokens'] / 1e6:,.0f}M | {r['gpu_minutes']:.0f} | "
                     f"{r['blocks']}{'' if r['fits'] else ' (over the limit)'} |")
    total = sum(r["gpu_minutes"] for r in rows)
    lines.append(f"| all | {sum(r['runs'] for r in rows)} | | {sum(r['tokens'] for r in rows) / 1e9:.2f}B | "
                 f"{total:.0f} ({total / 60:.1f} h) | {sum(r['blocks'] for r in rows)} |")
    print("\n".join(lines))
    print(f"(tokens/s: {', '.join(f'{k} {v:,.0f}' for k, v in tps.items())}; {run_overhead_s:g} s per run, "
          f"{block_overhead_s:g} s per block, {resume_s:g} s per {command_s:g}-s command boundary)")
    for (preset, tokens), k in fit.items():
        print(f"a block of <= {block_s / 60:.0f} min fits {k} run(s) of {tokens / 1e6:.1f}M tokens at {preset}: block "
              "configs whose runs add up to that can share one block, each `mea sweep --config ...` in parallel")
    return rows


COMMANDS = {"declare": declare, "report": report, "plan": plan}

if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(COMMANDS, as_positional=True)
