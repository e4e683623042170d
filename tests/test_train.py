"""Training loop: exact resume, kill-safety, divergence handling, schedules, sweeps, config errors."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mea.train.config import DataConfig, TrainConfig, lr_at
from mea.train.metrics import read_metrics

MICRO = {"d_model": 32, "n_layers": 2, "n_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real-text corpus: docstrings of the Python standard library, one file per module."""
    import importlib
    import inspect

    from mea.data.prepare import prepare_data

    src = tmp_path_factory.mktemp("text")
    for mod in ["argparse", "collections", "csv", "datetime", "decimal", "difflib", "doctest", "fractions",
                "functools", "heapq", "inspect", "json", "logging", "pickle", "random", "re", "shutil",
                "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile",
                "statistics", "pathlib", "itertools", "contextlib", "dataclasses", "enum", "abc", "codecs"]:
        m = importlib.import_module(mod)
        docs = [inspect.getdoc(m) or ""]
        docs += [inspect.getdoc(obj) or "" for name, obj in vars(m).items()
                 if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))]
        (src / f"{mod}.txt").write_text("\n\n".join(d for d in docs if d))
    out = tmp_path_factory.mktemp("prepared") / "stdlib"
    return prepare_data(files=[str(src)], out=str(out), val_fraction=0.1)


def run(out, corpus, steps=8, **kw):
    from mea.train.pretrain import pretrain

    tk = dict(max_steps=steps, batch_size=2, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4, eval_batches=2,
              save_every=kw.pop("save_every", 4))
    tk.update(kw.pop("train", {}))
    train = TrainConfig(**tk)
    seq_len = kw.pop("data_seq_len", 32)
    return pretrain(out=str(out), preset="tiny", model=dict(MICRO, **kw.pop("model", {})),
                    data=DataConfig(corpus=str(corpus), seq_len=seq_len), train=train, device="cpu", progress=False, **kw)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_run_directory_layout(tmp_path, corpus):
    s = run(tmp_path / "r", corpus, attention="mea", n_kv_heads=1)
    r = tmp_path / "r"
    assert s["status"] == "finished" and math.isfinite(s["val_loss"])
    for f in ["config.yaml", "metrics.jsonl", "loss.png", "status.json", "checkpoints/latest"]:
        assert (r / f).exists(), f
    recs = read_metrics(r / "metrics.jsonl")
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(recs[0])
    assert any("val_loss" in x for x in recs)
    assert recs[-1]["tokens"] == 8 * 2 * 32
    from mea.io import load_model

    m = load_model(r)
    assert m.config.attention == "mea" and m.config.n_kv_heads == 1
    # a second run into the same directory must not clobber it
    with pytest.raises(FileExistsError, match="--resume"):
        run(r, corpus)


def test_saved_config_retrains_the_same_variant(tmp_path, corpus):
    """`mea pretrain --config RUN/config.yaml` builds the run's model, not the command's default (mea)."""
    import yaml

    from mea.train.pretrain import resolve_model_config

    run(tmp_path / "r", corpus, steps=2, attention="mha")
    conf = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert conf["attention"] == "mha"
    cfg = resolve_model_config(conf["preset"], conf["attention"], conf["n_kv_heads"], conf["head_norm"], conf["model"],
                               conf["data"]["seq_len"])
    assert cfg.attention == "mha" and cfg.n_kv_heads == cfg.n_heads and not cfg.head_norm
    r = subprocess.run([sys.executable, "-m", "mea.cli", "pretrain", "--config", str(tmp_path / "r" / "config.yaml"),
                        "--print_config"], capture_output=True, text=True)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["attention"] == "mha"


def test_model_fields_from_the_command_line_are_typed():
    """`--model.d_model 64 --model.head_norm_init 0.1` arrives as text; the config reads it as the
    field's type, and a value of the wrong type or an unknown field is still a clear error."""
    import yaml

    from mea.train.pretrain import resolve_model_config

    r = subprocess.run([sys.executable, "-m", "mea.cli", "pretrain", "--model.d_model", "64", "--model.head_norm_init",
                        "0.1", "--model.tie_embeddings", "false", "--print_config"], capture_output=True, text=True)
    model = yaml.safe_load(r.stdout)["model"]
    cfg = resolve_model_config("tiny", "mea", None, None, model, 64)
    assert (cfg.d_model, cfg.head_norm_init, cfg.tie_embeddings) == (64, 0.1, False)
    with pytest.raises(ValueError, match="d_model: expected int"):
        resolve_model_config("tiny", "mea", None, None, {"d_model": "wide"}, 64)
    with pytest.raises(ValueError, match="dmodel: not a ModelConfig field"):
        resolve_model_config("tiny", "mea", None, None, {"dmodel": "64"}, 64)


