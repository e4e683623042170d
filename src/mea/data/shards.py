"""Token shards on disk: write them (uint16 memmaps plus ``manifest.json``) and read training batches.

A prepared directory holds ``<split>_<k>.bin`` files of raw little-endian uint16 token ids and a
``manifest.json`` that lists every shard with its token count and sha256. :class:`TokenDataset`
checks its split's shards when it opens them (:func:`verify_shards`) and serves training batches as a
pure function of ``(seed, step, rank, world_size)``, so that a resumed or re-sharded run reads
exactly the same tokens. Fixed validation windows are ``mea.data.windows.validation_batches``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "mea-tokens-v1"
# Splits never trained on: ``val`` reports results, ``select`` (where a corpus has it) chooses settings.
HELD_OUT = ("val", "select")
DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in 16 bits; half the bytes of int32


class ShardWriter:
    """Append token arrays to ``<split>_<k>.bin`` files of at most `shard_tokens` tokens each; each
    shard's record (``close()``) holds its file name, token count and sha256."""

    def __init__(self, directory: os.PathLike, split: str, shard_tokens: int = 1 << 27):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.dir = Path(directory)
        self.split = split
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._f = None
        self._sha = None

    def _open(self):
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._f = open(self.dir / name, "wb")
        self._sha = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def write(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(DTYPE).max):
            raise ValueError(f"token ids must lie in [0, {np.iinfo(DTYPE).max}] to be stored as uint16")
        arr = arr.astype(DTYPE, copy=False)
        while arr.size:
            if self._f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self.close()
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            data = part.tobytes()
            self._f.write(data)
            self._sha.update(data)
            self.shards[-1]["tokens"] += int(part.size)

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def close(self) -> list[dict]:
        if self._f is not None:
            self._f.close()
            self._f = None
            self.shards[-1]["sha256"] = self._sha.hexdigest()
        return self.shards


def read_manifest(path: os.PathLike) -> dict:
    """Load and check the manifest of a prepared directory.

    Raises:
        FileNotFoundError: the directory or its manifest does not exist.
        ValueError: the manifest is not valid JSON, not complete, or names missing or truncated shards.
    """
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"no prepared data directory at {d} (run `mea prepare-data` first)")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{d} has no {MANIFEST}: not a prepared data directory, or its preparation "
                                f"did not finish (rerun `mea prepare-data --overwrite true`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is corrupt ({e}); rerun `mea prepare-data --overwrite true`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise ValueError(f"{mpath} is not a complete {FORMAT} manifest; rerun `mea prepare-data --overwrite true`")
    for split, info in manifest.get("splits", {}).items():
        for shard in info.get("shards", []):
            f = d / shard["file"]
            want = shard["tokens"] * DTYPE.itemsize
            if not f.is_file() or f.stat().st_size != want:
                have = f.stat().st_size if f.is_file() else "missing"
                raise ValueError(f"shard {f} of split {split!r} should hold {want} bytes, found {have}; "
                                 f"rerun `mea prepare-data --overwrite true`")
    return manifest


# Shards found intact in this process, by (path, size, mtime_ns, sha256): each is read once per process.
_VERIFIED: set[tuple] = set()
# Beside the shards, the same record across processes: {file: [size, mtime_ns, sha256]} of shards found
# intact, so that a 100M-token corpus is not read through at every start. A shard written since (a new
# mtime) is read again.
VERIFIED = ".verified.json"


def rebuild_hint(path: os.PathLike, manifest: dict) -> str:
    """How to rebuild the prepared directory ``path``, for error messages."""
    d = Path(path)
    if manifest.get("source"):
        return (f"it is a copy of {manifest['source']} re-tokenized for a model: delete {d}, and the next "
                "command that needs it (mea pretrain --init_from, mea convert, mea evaluate) re-tokenizes it")
    req = manifest.get("request") or {}
    if req.get("generate_from"):  # text a model wrote (mea.convert.self_data)
        return (f"rebuild it with: mea prepare-data --generate_from {req['generate_from']} --tokens {req['tokens']} "
                f"--corpus {req['corpus']} --out {d} --overwrite true")
    if req.get("files"):
        what = "--files '[" + ", ".join(req["files"]) + "]'"
    elif str(req.get("hf_dataset") or ""):
        what = f"--hf_dataset {req['hf_dataset']}"
    else:
        what = f"--corpus {req.get('corpus') or manifest.get('corpus', 'prose')}"
        from .sources import CORPORA

        chosen = sorted(req.get("sources") or [])
        if chosen and chosen != sorted(CORPORA.get(req.get("corpus"), {})):
            what += " --sources '[" + ", ".join(chosen) + "]'"
    return f"rebuild it with: mea prepare-data {what} --out {d} --overwrite true"


