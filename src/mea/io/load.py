"""``load_model(path)``: a core model from any path mea writes or reads."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.config import ModelConfig
from ..models.transformer import Transformer
from .checkpoint import MODEL_FILE, latest_checkpoint, load_checkpoint, load_model_config, resolve_checkpoint
from .hf import DType, load_hf, parse_dtype

# The weight files of a Hugging Face folder (mea reads the safetensors ones; transformers reads all).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_model(path: Union[str, os.PathLike], dtype: DType = None,
               device: Optional[Union[str, torch.device]] = None) -> Transformer:
    """Load a core :class:`mea.Transformer`, in eval mode, from any of:

    - a ``mea pretrain`` run directory (its latest checkpoint) or one checkpoint directory;
    - a Hugging Face folder of ``model_type`` mea (written by ``save_hf``, ``mea export-hf``,
      ``mea convert``) or llama (e.g. ``mea import-gguf``'s);
    - a LLaMA-family ``.gguf`` file, imported once into the cache as such a folder
      (:func:`mea.io.gguf.gguf_folder`).

    Args:
        path: the run, checkpoint, folder or file.
        dtype: dtype of the returned model (``float32``, ``bfloat16``, ``float16`` or a torch dtype;
            default: as stored).
        device: where to put it (default: the CPU).

    Raises:
        FileNotFoundError: nothing at ``path``, or a directory that is none of the above.
        ValueError: an HF folder of another model type, or weights that do not fit their config.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run, checkpoint, model folder or .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model: {p} is a file; mea loads .gguf files, and run, checkpoint and model folders")
        from .gguf import gguf_folder

        p = gguf_folder(p)
    if (p / "config.json").is_file():
        model = load_hf(p, dtype=dtype)
    else:
        model = load_checkpoint(p, dtype=parse_dtype(dtype))
    return (model.to(device) if device is not None else model).eval()


def check_model_path(field: str, path: Union[str, os.PathLike]) -> Path:
    """That ``path`` (the option ``field``) is something :func:`load_model` reads, found without reading
    weights: a run with a checkpoint, a checkpoint, a Hugging Face folder or a ``.gguf`` file. Whether
    the weights themselves are intact is found when they are loaded.

    Raises:
        FileNotFoundError: nothing there, or a folder of another kind (a run before its first checkpoint).
        ValueError: a file that is not ``.gguf``; a run whose ``checkpoints/latest`` is damaged.
    """
    from ..runtime import about

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{field}: {p} does not exist (expected a mea run, a checkpoint, a model folder or a "
                                ".gguf file)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{field}: {p} is a file; mea loads .gguf files, and run, checkpoint and model folders")
        return p
    if (p / MODEL_FILE).is_file() and not (p / "config.json").exists():
        return p  # a checkpoint
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{field}: {p / 'config.json'} is not JSON ({e})") from e
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError(f"{field}: {p / 'config.json'} names no model_type; not a Hugging Face model folder")
        if not any((p / f).is_file() for f in HF_WEIGHTS):
            raise FileNotFoundError(f"{field}: {p} has a config.json but no weights ({', '.join(HF_WEIGHTS)})")
        return p
    with about(field):
        if latest_checkpoint(p) is not None:
            return p
    what = "a run without a checkpoint yet" if (p / "config.yaml").is_file() else "no run, checkpoint or model folder"
    raise FileNotFoundError(f"{field}: {p} is {what} (no checkpoints/latest, {MODEL_FILE} or config.json)")


def model_config(path: Union[str, os.PathLike]) -> Optional[ModelConfig]:
    """The :class:`ModelConfig` of what :func:`load_model` would load from ``path``, read without the
    weights (its config.json or model_config.json); ``None`` for a ``.gguf`` file, whose config is known
    only once it is imported."""
    p = Path(path).expanduser()
    if p.is_file():
        return None
    if (p / "config.json").is_file():
        from .hf import _model_type, llama_model_config

        model_type = _model_type(p)
        if model_type == "llama":
            return llama_model_config(p)
        if model_type != "mea":
            raise ValueError(f"model: {p / 'config.json'} has model_type={model_type!r}; mea reads 'mea' and "
                             "LLaMA-family ('llama') folders")
        from ..models.configuration_mea import MEAConfig

        return MEAConfig.from_pretrained(str(p)).to_model_config()
    return load_model_config(resolve_checkpoint(p))
