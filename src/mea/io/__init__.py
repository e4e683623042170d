"""Model I/O: every way a model reaches disk and comes back.

- :mod:`mea.io.load`: :func:`load_model` (a run, a checkpoint, a mea or LLaMA Hugging Face folder, or
  a ``.gguf`` file -> :class:`mea.Transformer`); ``check_model_path`` and ``model_config``, which
  tell what a path holds without reading its weights (the commands' argument checks).
- :mod:`mea.io.checkpoint`: the run and checkpoint directory format that ``mea pretrain`` writes
  (``save_checkpoint``, ``latest_checkpoint``, ``resolve_checkpoint``, ``load_checkpoint``, ...).
- :mod:`mea.io.hf`: Hugging Face folders: :func:`save_hf`, :func:`export_hf` (``mea export-hf``),
  ``load_hf``/``load_hf_mea``/``load_hf_llama``; tokenizers: :func:`tokenizer_folder` (which tokenizer
  a model reads) and :func:`load_tokenizer_for` (it as a transformers tokenizer); :func:`parse_dtype`.
- :mod:`mea.io.gguf`: GGUF import: :func:`import_gguf` (``mea import-gguf``), ``gguf_folder``.
- :mod:`mea.io.results`: a sweep's ``results.csv`` (``read_results``), written by ``mea sweep``.

The remote code saved folders carry lives a layer down, in :mod:`mea.models.remote_code`. Names are
imported on first use, so ``import mea.io`` imports neither transformers nor safetensors.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": "load",
    "save_hf": "hf",
    "export_hf": "hf",
    "tokenizer_folder": "hf",
    "load_tokenizer_for": "hf",
    "parse_dtype": "hf",
    "import_gguf": "gguf",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
