"""Compression that keeps the model (issue 20): self-generated healing data, KL to the original on
held-out text, paired comparisons on full test sets, and the final study pipeline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_convert import byte_llama_folder, byte_tokenizer_folder, save_run, tiny, tiny_corpus


# ------------------------------------------------------------------------------------ self-generated data
def test_generated_corpus_is_a_prepared_corpus_in_the_models_tokens(tmp_path, monkeypatch):
    """`mea prepare-data --generate_from MODEL --tokens N`: the model's own continuations of corpus prompts,
    as shards with checksums and a manifest in its tokenizer; the same seed gives the same corpus; a run
    stopped part-way continues with the batches it had; pretrain reads it as it is."""
    from mea.convert import self_data
    from mea.data.shards import TokenDataset, read_manifest
    from mea.data.windows import corpus_in_model_tokens

    corpus = tiny_corpus(tmp_path / "corpus")
    llama = byte_llama_folder(tmp_path / "llama")  # 260 output ids, a 257-id tokenizer
    kw = dict(corpus=str(corpus), prompt_len=8, continuation_len=16, batch_size=3, device="cpu", progress=False)
    calls, stop = [], {"at": None}
    real = self_data._Writer.prompts

    def counting(self, *a, **k):  # one call per generated batch
        calls.append(1)
        if len(calls) == stop["at"]:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(self_data._Writer, "prompts", counting)
    out = Path(self_data.generate_corpus(str(llama), 150, out=str(tmp_path / "gen"), **kw))
    batches = len(calls)
    m = read_manifest(out)
    assert m["tokenizer"]["vocab_size"] == 257 and m["tokenizer"]["eos_token_id"] == 256
    assert m["request"]["tokens"] == 150 and m["request"]["temperature"] == 1.0
    assert 150 <= m["splits"]["train"]["tokens"] < 150 + 3 * 25 and m["splits"]["val"]["tokens"] > 0
    g = m["generated"]
    assert g["prompts"] == m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 3 * batches
    assert g["prompt_tokens"] == 8 * g["prompts"]  # every prompt re-encodes to its full length here
    ids = np.concatenate([np.asarray(s) for s in TokenDataset(out, "train").shards])  # checks the sha256 too
    # every document ends in the separator (a prompt may hold one too, where its window crossed a document end)
    assert ids.max() < 257 and ids[-1] == 256 and (ids == 256).sum() >= m["splits"]["train"]["docs"]
    assert corpus_in_model_tokens(str(out), llama) == str(out)  # the model reads it without re-tokenizing

    # Stopped in the third batch: the next call generates only what is missing, and the corpus is the same.
    calls.clear()
    stop["at"] = 3
    with pytest.raises(KeyboardInterrupt):
        self_data.generate_corpus(str(llama), 150, out=str(tmp_path / "again"), **kw)
    assert not (tmp_path / "again").exists() and len(list((tmp_path / ".again.partial").glob("train_*.npz"))) == 2
    calls.clear()
    stop["at"] = None
    self_data.generate_corpus(str(llama), 150, out=str(tmp_path / "again"), **kw)
    assert len(calls) == batches - 2
    for f in out.glob("*.bin"):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()
    assert not (tmp_path / ".again.partial").exists()
    # Asked again: the finished corpus is returned; other settings at the same place are an error.
    assert self_data.generate_corpus(str(llama), 150, out=str(tmp_path / "gen"), **kw) == str(out)
    with pytest.raises(ValueError, match="other settings"):
        self_data.generate_corpus(str(llama), 151, out=str(tmp_path / "gen"), **kw)
    # A damaged shard names the command that writes the corpus again.
    shard = tmp_path / "again" / "train_0000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"mea prepare-data --generate_from {llama.resolve()} --tokens 150"):
        TokenDataset(tmp_path / "again", "train")


def test_prepare_data_command_reaches_both_paths(tmp_path):
    """The `prepare-data` command: without generate_from it is data.prepare's; with it, prompts come from
    --corpus only; a GPT-2 mea model never samples the ids its embedding pads past the tokenizer."""
    from mea.convert.self_data import prepare_data
    from mea.data.shards import TokenDataset

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"Document {i} says something about rivers and fields. " * 8)
    prepared = prepare_data(files=[str(docs)], out=str(tmp_path / "prepared"), val_fraction=0.3)
    assert TokenDataset(prepared, "train").num_tokens > 0
    run = save_run(tiny("mha", n_heads=4, n_kv_heads=4, n_layers=1, d_model=32, vocab_size=50304), tmp_path / "run")
    with torch.no_grad():  # make the padded ids (50257 ..) the likeliest: they must still never be written
        run_model = __import__("mea.io.load", fromlist=["load_model"]).load_model(run)
        run_model.model.embed_tokens.weight[50257:] = 5 * run_model.model.embed_tokens.weight[:47].sign()
    save_run(run_model, tmp_path / "run2")
    out = prepare_data(generate_from=str(tmp_path / "run2"), tokens=60, out=str(tmp_path / "gen"), corpus=prepared,
                       prompt_len=4, continuation_len=12, batch_size=2, device="cpu")
    ds = TokenDataset(out, "train")
    assert max(int(s.max()) for s in ds.shards) <= 50256
    with pytest.raises(ValueError, match="files: with generate_from"):
        prepare_data(generate_from=str(run), tokens=10, files=[str(docs)])
    with pytest.raises(ValueError, match="tokens: generate_from needs"):
        prepare_data(generate_from=str(run))
    with pytest.raises(ValueError, match="tokens: only with generate_from"):
        prepare_data(tokens=10, files=[str(docs)])


def test_a_corpus_with_every_split_is_read_in_the_models_tokens(tmp_path):
    """`mix` in the model's own tokenizer is the same re-tokenization as any corpus: every split (train,
    val and a held-out select split) keeps its documents' text, and pretrain reads the copy."""
    from mea.data.shards import FORMAT, MANIFEST, ShardWriter, TokenDataset
    from mea.data.tokenizer import load_tokenizer
    from mea.data.windows import corpus_in_model_tokens

    gpt2 = load_tokenizer()
    path = tmp_path / "mixlike"
    path.mkdir()
    splits, texts = {}, {}
    for split, n in (("train", 12), ("val", 3), ("select", 3)):
        w = ShardWriter(path, split)
        texts[split] = [f"{split} document {i}: the weather turned, and the ships stayed in port." for i in range(n)]
        for t in texts[split]:
            w.write(gpt2.encode(t) + [gpt2.eos_token_id])
        splits[split] = {"shards": w.close(), "tokens": w.num_tokens}
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "complete": True, "splits": splits,
                                             "tokenizer": {"name": "gpt2", "vocab_size": 50257}}))
    tok_dir = byte_tokenizer_folder(tmp_path / "tok")
    re = corpus_in_model_tokens(str(path), tok_dir, verbose=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for split in ("train", "val", "select"):
        ids = np.concatenate([np.asarray(s) for s in TokenDataset(re, split).shards]).tolist()
        docs = tok.decode(ids, skip_special_tokens=False).split("<|endoftext|>")
        assert docs[:-1] == texts[split] and docs[-1] == ""


# ------------------------------------------------------------------------------------ KL to the original
def test_token_kl_and_window_kl():
    from mea.models.kl import token_kl, window_kl

    p, q = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    want = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(token_kl(p, q), want)
    assert token_kl(p, p).abs().max() < 1e-6
    a, b = tiny("mha", n_heads=4, n_kv_heads=4), tiny("mha", n_heads=4, n_kv_heads=4)
    batches = [torch.randint(0, 97, (2, 9)) for _ in range(2)]
    same = window_kl(a, a, batches)
    assert same.n_tokens == 2 * 2 * 8 and abs(same.mean_kl) < 1e-6 and same.ppl == pytest.approx(same.ppl_original)
    diff = window_kl(a, b, batches)
    assert diff.mean_kl > 1e-4 and diff.ppl != pytest.approx(diff.ppl_original)


def test_heldout_kl_of_a_conversion(tmp_path):
    """KL(original || converted) on held-out windows: 0 for a conversion that keeps every head, positive
    for a compression; different tokenizers are an error."""
    from mea.convert.convert import convert
    from mea.eval.kl import heldout_kl

    corpus = tiny_corpus(tmp_path / "corpus")
    run = save_run(tiny("gqa", n_heads=4, n_kv_heads=2, n_layers=2, d_model=32, vocab_size=50304), tmp_path / "run")
    convert(str(run), 2, init="mean-pool", out=str(tmp_path / "same"), calib_tokens=0)
    convert(str(run), 1, init="mean-pool", out=str(tmp_path / "kv1"), calib_tokens=0)
    kw = dict(corpus=str(corpus), tokens=64, seq_len=16, batch_size=2, device="cpu", progress=False)
    same = heldout_kl(str(run), str(tmp_path / "same"), **kw)
    assert same["n_tokens"] == 64 and abs(same["kl"]) < 1e-5 and same["split"] == "val"
    assert same["ppl"] == pytest.approx(same["ppl_original"], rel=1e-4)
    kv1 = heldout_kl(str(run), str(tmp_path / "kv1"), **kw)
    assert kv1["kl"] > 1e-5 and math.isfinite(kv1["ppl"])
    llama = byte_llama_folder(tmp_path / "llama")
    with pytest.raises(ValueError, match="different tokenizers"):
        heldout_kl(str(run), str(llama), **kw)


# ------------------------------------------------------------------------------------ paired comparisons
def _examples(scores: dict) -> dict:
    return {t: {"doc_id": list(range(len(v))), "acc": v, **({"acc_norm": v} if t != "winogrande" else {})}
            for t, v in scores.items()}


def test_paired_standard_errors():
    from mea.eval.paired import accuracies, paired_delta

    a = _examples({"piqa": [1, 0, 1, 1, 0, 1], "winogrande": [1, 1, 0, 0]})
    b = _examples({"piqa": [1, 1, 1, 0, 0, 1], "winogrande": [1, 1, 0, 1]})
    res = paired_delta(a, b)
    d = np.array([0, 1, 0, -1, 0, 0], dtype=float)
    assert res["tasks"]["piqa"]["delta"] == pytest.approx(d.mean())
    assert res["tasks"]["piqa"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(6))
    assert res["tasks"]["winogrande"]["metric"] == "acc" and res["tasks"]["piqa"]["metric"] == "acc_norm"
    assert res["delta"] == pytest.approx((0 + 0.25) / 2)
    assert res["se"] == pytest.approx(math.hypot(res["tasks"]["piqa"]["se"], res["tasks"]["winogrande"]["se"]) / 2)
    assert accuracies(b) == {"piqa": pytest.approx(4 / 6), "winogrande": 0.75}
    # Identical answers: no difference and no spread, whatever the accuracies' own standard errors.
    assert paired_delta(a, a)["se"] == 0.0
    with pytest.raises(ValueError, match="not the same ones"):
        paired_delta(a, _examples({"piqa": [1, 0, 1], "winogrande": [1, 1, 0, 0]}))
    with pytest.raises(ValueError, match="arc_easy"):
        paired_delta(a, b, tasks=["arc_easy"])


def test_evaluate_keeps_each_examples_score(tmp_path):
    """`mea evaluate --examples true` keeps every scored example (and without a limit scores the whole local
    test set: the task definitions' document counts)."""
    from mea.eval.data import TEST_SETS
    from mea.eval.evaluate import evaluate
    from mea.eval.paired import accuracies
    from mea.io.hf import save_hf

    folder = save_hf(tiny("mha", n_heads=4, n_kv_heads=4, n_layers=1, d_model=32, vocab_size=50304),
                     tmp_path / "hf", tokenizer="gpt2")
    run = evaluate(str(folder), tasks="piqa,winogrande", limit=4, batch_size=4, device="cpu", perplexity=False,
                   examples=True, out=str(tmp_path / "out"))
    ex = run["examples"]
    assert ex["piqa"]["doc_id"] == [0, 1, 2, 3] and "acc_norm" in ex["piqa"] and "acc_norm" not in ex["winogrande"]
    acc = accuracies(ex)
    assert acc["piqa"] == pytest.approx(run["tasks"]["piqa"]["acc_norm"])
    assert acc["winogrande"] == pytest.approx(run["tasks"]["winogrande"]["acc"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["examples"] == json.loads(json.dumps(ex))
    assert {t: n for t, (_, _, n) in TEST_SETS.items()} == {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


# ------------------------------------------------------------------------------------ the final study
def test_results_layout_is_the_issues():
    from mea.study.compression_final import RECORD_FIELDS, TASKS, check_results

    assert TASKS == ("piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
    assert RECORD_FIELDS == ("method", "init", "cache_fraction", "healing_tokens", "objective", "data", "seed",
                             "zero_shot", "examples", "avg", "delta_vs_original", "delta_se", "kl_heldout")
    zs = {t: 0.5 for t in TASKS}
    rec = {"method": "mea", "init": "query", "cache_fraction": 0.5, "healing_tokens": 100, "objective": "distill",
           "data": "mix", "seed": 0, "zero_shot": zs, "examples": {t: 10 for t in TASKS}, "avg": 0.5,
           "delta_vs_original": 0.0, "delta_se": 0.01, "kl_heldout": 0.1}
    good = {"meta": {}, "original": {"zero_shot": zs, "avg": 0.5}, "records": [rec]}
    check_results(good)
    with pytest.raises(ValueError, match="fields"):
        check_results({**good, "records": [{**rec, "ppl": 3.0}]})
    with pytest.raises(ValueError, match="other tasks"):
        check_results({**good, "records": [{**rec, "zero_shot": {"piqa": 0.5}}]})
    with pytest.raises(ValueError, match="top-level"):
        check_results({**good, "extra": 1})


@pytest.mark.slow
def test_compression_final_end_to_end_tiny(tmp_path, monkeypatch):
    """convert -> heal -> evaluate for three kinds of row on a tiny random LLaMA-style model (CPU): a
    query-aware MEA conversion at half the cache by budget, matched to the original's attention outputs,
    distilled, two seeds; GQA at one stored head healed on
    the original's own text with a learning-rate sweep chosen by KL. The results file has the issue's
    layout, GQA's mixing stays GQA's while healing, a second call redoes nothing, and the doc's table is
    built from the file."""
    from mea.convert.heads import layer_mixes
    from mea.io.load import load_model
    from mea.layers.attention import mixing_init
    from mea.study import compression_final as mod

    corpus = tiny_corpus(tmp_path / "corpus")
    src = save_run(tiny("gqa", n_heads=4, n_kv_heads=2, n_layers=2, d_model=32, vocab_size=50304, max_seq_len=64),
                   tmp_path / "llama")
    rows = [
        mod.Row(name="mea-half", method="mea", init="query", kv_budget=0.5, objective="distill",
                data=str(corpus), tokens=64, lr=1e-3, mixing_lr_mult=10.0, seeds=[0, 1], match_steps=4),
        mod.Row(name="gqa-kv1", method="gqa", init="mean-pool", kv_heads=1, objective="lm", data="self", tokens=64,
                lr=[1e-3, 3e-3], seeds=[0]),
        mod.Row(name="gqa-kv1-corpus", method="gqa", kv_heads=1, objective="lm", data=str(corpus), tokens=64,
                lr_from="gqa-kv1"),
    ]
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Results\n\n{mod.TABLE_BEGIN}\nold\n{mod.TABLE_END}\n\nAfter.\n")
    kw = dict(out=str(tmp_path / "study"), results=str(tmp_path / "results.json"), name="tiny", corpus=str(corpus),
              calib_tokens=128, calib_seq_len=16, sensitivity_tokens=32, heal_batch_size=2, heal_seq_len=16,
              self_data_prompt_len=4, self_data_continuation_len=12, self_data_batch_size=2, heldout_tokens=32,
              select_tokens=32, kl_seq_len=16, tasks=["piqa", "winogrande"], limit=2, eval_batch_size=2,
              device="cpu", doc=str(doc))
    res = mod.compression_final(str(src), rows, **kw)
    mod.check_results(res)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    recs = res["records"]
    assert [(r["method"], r["init"], r["seed"], r["data"]) for r in recs] == [
        ("mea", "query+match", 0, str(corpus)), ("mea", "query+match", 1, str(corpus)), ("gqa", "mean-pool", 0, str(corpus)),
        ("gqa", "mean-pool", 0, "self")]
    for r in recs:
        assert r["cache_fraction"] == 0.5 and r["healing_tokens"] == 64 and r["examples"] == {"piqa": 2, "winogrande": 2}
        assert r["avg"] == pytest.approx(sum(r["zero_shot"].values()) / 2)
        assert r["delta_vs_original"] == pytest.approx(r["avg"] - res["original"]["avg"])
        assert r["delta_se"] >= 0 and math.isfinite(r["kl_heldout"]) and r["kl_heldout"] > 0
    meta = res["meta"]
    assert meta["metric"] == {"piqa": "acc_norm", "winogrande": "acc"} and len(meta["details"]) == 4
    assert meta["details"][0]["layer_kv_heads"] == [1, 1] and meta["details"][0]["kv_budget"] == 0.5
    assert meta["details"][0]["match"]["steps"] == 4 and meta["details"][2]["match"] is None
    sweep = meta["sweeps"]["gqa-kv1"]
    assert sweep["split"] == "val" and [r["lr"] for r in sweep["runs"]] == [1e-3, 3e-3]  # no select split here
    chosen = min(sweep["runs"], key=lambda r: r["kl"])["lr"]
    assert sweep["chosen"]["lr"] == chosen == meta["details"][3]["lr"] == meta["details"][2]["lr"]  # and lr_from
    # GQA heals as GQA: its mixing is still the 0/1 replication; MEA's moved.
    gqa = load_model(meta["details"][3]["run"])
    for layer in gqa.model.layers:
        for m in layer_mixes(layer.self_attn):
            assert torch.equal(m, mixing_init(1, 4))
    conv = load_model(meta["details"][0]["conversion"])
    healed = load_model(meta["details"][0]["run"])
    assert not torch.equal(conv.model.layers[0].self_attn.k_mix, healed.model.layers[0].self_attn.k_mix)
    text = doc.read_text()
    assert text.startswith("# Results\n") and text.endswith("\n\nAfter.\n") and "old" not in text
    assert "| tiny | 100% | original |" in text and text.count("| tiny | 50% |") == 4

    # A second call redoes nothing (no conversion, healing or scoring) and writes the same records.
    def refuse(*a, **k):
        raise AssertionError("called again")

    import mea.convert.convert
    import mea.eval.evaluate
    import mea.train.pretrain

    monkeypatch.setattr(mea.train.pretrain, "pretrain", refuse)
    monkeypatch.setattr(mea.eval.evaluate, "evaluate", refuse)
    monkeypatch.setattr(mea.convert.convert, "convert_loaded", refuse)
    again = mod.compression_final(str(src), rows, **kw)
    assert again["records"] == res["records"] and again["meta"]["sweeps"] == res["meta"]["sweeps"]
    # One row's own command keeps the other rows' records in the file.
    assert mod.compression_final(str(src), rows[2:], **kw)["records"] == res["records"]
    with pytest.raises(ValueError, match="lr_from nothing"):
        mod.compression_final(str(src), [mod.Row(name="x", kv_heads=1, objective="lm", lr_from="nothing")], **kw)
    with pytest.raises(ValueError, match="other settings"):
        mod.compression_final(str(src), rows, **{**kw, "heldout_tokens": 64})


def test_compare_inits_reports_kl_before_healing(tmp_path):
    """KL(original || converted) per token on held-out text before healing, per init, from one calibration."""
    from mea.study.compression_final import compare_inits

    corpus = tiny_corpus(tmp_path / "corpus")
    src = save_run(tiny("gqa", n_heads=4, n_kv_heads=2, n_layers=2, d_model=32, vocab_size=50304, max_seq_len=64),
                   tmp_path / "run")
    rows = compare_inits(str(src), kv_budget=0.5, inits=["svd", "query"], out=str(tmp_path / "inits"),
                         corpus=str(corpus), calib_tokens=128, calib_seq_len=16, sensitivity_tokens=32,
                         heldout_tokens=64, kl_seq_len=16, batch_size=4, device="cpu")
    assert [r["init"] for r in rows] == ["svd", "query"]
    for r in rows:
        assert r["cache_fraction"] == 0.5 and sum(r["layer_kv_heads"]) == 2 and r["kl"] > 0 and r["ppl"] > 1
    assert rows[1]["k_logit_rel_err"] is not None and rows[0]["v_out_rel_err"] is not None
    saved = json.loads((tmp_path / "inits" / "inits.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["kv_budget"] == 0.5 and saved["match"] is None
    # With matching: each init twice, the second matched (its attention output error reported, lower).
    rows = compare_inits(str(src), kv_heads=1, inits=["mean-pool"], out=str(tmp_path / "inits_m"),
                         corpus=str(corpus), calib_tokens=128, calib_seq_len=16, heldout_tokens=64, kl_seq_len=16,
                         batch_size=4, device="cpu", match_steps=20, match_lr=3e-3)
    assert [r["init"] for r in rows] == ["mean-pool", "mean-pool+match"]
    assert rows[0]["out_rel_err_after"] is None
    assert rows[1]["out_rel_err_after"] <= rows[1]["out_rel_err_before"]
    assert json.loads((tmp_path / "inits_m" / "inits.json").read_text())["match"]["steps"] == 20


def test_final_study_configs_name_real_options():
    """Every shipped config of the final study parses: the shared files name options of the command, every
    row file's rows are valid rows, and every row file names the shared file it goes with."""
    import inspect

    import yaml

    from mea.study.compression_final import Row, compression_final

    from mea.runtime import SHIPPED_CONFIGS

    root = SHIPPED_CONFIGS / "compression"
    params = set(inspect.signature(compression_final).parameters)
    for base in ("final_smollm2.yaml", "final_own.yaml"):
        conf = yaml.safe_load((root / base).read_text())
        assert set(conf) <= params and "rows" not in conf, base
    rows = sorted((root / "rows").glob("*.yaml"))
    assert len(rows) >= 12
    names = []
    for f in rows:
        text = f.read_text()
        base = "final_own.yaml" if f.name.startswith("own") else "final_smollm2.yaml"
        assert f"--config configs/compression/{base} --config configs/compression/rows/{f.name}" in text
        for r in yaml.safe_load(text)["rows"]:
            row = Row(**r)
            row.check()
            names.append((base, row.name))
            assert row.objective == "distill" or row.name.endswith("-lm")
    assert len(set(names)) == len(names)
    gen = yaml.safe_load((root / "self_smollm2.yaml").read_text())
    assert gen["tokens"] == 100_000_000 and gen["generate_from"]


def test_freeze_mixing_leaves_the_mixing_out_of_the_optimizer():
    """--train.freeze_mixing: the mixing matrices are in no optimizer group (GQA healed as GQA); the others are."""
    from mea.train.config import TrainConfig
    from mea.train.optim import param_groups

    model = tiny("mea", n_heads=4, n_kv_heads=2)
    mixing = {id(p) for n, p in model.named_parameters() if n.endswith(("k_mix", "v_mix"))}
    for mult in (1.0, 10.0):
        groups = param_groups(model, TrainConfig(freeze_mixing=True, mixing_lr_mult=mult))
        held = {id(p) for g in groups for p in g["params"]}
        assert len(groups) == 2 and not held & mixing
        assert held == {id(p) for p in model.parameters()} - mixing
