"""``load_model(path)``: a core model from any path mea writes or reads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.transformer import Transformer
from .checkpoint import load_checkpoint
from .hf import DType, load_hf, parse_dtype


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
