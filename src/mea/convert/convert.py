"""`mea convert`: compress the KV cache of a pretrained model by storing h' component heads per layer
and rebuilding the h heads attention reads as "virtual heads" through MEA's head-level mix.

The converted model is an MEA model (``attention="mea"``) whose compressed layers store h' heads;
layers left out of ``--layers`` keep their stored heads and their function (a GQA layer becomes an
MEA layer with GQA's replication mix). It keeps the source's head norm setting: a LLaMA model has
none, and adding a fresh one would change the function before any healing.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..models.config import ModelConfig
from ..models.transformer import Transformer
from .heads import INITS, effective_head_weights, fit_components, layer_mixes, relative_error

# Layers whose keys and values are linear in the input through per-head projections, with the
# usual softmax: those the fit applies to. diff splits heads into half-heads with their own
# rotation, talking heads mixes the scores; neither has a KV head structure to compress.
SUPPORTED_ATTENTION = ("mha", "gqa", "mea")
REPORT_FILE = "conversion.json"


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Layer indices of a ``--layers`` SPEC, sorted.

    ``all``; ``middle`` (the middle half: ``n_layers // 2`` layers centred in the stack);
    a comma-separated list of indices and inclusive ranges (``4-11``, ``0,2,5``, ``0-3,8``).
    """
    spec = str(spec).strip().lower()
    if spec == "all":
        return list(range(n_layers))
    if spec == "middle":
        n = max(1, n_layers // 2)
        start = (n_layers - n) // 2
        return list(range(start, start + n))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError(f"layers: range {part!r} runs backwards")
                chosen = range(lo, hi + 1)
            else:
                chosen = [int(part)]
        except ValueError as e:
            if str(e).startswith("layers:"):
                raise
            raise ValueError(
                f"layers: cannot parse {part!r} in {spec!r}; use 'all', 'middle', indices '0,2,5' or ranges '4-11'"
            ) from None
        for i in chosen:
            if not 0 <= i < n_layers:
                raise ValueError(f"layers: layer {i} out of range; the model has layers 0-{n_layers - 1}")
            out.add(i)
    return sorted(out)


def check_request(config: ModelConfig, kv_heads: int, layers: list[int]) -> None:
    """Raise ValueError unless compressing ``layers`` of ``config`` to ``kv_heads`` heads makes sense."""
    if config.attention not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"model: attention={config.attention!r} is not supported by convert; it handles "
            f"{', '.join(SUPPORTED_ATTENTION)} (LLaMA-family MHA/GQA and MEA models)"
        )
    if not layers:
        raise ValueError("layers: no layer selected to compress")
    h = config.n_heads
    if not 1 <= kv_heads <= h:
        raise ValueError(f"kv_heads: must satisfy 1 <= h' <= n_heads={h}, got {kv_heads}")
    for i in layers:
        if not 0 <= i < config.n_layers:
            raise ValueError(f"layers: layer {i} out of range; the model has layers 0-{config.n_layers - 1}")
        have = config.kv_heads_at(i)
        if kv_heads > have:
            raise ValueError(
                f"kv_heads: layer {i} stores {have} KV heads; h'={kv_heads} would enlarge its cache, not "
                f"compress it (choose h' <= {have}, or leave the layer out of --layers)"
            )


def _attn_params(attn) -> int:
    return sum(p.numel() for n, p in attn.named_parameters() if not n.startswith("head_norm"))


