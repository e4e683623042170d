"""`mea generate`: continue prompts with a model from any path mea reads (a run, a checkpoint, a Hugging
Face folder, a converted model, a ``.gguf`` file).

One prompt (``--prompt``) is streamed to stdout token by token; a file of prompts (``--prompts``, JSONL
with one ``{"prompt": ...}`` per line) is generated in batches and written as JSONL, each input record
with its ``completion`` added, to ``--out`` or stdout. What the model is and what its KV cache costs per
token go to stderr. Every argument (the prompt against the model's context included) is checked
before the weights are read.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional


def read_prompts(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file of prompts: one JSON object with a non-empty ``prompt`` string per
    line (other keys are kept and written back beside the completion); blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``prompts: FILE line N: ...`` for a line that is not such an object, or no prompt.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompts: {p} is not a file (expected JSONL, one {{\"prompt\": ...}} per line)")
    records = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts: {p} is not UTF-8 text ({e})") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {p} line {i} is not JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"prompts: {p} line {i}: expected an object with a \"prompt\" string")
        if not rec["prompt"].strip():
            raise ValueError(f"prompts: {p} line {i}: the prompt is empty")
        records.append(rec)
    if not records:
        raise ValueError(f"prompts: {p} holds no prompt")
    return records


def variant_label(config) -> str:
    """``mea (h'=2 of 4 heads)``, ``gqa (2 of 4 heads)``, ``mha``, ``mea (per layer: 4, 2, 2, 1 of 4 heads)``."""
    h = config.n_heads
    if config.layer_kv_heads is not None and len(set(config.layer_kv_heads)) > 1:
        stored = f"per layer: {', '.join(map(str, config.layer_kv_heads))} of {h} heads"
    elif config.kv_heads_at(0) != h or config.attention in ("gqa", "mea"):
        stored = ("h'=" if config.attention == "mea" else "") + f"{config.kv_heads_at(0)} of {h} heads"
    else:
        return config.attention
    return f"{config.attention} ({stored})"


def generate(model: str, prompt: Optional[str] = None, max_new_tokens: int = 64, prompts: Optional[str] = None,
             out: Optional[str] = None, temperature: float = 0.0, top_p: Optional[float] = None,
             top_k: Optional[int] = None, seed: int = 0, batch_size: int = 8, device: str = "auto",
             dtype: str = "auto", backend: str = "auto", overwrite: bool = False) -> list[dict]:
    """Continue a prompt (streamed to stdout) or a file of prompts (JSONL out) with a model.

    Args:
        model: a ``mea pretrain`` run or checkpoint, a Hugging Face folder (``mea export-hf``,
            ``mea convert``, ``mea import-gguf``, a LLaMA folder) or a LLaMA ``.gguf`` file; its
            tokenizer is the one it was trained with.
        prompt: the text to continue; its continuation is printed as it is generated.
        max_new_tokens: tokens to generate per prompt (generation stops early at the end-of-text token);
            prompt + max_new_tokens must fit in the model's context.
        prompts: a JSONL file, one ``{"prompt": TEXT, ...}`` per line, instead of ``prompt``.
        out: write the results as JSONL here (each input record with ``completion`` and
            ``new_tokens``); default: stdout.
        temperature: 0 is greedy; above 0 samples from softmax(logits / temperature).
        top_p: sample from the smallest set of tokens whose probability reaches this (nucleus).
        top_k: sample from the k most likely tokens.
        seed: seed of the sampling.
        batch_size: prompts generated together (``--prompts``).
        device: auto (cuda where available, else cpu), cpu, cuda, cuda:N.
        dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16.
        backend: implementation of MEA's ops: auto, torch or triton (CUDA).
        overwrite: replace ``out`` if it exists.

    Returns:
        One record per prompt: the input's keys, ``completion`` and ``new_tokens``.
    """
    import torch

    from .io.hf import load_tokenizer_for, parse_dtype
    from .io.load import check_model_path, load_model, model_config
    from .models.generation import check_sampling
    from .ops.backend import check_backend, triton_available
    from .runtime import about, atomic_write_text, output_file, resolve_device

    # ------------------------------------------------------------------ arguments, before the weights
    if (prompt is None) == (prompts is None):
        raise ValueError("prompt: give --prompt TEXT or --prompts FILE.jsonl (one of them)")
    if prompt is not None and not prompt.strip():
        raise ValueError("prompt: empty; give the text to continue")
    records = [{"prompt": prompt}] if prompt is not None else read_prompts(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    check_sampling(temperature, top_k, top_p)
    check_backend(backend)
    dev = resolve_device("device", device)
    if backend == "triton" and not triton_available():
        raise ValueError("backend: 'triton' needs the triton package (pip install triton); use auto or torch")
    if backend == "triton" and not dev.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend: 'triton' runs on CUDA, not {dev}; use auto or torch")
    torch_dtype = parse_dtype(dtype) if dtype != "auto" else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    out_path = output_file("out", out, "generate", overwrite) if out else None
    check_model_path("model", model)
    with about("model"):
        config = model_config(model)  # None for a .gguf file, whose config comes with its import
        tok = load_tokenizer_for(model)
    field = "prompt" if prompt is not None else "prompts"
    ids = [tok(r["prompt"])["input_ids"] for r in records]
    if config is not None:
        _check_context(ids, max_new_tokens, config.max_seq_len, field)

    # ------------------------------------------------------------------ the model
    with about("model"):
        net = load_model(model, dtype=torch_dtype, device=dev)
    _check_context(ids, max_new_tokens, net.config.max_seq_len, field)
    net.set_backend(backend)
    cfg = net.config
    print(f"model {model}: {variant_label(cfg)}, {net.num_params():,} parameters, {str(torch_dtype).replace('torch.', '')} on {dev}; "
          f"KV cache {cfg.kv_cache_bytes_per_token:,} bytes per token (bf16)", file=sys.stderr)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"model: its tokenizer has {len(tok):,} ids but the model {cfg.vocab_size:,} embeddings")

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sample = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  eos_token_id=eos, pad_token_id=pad, generator=gen)
    if prompt is not None:
        new = _stream(net, tok, ids[0], dev, sample)
        results = [{**records[0], "completion": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new)}]
    else:
        results = []
        for i in range(0, len(records), batch_size):
            chunk = ids[i:i + batch_size]
            for rec, new in zip(records[i:i + batch_size], _batch(net, chunk, dev, pad, eos, sample)):
                results.append({**rec, "completion": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new)})
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, lines)
        print(f"wrote {len(results)} completion{'s' if len(results) != 1 else ''} to {out_path}", file=sys.stderr)
    elif prompt is None:
        sys.stdout.write(lines)
    return results


