"""A prepared corpus as a model reads it: in the model's own token ids, cut into windows.

``mea prepare-data`` stores GPT-2 ids, each document followed by ``<|endoftext|>``. A model with
another vocabulary (SmolLM2: 49,152 ids) reads the same text in its own ids: each document is
decoded from GPT-2 (lossless: byte-level BPE) and encoded with the model's ``tokenizer.json``.

One rule separates documents everywhere, in training, calibration, healing and evaluation: the id
that :func:`end_of_document_id` names for the model's tokenizer (GPT-2's ``<|endoftext|>`` for mea
models). :func:`retokenize_corpus` writes a whole corpus so (cached under
``$MEA_CACHE/retokenized/<corpus>-<tokenizer sha256>``, read by ``TokenDataset`` and
``mea pretrain --data.corpus DIR``); :func:`corpus_windows` re-encodes only the windows it needs.

Windows: :func:`fixed_windows` cuts a token stream; :func:`validation_batches` gives a split's fixed
validation windows (``seq_len + 1`` tokens at stride ``seq_len``, never across a shard end: every
token is predicted once), which the trainer's validation loss and ``mea evaluate``'s perplexity
both score; :func:`corpus_windows` gives fixed or sampled windows in a model's ids (calibration,
the compression table's validation).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .prepare import corpus_dir

# Documents per encode_batch call: large enough for the Rust backend to use every core.
_DOCS_PER_BATCH = 512
GPT2_EOS = 50256


# ---------------------------------------------------------------------------------------- documents
def stream_documents(shards: Iterable, eos: int = GPT2_EOS):
    """The documents of a split whose shard files may cut a document: a piece that ends a shard
    without eos continues in the next one (splitting it there would add a boundary)."""
    carry = np.zeros(0, dtype=np.int64)
    for shard in shards:
        arr = np.concatenate([carry, np.asarray(shard, dtype=np.int64)]) if len(carry) else np.asarray(shard)
        ends = np.flatnonzero(arr == eos)
        cut = ends[-1] + 1 if len(ends) else 0
        yield from documents(arr[:cut], eos)
        carry = np.asarray(arr[cut:], dtype=np.int64)
    if len(carry):
        yield carry


def documents(tokens: np.ndarray, eos: int = GPT2_EOS):
    """Split a GPT-2 id stream at eos; a trailing piece without eos is a document too."""
    ends = np.flatnonzero(tokens == eos)
    start = 0
    for e in ends:
        if e > start:
            yield tokens[start:e]
        start = e + 1
    if start < len(tokens):
        yield tokens[start:]


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


def encode_documents(tok, gpt2, docs: list[np.ndarray], eos: Optional[int], open_end: bool = False) -> list[np.ndarray]:
    """GPT-2 documents (without their end-of-text) in ``tok``'s ids, each followed by ``eos`` (nothing
    where the tokenizer has none); with ``open_end`` the last is a piece of a document that goes on,
    and gets no separator. GPT-2's own separator, decoded as text, would reach another tokenizer as the
    literal string "<|endoftext|>": documents are encoded one by one instead."""
    sep = [] if eos is None else [eos]
    encs = tok.encode_batch([gpt2.decode(d.tolist()) for d in docs], add_special_tokens=False)
    return [np.asarray(e.ids + ([] if open_end and i == len(encs) - 1 else sep), dtype=np.int64)
            for i, e in enumerate(encs)]


# ---------------------------------------------------------------------------------------- corpora
def gpt2_source(corpus: str) -> Path:
    """The prepared GPT-2 directory behind ``corpus``: itself, or for a corpus already re-tokenized for some
    model the GPT-2 corpus it was made from (its ids would mean other tokens read as GPT-2's)."""
    from .shards import MANIFEST, read_manifest

    path = corpus_dir(corpus)
    manifest = read_manifest(path)
    if manifest.get("tokenizer", {}).get("name", "gpt2") == "gpt2":
        return path
    source = Path(manifest.get("source") or "/nonexistent")
    if (source / MANIFEST).is_file() and read_manifest(source).get("tokenizer", {}).get("name", "gpt2") == "gpt2":
        return source
    raise ValueError(f"corpus: {path} is in another tokenizer's ids and names no GPT-2 source corpus; give the GPT-2 "
                     "corpus (a name such as prose, or a directory written by mea prepare-data)")


def retokenize_corpus(tokenizer_json: str | Path, corpus: str = "prose", out: Optional[str | Path] = None,
                      max_tokens: Optional[dict[str, int]] = None, progress: bool = True) -> Path:
    """Write ``corpus`` re-encoded with ``tokenizer_json`` as a prepared directory; return its path.

    A finished directory is reused while its tokenizer, its source's manifest and its shards' contents
    are unchanged; otherwise it is written again.

    Args:
        tokenizer_json: the target model's ``tokenizer.json``.
        corpus: a built-in corpus name or a prepared GPT-2 directory.
        out: where to write (default: the cache, keyed by corpus and tokenizer hash).
        max_tokens: per split, stop after this many source (GPT-2) tokens (default: all).
        progress: show tqdm progress.
    """
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from .fetch import cache_dir, sha256_file
    from .prepare import say
    from .shards import DTYPE, FORMAT, MANIFEST, ShardWriter, TokenDataset, read_manifest, verify_shards
    from .tokenizer import load_tokenizer

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
    if (out / MANIFEST).exists():
        try:
            m = read_manifest(out)
            if (m.get("tokenizer", {}).get("sha256") == tok_sha and m.get("source") == str(src.resolve())
                    and m.get("source_manifest_sha256") == src_sha):
                verify_shards(out, m)
                return out
        except (ValueError, FileNotFoundError) as e:
            say(f"re-tokenizing {src} into {out} again: {e}")
    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"tokenizer_json: {vocab} ids do not fit the shards' uint16 format")
    eos = end_of_document_id(tokenizer_json)
    if eos is None:
        say(f"{tokenizer_json}: no end-of-document token found; documents are written without a separator")
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
        for doc in stream_documents(ds.shards, GPT2_EOS):
            if budget is not None and n_src >= budget:
                break
            docs.append(doc)
            n_src += len(doc) + 1
            if len(docs) == _DOCS_PER_BATCH:
                for ids in encode_documents(tok, gpt2, docs, eos):
                    writer.write(ids)
                bar.update(sum(len(d) + 1 for d in docs))
                docs = []
        if docs:
            for ids in encode_documents(tok, gpt2, docs, eos):
                writer.write(ids)
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
    from .shards import read_manifest
    from .tokenizer import load_tokenizer

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
        from .fetch import sha256_file

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


