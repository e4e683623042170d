"""`mea convert`: compress the KV cache of a pretrained model by storing h' component heads per layer
and rebuilding the h heads attention reads as "virtual heads" through MEA's head-level mix.

The converted model is an MEA model (``attention="mea"``) whose compressed layers store h' heads;
layers left out of ``--layers`` keep their stored heads and their function (a GQA layer becomes an
MEA layer with GQA's replication mix). It keeps the source's head norm setting: a LLaMA model has
none, and adding a fresh one would change the function before any healing.

h' is the same in every compressed layer (``--kv_heads``), or chosen per layer to meet a fraction of
the cache exactly (``--kv_budget``): each layer's sensitivity is measured as the KL divergence from
the original when that layer alone is compressed to each smaller h', and the allocation with the
least summed KL that stores exactly the budgeted number of heads is taken (:func:`allocate_heads`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..layers.attention import MEAttention
from ..models.config import ModelConfig
from ..models.kl import token_kl
from ..models.transformer import Transformer
from .calibration import AttentionStats
from .heads import (INITS, effective_head_weights, fit_components, fit_weighted, layer_mixes, relative_error,
                    relative_weighted_error, rope_plane_average)

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


@dataclasses.dataclass
class LayerFit:
    """A compressed layer's stored-head projections (h' d, D) and mixes (h', h), float64."""

    k_w: Tensor
    v_w: Tensor
    k_mix: Tensor
    v_mix: Tensor


def query_weights(attn, stats: AttentionStats) -> tuple[Tensor, Tensor]:
    """The per-head weights (h, d, d) of the query-aware fit: for keys, each query head's second moment
    of queries with RoPE's rotations averaged out (``heads.rope_plane_average``): the key error that
    the logits q_i . k_i see; for values, ``W_O,i^T W_O,i`` of the output projection's columns of head
    i (times the head norm's gain where there is one): the value error that reaches the residual stream.
    The input-side weights are the layer's input second moment (keys) and ``stats.attn_input`` (values)."""
    h, d = attn.n_heads, attn.head_dim
    wo = attn.o_proj.weight.detach().cpu().double().view(-1, h, d).permute(1, 0, 2)  # (h, D, d)
    if attn.head_norm is not None:
        wo = wo * attn.head_norm.weight.detach().cpu().double().view(h, 1, d)
    return rope_plane_average(stats.query.double()), wo.transpose(1, 2) @ wo


def fit_layer(attn, kv_heads: int, init: str, cov: Optional[Tensor] = None,
              stats: Optional[AttentionStats] = None) -> LayerFit:
    """Fit one layer's keys and values with ``kv_heads`` component heads (``init``: module ``heads``), on
    the CPU in float64 wherever the layer is."""
    wk, wv = (w.cpu() for w in effective_head_weights(attn))
    d, D = attn.head_dim, wk.shape[-1]
    if init == "query":
        lk, lv = query_weights(attn, stats)
        ck, k_mix = fit_weighted(wk, kv_heads, lk, cov)
        cv, v_mix = fit_weighted(wv, kv_heads, lv, stats.attn_input)
    else:
        ck, k_mix = fit_components(wk, kv_heads, init, cov)
        cv, v_mix = fit_components(wv, kv_heads, init, cov)
    return LayerFit(ck.reshape(kv_heads * d, D), cv.reshape(kv_heads * d, D), k_mix, v_mix)


def _layer_targets(cfg: ModelConfig, kv_heads: Union[int, list[int]], layers) -> tuple[list[int], list[int]]:
    """(stored heads per layer after, the layers compressed) of a request; checked."""
    if isinstance(kv_heads, int):
        sel = parse_layers(layers, cfg.n_layers) if isinstance(layers, str) else sorted(set(layers))
        check_request(cfg, kv_heads, sel)
        return [kv_heads if i in sel else cfg.kv_heads_at(i) for i in range(cfg.n_layers)], sel
    heads = [int(n) for n in kv_heads]
    if len(heads) != cfg.n_layers:
        raise ValueError(f"kv_heads: one count per layer ({cfg.n_layers}) needed, got {len(heads)}")
    if layers not in ("all", None):
        raise ValueError("layers: per-layer head counts say which layers are compressed; leave layers at 'all'")
    sel = [i for i, n in enumerate(heads) if n < cfg.kv_heads_at(i)]
    for i, n in enumerate(heads):
        check_request(cfg, n, [i])
    if not sel:
        raise ValueError("layers: no layer selected to compress (every layer keeps its heads)")
    return heads, sel


@torch.no_grad()
def compress_model(model: Transformer, kv_heads: Union[int, list[int]], init: str = "svd",
                   layers: Union[str, list[int]] = "all", covariances: Optional[list[Optional[Tensor]]] = None,
                   attention_stats: Optional[list[Optional[AttentionStats]]] = None,
                   fits: Optional[dict] = None) -> tuple[Transformer, list[dict]]:
    """Convert ``model`` into an MEA model whose ``layers`` store ``kv_heads`` component heads.

    Args:
        model: a core Transformer with mha, gqa or mea attention (left unchanged).
        kv_heads: h', the stored key/value heads of each compressed layer; or a list with every
            layer's count (the layers whose count is below their current one are compressed, and
            ``layers`` must stay ``all``).
        init: ``svd``, ``activation``, ``mean-pool`` or ``query`` (see ``mea.convert.heads``).
        layers: a ``--layers`` SPEC or a list of layer indices.
        covariances: per-layer input second moments (``calibration.collect_statistics``); needed
            by ``activation`` and ``query`` and by the reported errors on calibration text.
        attention_stats: per-layer :class:`AttentionStats`, needed by ``query``; with them every init
            reports the query-aware errors (``k_logit_rel_err``, ``v_out_rel_err``) too.
        fits: fits already made, ``{(layer, h', init): LayerFit}`` (e.g. while measuring sensitivity);
            new fits are added to it.

    Returns:
        (converted model, per-layer report rows).
    """
    cfg = model.config
    if init not in INITS:
        raise ValueError(f"init: unknown init {init!r}; expected one of {', '.join(INITS)}")
    heads, sel = _layer_targets(cfg, kv_heads, layers)
    if init in ("activation", "query") and (covariances is None or any(covariances[i] is None for i in sel)):
        raise ValueError(f"init: {init!r} needs calibration statistics for every compressed layer (calib_tokens > 0)")
    if init == "query" and (attention_stats is None or any(attention_stats[i] is None for i in sel)):
        raise ValueError("init: 'query' needs the attention statistics of every compressed layer "
                         "(calibrate with attention=True)")
    fits = {} if fits is None else fits
    new_cfg = dataclasses.replace(
        cfg, attention="mea", n_kv_heads=kv_heads if isinstance(kv_heads, int) else min(heads),
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
        stats = attention_stats[i] if attention_stats is not None else None
        if i in sel:
            key = (i, heads[i], init)
            if key not in fits:
                fits[key] = fit_layer(attn, heads[i], init, cov, stats)
            f = fits[key]
            k_mix, v_mix, k_w, v_w = f.k_mix, f.v_mix, f.k_w, f.v_w
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
        row = {
            "layer": i,
            "compressed": i in sel,
            "kv_heads_before": hk,
            "kv_heads_after": hn,
            "k_rel_err": relative_error(wk, wk_hat, cov) if cov is not None else None,
            "v_rel_err": relative_error(wv, wv_hat, cov) if cov is not None else None,
            "k_rel_err_weights": relative_error(wk, wk_hat),
            "v_rel_err_weights": relative_error(wv, wv_hat),
        }
        if stats is not None and cov is not None:
            # What the query-aware fit minimizes, for every init: the relative error of the logits
            # (RoPE-averaged) and of what o_proj reads of the attention output.
            lk, lv = query_weights(attn, stats)
            row["k_logit_rel_err"] = relative_weighted_error(wk, wk_hat, lk, cov)
            row["v_out_rel_err"] = relative_weighted_error(wv, wv_hat, lv, stats.attn_input)
        row.update({
            "attn_params_before": _attn_params(attn),
            "attn_params_after": None,  # filled from the built model below
            "kv_bytes_per_token_before": 2 * hk * d * 2,
            "kv_bytes_per_token_after": 2 * hn * d * 2,
            "weak_heads": weak_heads(k_mix, v_mix) if i in sel else [],
        })
        rows.append(row)

    new = Transformer(new_cfg).to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    for r, layer in zip(rows, new.model.layers):
        r["attn_params_after"] = _attn_params(layer.self_attn)
    return new, rows


# ---------------------------------------------------------------------------------------- a cache budget
def budget_heads(config: ModelConfig, kv_budget: float, layers: list[int]) -> int:
    """The stored heads a budget allows: ``floor(kv_budget x sum_l h_kv,l)`` over all layers (rounded
    down, so the cache never exceeds the fraction); checked against what ``layers`` can give.

    Raises:
        ValueError: a budget outside (0, 1), or one that is not feasible: below one head in each
            compressed layer (with the others kept).
    """
    if not 0 < kv_budget < 1:
        raise ValueError(f"kv_budget: the fraction of the stored KV heads to keep must lie in (0, 1), got {kv_budget}")
    current = [config.kv_heads_at(i) for i in range(config.n_layers)]
    total = sum(current)
    n = math.floor(kv_budget * total + 1e-9)
    least = sum(c for i, c in enumerate(current) if i not in layers) + len(layers)
    if n < least:
        raise ValueError(f"kv_budget: {kv_budget} of {total} stored KV heads is {n} heads, fewer than one per compressed "
                         f"layer ({least} with the other layers kept); the smallest feasible budget is "
                         f"{least / total:.4f}")
    return n


def allocate_heads(costs: dict[int, dict[int, float]], current: list[int], total: int) -> list[int]:
    """Per-layer stored heads with exactly ``total`` heads in all and the least summed cost.

    ``costs[l][h']`` is the cost of storing h' heads in layer l (a layer's own count costs 0; a layer
    without costs keeps its count). A multiple-choice knapsack, solved exactly by dynamic programming
    over layers and heads used (the summed per-layer costs are the objective: it assumes the layers'
    costs add up). Ties go to the allocation that keeps more heads in earlier layers.
    """
    options = []
    for i, c in enumerate(current):
        opts = {c: 0.0, **{int(h): float(v) for h, v in costs.get(i, {}).items()}}
        options.append(sorted(opts.items(), reverse=True))
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for opts in options:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (cost, picks) in best.items():
            for h, c in opts:
                k = used + h
                if k <= total and (k not in nxt or cost + c < nxt[k][0]):
                    nxt[k] = (cost + c, picks + [h])
        best = nxt
    if total not in best:
        raise ValueError(f"kv_budget: no allocation stores exactly {total} heads")
    return best[total][1]


def converted_attention(model: Transformer, layer_idx: int, kv_heads: int, fit: LayerFit) -> MEAttention:
    """Layer ``layer_idx``'s attention of ``model`` as an MEA layer with the fitted component heads (the
    query, output and head-norm weights copied), on the model's device and dtype."""
    src = model.model.layers[layer_idx].self_attn
    cfg = dataclasses.replace(model.config, attention="mea", n_kv_heads=kv_heads, layer_kv_heads=None)
    ref = src.q_proj.weight
    new = MEAttention(cfg, layer_idx)
    state = {k: v for k, v in src.state_dict().items() if k.split(".")[0] not in ("k_proj", "v_proj", "k_mix", "v_mix")}
    state.update({"k_proj.weight": fit.k_w, "v_proj.weight": fit.v_w, "k_mix": fit.k_mix, "v_mix": fit.v_mix})
    new.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()}, strict=True)
    return new.to(device=ref.device, dtype=ref.dtype).eval()


