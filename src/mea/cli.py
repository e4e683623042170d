"""`mea <command>`: one entry point over typed functions (jsonargparse builds the parser from their
signatures and docstrings, and every command also takes ``--config FILE.yaml``)."""
from __future__ import annotations

import sys
from typing import Optional


def info(preset: str = "tiny", n_kv_heads: Optional[int] = None, prompt: str = "The capital of France is",
         max_new_tokens: int = 12, seed: int = 0) -> None:
    """Build one model per attention variant; print parameters, KV-cache bytes per token and a sample.

    Args:
        preset: model preset (tiny, mini, small, 125m, 350m, smollm2-135m).
        n_kv_heads: stored heads for gqa and mea (default: half the query heads).
        prompt: text to continue (an untrained model continues it with noise).
        max_new_tokens: tokens to sample per variant.
        seed: initialization seed.
    """
    import torch

    from .models import ATTENTION_VARIANTS, ModelConfig, Transformer

    base = ModelConfig.from_preset(preset)
    hk = n_kv_heads if n_kv_heads is not None else max(1, base.n_heads // 2)
    if not 1 <= hk <= base.n_heads:
        raise ValueError(f"n_kv_heads: must satisfy 1 <= n_kv_heads <= n_heads={base.n_heads}, got {hk}")
    tok = None
    try:
        from .data.tokenizer import load_tokenizer

        tok = load_tokenizer()
    except Exception as e:  # the table is still useful without the tokenizer package
        print(f"(no tokenizer: {e}; sampling token ids instead)", file=sys.stderr)
    print(f"{'variant':<14} {'params':>12} {'non-emb':>12} {'KV bytes/token':>15} {'MFLOP/token':>12}  sample")
    for variant in ATTENTION_VARIANTS:
        kw = {"n_kv_heads": hk} if variant in ("gqa", "mea") else {}
        if variant == "gqa" and base.n_heads % hk:
            kw = {"n_kv_heads": base.n_heads}
        cfg = ModelConfig.from_preset(preset, attention=variant, **kw)
        torch.manual_seed(seed)
        model = Transformer(cfg).eval()
        ids = tok.encode(prompt) if tok else list(range(1, 6))
        ids = [i % cfg.vocab_size for i in ids]
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
        sample = tok.decode(out) if tok else str(out)
        label = variant + (f"(h'={cfg.n_kv_heads})" if variant in ("gqa", "mea") else "")
        print(f"{label:<14} {model.num_params():>12,} {model.num_params(True):>12,} "
              f"{cfg.kv_cache_bytes_per_token:>15,} {cfg.flops_per_token() / 1e6:>12.1f}  {sample!r}")


# name -> (module, function). Each command module keeps its heavy imports (transformers, lm-eval)
# inside its functions, so building the parser stays fast.
COMMANDS = {
    "prepare-data": ("mea.convert.self_data", "prepare_data"),
    "pretrain": ("mea.train.pretrain", "pretrain"),
    "sweep": ("mea.train.sweep", "sweep"),
    "evaluate": ("mea.eval.evaluate", "evaluate"),
    "evaluate-many": ("mea.eval.many", "evaluate_many"),
    "export-hf": ("mea.io.hf", "export_hf"),
    "import-gguf": ("mea.io.gguf", "import_gguf"),
    "convert": ("mea.convert.convert", "convert"),
    "study-lr-scaling": ("mea.study.lr_scaling", "main"),
    "study-compression": ("mea.study.compression_table", "compression_table"),
    "study-compression-final": ("mea.study.compression_final", "compression_final"),
    "study-report": ("mea.study.report", "main"),
}


def _commands() -> dict:
    import importlib

    cmds = {"info": info}
    for name, (module, fn) in COMMANDS.items():
        try:
            cmds[name] = getattr(importlib.import_module(module), fn)
        except ModuleNotFoundError as e:
            if not (e.name and module.startswith(e.name)):  # a real missing dependency inside the module: say so
                raise
    return cmds


def main(argv: Optional[list[str]] = None) -> None:
    import os

    from jsonargparse import CLI

    try:
        result = CLI(_commands(), args=argv, as_positional=True)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Bad input (a setting, a path, a model) is said in one line, as the parser says its own errors;
        # MEA_DEBUG=1 shows where it was raised.
        if os.environ.get("MEA_DEBUG", "0") == "1":
            raise
        print(f"mea: error: {type(e).__name__}: {e}\n(MEA_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, dict) and result.get("status") == "diverged":
        sys.exit(1)


if __name__ == "__main__":
    main()
