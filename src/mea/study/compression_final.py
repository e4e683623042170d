"""The final compression study (issue 20): for each row, convert -> heal -> evaluate, and one results file.

A row is one way to compress and heal: a method (``mea``: virtual heads with trainable mixing; ``gqa``:
mean-pooled groups whose mixing stays GQA's 0/1 replication while healing, i.e. GQA uptraining, with
groups of near-equal size where h' does not divide h), an init, a cache size (``kv_heads`` in every
layer, or ``kv_budget``: a fraction of the stored heads, h' chosen per layer from measured
sensitivity), a healing objective (``distill``: KL to the original model, ``mea pretrain
--distill_from``; ``lm``: next-token loss), healing data (a corpus such as ``mix``, or ``self``: text
the original writes itself, ``mea prepare-data --generate_from``), a token budget, learning rates and
seeds. A row whose ``lr`` or ``mixing_lr_mult`` is a list is a sweep: every combination heals once
(first seed, ``sweep_tokens``), the one with the lowest KL to the original on the corpus's
``select`` split is kept (a run that diverged is left out), and the row's seeds heal with it.

Each record is scored on the full local test sets of six zero-shot tasks with every example's score
kept, so that its difference from the original has a paired standard error
(:mod:`mea.eval.paired`), and by its KL to the original per token on held-out text
(:mod:`mea.eval.kl`). The results file has exactly the fields of the issue::

    {"meta": {...}, "original": {"zero_shot": {task: acc}, "avg"},
     "records": [{"method", "init", "cache_fraction", "healing_tokens", "objective", "data", "seed",
                  "zero_shot": {task: acc}, "examples": {task: n}, "avg", "delta_vs_original",
                  "delta_se", "kl_heldout"}]}

(accuracies and averages as fractions; per task acc_norm where the task has it, else acc; KL in
nats per token; everything else about a record, such as its learning rates, per-task differences
and held-out perplexity, under ``meta["details"]`` in the same order).

Everything is kept under ``--out`` as it finishes (conversions, healing runs, scores, records), so a
call that was stopped continues where it was. The results file is rewritten after every record from
every record under ``--out``: one command per headline row (a shared settings file plus that row's
file, ``--config`` twice) adds its records to the same file.

    mea study-compression-final --config configs/compression/final_smollm2.yaml
    python -m mea.study.compression_final table benchmarks/results/compression_final.json
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

TASKS = ("piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
RECORD_FIELDS = ("method", "init", "cache_fraction", "healing_tokens", "objective", "data", "seed", "zero_shot",
                 "examples", "avg", "delta_vs_original", "delta_se", "kl_heldout")
METHODS = ("mea", "gqa")
OBJECTIVES = ("distill", "lm")
SELF_DATA = "self"
TABLE_BEGIN = "<!-- compression_final table: built by mea.study.compression_final from benchmarks/results/ -->"
TABLE_END = "<!-- end of the compression_final table -->"


@dataclass
class Row:
    """One row of the study (one record per seed).

    Args:
        name: a unique label (names its healing runs).
        method: mea (trainable mixing) or gqa (mean-pool init, mixing frozen while healing).
        init: svd, activation, query or mean-pool (gqa: mean-pool).
        kv_heads: h' in every compressed layer; or
        kv_budget: the fraction of stored heads to keep, h' chosen per layer.
        layers: layers to compress (with kv_heads).
        objective: distill (KL to the original, plus (1 - alpha) of the LM loss) or lm.
        data: healing corpus: a name or prepared directory (mix, prose), or self (the original's own text).
        tokens: healing tokens (whole steps of batch x seq_len x grad_accum).
        lr: peak learning rate; a list sweeps it.
        mixing_lr_mult: the mixing's lr multiplier (mea; gqa's frozen mixing is recorded as 0); a list
            sweeps it.
        seeds: healing seeds (data order), one record each.
        sweep_tokens: healing tokens of each sweep run (default: tokens).
        lr_from: take lr and mixing_lr_mult from what this other row's sweep chose (in the same --out):
            a comparison of data or objective at the settings of a headline row.
        match_steps: attention-output matching after the fit (``mea.convert.match``), steps per compressed
            layer (0: none; gqa: k_proj and v_proj only, the mixing stays GQA's); the record's init then
            reads ``<init>+match``.
    """

    name: str
    method: str = "mea"
    init: str = "mean-pool"
    kv_heads: Optional[int] = None
    kv_budget: Optional[float] = None
    layers: str = "all"
    objective: str = "distill"
    data: str = "mix"
    tokens: int = 100_000_000
    lr: Union[float, list[float]] = 1e-4
    mixing_lr_mult: Union[float, list[float]] = 300.0
    seeds: list[int] = field(default_factory=lambda: [0])
    sweep_tokens: Optional[int] = None
    lr_from: Optional[str] = None
    match_steps: int = 0

    def check(self) -> None:
        where = f"rows: {self.name}:"
        if self.method not in METHODS:
            raise ValueError(f"{where} method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "gqa" and self.init != "mean-pool":
            raise ValueError(f"{where} gqa starts from mean-pool (its groups' means), got init {self.init!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{where} objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if (self.kv_heads is None) == (self.kv_budget is None):
            raise ValueError(f"{where} give kv_heads or kv_budget (one of them)")
        if self.kv_budget is not None and self.layers != "all":
            raise ValueError(f"{where} kv_budget chooses the layers' heads itself; leave layers at all")
        if self.tokens < 1 or not self.seeds:
            raise ValueError(f"{where} needs tokens >= 1 and at least one seed")
        for v in _values(self.lr):
            if not v > 0:
                raise ValueError(f"{where} lr must be positive, got {v}")
        if self.match_steps < 0:
            raise ValueError(f"{where} match_steps must be >= 0, got {self.match_steps}")
        if self.lr_from is not None and self.is_sweep():
            raise ValueError(f"{where} lr_from takes another row's choice; give no lr or mixing_lr_mult list")

    def lrs(self) -> list[float]:
        return _values(self.lr)

    def mixing(self) -> list[float]:
        return [0.0] if self.method == "gqa" else _values(self.mixing_lr_mult)

    def is_sweep(self) -> bool:
        return len(self.lrs()) * len(self.mixing()) > 1


def _values(x) -> list[float]:
    return [float(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


def compression_final(model: str, rows: list[Row], out: str = "runs/compression_final",
                      results: str = "benchmarks/results/compression_final.json", name: Optional[str] = None,
                      corpus: str = "mix", calib_tokens: int = 65536, calib_seq_len: int = 512,
                      sensitivity_tokens: int = 16384, heal_batch_size: int = 16, heal_seq_len: int = 512,
                      heal_grad_accum: int = 1, warmup_fraction: float = 0.05, distill_temperature: float = 1.0,
                      distill_alpha: float = 1.0, self_data_tokens: Optional[int] = None,
                      self_data_prompt_len: int = 32, self_data_continuation_len: int = 480,
                      self_data_batch_size: int = 512, heldout_split: str = "val", select_split: str = "select",
                      heldout_tokens: int = 1_048_576, select_tokens: int = 262_144, kl_seq_len: int = 512,
                      tasks: list[str] = list(TASKS), limit: Optional[int] = None, eval_batch_size: int = 32,
                      device: str = "auto", doc: Optional[str] = None, overwrite: bool = False,
                      match_lr: float = 3e-3, match_mixing_lr_mult: float = 10.0) -> dict:
    """Convert, heal and evaluate every row; write the results file (resumable).

    Args:
        model: the original model (an HF LLaMA-family folder, a mea run, a .gguf file).
        rows: the rows (see ``Row``).
        out: working folder: conversions, healing runs, scores.
        results: the results file (rewritten after every record).
        name: the model's name in the results (default: the folder's name).
        corpus: the corpus of calibration text (train split), of the prompts of the self-generated data,
            and of the held-out text (``heldout_split``, ``select_split``).
        calib_tokens: calibration tokens of each conversion.
        calib_seq_len: tokens per calibration window.
        sensitivity_tokens: calibration tokens a budget's per-layer sensitivity is measured on.
        heal_batch_size: sequences per healing micro-batch.
        heal_seq_len: tokens per healing sequence.
        heal_grad_accum: micro-batches per healing step.
        warmup_fraction: linear warmup as a fraction of the healing steps.
        distill_temperature: the distillation temperature (objective distill).
        distill_alpha: the KL term's weight in the distillation loss; the rest is the LM loss.
        self_data_tokens: tokens of self-generated text (default: the most any ``self`` row heals on).
        self_data_prompt_len: prompt tokens of the self-generated text.
        self_data_continuation_len: the most tokens sampled per prompt.
        self_data_batch_size: prompts continued at once.
        heldout_split: the corpus split the reported KL and perplexity are measured on.
        select_split: the split sweeps choose on (``heldout_split`` where the corpus has no such split,
            which the results then say).
        heldout_tokens: predicted tokens of the reported KL.
        select_tokens: predicted tokens of a sweep's KL.
        kl_seq_len: tokens predicted per KL window.
        tasks: the zero-shot tasks.
        limit: examples per task (None: every example the local data has; a limit is for tests only).
        eval_batch_size: sequences per zero-shot forward pass.
        device: auto, cpu, cuda.
        doc: a markdown file whose results table (between the markers) is rebuilt from ``results``.
        overwrite: start OUT afresh even when it holds an earlier study with other settings, or
            something mea study-compression-final did not write.
        match_lr: the learning rate of the attention-output matching of rows with ``match_steps``.
        match_mixing_lr_mult: the mixing matrices' matching learning rate, as a multiple of match_lr.

    Returns:
        The results (as written).
    """
    rows = [r if isinstance(r, Row) else Row(**r) for r in rows]
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"rows: names must be unique, got {names}")
    for r in rows:
        r.check()
    for opt, v, least in (("heal_batch_size", heal_batch_size, 1), ("heal_seq_len", heal_seq_len, 2),
                          ("heal_grad_accum", heal_grad_accum, 1), ("calib_tokens", calib_tokens, 1),
                          ("calib_seq_len", calib_seq_len, 2), ("sensitivity_tokens", sensitivity_tokens, 1),
                          ("heldout_tokens", heldout_tokens, 1), ("select_tokens", select_tokens, 1),
                          ("kl_seq_len", kl_seq_len, 2), ("eval_batch_size", eval_batch_size, 1)):
        if v < least:
            raise ValueError(f"{opt}: must be >= {least}, got {v}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction: must be in [0, 1), got {warmup_fraction}")
    if not distill_temperature > 0:
        raise ValueError(f"distill_temperature: must be > 0, got {distill_temperature}")
    if not match_lr > 0 or not match_mixing_lr_mult > 0:
        raise ValueError(f"match_lr: the learning rate and match_mixing_lr_mult must be > 0, got {match_lr} and "
                         f"{match_mixing_lr_mult}")
    if not 0 <= distill_alpha <= 1:
        raise ValueError(f"distill_alpha: must be in [0, 1], got {distill_alpha}")
    from ..convert.convert import source_tokenizer
    from ..data.prepare import check_corpus
    from ..eval.data import TASKS_REVISION, parse_tasks
    from ..io.load import check_model_path
    from ..runtime import about, empty_folder, holding, output_folder, resolve_device

    tasks = parse_tasks(tasks)
    check_model_path("model", model)
    check_corpus("corpus", corpus)
    dev = resolve_device("device", device)
    out_dir = output_folder("out", out, "study-compression-final", overwrite, own=holding("settings.json"))
    res_file = Path(results).expanduser()
    if res_file.is_dir():
        raise IsADirectoryError(f"results: {res_file} is a folder; give the results file (a .json)")
    if res_file.exists():  # rows add to a results file of this study; anything else there is refused
        try:
            check_results(json.loads(res_file.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise FileExistsError(f"results: {res_file} exists and is not a results file of "
                                  f"mea study-compression-final ({e}); choose another") from e
    if doc is not None:
        if not Path(doc).is_file():
            raise FileNotFoundError(f"doc: {doc} is not a file")
        if TABLE_BEGIN not in Path(doc).read_text() or TABLE_END not in Path(doc).read_text():
            raise ValueError(f"doc: {doc} has no results table markers ({TABLE_BEGIN} ... {TABLE_END})")
    model = str(Path(model).expanduser())
    with about("model"):
        tok_dir = source_tokenizer(model)
    if overwrite and out_dir.exists():
        empty_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": model, "corpus": corpus, "calib_tokens": calib_tokens, "calib_seq_len": calib_seq_len,
        "sensitivity_tokens": sensitivity_tokens, "heal_batch_size": heal_batch_size, "heal_seq_len": heal_seq_len,
        "heal_grad_accum": heal_grad_accum, "warmup_fraction": warmup_fraction,
        "distill_temperature": distill_temperature, "distill_alpha": distill_alpha,
        "self_data": {"prompt_len": self_data_prompt_len, "continuation_len": self_data_continuation_len,
                      "batch_size": self_data_batch_size, "tokens": self_data_tokens},
        "heldout_split": heldout_split, "select_split": select_split, "heldout_tokens": heldout_tokens,
        "select_tokens": select_tokens, "kl_seq_len": kl_seq_len, "tasks": tasks, "limit": limit,
        "tasks_revision": TASKS_REVISION, "match": {"lr": match_lr, "mixing_lr_mult": match_mixing_lr_mult},
    }
    _check_settings(out_dir, settings)
    study = _Study(model, tok_dir, out_dir, settings, dev, eval_batch_size)

    original = study.zero_shot(Path(model), out_dir / "original")
    self_dir = None
    self_rows = [r for r in rows if r.data == SELF_DATA]
    if self_rows:
        self_dir = study.self_data(self_data_tokens or max(max(r.tokens, r.sweep_tokens or 0) for r in self_rows))

    def write() -> dict:
        res = _results(name or Path(model).name, model, settings, original, out_dir)
        _write_json(Path(results), res)
        if doc:
            write_doc_table(doc, [results])
        return res

    for row in rows:
        data = str(self_dir) if row.data == SELF_DATA else row.data
        conv = study.convert(row)
        lr, mix = row.lrs()[0], row.mixing()[0]
        if row.is_sweep():
            lr, mix = study.sweep(row, conv, data)
        elif row.lr_from is not None:
            lr, mix = study.chosen(row.lr_from)
            mix = 0.0 if row.method == "gqa" else mix
        for seed in row.seeds:
            run = study.heal(row, conv, data, lr, mix, seed, row.tokens)
            if _status(run) != "finished":
                raise RuntimeError(f"rows: {row.name}: healing {run} did not finish ({_status(run)}); see its "
                                   "status.json and metrics")
            scores = study.zero_shot(run, out_dir / "eval" / run.name)
            kl = study.kl(run, heldout_split, heldout_tokens)
            rec, detail = _record(row, conv, run, scores, original, kl, lr, mix, seed, study.tokens(row.tokens))
            _write_json(out_dir / "records" / f"{row.name}-s{seed}.json", {"record": rec, "detail": detail})
            write()
    return write()


class _Study:
    """The stages of :func:`compression_final`, each kept on disk under ``out`` once finished."""

    def __init__(self, model: str, tok_dir, out: Path, settings: dict, device: str, eval_batch_size: int):
        self.model, self.tok_dir, self.out, self.s, self.device = model, tok_dir, out, settings, device
        self.eval_batch_size = eval_batch_size
        self._src = None
        self._calib = None

    # ---------------------------------------------------------------- data
    def self_data(self, tokens: int) -> Path:
        from ..convert.self_data import generate_corpus

        sd = self.s["self_data"]
        return Path(generate_corpus(self.model, tokens, out=str(self.out / "self_data"), corpus=self.s["corpus"],
                                    prompt_len=sd["prompt_len"], continuation_len=sd["continuation_len"],
                                    batch_size=sd["batch_size"], device=self.device))

    def tokens(self, tokens: int) -> tuple[int, int]:
        """(steps, healing tokens) of a token budget: whole steps, at least one."""
        per_step = self.s["heal_batch_size"] * self.s["heal_seq_len"] * self.s["heal_grad_accum"]
        steps = max(1, round(tokens / per_step))
        return steps, steps * per_step

    # ---------------------------------------------------------------- convert
    def _source(self):
        if self._src is None:
            from ..io.load import load_model

            self._src = load_model(self.model, dtype=torch.float32)
        return self._src

    def _calibration(self):
        if self._calib is None:
            from ..convert.convert import calibrate

            self._calib = calibrate(self._source(), self.tok_dir, self.s["calib_tokens"], self.s["calib_seq_len"],
                                    corpus=self.s["corpus"], device=self.device, attention=True)
        return self._calib

    def convert(self, row: Row) -> Path:
        """The converted model of ``row`` (one per init and cache size, shared by rows)."""
        from ..convert.convert import REPORT_FILE, choose_heads, convert_loaded, parse_layers

        size = f"kv{row.kv_heads}" if row.kv_heads is not None else f"budget{100 * row.kv_budget:g}"
        layers = "" if row.layers == "all" else "-layers" + row.layers.replace(",", "_")
        matched = f"-match{row.match_steps}{'-frozen' if row.method == 'gqa' else ''}" if row.match_steps else ""
        path = self.out / "convert" / f"{row.init}-{size}{layers}{matched}"
        if (path / REPORT_FILE).is_file() and (path / "config.json").is_file():
            return path
        src, calib = self._source(), self._calibration()
        sel = parse_layers(row.layers, src.config.n_layers)
        match = None
        if row.match_steps:
            match = dict(steps=row.match_steps, lr=self.s["match"]["lr"], device=self.device,
                         mixing_lr_mult=0.0 if row.method == "gqa" else self.s["match"]["mixing_lr_mult"])
        if row.kv_heads is not None:
            convert_loaded(src, self.tok_dir, row.kv_heads, row.init, sel, calib, path, source=self.model,
                           overwrite=True, match=match)
        else:
            fits: dict = {}
            heads, allocation = choose_heads(src, calib, row.init, sel, row.kv_budget, self.s["sensitivity_tokens"],
                                             device=self.device, fits=fits)
            convert_loaded(src, self.tok_dir, heads, row.init, "all", calib, path, source=self.model, overwrite=True,
                           allocation=allocation, fits=fits, match=match)
        return path

    # ---------------------------------------------------------------- heal
    def heal(self, row: Row, conv: Path, data: str, lr: float, mix: float, seed: int, tokens: int) -> Path:
        """A healing run of ``conv`` that finished or diverged (resumed if an earlier call left it unfinished)."""
        from ..train.config import DataConfig, TrainConfig
        from ..train.pretrain import pretrain

        steps, n_tokens = self.tokens(tokens)
        run = self.out / "heal" / f"{row.name}-lr{lr:g}-mix{mix:g}-t{n_tokens}-s{seed}"
        spec = {"conversion": str(conv), "objective": row.objective, "data": row.data, "method": row.method,
                "lr": lr, "mixing_lr_mult": mix, "seed": seed, "steps": steps, "tokens": n_tokens}
        saved = run.with_name(run.name + ".row.json")  # beside the run: its folder is mea pretrain's
        if saved.is_file() and json.loads(saved.read_text()) != spec:
            raise ValueError(f"rows: {row.name}: {run} was healed with other settings ({saved.read_text().strip()}); "
                             "rename the row or delete the run")
        if _status(run) in ("finished", "diverged"):
            return run
        # gqa: the mixing stays GQA's replication (mix is 0, the label of a frozen mixing)
        frozen = row.method == "gqa"
        train = dict(max_steps=steps, batch_size=self.s["heal_batch_size"], grad_accum=self.s["heal_grad_accum"],
                     lr=lr, mixing_lr_mult=1.0 if frozen else mix, freeze_mixing=frozen,
                     warmup_steps=max(1, round(self.s["warmup_fraction"] * steps)),
                     seed=seed, log_every=max(1, steps // 100), eval_every=steps, eval_batches=8,
                     save_every=max(1, steps // 4), keep_checkpoints=1)
        extra = {}
        if row.objective == "distill":
            train.update(distill_temperature=self.s["distill_temperature"], distill_alpha=self.s["distill_alpha"])
            extra["distill_from"] = self.model
        run.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(spec, indent=2))
        pretrain(out=str(run), init_from=str(conv), data=DataConfig(corpus=data, seq_len=self.s["heal_seq_len"]),
                 train=TrainConfig(**train), resume=(run / "config.yaml").is_file(), device=self.device,
                 progress=True, **extra)
        return run

    def sweep(self, row: Row, conv: Path, data: str) -> tuple[float, float]:
        """Heal every (lr, mixing lr) of ``row`` once (first seed, ``sweep_tokens``) and keep the one with the
        lowest KL to the original on the select split."""
        split = self.select_split()
        runs = []
        for lr in row.lrs():
            for mix in row.mixing():
                run = self.heal(row, conv, data, lr, mix, row.seeds[0], row.sweep_tokens or row.tokens)
                # a run that diverged is out of the running (too high a rate), not the end of the sweep
                kl = self.kl(run, split, self.s["select_tokens"])["kl"] if _status(run) == "finished" else None
                runs.append({"lr": lr, "mixing_lr_mult": mix, "run": str(run), "status": _status(run), "kl": kl})
        done = [r for r in runs if r["kl"] is not None]
        if not done:
            raise RuntimeError(f"rows: {row.name}: every run of the sweep diverged ({[r['run'] for r in runs]})")
        best = min(done, key=lambda r: r["kl"])
        _write_json(self.out / "sweeps" / f"{row.name}.json", {
            "split": split, "tokens": self.tokens(row.sweep_tokens or row.tokens)[1], "seed": row.seeds[0],
            "runs": runs, "chosen": {"lr": best["lr"], "mixing_lr_mult": best["mixing_lr_mult"]}})
        return best["lr"], best["mixing_lr_mult"]

    def chosen(self, name: str) -> tuple[float, float]:
        """(lr, mixing lr multiplier) that row ``name``'s sweep chose."""
        f = self.out / "sweeps" / f"{name}.json"
        if not f.is_file():
            raise ValueError(f"rows: lr_from {name}: that row's sweep has not run in {self.out}; run it first")
        c = json.loads(f.read_text())["chosen"]
        return c["lr"], c["mixing_lr_mult"]

    def select_split(self) -> str:
        from ..data.prepare import corpus_dir
        from ..data.shards import read_manifest

        splits = read_manifest(corpus_dir(self.s["corpus"]))["splits"]
        return self.s["select_split"] if self.s["select_split"] in splits else self.s["heldout_split"]

    # ---------------------------------------------------------------- evaluate
    def zero_shot(self, model: Path, out: Path) -> dict:
        """`mea evaluate` with every example's score, kept in ``out/results.json``."""
        from ..eval.evaluate import evaluate

        f = out / "results.json"
        if f.is_file():
            res = json.loads(f.read_text())
            s = res.get("settings", {})
            if s.get("tasks") == self.s["tasks"] and s.get("limit") == self.s["limit"] and "examples" in res:
                return res
        return evaluate(str(model), tasks=",".join(self.s["tasks"]), limit=self.s["limit"],
                        batch_size=self.eval_batch_size, device=self.device, perplexity=False, out=str(out),
                        examples=True, name=model.name)

    def kl(self, run: Path, split: str, tokens: int) -> dict:
        """KL(original || run) and both perplexities on ``tokens`` of ``split``, kept in ``run/kl_<split>.json``."""
        from ..eval.kl import heldout_kl

        f = run / f"kl_{split}.json"
        want = {"corpus": self.s["corpus"], "split": split, "tokens": tokens, "seq_len": self.s["kl_seq_len"]}
        if f.is_file():
            res = json.loads(f.read_text())
            if res.get("asked") == want:
                return res
        res = heldout_kl(self.model, str(run), corpus=self.s["corpus"], split=split, tokens=tokens,
                         seq_len=self.s["kl_seq_len"], device=self.device)
        res["asked"] = want
        _write_json(f, res)
        return res


