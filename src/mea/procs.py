"""Commands run as subprocesses on GPU slots: what `mea sweep` and `mea evaluate-many` share.

A slot is a GPU id; listing a GPU twice lets two processes share it (small models leave a GPU idle
enough for that). Each process sees only its GPU (``CUDA_VISIBLE_DEVICES``), writes its output to its
own log, and a freed slot takes the next job from the queue.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional


class Job(NamedTuple):
    name: str
    args: list[str]
    log: Path


def run_on_gpus(jobs: list[Job], slots: list[int], deadline: Optional[float] = None,
                poll_s: float = 2.0) -> dict[str, int]:
    """Run ``jobs`` at most one per slot at a time; return each started job's exit code by name.

    ``deadline`` (a ``time.time()`` value): start nothing after it; jobs already running finish.
    """
    if not slots:
        raise ValueError("slots: need at least one GPU id")
    queue, running, codes = list(jobs), {}, {}
    while queue or running:
        if deadline is not None and queue and time.time() > deadline:
            print(f"deadline reached: {len(queue)} jobs not started", file=sys.stderr)
            queue = []
        for slot, gpu in enumerate(slots):
            if slot not in running and queue:
                job = queue.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                logf = open(job.log, "a")
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
                running[slot] = (subprocess.Popen(job.args, env=env, stdout=logf, stderr=subprocess.STDOUT), logf, job)
                print(f"[gpu {gpu}] {job.name}", file=sys.stderr)
        time.sleep(poll_s if running else 0)
        for slot, (proc, logf, job) in list(running.items()):
            if proc.poll() is not None:
                logf.close()
                del running[slot]
                codes[job.name] = proc.returncode
    return codes