@pytest.mark.parametrize("mixing_lr_mult", [1.0, 10.0])
def test_resume_matches_uninterrupted_run_step_for_step(tmp_path, corpus, mixing_lr_mult):
    train = {"mixing_lr_mult": mixing_lr_mult}
    run(tmp_path / "full", corpus, attention="mea", n_kv_heads=1, save_every=3, train=train)
    halted = run(tmp_path / "cut", corpus, attention="mea", n_kv_heads=1, save_every=3, halt_after=5, train=train)
    assert halted["status"] == "halted"
    ckpt = tmp_path / "cut" / "checkpoints" / "step_0000003" / "trainer.pt"
    state = torch.load(ckpt, weights_only=False)
    assert [g["lr_mult"] for g in state["optimizer"]["param_groups"]] == [1.0, 1.0] + ([mixing_lr_mult] if mixing_lr_mult != 1 else [])
    if mixing_lr_mult == 1:  # a checkpoint from before lr_mult existed (no such key in its groups) resumes the same
        for g in state["optimizer"]["param_groups"]:
            del g["lr_mult"]
        torch.save(state, ckpt)
    # the halted run logged steps 4-5 past its last checkpoint (3): resume drops and redoes them
    from mea.train.pretrain import pretrain

    s = pretrain(out=str(tmp_path / "cut"), resume=True, device="cpu", progress=False)
    assert s["status"] == "finished"
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [x[0] for x in b] == list(range(1, 9))
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-6, abs=1e-6)