def _status(run: Path) -> Optional[str]:
    f = run / "status.json"
    return json.loads(f.read_text()).get("status") if f.is_file() else None


def _record(row: Row, conv: Path, run: Path, scores: dict, original: dict, kl: dict, lr: float, mix: float, seed: int,
            steps_tokens: tuple[int, int]) -> tuple[dict, dict]:
    from ..eval.paired import accuracies, paired_delta

    tasks = list(original["settings"]["tasks"])
    acc = accuracies(scores["examples"], tasks)
    orig = accuracies(original["examples"], tasks)
    paired = paired_delta(original["examples"], scores["examples"], tasks)
    report = json.loads((conv / "conversion.json").read_text())
    avg = sum(acc.values()) / len(acc)
    rec = {
        "method": row.method, "init": row.init + ("+match" if row.match_steps else ""),
        "cache_fraction": report["cache_fraction"],
        "healing_tokens": steps_tokens[1], "objective": row.objective, "data": row.data, "seed": seed,
        "zero_shot": acc, "examples": {t: len(scores["examples"][t]["doc_id"]) for t in tasks}, "avg": avg,
        "delta_vs_original": avg - sum(orig.values()) / len(orig), "delta_se": paired["se"], "kl_heldout": kl["kl"],
    }
    detail = {
        "row": row.name, "lr": lr, "mixing_lr_mult": mix, "steps": steps_tokens[0], "match": report.get("match"),
        "kv_heads": report["kv_heads"], "layer_kv_heads": report["layer_kv_heads"],
        "kv_budget": (report.get("kv_budget") or {}).get("kv_budget"),
        "ppl_heldout": kl["ppl"], "ppl_original_heldout": kl["ppl_original"], "heldout_tokens": kl["n_tokens"],
        "delta_per_task": {t: {"delta": r["delta"], "se": r["se"], "metric": r["metric"]}
                           for t, r in paired["tasks"].items()},
        "conversion": str(conv), "run": str(run),
    }
    return rec, detail


