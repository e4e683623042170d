"""Moving models between mea and Hugging Face folders.

- :func:`save_hf` writes a core :class:`mea.Transformer` as a Hugging Face folder (``MEAForCausalLM``,
  safetensors, remote code, optionally a tokenizer); :func:`export_hf` (``mea export-hf``) does it for
  a ``mea pretrain`` run.
- :func:`load_hf_llama` reads a Hugging Face LLaMA folder into a core :class:`mea.Transformer`
  (module names already agree, so the weights load without renaming).
- :func:`load_hf` loads a saved ``mea`` folder or a LLaMA folder as a core model;
  :func:`load_transformer` also takes a run or checkpoint directory.
- :func:`write_remote_code` puts the files that ``trust_remote_code=True`` needs into a folder.
- :func:`tokenizer_folder` finds the tokenizer a model was trained with (an HF folder's own files, or
  the ``tokenizer/`` a run started ``--init_from`` such a folder keeps); ``None`` means mea's GPT-2.

transformers is imported inside the functions that need it.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import ModelConfig
from .transformer import Transformer

PathLike = Union[str, os.PathLike]

# What the saved modeling code imports from mea; mea_snapshot.py exports the same names.
SNAPSHOT_EXPORTS = {
    "ModelConfig": "models.config",
    "Transformer": "models.transformer",
    "padding_mask": "models.transformer",
    "AttnInputs": "layers.attention",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def _dtype(dtype: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
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


def tokenizer_folder(model: PathLike) -> Optional[Path]:
    """The folder holding the tokenizer of ``model`` (an HF folder, a run or a checkpoint directory).

    An HF folder answers for itself. A run continued from a model with its own tokenizer (``mea pretrain
    --init_from`` an HF folder, e.g. SmolLM2 or a converted model) keeps a copy in ``RUN/tokenizer``,
    found from the run or from any of its checkpoints. ``None``: the model uses mea's GPT-2 tokenizer.
    """
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        return p if _has_tokenizer(p) else None
    # a run directory, or a checkpoint inside RUN/checkpoints/ (possibly through the `latest` link)
    for d in (p, p.parent, p.parent.parent):
        if (d / RUN_TOKENIZER_DIR).is_dir() and _has_tokenizer(d / RUN_TOKENIZER_DIR):
            return d / RUN_TOKENIZER_DIR
        if (d / "config.yaml").is_file():
            break
    return None


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


# ---------------------------------------------------------------------------------------- remote code
def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def snapshot_sources() -> dict[str, str]:
    """The source files of mea that the modeling code needs, keyed by path inside the package.

    Starts from the modules named in :data:`SNAPSHOT_EXPORTS` and follows every relative import
    (those inside functions and ``try`` blocks too), so optional fast paths travel along.
    """
    root = _package_root()
    todo = [root / (m.replace(".", "/") + ".py") for m in set(SNAPSHOT_EXPORTS.values())]
    sources: dict[str, str] = {}
    while todo:
        f = todo.pop()
        rel = f.relative_to(root).as_posix()
        if rel in sources:
            continue
        src = f.read_text(encoding="utf-8")
        sources[rel] = src
        for node in ast.walk(ast.parse(src, filename=str(f))):
            if isinstance(node, ast.Import) and any(a.name == "mea" or a.name.startswith("mea.") for a in node.names):
                raise ValueError(f"{rel}: imports mea by absolute name; the saved snapshot needs relative imports")
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if node.module and (node.module == "mea" or node.module.startswith("mea.")):
                    raise ValueError(f"{rel}: `from {node.module} import ...` by absolute name; the saved snapshot "
                                     "needs relative imports")
                continue
            base = f.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")) if node.module else base
            for cand in [target.with_suffix(".py"), target / "__init__.py"] + [target / f"{a.name}.py" for a in node.names]:
                if cand.is_file() and root in cand.resolve().parents:
                    todo.append(cand.resolve())
    return dict(sorted(sources.items()))


_SNAPSHOT_TEMPLATE = '''"""A snapshot of the modeling code of mea {version}, written by save_pretrained.

It lets this folder load with ``trust_remote_code=True`` where mea is not installed: the sources
below are imported as the private package ``{package}`` (an import hook serves them from this
file). Where mea is installed, configuration_mea.py and modeling_mea.py use the installed library
instead. Generated file: do not edit.
"""
import importlib
import importlib.abc
import importlib.util
import linecache
import sys

MEA_VERSION = {version!r}
PACKAGE = {package!r}
SOURCES = {sources}


class _SnapshotImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    package = PACKAGE

    def _file(self, fullname):
        if fullname == PACKAGE:
            return "__init__.py", True
        if not fullname.startswith(PACKAGE + "."):
            return None, False
        key = fullname[len(PACKAGE) + 1:].replace(".", "/")
        if key + ".py" in SOURCES:
            return key + ".py", False
        if any(k.startswith(key + "/") for k in SOURCES):
            return key + "/__init__.py", True
        return None, False

    def find_spec(self, fullname, path=None, target=None):
        name, is_package = self._file(fullname)
        if name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=name, is_package=is_package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name, _ = self._file(module.__name__)
        src = SOURCES.get(name, "")
        filename = "<mea " + MEA_VERSION + " snapshot>/" + name
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        exec(compile(src, filename, "exec"), module.__dict__)


if not any(getattr(f, "package", None) == PACKAGE for f in sys.meta_path):
    sys.meta_path.append(_SnapshotImporter())


def _get(module, name):
    return getattr(importlib.import_module(PACKAGE + "." + module), name)


{exports}
'''


def snapshot_module_source() -> str:
    """The text of ``mea_snapshot.py``: mea's modeling sources and a small import hook that serves them."""
    from .. import __version__

    sources = snapshot_sources()
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:12]
    body = "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in sources.items()) + "}"
    exports = "\n".join(f"{name} = _get({mod!r}, {name!r})" for name, mod in SNAPSHOT_EXPORTS.items())
    return _SNAPSHOT_TEMPLATE.format(version=__version__, package=f"_mea_snapshot_{digest}", sources=body,
                                     exports=exports)