def _scan(f: Path) -> tuple[str, int]:
    """(sha256, largest token id) of a shard file, read once in chunks."""
    sha, top = hashlib.sha256(), -1
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            sha.update(chunk)
            top = max(top, int(np.frombuffer(chunk[: len(chunk) // 2 * 2], dtype=DTYPE).max(initial=0)))
    return sha.hexdigest(), top


def verify_shards(path: os.PathLike, manifest: dict, splits: Optional[Sequence[str]] = None) -> None:
    """Check the shards of ``splits`` (default all) against the manifest: each file's sha256, and every
    token id below the manifest's vocabulary size. A shard of a manifest written before checksums is
    only checked by size (:func:`read_manifest`).

    Raises:
        ValueError: one line naming the damaged shard and how to rebuild the directory.
    """
    d = Path(path)
    vocab = int(manifest.get("tokenizer", {}).get("vocab_size") or 0)
    record_file = d / VERIFIED
    try:
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    except (OSError, ValueError):
        record = {}
    found = {}
    for split in splits or list(manifest.get("splits", {})):
        for shard in manifest["splits"][split].get("shards", []):
            want = shard.get("sha256")
            if want is None:
                continue
            f = d / shard["file"]
            st = f.stat()
            key = (str(f.resolve()), st.st_size, st.st_mtime_ns, want)
            if key in _VERIFIED:
                continue
            if record.get(shard["file"]) != [st.st_size, st.st_mtime_ns, want]:
                sha, top = _scan(f)
                if sha != want:
                    raise ValueError(f"shard {f} is damaged: its sha256 is not the one in {d / MANIFEST}; "
                                     + rebuild_hint(d, manifest))
                if vocab and top >= vocab:
                    raise ValueError(f"shard {f} is damaged: it holds token id {top}, outside the vocabulary of "
                                     f"{vocab} ids in {d / MANIFEST}; " + rebuild_hint(d, manifest))
                found[shard["file"]] = [st.st_size, st.st_mtime_ns, want]
            _VERIFIED.add(key)
    if found:
        try:  # best effort: a shared corpus may be read-only to this user
            tmp = d / f"{VERIFIED}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({**record, **found}))
            os.replace(tmp, record_file)
        except OSError:
            pass


class TokenDataset:
    """All shards of one split of a prepared directory, as read-only memmaps.

    Args:
        path: a directory written by :func:`mea.data.prepare.prepare_data`.
        split: ``train``, ``val`` or, where the corpus has one, ``select``.
    """

    def __init__(self, path: os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.path} has no split {split!r}; it has {sorted(splits)}")
        self.split = split
        verify_shards(self.path, self.manifest, [split])
        self.shards = [np.memmap(self.path / s["file"], dtype=DTYPE, mode="r", shape=(s["tokens"],))
                       for s in splits[split]["shards"] if s["tokens"] > 0]
        self.num_tokens = int(sum(len(s) for s in self.shards))
        if self.num_tokens < 2:
            raise ValueError(f"split {split!r} of {self.path} holds {self.num_tokens} tokens: too few to "
                             f"{'validate' if split in HELD_OUT else 'train'} on" +
                             ("; documents are split whole, and a corpus of one document has no validation text: "
                              "give several files (or documents) when preparing it" if split in HELD_OUT else ""))
        self.vocab_size = int(self.manifest.get("tokenizer", {}).get("vocab_size", 0)) or None
        self._perm_cache: dict = {}

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, split={self.split!r}, num_tokens={self.num_tokens:,})"

    def _window_counts(self, seq_len: int) -> np.ndarray:
        # Windows of seq_len + 1 tokens (inputs plus the shifted targets) at a stride of seq_len,
        # never crossing a shard boundary.
        return np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)

    def num_windows(self, seq_len: int) -> int:
        """Training windows per epoch at this sequence length (one epoch = every window once)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return int(self._window_counts(seq_len).sum())

    def _permutation(self, seed: int, epoch: int, n: int) -> np.ndarray:
        key = (seed, epoch, n)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([seed, epoch, n]).permutation(n)
        return self._perm_cache[key]

    def _window(self, index: int, seq_len: int, offsets: np.ndarray) -> np.ndarray:
        shard = int(np.searchsorted(offsets, index, side="right") - 1)
        start = (index - int(offsets[shard])) * seq_len
        return self.shards[shard][start:start + seq_len + 1]

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
              world_size: int = 1):
        """The (x, y) int64 tensors of shape (batch_size, seq_len) that `rank` trains on at `step`.

        A pure function of its arguments: sample ``g = (step * world_size + rank) * batch_size + j``
        of an endless stream in which each epoch is a seeded permutation of all windows. The ranks of
        one step therefore hold disjoint parts of one global batch, and one process with
        ``batch_size * world_size`` sees exactly the union of what ``world_size`` ranks see.
        """
        import torch

        if batch_size < 1 or seq_len < 1 or step < 0:
            raise ValueError(f"need batch_size >= 1, seq_len >= 1, step >= 0; got {batch_size}, {seq_len}, {step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        counts = self._window_counts(seq_len)
        n = int(counts.sum())
        if n == 0:
            raise ValueError(f"split {self.split!r} ({self.num_tokens} tokens) is shorter than one window of "
                             f"seq_len + 1 = {seq_len + 1} tokens")
        offsets = np.concatenate([[0], np.cumsum(counts)])
        first = (step * world_size + rank) * batch_size
        rows = []
        for g in range(first, first + batch_size):
            epoch, pos = divmod(g, n)
            rows.append(self._window(int(self._permutation(seed, epoch, n)[pos]), seq_len, offsets))
        w = torch.from_numpy(np.stack(rows).astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
