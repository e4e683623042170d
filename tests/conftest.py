import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA (CI), at tiny sizes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ a tiny corpus and run, made once
TINY_MODEL = '{"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64}'
TINY_TEXT = ("The river runs past the old mill, where the miller keeps his records of every sack of grain. "
             "In spring the water rises and the wheel turns faster; in summer the children swim below it. ")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A corpus of a few small text files, prepared once through the command line (`mea prepare-data --files`)."""
    from mea.cli import main

    src = tmp_path_factory.mktemp("tiny_text")
    for i in range(8):
        (src / f"doc{i}.txt").write_text(f"Story {i}. " + TINY_TEXT * (6 + i))
    out = tmp_path_factory.mktemp("tiny_corpus") / "corpus"
    main(["prepare-data", "--files", f"[{src}]", "--out", str(out), "--val_fraction", "0.25"])
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_corpus):
    """A micro MEA model (h' = 1 of 2 heads) trained for 4 steps on ``tiny_corpus``: a run directory
    with one checkpoint, made once through the command line (`mea pretrain`)."""
    from mea.cli import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    main(["pretrain", "--out", str(out), "--preset", "tiny", "--model", TINY_MODEL, "--data.corpus", str(tiny_corpus),
          "--data.seq_len", "16", "--train.max_steps", "4", "--train.batch_size", "2", "--train.warmup_steps", "1",
          "--train.log_every", "2", "--train.eval_every", "4", "--train.eval_batches", "1", "--train.save_every", "4",
          "--device", "cpu", "--progress", "false"])
    return out
