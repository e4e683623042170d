"""Sharded checkpoints (torch.distributed.checkpoint): exact resume, resharding across rank counts,
consolidation for every loader, damaged and half-written shards."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_train import MICRO, corpus, losses, run  # noqa: F401  (corpus is a fixture)


def dcp_run(out, corpus, **kw):
    return run(out, corpus, checkpoint_format="dcp", **kw)


def test_sharded_checkpoint_resumes_exactly_and_loads_everywhere(tmp_path, corpus):
    """One process writing the sharded format: a halted run resumes step for step as an uninterrupted
    one (and as the full format's run); load_model, export-hf and --init_from read it."""
    from mea.io import load_model
    from mea.io.checkpoint import checkpoint_format, latest_checkpoint
    from mea.train.pretrain import pretrain

    run(tmp_path / "full", corpus, attention="mea", n_kv_heads=1, save_every=3)
    cut = dcp_run(tmp_path / "cut", corpus, attention="mea", n_kv_heads=1, save_every=3, halt_after=5)
    assert cut["status"] == "halted"
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert checkpoint_format(ckpt) == "dcp" and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "shards" / ".metadata").is_file()
    assert set(json.loads((ckpt / "state.json").read_text())["shards"]) == {p.name for p in (ckpt / "shards").iterdir()}
    s = pretrain(out=str(tmp_path / "cut"), resume=True, device="cpu", progress=False)
    assert s["status"] == "finished"
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [x[0] for x in b] == list(range(1, 9))
    assert [x[1] for x in a] == pytest.approx([x[1] for x in b], rel=1e-6, abs=1e-6)
    # consolidated in one process: the same weights as the full-format run's
    m_dcp, m_full = load_model(tmp_path / "cut"), load_model(tmp_path / "full")
    for (n, p), q in zip(m_dcp.named_parameters(), m_full.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    from mea.io.hf import export_hf

    export_hf(str(tmp_path / "cut"), str(tmp_path / "hf"))
    assert load_model(tmp_path / "hf").config.attention == "mea"
    cont = run(tmp_path / "cont", corpus, steps=2, save_every=2, init_from=str(tmp_path / "cut"))
    assert cont["status"] == "finished"


def test_a_damaged_shard_is_one_line_error_naming_it_and_the_earlier_checkpoint_resumes(tmp_path, corpus):
    from mea.io import load_model
    from mea.io.checkpoint import CheckpointError, latest_checkpoint
    from mea.train.pretrain import pretrain

    ref = tmp_path / "ref"
    run(ref, corpus, steps=6, save_every=2)
    out = tmp_path / "d"
    dcp_run(out, corpus, steps=6, save_every=2, halt_after=4)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_0000004"
    shard = ckpt / "shards" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte off
    shard.write_bytes(bytes(raw))
    for load in (lambda: load_model(out), lambda: load_model(ckpt)):
        with pytest.raises(CheckpointError, match=r"__0_0.distcp: its bytes do not match the sha256") as e:
            load()
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="--resume_from STEP \\(here: 2\\)") as e:
        pretrain(out=str(out), resume=True, device="cpu", progress=False)
    assert "__0_0.distcp" in str(e.value) and "\n" not in str(e.value)
    (ckpt / "shards" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp: missing"):
        load_model(out)
    # the earlier checkpoint is intact: resuming from it retrains steps 3-6 exactly
    s = pretrain(out=str(out), resume_from=2, device="cpu", progress=False)
    assert s["status"] == "finished" and s["step"] == 6
    assert [x[1] for x in losses(ref)] == pytest.approx([x[1] for x in losses(out)], rel=1e-6, abs=1e-6)


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    """A kill while the shards of step 4 are written: `latest` still names step 2, which loads and
    resumes exactly; the half-written folder is cleared by the next save."""
    import mea.io.checkpoint as C
    from mea.train.pretrain import pretrain

    ref = tmp_path / "ref"
    run(ref, corpus, steps=6, save_every=2)
    real = C._finish
    calls = {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill would stop it: shards written, nothing renamed
        return real(*a, **k)

    monkeypatch.setattr(C, "_finish", killed)
    out = tmp_path / "k"
    with pytest.raises(KeyboardInterrupt):
        dcp_run(out, corpus, steps=6, save_every=2)
    monkeypatch.setattr(C, "_finish", real)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    assert (out / "checkpoints" / ".tmp_step_0000004" / "shards").is_dir()
    from mea.io import load_model

    load_model(out)
    pretrain(out=str(out), resume=True, device="cpu", progress=False)
    assert not list((out / "checkpoints").glob(".tmp_*"))
    assert [x[1] for x in losses(ref)] == pytest.approx([x[1] for x in losses(out)], rel=1e-6, abs=1e-6)


def _torchrun(out, ranks, extra, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "mea.cli", "pretrain", f"--out={out}", *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _reshard_chain(tmp_path, corpus, ranks_chain, parallel_chain):
    """One run carried through several rank counts (0: one process, no torchrun), halted every 2
    steps and resumed on the next count; its losses against one process with the same global batch."""
    steps = 2 * len(ranks_chain)
    micro = 4  # micro-batches of 2 per step over all ranks: divisible by 4, 2 and 1
    one = tmp_path / "one"
    run(one, corpus, steps=steps, save_every=2, train={"grad_accum": micro})
    first = max(1, ranks_chain[0])
    args = ["--preset=tiny", f"--model={json.dumps(MICRO)}", f"--data.corpus={corpus}", "--data.seq_len=32",
            f"--train.max_steps={steps}", "--train.batch_size=2", f"--train.grad_accum={micro // first}",
            "--train.lr=3e-3", "--train.warmup_steps=2", "--train.log_every=1", "--train.eval_every=4",
            "--train.eval_batches=1", "--train.save_every=2", "--checkpoint_format=dcp"]
    out = tmp_path / "chain"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    from mea.train.pretrain import pretrain

    for i, (ranks, parallel) in enumerate(zip(ranks_chain, parallel_chain)):
        how = ["--device=cpu", "--progress=false", f"--halt_after={2 * (i + 1)}"]
        if ranks == 0:
            assert pretrain(out=str(out), resume=True, device="cpu", progress=False, halt_after=2 * (i + 1))["step"] == 2 * (i + 1)
            continue
        _torchrun(out, ranks, (args if i == 0 else ["--resume=true"]) + how + [f"--parallel={parallel}"], env)
        latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
        state = json.loads((latest / "state.json").read_text())
        assert state["world_size"] == ranks and state["format"] == "dcp"
    a, b = losses(one), losses(out)
    assert [s for s, _ in b] == list(range(1, steps + 1))
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)


def test_sharded_checkpoint_reshards_2_ranks_to_1_and_back(tmp_path, corpus):
    """FSDP2 on 2 ranks (gloo) writes shards; one process resumes them; DDP on 2 ranks resumes that."""
    _reshard_chain(tmp_path, corpus, [2, 0, 2], ["fsdp", None, "ddp"])


def test_sharded_checkpoint_reshards_4_2_1_4(tmp_path, corpus):
    """Saved on 4 ranks, resumed on 2, then 1, then 4 again (FSDP2, gloo): losses equal step for step."""
    _reshard_chain(tmp_path, corpus, [4, 2, 0, 4], ["fsdp", "fsdp", None, "fsdp"])
