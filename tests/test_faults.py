"""Every command on bad input (issue 19): a missing or invalid path, a bad value, a bad device, an
existing target, a corrupt checkpoint, a corrupt shard. Each gets exit status 2 and one line on stderr,
``mea: error: <option>: <problem>``, naming the option by its full name, and nothing that existed
before changes (every file is hashed before and after). A run killed before its first save is the
trainer's (test_train.py).

The commands run in this process through ``mea.cli.main`` (a few also as real processes), on a tiny
corpus and a run trained for 4 steps, both made once per session (conftest.py)."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mea.cli import main

pytest.importorskip("transformers")

# Devices no machine has: a name that is none, an index past any box's GPUs; plain cuda where there is none.
BAD_DEVICES = ["gpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
LONG_PROMPT = "word " * 80  # more tokens than the tiny run's context of 64
ROWS = "[{{name: a, kv_heads: 1}}]"  # one valid row of study-compression-final (braces doubled for format)

# (command, fault class, argv, the option the error must name). In argv: {tmp} is this test's folder,
# {user} a folder of the user's (config.json, notes.txt), {run}/{corpus} the session's tiny run and
# corpus, {bad_run}/{bad_corpus} copies of them with damaged weights or a damaged shard.
CASES = [
    # prepare-data
    ("prepare-data", "missing path", ["--files", "[{tmp}/nothing.txt]", "--out", "{tmp}/new"], "files"),
    ("prepare-data", "invalid path", ["--files", "[{tmp}/binary.txt]", "--out", "{tmp}/new"], "files"),
    ("prepare-data", "bad value", ["--files", "[{tmp}/text.txt]", "--val_fraction", "1.5", "--out", "{tmp}/new"],
     "val_fraction"),
    ("prepare-data", "bad value", ["--corpus", "wikitext", "--out", "{tmp}/new"], "corpus"),
    ("prepare-data", "bad value", ["--sources", "[nope]", "--out", "{tmp}/new"], "sources"),
    ("prepare-data", "existing target", ["--files", "[{tmp}/text.txt]", "--out", "{user}"], "out"),
    ("prepare-data", "existing target", ["--files", "[{tmp}/text.txt]", "--out", "{corpus}"], "out"),
    ("prepare-data", "missing path", ["--generate_from", "{tmp}/nothing", "--tokens", "100"], "generate_from"),
    ("prepare-data", "invalid path", ["--generate_from", "{user}", "--tokens", "100"], "generate_from"),
    ("prepare-data", "bad value", ["--generate_from", "{run}"], "tokens"),
    ("prepare-data", "bad value", ["--generate_from", "{run}", "--tokens", "100", "--temperature", "0"], "temperature"),
    ("prepare-data", "existing target", ["--generate_from", "{run}", "--tokens", "100", "--corpus", "{corpus}", "--out",
                                      "{user}"], "out"),
    # pretrain
    ("pretrain", "missing path", ["--out", "{tmp}/new", "--data.corpus", "{tmp}/no/corpus"], "data.corpus"),
    ("pretrain", "missing path", ["--out", "{tmp}/new", "--init_from", "{tmp}/nothing"], "init_from"),
    ("pretrain", "invalid path", ["--out", "{tmp}/new", "--data.corpus", "{user}"], "data.corpus"),
    ("pretrain", "invalid path", ["--out", "{tmp}/new", "--init_from", "{tmp}/text.txt"], "init_from"),
    ("pretrain", "invalid path", ["--out", "{tmp}/new", "--init_from", "{user}"], "init_from"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--data.corpus", "{corpus}", "--data.seq_len", "0"], "data.seq_len"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--data.corpus", "{corpus}", "--train.lr", "-1e-3"], "train.lr"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--train.lr", "fast"], "train.lr"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--train.warmup_steps", "-1"], "train.warmup_steps"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--data.corpus", "wikitext"], "data.corpus"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--data.corpus", "{corpus}", "--model", '{{"n_heads": 3}}'],
     "model.n_heads"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--data.corpus", "{corpus}", "--n_kv_heads", "9"], "n_kv_heads"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--preset", "huge"], "preset"),
    ("pretrain", "bad value", ["--out", "{tmp}/new", "--bogus", "1"], "bogus"),
    ("pretrain", "bad value", ["--out", "{run}", "--resume", "true", "--overwrite", "true"], "overwrite"),
    ("pretrain", "existing target", ["--out", "{user}", "--data.corpus", "{corpus}"], "out"),
    ("pretrain", "existing target", ["--out", "{run}", "--data.corpus", "{corpus}"], "out"),
    ("pretrain", "missing path", ["--out", "{tmp}/new", "--resume", "true"], "out"),
    ("pretrain", "corrupt checkpoint", ["--out", "{tmp}/new", "--init_from", "{bad_run}", "--data.corpus", "{corpus}"],
     "init_from"),
    ("pretrain", "corrupt shard", ["--out", "{tmp}/new", "--data.corpus", "{bad_corpus}", "--model",
                                   '{{"d_model": 32, "n_layers": 1, "n_heads": 2}}', "--data.seq_len", "16"],
     "data.corpus"),
    # sweep
    ("sweep", "missing path", ["--out", "{tmp}/new", "--lrs_from", "{tmp}/nothing"], "lrs_from"),
    ("sweep", "bad value", ["--out", "{tmp}/new", "--variants", "[bogus]"], "variants"),
    ("sweep", "bad value", ["--out", "{tmp}/new", "--variants", '["mea:n_kv_heads=9"]'], "variants"),
    ("sweep", "bad value", ["--out", "{tmp}/new", "--lrs", "[-1e-3]"], "lrs"),
    ("sweep", "bad value", ["--out", "{tmp}/new", "--lrs", "[]"], "lrs"),
    ("sweep", "bad value", ["--out", "{tmp}/new", "--model", '{{"d_model": 100}}'], "model.head_dim"),
    ("sweep", "existing target", ["--out", "{user}"], "out"),
    ("sweep", "corrupt shard", ["--out", "{tmp}/new", "--data.corpus", "{bad_corpus}"], "data.corpus"),
    # evaluate
    ("evaluate", "missing path", ["{tmp}/nothing"], "model"),
    ("evaluate", "invalid path", ["{user}"], "model"),
    ("evaluate", "invalid path", ["{tmp}/text.txt"], "model"),
    ("evaluate", "invalid path", ["{run}", "--tasks", "", "--corpus", "{user}"], "corpus"),
    ("evaluate", "bad value", ["{run}", "--limit", "0"], "limit"),
    ("evaluate", "bad value", ["{run}", "--tasks", "piqa,squad"], "tasks"),
    ("evaluate", "bad value", ["{run}", "--dtype", "fp8"], "dtype"),
    ("evaluate", "existing target", ["{run}", "--tasks", "", "--corpus", "{corpus}", "--out", "{user}"], "out"),
    ("evaluate", "corrupt checkpoint", ["{bad_run}", "--tasks", "", "--corpus", "{corpus}"], "model"),
    ("evaluate", "corrupt shard", ["{run}", "--tasks", "", "--corpus", "{bad_corpus}", "--ppl_seq_len", "16"],
     "corpus"),
    # evaluate-many
    ("evaluate-many", "missing path", ["--models", "[{tmp}/nothing]"], "models"),
    ("evaluate-many", "missing path", ["--sweep", "{tmp}/nothing"], "sweep"),
    ("evaluate-many", "invalid path", ["--models", "[{user}]"], "models"),
    ("evaluate-many", "bad value", ["--models", "[{run}]", "--limit", "0"], "limit"),
    ("evaluate-many", "bad value", ["--models", "[{run}]", "--tasks", "bogus"], "tasks"),
    ("evaluate-many", "existing target", ["--models", "[{run}]", "--out", "{user}"], "out"),
    # export-hf
    ("export-hf", "missing path", ["{tmp}/nothing", "{tmp}/new"], "run_dir"),
    ("export-hf", "invalid path", ["{corpus}", "{tmp}/new"], "run_dir"),
    ("export-hf", "bad value", ["{run}", "{tmp}/new", "--dtype", "fp8"], "dtype"),
    ("export-hf", "bad value", ["{run}"], "out_dir"),
    ("export-hf", "existing target", ["{run}", "{user}"], "out_dir"),
    ("export-hf", "existing target", ["{run}", "{tmp}/text.txt"], "out_dir"),
    ("export-hf", "corrupt checkpoint", ["{bad_run}", "{tmp}/new"], "run_dir"),
    # import-gguf (all found before anything is fetched)
    ("import-gguf", "bad value", ["--package", "nonsense"], "package"),
    ("import-gguf", "bad value", ["--sha256", "xyz"], "sha256"),
    ("import-gguf", "existing target", ["--out", "{user}"], "out"),
    # convert
    ("convert", "missing path", ["{tmp}/nothing", "--kv_heads", "1"], "model"),
    ("convert", "invalid path", ["{tmp}/text.txt", "--kv_heads", "1"], "model"),
    ("convert", "missing path", ["{run}", "--kv_heads", "1", "--calib_text", "{tmp}/nothing.txt"], "calib_text"),
    ("convert", "bad value", ["{run}", "--kv_heads", "0"], "kv_heads"),
    ("convert", "bad value", ["{run}", "--kv_heads", "3", "--calib_tokens", "0"], "kv_heads"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--init", "bogus"], "init"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--layers", "5", "--calib_tokens", "0"], "layers"),
    ("convert", "existing target", ["{run}", "--kv_heads", "1", "--calib_tokens", "0", "--out", "{user}"], "out"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--kv_budget", "0.5"], "kv_heads"),
    ("convert", "bad value", ["{run}", "--kv_budget", "0"], "kv_budget"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--match_steps", "-1"], "match_steps"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--match_steps", "5", "--calib_tokens", "100"], "calib_tokens"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--match_steps", "5", "--match_lr", "0"], "match_lr"),
    ("convert", "bad value", ["{run}", "--kv_heads", "1", "--match_mixing_lr_mult", "-1"], "match_mixing_lr_mult"),
    ("convert", "bad value", ["{run}", "--kv_budget", "0.5", "--calib_tokens", "0"], "calib_tokens"),
    ("convert", "corrupt checkpoint", ["{bad_run}", "--kv_heads", "1", "--calib_tokens", "0", "--out", "{tmp}/new"],
     "model"),
    # generate
    ("generate", "missing path", ["{tmp}/nothing", "--prompt", "hi"], "model"),
    ("generate", "missing path", ["{run}", "--prompts", "{tmp}/nothing.jsonl"], "prompts"),
    ("generate", "invalid path", ["{user}", "--prompt", "hi"], "model"),
    ("generate", "invalid path", ["{run}", "--prompts", "{tmp}/bad.jsonl"], "prompts"),
    ("generate", "bad value", ["{run}", "--prompt", ""], "prompt"),
    ("generate", "bad value", ["{run}", "--prompt", LONG_PROMPT], "prompt"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--max_new_tokens", "64"], "prompt"),
    ("generate", "bad value", ["{run}"], "prompt"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--prompts", "{tmp}/bad.jsonl"], "prompt"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--max_new_tokens", "0"], "max_new_tokens"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--top_p", "2"], "top_p"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--backend", "cuda"], "backend"),
    ("generate", "bad value", ["{run}", "--prompt", "hi", "--dtype", "fp8"], "dtype"),
    ("generate", "existing target", ["{run}", "--prompt", "hi", "--out", "{tmp}/exists.jsonl"], "out"),
    ("generate", "corrupt checkpoint", ["{bad_run}", "--prompt", "hi", "--max_new_tokens", "4"], "model"),
    # study-lr-scaling
    ("study-lr-scaling", "bad value", ["--predict_preset", "huge"], "predict_preset"),
    ("study-lr-scaling", "bad value", ["--predict_for", '{{"n_heads": 5}}'], "predict_for.n_heads"),
    ("study-lr-scaling", "bad value", ["--check_factors", "[0]"], "check_factors"),
    ("study-lr-scaling", "bad value", ["--variants", "[bogus]"], "variants"),
    ("study-lr-scaling", "existing target", ["--sweeps", "[{tmp}/nothing]", "--out", "{user}"], "out"),
    # study-compression
    ("study-compression", "missing path", ["{tmp}/nothing"], "model"),
    ("study-compression", "bad value", ["{run}", "--kv_heads", "[0]"], "kv_heads"),
    ("study-compression", "bad value", ["{run}", "--inits", "[bogus]"], "inits"),
    ("study-compression", "bad value", ["{run}", "--heal_lr", "0"], "heal_lr"),
    ("study-compression", "existing target", ["{run}", "--corpus", "{corpus}", "--out", "{user}"], "out"),
    ("study-compression", "corrupt checkpoint", ["{bad_run}", "--kv_heads", "[1]", "--inits", "[svd]", "--corpus",
                                                 "{corpus}", "--out", "{tmp}/new"], "model"),
    # study-compression-final
    ("study-compression-final", "missing path", ["{tmp}/nothing", ROWS], "model"),
    ("study-compression-final", "bad value", ["{run}", "[{{name: a, kv_heads: 1, method: mla}}]"], "rows"),
    ("study-compression-final", "bad value", ["{run}", ROWS, "--distill_alpha", "2"], "distill_alpha"),
    ("study-compression-final", "missing path", ["{run}", ROWS, "--corpus", "{tmp}/nothing"], "corpus"),
    ("study-compression-final", "existing target", ["{run}", ROWS, "--out", "{user}"], "out"),
    ("study-compression-final", "existing target", ["{run}", ROWS, "--out", "{tmp}/new", "--results",
                                                    "{user}/config.json"], "results"),
    ("study-compression-final", "invalid path", ["{run}", ROWS, "--out", "{tmp}/new", "--doc",
                                                 "{tmp}/text.txt"], "doc"),
    # study-report
    ("study-report", "invalid path", ["--runs", "{tmp}/text.txt", "--out", "{tmp}/new"], "runs"),
    ("study-report", "bad value", ["--tolerance", "-1", "--out", "{tmp}/new"], "tolerance"),
    ("study-report", "existing target", ["--runs", "{tmp}/nothing", "--out", "{user}"], "out"),
    # study-scratch (report, declare, plan)
    ("study-scratch", "missing path", ["report", "--runs", "{tmp}/nothing", "--out", "{tmp}/new"], "runs"),
    ("study-scratch", "invalid path", ["report", "--runs", "{tmp}/text.txt", "--out", "{tmp}/new"], "runs"),
    ("study-scratch", "existing target", ["report", "--runs", "{tmp}", "--out", "{user}"], "out"),
    ("study-scratch", "missing path", ["declare", "--pilot", "{tmp}/nothing", "--out", "{tmp}/new.yaml"], "pilot"),
    ("study-scratch", "existing target", ["declare", "--pilot", "{tmp}/nothing", "--out", "{user}/config.json"], "out"),
    ("study-scratch", "bad value", ["plan", "--run_overhead_s", "-1"], "run_overhead_s"),
    ("study-scratch", "bad value", ["plan", "--tokens_per_s", "{{small: 0}}"], "tokens_per_s.small"),
    ("study-scratch", "missing path", ["plan", "--configs", "{tmp}/nothing"], "configs"),
    # info
    ("info", "bad value", ["--n_kv_heads", "0"], "n_kv_heads"),
    ("info", "bad value", ["--preset", "huge"], "preset"),
]
# Every command that takes a device, on devices no machine has.
DEVICE_CASES = [
    ("pretrain", ["--out", "{tmp}/new", "--data.corpus", "{corpus}"]),
    ("sweep", ["--out", "{tmp}/new", "--data.corpus", "{corpus}"]),
    ("evaluate", ["{run}", "--tasks", "", "--corpus", "{corpus}"]),
    ("evaluate-many", ["--models", "[{run}]", "--out", "{tmp}/new"]),
    ("convert", ["{run}", "--kv_heads", "1", "--calib_tokens", "0", "--out", "{tmp}/new"]),
    ("generate", ["{run}", "--prompt", "hi"]),
    ("study-compression", ["{run}", "--out", "{tmp}/new"]),
    ("study-compression-final", ["{run}", ROWS, "--out", "{tmp}/new"]),
]
CASES += [(cmd, "bad device", argv + ["--device", dev], "device") for cmd, argv in DEVICE_CASES for dev in BAD_DEVICES]


def _id(case) -> str:
    cmd, fault, argv, field = case
    return f"{cmd}/{fault.replace(' ', '-')}/{field}"


def world(tmp: Path, run: Path, corpus: Path, argv: list[str]) -> dict[str, str]:
    """The files a case's arguments name; the damaged copies only where a case asks for them."""
    (tmp / "user").mkdir()
    (tmp / "user" / "config.json").write_text('{"mine": 1}\n')
    (tmp / "user" / "notes.txt").write_text("my own notes\n")
    (tmp / "text.txt").write_text("Some plain text.\n")
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00 not UTF-8")
    (tmp / "bad.jsonl").write_text('{"prompt": "fine"}\nnot json\n')
    (tmp / "exists.jsonl").write_text('{"prompt": "an earlier result"}\n')
    places = {"tmp": str(tmp), "user": str(tmp / "user"), "run": str(run), "corpus": str(corpus),
              "bad_run": str(tmp / "bad_run"), "bad_corpus": str(tmp / "bad_corpus")}
    text = " ".join(argv)
    if "{bad_run}" in text:
        shutil.copytree(run, tmp / "bad_run", symlinks=True)
        weights = next((tmp / "bad_run" / "checkpoints").glob("step_*/model.safetensors"))
        with open(weights, "r+b") as f:  # same size, other bytes: only the checksum can tell
            f.seek(weights.stat().st_size // 2)
            f.write(b"\x13" * 64)
    if "{bad_corpus}" in text:
        shutil.copytree(corpus, tmp / "bad_corpus")
        for shard in ("train_0000.bin", "val_0000.bin"):  # training reads both, perplexity the second
            with open(tmp / "bad_corpus" / shard, "r+b") as f:
                f.write(b"\xff" * 64)
    return places


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under ``roots``; prepare-data's lock files,
    which it leaves beside its output on purpose, are not counted."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.name.endswith(".lock"):
                continue
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return out


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capfd.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, tiny_run, tiny_corpus, capfd, monkeypatch):
    cmd, fault, argv, field = case
    monkeypatch.chdir(tmp_path)  # what a command writes by default (runs/...) lands in the snapshot too
    places = world(tmp_path, tiny_run, tiny_corpus, argv)
    args = [cmd] + [a.format(**places) for a in argv]
    before = snapshot(tmp_path, tiny_run, tiny_corpus)
    code, err = run_cli(args, capfd)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"mea: error: {field}: "), err
    assert snapshot(tmp_path, tiny_run, tiny_corpus) == before  # nothing changed, nothing created