@torch.no_grad()
def compress_model(model: Transformer, kv_heads: int, init: str = "svd", layers: str | list[int] = "all",
                   covariances: Optional[list[Optional[Tensor]]] = None) -> tuple[Transformer, list[dict]]:
    """Convert ``model`` into an MEA model whose ``layers`` store ``kv_heads`` component heads.

    Args:
        model: a core Transformer with mha, gqa or mea attention (left unchanged).
        kv_heads: h', the stored key/value heads of each compressed layer.
        init: ``svd``, ``activation`` or ``mean-pool`` (see ``mea.convert.heads``).
        layers: a ``--layers`` SPEC or a list of layer indices.
        covariances: per-layer input second moments (``calibration.input_covariances``); needed
            by ``activation`` and by the reported errors on calibration text.

    Returns:
        (converted model, per-layer report rows).
    """
    cfg = model.config
    sel = parse_layers(layers, cfg.n_layers) if isinstance(layers, str) else sorted(set(layers))
    if init not in INITS:
        raise ValueError(f"init: unknown init {init!r}; expected one of {', '.join(INITS)}")
    check_request(cfg, kv_heads, sel)
    if init == "activation" and (covariances is None or any(covariances[i] is None for i in sel)):
        raise ValueError("init: 'activation' needs calibration statistics for every compressed layer (calib_tokens > 0)")

    heads = [kv_heads if i in sel else cfg.kv_heads_at(i) for i in range(cfg.n_layers)]
    new_cfg = dataclasses.replace(
        cfg, attention="mea", n_kv_heads=kv_heads,
        layer_kv_heads=None if len(set(heads)) == 1 else heads, head_norm=cfg.head_norm,
    )
    ref = next(model.parameters())
    state = {k: v for k, v in model.state_dict().items()}
    rows = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        prefix = f"model.layers.{i}.self_attn."
        d, D = attn.head_dim, cfg.d_model
        wk, wv = effective_head_weights(attn)
        cov = covariances[i] if covariances is not None else None
        if i in sel:
            ck, k_mix = fit_components(wk, kv_heads, init, cov)
            cv, v_mix = fit_components(wv, kv_heads, init, cov)
            k_w, v_w = ck.reshape(kv_heads * d, D), cv.reshape(kv_heads * d, D)
        else:
            k_mix, v_mix = (m.double() for m in layer_mixes(attn))
            k_w, v_w = attn.k_proj.weight.double(), attn.v_proj.weight.double()
        state[prefix + "k_proj.weight"] = k_w.to(ref.dtype)
        state[prefix + "v_proj.weight"] = v_w.to(ref.dtype)
        state[prefix + "k_mix"] = k_mix.to(ref.dtype)
        state[prefix + "v_mix"] = v_mix.to(ref.dtype)
        hk, hn = attn.n_kv_heads, heads[i]
        wk_hat = torch.einsum("ji,jcD->icD", k_mix, k_w.view(hn, d, D))
        wv_hat = torch.einsum("ji,jcD->icD", v_mix, v_w.view(hn, d, D))
        rows.append({
            "layer": i,
            "compressed": i in sel,
            "kv_heads_before": hk,
            "kv_heads_after": hn,
            "k_rel_err": relative_error(wk, wk_hat, cov) if cov is not None else None,
            "v_rel_err": relative_error(wv, wv_hat, cov) if cov is not None else None,
            "k_rel_err_weights": relative_error(wk, wk_hat),
            "v_rel_err_weights": relative_error(wv, wv_hat),
            "attn_params_before": _attn_params(attn),
            "attn_params_after": None,  # filled from the built model below
            "kv_bytes_per_token_before": 2 * hk * d * 2,
            "kv_bytes_per_token_after": 2 * hn * d * 2,
            "weak_heads": weak_heads(k_mix, v_mix) if i in sel else [],
        })

    new = Transformer(new_cfg).to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    for r, layer in zip(rows, new.model.layers):
        r["attn_params_after"] = _attn_params(layer.self_attn)
    return new, rows


WEAK_MIX = 0.3


def weak_heads(k_mix: Tensor, v_mix: Tensor, threshold: float = WEAK_MIX) -> list[int]:
    """Query heads whose key or value mixing column is below ``threshold`` x the layer's largest.

    A rank-h' fit of nearly orthogonal heads keeps the largest ones and gives the others a mixing
    weight near 0, so those query heads start with almost no keys or values. Under AdamW a mixing
    entry moves by about lr per step, so healing at a fine-tuning rate cannot revive them (measured
    on SmolLM2 at h' = 1: docs/compression.md). ``mean-pool`` never has any.
    """
    out = set()
    for mix in (k_mix, v_mix):
        norms = mix.double().norm(dim=0)  # (h,): one column per query head
        out |= {int(i) for i in torch.nonzero(norms < threshold * norms.max()).flatten()}
    return sorted(out)


