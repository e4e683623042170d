"""Run logs: one JSON object per line (metrics.jsonl) and a loss-curve PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a killed run may have logged steps after its last checkpoint."""
        if not self.path.exists():
            return
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
    return out


def plot_loss(records: Iterable[dict], out: str | Path, title: Optional[str] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    def curve(key):
        return [(r["tokens"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]

    train, val = curve("loss"), curve("val_loss")
    lm, kl = curve("lm_loss"), curve("kl")  # a distillation run's two terms
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if train:
        ax.plot(*zip(*train), label="train (distillation loss)" if kl else "train", lw=1.2)
    if lm:
        ax.plot(*zip(*lm), label="train next-token loss", lw=1.0)
    if kl:
        ax.plot(*zip(*kl), label="KL(teacher || student)", lw=1.0)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
