"""The project's corpus in a pretrained model's own tokenizer.

``mea prepare-data`` stores GPT-2 ids. A model with another vocabulary (SmolLM2: 49,152 ids) needs
the same text in its own ids for calibration, validation perplexity and healing, so this module
decodes the GPT-2 shards document by document (documents end in GPT-2's ``<|endoftext|>``),
encodes them with the model's ``tokenizer.json``, and writes a prepared directory of the same
format (``mea.data.shards``) that ``TokenDataset`` and ``mea pretrain --data.corpus DIR`` read.
It is cached under ``$MEA_CACHE/retokenized/<corpus>-<tokenizer sha256>``.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.prepare import corpus_dir

# Documents per encode_batch call: large enough for the Rust backend to use every core.
_DOCS_PER_BATCH = 512
_GPT2_EOS = 50256


def _stream_documents(shards, eos: int):
    """The documents of a split whose shard files may cut a document: a piece that ends a shard
    without eos continues in the next one (splitting it there would add a boundary)."""
    carry = np.zeros(0, dtype=np.int64)
    for shard in shards:
        arr = np.concatenate([carry, np.asarray(shard, dtype=np.int64)]) if len(carry) else np.asarray(shard)
        ends = np.flatnonzero(arr == eos)
        cut = ends[-1] + 1 if len(ends) else 0
        yield from _documents(arr[:cut], eos)
        carry = np.asarray(arr[cut:], dtype=np.int64)
    if len(carry):
        yield carry


def _documents(tokens: np.ndarray, eos: int):
    """Split a GPT-2 id stream at eos; a trailing piece without eos is a document too."""
    ends = np.flatnonzero(tokens == eos)
    start = 0
    for e in ends:
        if e > start:
            yield tokens[start:e]
        start = e + 1
    if start < len(tokens):
        yield tokens[start:]


def gpt2_source(corpus: str) -> Path:
    """The prepared GPT-2 directory behind ``corpus``: itself, or for a corpus already re-tokenized for some
    model the GPT-2 corpus it was made from (its ids would mean other tokens read as GPT-2's)."""
    from ..data.shards import MANIFEST, read_manifest

    path = corpus_dir(corpus)
    manifest = read_manifest(path)
    if manifest.get("tokenizer", {}).get("name", "gpt2") == "gpt2":
        return path
    source = Path(manifest.get("source") or "/nonexistent")
    if (source / MANIFEST).is_file() and read_manifest(source).get("tokenizer", {}).get("name", "gpt2") == "gpt2":
        return source
    raise ValueError(f"corpus: {path} is in another tokenizer's ids and names no GPT-2 source corpus; give the GPT-2 "
                     "corpus (a name such as prose, or a directory written by mea prepare-data)")


def end_of_document_id(tokenizer_json: Path) -> Optional[int]:
    """The id a model's tokenizer separates pretraining documents with: <|endoftext|> or <|end_of_text|>
    where it has one (an instruct model's eos, such as SmolLM2's <|im_end|>, ends a chat turn instead),
    else the eos token of its tokenizer_config.json, else </s> or <eos>; None if it has none."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    names = ["<|endoftext|>", "<|end_of_text|>"]
    cfg = Path(tokenizer_json).with_name("tokenizer_config.json")
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token")
        names.append(eos.get("content") if isinstance(eos, dict) else eos)
    names += ["</s>", "<eos>"]
    return next((tok.token_to_id(n) for n in names if n and tok.token_to_id(n) is not None), None)


def retokenize_corpus(tokenizer_json: str | Path, corpus: str = "prose", out: Optional[str | Path] = None,
                      max_tokens: Optional[dict[str, int]] = None, progress: bool = True) -> Path:
    """Write ``corpus`` re-encoded with ``tokenizer_json`` as a prepared directory; return its path.

    Args:
        tokenizer_json: the target model's ``tokenizer.json``.
        corpus: a built-in corpus name or a prepared GPT-2 directory.
        out: where to write (default: the cache, keyed by corpus and tokenizer hash).
        max_tokens: per split, stop after this many source (GPT-2) tokens (default: all).
        progress: show tqdm progress.
    """
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from ..data.fetch import cache_dir, sha256_file
    from ..data.shards import DTYPE, FORMAT, MANIFEST, ShardWriter, TokenDataset, read_manifest
    from ..data.tokenizer import load_tokenizer

    tokenizer_json = Path(tokenizer_json)
    if not tokenizer_json.is_file():
        raise FileNotFoundError(f"tokenizer_json: {tokenizer_json} is not a file")
    src = gpt2_source(corpus)
    manifest = read_manifest(src)
    src_sha = sha256_file(src / MANIFEST)  # the source's shards as they are now: a rebuilt corpus is another
    tok_sha = sha256_file(tokenizer_json)
    limit_tag = "" if not max_tokens else "-" + "-".join(f"{k}{v}" for k, v in sorted(max_tokens.items()))
    if out is None:
        out = cache_dir() / "retokenized" / f"{src.resolve().name}-{tok_sha[:16]}{limit_tag}"
    out = Path(out)
    done = out / MANIFEST
    if done.exists():
        try:
            m = read_manifest(out)
            if (m.get("tokenizer", {}).get("sha256") == tok_sha and m.get("source") == str(src.resolve())
                    and m.get("source_manifest_sha256") == src_sha):
                return out
        except (ValueError, FileNotFoundError):
            pass
    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"tokenizer_json: {vocab} ids do not fit the shards' uint16 format")
    eos = end_of_document_id(tokenizer_json)
    if eos is None:
        warnings.warn(f"{tokenizer_json}: no end-of-document token found; documents are written without a "
                      "separator", stacklevel=2)
    gpt2 = load_tokenizer()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    splits = {}
    for split in manifest["splits"]:
        ds = TokenDataset(src, split)
        budget = (max_tokens or {}).get(split)
        writer = ShardWriter(tmp, split)
        n_src = 0
        bar = tqdm(total=budget or ds.num_tokens, desc=f"retokenize {split}", unit="tok", disable=not progress)
        docs = []
        for doc in _stream_documents(ds.shards, _GPT2_EOS):
            if budget is not None and n_src >= budget:
                break
            docs.append(doc)
            n_src += len(doc) + 1
            if len(docs) == _DOCS_PER_BATCH:
                _write_docs(writer, tok, gpt2, docs, eos)
                bar.update(sum(len(d) + 1 for d in docs))
                docs = []
        if docs:
            _write_docs(writer, tok, gpt2, docs, eos)
            bar.update(sum(len(d) + 1 for d in docs))
        bar.close()
        splits[split] = {"shards": writer.close(), "tokens": writer.num_tokens, "source_tokens": n_src}
    (tmp / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "complete": True, "splits": splits, "source": str(src.resolve()),
        "source_manifest_sha256": src_sha,
        "tokenizer": {"name": "tokenizer.json", "sha256": tok_sha, "vocab_size": vocab, "eos_token_id": eos,
                      "vocab_sha256": _vocab_fingerprint(tok.get_vocab(with_added_tokens=True))},
    }, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_docs(writer, tok, gpt2, docs: list[np.ndarray], eos: Optional[int]) -> None:
    texts = [gpt2.decode(d.tolist()) for d in docs]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids + ([eos] if eos is not None else [])
        writer.write(np.asarray(ids, dtype=np.int64))


def corpus_for_model(tokenizer_dir: Optional[Path], corpus: str = "prose",
                     max_tokens: Optional[dict[str, int]] = None) -> Path:
    """The prepared directory whose ids a model reads: the GPT-2 corpus for mea models (``None``; for a
    corpus already re-tokenized for some model, the GPT-2 corpus it was made from), else the corpus
    re-tokenized with the folder's ``tokenizer.json``."""
    if tokenizer_dir is None:
        return gpt2_source(corpus)
    return retokenize_corpus(Path(tokenizer_dir) / "tokenizer.json", corpus, max_tokens=max_tokens)


def _vocab_fingerprint(vocab: dict[str, int]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def vocab_fingerprint(tokenizer_json: str | Path) -> str:
    """A hash of a tokenizer's token -> id map: equal for the same tokenizer however its file was
    written (``save_pretrained`` rewrites tokenizer.json; a byte hash would change)."""
    from tokenizers import Tokenizer

    return _vocab_fingerprint(Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True))


def corpus_in_model_tokens(corpus: str, tokenizer_dir: Optional[Path], verbose: bool = True) -> str:
    """``corpus`` (a built-in name or a prepared directory) as a model whose tokenizer is in
    ``tokenizer_dir`` (``None``: GPT-2) must read it: unchanged when it is in the model's tokenizer,
    else its GPT-2 source re-tokenized for the model (cached, once). Without a GPT-2 source that is an
    error: the ids would silently mean other tokens to the model."""
    from ..data.shards import read_manifest
    from ..data.tokenizer import load_tokenizer

    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ValueError(f"model: its tokenizer in {tokenizer_dir} has no tokenizer.json (a fast tokenizer), "
                         "which re-tokenizing a corpus needs")
    path = corpus_dir(corpus)
    manifest = read_manifest(path)
    tok = manifest.get("tokenizer", {})
    in_gpt2 = tok.get("name", "gpt2") == "gpt2"
    want = vocab_fingerprint(Path(tokenizer_dir) / "tokenizer.json") if tokenizer_dir is not None else None
    if want is None or want == _vocab_fingerprint(load_tokenizer().backend.get_vocab(with_added_tokens=True)):
        want = "gpt2"  # the model reads GPT-2 ids (a mea model, possibly exported with GPT-2's tokenizer)
    have = "gpt2" if in_gpt2 else tok.get("vocab_sha256")
    if have == want:
        return corpus
    if not in_gpt2 and want != "gpt2" and "vocab_sha256" not in tok:  # made before the vocabulary hash
        from ..data.fetch import sha256_file

        if tok.get("sha256") == sha256_file(Path(tokenizer_dir) / "tokenizer.json"):
            return corpus
    try:
        source = gpt2_source(str(path))  # the same text, in GPT-2 ids
    except ValueError:
        raise ValueError(f"data.corpus: {path} is in another tokenizer ({tok.get('name')}, {tok.get('vocab_size')} ids) "
                         f"than the model's ({'GPT-2' if want == 'gpt2' else Path(tokenizer_dir) / 'tokenizer.json'}), "
                         "and no GPT-2 source corpus to re-tokenize is known; give a GPT-2 corpus instead") from None
    out = source if want == "gpt2" else retokenize_corpus(Path(tokenizer_dir) / "tokenizer.json", str(source))
    if verbose:
        print(f"data.corpus: {path} is not in the model's tokenizer; reading {out} (its text in the model's ids)",
              file=sys.stderr)
    return str(out)


def corpus_windows(tokenizer_dir: Optional[Path], split: str, n_tokens: int, window: int, corpus: str = "prose",
                   seed: Optional[int] = None):
    """(n, window) token windows of ``corpus`` in a model's own ids, holding about ``n_tokens`` tokens.

    Args:
        tokenizer_dir: folder with the model's ``tokenizer.json``; ``None`` for GPT-2 (mea) models.
        split: ``train`` or ``val``.
        n_tokens: tokens wanted (rounded down to whole windows, at least one).
        window: tokens per window.
        corpus: a built-in corpus name or a prepared GPT-2 directory.
        seed: ``None`` takes the split from its start (fixed validation windows); an int samples
            windows spread over the whole split (calibration), reproducibly.
    """
    import torch

    from ..data.shards import TokenDataset

    ds = TokenDataset(gpt2_source(corpus), split)
    n_win = max(1, n_tokens // window)
    # Another tokenizer yields a different count from the same text: decode a margin more.
    src_win = n_win if tokenizer_dir is None else int(n_win * 1.5) + 1
    if seed is None:
        stream = np.concatenate([np.asarray(s[: src_win * window]) for s in ds.shards])[: src_win * window]
        chunks = [stream.astype(np.int64)]
    else:
        x, y = ds.batch(0, src_win, window - 1, seed=seed)
        chunks = [r.numpy() for r in torch.cat([x, y[:, -1:]], 1)]
    if tokenizer_dir is None:
        ids = np.concatenate(chunks)
    else:
        from tokenizers import Tokenizer

        from ..data.tokenizer import load_tokenizer

        gpt2 = load_tokenizer()
        tok_json = Path(tokenizer_dir) / "tokenizer.json"
        tok = Tokenizer.from_file(str(tok_json))
        eos = end_of_document_id(tok_json)
        sep = [] if eos is None else [eos]
        # Document by document, joined by the model's own end of document (GPT-2's, decoded as text,
        # would reach another tokenizer as the literal string "<|endoftext|>").
        parts = []
        for c in chunks:
            docs = list(_documents(c, _GPT2_EOS))
            encs = tok.encode_batch([gpt2.decode(d.tolist()) for d in docs], add_special_tokens=False)
            open_end = len(c) > 0 and c[-1] != _GPT2_EOS  # the chunk cuts its last document: no boundary
            parts += [np.asarray(e.ids + ([] if open_end and i == len(encs) - 1 else sep), dtype=np.int64)
                      for i, e in enumerate(encs)]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    have = len(ids) // window
    if have < 1:
        raise ValueError(f"corpus: split {split!r} holds too little text for one window of {window} tokens")
    return torch.from_numpy(ids[: min(have, n_win) * window].copy()).view(-1, window)