def test_killed_process_resumes_exactly(tmp_path, corpus):
    """SIGKILL a real training process mid-run, then resume: no finished step is lost or changed."""
    ref = tmp_path / "ref"
    run(ref, corpus, steps=12, save_every=2)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "mea.cli", "pretrain", f"--out={out}", "--preset=tiny",
            f"--model={json.dumps(MICRO)}", f"--data.corpus={corpus}", "--data.seq_len=32",
            "--train.max_steps=12", "--train.batch_size=2", "--train.lr=3e-3", "--train.warmup_steps=2",
            "--train.log_every=1", "--train.eval_every=4", "--train.eval_batches=2", "--train.save_every=2",
            "--device=cpu", "--progress=false"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = out / "checkpoints" / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_0000004":
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "status.json").exists():
        pytest.skip("the run finished before it could be killed")
    subprocess.run(args + ["--resume=true"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = losses(ref), losses(out)
    assert [x[0] for x in b] == list(range(1, 13))
    assert [x[1] for x in a] == pytest.approx([x[1] for x in b], rel=1e-6)


def test_resuming_a_finished_run_rewrites_its_status(tmp_path, corpus):
    """A run killed between its last checkpoint and status.json (or listed twice in a sweep) is resumed
    at max_steps: it trains nothing and reports the step count and validation loss it finished with."""
    from mea.train.pretrain import pretrain

    first = run(tmp_path / "f", corpus, steps=8)
    (tmp_path / "f" / "status.json").unlink()
    again = pretrain(out=str(tmp_path / "f"), resume=True, device="cpu", progress=False)
    assert again["status"] == "finished" and again["step"] == 8 and again["val_loss"] == first["val_loss"]
    assert json.loads((tmp_path / "f" / "status.json").read_text())["step"] == 8


def test_resume_refuses_other_settings_and_outlives_its_init_weights(tmp_path, corpus, monkeypatch):
    """What a resumed run trains is its saved config: a different setting given with --resume is an
    error that names it. A run started --init_from other weights resumes from its own checkpoint once
    those weights are gone."""
    import shutil

    from mea.train.pretrain import pretrain

    run(tmp_path / "src", corpus, steps=4)
    cut = run(tmp_path / "cont", corpus, steps=8, save_every=4, halt_after=4, init_from=str(tmp_path / "src"))
    assert cut["status"] == "halted"
    with pytest.raises(ValueError, match="train.max_steps: given 12, the run has 8"):
        pretrain(out=str(tmp_path / "cont"), resume=True, train=TrainConfig(max_steps=12, warmup_steps=2), device="cpu",
                 progress=False)
    with pytest.raises(ValueError, match="preset: given 'small'"):
        pretrain(out=str(tmp_path / "cont"), resume=True, preset="small", device="cpu", progress=False)
    shutil.rmtree(tmp_path / "src")
    # how it runs may change: an explicit --parallel wins over the saved one (and an explicit false --compile
    # over a saved true, which the old `compile or saved` could not express)
    import mea.train.pretrain as P

    seen = []
    real_wrap = P.D.wrap
    monkeypatch.setattr(P.D, "wrap", lambda net, info, parallel, device: seen.append(parallel) or real_wrap(
        net, info, parallel, device))
    done = pretrain(out=str(tmp_path / "cont"), resume=True, parallel="fsdp", device="cpu", progress=False)
    assert done["status"] == "finished" and done["step"] == 8 and seen == ["fsdp"]


def test_resume_on_other_rank_counts_keeps_the_global_batch():
    from mea.train.distributed import DistInfo
    from mea.train.pretrain import _same_global_batch

    train = TrainConfig(batch_size=4, grad_accum=1)
    assert _same_global_batch(train, {"world_size": 2, "grad_accum": 1}, DistInfo()).grad_accum == 2
    assert _same_global_batch(train, {"world_size": 1, "grad_accum": 4}, DistInfo(world_size=2)).grad_accum == 2
    assert _same_global_batch(train, {}, DistInfo(world_size=2)) is train  # a checkpoint from before: as saved
    with pytest.raises(ValueError, match="cannot split that evenly"):
        _same_global_batch(train, {"world_size": 2, "grad_accum": 1}, DistInfo(world_size=3))


def test_a_validation_split_too_short_fails_before_training(tmp_path, corpus):
    with pytest.raises(ValueError, match="validation split .* shorter than one window"):
        run(tmp_path / "v", corpus, model={"max_seq_len": 8192}, steps=4, data_seq_len=4096)
    assert not (tmp_path / "v" / "checkpoints").exists()


def test_a_non_finite_gradient_stops_the_run_before_the_update(tmp_path, corpus, monkeypatch):
    """A finite loss with an overflowing backward: the step is not applied, and no checkpoint holds NaNs."""
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def overflowing(params, max_norm, *a, **k):
        calls["n"] += 1
        params = list(params)
        if calls["n"] == 4:
            params[0].grad.view(-1)[0] = float("inf")
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing)
    s = run(tmp_path / "g", corpus, steps=8, save_every=4, train={"grad_clip": 1.0})
    assert s["status"] == "diverged" and "gradient norm" in s["reason"] and s["step"] == 3
    from mea.io.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "g") is None  # step 4 was never applied, so never saved


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    s = run(tmp_path / "d", corpus, steps=40, save_every=2, train={"lr": 50.0, "warmup_steps": 0, "grad_clip": 0.0,
                                                                   "diverge_loss": 12.0})
    assert s["status"] == "diverged", s
    recs = read_metrics(tmp_path / "d" / "metrics.jsonl")
    assert recs[-1]["event"] == "diverged" and "reason" in recs[-1]
    assert json.loads((tmp_path / "d" / "status.json").read_text())["status"] == "diverged"
    from mea.io import load_model
    from mea.io.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "d")
    if ckpt is not None:  # the checkpoint kept is from before the blow-up and loads cleanly
        state = json.loads((ckpt / "state.json").read_text())
        assert state["step"] < recs[-1]["step"]
        m = load_model(ckpt)
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_nan_loss_is_reported(tmp_path, corpus, monkeypatch):
    import mea.models.transformer as T

    real = T.linear_cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):  # the training loss (validation goes through window_loss)
        calls["n"] += 1
        out = real(*a, **k)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(T, "linear_cross_entropy", poisoned)
    s = run(tmp_path / "n", corpus, steps=6)
    assert s["status"] == "diverged" and "not finite" in s["reason"]


