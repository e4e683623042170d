"""Atomic checkpoints of a run: weights (safetensors), optimizer and trainer state.

Layout of a run directory::

    RUN/config.yaml                       resolved config; key ``model`` = ModelConfig.to_dict()
    RUN/checkpoints/latest                name of the newest complete checkpoint
    RUN/checkpoints/step_0000100/
        model.safetensors                 core Transformer state dict (tied lm_head omitted)
        model_config.json                 ModelConfig, so a checkpoint dir stands alone
        trainer.pt                        optimizer state, RNG states
        state.json                        step, tokens, data position, metrics

A checkpoint is written to a temporary directory and renamed into place, then ``latest`` is
replaced atomically: a kill at any moment leaves the previous checkpoint intact.
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

MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    save_file(model_state_for_saving(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    (tmp / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", name)
    # Prune old checkpoints only after the new one is in place.
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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

    try:
        return load_file(str(ckpt / MODEL_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot be read ({e}); the checkpoint is corrupt") from e


def load_model_config(ckpt: Path) -> ModelConfig:
    f = ckpt / "model_config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing; not a mea checkpoint")
    return ModelConfig.from_dict(json.loads(f.read_text()))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> Transformer:
    """Load the core model from a run directory (its latest checkpoint) or a checkpoint directory."""
    ckpt = resolve_checkpoint(path)
    config = load_model_config(ckpt)
    model = Transformer(config)
    state = load_model_state(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)
