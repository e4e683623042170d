"""The run and checkpoint directory format: atomic checkpoints of weights, optimizer and trainer state,
in one of two layouts.

Layout of a run directory::

    RUN/config.yaml                       resolved config; key ``model`` = ModelConfig.to_dict()
    RUN/checkpoints/latest                name of the newest complete checkpoint
    RUN/checkpoints/step_0000100/         a "full" checkpoint (one process holds all of it):
        model.safetensors                 core Transformer state dict (tied lm_head omitted)
        model_config.json                 ModelConfig, so a checkpoint dir stands alone
        trainer.pt                        optimizer state, RNG states
        state.json                        step, tokens, data position, metrics, the weights' sha256
    RUN/checkpoints/step_0000200/         a "dcp" (sharded) checkpoint: every rank writes its shards
        shards/.metadata, shards/__R_0.distcp   torch.distributed.checkpoint files: model and
                                          optimizer state under "model" and "optim", each tensor
                                          stored once however it was sharded
        model_config.json
        trainer.pt                        RNG state (the optimizer is in the shards)
        state.json                        as above, with the sha256 of every shard file

A checkpoint is written to a temporary directory, flushed to disk and renamed into place, then
``latest`` is replaced atomically: a kill (or a power loss) at any moment leaves the previous
checkpoint intact. Loading checks the weights (or every shard) against their sha256, so garbled
bytes are an error, not a model. A sharded checkpoint loads on any number of ranks (the trainer's
resume reshards it) and, consolidated in one process without a process group, as a plain model
(:func:`load_checkpoint`, hence ``load_model``, ``mea export-hf``, ``mea evaluate``, ``--init_from``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..models.config import ModelConfig
from ..models.transformer import Transformer
from ..runtime import atomic_write_text

MODEL_FILE = "model.safetensors"
SHARDS_DIR = "shards"  # a sharded checkpoint's torch.distributed.checkpoint files
CHECKPOINT_FORMATS = ("full", "dcp")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (damaged, incomplete, or not matching its config)."""