def _check_context(ids: list[list[int]], max_new_tokens: int, context: int, field: str) -> None:
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"{field}: {'the prompt' if field == 'prompt' else f'prompt {i + 1}'} is no token at all")
        if len(row) + max_new_tokens > context:
            which = "the prompt" if field == "prompt" else f"prompt {i + 1}"
            raise ValueError(f"{field}: {which} has {len(row)} token{'s' if len(row) != 1 else ''}; with "
                             f"max_new_tokens {max_new_tokens} that exceeds the model's context of {context} tokens")


def _until_eos(new: list[int], eos: Optional[int]) -> list[int]:
    return new[:new.index(eos)] if eos is not None and eos in new else new


def _stream(net, tok, ids: list[int], dev: str, sample: dict) -> list[int]:
    """Generate for one prompt, printing the prompt and then each piece of text as its tokens come."""
    import torch

    eos = sample["eos_token_id"]
    new: list[int] = []
    shown = ""

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def on_token(t) -> None:
        nonlocal shown
        new.append(int(t[0]))
        if eos is not None and eos in new:
            return
        text = tok.decode(new, skip_special_tokens=True)
        # A character split over several tokens decodes to U+FFFD until its last byte arrives.
        if not text.endswith("\ufffd") and text.startswith(shown):
            show(text[len(shown):])
            shown = text

    show(tok.decode(ids, skip_special_tokens=True))
    net.generate(torch.tensor([ids], device=dev), on_token=on_token, **sample)
    new = _until_eos(new, eos)
    text = tok.decode(new, skip_special_tokens=True)
    show((text[len(shown):] if text.startswith(shown) else "") + "\n")
    return new


def _batch(net, rows: list[list[int]], dev: str, pad: int, eos: Optional[int], sample: dict) -> list[list[int]]:
    """Generate for several prompts at once (left-padded; each row's padding never enters attention)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    out = net.generate(ids, attention_mask=mask, **sample)[:, width:].tolist()
    return [_until_eos(r, eos) for r in out]
