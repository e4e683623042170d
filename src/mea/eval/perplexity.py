"""Perplexity and bits per byte on the validation split of a prepared corpus.

The validation shards hold GPT-2 token ids (documents separated by ``<|endoftext|>``). A model with
the GPT-2 vocabulary is scored on those very tokens, in the same windows as the trainer's
validation loss. A model with another tokenizer is scored on the same text in its own ids: the
corpus re-tokenized for it (``mea.data.windows``), as ``mea pretrain --init_from`` trains and
validates on it. Perplexities in different tokens are not comparable, so every result also gives
bits per UTF-8 byte of the predicted text (document separators left out), which is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def is_gpt2_tokenizer(tokenizer) -> bool:
    """Whether an HF tokenizer gives GPT-2's ids (checked on the probes mea's GPT-2 tokenizer checks)."""
    from ..data.tokenizer import KNOWN_IDS

    try:
        return all(tokenizer.encode(text, add_special_tokens=False) == ids for text, ids in KNOWN_IDS.items())
    except Exception:
        return False


def _tokenizer_dir(tokenizer) -> Optional[Path]:
    """The folder of a tokenizer that is not GPT-2's (its ``tokenizer.json`` re-tokenizes the corpus);
    ``None`` for GPT-2's."""
    if tokenizer is None or is_gpt2_tokenizer(tokenizer):
        return None
    folder = Path(getattr(tokenizer, "name_or_path", "") or "/nonexistent")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"model: its tokenizer ({folder}) has no tokenizer.json (a fast tokenizer), which "
                         "re-tokenizing the corpus for it needs")
    return folder


def corpus_perplexity(model, tokenizer=None, corpus: str = "prose", seq_len: Optional[int] = None,
                      batch_size: int = 8, max_batches: Optional[int] = None, progress: bool = True) -> dict:
    """Loss, perplexity and bits per byte of an HF causal LM on the validation split of ``corpus``.

    Args:
        model: a transformers causal LM (``model(input_ids).logits``), already on its device.
        tokenizer: its HF tokenizer (loaded from a folder with ``tokenizer.json``); ``None`` or a GPT-2
            tokenizer scores the shards' own tokens.
        corpus: a corpus name (``prose``; prepared if missing) or a prepared directory.
        seq_len: window length (default: the model's context, at most 1024).
        batch_size: windows per forward pass.
        max_batches: stop after this many batches (default: the whole split).
        progress: show a progress bar.
    """
    from ..data.prepare import corpus_dir
    from ..data.shards import TokenDataset
    from ..data.tokenizer import load_tokenizer
    from ..data.windows import corpus_in_model_tokens, validation_batches
    from ..models.loss import window_loss

    path = corpus_dir(corpus)
    ctx = getattr(model.config, "max_position_embeddings", None) or 1024
    seq_len = int(seq_len or min(ctx, 1024))
    if seq_len > ctx:
        raise ValueError(f"seq_len: {seq_len} exceeds the model's context of {ctx} tokens")
    tok_dir = _tokenizer_dir(tokenizer)
    if tok_dir is None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab < load_tokenizer().vocab_size:
            raise ValueError(f"model: {vocab} output ids cannot score GPT-2 tokens (50,257); pass its tokenizer")
        decode = load_tokenizer().decode
    else:
        decode = tokenizer.decode
    # The text the trainer validates on, in the model's ids (re-tokenized and cached for another tokenizer).
    read = corpus_dir(corpus_in_model_tokens(str(path), tok_dir, verbose=False))
    ds = TokenDataset(read, "val")
    batches = validation_batches(ds, batch_size, seq_len, max_batches)
    res = window_loss(model, batches, forward=lambda x: model(x, use_cache=False).logits,
                      separator=ds.manifest.get("tokenizer", {}).get("eos_token_id"), decode=decode,
                      progress=progress, desc="perplexity")
    return {
        "corpus": str(path), "split": "val",
        "tokens": "gpt2 shards" if tok_dir is None else "re-tokenized with the model's tokenizer",
        "seq_len": seq_len, "n_tokens": res.n_tokens, "n_bytes": res.n_bytes, "loss": res.loss, "ppl": res.ppl,
        "bits_per_byte": res.bits_per_byte,
    }
