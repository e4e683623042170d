"""Commands run as subprocesses on GPU slots: what `mea sweep` and `mea evaluate-many` share.

A slot is a GPU id; listing a GPU twice lets two processes share it (small models leave a GPU idle
enough for that). Each process sees only its GPU (``CUDA_VISIBLE_DEVICES``), writes its output to its
own log, and a freed slot takes the next job from the queue.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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
    # Killed (SIGTERM, Ctrl-C) or failing, this process takes its jobs with it: an orphan would go on
    # writing the run folder that a re-run starts again.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if in_main else None
    try:
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
                    try:
                        proc = subprocess.Popen(job.args, env=env, stdout=logf, stderr=subprocess.STDOUT)
                    except BaseException:
                        logf.close()
                        raise
                    running[slot] = (proc, logf, job)
                    print(f"[gpu {gpu}] {job.name}", file=sys.stderr)
            time.sleep(poll_s if running else 0)
            for slot, (proc, logf, job) in list(running.items()):
                if proc.poll() is not None:
                    logf.close()
                    del running[slot]
                    codes[job.name] = proc.returncode
    finally:
        if running:
            _stop([proc for proc, _, _ in running.values()])
            for _, logf, _ in running.values():
                logf.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return codes


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _stop(procs: list, grace_s: float = 10.0) -> None:
    """Terminate, then after ``grace_s`` kill, every process still running."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
