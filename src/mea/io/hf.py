"""Hugging Face folders: saving mea models as them, reading mea and LLaMA ones, and tokenizers.

- :func:`save_hf` writes a core :class:`mea.Transformer` as a Hugging Face folder (``MEAForCausalLM``,
  safetensors, remote code, optionally a tokenizer); :func:`export_hf` (``mea export-hf``) does it for
  a ``mea pretrain`` run.
- :func:`load_hf` reads a saved ``mea`` folder (:func:`load_hf_mea`) or a LLaMA folder
  (:func:`load_hf_llama`; module names already agree, so the weights load without renaming) as a
  core model. :func:`mea.io.load_model` takes these and runs, checkpoints and ``.gguf`` files.
- :func:`tokenizer_folder` finds the tokenizer a model was trained with (an HF folder's own files, or
  the ``tokenizer/`` a run started ``--init_from`` such a folder keeps); ``None`` means mea's GPT-2.
  :func:`load_tokenizer_for` loads it as a transformers tokenizer (:func:`gpt2_hf_tokenizer` for GPT-2).
- :func:`parse_dtype` reads the dtype names the commands take.

The remote code a saved folder carries is written by :mod:`mea.models.remote_code`. transformers is
imported inside the functions that need it.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..models.config import ModelConfig
from ..models.transformer import Transformer

PathLike = Union[str, os.PathLike]
DType = Optional[Union[str, torch.dtype]]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def parse_dtype(dtype: DType) -> Optional[torch.dtype]:
    """A dtype from its name (float32/fp32, bfloat16/bf16, float16/fp16) or as given; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {', '.join(names)}")
    return names[dtype]


# ---------------------------------------------------------------------------------------- tokenizers
RUN_TOKENIZER_DIR = "tokenizer"  # inside a run directory: the tokenizer of the model it started from


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _model_type(folder: Path) -> Optional[str]:
    return json.loads((folder / "config.json").read_text()).get("model_type")


def tokenizer_folder(model: PathLike) -> Optional[Path]:
    """The folder holding the tokenizer of ``model`` (an HF folder, a run or checkpoint directory, or a
    ``.gguf`` file).

    An HF folder answers for itself. A run continued from a model with its own tokenizer (``mea pretrain
    --init_from`` an HF folder, e.g. SmolLM2 or a converted model) keeps a copy in ``RUN/tokenizer``,
    found from the run or from any of its checkpoints. A ``.gguf`` file answers with the folder it is
    imported to (:func:`mea.io.gguf.gguf_folder`). ``None``: the model uses mea's GPT-2 tokenizer.

    Raises:
        FileNotFoundError: an HF folder of another model than mea's (e.g. LLaMA) without tokenizer
            files: GPT-2 ids would mean other tokens to it.
    """
    p = Path(model).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        from .gguf import gguf_folder

        p = gguf_folder(p)
    if (p / "config.json").is_file():
        if _has_tokenizer(p):
            return p
        if _model_type(p) != "mea":
            raise FileNotFoundError(f"model: {p} has no tokenizer files (tokenizer.json); copy the model's "
                                    "tokenizer into the folder")
        return None
    # a run directory, or a checkpoint inside RUN/checkpoints/ (possibly through the `latest` link)
    for d in (p, p.parent, p.parent.parent):
        if (d / RUN_TOKENIZER_DIR).is_dir() and _has_tokenizer(d / RUN_TOKENIZER_DIR):
            return d / RUN_TOKENIZER_DIR
        if (d / "config.yaml").is_file():
            break
    return None


def gpt2_hf_tokenizer():
    """mea's GPT-2 BPE as a transformers tokenizer (written by ``save_hf_tokenizer``, loaded back)."""
    from transformers import AutoTokenizer

    from ..data.tokenizer import save_hf_tokenizer

    with tempfile.TemporaryDirectory() as d:
        save_hf_tokenizer(d)
        return AutoTokenizer.from_pretrained(d)


def load_tokenizer_for(model: PathLike):
    """The transformers tokenizer of ``model`` (what :func:`tokenizer_folder` finds, else mea's GPT-2)."""
    folder = tokenizer_folder(model)
    if folder is None:
        return gpt2_hf_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def copy_tokenizer(src: PathLike, dst: PathLike) -> Path:
    """Copy the tokenizer files of folder ``src`` into ``dst`` (created); returns ``dst``."""
    src, dst = Path(src), Path(dst)
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not src.is_dir() or not found:
        raise FileNotFoundError(f"tokenizer: {src} is not a folder with tokenizer files ({', '.join(TOKENIZER_FILES[:3])})")
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copyfile(src / f, dst / f)
    return dst


