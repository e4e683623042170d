"""The KV-cache compression table: a pretrained model converted to h' stored heads by each init,
before and after healing with the same token budget, against mean-pooled GQA/MQA at the same cache.

For every row: KV-cache bytes per token (bf16), validation perplexity on fixed windows of the
corpus's val split (in the model's own tokenizer), and zero-shot accuracy through `mea evaluate`.
Writes OUT/results.json (every number and the settings) and OUT/table.md.

    mea study-compression MODEL_DIR --kv_heads '[2, 1]' --out OUT_DIR
    mea study-compression --config configs/compression/smollm2_table.yaml

(``python -m mea.study.compression_table`` takes the same arguments.)

Healing (``--heal_steps N``) runs `mea pretrain --init_from` on each converted model; it needs a GPU
for SmolLM2-sized models. ``--heal_steps 0`` gives the before-healing part alone.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, device: str = "cpu") -> float:
    """exp(mean next-token NLL) over (n, L) windows, each predicting its tokens 1..L-1."""
    from mea.models.loss import window_loss

    def autocast():
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu")

    return window_loss(model, windows.split(batch_size), device, autocast, progress=True, desc="perplexity").ppl


def _zero_shot(path: str, tasks: list[str], limit: Optional[int], device: str) -> dict:
    """Zero-shot accuracy from `mea evaluate`: per task acc_norm where the task has it, else acc
    (the convention of the evaluation's paper-shaped table), their average, and the full metrics."""
    from ..eval.evaluate import evaluate

    res = evaluate(path, tasks=",".join(tasks), limit=limit, device=device, perplexity=False)
    return _summary(res, limit)


def _summary(res: dict, limit: Optional[int]) -> dict:
    acc = {t: m.get("acc_norm", m.get("acc")) for t, m in res["tasks"].items()}
    got = [v for v in acc.values() if v is not None]
    return {"tasks": acc, "average": sum(got) / len(got) if got and len(got) == len(acc) else None,
            "metrics": res["tasks"], "limit": limit}


def best_run(sweep: str, variant: Optional[str]) -> str:
    """The seed-0 run of ``variant`` at its best learning rate in a `mea sweep` directory."""
    from ..io.results import read_results
    from ..train.sweep import best_lrs, run_name

    if not variant:
        raise ValueError(f"variant: {sweep} is a sweep directory; say which variant's best run to convert")
    rows = read_results(sweep)
    best = best_lrs(rows)
    if variant not in best:
        raise ValueError(f"variant: {sweep} has no finished run of {variant!r}")
    return str(Path(sweep).expanduser() / run_name(variant, best[variant][0], 0))


def compression_table(model: str, kv_heads: list[int] = [2, 1], inits: list[str] = ["svd", "activation", "mean-pool"],
                      layers: str = "all", out: str = "runs/compression/table", corpus: str = "prose",
                      calib_tokens: int = 65536, val_tokens: int = 25600, seq_len: int = 512,
                      heal_steps: int = 0, heal_batch_size: int = 16, heal_lr: float = 3e-4, heal_seq_len: int = 512,
                      heal_mixing_lr_mult: float = 1.0, heal_original: bool = False, heal_seed: int = 0,
                      tasks: Optional[list[str]] = None, limit: Optional[int] = None, device: str = "cpu",
                      batch_size: int = 8, variant: Optional[str] = None, zero_shot_before: bool = True,
                      eval_at_end: bool = False, eval_gpus: Optional[list[int]] = None,
                      eval_procs: int = 1, overwrite: bool = False) -> list[dict]:
    """The KV-cache compression table: a model converted to each h' by each init, before and after healing.

    Args:
        model: the pretrained model: an HF LLaMA-family folder or a mea run directory; or a `mea sweep`
            directory, whose best run (seed 0) of ``variant`` is taken.
        kv_heads: the h' values to convert to.
        inits: conversion inits (svd, activation, mean-pool; mean-pool is the GQA/MQA baseline).
        layers: --layers SPEC of the conversion.
        out: results folder (converted models, healing runs, results.json, table.md).
        corpus: corpus for calibration (train split), validation (val split) and healing.
        calib_tokens: calibration tokens per conversion.
        val_tokens: validation tokens for perplexity (fixed windows from the start of the val split).
        seq_len: tokens per validation window.
        heal_steps: optimizer steps of healing per converted model (0: no healing).
        heal_batch_size: sequences per healing step (the token budget is heal_steps x this x heal_seq_len).
        heal_lr: peak learning rate of healing.
        heal_seq_len: tokens per healing sequence.
        heal_mixing_lr_mult: the mixing matrices' peak lr in healing = heal_lr x this
            (``--train.mixing_lr_mult``); at a healing lr Adam barely moves them otherwise.
        heal_original: also heal the uncompressed model with the same tokens (row "healed", init "-"):
            the control that tells what healing gains from the corpus alone, e.g. when the corpus is
            not the model's own pretraining text.
        heal_seed: seed of the healing runs (their data order); healing at
            h' = 1 can vary severalfold between runs, so repeat a table with other seeds (and --out).
        tasks: zero-shot tasks for `mea evaluate` (None: no zero-shot columns).
        limit: examples per zero-shot task (None: all).
        device: cpu, cuda.
        batch_size: windows per perplexity batch.
        variant: with a sweep directory as ``model``: which variant's best run to convert.
        zero_shot_before: also score the converted models before healing (else perplexity alone).
        eval_at_end: score zero-shot at the end, every model through one `mea evaluate-many`.
        eval_gpus: with ``eval_at_end``, evaluate on these GPUs at once, ``eval_procs`` processes per
            GPU: lm-eval's per-request work is CPU-bound, so parallel processes finish several times
            sooner than one model after another.
        eval_procs: zero-shot evaluations sharing each GPU at once.
        overwrite: replace what OUT holds (an earlier table, or a folder mea study-compression did not
            write) instead of continuing it.
    """
    from ..convert.convert import calibrate, convert_loaded, source_tokenizer
    from ..data.windows import corpus_for_model, corpus_windows
    from ..io import load_model

    model = str(Path(model).expanduser())
    model = best_run(model, variant) if (Path(model) / "results.csv").is_file() else model
    out_dir = _check_arguments(model, kv_heads, inits, layers, out, corpus, calib_tokens, val_tokens, seq_len,
                               heal_steps, heal_batch_size, heal_lr, heal_seq_len, heal_mixing_lr_mult, tasks, limit,
                               device, batch_size, eval_gpus, eval_procs, overwrite)
    from ..runtime import about, empty_folder

    with about("model"):
        src, tok_dir = load_model(model, dtype=torch.float32), source_tokenizer(model)
    if overwrite and out_dir.exists():
        empty_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val = corpus_windows(tok_dir, "val", val_tokens, seq_len, corpus)
    settings = {k: v for k, v in locals().items() if k in (
        "model", "kv_heads", "inits", "layers", "corpus", "calib_tokens", "val_tokens", "seq_len", "heal_steps",
        "heal_batch_size", "heal_lr", "heal_seq_len", "heal_mixing_lr_mult", "tasks", "limit", "device", "variant")}
    settings["val_windows"] = list(val.shape)
    if tasks:  # zero-shot scores of another task definition (ARC on validation) must not mix into this table
        from ..eval.data import TASKS_REVISION

        settings["tasks_revision"] = TASKS_REVISION
    if heal_original:  # only when set, so that tables made before this option continue
        settings["heal_original"] = True
    if heal_seed:  # likewise
        settings["heal_seed"] = heal_seed
    done = _earlier_rows(out_dir, settings)
    rows: list[dict] = []
    deferred: list[tuple[int, str]] = []  # (row index, model path) scored at the end (eval_at_end)

    def measure(name: str, h: Optional[int], init: str, stage: str, path: str, net=None, zero_shot: bool = True) -> None:
        t0 = time.time()
        row = done.get((name, h, init, stage))
        if row is None:
            net = net if net is not None else load_model(path, dtype=torch.float32)
            row = {"model": name, "kv_heads": h, "init": init, "stage": stage, "path": path,
                   "kv_bytes_per_token": net.config.kv_cache_bytes_per_token,
                   "val_ppl": perplexity(net.to(device), val, batch_size, device)}
            net.cpu()
        if tasks and zero_shot and "zero_shot" not in row:
            if eval_at_end:
                deferred.append((len(rows), path))
            else:
                row["zero_shot"] = _zero_shot(path, tasks, limit, device)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        # The rows of earlier calls not measured again yet are saved too: a call stopped early in slow
        # work (reconverting a model whose weights were packed away) must not drop later finished rows.
        measured = {(r["model"], r["kv_heads"], r["init"], r["stage"]) for r in rows}
        _save(out_dir, settings, rows + [r for k, r in done.items() if k not in measured])

    # What a continued call must redo when an earlier call's folder lost its weights (the GPU study
    # packs results without them): a model whose zero-shot scores are still missing needs its weights.
    stage = _heal_stage(heal_steps, heal_batch_size, heal_seq_len)

    def needs_weights(key: tuple, path: Path, zero_shot: bool) -> bool:
        scored = "zero_shot" in done.get(key, {}) or _score_file(out_dir, path).is_file()
        return bool(tasks) and zero_shot and not scored

    def heal_run(h: int, init: str) -> Path:
        return out_dir / ("original-healed" if init == "-" else f"kv{h}-{init}-healed")

    def heal_again(h: int, init: str) -> bool:
        run = heal_run(h, init)
        return not _finished(run) or (not _has_weights(run) and needs_weights(("healed", h, init, stage), run, True))

    measure("original", src.config.n_kv_heads, "-", "-", model, src)
    calib = None
    converted = [(src.config.n_kv_heads, "-", Path(model))] if heal_original else []
    for h in kv_heads:
        for init in inits:
            conv = out_dir / f"kv{h}-{init}"
            key = ("converted", h, init, "before healing")
            weights_needed = needs_weights(key, conv, zero_shot_before) or (heal_steps > 0 and heal_again(h, init))
            if (key in done and (conv / "conversion.json").is_file() and (conv / "config.json").is_file()
                    and (_has_weights(conv) or not weights_needed)):
                measure("converted", h, init, "before healing", str(conv), zero_shot=zero_shot_before)
            else:
                # One calibration of the original model serves every conversion (it does not depend on h' or init).
                if calib is None:
                    calib = calibrate(src, tok_dir, calib_tokens, seq_len, corpus=corpus, batch_size=batch_size,
                                      device=device)
                done.pop(key, None)  # (its healed row stays with its healing run, redone below only if needed)
                report = convert_loaded(src, tok_dir, h, init, layers, calib, conv, source=model, overwrite=True)
                measure("converted", h, init, "before healing", str(conv), zero_shot=zero_shot_before)
                rows[-1]["k_rel_err_mean"] = _mean_err(report, "k_rel_err")
                rows[-1]["v_rel_err_mean"] = _mean_err(report, "v_rel_err")
                _save(out_dir, settings, rows)
            converted.append((h, init, conv))
    del src
    if heal_steps > 0:
        from ..train.config import DataConfig, TrainConfig
        from ..train.pretrain import pretrain

        heal_corpus = str(corpus_for_model(tok_dir, corpus))
        for h, init, conv in converted:
            run = heal_run(h, init)
            if heal_again(h, init):
                done.pop(("healed", h, init, stage), None)
                if _finished(run):  # finished, but its weights are gone and its scores still missing
                    shutil.rmtree(run)
                # A healing run that an earlier call started and did not finish continues (or restarts).
                pretrain(out=str(run), init_from=str(conv), data=DataConfig(corpus=heal_corpus, seq_len=heal_seq_len),
                         train=TrainConfig(max_steps=heal_steps, batch_size=heal_batch_size, lr=heal_lr,
                                           warmup_steps=max(1, heal_steps // 20), log_every=max(1, heal_steps // 50),
                                           eval_every=heal_steps, eval_batches=4, save_every=heal_steps,
                                           mixing_lr_mult=heal_mixing_lr_mult, seed=heal_seed),
                         resume=(run / "config.yaml").is_file(), device=device, progress=True)
            measure("healed", h, init, stage, str(run))
    if deferred:
        from ..eval.many import evaluate_many

        res_dir = out_dir / "zero_shot"
        evaluate_many(models=[p for _, p in deferred], out=str(res_dir), tasks=",".join(tasks), limit=limit,
                      batch_size=batch_size, gpus=eval_gpus, procs_per_gpu=eval_procs, device=device)
        _save(out_dir, settings, rows)
        rows = collect_zero_shot(out_dir)
    print(markdown_table(rows))
    return rows


def _check_arguments(model, kv_heads, inits, layers, out, corpus, calib_tokens, val_tokens, seq_len, heal_steps,
                     heal_batch_size, heal_lr, heal_seq_len, heal_mixing_lr_mult, tasks, limit, device, batch_size,
                     eval_gpus, eval_procs, overwrite) -> Path:
    """Every argument, checked before any model is loaded; returns the results folder."""
    from ..convert.convert import check_request, parse_layers
    from ..convert.heads import INITS
    from ..data.prepare import check_corpus
    from ..io.load import check_model_path, model_config
    from ..runtime import about, check_gpus, holding, output_folder, resolve_device

    check_model_path("model", model)
    if not kv_heads or any(h < 1 for h in kv_heads):
        raise ValueError(f"kv_heads: needs h' >= 1, at least one, got {kv_heads}")
    if not inits or any(i not in INITS for i in inits):
        raise ValueError(f"inits: expected some of {', '.join(INITS)}, got {inits}")
    for name, value, least in (("calib_tokens", calib_tokens, 0), ("val_tokens", val_tokens, 1), ("seq_len", seq_len, 2),
                               ("heal_steps", heal_steps, 0), ("heal_batch_size", heal_batch_size, 1),
                               ("heal_seq_len", heal_seq_len, 2), ("batch_size", batch_size, 1),
                               ("eval_procs", eval_procs, 1)):
        if value < least:
            raise ValueError(f"{name}: must be >= {least}, got {value}")
    for name, value in (("heal_lr", heal_lr), ("heal_mixing_lr_mult", heal_mixing_lr_mult)):
        if not value > 0:
            raise ValueError(f"{name}: must be positive, got {value}")
    if "activation" in inits and calib_tokens == 0:
        raise ValueError("calib_tokens: the activation init fits calibration text; give calib_tokens > 0")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    if tasks:
        from ..eval.data import parse_tasks

        parse_tasks(tasks)
    check_corpus("corpus", corpus)
    resolve_device("device", device)
    check_gpus("eval_gpus", eval_gpus)
    out_dir = output_folder("out", out, "study-compression", overwrite, own=holding("results.json"))
    with about("model"):
        config = model_config(model)  # (None for a .gguf file: checked once it is imported)
    if config is not None:
        for h in kv_heads:
            check_request(config, h, parse_layers(layers, config.n_layers))
    return out_dir


def collect_zero_shot(out: str | Path) -> list[dict]:
    """Fill the rows of OUT/results.json that lack zero-shot scores from OUT/zero_shot/, where
    evaluate-many leaves one folder per model as it finishes it. A call stopped while scoring at the end
    thus keeps the models it scored; it also serves a report made from such a folder."""
    out_dir = Path(out)
    saved = json.loads((out_dir / "results.json").read_text())
    rows, found = saved["rows"], False
    for row in rows:
        f = _score_file(out_dir, Path(row.get("path", "")))
        if "zero_shot" not in row and f.is_file():
            row["zero_shot"] = _summary(json.loads(f.read_text()), saved["settings"].get("limit"))
            found = True
    if found:
        _save(out_dir, saved["settings"], rows)
    return rows


def _score_file(out_dir: Path, model: Path) -> Path:
    """Where the end-of-table `mea evaluate-many` writes the zero-shot scores of ``model``."""
    from ..eval.many import result_dirname

    return out_dir / "zero_shot" / result_dirname(model.name) / "results.json"


def _heal_stage(steps: int, batch_size: int, seq_len: int) -> str:
    return f"healed {steps * batch_size * seq_len:,} tokens"


def _has_weights(path: Path) -> bool:
    """Whether a converted folder or a healing run still holds its weights."""
    from ..io.checkpoint import CheckpointError, latest_checkpoint

    if (path / "model.safetensors").is_file():
        return True
    try:
        return latest_checkpoint(path) is not None
    except CheckpointError:
        return False


def _finished(run: Path) -> bool:
    f = run / "status.json"
    return f.is_file() and json.loads(f.read_text()).get("status") == "finished"


ADDITIVE_SETTINGS = ("heal_original",)


def _earlier_rows(out_dir: Path, settings: dict) -> dict:
    """Rows that an earlier, interrupted call with the same settings finished, by (model, h', init, stage),
    so that a second call continues the table instead of converting and healing again."""
    f = out_dir / "results.json"
    if not f.is_file():
        return {}
    saved = json.loads(f.read_text())
    # Settings that only add rows (the healed-original control) leave the earlier rows valid.
    same = lambda d: {k: v for k, v in d.items() if k not in ADDITIVE_SETTINGS}
    if same(saved.get("settings", {})) != same(json.loads(json.dumps(settings))):
        raise ValueError(f"out: {out_dir} holds a table made with other settings; choose another --out or delete it")
    return {(r["model"], r["kv_heads"], r["init"], r["stage"]): r for r in saved.get("rows", [])}


def _mean_err(report: dict, key: str) -> Optional[float]:
    errs = [r[key] for r in report["per_layer"] if r["compressed"] and r[key] is not None]
    return sum(errs) / len(errs) if errs else None


def markdown_table(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in (r.get("zero_shot") or {}).get("tasks", {})})
    head = ["model", "h'", "init", "stage", "KV bytes/token", "K err", "V err", "val ppl"] + tasks + (["avg"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        zs = r.get("zero_shot") or {}
        errs = [f"{100 * r[k]:.1f}%" if r.get(k) is not None else "-" for k in ("k_rel_err_mean", "v_rel_err_mean")]
        cells = [r["model"], str(r["kv_heads"]), r["init"], r["stage"], f"{r['kv_bytes_per_token']:,}", *errs,
                 f"{r['val_ppl']:.2f}"]
        cells += [f"{100 * zs['tasks'][t]:.1f}" if zs.get("tasks", {}).get(t) is not None else "-" for t in tasks]
        if tasks:
            cells.append(f"{100 * zs['average']:.1f}" if zs.get("average") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(out_dir: Path, settings: dict, rows: list[dict]) -> None:
    (out_dir / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    (out_dir / "table.md").write_text(markdown_table(rows) + "\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(compression_table, args=sys.argv[1:])
