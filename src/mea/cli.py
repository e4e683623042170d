"""`mea <command>`: one entry point over typed functions (jsonargparse builds the parser from their
signatures and docstrings, and every command also takes ``--config FILE.yaml``)."""
from __future__ import annotations

import os
import sys
from typing import Optional


def info(preset: str = "tiny", n_kv_heads: Optional[int] = None, knock: Optional[str] = "v",
         knock_form: str = "linear", prompt: str = "The capital of France is", max_new_tokens: int = 12,
         seed: int = 0) -> None:
    """Build one model per attention variant, and mha, gqa and mea with knocking heads; print parameters,
    KV-cache bytes per token, training FLOPs per token and a sample.

    Args:
        preset: model preset (tiny, mini, small, 125m, 350m, smollm2-135m).
        n_kv_heads: stored heads for the variants that may store fewer (gqa, mea, diff_v2; default: half the
            query heads; where a variant needs a divisor of n_heads and this is none, it stores all).
        knock: the projections the knocking-heads rows knock (letters of q, k, v); null for no such rows.
        knock_form: the knocking-heads map: linear or mlp.
        prompt: text to continue (an untrained model continues it with noise).
        max_new_tokens: tokens to sample per variant.
        seed: initialization seed.
    """
    import torch

    from .layers.attention import ATTENTION_CLASSES
    from .models import ATTENTION_VARIANTS, ModelConfig, Transformer

    base = ModelConfig.from_preset(preset)
    hk = n_kv_heads if n_kv_heads is not None else max(1, base.n_heads // 2)
    if not 1 <= hk <= base.n_heads:
        raise ValueError(f"n_kv_heads: must satisfy 1 <= n_kv_heads <= n_heads={base.n_heads}, got {hk}")
    rows = [(variant, {}) for variant in ATTENTION_VARIANTS]
    if knock is not None:
        ModelConfig.from_preset(preset, knock=knock, knock_form=knock_form)  # a bad value fails before any row
        rows += [(variant, {"knock": knock, "knock_form": knock_form}) for variant in ("mha", "gqa", "mea")]
    tok = None
    try:
        from .data.tokenizer import load_tokenizer

        tok = load_tokenizer()
    except Exception as e:  # the table is still useful without the tokenizer package
        print(f"(no tokenizer: {e}; sampling token ids instead)", file=sys.stderr)
    print(f"{'variant':<28} {'params':>12} {'non-emb':>12} {'KV bytes/token':>15} {'MFLOP/token':>12}  sample")
    for variant, extra in rows:
        rule = ATTENTION_CLASSES[variant].kv_heads_rule
        kw = {} if rule == "all" else {"n_kv_heads": hk if rule == "any" or base.n_heads % hk == 0 else base.n_heads}
        cfg = ModelConfig.from_preset(preset, attention=variant, **kw, **extra)
        torch.manual_seed(seed)
        model = Transformer(cfg).eval()
        ids = tok.encode(prompt) if tok else list(range(1, 6))
        ids = [i % cfg.vocab_size for i in ids]
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
        sample = tok.decode(out) if tok else str(out)
        label = variant + (f"(h'={cfg.n_kv_heads})" if rule != "all" else "")
        label += f"+knock({cfg.knock},{cfg.knock_form})" if cfg.knock else ""
        print(f"{label:<28} {model.num_params():>12,} {model.num_params(True):>12,} "
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
    "generate": ("mea.generate", "generate"),
    "study-lr-scaling": ("mea.study.lr_scaling", "main"),
    "study-compression": ("mea.study.compression_table", "compression_table"),
    "study-compression-final": ("mea.study.compression_final", "compression_final"),
    "study-report": ("mea.study.report", "main"),
    "study-scratch": ("mea.study.scratch", "COMMANDS"),
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


def _parser_class(command: str):
    """The parser of every command (``command``: the one asked for): its errors are one line, and a
    negative number in exponent notation (``--train.lr -1e-3``) is a value, not an option."""
    import re

    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # argparse takes only "-1" and "-0.5" for numbers; "-1e-3" would read as an unknown option.
            self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

        def error(self, message: str, ex: Optional[Exception] = None):
            if not self.exit_on_error or os.environ.get("MEA_DEBUG", "0") == "1":
                return super().error(message, ex)  # raises for jsonargparse to handle, or prints the usage
            print(f"mea: error: {_parser_message(message, command or 'COMMAND')}", file=sys.stderr)
            sys.exit(2)

    return Parser


def _parser_message(message: str, command: str) -> str:
    """jsonargparse's message as ``<option>: <problem>`` on one line."""
    import re

    from .runtime import one_line

    def kind(name: str) -> str:
        return {"NoneType": "null"}.get(name, name)

    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if m:
        field, problem = m.group(1), m.group(2)
        got = re.search(r"(?:Given value|Got value): (.*)", problem)
        types = re.findall(r"<class '(\w+)'>", problem.split("Given value type")[0])
        if got and types:
            return f"{field}: expected {' or '.join(dict.fromkeys(kind(t) for t in types))}, got {got.group(1).strip()!r}"
        return f"{field}: {one_line(problem)}"
    text = one_line(message)
    m = re.match(r"the following arguments are required: (.*)", text)
    if m:
        first = m.group(1).split(",")[0].strip()
        command, _, name = first.rpartition(".") if "." in first else (command, "", first)
        return f"{name}: missing (mea {command} --help shows the arguments)"
    m = re.match(r"argument subcommand: invalid choice: (\S+)", text)
    if m:
        return f"command: unknown {m.group(1)}; mea --help lists the commands"
    m = re.match(r"argument -*([\w.]+): (.*)", text)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    m = re.search(r"Option '([\w.]+)' is not accepted", text)
    if m:
        return f"{m.group(1)}: not an option of mea {command} (mea {command} --help lists them)"
    m = re.match(r"unrecognized arguments: (\S+)", text)
    if m:
        return f"{m.group(1).lstrip('-').split('=')[0]}: not an option of mea {command} (mea {command} --help lists them)"
    return text


def _config_paths(argv: list[str]) -> list[str]:
    """``--config NAME``: a file that exists as given, else a config shipped with mea (``small``,
    ``small.yaml``, ``configs/small.yaml``, ``study/lr_sweep``; see ``runtime.config_path``)."""
    from .runtime import config_path

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(config_path(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(config_path(arg[len("--config="):]))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import CLI

    from .runtime import one_line

    argv = _config_paths(sys.argv[1:] if argv is None else list(argv))
    try:
        result = CLI(_commands(), args=argv, as_positional=True, prog="mea",
                     parser_class=_parser_class(next((a for a in argv if a in COMMANDS or a == "info"), "")))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        # Bad input (a setting, a path, a model) is one line, `mea: error: <option>: <problem>`, as the
        # parser's own errors are; MEA_DEBUG=1 shows where it was raised.
        if os.environ.get("MEA_DEBUG", "0") == "1":
            raise
        print(f"mea: error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, dict) and result.get("status") == "diverged":
        sys.exit(1)


if __name__ == "__main__":
    main()