def _results(name: str, model: str, settings: dict, original: dict, out_dir: Path) -> dict:
    """The results file from every record and sweep finished under ``out_dir`` (by any call: each headline
    row's own command adds its records), ordered by cache fraction (largest first), method (mea, gqa),
    init, objective, data, tokens, row and seed."""
    from ..eval.paired import accuracies, task_metric

    saved = [json.loads(f.read_text()) for f in sorted((out_dir / "records").glob("*.json"))]
    saved.sort(key=lambda x: (-x["record"]["cache_fraction"], METHODS.index(x["record"]["method"]), x["record"]["init"],
                              x["record"]["objective"], x["record"]["data"], x["record"]["healing_tokens"],
                              x["detail"]["row"], x["record"]["seed"]))
    sweeps = {f.stem: json.loads(f.read_text()) for f in sorted((out_dir / "sweeps").glob("*.json"))}

    tasks = list(original["settings"]["tasks"])
    orig = accuracies(original["examples"], tasks)
    meta = {
        "model": name, "source": model, "tasks": tasks,
        "metric": {t: task_metric(original["examples"][t]) for t in tasks},
        "units": "accuracies, averages and deltas as fractions (0-1); delta_se: paired standard error of the "
                 "six-task average's difference from the original; kl_heldout: KL(original || model) in nats per "
                 "token on held-out text",
        "heldout": {"corpus": settings["corpus"], "split": settings["heldout_split"],
                    "tokens": settings["heldout_tokens"], "seq_len": settings["kl_seq_len"]},
        "original_examples": {t: len(original["examples"][t]["doc_id"]) for t in tasks},
        "settings": settings,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "details": [x["detail"] for x in saved],
        "sweeps": sweeps,
    }
    return {"meta": meta, "original": {"zero_shot": orig, "avg": sum(orig.values()) / len(orig)},
            "records": [x["record"] for x in saved]}