def model_state_for_saving(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], config: ModelConfig,
                    trainer_state: dict[str, Any], state: dict[str, Any], keep: int = 2) -> Path:
    """Write a full checkpoint (one process: the caller gathered ``model_state``) and make it ``latest``."""
    from safetensors.torch import save_file

    from ..data.fetch import sha256_file

    tmp = _fresh_tmp(run_dir, step)
    save_file(model_state_for_saving(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    return _finish(run_dir, step, tmp, config, trainer_state, {**state, "model_sha256": sha256_file(tmp / MODEL_FILE)},
                   keep)


def save_sharded_checkpoint(run_dir: str | Path, step: int, app_state: dict[str, Any], config: ModelConfig,
                            trainer_state: dict[str, Any], state: dict[str, Any], keep: int = 2) -> Path:
    """Write a sharded checkpoint with torch.distributed.checkpoint and make it ``latest``; called on
    every rank (collective), each writing its own shards of ``app_state`` ({"model": ..., "optim": ...},
    as ``get_state_dict`` gives them: DTensor shards under FSDP). Rank 0 writes the small files. With
    several nodes, RUN must be on a file system every node sees."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ..data.fetch import sha256_file

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    name = _step_name(step)
    tmp = _fresh_tmp(run_dir, step) if rank == 0 else Path(run_dir) / "checkpoints" / f".tmp_{name}"
    if distributed:
        dist.barrier()
    with _single_process_quiet():
        dcp.save(app_state, storage_writer=dcp.FileSystemWriter(str(tmp / SHARDS_DIR), sync_files=True),
                 no_dist=not distributed)
    # Each rank hashes the files it wrote (__RANK_*.distcp): no rank reads the whole checkpoint.
    mine = {f.name: sha256_file(f) for f in sorted((tmp / SHARDS_DIR).glob(f"__{rank}_*"))}
    if distributed:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    final = None
    if rank == 0:
        shards = {k: v for part in parts for k, v in part.items()}
        shards[".metadata"] = sha256_file(tmp / SHARDS_DIR / ".metadata")
        final = _finish(run_dir, step, tmp, config, trainer_state, {**state, "format": "dcp", "shards": shards}, keep)
    if distributed:
        dist.barrier()  # nobody goes on (or resumes) before `latest` names the new checkpoint
    return final or Path(run_dir) / "checkpoints" / name


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process whenever no process group is up: here that is the intent."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(ckpt: Path) -> Optional[int]:
    """The step of a checkpoint directory named ``step_NNNNNNN``, else None."""
    tail = ckpt.name[5:]
    return int(tail) if ckpt.name.startswith("step_") and tail.isdigit() else None


def _fresh_tmp(run_dir: str | Path, step: int) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp_{_step_name(step)}"
    if tmp.exists():  # a save killed half-way
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish(run_dir: str | Path, step: int, tmp: Path, config: ModelConfig, trainer_state: dict[str, Any],
            state: dict[str, Any], keep: int) -> Path:
    """The small files, everything flushed, the rename into place, ``latest``, pruning."""
    ckpt_root = Path(run_dir) / "checkpoints"
    name = _step_name(step)
    final = ckpt_root / name
    (tmp / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.rglob("*"):  # on disk before `latest` names it
        if f.is_file():
            _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", name)
    # Prune only after the new one is in place; by step, not by name (step_10000000 sorts before
    # step_9999999). Checkpoints past this step are from a run resumed at an earlier one (--resume_from):
    # that future was replaced, and they go once the new trajectory has a checkpoint of its own.
    done = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir() and step_of(p) is not None), key=step_of)
    stale = [p for p in done if step_of(p) > step]
    kept = [p for p in done if step_of(p) <= step]
    for old in stale + (kept[:-keep] if keep > 0 else []):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_format(ckpt: Path) -> Optional[str]:
    """``full`` or ``dcp`` for a complete checkpoint directory, None for anything else."""
    if (ckpt / MODEL_FILE).is_file():
        return "full"
    if (ckpt / SHARDS_DIR / ".metadata").is_file():
        return "dcp"
    return None


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps of the checkpoint directories in RUN/checkpoints that hold weights, in order."""
    root = Path(run_dir) / "checkpoints"
    found = (p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None and checkpoint_format(p))
    return sorted(step_of(p) for p in found)


def earlier_steps_hint(run_dir: str | Path, before: Optional[int] = None) -> str:
    """How to go back to an earlier checkpoint of RUN, for an error about a damaged one."""
    steps = [s for s in list_checkpoints(run_dir) if before is None or s < before]
    if not steps:
        return "no earlier checkpoint is left in it"
    return (f"resume from an earlier checkpoint with --resume_from STEP (here: {', '.join(map(str, steps))}), "
            f"or load one directly ({Path(run_dir) / 'checkpoints' / _step_name(steps[-1])})")


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.exists():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    path = root / name
    if not name or "/" in name or checkpoint_format(path) is None:
        shown = name if name and len(name) < 40 and name.isprintable() else "no checkpoint"
        raise CheckpointError(f"{latest} names {shown}, which holds no {MODEL_FILE} or {SHARDS_DIR}/: the run "
                              f"directory is damaged; {earlier_steps_hint(run_dir)}")
    return path


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The checkpoint of ``step`` in RUN (for ``--resume_from``), or an error listing those there are."""
    path = Path(run_dir) / "checkpoints" / _step_name(step)
    if checkpoint_format(path) is None:
        have = list_checkpoints(run_dir)
        raise FileNotFoundError(f"resume_from: {Path(run_dir)} has no checkpoint of step {step}; it has "
                                + (", ".join(map(str, have)) if have else "none"))
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory -> checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if checkpoint_format(path):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {MODEL_FILE} or {SHARDS_DIR}/) nor a run with "
                                "checkpoints/latest")
    return ckpt


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    want = read_state(ckpt).get("model_sha256") if (ckpt / "state.json").exists() else None
    if want is not None:  # checkpoints from before the hash was written load unchecked
        from ..data.fetch import sha256_file

        if sha256_file(ckpt / MODEL_FILE) != want:
            raise CheckpointError(f"{ckpt / MODEL_FILE}: its bytes do not match the sha256 saved with it; the "
                                  "checkpoint is corrupt (an earlier one may still be in checkpoints/)")
    try:
        return load_file(str(ckpt / MODEL_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot be read ({e}); the checkpoint is corrupt") from e


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json (step, tokens, ...), with a clear error when it is damaged."""
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: cannot be read ({e}); the checkpoint is corrupt") from e


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer.pt (optimizer state, RNG), with a clear error when it is damaged."""
    try:
        return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # pickle and zip errors of a truncated or garbled file
        raise CheckpointError(f"{ckpt / 'trainer.pt'}: cannot be read ({e}); the checkpoint is corrupt") from e


def load_weights(model: Transformer, ckpt: Path) -> Transformer:
    """Load a checkpoint's weights into ``model`` (on the CPU, not wrapped); every weight must be there
    (only a tied lm_head need not be stored), so a checkpoint missing tensors is an error rather than
    a model with fresh layers. A sharded checkpoint is consolidated here in this one process."""
    if checkpoint_format(ckpt) == "dcp":
        return _load_sharded_weights(model, ckpt)
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def verify_shards(ckpt: Path, rank: int = 0, world_size: int = 1) -> None:
    """Check a sharded checkpoint's files against the sha256 state.json holds for them: rank ``rank``
    of ``world_size`` checks every ``world_size``-th file, so ranks share the reading. Raises
    CheckpointError naming the first missing or damaged file it checked."""
    from ..data.fetch import sha256_file

    shards = read_state(ckpt).get("shards")
    if not isinstance(shards, dict) or ".metadata" not in shards:
        raise CheckpointError(f"{ckpt / 'state.json'}: lists no shard files; the checkpoint is corrupt")
    for name in sorted(shards)[rank::world_size]:
        f = ckpt / SHARDS_DIR / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint is incomplete")
        if sha256_file(f) != shards[name]:
            raise CheckpointError(f"{f}: its bytes do not match the sha256 saved with it; the checkpoint is corrupt")


def load_sharded(ckpt: Path, app_state: dict[str, Any]) -> None:
    """Load a sharded checkpoint into ``app_state`` in place, on every rank of the process group (any
    number of ranks, any sharding: DCP reads the pieces each rank's tensors need), or in one process
    without one. The shards are checked first (split over the ranks); a bad one is a CheckpointError
    on every rank, naming it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        verify_shards(ckpt, rank, world)
        err = None
    except CheckpointError as e:
        err = str(e)
    if distributed:
        errs: list = [None] * world
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise CheckpointError(err)
    try:
        with _single_process_quiet():
            dcp.load(app_state, storage_reader=dcp.FileSystemReader(str(ckpt / SHARDS_DIR)), no_dist=not distributed)
    except Exception as e:  # DCP wraps per-rank failures in its own exception types
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt / SHARDS_DIR}: cannot be loaded ({first[-1] if first else type(e).__name__}); "
                              "the checkpoint is corrupt or does not match the model") from e


def _load_sharded_weights(model: Transformer, ckpt: Path) -> Transformer:
    import torch.distributed.checkpoint as dcp

    verify_shards(ckpt)
    stored = dcp.FileSystemReader(str(ckpt / SHARDS_DIR)).read_metadata().state_dict_metadata
    want = model.state_dict()
    keys = {k for k in stored if k.startswith("model.")}
    missing = [k for k in want if f"model.{k}" not in keys and not (k == "lm_head.weight" and model.config.tie_embeddings)]
    unexpected = [k[len("model."):] for k in keys if k[len("model."):] not in want]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    state = {k: v for k, v in want.items() if f"model.{k}" in keys}
    try:
        with _single_process_quiet():
            dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(ckpt / SHARDS_DIR)), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt / SHARDS_DIR}: cannot be read ({type(e).__name__}); the checkpoint is corrupt") from e
    return model


def load_model_config(ckpt: Path) -> ModelConfig:
    f = ckpt / "model_config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing; not a mea checkpoint")
    return ModelConfig.from_dict(json.loads(f.read_text()))


def load_checkpoint(path: str | Path, dtype: Optional[torch.dtype] = None) -> Transformer:
    """The core model of a run directory (its latest checkpoint) or a checkpoint directory, on the CPU
    (``dtype``: as saved, float32, unless given). :func:`mea.io.load_model` takes every kind of path."""
    ckpt = resolve_checkpoint(path)
    model = load_weights(Transformer(load_model_config(ckpt)), ckpt)
    return model.to(dtype) if dtype else model