def test_every_command_meets_every_fault_that_applies_to_it():
    from mea.cli import COMMANDS

    covered = {(c, f) for c, f, _, _ in CASES}
    assert {c for c, _ in covered} == set(COMMANDS) | {"info"}
    for cmd in ("prepare-data", "pretrain", "sweep", "evaluate", "evaluate-many", "export-hf", "import-gguf",
                "convert", "generate", "study-lr-scaling", "study-compression", "study-report", "study-scratch",
                "study-compression-final"):
        assert (cmd, "existing target") in covered and (cmd, "bad value") in covered, cmd
    for cmd in ("pretrain", "evaluate", "export-hf", "convert", "generate", "study-compression"):
        assert (cmd, "corrupt checkpoint") in covered, cmd
    for cmd, _ in DEVICE_CASES:
        assert (cmd, "bad device") in covered


@pytest.mark.parametrize("argv,field", [
    (["pretrain", "--device", "gpu", "--out", "{tmp}/new"], "device"),
    (["pretrain", "--train.lr", "-1e-3", "--out", "{tmp}/new"], "train.lr"),
    (["export-hf", "{run}", "{user}"], "out_dir"),
], ids=["pretrain-device", "pretrain-negative-lr", "export-hf-user-folder"])
def test_a_real_process_says_one_line(argv, field, tmp_path, tiny_run, tiny_corpus):
    """The same in a fresh process, as a user runs it: nothing else on stderr (no warning, no traceback)."""
    places = world(tmp_path, tiny_run, tiny_corpus, argv)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "mea.cli", *[a.format(**places) for a in argv]], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"mea: error: {field}: "), r.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------- what the errors point to
