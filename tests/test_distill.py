"""Distillation healing: mea pretrain --distill_from TEACHER (KL to the teacher plus next-token loss)."""
import json

import pytest
import yaml

from test_train import MICRO, corpus, losses, run  # noqa: F401  (corpus is a fixture)
from mea.train.config import TrainConfig
from mea.train.metrics import read_metrics


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, corpus):
    """Two small trained runs of the same shape: one to start the student from, another to teach it."""
    d = tmp_path_factory.mktemp("teachers")
    run(d / "a", corpus, steps=4, save_every=4)
    run(d / "b", corpus, steps=6, save_every=6, train={"seed": 1})
    return d / "a", d / "b"


def distill(out, corpus, init, teacher, alpha, temperature=2.0, **kw):
    tr = {"distill_alpha": alpha, "distill_temperature": temperature, **kw.pop("train", {})}
    return run(out, corpus, init_from=str(init), distill_from=str(teacher), train=tr, **kw)


def test_the_kl_to_itself_is_zero_and_both_terms_are_logged_and_plotted(tmp_path, corpus, teachers):
    a, _ = teachers
    distill(tmp_path / "self", corpus, a, a, alpha=1.0, steps=3, save_every=3)
    recs = [r for r in read_metrics(tmp_path / "self" / "metrics.jsonl") if "loss" in r]
    assert {"lm_loss", "kl", "tokens_per_s"} <= set(recs[0])
    assert abs(recs[0]["kl"]) < 1e-6 and recs[0]["loss"] == pytest.approx(4.0 * recs[0]["kl"], abs=1e-6)
    assert recs[0]["lm_loss"] > 1.0
    assert (tmp_path / "self" / "loss.png").is_file()
    conf = yaml.safe_load((tmp_path / "self" / "config.yaml").read_text())
    assert conf["distill_from"] == str(a) and conf["train"]["distill_alpha"] == 1.0


def test_alpha_zero_is_plain_training_step_for_step(tmp_path, corpus, teachers):
    a, b = teachers
    run(tmp_path / "plain", corpus, steps=4, init_from=str(a))
    distill(tmp_path / "zero", corpus, a, b, alpha=0.0, steps=4)
    plain, zero = losses(tmp_path / "plain"), losses(tmp_path / "zero")
    assert [s for s, _ in zero] == [1, 2, 3, 4]
    assert [x for _, x in zero] == [x for _, x in plain]
    recs = [r for r in read_metrics(tmp_path / "zero" / "metrics.jsonl") if "loss" in r]
    assert all(r["kl"] > 0 and r["lm_loss"] == r["loss"] for r in recs)


def test_a_distillation_run_resumes_exactly_with_its_teacher(tmp_path, corpus, teachers):
    from mea.train.pretrain import pretrain

    a, b = teachers
    distill(tmp_path / "full", corpus, a, b, alpha=0.5, steps=6, save_every=3)
    cut = distill(tmp_path / "cut", corpus, a, b, alpha=0.5, steps=6, save_every=3, halt_after=4)
    assert cut["status"] == "halted"
    done = pretrain(out=str(tmp_path / "cut"), resume=True, device="cpu", progress=False)
    assert done["status"] == "finished"
    full = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    again = [r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in again] == list(range(1, 7))
    for x, y in zip(full, again):
        for key in ("loss", "lm_loss", "kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    with pytest.raises(ValueError, match="distill_from: given"):
        pretrain(out=str(tmp_path / "cut"), resume=True, distill_from=str(a), device="cpu", progress=False)


def test_a_teacher_of_another_vocabulary_or_tokenizer_is_refused_before_training(tmp_path, corpus):
    pytest.importorskip("transformers")
    from test_convert import byte_llama_folder

    from mea.train.pretrain import pretrain

    llama = byte_llama_folder(tmp_path / "llama")  # 260 ids, its own byte tokenizer
    run(tmp_path / "gpt2", corpus, steps=2, save_every=2)
    with pytest.raises(ValueError, match="^distill_from: .* has a vocabulary of 260 ids, the student 50,304"):
        run(tmp_path / "s1", corpus, steps=2, init_from=str(tmp_path / "gpt2"), distill_from=str(llama))
    # the same number of ids, another tokenizer: a GPT-2 model cut to 260 ids
    with pytest.raises(ValueError, match="^distill_from: .* uses the tokenizer .*llama.*, the student GPT-2 \\(mea\\), "
                                         "and they differ"):
        run(tmp_path / "s2", corpus, steps=2, model={"vocab_size": 260}, distill_from=str(llama))
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    with pytest.raises(ValueError, match="^train.distill_alpha: set, but there is no teacher"):
        pretrain(out=str(tmp_path / "s3"), train=TrainConfig(distill_alpha=0.9), device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="^distill_from: .*nope"):
        run(tmp_path / "s4", corpus, steps=2, distill_from=str(tmp_path / "nope"))
