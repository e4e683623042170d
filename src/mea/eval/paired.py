"""Paired comparisons of two models on the same benchmark examples.

Two models scored on the same examples differ by much less noise than their accuracies' standard
errors suggest: most examples are answered alike by both. The standard error of the difference is
that of the per-example differences, ``sd(d) / sqrt(n)`` with ``d = score_b - score_a``, so a
comparison needs each example's score (``mea evaluate --examples true``, kept in results.json under
``examples``). The average over tasks is the unweighted mean of the task accuracies; the tasks'
examples are independent, so its standard error is ``sqrt(sum_t se_t^2) / T``.

Per task the metric is ``acc_norm`` where the task has it, else ``acc`` (the convention of the
compression results: WinoGrande has acc only).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Optional


def per_example(results: dict, tasks: Iterable[str]) -> dict:
    """Each example's scores from lm-eval's results run with ``log_samples``: per task the document ids,
    acc (and acc_norm where the task has it) of every example, and a hash of the documents' hashes."""
    out = {}
    samples = results.get("samples") or {}
    for t in tasks:
        rows = sorted(samples.get(t, []), key=lambda s: s["doc_id"])
        if not rows:  # a group (MMLU): its subtasks carry the examples
            continue
        rec: dict = {"doc_id": [int(s["doc_id"]) for s in rows]}
        for m in ("acc", "acc_norm"):
            if m in rows[0]:
                rec[m] = [float(s[m]) for s in rows]
        rec["docs_sha256"] = hashlib.sha256("\n".join(str(s.get("doc_hash", "")) for s in rows).encode()).hexdigest()
        out[t] = rec
    return out


def task_metric(examples: dict) -> str:
    """acc_norm where the task has it, else acc."""
    return "acc_norm" if "acc_norm" in examples else "acc"


def accuracies(examples: dict, tasks: Optional[Iterable[str]] = None) -> dict[str, float]:
    """Per task the mean of its metric over its examples."""
    out = {}
    for t in tasks or examples:
        vals = examples[t][task_metric(examples[t])]
        out[t] = sum(vals) / len(vals)
    return out


def paired_delta(base: dict, other: dict, tasks: Optional[Iterable[str]] = None) -> dict:
    """How ``other`` differs from ``base`` per task and on the average, with paired standard errors.

    Args:
        base, other: ``examples`` of two ``mea evaluate --examples true`` results.
        tasks: the tasks to compare (default: all of ``base``'s).

    Returns:
        ``{"tasks": {task: {"metric", "n", "base", "other", "delta", "se"}}, "delta", "se"}``: accuracy
        differences other - base (fractions) and their standard errors; ``delta``/``se`` of the average.

    Raises:
        ValueError: a task missing from either, or scored on other examples.
    """
    names = list(tasks or base)
    per_task = {}
    for t in names:
        if t not in base or t not in other:
            raise ValueError(f"examples: task {t} was not scored per example for both models")
        a, b = base[t], other[t]
        if a.get("docs_sha256") and b.get("docs_sha256") and a["docs_sha256"] != b["docs_sha256"]:
            raise ValueError(f"examples: task {t} was scored on other documents for the two models")
        m = task_metric(a)
        if m not in b:
            raise ValueError(f"examples: task {t} has {m} for one model only")
        sa, sb = dict(zip(a["doc_id"], a[m])), dict(zip(b["doc_id"], b[m]))
        if set(sa) != set(sb):
            raise ValueError(f"examples: task {t} was scored on {len(sa)} and {len(sb)} examples, not the same ones")
        d = [sb[i] - sa[i] for i in sorted(sa)]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        per_task[t] = {"metric": m, "n": n, "base": sum(sa.values()) / n, "other": sum(sb.values()) / n,
                       "delta": mean, "se": math.sqrt(var / n)}
    k = len(per_task)
    return {"tasks": per_task, "delta": sum(r["delta"] for r in per_task.values()) / k,
            "se": math.sqrt(sum(r["se"] ** 2 for r in per_task.values())) / k}