def _check_settings(out_dir: Path, settings: dict) -> None:
    f = out_dir / "settings.json"
    if f.is_file():
        saved = json.loads(f.read_text())
        if saved != json.loads(json.dumps(settings)):
            raise ValueError(f"out: {out_dir} holds a study made with other settings; choose another, or pass "
                             "--overwrite true to start it afresh")
    else:
        _write_json(f, settings)


def _write_json(path: Path, obj) -> None:
    from ..runtime import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- the table
def check_results(res: dict) -> None:
    """Raise ValueError unless ``res`` has the layout of the issue (exact record fields, the six task keys)."""
    if set(res) != {"meta", "original", "records"}:
        raise ValueError(f"results: top-level keys must be meta, original, records; got {sorted(res)}")
    if set(res["original"]) != {"zero_shot", "avg"}:
        raise ValueError(f"results: original must hold zero_shot and avg; got {sorted(res['original'])}")
    tasks = set(res["original"]["zero_shot"])
    for i, r in enumerate(res["records"]):
        if tuple(r) != RECORD_FIELDS:
            raise ValueError(f"results: record {i} has fields {list(r)}, expected {list(RECORD_FIELDS)}")
        if set(r["zero_shot"]) != tasks or set(r["examples"]) != tasks:
            raise ValueError(f"results: record {i} scores other tasks than the original")