@torch.no_grad()
def layer_sensitivity(model: Transformer, windows: Tensor, candidates: dict[int, list[int]],
                      build: Callable[[int, int], nn.Module], batch_size: int = 8,
                      progress: bool = True) -> dict[int, dict[int, float]]:
    """KL(original || the model with only layer l compressed to h') per token (nats) on ``windows``,
    for every layer l and h' of ``candidates`` (``{l: [h', ...]}``); ``build(l, h')`` gives the
    compressed layer's attention module.

    The original's residual stream before every layer is kept per batch, so each candidate runs only
    the layers from its own on."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pairs = [(l, h) for l in sorted(candidates) for h in candidates[l]]
    modules = {(l, h): build(l, h) for l, h in pairs}
    sums = {pair: 0.0 for pair in pairs}
    n = 0
    seen = {}
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("a", args[1]))
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(list(windows.split(batch_size)), desc="layer sensitivity", unit="batch", disable=not progress):
            ids = ids.to(device)
            states: list[Tensor] = []
            p = model.lm_head(model.hidden_states(ids, states=states))
            for (l, h), module in modules.items():
                layer = model.model.layers[l]
                kept, layer.self_attn = layer.self_attn, module
                try:
                    x = states[l]
                    for later in model.model.layers[l:]:
                        x = later(x, seen["a"])
                    q = model.lm_head(model.model.norm(x))
                finally:
                    layer.self_attn = kept
                sums[(l, h)] += float(token_kl(p, q).double().sum())
            n += ids.numel()
    finally:
        hook.remove()
        model.train(was_training)
    out: dict[int, dict[int, float]] = {}
    for (l, h), v in sums.items():
        out.setdefault(l, {})[h] = max(0.0, v / max(1, n))  # float32 rounding can dip below 0 where nothing changed
    return out


def choose_heads(model: Transformer, calib: "Calibration", init: str, layers: list[int], kv_budget: float,
                 sensitivity_tokens: int = 16384, batch_size: int = 8, device: Optional[str] = None,
                 fits: Optional[dict] = None, progress: bool = True) -> tuple[list[int], dict]:
    """Per-layer stored heads for ``kv_budget`` from measured sensitivity (:func:`layer_sensitivity` on the
    first ``sensitivity_tokens`` of the calibration windows, :func:`allocate_heads`).

    Returns:
        (heads per layer, the allocation's report: budget, heads, per-layer KL per h', the measure).
    """
    cfg = model.config
    total = budget_heads(cfg, kv_budget, layers)
    if calib.windows is None or calib.covariances is None:
        raise ValueError("calib_tokens: kv_budget measures each layer's sensitivity on calibration text; "
                         "give calib_tokens > 0")
    seq_len = calib.windows.shape[1]
    windows = calib.windows[: max(1, sensitivity_tokens // seq_len)]
    current = [cfg.kv_heads_at(i) for i in range(cfg.n_layers)]
    candidates = {l: list(range(1, current[l])) for l in layers}
    fits = {} if fits is None else fits

    def build(l: int, h: int) -> nn.Module:
        key = (l, h, init)
        if key not in fits:
            stats = calib.stats[l] if calib.stats is not None else None
            fits[key] = fit_layer(model.model.layers[l].self_attn, h, init, calib.covariances[l], stats)
        return converted_attention(model, l, h, fits[key])

    home = next(model.parameters()).device
    try:
        kl = layer_sensitivity(model.to(device or home), windows, candidates, build, batch_size, progress)
    finally:
        model.to(home)
    heads = allocate_heads(kl, current, total)
    report = {
        "kv_budget": kv_budget,
        "heads": total,
        "heads_before": sum(current),
        "rounding": "floor(kv_budget x heads before): the cache never exceeds the budget",
        "layer_kv_heads": heads,
        "measure": (f"KL(original || only this layer compressed to h') per token, nats, init {init}, on "
                    f"{windows.numel():,} calibration tokens; the allocation minimizes the summed KL"),
        "sensitivity": {str(l): {str(h): v for h, v in sorted(kl[l].items())} for l in sorted(kl)},
        "predicted_kl": sum(kl.get(l, {}).get(h, 0.0) for l, h in enumerate(heads)),
    }
    return heads, report


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
    matched = any("out_rel_err_after" in r for r in rows)
    head = (f"{'layer':>5} {'heads':>7} {'K err':>8} {'V err':>8} {'K err(W)':>9} {'V err(W)':>9} "
            f"{'attn params':>19} {'KV B/token':>12} {'weak':>4}" + (f" {'out err fit -> matched':>23}" if matched else ""))
    lines = [head, "-" * len(head)]

    def pct(x):
        return f"{100 * x:7.2f}%" if x is not None else f"{'-':>8}"

    for r in rows:
        lines.append(
            f"{r['layer']:>5} {r['kv_heads_before']:>3}->{r['kv_heads_after']:<3} {pct(r['k_rel_err'])} "
            f"{pct(r['v_rel_err'])} {pct(r['k_rel_err_weights']):>9} {pct(r['v_rel_err_weights']):>9} "
            f"{r['attn_params_before']:>9,}->{r['attn_params_after']:<9,} "
            f"{r['kv_bytes_per_token_before']:>5}->{r['kv_bytes_per_token_after']:<6} {len(r.get('weak_heads', [])):>4}"
            + (f" {pct(r['out_rel_err_before']):>11} -> {pct(r['out_rel_err_after']):<8}"
               if matched and "out_rel_err_after" in r else "")
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
def convert(model: str, kv_heads: Optional[int] = None, init: str = "svd", layers: str = "all",
            out: Optional[str] = None, calib_tokens: int = 65536, calib_seq_len: int = 512,
            calib_text: Optional[str] = None, corpus: str = "prose", batch_size: int = 8, overwrite: bool = False,
            device: str = "auto", kv_budget: Optional[float] = None, sensitivity_tokens: int = 16384,
            match_steps: int = 0, match_lr: float = 3e-3, match_mixing_lr_mult: float = 10.0) -> dict:
    """Compress a pretrained model's KV cache to fewer stored heads per layer (MEA virtual heads).

    Each compressed layer stores h' component heads, and every query head reads its own mix of them
    (MEA's head-level linear composition). h' is --kv_heads in every compressed layer, or chosen per
    layer to meet --kv_budget exactly. Writes an HF folder (for `mea evaluate`, `mea pretrain
    --init_from`, transformers) and conversion.json, the per-layer report.

    Args:
        model: HF LLaMA-family folder (MHA or GQA), a folder written by mea's save_hf, a mea
            run/checkpoint directory, or a LLaMA .gguf file.
        kv_heads: h', stored KV heads of each compressed layer (1 <= h' <= the layer's current KV
            heads; need not divide the query heads). Give this or kv_budget.
        init: svd (best rank-h' fit of the projection weights), activation (best fit of the keys and
            values of calibration text), query (best fit of the attention logits and of what o_proj
            reads of the attention output on calibration text), or mean-pool (GQA uptraining: average
            heads in groups).
        layers: layers to compress: all, middle (the middle half), or indices and ranges such as
            4-11 or 0,2,5. The others keep their heads and their function.
        out: output folder (default: converted/<model name>-kv<h'>-<init>, or -budget<percent>-<init>).
        calib_tokens: tokens of calibration text for the activation and query fits, the budget's
            sensitivity and the reported errors (0: none; errors are then reported in weight space only).
        calib_seq_len: tokens per calibration window.
        calib_text: a plain-text file to calibrate on instead of the corpus.
        corpus: corpus whose train split gives the calibration text (a built-in name such as prose,
            or a directory written by `mea prepare-data`); re-tokenized for models with their own
            tokenizer.
        batch_size: calibration windows per forward pass.
        overwrite: replace ``out`` if it exists.
        device: where the calibration forward passes run (auto: cuda when available, else cpu); the
            fits themselves run on the CPU in float64.
        kv_budget: the fraction of all stored KV heads to keep, e.g. 0.5 (rounded down to whole heads);
            each layer's h' is chosen from its measured sensitivity (the KL from the original when only
            that layer is compressed to each smaller h') to meet it exactly with the least summed KL.
        sensitivity_tokens: calibration tokens the budget's sensitivity is measured on.
        match_steps: after the fit, train each compressed layer's k_proj, v_proj and mixing for this
            many steps to reproduce the original layer's attention output on the calibration windows
            (``mea.convert.match``; 0: off). Reported per layer as held-out relative errors.
        match_lr: the matching's learning rate of k_proj and v_proj.
        match_mixing_lr_mult: the mixing matrices' matching learning rate, as a multiple of match_lr (0:
            they stay as fitted, e.g. mean-pool's GQA replication).

    Returns:
        The report (also written to OUT/conversion.json).
    """
    if init not in INITS:
        raise ValueError(f"init: unknown init {init!r}; expected one of {', '.join(INITS)}")
    if (kv_heads is None) == (kv_budget is None):
        raise ValueError("kv_heads: give either kv_heads (h' in every compressed layer) or kv_budget (the fraction of "
                         f"stored heads to keep, h' chosen per layer), {'not both' if kv_heads is not None else 'one of them'}")
    if kv_heads is not None and kv_heads < 1:
        raise ValueError(f"kv_heads: must be >= 1, got {kv_heads}")
    if calib_tokens < 0:
        raise ValueError(f"calib_tokens: must be >= 0, got {calib_tokens}")
    if init in ("activation", "query") and calib_tokens == 0:
        raise ValueError(f"calib_tokens: the {init} init fits calibration text; give calib_tokens > 0")
    if kv_budget is not None and calib_tokens == 0:
        raise ValueError("calib_tokens: kv_budget measures each layer's sensitivity on calibration text; give "
                         "calib_tokens > 0")
    if sensitivity_tokens < 1:
        raise ValueError(f"sensitivity_tokens: must be >= 1, got {sensitivity_tokens}")
    if match_steps < 0:
        raise ValueError(f"match_steps: must be >= 0, got {match_steps}")
    if match_steps and calib_tokens < 2 * calib_seq_len:
        raise ValueError(f"calib_tokens: matching trains on calibration windows and holds some out; give at least "
                         f"2 windows ({2 * calib_seq_len} tokens), got {calib_tokens}")
    if not match_lr > 0:
        raise ValueError(f"match_lr: must be > 0, got {match_lr}")
    if not match_mixing_lr_mult >= 0:
        raise ValueError(f"match_mixing_lr_mult: must be >= 0 (0: the mixing stays as fitted), got {match_mixing_lr_mult}")
    if calib_text is not None and not Path(calib_text).is_file():
        raise FileNotFoundError(f"calib_text: {calib_text} is not a file")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    from ..io.load import check_model_path, load_model, model_config
    from ..runtime import about, output_folder, resolve_device

    with about("model"):
        check_model_path("model", model)
        config = model_config(model)  # (None for a .gguf file: checked once it is imported below)

    def check(cfg) -> None:
        sel = parse_layers(layers, cfg.n_layers)
        check_request(cfg, kv_heads if kv_budget is None else 1, sel)
        if kv_budget is not None:
            budget_heads(cfg, kv_budget, sel)  # an infeasible budget fails before any calibration

    if config is not None:
        check(config)
    size = f"kv{kv_heads}" if kv_heads is not None else f"budget{100 * kv_budget:g}"
    out_dir = Path(out).expanduser() if out else Path("converted") / f"{Path(model).expanduser().resolve().name}-{size}-{init}"
    output_folder("out", out_dir, "convert", overwrite)
    dev = resolve_device("device", device)
    if calib_tokens and calib_text is None:
        from ..data.prepare import check_corpus

        check_corpus("corpus", corpus)

    with about("model"):
        src = load_model(model, dtype=torch.float32)
        tok_dir = source_tokenizer(model)
    sel = parse_layers(layers, src.config.n_layers)
    check(src.config)
    calib = calibrate(src, tok_dir, calib_tokens, calib_seq_len, calib_text, corpus, batch_size, dev,
                      attention=init == "query")
    match = (dict(steps=match_steps, lr=match_lr, mixing_lr_mult=match_mixing_lr_mult, batch_size=batch_size,
                  device=dev) if match_steps else None)
    if kv_budget is None:
        return convert_loaded(src, tok_dir, kv_heads, init, sel, calib, out_dir, source=str(model), overwrite=overwrite,
                              match=match)
    fits: dict = {}
    heads, allocation = choose_heads(src, calib, init, sel, kv_budget, sensitivity_tokens, batch_size, dev, fits)
    return convert_loaded(src, tok_dir, heads, init, "all", calib, out_dir, source=str(model), overwrite=overwrite,
                          allocation=allocation, fits=fits, match=match)


@dataclasses.dataclass
class Calibration:
    """Statistics of a model on some text, reusable across conversions.

    Attributes:
        covariances: per-layer input second moments (None without calibration).
        n_tokens: tokens they were collected on.
        description: what the text was.
        stats: per-layer :class:`AttentionStats` (collected for the query-aware fit), else None.
        windows: the calibration windows (n, L), for measuring a budget's layer sensitivity.
    """

    covariances: Optional[list[Optional[Tensor]]]
    n_tokens: int
    description: str
    stats: Optional[list[Optional[AttentionStats]]] = None
    windows: Optional[Tensor] = None


def calibrate(model: Transformer, tokenizer_dir: Optional[Path], calib_tokens: int, calib_seq_len: int = 512,
              calib_text: Optional[str] = None, corpus: str = "prose", batch_size: int = 8,
              device: Optional[str] = None, attention: bool = False) -> Calibration:
    """Collect the calibration statistics of ``model`` (none when ``calib_tokens`` is 0), running it on
    ``device`` for the purpose (it goes back where it was afterwards); ``attention``: also the
    attention statistics that the query-aware fit needs."""
    if calib_tokens == 0:
        return Calibration(None, 0, "none")
    from .calibration import collect_statistics

    ids = calibration_tokens(tokenizer_dir, model.config.vocab_size, calib_tokens, calib_seq_len, calib_text, corpus)
    home = next(model.parameters()).device
    try:
        covs, stats, n = collect_statistics(model.to(device or home), ids.split(batch_size), attention=attention)
    finally:
        model.to(home)
    return Calibration(covs, n, calib_text or f"corpus {corpus!r}, train split, {calib_seq_len}-token windows",
                       stats if attention else None, ids)


def convert_loaded(src: Transformer, tokenizer_dir: Optional[Path], kv_heads: Union[int, list[int]], init: str,
                   layers: Union[str, list[int]], calib: Calibration, out: Union[str, Path], source: str = "",
                   overwrite: bool = False, allocation: Optional[dict] = None, fits: Optional[dict] = None,
                   match: Optional[dict] = None) -> dict:
    """``convert`` for a model already in memory: compress, write the HF folder and the report.
    ``kv_heads`` as :func:`compress_model` takes it; ``allocation``: a budget's report (:func:`choose_heads`);
    ``match``: keyword arguments of :func:`mea.convert.match.match_attention` (``steps``, ``lr``, ...) to
    train the compressed layers toward the original's attention outputs on the calibration windows."""
    if init == "query" and calib.stats is None:
        raise ValueError("init: 'query' needs the attention statistics of calibration text (calibrate with "
                         "attention=True, calib_tokens > 0)")
    if match and calib.windows is None:
        raise ValueError("match_steps: matching trains on calibration windows; give calib_tokens > 0")
    new, rows = compress_model(src, kv_heads, init, layers, calib.covariances, calib.stats, fits)
    if match:
        from .match import match_attention

        done = {m["layer"]: m for m in match_attention(src, new, calib.windows,
                                                       [r["layer"] for r in rows if r["compressed"]], **match)}
        for r in rows:
            r.update({k: v for k, v in done.get(r["layer"], {}).items() if k != "layer"})
    report = {
        "source": source,
        "kv_heads": kv_heads if isinstance(kv_heads, int) else None,
        "layer_kv_heads": [r["kv_heads_after"] for r in rows],
        "init": init,
        "layers": [r["layer"] for r in rows if r["compressed"]],
        "calib_tokens": calib.n_tokens,
        "calib_text": calib.description,
        "kv_bytes_per_token_before": src.config.kv_cache_bytes_per_token,
        "kv_bytes_per_token_after": new.config.kv_cache_bytes_per_token,
        "cache_fraction": new.config.kv_cache_bytes_per_token / src.config.kv_cache_bytes_per_token,
        "params_before": src.num_params(),
        "params_after": new.num_params(),
        "per_layer": rows,
    }
    if match:
        report["match"] = {k: v for k, v in match.items() if k not in ("device", "batch_size")}
    if allocation is not None:
        report["kv_budget"] = allocation
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