# ---------------------------------------------------------------------------------------- saving
def _save_tokenizer(tokenizer: Any, out: Path, config) -> None:
    if isinstance(tokenizer, str) and tokenizer == "gpt2":
        from ..data.tokenizer import load_tokenizer, save_hf_tokenizer

        save_hf_tokenizer(out, model_max_length=config.max_seq_len)
        eos = load_tokenizer().eos_token_id
        for key in ("eos_token_id", "bos_token_id"):
            setattr(config, key, eos)
    elif isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        copy_tokenizer(src, out)
        from transformers import AutoTokenizer

        _special_ids(AutoTokenizer.from_pretrained(str(src)), config)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        _special_ids(tokenizer, config)
    else:
        raise ValueError(f"tokenizer: expected None, 'gpt2', a tokenizer folder or an object with save_pretrained, "
                         f"got {type(tokenizer).__name__}")


def _special_ids(tokenizer, config) -> None:
    """The tokenizer's eos, bos and pad ids into the model config (generate and pipelines read them there)."""
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(config, key, getattr(tokenizer, key))


def save_hf(model: Transformer, out_dir: PathLike, tokenizer: Any = None,
            dtype: DType = None) -> Path:
    """Save a core model as a Hugging Face folder that ``AutoModelForCausalLM`` loads.

    The folder holds ``config.json`` (``model_type: mea``, with ``auto_map``), ``model.safetensors``
    with the core model's state dict (tied ``lm_head.weight`` stored once), ``generation_config.json``
    and the remote code (see :mod:`mea.models.remote_code`).

    Args:
        model: the core model; it is not modified.
        out_dir: folder to write (created if needed).
        tokenizer: ``None``; ``"gpt2"`` for mea's GPT-2 BPE; a folder to copy tokenizer files from;
            or a tokenizer object with ``save_pretrained``.
        dtype: store the weights in this dtype (``float32``, ``bfloat16``, ``float16``); default: as they are.
    """
    from ..models.modeling_mea import MEAForCausalLM

    if not isinstance(model, Transformer):
        raise ValueError(f"model: expected a mea.Transformer, got {type(model).__name__}")
    dtype = parse_dtype(dtype)
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = MEAForCausalLM.from_core(model)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out, hf.config)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            setattr(hf.generation_config, key, getattr(hf.config, key, None))
    hf.save_pretrained(str(out))
    return out


def export_hf(run_dir: str, out_dir: str, dtype: Optional[str] = None, tokenizer: bool = True,
              overwrite: bool = False) -> str:
    """Turn a ``mea pretrain`` run (its latest checkpoint) or one checkpoint into a Hugging Face folder.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import mea``, or
    with ``trust_remote_code=True`` without mea; it includes the run's tokenizer (GPT-2, or the one of
    the model the run was initialized from, see :func:`tokenizer_folder`). It is written beside
    ``out_dir`` and renamed into place when complete.

    Args:
        run_dir: a run directory (``config.yaml`` + ``checkpoints/latest``) or a checkpoint directory.
        out_dir: the folder to write: new or empty, unless ``overwrite``.
        dtype: store the weights as float32, bfloat16 or float16 (default: as in the checkpoint).
        tokenizer: also write the tokenizer files.
        overwrite: replace ``out_dir`` if it holds anything.
    """
    from ..runtime import about, output_folder, replace_folder, temp_folder
    from .checkpoint import load_checkpoint, resolve_checkpoint

    parse_dtype(dtype)
    with about("run_dir"):
        resolve_checkpoint(run_dir)
    out = output_folder("out_dir", out_dir, "export-hf", overwrite)
    with about("run_dir"):
        model = load_checkpoint(run_dir)
        tok = (tokenizer_folder(run_dir) or "gpt2") if tokenizer else None
    tmp = temp_folder(out)
    try:
        save_hf(model, tmp, tokenizer=tok, dtype=dtype)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported {run_dir} ({model.config.attention}, {model.num_params():,} parameters) to {out}")
    return str(out)


