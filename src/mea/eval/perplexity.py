"""Perplexity and bits per byte on the validation split of a prepared corpus.

The validation shards hold GPT-2 token ids (documents separated by ``<|endoftext|>``). A model with
the GPT-2 vocabulary is scored on those very tokens, in the same windows as the trainer's
validation loss. A model with another tokenizer is scored on the same text: GPT-2's byte-level BPE
decodes losslessly, so each validation document is decoded and re-tokenized with the model's own
tokenizer (documents joined by its end-of-text token). Perplexities in different tokens are not
comparable, so every result also gives bits per UTF-8 byte of the predicted text (end-of-text
targets left out), which is.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F


def is_gpt2_tokenizer(tokenizer) -> bool:
    """Whether an HF tokenizer gives GPT-2's ids (checked on the probes mea's GPT-2 tokenizer checks)."""
    from ..data.tokenizer import KNOWN_IDS

    try:
        return all(tokenizer.encode(text, add_special_tokens=False) == ids for text, ids in KNOWN_IDS.items())
    except Exception:
        return False


def _windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: Optional[int]) -> Iterator:
    """(x, y) batches of consecutive windows of seq_len + 1 tokens at stride seq_len (as the trainer's)."""
    n = max(0, (len(tokens) - 1) // seq_len)
    if n == 0:
        raise ValueError(f"the validation text is {len(tokens)} tokens, shorter than one window of {seq_len + 1}")
    n_batches = -(-n // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    for b in range(n_batches):
        rows = [tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
        w = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield w[:, :-1], w[:, 1:]


def _retokenize(ds, tokenizer) -> np.ndarray:
    """The validation split in ``tokenizer``'s ids: GPT-2 decode per document, re-encode, join with its eos."""
    from ..data.tokenizer import load_tokenizer

    gpt2 = load_tokenizer()
    ids = np.concatenate([np.asarray(s) for s in ds.shards]).astype(np.int64)
    cuts = np.flatnonzero(ids == gpt2.eos_token_id)
    docs = [d for d in np.split(ids, cuts + 1) if len(d)]
    texts = [gpt2.decode(d[d != gpt2.eos_token_id]) for d in docs]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out += enc + eos
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def corpus_perplexity(model, tokenizer=None, corpus: str = "prose", seq_len: Optional[int] = None,
                      batch_size: int = 8, max_batches: Optional[int] = None, progress: bool = True) -> dict:
    """Loss, perplexity and bits per byte of an HF causal LM on the validation split of ``corpus``.

    Args:
        model: a transformers causal LM (``model(input_ids).logits``), already on its device.
        tokenizer: its HF tokenizer; ``None`` or a GPT-2 tokenizer scores the shards' own tokens.
        corpus: a corpus name (``prose``; prepared if missing) or a prepared directory.
        seq_len: window length (default: the model's context, at most 1024).
        batch_size: windows per forward pass.
        max_batches: stop after this many batches (default: the whole split).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from ..data.shards import TokenDataset
    from ..data.tokenizer import load_tokenizer

    from ..data.prepare import corpus_dir

    path = corpus_dir(corpus)
    ds = TokenDataset(path, "val")
    ctx = getattr(model.config, "max_position_embeddings", None) or 1024
    seq_len = int(seq_len or min(ctx, 1024))
    if seq_len > ctx:
        raise ValueError(f"seq_len: {seq_len} exceeds the model's context of {ctx} tokens")
    gpt2 = tokenizer is None or is_gpt2_tokenizer(tokenizer)
    if gpt2:
        dec = load_tokenizer()
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab < dec.vocab_size:
            raise ValueError(f"model: {vocab} output ids cannot score GPT-2 tokens (50,257); pass its tokenizer")
        tokens = np.concatenate([np.asarray(s) for s in ds.shards]).astype(np.int64)
        eos, decode = dec.eos_token_id, dec.decode
    else:
        tokens = _retokenize(ds, tokenizer)
        eos, decode = tokenizer.eos_token_id, (lambda ids: tokenizer.decode(ids))
    device = next(model.parameters()).device
    n_windows = max(0, (len(tokens) - 1) // seq_len)
    total = -(-n_windows // batch_size) if max_batches is None else min(-(-n_windows // batch_size), max_batches)
    nll = nll_text = 0.0
    n_tok = n_bytes = 0
    was_training = model.training
    model.eval()
    for x, y in tqdm(_windows(tokens, seq_len, batch_size, max_batches), total=total, desc="perplexity",
                     disable=not progress):
        logits = model(x.to(device), use_cache=False).logits
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none").view_as(y)
        text = (y != eos) if eos is not None else torch.ones_like(y, dtype=torch.bool)
        nll += float(losses.sum())
        nll_text += float(losses[text.to(device)].sum())
        n_tok += y.numel()
        n_bytes += sum(len(decode(row[keep].tolist()).encode("utf-8")) for row, keep in zip(y, text))
    model.train(was_training)
    loss = nll / n_tok
    return {
        "corpus": str(path), "split": "val", "tokens": "gpt2 shards" if gpt2 else "re-tokenized with the model's tokenizer",
        "seq_len": seq_len, "n_tokens": n_tok, "n_bytes": n_bytes, "loss": loss, "ppl": math.exp(loss),
        "bits_per_byte": nll_text / max(1, n_bytes) / math.log(2),
    }
