"""A sweep's ``results.csv``: the table ``mea sweep`` writes (one row per run) and what reads it back
(``mea evaluate-many --sweep``, the study pipelines)."""
from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ["variant", "lr", "seed", "status", "final_val_loss", "best_val_loss", "steps", "tokens", "run_dir"]


def read_results(sweep_dir: str | Path) -> list[dict]:
    """A sweep's results.csv as rows with numbers for numbers (None where empty), plus ``dir``: the run
    directory under ``sweep_dir`` (``run_dir`` is the path on the machine that ran the sweep)."""
    sweep_dir = Path(sweep_dir).expanduser()
    rows = []
    with open(sweep_dir / "results.csv", newline="") as f:
        for r in csv.DictReader(f):
            r["lr"], r["seed"] = float(r["lr"]), int(r["seed"])
            for key, kind in (("final_val_loss", float), ("best_val_loss", float), ("steps", int), ("tokens", int)):
                r[key] = kind(r[key]) if r.get(key) else None
            rel = Path(r["run_dir"])
            r["dir"] = sweep_dir.joinpath(*rel.parts[-2:])
            rows.append(r)
    return rows