# ---------------------------------------------------------------------------------------- loading
def safetensors_files(path: Path, check: bool = False) -> list[str]:
    """The weight files of a folder; with ``check``, open each one (header and size) for a clear error."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index); only safetensors folders are read")
    if check:
        from safetensors import safe_open

        for f in files:
            try:
                with safe_open(str(path / f), framework="pt") as st:
                    st.keys()
            except Exception as e:  # safetensors raises its own types for truncated or garbled files
                raise ValueError(f"{path / f}: cannot be read as safetensors ({e})") from e
    return files


def _load_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = safetensors_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(path / f)))
        except Exception as e:  # safetensors raises its own types for truncated or garbled files
            raise ValueError(f"{path / f}: cannot be read as safetensors ({e})") from e
    return state


def llama_model_config(path: PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face LLaMA folder (``config.json``, LlamaConfig's defaults).

    Raises:
        ValueError: the folder is not a LLaMA model, or uses a feature mea's decoder lacks (biases,
            RoPE scaling, another activation).
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face model folder")
    c = AutoConfig.from_pretrained(str(path))
    if c.model_type != "llama":
        raise ValueError(f"{path}: model_type {c.model_type!r}; load_hf_llama reads LLaMA folders only")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type") or (getattr(c, "rope_scaling", None) or {}).get("rope_type", "default")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    problems = []
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("biases in attention or MLP")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation {c.hidden_act!r}")
    if getattr(c, "pretraining_tp", 1) != 1:
        problems.append("pretraining_tp > 1")
    if problems:
        raise ValueError(f"{path}: not supported by mea's LLaMA decoder: {', '.join(problems)}")
    h = c.num_attention_heads
    hk = c.num_key_value_heads or h
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=h, n_kv_heads=hk,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // h, d_ff=c.intermediate_size,
        attention="mha" if hk == h else "gqa", head_norm=False, max_seq_len=c.max_position_embeddings,
        rope_theta=float(theta if theta is not None else 10000.0), norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(c.tie_word_embeddings), init_std=getattr(c, "initializer_range", 0.02),
        name=path.name,
    )


def load_hf_llama(path: PathLike, dtype: DType = torch.float32) -> Transformer:
    """Load a Hugging Face LLaMA folder (config.json + safetensors) into a core :class:`mea.Transformer`.

    Config mapping: hidden_size -> d_model, num_attention_heads -> n_heads, num_key_value_heads ->
    n_kv_heads (attention ``mha`` when equal, else ``gqa``), intermediate_size -> d_ff, rope_theta,
    rms_norm_eps -> norm_eps, tie_word_embeddings -> tie_embeddings, max_position_embeddings ->
    max_seq_len. The logits equal ``LlamaForCausalLM``'s.

    Args:
        path: the folder.
        dtype: dtype of the returned model (default float32; ``None`` keeps the stored dtype).
    """
    path = Path(path)
    config = llama_model_config(path)
    state = _load_safetensors_folder(path)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints store it
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a LLaMA of this config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    stored = next(iter(state.values())).dtype
    model = model.to(parse_dtype(dtype) or stored)
    return model.eval()


def load_hf_mea(path: PathLike, dtype: DType = None) -> Transformer:
    """Load a folder written by :func:`save_hf` (``model_type`` mea) as a core :class:`mea.Transformer`.

    Args:
        path: the folder.
        dtype: dtype of the returned model (default: as stored).
    """
    from ..models.modeling_mea import MEAForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face model folder")
    model_type = _model_type(path)
    if model_type != "mea":
        raise ValueError(f"{path}: model_type {model_type!r}; load_hf_mea reads folders written by save_hf ('mea')")
    safetensors_files(path, check=True)  # a clear error for a missing or corrupt weights file
    hf = MEAForCausalLM.from_pretrained(str(path), dtype=parse_dtype(dtype) or "auto")
    return hf.core.eval()


def load_hf(path: PathLike, dtype: DType = None) -> Transformer:
    """Load a Hugging Face folder as a core :class:`mea.Transformer`: a ``save_hf`` folder (``model_type``
    mea) through :func:`load_hf_mea`, a LLaMA folder through :func:`load_hf_llama`.

    Args:
        path: the folder (with config.json).
        dtype: dtype of the returned model (default: as stored).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face model folder")
    model_type = _model_type(path)
    if model_type == "llama":
        return load_hf_llama(path, dtype=dtype)
    if model_type == "mea":
        return load_hf_mea(path, dtype=dtype)
    raise ValueError(f"model: {cfg_file} has model_type={model_type!r}; mea reads 'mea' and LLaMA-family ('llama') "
                     "folders")