def format_table(rows: list[dict]) -> str:
    """The per-layer report as a fixed-width table (errors relative, on calibration text when known)."""
    head = (f"{'layer':>5} {'heads':>7} {'K err':>8} {'V err':>8} {'K err(W)':>9} {'V err(W)':>9} "
            f"{'attn params':>19} {'KV B/token':>12} {'weak':>4}")
    lines = [head, "-" * len(head)]

    def pct(x):
        return f"{100 * x:7.2f}%" if x is not None else f"{'-':>8}"

    for r in rows:
        lines.append(
            f"{r['layer']:>5} {r['kv_heads_before']:>3}->{r['kv_heads_after']:<3} {pct(r['k_rel_err'])} "
            f"{pct(r['v_rel_err'])} {pct(r['k_rel_err_weights']):>9} {pct(r['v_rel_err_weights']):>9} "
            f"{r['attn_params_before']:>9,}->{r['attn_params_after']:<9,} "
            f"{r['kv_bytes_per_token_before']:>5}->{r['kv_bytes_per_token_after']:<6} {len(r.get('weak_heads', [])):>4}"
        )
    tb = sum(r["kv_bytes_per_token_before"] for r in rows)
    ta = sum(r["kv_bytes_per_token_after"] for r in rows)
    lines.append(f"KV cache: {tb:,} -> {ta:,} bytes/token (bf16), {100 * ta / tb:.1f}% of the original")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- text
def source_tokenizer(model: str | Path) -> Optional[Path]:
    """The folder whose ``tokenizer.json`` tokenizes the text of ``model`` (:func:`mea.io.tokenizer_folder`),
    or None for a model on the project's GPT-2 tokenizer; calibration reads that file, so a tokenizer
    without it (a slow one only) is an error."""
    from ..io.hf import tokenizer_folder

    tok_dir = tokenizer_folder(model)
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(
            f"model: the tokenizer in {tok_dir} has no tokenizer.json (a fast tokenizer), which calibration reads; "
            f"write one with: python -c \"from transformers import AutoTokenizer; "
            f"AutoTokenizer.from_pretrained('{tok_dir}').save_pretrained('{tok_dir}')\"")
    return tok_dir


