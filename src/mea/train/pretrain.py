"""`mea pretrain`: train a model on token shards, resumably, on one device or many (torchrun)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..io.checkpoint import (CHECKPOINT_FORMATS, CheckpointError, atomic_write_text, checkpoint_format,
                             earlier_steps_hint, latest_checkpoint, load_model_config, load_weights, read_state,
                             read_trainer_state, save_checkpoint, save_sharded_checkpoint, step_checkpoint, step_of)
from ..models.config import ModelConfig
from ..models.loss import Distill
from ..models.transformer import Transformer
from ..runtime import resolve_device
from . import distributed as D
from .config import DataConfig, TrainConfig, lr_at
from .metrics import MetricsLog, plot_loss
from .monitor import attention_logit_record

# Dense bf16 peak of the accelerators we report MFU on (vendor datasheets). Matched against the device
# name longest key first, so "L40S" is not taken for "L4", nor an "H100 PCIe" for the SXM "H100".
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of the current GPU, or None where unknown (CPU, other chips)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((PEAK_FLOPS[k] for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in name), None)


def _open_data(data: DataConfig):
    """The (train, val) splits of the corpus, resolved once (a corpus name prepares it on first use)."""
    from ..data.prepare import corpus_dir
    from ..data.shards import TokenDataset
    from ..runtime import about

    with about("data.corpus"):  # a damaged shard
        path = corpus_dir(data.corpus)
        return TokenDataset(path, "train"), TokenDataset(path, data.eval_split)


def _data_in_model_tokens(data: DataConfig, init_from: str, verbose: bool) -> DataConfig:
    """A model continued from weights reads its corpus in its own tokenizer's ids: a GPT-2 corpus is
    re-tokenized for it (cached)."""
    from ..data.windows import corpus_in_model_tokens
    from ..io.hf import tokenizer_folder

    return dataclasses.replace(data, corpus=corpus_in_model_tokens(data.corpus, tokenizer_folder(init_from), verbose))


def resolve_model_config(preset: str, attention: Optional[str], n_kv_heads: Optional[int],
                         head_norm: Optional[bool], model: Optional[dict], seq_len: int) -> ModelConfig:
    from ..models.config import parse_text_values

    over: dict[str, Any] = parse_text_values(model or {})
    for key, val in (("attention", attention), ("n_kv_heads", n_kv_heads), ("head_norm", head_norm)):
        if val is not None:
            if key in over and over[key] != val:
                raise ValueError(f"{key}: --{key} {val!r} and --model.{key} {over[key]!r} disagree; give one")
            over[key] = val
    over.pop("name", None)
    cfg = ModelConfig.from_preset(preset, **over)
    if cfg.max_seq_len < seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    return cfg


def evaluate_loss(model, val, data: DataConfig, batch_size: int, max_batches: int, device: str,
                  autocast, info: D.DistInfo) -> float:
    """Mean validation loss over the same fixed windows every time, split across ranks (each runs the
    same number of forward passes: see :func:`mea.models.loss.window_loss`)."""
    from ..data.windows import validation_batches
    from ..models.loss import window_loss

    batches = validation_batches(val, batch_size, data.seq_len, max_batches)
    res = window_loss(model, batches, device, autocast, rank=info.rank, world_size=info.world_size)
    if res.n_tokens == 0:
        raise ValueError("data: the validation split is too small for one evaluation batch; lower data.seq_len")
    return res.loss


# What a run writes into its folder; a folder holding any of them is a run (see _check_out_dir).
RUN_FILES = ("config.yaml", "metrics.jsonl", "status.json", "loss.png", "checkpoints", "tokenizer")
COMPILE_MODES = ("layers", "model")


def pretrain(out: str = "runs/tiny", preset: str = "tiny", attention: Optional[str] = None,
             n_kv_heads: Optional[int] = None, head_norm: Optional[bool] = None, model: Optional[dict] = None,
             data: DataConfig = DataConfig(), train: TrainConfig = TrainConfig(), init_from: Optional[str] = None,
             distill_from: Optional[str] = None, resume: bool = False, resume_from: Optional[int] = None,
             overwrite: bool = False, device: str = "auto", compile: Optional[bool] = None,
             compile_mode: Optional[str] = None, parallel: Optional[str] = None,
             checkpoint_format: Optional[str] = None,
             halt_after: Optional[int] = None, progress: bool = True) -> dict:
    """Pretrain a model on prepared token shards; write config, metrics, checkpoints and a loss plot to OUT.

    Args:
        out: run directory (config.yaml, metrics.jsonl, checkpoints/, loss.png).
        preset: model preset (tiny, mini, small, 125m, 350m, smollm2-135m).
        attention: attention variant (mha, gqa, diff, talking_heads, mea; default mea, or what --model
            names).
        n_kv_heads: stored key/value heads (gqa groups, or h' for mea).
        head_norm: switch the per-head RMSNorm on or off (default: on for mea and diff).
        model: further ModelConfig overrides, e.g. {d_model: 384, n_layers: 6}.
        data: corpus and sequence length.
        train: optimization settings.
        init_from: start from these weights (a mea run or checkpoint, a Hugging Face folder, e.g. one
            written by `mea convert`, or a LLaMA .gguf file); the model settings then come from it.
        distill_from: distill from this teacher (any model init_from takes, e.g. the original of a
            converted model): the loss mixes KL(teacher || student) at train.distill_temperature,
            weighted train.distill_alpha, with the next-token loss. Its vocabulary and tokenizer must be
            the student's.
        resume: continue the run in OUT from its latest checkpoint, with its saved config.
        resume_from: continue the run in OUT from the checkpoint of this step instead of the latest
            (implies resume): metrics after it are dropped and later checkpoints are replaced as the run
            goes on. The way back from a damaged latest checkpoint.
        overwrite: replace the run in OUT (its config, metrics, checkpoints, plot and status) instead
            of refusing to start in a folder that holds one.
        device: auto, cpu, cuda.
        compile: torch.compile the model (default false; a resumed run: as it was).
        compile_mode: with compile, ``layers`` (each decoder layer; default) or ``model`` (the whole
            forward pass; the loss's softmax arithmetic is compiled on its own either way).
        parallel: under torchrun, ddp or fsdp (FSDP2 fully_shard per layer; default ddp; a resumed
            run: as it was).
        checkpoint_format: ``dcp`` (sharded: every rank writes its shards with
            torch.distributed.checkpoint) or ``full`` (rank 0 writes model.safetensors and trainer.pt).
            Default: dcp for fsdp on several ranks, full otherwise. Either resumes on any number of ranks.
        halt_after: stop after this step as if killed (no final eval or checkpoint); for testing resume.
        progress: show a progress bar.
        overwrite: replace what OUT holds (another run, or a folder mea pretrain did not write) with a
            new run.
    """
    if resume_from is not None:
        if resume_from < 1:
            raise ValueError(f"resume_from: a checkpoint step (>= 1), got {resume_from}")
        resume = True
    if checkpoint_format is not None and checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: unknown format {checkpoint_format!r}; expected dcp or full")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: unknown mode {compile_mode!r}; expected layers or model")
    out_dir = _check_arguments(out, preset, attention, n_kv_heads, head_norm, model, data, init_from, resume, device,
                               parallel, halt_after, overwrite)
    if resume:
        saved = out_dir / "config.yaml"
        if not saved.exists():
            raise FileNotFoundError(f"out: {out_dir} holds no run to resume (no config.yaml)")
        import yaml

        conf = yaml.safe_load(saved.read_text())
        _check_resume_options(conf, preset, attention, n_kv_heads, head_norm, model, data, train, init_from,
                              distill_from)
        preset, model = conf["preset"], conf["model"]
        attention = n_kv_heads = head_norm = None
        data, train = DataConfig(**conf["data"]), TrainConfig(**conf["train"])
        init_from, distill_from = conf.get("init_from"), conf.get("distill_from")
        # How to run (not what to train) may change on resume: given ones win, else the run's own.
        compile = conf.get("compile", False) if compile is None else compile
        compile_mode = conf.get("compile_mode") if compile_mode is None else compile_mode
        parallel = conf.get("parallel", "ddp") if parallel is None else parallel
        checkpoint_format = conf.get("checkpoint_format") if checkpoint_format is None else checkpoint_format
    else:
        _check_out_dir(out_dir, overwrite)
    if not distill_from:
        _check_no_distill_settings(train)
    compile, compile_mode, parallel = bool(compile), compile_mode or "layers", parallel or "ddp"
    device = resolve_device("device", device, index=False)
    info = D.setup(device)
    dev = f"cuda:{info.local_rank}" if device == "cuda" else device
    run = _Run(out_dir, preset, attention, n_kv_heads, head_norm, model, data, train, init_from, distill_from,
               resume, resume_from, overwrite, device, dev, compile, compile_mode, parallel, checkpoint_format,
               halt_after, progress, info)
    try:
        return _train(run)
    finally:
        D.teardown(info)


@dataclasses.dataclass
class _Run:
    """The settings of one call, resolved (a resumed run's from its config.yaml)."""

    out_dir: Path
    preset: str
    attention: Optional[str]
    n_kv_heads: Optional[int]
    head_norm: Optional[bool]
    model_over: Optional[dict]
    data: DataConfig
    train: TrainConfig
    init_from: Optional[str]
    distill_from: Optional[str]
    resume: bool
    resume_from: Optional[int]
    overwrite: bool
    device: str
    dev: str
    compile: bool
    compile_mode: str
    parallel: str
    checkpoint_format: Optional[str]  # as given or saved (None: by ranks and parallel, see _format)
    halt_after: Optional[int]
    progress: bool
    info: D.DistInfo

    @property
    def format(self) -> str:
        if self.checkpoint_format:
            return self.checkpoint_format
        return "dcp" if self.info.enabled and self.parallel == "fsdp" else "full"


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """A new run does not silently replace one: a folder that holds a run's files (even a run killed
    before its first checkpoint, which left only its config and metrics) is refused unless
    --overwrite true. Files of other programs in the folder are left alone either way."""
    found = [f for f in RUN_FILES if (out_dir / f).exists()]
    if found and not overwrite:
        has_ckpt = (out_dir / "checkpoints" / "latest").exists()
        what = "a run" if has_ckpt else f"a run with no checkpoint ({', '.join(found)})"
        raise FileExistsError(f"out: {out_dir} already holds {what}; pass --resume true to continue it, --overwrite true "
                              "to replace it, or choose another --out")


def _check_no_distill_settings(train: TrainConfig) -> None:
    defaults = TrainConfig()
    for key in ("distill_temperature", "distill_alpha"):
        if getattr(train, key) != getattr(defaults, key):
            raise ValueError(f"train.{key}: set, but there is no teacher; pass --distill_from MODEL")


def is_run(path: Path) -> bool:
    """A folder mea pretrain wrote (its config.yaml), or that mea sweep set up for it (sweep_args.yaml)."""
    return (path / "config.yaml").is_file() or (path / "sweep_args.yaml").is_file()


def _check_arguments(out, preset, attention, n_kv_heads, head_norm, model, data: DataConfig, init_from, resume,
                     device, parallel, halt_after, overwrite) -> Path:
    """Every argument, checked before any work (no folder written, no corpus prepared, no weights read);
    returns the run directory."""
    from ..data.prepare import check_corpus
    from ..runtime import option_names, output_folder

    resolve_device("device", device, index=False)
    if resume and overwrite:
        raise ValueError("overwrite: --resume true continues the run in OUT and --overwrite true replaces it; give one")
    out_dir = output_folder("out", out, "pretrain", overwrite, own=is_run)
    if parallel not in (None, "ddp", "fsdp"):
        raise ValueError(f"parallel: expected ddp or fsdp, got {parallel!r}")
    if halt_after is not None and halt_after < 1:
        raise ValueError(f"halt_after: must be >= 1, got {halt_after}")
    if resume:  # the saved settings are checked against the given ones when the run is read
        return out_dir
    check_corpus("data.corpus", data.corpus)
    if init_from:
        from ..io.load import check_model_path

        check_model_path("init_from", init_from)
    else:
        with option_names("model", keep=("attention", "n_kv_heads", "head_norm", "preset")):
            resolve_model_config(preset, attention, n_kv_heads, head_norm, model, data.seq_len)
    return out_dir


def _train(r: _Run) -> dict:
    out_dir, train, info, device, dev = r.out_dir, r.train, r.info, r.device, r.dev
    data, init_from = r.data, r.init_from
    torch.manual_seed(train.seed)
    ckpt = _checkpoint_to_resume(r) if r.resume else None
    if ckpt is not None:  # everything is in the checkpoint: the weights init_from named may be gone
        cfg = load_model_config(ckpt)
        net = Transformer(cfg)
    elif init_from:
        from ..io.load import load_model

        from ..runtime import about

        with D.main_first(info), about("init_from"):  # a .gguf is imported into a cache on first use
            net = load_model(init_from, dtype=torch.float32)  # float32 master weights, as a fresh model's
        cfg = net.config
    else:
        cfg = resolve_model_config(r.preset, r.attention, r.n_kv_heads, r.head_norm, r.model_over, data.seq_len)
        net = Transformer(cfg)
    if cfg.max_seq_len < data.seq_len:
        cfg.max_seq_len = data.seq_len
    teacher = None
    if r.distill_from:  # checked against the student before any corpus work or writing
        with D.main_first(info):
            teacher = _load_teacher(r.distill_from, cfg, out_dir if ckpt is not None else init_from, device, dev)
    with D.main_first(info):  # preparing or re-tokenizing the corpus fills a shared cache
        if init_from and ckpt is None:  # a resumed run's saved corpus is already in the model's ids
            data = _data_in_model_tokens(data, init_from, verbose=info.is_main)
        train_ds, val_ds = _open_data(data)
    if train_ds.vocab_size > cfg.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.vocab_size} is smaller than the corpus tokenizer's {train_ds.vocab_size}")
    # Found now, not at the first evaluation `eval_every` steps in (with nothing saved yet).
    for ds, what in ((train_ds, "training"), (val_ds, "validation")):
        if ds.num_windows(data.seq_len) < 1:
            raise ValueError(f"data: the {what} split of {data.corpus} ({ds.num_tokens:,} tokens) is shorter than one "
                             f"window of data.seq_len + 1 = {data.seq_len + 1} tokens; lower data.seq_len")

    log = MetricsLog(out_dir / "metrics.jsonl")
    start_step, tokens = 0, 0
    trainer_state = None
    resumed_val_loss = None
    if ckpt is not None:
        state = _resume_read(ckpt, r, lambda: read_state(ckpt))
        if checkpoint_format(ckpt) == "full":
            _resume_read(ckpt, r, lambda: load_weights(net, ckpt))
        start_step, tokens, resumed_val_loss = state["step"], state["tokens"], state.get("val_loss")
        train = _same_global_batch(train, state, info)
        trainer_state = _resume_read(ckpt, r, lambda: read_trainer_state(ckpt))
        if trainer_state.get("rng") is not None:
            torch.set_rng_state(trainer_state["rng"])
    if info.is_main:
        if ckpt is not None:
            log.truncate_after(start_step)
            if r.resume_from is not None:  # the run goes on from here: `latest` says so at once
                atomic_write_text(out_dir / "checkpoints" / "latest", ckpt.name)
            print(f"resuming {out_dir} at step {start_step}", file=sys.stderr)
        else:
            if r.resume:
                print(f"no checkpoint in {out_dir}; starting fresh", file=sys.stderr)
            if r.overwrite or r.resume:
                _clear_run(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_config(out_dir, r.preset, cfg, data, r.train, init_from, r.compile, r.parallel, r.distill_from,
                          r.compile_mode, r.checkpoint_format)
        if init_from and Path(init_from).exists():  # the run's text is in that model's tokenizer: evaluate
            # and export need it too. Copied on every start, resumed ones included, so a run folder that
            # lost its copy gets it back (while the source is still there).
            from ..io.hf import RUN_TOKENIZER_DIR, copy_tokenizer, tokenizer_folder

            tok_dir = tokenizer_folder(init_from)
            if tok_dir is not None:
                copy_tokenizer(tok_dir, out_dir / RUN_TOKENIZER_DIR)

    net.to(dev)
    if r.compile:
        net.compile_for_training(r.compile_mode)
        if teacher is not None:
            teacher.compile_layers()
    wrapped = D.wrap(net, info, r.parallel, device)
    from .optim import build_optimizer

    optimizer = build_optimizer(wrapped, train, device)
    if ckpt is not None and checkpoint_format(ckpt) == "dcp":
        _resume_read(ckpt, r, lambda: D.load_sharded_state(wrapped, optimizer, ckpt))
    elif trainer_state is not None:
        D.load_optimizer_state(wrapped, optimizer, trainer_state["optimizer"])
    fwd = wrapped
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext

    diverge_at = train.diverge_loss or 1.5 * math.log(cfg.vocab_size)
    tokens_per_step = train.batch_size * train.grad_accum * data.seq_len * info.world_size
    flops_per_token = cfg.flops_per_token(data.seq_len)
    peak = peak_flops(device)
    epochs_note = tokens_per_step * train.max_steps / max(1, train_ds.num_tokens)
    if info.is_main and start_step == 0:
        print(f"model {cfg.name}/{cfg.attention}: {net.num_params():,} params ({net.num_params(True):,} non-embedding); "
              f"{tokens_per_step:,} tokens/step, {train.max_steps} steps = {epochs_note:.2f} epochs of "
              f"{train_ds.num_tokens:,} tokens" + (f"; distilling from {r.distill_from}" if teacher else ""),
              file=sys.stderr)

    status, val_loss, reason = "running", resumed_val_loss, None
    done = start_step
    bar = None
    if r.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=train.max_steps, initial=start_step, desc=f"pretrain {cfg.attention}", dynamic_ncols=True)
    wrapped.train()
    t_last, tok_last = time.perf_counter(), tokens
    step = start_step
    for step in range(start_step, train.max_steps):
        lr = lr_at(step, train)
        for g in optimizer.param_groups:  # lr_mult: the mixing matrices' multiplier (train.mixing_lr_mult)
            g["lr"] = lr * g.get("lr_mult", 1.0)
        sums = torch.zeros(3, device=dev)  # loss, lm_loss, kl over the micro-batches
        for micro in range(train.grad_accum):
            x, y = train_ds.batch(step * train.grad_accum + micro, train.batch_size, data.seq_len,
                                  seed=train.seed, rank=info.rank, world_size=info.world_size)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            distill = None
            if teacher is not None:
                with torch.no_grad(), autocast():
                    distill = Distill(teacher.hidden_states(x), teacher.lm_head.weight, train.distill_temperature,
                                      train.distill_alpha)
            sync = micro == train.grad_accum - 1
            ctx = wrapped.no_sync() if (info.enabled and r.parallel == "ddp" and not sync) else contextlib.nullcontext()
            with ctx:
                with autocast():
                    out = fwd(x, labels=y, distill=distill)
                loss = out.loss / train.grad_accum
                loss.backward()
            sums += torch.stack([out.loss.detach(), out.lm_loss, out.kl if out.kl is not None else out.lm_loss * 0]
                                ).float() / train.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), train.grad_clip if train.grad_clip > 0 else float("inf"))
        loss_val, lm_val, kl_val = D.all_reduce_mean(sums, info).tolist()
        grad_val = float(grad_norm)
        # A non-finite gradient with a finite loss would write NaN weights (clipping spreads it to every
        # gradient), and a checkpoint of them would pass for the last good one.
        if not math.isfinite(loss_val) or not math.isfinite(grad_val) or loss_val > diverge_at:
            reason = (f"loss {loss_val:.4g} at step {step + 1} is not finite" if not math.isfinite(loss_val) else
                      f"gradient norm {grad_val:.4g} at step {step + 1} is not finite" if not math.isfinite(grad_val)
                      else f"loss {loss_val:.4g} at step {step + 1} exceeds {diverge_at:.3g}")
            status = "diverged"
            optimizer.zero_grad(set_to_none=True)
            if info.is_main:
                log.write({"step": step + 1, "tokens": tokens + tokens_per_step, "loss": loss_val if math.isfinite(loss_val) else None,
                           "lr": lr, "event": "diverged", "reason": reason})
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += tokens_per_step
        done = step + 1
        rec: dict[str, Any] = {}
        if done % train.log_every == 0 or done == train.max_steps:
            now = time.perf_counter()
            tps = (tokens - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens
            rec = {"step": done, "tokens": tokens, "loss": loss_val, "lr": lr, "grad_norm": grad_val,
                   "tokens_per_s": tps, "mfu": (tps * flops_per_token / (peak * info.world_size)) if peak else None}
            if teacher is not None:
                rec.update({"lm_loss": lm_val, "kl": kl_val})
        if done % train.eval_every == 0 or done == train.max_steps:
            val_loss = evaluate_loss(fwd, val_ds, data, train.batch_size, train.eval_batches, dev, autocast, info)
            rec.update({"step": done, "tokens": tokens, "val_loss": val_loss})
            rec.update(attention_logit_record(net, val_ds, train.batch_size, data.seq_len, dev, autocast,
                                              info.is_main and r.parallel != "fsdp"))
        if rec and info.is_main:
            log.write(rec)
            if "val_loss" in rec:
                plot_loss(log.read(), out_dir / "loss.png", title=f"{cfg.name} {cfg.attention}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", **({"val": f"{val_loss:.3f}"} if val_loss else {}))
        if r.halt_after is not None and done >= r.halt_after:
            status = "halted"
            if done % train.save_every == 0:
                _save(r, done, tokens, wrapped, optimizer, cfg, train, val_loss)
            break
        if done % train.save_every == 0 or done == train.max_steps:
            _save(r, done, tokens, wrapped, optimizer, cfg, train, val_loss)
    else:
        status = "finished"
    if status == "running":
        status = "finished"
    if bar is not None:
        bar.close()
    summary: dict[str, Any] = {"status": status, "step": done, "tokens": tokens, "val_loss": val_loss, "out": str(out_dir)}
    if reason:
        summary["reason"] = reason
    if info.is_main:
        if status in ("finished", "diverged") and log.read():
            plot_loss(log.read(), out_dir / "loss.png", title=f"{cfg.name} {cfg.attention}")
        last = _last_checkpoint_name(out_dir)
        summary["checkpoint"] = str(out_dir / "checkpoints" / last) if last else None
        if (out_dir / "loss.png").is_file():  # status.json names only files that are there
            summary["loss_png"] = str(out_dir / "loss.png")
        atomic_write_text(out_dir / "status.json", json.dumps(summary, indent=2))
        if status == "diverged":
            kept = (f"the last good checkpoint, {summary['checkpoint']}, is kept" if last else
                    f"no checkpoint was saved (the first save was due at step {train.save_every})")
            print(f"run diverged: {reason}; {kept}", file=sys.stderr)
        elif status == "finished" and val_loss is not None:
            print(f"validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f}) after {tokens:,} tokens; "
                  f"loss curve: {out_dir / 'loss.png'}")
    return summary


def _checkpoint_to_resume(r: _Run) -> Optional[Path]:
    """The checkpoint a resumed run continues from: the one of --resume_from, else the latest; a
    damaged `latest` is an error that says how to go back to an earlier step."""
    if r.resume_from is not None:
        return step_checkpoint(r.out_dir, r.resume_from)
    return latest_checkpoint(r.out_dir)


def _resume_read(ckpt: Path, r: _Run, read):
    """``read()``, with a damaged checkpoint's error saying how to resume from an earlier one."""
    try:
        return read()
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {earlier_steps_hint(r.out_dir, before=step_of(ckpt))}") from e


def _last_checkpoint_name(out_dir: Path) -> Optional[str]:
    try:
        ckpt = latest_checkpoint(out_dir)
    except CheckpointError:
        return None
    return ckpt.name if ckpt is not None else None


def _clear_run(out_dir: Path) -> None:
    """Remove a run's own files from OUT (--overwrite, or a resume that found no checkpoint)."""
    import shutil

    for name in RUN_FILES:
        f = out_dir / name
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        elif f.exists() or f.is_symlink():
            f.unlink()


def _load_teacher(path: str, cfg: ModelConfig, student_source, device: str, dev: str) -> Transformer:
    """The teacher for distillation, in eval mode without gradients (bf16 on CUDA), after checking that it
    reads and writes the student's tokens: the same vocabulary size and the same tokenizer."""
    from ..io.hf import tokenizer_folder
    from ..io.load import load_model

    if not Path(path).exists():
        raise FileNotFoundError(f"distill_from: {path}: no such run, checkpoint, model folder or .gguf file")
    teacher = load_model(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if teacher.config.vocab_size != cfg.vocab_size:
        raise ValueError(f"distill_from: {path} has a vocabulary of {teacher.config.vocab_size:,} ids, the student "
                         f"{cfg.vocab_size:,}; distill from a model with the student's tokenizer")
    t_tok = tokenizer_folder(path)
    s_tok = tokenizer_folder(student_source) if student_source else None
    if not _same_tokenizer(t_tok, s_tok):
        raise ValueError(f"distill_from: {path} uses the tokenizer {t_tok or 'GPT-2 (mea)'}, the student "
                         f"{s_tok or 'GPT-2 (mea)'}, and they differ; distill from a model with the student's tokenizer")
    teacher.requires_grad_(False)
    return teacher.to(dev).eval()


def _same_tokenizer(a: Optional[Path], b: Optional[Path]) -> bool:
    """Whether two tokenizer folders (None: mea's GPT-2) map text to the same ids."""
    if a is None and b is None:
        return True
    if a is not None and b is not None and a.resolve() == b.resolve():
        return True
    if a is not None and b is not None and (a / "tokenizer.json").is_file() and (b / "tokenizer.json").is_file():
        if (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes():
            return True
    def vocab(folder):  # None: mea's GPT-2
        if folder is None:
            from ..io.hf import gpt2_hf_tokenizer

            return gpt2_hf_tokenizer().get_vocab()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder)).get_vocab()

    return vocab(a) == vocab(b)


def _save(r: _Run, step, tokens, wrapped, optimizer, cfg, train, val_loss) -> None:
    info = r.info
    state = {"step": step, "tokens": tokens, "data_index": step * train.grad_accum, "val_loss": val_loss,
             "grad_accum": train.grad_accum, "world_size": info.world_size}
    if r.format == "dcp":
        save_sharded_checkpoint(r.out_dir, step, D.sharded_state(wrapped, optimizer), cfg,
                                {"rng": torch.get_rng_state()}, state, keep=train.keep_checkpoints)
        return
    model_sd, optim_sd = D.full_state(wrapped, optimizer)
    if info.is_main:
        save_checkpoint(r.out_dir, step, model_sd, cfg, {"optimizer": optim_sd, "rng": torch.get_rng_state()}, state,
                        keep=train.keep_checkpoints)
    if info.enabled:
        torch.distributed.barrier()


def _write_config(out_dir: Path, preset, cfg: ModelConfig, data, train, init_from, compile, parallel,
                  distill_from=None, compile_mode="layers", checkpoint_format=None) -> None:
    import yaml

    # The variant is also written at the top level: `mea pretrain --config RUN/config.yaml` then trains
    # the same model (a missing top-level `attention` would take the command's default, mea).
    conf = {"out": str(out_dir), "preset": preset, "attention": cfg.attention, "n_kv_heads": cfg.n_kv_heads,
            "head_norm": cfg.head_norm, "model": cfg.to_dict(), "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(train), "init_from": init_from, "distill_from": distill_from,
            "compile": compile, "compile_mode": compile_mode, "parallel": parallel,
            "checkpoint_format": checkpoint_format}
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(conf, sort_keys=False))


