"""KL(original || model) per token on held-out text, and both perplexities on the same windows: how
far a compressed (and healed) model's next-token distributions are from the original's.

The text is a held-out split of a prepared corpus (``val`` by default; ``select`` where the corpus
has one, for choosing settings without touching ``val``) in the original model's ids (re-tokenized
for a model with its own tokenizer, as ``mea pretrain --init_from`` reads it), cut into the fixed
validation windows that the trainer's validation loss and ``mea evaluate``'s perplexity score
(:func:`mea.data.windows.validation_batches`). The divergence itself is :func:`mea.models.kl.window_kl`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch


def heldout_batches(tokenizer_dir: Optional[Path], corpus: str = "prose", split: str = "val", tokens: int = 65536,
                    seq_len: int = 512, batch_size: int = 8) -> list:
    """The first ``tokens`` (rounded up to whole batches) predicted tokens of ``split`` as fixed windows of
    ``seq_len + 1`` tokens in the ids of the model whose tokenizer is in ``tokenizer_dir`` (None: GPT-2)."""
    from ..data.prepare import corpus_dir
    from ..data.shards import TokenDataset
    from ..data.windows import corpus_in_model_tokens, validation_batches

    if tokens < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"kl: tokens, seq_len and batch_size must be >= 1, got {tokens}, {seq_len}, {batch_size}")
    read = corpus_dir(corpus_in_model_tokens(str(corpus_dir(corpus)), tokenizer_dir, verbose=False))
    ds = TokenDataset(read, split)
    return validation_batches(ds, batch_size, seq_len, math.ceil(tokens / (batch_size * seq_len)))


def _vocabulary(tokenizer_dir: Optional[Path]) -> dict:
    """token -> id of a model's tokenizer (None: mea's GPT-2, which a saved folder may also carry)."""
    if tokenizer_dir is None:
        from ..data.tokenizer import load_tokenizer

        return load_tokenizer().backend.get_vocab(with_added_tokens=True)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)


def heldout_kl(original: Union[str, torch.nn.Module], model: Union[str, torch.nn.Module], corpus: str = "prose",
               split: str = "val", tokens: int = 65536, seq_len: int = 512, batch_size: int = 8,
               device: str = "auto", tokenizer_dir: Optional[Path] = None, progress: bool = True) -> dict:
    """KL(original || model) per token, and both perplexities, on held-out text.

    Args:
        original: the reference model: a path ``mea.io.load_model`` reads, or a loaded ``mea.Transformer``.
        model: the model compared with it (same vocabulary and tokenizer).
        corpus: a built-in corpus name or a prepared directory.
        split: its held-out split (``val``, or ``select`` where it has one).
        tokens: predicted tokens to score (whole batches of windows from the split's start).
        seq_len: tokens predicted per window.
        batch_size: windows per forward pass.
        device: auto (CUDA when available), cpu, cuda; bf16 autocast on CUDA.
        tokenizer_dir: the models' tokenizer folder when both are given loaded (None: GPT-2, or found
            from the paths).

    Returns:
        ``{"kl", "ppl", "ppl_original", "n_tokens", "corpus", "split", "seq_len"}``; ``kl`` in nats per token.
    """
    from ..io.hf import tokenizer_folder
    from ..io.load import load_model
    from ..models.kl import window_kl

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.float32
    if isinstance(original, (str, Path)) and isinstance(model, (str, Path)):
        tok_o, tok_m = tokenizer_folder(original), tokenizer_folder(model)
        if _vocabulary(tok_o) != _vocabulary(tok_m):
            raise ValueError(f"model: {model} and the original {original} have different tokenizers; a KL over "
                             "tokens needs the same vocabulary")
        tokenizer_dir = tok_o
    nets = [load_model(m, dtype=dtype) if isinstance(m, (str, Path)) else m for m in (original, model)]
    if nets[0].config.vocab_size != nets[1].config.vocab_size:
        raise ValueError(f"model: vocabularies differ ({nets[0].config.vocab_size} and {nets[1].config.vocab_size} ids)")
    batches = heldout_batches(tokenizer_dir, corpus, split, tokens, seq_len, batch_size)
    homes = [next(n.parameters()).device for n in nets]

    def autocast():
        return torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16, enabled=dev != "cpu")

    try:
        res = window_kl(nets[0].to(dev), nets[1].to(dev), batches, dev, autocast, progress=progress)
    finally:
        for n, home in zip(nets, homes):
            n.to(home)
    return {"kl": res.mean_kl, "ppl": res.ppl, "ppl_original": res.ppl_original, "n_tokens": res.n_tokens,
            "corpus": str(corpus), "split": split, "seq_len": seq_len}