def write_remote_code(out_dir: PathLike) -> None:
    """Write configuration_mea.py, modeling_mea.py and mea_snapshot.py into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in ("configuration_mea.py", "modeling_mea.py"):
        shutil.copyfile(here / name, out / name)
    (out / "mea_snapshot.py").write_text(snapshot_module_source(), encoding="utf-8")


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
            dtype: Optional[Union[str, torch.dtype]] = None) -> Path:
    """Save a core model as a Hugging Face folder that ``AutoModelForCausalLM`` loads.

    The folder holds ``config.json`` (``model_type: mea``, with ``auto_map``), ``model.safetensors``
    with the core model's state dict (tied ``lm_head.weight`` stored once), ``generation_config.json``
    and the remote code (see :mod:`mea.models.modeling_mea`).

    Args:
        model: the core model; it is not modified.
        out_dir: folder to write (created if needed).
        tokenizer: ``None``; ``"gpt2"`` for mea's GPT-2 BPE; a folder to copy tokenizer files from;
            or a tokenizer object with ``save_pretrained``.
        dtype: store the weights in this dtype (``float32``, ``bfloat16``, ``float16``); default: as they are.
    """
    from .modeling_mea import MEAForCausalLM

    if not isinstance(model, Transformer):
        raise ValueError(f"model: expected a mea.Transformer, got {type(model).__name__}")
    dtype = _dtype(dtype)
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


def export_hf(run_dir: str, out_dir: str, dtype: Optional[str] = None, tokenizer: bool = True) -> str:
    """Turn a ``mea pretrain`` run (its latest checkpoint) or one checkpoint into a Hugging Face folder.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import mea``, or
    with ``trust_remote_code=True`` without mea; it includes the run's tokenizer (GPT-2, or the one of
    the model the run was initialized from, see :func:`tokenizer_folder`).

    Args:
        run_dir: a run directory (``config.yaml`` + ``checkpoints/latest``) or a checkpoint directory.
        out_dir: the folder to write.
        dtype: store the weights as float32, bfloat16 or float16 (default: as in the checkpoint).
        tokenizer: also write the tokenizer files.
    """
    from ..train.checkpoint import load_model

    model = load_model(run_dir)
    tok = (tokenizer_folder(run_dir) or "gpt2") if tokenizer else None
    out = save_hf(model, out_dir, tokenizer=tok, dtype=dtype)
    print(f"exported {run_dir} ({model.config.attention}, {model.num_params():,} parameters) to {out}")
    return str(out)


# ---------------------------------------------------------------------------------------- loading
def _safetensors_files(path: Path, check: bool = False) -> list[str]:
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

    files = _safetensors_files(path)
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


def load_hf_llama(path: PathLike, dtype: Optional[Union[str, torch.dtype]] = torch.float32) -> Transformer:
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
    model = model.to(_dtype(dtype) or stored)
    return model.eval()


def load_hf_mea(path: PathLike, dtype: Optional[Union[str, torch.dtype]] = None) -> Transformer:
    """Load a folder written by :func:`save_hf` (``model_type`` mea) as a core :class:`mea.Transformer`.

    Args:
        path: the folder.
        dtype: dtype of the returned model (default: as stored).
    """
    from .modeling_mea import MEAForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face model folder")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "mea":
        raise ValueError(f"{path}: model_type {model_type!r}; load_hf_mea reads folders written by save_hf ('mea')")
    _safetensors_files(path, check=True)  # a clear error for a missing or corrupt weights file
    hf = MEAForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype) or "auto")
    return hf.core.eval()


def load_hf(path: PathLike, dtype: Optional[Union[str, torch.dtype]] = None) -> Transformer:
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
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type == "llama":
        return load_hf_llama(path, dtype=dtype)
    if model_type == "mea":
        return load_hf_mea(path, dtype=dtype)
    raise ValueError(f"{path}: model_type {model_type!r}; mea reads 'mea' and 'llama' folders")


def load_transformer(path: PathLike, dtype: Optional[Union[str, torch.dtype]] = None) -> Transformer:
    """Load a core model from a run directory, a checkpoint directory, or a Hugging Face folder (:func:`load_hf`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run, checkpoint or model folder")
    if (path / "config.json").is_file():
        return load_hf(path, dtype=dtype)
    from ..train.checkpoint import load_model

    return load_model(path, dtype=_dtype(dtype)).eval()