def _check_resume_options(conf: dict, preset, attention, n_kv_heads, head_norm, model: Optional[dict],
                          data: DataConfig, train: TrainConfig, init_from: Optional[str],
                          distill_from: Optional[str]) -> None:
    """`--resume` continues the run as it was configured: a setting given with it that differs from the
    saved one (a longer schedule, another batch size or model) would be silently ignored, so it is an
    error. Settings left at their defaults are not compared."""
    import inspect

    from ..models.config import parse_text_values

    defaults = {k: p.default for k, p in inspect.signature(pretrain).parameters.items()}
    diffs = []

    def differ(name, given, default, saved):
        if given != default and given != saved:
            diffs.append(f"{name}: given {given!r}, the run has {saved!r}")

    differ("preset", preset, defaults["preset"], conf.get("preset"))
    differ("attention", attention, defaults["attention"], conf.get("attention"))
    differ("n_kv_heads", n_kv_heads, defaults["n_kv_heads"], conf.get("n_kv_heads"))
    differ("head_norm", head_norm, defaults["head_norm"], conf.get("head_norm"))
    for k, v in parse_text_values(model or {}).items():
        if k != "name":
            differ(f"model.{k}", v, None, conf["model"].get(k))
    for name, given in (("data", data), ("train", train)):
        g, d, saved = dataclasses.asdict(given), dataclasses.asdict(defaults[name]), conf[name]
        for k, v in g.items():
            # A run continued from other weights saves its corpus re-tokenized for them: not comparable.
            if k in saved and not (name == "data" and k == "corpus" and conf.get("init_from")):
                differ(f"{name}.{k}", v, d[k], saved[k])
    differ("init_from", init_from, defaults["init_from"], conf.get("init_from"))
    differ("distill_from", distill_from, defaults["distill_from"], conf.get("distill_from"))
    if diffs:
        raise ValueError("resume: a resumed run keeps its saved settings; these differ: " + "; ".join(diffs) +
                         ". Start a new run from it instead: mea pretrain --init_from RUN --out NEW ...")


def _same_global_batch(train: TrainConfig, state: dict, info: D.DistInfo) -> TrainConfig:
    """A run resumed on another number of ranks keeps its global batch (and with it the data order:
    global batch s holds the same windows however it is split) by rescaling gradient accumulation."""
    ranks, accum = state.get("world_size"), state.get("grad_accum", train.grad_accum)
    if ranks is None or (ranks == info.world_size and accum == train.grad_accum):
        return train
    micro = accum * ranks  # micro-batches of train.batch_size per optimizer step, over all ranks
    if micro % info.world_size:
        raise ValueError(f"resume: the run trained with {micro} micro-batches of {train.batch_size} per step "
                         f"({ranks} ranks x grad_accum {accum}); {info.world_size} ranks cannot split that evenly")
    if info.is_main:
        print(f"resume: {ranks} -> {info.world_size} ranks; grad_accum {accum} -> {micro // info.world_size} keeps "
              "the global batch", file=sys.stderr)
    return dataclasses.replace(train, grad_accum=micro // info.world_size)