def results_table(paths: list[str]) -> str:
    """One markdown table of the results files ``paths``: the original, then every record, with the
    average, its difference from the original with 2 paired standard errors, and the held-out KL."""
    head = ["model", "cache", "method", "init", "objective", "data", "tokens", "seed", "avg", "Δ vs original (± 2 SE)",
            "KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in paths:
        f = Path(p)
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        check_results(res)
        name = res["meta"]["model"]
        lines.append(f"| {name} | 100% | original | - | - | - | - | - | {100 * res['original']['avg']:.1f} | - | - |")
        for r in res["records"]:
            lines.append(
                f"| {name} | {100 * r['cache_fraction']:.0f}% | {r['method']} | {r['init']} | {r['objective']} | "
                f"{r['data']} | {_tokens(r['healing_tokens'])} | {r['seed']} | {100 * r['avg']:.1f} | "
                f"{100 * r['delta_vs_original']:+.1f} ± {200 * r['delta_se']:.1f} | {r['kl_heldout']:.3f} |")
    if len(lines) == 2:
        lines.append("| (no results yet) |" + " |" * (len(head) - 1))
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def write_doc_table(doc: str, paths: list[str]) -> str:
    """Rebuild the table between the markers of ``doc`` from the results files ``paths``."""
    f = Path(doc)
    text = f.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"doc: {doc} has no results table markers ({TABLE_BEGIN} ... {TABLE_END})")
    a, rest = text.split(TABLE_BEGIN, 1)
    _, b = rest.split(TABLE_END, 1)
    table = results_table(paths)
    f.write_text(f"{a}{TABLE_BEGIN}\n{table}\n{TABLE_END}{b}")
    return table