def test_corrupt_checkpoint_gives_clear_error(tmp_path, corpus):
    run(tmp_path / "c", corpus, steps=4)
    from mea.io import load_model
    from mea.io.checkpoint import CheckpointError, latest_checkpoint

    f = latest_checkpoint(tmp_path / "c") / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no such run"):
        load_model(tmp_path / "nope")



def test_damaged_checkpoints_are_errors_not_models(tmp_path, corpus):
    """Garbled bytes of the same length (no safetensors error), missing tensors (with tied embeddings
    the resume used to load non-strictly and go on with fresh layers), and damaged trainer or state
    files: each is a CheckpointError that says so, for load_model and for --resume."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mea.io import load_model
    from mea.io.checkpoint import CheckpointError, latest_checkpoint
    from mea.train.pretrain import pretrain

    run(tmp_path / "c", corpus, steps=4, save_every=2, halt_after=2)
    ckpt = latest_checkpoint(tmp_path / "c")
    shutil.copytree(ckpt, tmp_path / "good")
    f = ckpt / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-4096:] = bytes(4096)
    f.write_bytes(bytes(raw))
    for load in (lambda: load_model(tmp_path / "c"),
                 lambda: pretrain(out=str(tmp_path / "c"), resume=True, device="cpu", progress=False)):
        with pytest.raises(CheckpointError, match="do not match the sha256"):
            load()
    state = load_file(str(tmp_path / "good" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, str(f), metadata={"format": "pt"})
    (ckpt / "state.json").write_text(json.dumps({k: v for k, v in json.loads((ckpt / "state.json").read_text()).items()
                                                 if k != "model_sha256"}))  # an old checkpoint: no hash
    with pytest.raises(CheckpointError, match="missing"):
        pretrain(out=str(tmp_path / "c"), resume=True, device="cpu", progress=False)
    shutil.copy(tmp_path / "good" / "model.safetensors", f)
    (ckpt / "trainer.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="trainer.pt: cannot be read"):
        pretrain(out=str(tmp_path / "c"), resume=True, device="cpu", progress=False)


def test_pruning_orders_checkpoints_by_step():
    """step_10000000 sorts before step_9999999 by name: pruning by name deleted the checkpoint just written."""
    import tempfile

    from mea.models.config import ModelConfig
    from mea.io.checkpoint import latest_checkpoint, save_checkpoint

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2)
    with tempfile.TemporaryDirectory() as d:
        for step in (9_999_998, 9_999_999, 10_000_000):
            save_checkpoint(d, step, {"w": torch.zeros(2)}, cfg, {}, {"step": step, "tokens": 0}, keep=2)
        assert latest_checkpoint(d).name == "step_10000000"
        assert sorted(p.name for p in (Path(d) / "checkpoints").glob("step_*")) == ["step_10000000", "step_9999999"]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] == pytest.approx(0.1, abs=0.02)
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[80] < 1.0


def test_weight_decay_groups():
    from mea import ModelConfig, Transformer
    from mea.train.optim import param_groups

    m = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, attention="mea", n_kv_heads=1))
    decay, no_decay = param_groups(m, TrainConfig())
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "model.layers.0.self_attn.k_mix" in nd and "model.norm.weight" in nd
    assert "model.layers.0.self_attn.head_norm.weight" in nd
    assert "model.layers.0.self_attn.q_proj.weight" in {names[id(p)] for p in decay["params"]}
    d2, nd2 = param_groups(m, TrainConfig(decay_mixing=True))
    assert "model.layers.0.self_attn.k_mix" in {names[id(p)] for p in d2["params"]}


def test_mixing_lr_mult_groups():
    from mea import ModelConfig, Transformer
    from mea.train.optim import param_groups

    for attention, mixing in [("mea", {"k_mix", "v_mix"}), ("talking_heads", {"pre_mix", "post_mix"})]:
        m = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, attention=attention,
                                    **({"n_kv_heads": 1} if attention == "mea" else {})))
        names = {id(p): n for n, p in m.named_parameters()}
        want = {n for n in names.values() if n.split(".")[-1] in mixing}
        assert len(want) == 4
        for decay_mixing in (False, True):
            groups = param_groups(m, TrainConfig(mixing_lr_mult=10.0, decay_mixing=decay_mixing, weight_decay=0.1))
            assert len(groups) == 3 and [g["lr_mult"] for g in groups] == [1.0, 1.0, 10.0]
            assert {names[id(p)] for p in groups[2]["params"]} == want
            assert groups[2]["weight_decay"] == (0.1 if decay_mixing else 0.0)
            assert not want & {names[id(p)] for g in groups[:2] for p in g["params"]}
            assert sum(len(g["params"]) for g in groups) == len(names)
        # multiplier 1: the two groups as before (earlier checkpoints' optimizer states load)
        groups = param_groups(m, TrainConfig())
        assert len(groups) == 2 and [g["lr_mult"] for g in groups] == [1.0, 1.0]
        assert want <= {names[id(p)] for p in groups[1]["params"]}
    # a model without mixing gets no empty third group
    mha = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, attention="mha"))
    assert len(param_groups(mha, TrainConfig(mixing_lr_mult=10.0))) == 2


def _record_training(monkeypatch):
    """Patch build_optimizer: keep the model's initial parameters and every step's group lrs."""
    import mea.train.optim as optim

    rec = {"init": None, "lrs": []}
    build = optim.build_optimizer

    def build_and_record(model, cfg, device_type):
        rec["init"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build(model, cfg, device_type)
        step = opt.step

        def recording_step(*a, **k):
            rec["lrs"].append([(g["lr"], g["lr_mult"]) for g in opt.param_groups])
            return step(*a, **k)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(optim, "build_optimizer", build_and_record)
    return rec


def test_mixing_lr_mult_scales_the_scheduled_lr(tmp_path, corpus, monkeypatch):
    rec = _record_training(monkeypatch)
    run(tmp_path / "r", corpus, steps=3, attention="mea", n_kv_heads=1, save_every=3,
        train={"mixing_lr_mult": 10.0, "warmup_steps": 2})
    cfg = TrainConfig(max_steps=3, lr=3e-3, warmup_steps=2, mixing_lr_mult=10.0)
    assert len(rec["lrs"]) == 3
    for step, groups in enumerate(rec["lrs"]):
        assert [m for _, m in groups] == [1.0, 1.0, 10.0]
        assert groups[0][0] == groups[1][0] == pytest.approx(lr_at(step, cfg))
        assert groups[2][0] == pytest.approx(lr_at(step, cfg) * 10.0)


def test_mixing_lr_mult_moves_the_mixing_further(tmp_path, corpus, monkeypatch):
    from mea.io import load_model

    moved = {}
    for mult in (1.0, 100.0):
        rec = _record_training(monkeypatch)
        out = tmp_path / f"m{mult:g}"
        run(out, corpus, steps=2, attention="mea", n_kv_heads=1, save_every=2,
            train={"mixing_lr_mult": mult, "lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0})
        final = dict(load_model(out).named_parameters())
        moved[mult] = {n: float((final[n].detach() - p).abs().max()) for n, p in rec["init"].items()}
    assert rec["init"]["model.layers.0.self_attn.k_mix"].shape == (1, 2)
    for n in moved[1.0]:
        if n.split(".")[-1] in ("k_mix", "v_mix"):
            # Adam: about lr per step (2e-4 in all) against 100x that
            assert moved[100.0][n] > 50 * moved[1.0][n] and moved[1.0][n] < 5e-4, (n, moved[1.0][n], moved[100.0][n])
        else:  # the rest trains at the same lr (same seed, same data): it moves alike
            assert moved[100.0][n] < 3 * moved[1.0][n] + 1e-6, n


def test_sweep_bookkeeping(tmp_path, corpus):
    from mea.train.sweep import parse_variant, sweep

    assert parse_variant("mea:head_norm=false,n_kv_heads=2") == {"attention": "mea", "head_norm": False, "n_kv_heads": 2}
    with pytest.raises(ValueError, match="unknown attention"):
        parse_variant("flash")
    train = TrainConfig(max_steps=4, batch_size=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
                        save_every=4, diverge_loss=11.5, grad_clip=0.0)
    csv_path = sweep(out=str(tmp_path / "sw"), variants=["mha", "mea:head_norm=false"], lrs=[1e-3, 80.0],
                     preset="tiny", model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32), train=train,
                     device="cpu")
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 4
    assert {r["variant"] for r in rows} == {"mha", "mea:head_norm=false"}
    ok = [r for r in rows if float(r["lr"]) == 1e-3]
    assert all(r["status"] == "finished" and float(r["final_val_loss"]) > 0 for r in ok)
    assert (tmp_path / "sw" / "loss_vs_lr.png").exists() and (tmp_path / "sw" / "curves_best_lr.png").exists()
    # re-running the sweep reuses finished runs
    before = os.path.getmtime(Path(ok[0]["run_dir"]) / "status.json")
    sweep(out=str(tmp_path / "sw"), variants=["mha", "mea:head_norm=false"], lrs=[1e-3, 80.0], preset="tiny",
          model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32), train=train, device="cpu")
    assert os.path.getmtime(Path(ok[0]["run_dir"]) / "status.json") == before
    # an unreadable status.json (a kill while it was written, before it was atomic) makes that run resume,
    # which finds it finished: same status and loss, and no error naming no file
    status_file = Path(ok[0]["run_dir"]) / "status.json"
    status = json.loads(status_file.read_text())
    status_file.write_text("")
    sweep(out=str(tmp_path / "sw"), variants=["mha", "mea:head_norm=false"], lrs=[1e-3, 80.0], preset="tiny",
          model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32), train=train, device="cpu")
    again = json.loads(status_file.read_text())
    assert again["status"] == "finished" and again["step"] == 4 and again["val_loss"] == status["val_loss"]
    # the same sweep folder with other settings: its finished runs are not the runs asked for
    with pytest.raises(ValueError, match="finished with other settings .*train.max_steps"):
        sweep(out=str(tmp_path / "sw"), variants=["mha", "mea:head_norm=false"], lrs=[1e-3, 80.0], preset="tiny",
              model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32),
              train=dataclasses.replace(train, max_steps=5), device="cpu")
    # a grid point listed twice is one run
    sweep(out=str(tmp_path / "dup"), variants=["mha"], lrs=[1e-3], seeds=[0, 0], preset="tiny", model=MICRO,
          data=DataConfig(corpus=str(corpus), seq_len=32), train=train, device="cpu")
    assert len(list(csv.DictReader(open(tmp_path / "dup" / "results.csv")))) == 1


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="train.schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="train.max_steps"):
        TrainConfig(max_steps=0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="train.mixing_lr_mult"):
            TrainConfig(mixing_lr_mult=bad)
    for key, bad in (("eval_batches", 0), ("keep_checkpoints", 0), ("decay_fraction", 1.5), ("decay_fraction", 0.0),
                     ("diverge_loss", -1.0)):
        with pytest.raises(ValueError, match=f"train.{key}"):
            TrainConfig(**{key: bad})
    for bad in (["pretrain", "--train.nope=1"], ["pretrain", "--train.lr=fast"]):
        r = subprocess.run([sys.executable, "-m", "mea.cli", *bad], capture_output=True, text=True)
        assert r.returncode != 0
        assert "nope" in r.stderr or "lr" in r.stderr
    # bad input raised by a command (not the parser) is one line too, with the traceback behind MEA_DEBUG=1
    for bad, said in ((["export-hf", str(tmp_path / "nothing"), str(tmp_path / "out")], "run_dir: "),
                      (["info", "--n_kv_heads", "0"], "n_kv_heads: must satisfy")):
        r = subprocess.run([sys.executable, "-m", "mea.cli", *bad], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith(f"mea: error: {said}") and r.stderr.count("\n") == 1
        assert "Traceback" not in r.stderr
    from mea.train.pretrain import resolve_model_config

    # --model may name the variant (the --attention default used to override it silently); both disagreeing is an error
    assert resolve_model_config("tiny", None, None, None, {"attention": "mha"}, 32).attention == "mha"
    assert resolve_model_config("tiny", None, None, None, None, 32).attention == "mea"
    with pytest.raises(ValueError, match="^attention: --attention 'mea' and --model.attention 'mha' disagree"):
        resolve_model_config("tiny", "mea", None, None, {"attention": "mha"}, 32)
    # a GQA preset asked for a variant that stores every head drops its stored-head count
    from mea.models.config import ModelConfig

    smol = ModelConfig.from_preset("smollm2-135m", attention="mha")
    assert smol.n_kv_heads == smol.n_heads == 9
    assert ModelConfig.from_preset("smollm2-135m").n_kv_heads == 3
    with pytest.raises(ValueError, match="^bogus:"):
        resolve_model_config("tiny", None, None, None, {"bogus": 1}, 32)
    with pytest.raises(ValueError, match="^d_model:"):
        resolve_model_config("tiny", None, None, None, {"d_model": "wide"}, 32)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process_with_accumulation(tmp_path, corpus, parallel):
    """2 ranks x batch 2 see exactly the samples of 1 process x batch 2 x 2 micro-batches, so the
    losses agree; with FSDP a halted run also resumes exactly (gloo on CPU). One evaluation batch, so
    one rank has none of its own: DDP's forward broadcasts buffers, and uneven numbers of evaluation
    forwards once hung the ranks in mismatched collectives."""
    one = tmp_path / "one"
    run(one, corpus, steps=6, save_every=3, train={"grad_accum": 2})
    args = ["--preset=tiny", f"--model={json.dumps(MICRO)}", f"--data.corpus={corpus}", "--data.seq_len=32",
            "--train.max_steps=6", "--train.batch_size=2", "--train.lr=3e-3", "--train.warmup_steps=2",
            "--train.log_every=1", "--train.eval_every=4", "--train.eval_batches=1", "--train.save_every=3",
            "--device=cpu", "--progress=false", f"--parallel={parallel}"]
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "mea.cli", "pretrain", f"--out={two}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(torchrun + args + ["--halt_after=4"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(torchrun + ["--resume=true", "--device=cpu", "--progress=false"], check=True, env=env,
                   capture_output=True, timeout=300)
    a, b = losses(one), losses(two)
    assert [s for s, _ in b] == list(range(1, 7))
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)


def test_sweep_lrs_from_links_best_runs(tmp_path, corpus):
    """The convergence sweep trains each variant at the best rate of an earlier sweep, reusing its runs."""
    import csv

    from mea.train.sweep import sweep

    train = TrainConfig(max_steps=3, batch_size=2, warmup_steps=1, log_every=1, eval_every=3, eval_batches=1,
                        save_every=3, grad_clip=0.0)
    common = dict(preset="tiny", model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32), train=train, device="cpu")
    sweep(out=str(tmp_path / "lr"), variants=["mha"], lrs=[1e-3, 3e-3], **common)
    rows = list(csv.DictReader(open(tmp_path / "lr" / "results.csv")))
    best = min(rows, key=lambda r: float(r["final_val_loss"]))
    sweep(out=str(tmp_path / "conv"), variants=["mha"], lrs=[], seeds=[0, 1], lrs_from=str(tmp_path / "lr"), **common)
    conv = list(csv.DictReader(open(tmp_path / "conv" / "results.csv")))
    assert {float(r["lr"]) for r in conv} == {float(best["lr"])}
    assert [r["status"] for r in conv] == ["finished", "finished"]
    seed0 = next(r for r in conv if r["seed"] == "0")
    assert Path(seed0["run_dir"]).is_symlink()  # linked from the learning-rate sweep, not retrained
    assert Path(seed0["run_dir"]).resolve() == Path(best["run_dir"]).resolve()
    # a convergence sweep with another budget trains its own runs instead of linking those of 3 steps
    longer = dict(common, train=dataclasses.replace(train, max_steps=4, eval_every=4, save_every=4))
    sweep(out=str(tmp_path / "conv4"), variants=["mha"], lrs=[], seeds=[0], lrs_from=str(tmp_path / "lr"), **longer)
    conv4 = list(csv.DictReader(open(tmp_path / "conv4" / "results.csv")))
    assert not Path(conv4[0]["run_dir"]).is_symlink() and conv4[0]["steps"] == "4"
    with pytest.raises(ValueError, match="share the run directory"):
        sweep(out=str(tmp_path / "y"), variants=["mha"], lrs=[6.3e-3, 6.301e-3], **common)
    with pytest.raises(FileNotFoundError, match="lrs_from"):
        sweep(out=str(tmp_path / "x"), variants=["mha"], lrs=[], lrs_from=str(tmp_path / "nope"), **common)
    # a deadline already passed starts nothing, and says so in the results
    sweep(out=str(tmp_path / "late"), variants=["mha"], lrs=[1e-3], deadline_s=1e-9, **common)
    late = list(csv.DictReader(open(tmp_path / "late" / "results.csv")))
    assert late[0]["status"] == "missing"


def test_run_on_gpus_queues_jobs_on_slots(tmp_path):
    """Jobs share slots (a GPU id listed twice runs two at once), each sees only its GPU, exit codes
    come back by name, and nothing starts after the deadline."""
    import time

    from mea.procs import Job, run_on_gpus

    code = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(int(sys.argv[1]))"
    jobs = [Job(f"j{i}", [sys.executable, "-c", code, str(i % 2)], tmp_path / f"j{i}.log") for i in range(4)]
    codes = run_on_gpus(jobs, [3, 3], poll_s=0.05)
    assert codes == {"j0": 0, "j1": 1, "j2": 0, "j3": 1}
    assert all((tmp_path / f"j{i}.log").read_text().strip() == "3" for i in range(4))
    assert run_on_gpus(jobs, [0], deadline=time.time() - 1) == {}
    with pytest.raises(ValueError, match="slots"):
        run_on_gpus(jobs, [])



def test_run_on_gpus_takes_its_jobs_down_with_it(tmp_path):
    """A parent killed with SIGTERM stops its running jobs instead of leaving them writing run folders."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import sys