# ---------------------------------------------------------------------------------------- windows
def fixed_windows(tokens, length: int, stride: Optional[int] = None, max_windows: Optional[int] = None):
    """(n, length) int64 windows of a 1-D token stream, starting every ``stride`` tokens (default
    ``length``: disjoint windows) from its first token; at most ``max_windows``. A stream shorter than
    one window gives none."""
    import torch

    stride = length if stride is None else stride
    if length < 1 or stride < 1:
        raise ValueError(f"need window length >= 1 and stride >= 1, got {length}, {stride}")
    n = max(0, (len(tokens) - length) // stride + 1)
    if max_windows is not None:
        n = min(n, int(max_windows))
    rows = [np.asarray(tokens[i * stride: i * stride + length]) for i in range(n)]
    if not rows:
        return torch.zeros((0, length), dtype=torch.int64)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def validation_batches(ds, batch_size: int, seq_len: int, max_batches: Optional[int] = None) -> list:
    """The fixed validation windows of a split (a ``TokenDataset``), the same on every call, in batches
    of ``batch_size`` (the last may be smaller), at most ``max_batches``: windows of ``seq_len + 1``
    tokens at stride ``seq_len`` from the start of each shard in order (none across a shard end), each
    predicting its last ``seq_len`` tokens. The trainer's validation loss and ``mea evaluate``'s
    perplexity score these."""
    import torch

    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 1, got {batch_size}, {seq_len}")
    limit = None if max_batches is None else int(max_batches) * batch_size
    parts, n = [], 0
    for shard in ds.shards:
        if limit is not None and n >= limit:
            break
        parts.append(fixed_windows(shard, seq_len + 1, seq_len, None if limit is None else limit - n))
        n += len(parts[-1])
    windows = torch.cat(parts) if parts else torch.zeros((0, seq_len + 1), dtype=torch.int64)
    if len(windows) == 0:
        raise ValueError(f"split {ds.split!r} ({ds.num_tokens} tokens) is shorter than one window of "
                         f"seq_len + 1 = {seq_len + 1} tokens")
    return list(windows.split(batch_size))


def corpus_windows(tokenizer_dir: Optional[Path], split: str, n_tokens: int, window: int, corpus: str = "prose",
                   seed: Optional[int] = None):
    """(n, window) token windows of ``corpus`` in a model's own ids, holding about ``n_tokens`` tokens.

    Args:
        tokenizer_dir: folder with the model's ``tokenizer.json``; ``None`` for GPT-2 (mea) models.
        split: ``train`` or ``val``.
        n_tokens: tokens wanted (rounded down to whole windows, at least one).
        window: tokens per window.
        corpus: a built-in corpus name or a prepared GPT-2 directory.
        seed: ``None`` takes disjoint windows from the split's start (fixed validation windows; for
            another tokenizer, the start of :func:`retokenize_corpus`'s split); an int samples windows
            spread over the whole split (calibration), reproducibly.
    """
    import torch

    from .shards import TokenDataset

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

        from .tokenizer import load_tokenizer

        gpt2 = load_tokenizer()
        tok_json = Path(tokenizer_dir) / "tokenizer.json"
        tok = Tokenizer.from_file(str(tok_json))
        eos = end_of_document_id(tok_json)
        parts = []
        for c in chunks:
            open_end = len(c) > 0 and c[-1] != GPT2_EOS  # the chunk cuts its last document: no boundary
            parts += encode_documents(tok, gpt2, list(documents(c, GPT2_EOS)), eos, open_end)
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    w = fixed_windows(ids, window, max_windows=n_win)
    if len(w) < 1:
        raise ValueError(f"corpus: split {split!r} holds too little text for one window of {window} tokens")
    return w