def table(results: list[str] = ["benchmarks/results/compression_final.json",
                                "benchmarks/results/compression_final_own.json"],
          doc: Optional[str] = None) -> str:
    """Print the results table of the results files (and rebuild it in ``doc`` between its markers).

    Args:
        results: results files written by compression_final.
        doc: a markdown file to update (e.g. docs/compression.md).
    """
    out = write_doc_table(doc, results) if doc else results_table(results)
    print(out)
    return out


# ---------------------------------------------------------------------------------------- inits before healing
def compare_inits(model: str, kv_heads: Optional[int] = None, kv_budget: Optional[float] = None,
                  inits: list[str] = ["svd", "activation", "mean-pool", "query"], layers: str = "all",
                  out: str = "runs/compression_inits", corpus: str = "prose", calib_tokens: int = 65536,
                  calib_seq_len: int = 512, sensitivity_tokens: int = 16384, heldout_split: str = "val",
                  heldout_tokens: int = 65536, kl_seq_len: int = 512, batch_size: int = 8,
                  device: str = "auto", match_steps: int = 0, match_lr: float = 3e-3,
                  match_mixing_lr_mult: float = 10.0) -> list[dict]:
    """KL(original || converted) per token on held-out text before any healing, for each init.

    One calibration (with the attention statistics) serves every init. Writes OUT/inits.json and prints
    a table: init, cache fraction, the compressed layers' mean relative errors of keys and values
    (activation objective), of the logits and of what o_proj reads (query objective), KL, perplexity.

    Args:
        model: the original model.
        kv_heads: h' in every compressed layer; or
        kv_budget: the fraction of stored heads to keep (each init gets its own allocation).
        inits: the inits to compare.
        layers: layers to compress (with kv_heads).
        out: where the converted models and inits.json go.
        corpus: calibration text (train split) and held-out text (``heldout_split``).
        calib_tokens: calibration tokens.
        calib_seq_len: tokens per calibration window.
        sensitivity_tokens: calibration tokens of a budget's sensitivity.
        heldout_split: the split the KL is measured on.
        heldout_tokens: predicted tokens of the KL.
        kl_seq_len: tokens predicted per window.
        batch_size: windows per forward pass.
        device: auto, cpu, cuda.
        match_steps: also each init followed by attention-output matching (``mea.convert.match``) for
            this many steps per layer, as the row ``<init>+match`` (0: not).
        match_lr: the matching's learning rate.
        match_mixing_lr_mult: the mixing's matching learning rate as a multiple of match_lr.
    """
    from ..convert.convert import (calibrate, check_request, choose_heads, convert_loaded, parse_layers,
                                   source_tokenizer)
    from ..eval.kl import heldout_kl
    from ..io.load import load_model

    if (kv_heads is None) == (kv_budget is None):
        raise ValueError("kv_heads: give kv_heads or kv_budget (one of them)")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    src, tok_dir = load_model(model, dtype=torch.float32), source_tokenizer(model)
    sel = parse_layers(layers, src.config.n_layers)
    check_request(src.config, kv_heads or 1, sel)
    calib = calibrate(src, tok_dir, calib_tokens, calib_seq_len, corpus=corpus, batch_size=batch_size, device=dev,
                      attention=True)
    out_dir = Path(out).expanduser()
    rows = []
    match = dict(steps=match_steps, lr=match_lr, mixing_lr_mult=match_mixing_lr_mult, batch_size=batch_size,
                 device=dev)
    runs = [(init, m) for init in inits for m in ((None, match) if match_steps else (None,))]
    fits: dict = {}
    for init, m in runs:
        label = init + ("+match" if m else "")
        path = out_dir / label
        if kv_heads is not None:
            report = convert_loaded(src, tok_dir, kv_heads, init, sel, calib, path, source=model, overwrite=True,
                                    fits=fits, match=m)
        else:
            heads, allocation = choose_heads(src, calib, init, sel, kv_budget, sensitivity_tokens, batch_size, dev, fits)
            report = convert_loaded(src, tok_dir, heads, init, "all", calib, path, source=model, overwrite=True,
                                    allocation=allocation, fits=fits, match=m)
        kl = heldout_kl(src, load_model(path, dtype=torch.float32), corpus=corpus, split=heldout_split,
                        tokens=heldout_tokens, seq_len=kl_seq_len, batch_size=batch_size, device=dev,
                        tokenizer_dir=tok_dir)
        comp = [r for r in report["per_layer"] if r["compressed"]]

        def mean(key):
            vals = [r[key] for r in comp if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        rows.append({"init": label, "cache_fraction": report["cache_fraction"],
                     "layer_kv_heads": report["layer_kv_heads"], "k_rel_err": mean("k_rel_err"),
                     "v_rel_err": mean("v_rel_err"), "k_logit_rel_err": mean("k_logit_rel_err"),
                     "v_out_rel_err": mean("v_out_rel_err"), "out_rel_err_before": mean("out_rel_err_before"),
                     "out_rel_err_after": mean("out_rel_err_after"), "kl": kl["kl"], "ppl": kl["ppl"],
                     "ppl_original": kl["ppl_original"], "heldout_tokens": kl["n_tokens"]})
        _write_json(out_dir / "inits.json", {"model": model, "kv_heads": kv_heads, "kv_budget": kv_budget,
                                             "layers": layers, "corpus": corpus, "split": heldout_split,
                                             "calib_tokens": calib.n_tokens,
                                             "match": {k: match[k] for k in ("steps", "lr", "mixing_lr_mult")}
                                             if match_steps else None, "rows": rows})
    print(inits_table(rows))
    return rows


def inits_table(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| init | cache | K err | V err | logit err | o_proj err | attention output err | KL (nats/token) | ppl |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out = "-"
        if r.get("out_rel_err_after") is not None:
            out = f"{pct(r['out_rel_err_before'])} -> {pct(r['out_rel_err_after'])}"
        lines.append(f"| {r['init']} | {100 * r['cache_fraction']:.0f}% | {pct(r['k_rel_err'])} | {pct(r['v_rel_err'])} | "
                     f"{pct(r['k_logit_rel_err'])} | {pct(r['v_out_rel_err'])} | {out} | {r['kl']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI({"run": compression_final, "table": table, "inits": compare_inits}, args=sys.argv[1:], as_positional=True)
