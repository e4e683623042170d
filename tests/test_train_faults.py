"""What a user meets when a run goes wrong (issue 19's trainer items): a run killed before its first
checkpoint is not replaced silently, divergence before any save says so, status.json names only files
that exist, a damaged `latest` says how to resume from an earlier step (--resume_from), and warmup
longer than the run is a config error."""
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mea.train.config import TrainConfig
from test_train import MICRO, corpus, losses, run  # noqa: F401  (corpus is a fixture)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mea.cli", *args], capture_output=True, text=True, timeout=300)


def one_error_line(r):
    """The CLI's answer to bad input: exit 2, one `mea: error:` line (and the MEA_DEBUG hint)."""
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("mea: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errors[0]


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pretrain_args(out, corpus, *more):
    return ["pretrain", f"--out={out}", "--preset=tiny", f"--model={json.dumps(MICRO)}", f"--data.corpus={corpus}",
            "--data.seq_len=32", "--train.batch_size=2", "--train.warmup_steps=2", "--train.log_every=1",
            "--train.eval_batches=1", "--device=cpu", "--progress=false", *more]


def test_a_run_killed_before_its_first_checkpoint_is_not_replaced_silently(tmp_path, corpus):
    out = tmp_path / "r"
    args = pretrain_args(out, corpus, "--train.max_steps=300", "--train.save_every=300", "--train.eval_every=300")
    proc = subprocess.Popen([sys.executable, "-m", "mea.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    before = digest(out)
    line = one_error_line(cli(*args))
    assert str(out) in line and "no checkpoint" in line and "--overwrite true" in line and "--resume true" in line
    assert digest(out) == before  # nothing touched
    # told to, it replaces the run; the files of other programs in the folder stay
    (out / "notes.txt").write_text("mine")
    short = pretrain_args(out, corpus, "--train.max_steps=2", "--train.save_every=2", "--train.eval_every=2",
                          "--overwrite=true")
    r = cli(*short)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, _ in losses(out)] == [1, 2] and (out / "notes.txt").read_text() == "mine"
    assert "overwrite" in one_error_line(cli(*short, "--resume=true"))


def test_divergence_before_the_first_save_says_no_checkpoint_was_saved(tmp_path, corpus, capsys):
    s = run(tmp_path / "d", corpus, steps=40, save_every=40, train={"lr": 50.0, "warmup_steps": 0, "grad_clip": 0.0,
                                                                    "diverge_loss": 12.0, "eval_every": 40})
    assert s["status"] == "diverged"
    err = capsys.readouterr().err
    said = next(line for line in err.splitlines() if line.startswith("run diverged"))
    assert "no checkpoint was saved" in said and "checkpoints" not in said
    assert not (tmp_path / "d" / "checkpoints").exists()
    status = json.loads((tmp_path / "d" / "status.json").read_text())
    assert status["checkpoint"] is None
    _names_only_existing_files(status)


def _names_only_existing_files(status: dict) -> None:
    for key in ("loss_png", "checkpoint", "out"):
        if status.get(key) is not None:
            assert Path(status[key]).exists(), (key, status[key])


def test_status_json_names_only_files_that_exist(tmp_path, corpus):
    """Halted before any evaluation (no loss.png yet), finished, and diverged after a save."""
    halted = run(tmp_path / "h", corpus, steps=8, save_every=2, halt_after=2)
    status = json.loads((tmp_path / "h" / "status.json").read_text())
    assert halted["status"] == "halted" and "loss_png" not in status and not (tmp_path / "h" / "loss.png").exists()
    assert status["checkpoint"].endswith("step_0000002")
    _names_only_existing_files(status)
    run(tmp_path / "f", corpus, steps=4)
    status = json.loads((tmp_path / "f" / "status.json").read_text())
    assert status["loss_png"] and status["checkpoint"].endswith("step_0000004")
    _names_only_existing_files(status)


def test_a_damaged_latest_says_how_to_resume_from_an_earlier_step(tmp_path, corpus):
    from mea.io.checkpoint import CheckpointError
    from mea.train.pretrain import pretrain

    out = tmp_path / "r"
    run(out, corpus, steps=30, save_every=10, train={"keep_checkpoints": 3, "eval_every": 10})
    first = losses(out)
    latest = out / "checkpoints" / "latest"
    latest.write_bytes(b"\x00\xff garbage")
    with pytest.raises(CheckpointError, match=r"--resume_from STEP \(here: 10, 20, 30\)"):
        pretrain(out=str(out), resume=True, device="cpu", progress=False)
    line = one_error_line(cli("pretrain", f"--out={out}", "--resume=true", "--device=cpu"))
    assert "--resume_from" in line and "latest" in line
    latest.write_text("step_0000030")
    w = out / "checkpoints" / "step_0000030" / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-100:] = bytes(100)
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"sha256.*--resume_from STEP \(here: 10, 20\)"):
        pretrain(out=str(out), resume=True, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="resume_from: .* no checkpoint of step 15; it has 10, 20, 30"):
        pretrain(out=str(out), resume_from=15, device="cpu", progress=False)
    # --resume_from 20: the checkpoint of step 20 exactly; metrics after it are dropped and redone
    s = pretrain(out=str(out), resume_from=20, device="cpu", progress=False)
    assert s["status"] == "finished" and s["step"] == 30
    again = losses(out)
    assert [x[0] for x in again] == list(range(1, 31))
    assert [x[1] for x in again] == pytest.approx([x[1] for x in first], rel=1e-6, abs=1e-6)
    assert latest.read_text() == "step_0000030"
    from mea.io import load_model

    load_model(out)  # the damaged step 30 was replaced by the resumed run's


def test_warmup_longer_than_the_run_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="^train.warmup_steps: 20 is longer than the run \\(train.max_steps 10\\)"):
        TrainConfig(max_steps=10)
    TrainConfig(max_steps=10, warmup_steps=10)
    line = one_error_line(cli("pretrain", f"--out={tmp_path / 'w'}", "--train.max_steps=10", "--device=cpu"))
    assert "train.warmup_steps" in line
    assert not (tmp_path / "w").exists()
    for key, bad in (("distill_alpha", 1.5), ("distill_temperature", 0.0)):
        with pytest.raises(ValueError, match=f"train.{key}"):
            TrainConfig(**{key: bad})