def calibration_tokens(tokenizer_dir: Optional[Path], vocab_size: int, n_tokens: int, seq_len: int,
                       text_file: Optional[str] = None, corpus: str = "prose", seed: int = 0) -> Tensor:
    """(n, seq_len) windows of calibration text in the model's own tokenizer.

    The text is ``text_file`` if given, else windows sampled over the train split of ``corpus``
    (the validation split stays unseen for measuring the result). A model with its own tokenizer
    (an HF folder with ``tokenizer.json``) gets the text re-tokenized.
    """
    from ..data.windows import corpus_windows, fixed_windows

    if seq_len < 2:
        raise ValueError(f"calib_seq_len: must be >= 2, got {seq_len}")
    if text_file is None:
        ids = corpus_windows(tokenizer_dir, "train", n_tokens, seq_len, corpus, seed=seed)
    else:
        text = Path(text_file).read_text()
        if tokenizer_dir is None:
            from ..data.tokenizer import load_tokenizer

            flat = load_tokenizer().encode(text)
        else:
            from tokenizers import Tokenizer

            flat = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        if len(flat) < seq_len:
            raise ValueError(f"calibration text: {len(flat)} tokens, fewer than one window of {seq_len}; give more "
                             "text or a shorter calib_seq_len")
        # at least one window, as from a corpus
        ids = fixed_windows(flat, seq_len, max_windows=max(1, min(n_tokens, len(flat)) // seq_len))
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"calibration text: token id {int(ids.max())} >= the model's vocab_size {vocab_size}; "
            "the tokenizer does not match the model"
        )
    return ids


# ---------------------------------------------------------------------------------------- command
def convert(model: str, kv_heads: int, init: str = "svd", layers: str = "all", out: Optional[str] = None,
            calib_tokens: int = 65536, calib_seq_len: int = 512, calib_text: Optional[str] = None,
            corpus: str = "prose", batch_size: int = 8, overwrite: bool = False, device: str = "auto") -> dict:
    """Compress a pretrained model's KV cache to KV_HEADS stored heads per layer (MEA virtual heads).

    Each compressed layer stores KV_HEADS component heads, and every query head reads its own mix
    of them (MEA's head-level linear composition). Writes an HF folder (for `mea evaluate`,
    `mea pretrain --init_from`, transformers) and conversion.json, the per-layer report.

    Args:
        model: HF LLaMA-family folder (MHA or GQA), a folder written by mea's save_hf, a mea
            run/checkpoint directory, or a LLaMA .gguf file.
        kv_heads: h', stored KV heads of each compressed layer (1 <= h' <= the layer's current KV
            heads; need not divide the query heads).
        init: svd (best rank-h' fit of the projection weights), activation (best fit of the keys and
            values of calibration text), or mean-pool (GQA uptraining: average heads in groups).
        layers: layers to compress: all, middle (the middle half), or indices and ranges such as
            4-11 or 0,2,5. The others keep their heads and their function.
        out: output folder (default: converted/<model name>-kv<h'>-<init> under the current directory).
        calib_tokens: tokens of calibration text for the activation fit and the reported errors
            (0: none; errors are then reported in weight space only; activation needs > 0).
        calib_seq_len: tokens per calibration window.
        calib_text: a plain-text file to calibrate on instead of the corpus.
        corpus: corpus whose train split gives the calibration text (a built-in name such as prose,
            or a directory written by `mea prepare-data`); re-tokenized for models with their own
            tokenizer.
        batch_size: calibration windows per forward pass.
        overwrite: replace ``out`` if it exists.
        device: where the calibration forward passes run (auto: cuda when available, else cpu); the
            fits themselves run on the CPU in float64.

    Returns:
        The report (also written to OUT/conversion.json).
    """
    if init not in INITS:
        raise ValueError(f"init: unknown init {init!r}; expected one of {', '.join(INITS)}")
    if kv_heads < 1:
        raise ValueError(f"kv_heads: must be >= 1, got {kv_heads}")
    if calib_tokens < 0:
        raise ValueError(f"calib_tokens: must be >= 0, got {calib_tokens}")
    if init == "activation" and calib_tokens == 0:
        raise ValueError("calib_tokens: the activation init fits calibration text; give calib_tokens > 0")
    if calib_text is not None and not Path(calib_text).is_file():
        raise FileNotFoundError(f"calib_text: {calib_text} is not a file")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    from ..io.load import check_model_path, load_model, model_config
    from ..runtime import about, output_folder, resolve_device

    with about("model"):
        check_model_path("model", model)
        config = model_config(model)  # (None for a .gguf file: checked once it is imported below)
    if config is not None:
        check_request(config, kv_heads, parse_layers(layers, config.n_layers))
    out_dir = Path(out).expanduser() if out else Path("converted") / f"{Path(model).expanduser().resolve().name}-kv{kv_heads}-{init}"
    output_folder("out", out_dir, "convert", overwrite)
    dev = resolve_device("device", device)
    if calib_tokens and calib_text is None:
        from ..data.prepare import check_corpus

        check_corpus("corpus", corpus)

    with about("model"):
        src = load_model(model, dtype=torch.float32)
        tok_dir = source_tokenizer(model)
    sel = parse_layers(layers, src.config.n_layers)
    check_request(src.config, kv_heads, sel)
    calib = calibrate(src, tok_dir, calib_tokens, calib_seq_len, calib_text, corpus, batch_size, dev)
    return convert_loaded(src, tok_dir, kv_heads, init, sel, calib, out_dir, source=str(model), overwrite=overwrite)


@dataclasses.dataclass
class Calibration:
    """Per-layer input second moments of a model on some text, reusable across conversions."""

    covariances: Optional[list[Optional[Tensor]]]
    n_tokens: int
    description: str


def calibrate(model: Transformer, tokenizer_dir: Optional[Path], calib_tokens: int, calib_seq_len: int = 512,
              calib_text: Optional[str] = None, corpus: str = "prose", batch_size: int = 8,
              device: Optional[str] = None) -> Calibration:
    """Collect the calibration statistics of ``model`` (none when ``calib_tokens`` is 0), running it on
    ``device`` for the purpose (it goes back where it was afterwards)."""
    if calib_tokens == 0:
        return Calibration(None, 0, "none")
    from .calibration import input_covariances

    ids = calibration_tokens(tokenizer_dir, model.config.vocab_size, calib_tokens, calib_seq_len, calib_text, corpus)
    home = next(model.parameters()).device
    try:
        covs, n = input_covariances(model.to(device or home), ids.split(batch_size))
    finally:
        model.to(home)
    return Calibration(covs, n, calib_text or f"corpus {corpus!r}, train split, {calib_seq_len}-token windows")


def convert_loaded(src: Transformer, tokenizer_dir: Optional[Path], kv_heads: int, init: str, layers: str | list[int],
                   calib: Calibration, out: str | Path, source: str = "", overwrite: bool = False) -> dict:
    """``convert`` for a model already in memory: compress, write the HF folder and the report."""
    sel = parse_layers(layers, src.config.n_layers) if isinstance(layers, str) else sorted(set(layers))
    new, rows = compress_model(src, kv_heads, init, sel, calib.covariances)
    report = {
        "source": source,
        "kv_heads": kv_heads,
        "init": init,
        "layers": sel,
        "calib_tokens": calib.n_tokens,
        "calib_text": calib.description,
        "kv_bytes_per_token_before": src.config.kv_cache_bytes_per_token,
        "kv_bytes_per_token_after": new.config.kv_cache_bytes_per_token,
        "params_before": src.num_params(),
        "params_after": new.num_params(),
        "per_layer": rows,
    }
    out_dir = Path(out)
    _write(new, tokenizer_dir, out_dir, report, overwrite)
    print(format_table(rows))
    weak = sum(len(r["weak_heads"]) for r in rows)
    if weak:
        n_q = sum(src.config.n_heads for r in rows if r["compressed"])
        print(f"warning: {weak} of {n_q} query heads of the compressed layers start with key or value mixing "
              f"below {WEAK_MIX} of their layer's largest ('weak' column): their keys or values are nearly gone, "
              "and healing at one fine-tuning learning rate does not bring them back (mean-pool keeps every head; "
              "a higher lr on the mixing, --train.mixing_lr_mult, helps; see docs/compression.md)", file=sys.stderr)
    print(f"wrote {out_dir}")
    # What healed best in the study (docs/results.md, experiment 4): a fine-tuning lr, the mixing 300x faster.
    print(f"heal it with, e.g.: mea pretrain --init_from {out_dir} --out {out_dir}-healed --train.lr 1e-4 "
          "--train.mixing_lr_mult 300")
    return report


def _write(model: Transformer, tok_dir: Optional[Path], out_dir: Path, report: dict, overwrite: bool) -> None:
    """Write into a temporary sibling and rename it into place: a failure leaves no half folder."""
    from ..io.hf import save_hf

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # The source's own tokenizer travels with it (as an object, so that its eos id reaches the
        # generation config); mea checkpoints use the GPT-2 BPE.
        tokenizer = "gpt2"
        if tok_dir is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        save_hf(model, tmp, tokenizer=tokenizer)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        if out_dir.exists():  # empty (checked up front), or replaced with --overwrite
            if any(out_dir.iterdir()) and not overwrite:
                raise FileExistsError(f"out: {out_dir} appeared while converting")
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

