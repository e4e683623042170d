"""The run and checkpoint directory format: atomic checkpoints of weights (safetensors), optimizer and
trainer state.

Layout of a run directory::

    RUN/config.yaml                       resolved config; key ``model`` = ModelConfig.to_dict()
    RUN/checkpoints/latest                name of the newest complete checkpoint
    RUN/checkpoints/step_0000100/
        model.safetensors                 core Transformer state dict (tied lm_head omitted)
        model_config.json                 ModelConfig, so a checkpoint dir stands alone
        trainer.pt                        optimizer state, RNG states
        state.json                        step, tokens, data position, metrics, the weights' sha256

A checkpoint is written to a temporary directory, flushed to disk and renamed into place, then
``latest`` is replaced atomically: a kill (or a power loss) at any moment leaves the previous
checkpoint intact. Loading checks the weights against their sha256, so garbled bytes are an error,
not a model.
"""
from __future__ import annotations

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (damaged, incomplete, or not matching its config)."""


def model_state_for_saving(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], config: ModelConfig,
                    trainer_state: dict[str, Any], state: dict[str, Any], keep: int = 2) -> Path:
    from safetensors.torch import save_file

    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp_{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    from ..data.fetch import sha256_file

    save_file(model_state_for_saving(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    (tmp / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "model_sha256": sha256_file(tmp / MODEL_FILE)}, indent=2))
    for f in tmp.iterdir():  # on disk before `latest` names it
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", name)
    # Prune old checkpoints only after the new one is in place; by step, not by name (step_10000000
    # sorts before step_9999999).
    done = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.exists():
        return None
    path = root / latest.read_text().strip()
    if not (path / MODEL_FILE).exists():
        raise CheckpointError(f"{latest} names {path.name}, which has no {MODEL_FILE}: the run directory is damaged")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory -> checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if (path / MODEL_FILE).exists():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {MODEL_FILE}) nor a run with checkpoints/latest")
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
    """Load a checkpoint's weights into ``model``; every weight must be there (only a tied lm_head is not
    stored), so a checkpoint missing tensors is an error rather than a model with fresh layers."""
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
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