from pathlib import Path
from mea.procs import Job, run_on_gpus
child = "import os, time; open({str(tmp_path / 'pid')!r} + str(os.getpid()), 'w').close(); time.sleep(60)"
run_on_gpus([Job(f"j{{i}}", [sys.executable, "-c", child], Path({str(tmp_path)!r}) / f"j{{i}}.log") for i in range(2)],
            [0, 1], poll_s=0.05)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(tmp_path.glob("pid*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    pids = [int(p.name[3:]) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2
    parent.terminate()
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive = not Path(f"/proc/{pid}/status").read_text().count("State:\tZ")
        except ProcessLookupError:
            alive = False
        assert not alive, f"job {pid} outlived its parent"


def test_sweep_in_subprocesses_on_slots(tmp_path, corpus):
    """--gpus runs each grid point as a `mea pretrain` subprocess (here two sharing 'GPU 0', which on
    a machine without CUDA trains on the CPU); the results are the same bookkeeping."""
    import csv

    from mea.train.sweep import sweep

    train = TrainConfig(max_steps=2, batch_size=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
                        save_every=2, grad_clip=0.0)
    sweep(out=str(tmp_path / "sw"), variants=["mha"], lrs=[1e-3, 3e-3], preset="tiny", model=MICRO,
          data=DataConfig(corpus=str(corpus), seq_len=32), train=train, gpus=[0], procs_per_gpu=2)
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all((Path(r["run_dir"]) / "stdout.log").is_file() for r in rows)


def test_peak_flops_matches_the_most_specific_device_name(monkeypatch):
    """"L4" is in "L40S" and "H100" in "H100 PCIe": the longest key wins, or MFU is off 1.2-3x."""
    import mea.train.pretrain as P

    for name, peak in (("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("Tesla T4", None)):
        monkeypatch.setattr(P.torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert P.peak_flops("cuda") == peak, name
    assert P.peak_flops("cpu") is None


def _main_first_rank(rank, world, log, port):
    import torch.distributed as dist

    from mea.train.distributed import DistInfo, main_first

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with main_first(DistInfo(rank, world, local_rank=rank % 2)):  # two "nodes" of two ranks: 0, 2 lead them
            with open(log, "a") as f:
                f.write(f"{rank}\n")
            time.sleep(0.3)
    finally:
        dist.destroy_process_group()


def test_main_first_fills_a_cache_on_rank_0_then_on_each_nodes_first_rank(tmp_path):
    """A cache on node-local disk must be prepared on every node: rank 0 goes first, then the other
    nodes' local rank 0 (finding a shared cache done, or filling their own), then everyone else."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "order"
    mp.spawn(_main_first_rank, args=(4, str(log), port), nprocs=4)
    order = [int(x) for x in log.read_text().split()]
    assert order[:2] == [0, 2] and sorted(order[2:]) == [1, 3]