def test_overwrite_true_replaces_what_was_refused(tmp_path, tiny_run, capfd):
    """`--overwrite true` (the way out each refusal names) replaces the folder, atomically: the user's
    files go, the export is whole."""
    places = world(tmp_path, tiny_run, tiny_run, [])
    main(["export-hf", str(tiny_run), places["user"], "--overwrite", "true"])
    user = Path(places["user"])
    assert json.loads((user / "config.json").read_text())["model_type"] == "mea" and not (user / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    code, err = run_cli(["export-hf", str(tiny_run), places["user"]], capfd)  # its own export is no exception
    assert code == 2 and "out_dir: " in err
    main(["generate", str(tiny_run), "--prompt", "hi", "--max_new_tokens", "2", "--out", str(tmp_path / "exists.jsonl"),
          "--overwrite", "true"])
    assert json.loads((tmp_path / "exists.jsonl").read_text())["prompt"] == "hi"


def test_a_folder_the_command_wrote_is_continued(tmp_path, tiny_run, tiny_corpus, capfd):
    """The rule refuses what a command did not write: its own output is continued or reused as before
    (a prepared corpus is reused, a run resumes, an evaluation's folder takes new results)."""
    from mea.data.prepare import prepare_data

    manifest = json.loads((tiny_corpus / "manifest.json").read_text())
    assert prepare_data(files=manifest["request"]["files"], out=str(tiny_corpus), val_fraction=0.25) == str(tiny_corpus)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    assert main(["pretrain", "--out", str(run), "--resume", "true", "--device", "cpu"]) is None  # finished: nothing to do
    for _ in range(2):
        main(["evaluate", str(run), "--tasks", "", "--corpus", str(tiny_corpus), "--ppl_seq_len", "16",
              "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json", "results.md"]


def test_shipped_configs_work_from_any_directory(tmp_path, monkeypatch, capfd):
    """`--config small`, `small.yaml` or `configs/small.yaml` read the config shipped with mea where no such
    local file exists; a local file of that name wins."""
    import yaml

    monkeypatch.chdir(tmp_path)
    for name in ("small", "small.yaml", "configs/small.yaml"):
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--config", name, "--print_config"])
        assert e.value.code == 0 and yaml.safe_load(capfd.readouterr().out)["preset"] == "small", name
    (tmp_path / "small.yaml").write_text("preset: mini\n")
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", "small.yaml", "--print_config"])
    assert yaml.safe_load(capfd.readouterr().out)["preset"] == "mini"
    code, err = run_cli(["pretrain", "--config", "nothere.yaml"], capfd)
    assert code == 2 and err.startswith("mea: error: config: ") and err.count("\n") == 1


def test_the_readme_opens_with_two_lines_and_ci_runs_the_second():
    """A newcomer pastes the README's first two commands: set up and train, set up and test; CI runs the
    second exactly as written."""
    import re

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"```bash\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert lines == ["bash setup.sh && mea pretrain", "bash setup.sh && python3 -m pytest -q"]
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert lines[1] in ci
