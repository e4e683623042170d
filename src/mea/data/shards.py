"""Token shards on disk: write them (uint16 memmaps plus ``manifest.json``) and read training batches.

A prepared directory holds ``<split>_<k>.bin`` files of raw little-endian uint16 token ids and a
``manifest.json`` that lists every shard with its token count. :class:`TokenDataset` serves
training batches as a pure function of ``(seed, step, rank, world_size)``, so that a resumed or
re-sharded run reads exactly the same tokens, and fixed validation windows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "mea-tokens-v1"
DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in 16 bits; half the bytes of int32


class ShardWriter:
    """Append token arrays to ``<split>_<k>.bin`` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: os.PathLike, split: str, shard_tokens: int = 1 << 27):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.dir = Path(directory)
        self.split = split
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._f = None

    def _open(self):
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._f = open(self.dir / name, "wb")
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
            self._f.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def close(self) -> list[dict]:
        if self._f is not None:
            self._f.close()
            self._f = None
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
                                f"did not finish (rerun `mea prepare-data --force true`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is corrupt ({e}); rerun `mea prepare-data --force true`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise ValueError(f"{mpath} is not a complete {FORMAT} manifest; rerun `mea prepare-data --force true`")
    for split, info in manifest.get("splits", {}).items():
        for shard in info.get("shards", []):
            f = d / shard["file"]
            want = shard["tokens"] * DTYPE.itemsize
            if not f.is_file() or f.stat().st_size != want:
                have = f.stat().st_size if f.is_file() else "missing"
                raise ValueError(f"shard {f} of split {split!r} should hold {want} bytes, found {have}; "
                                 f"rerun `mea prepare-data --force true`")
    return manifest


class TokenDataset:
    """All shards of one split of a prepared directory, as read-only memmaps.

    Args:
        path: a directory written by :func:`mea.data.prepare.prepare_data`.
        split: ``train`` or ``val``.
    """

    def __init__(self, path: os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.path} has no split {split!r}; it has {sorted(splits)}")
        self.split = split
        self.shards = [np.memmap(self.path / s["file"], dtype=DTYPE, mode="r", shape=(s["tokens"],))
                       for s in splits[split]["shards"] if s["tokens"] > 0]
        self.num_tokens = int(sum(len(s) for s in self.shards))
        if self.num_tokens < 2:
            raise ValueError(f"split {split!r} of {self.path} holds {self.num_tokens} tokens: too few to "
                             f"{'validate' if split == 'val' else 'train'} on" +
                             ("; documents are split whole, and a corpus of one document has no validation text: "
                              "give several files (or documents) when preparing it" if split == "val" else ""))
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

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: Optional[int] = None) -> Iterator:
        """Yield (x, y) batches of consecutive windows from the start of the split, identical on every call.

        The last batch may be smaller than `batch_size`; windows that would cross a shard end are left out.
        """
        import torch

        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 1, got {batch_size}, {seq_len}")
        counts = self._window_counts(seq_len)
        if counts.sum() == 0:
            raise ValueError(f"split {self.split!r} ({self.num_tokens} tokens) is shorter than one window of "
                             f"seq_len + 1 = {seq_len + 1} tokens")
        offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(counts.sum())
        n_batches = -(-total // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, int(max_batches))
        for b in range(n_batches):
            idx = range(b * batch_size, min(total, (b + 1) * batch_size))
            w = torch.from_numpy(np.stack([self._window(i, seq_len, offsets) for i in idx]).astype(np.int64))
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
