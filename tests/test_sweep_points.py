"""`mea sweep` for a study: explicit grid points, declared per-variant choices, a grid up to divergence."""
import csv
from pathlib import Path

import pytest
import yaml

from mea.train.config import DataConfig, TrainConfig

MICRO = {"d_model": 32, "n_layers": 2, "n_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mea.data.prepare import prepare_data

    src = tmp_path_factory.mktemp("text")
    for i in range(40):
        (src / f"d{i}.txt").write_text(" ".join(f"word{(i * 11 + j) % 53} and{j % 5}" for j in range(80 + 3 * i)))
    return prepare_data(files=[str(src)], out=str(tmp_path_factory.mktemp("prepared") / "c"), val_fraction=0.2)


def _rows(path):
    return [(r["variant"], float(r["lr"]), int(r["seed"]), r["status"]) for r in csv.DictReader(open(path))]


def test_points_take_the_declared_rates_and_settings(tmp_path, corpus):
    from mea.train.sweep import sweep

    choices = tmp_path / "declared.yaml"
    choices.write_text(yaml.safe_dump({"mha": {"lr": 2e-3, "select_loss": 5.0},
                                       "mea:n_kv_heads=1": {"lr": 1e-3, "model": {"head_norm_init": 0.1}}}))
    train = TrainConfig(max_steps=2, batch_size=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
                        save_every=2)
    common = dict(preset="tiny", model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32), train=train,
                  device="cpu")
    points = [{"variant": "mha", "seeds": [0, 1]}, {"variant": "mha", "lr_mult": 0.5},
              {"variant": "mea:n_kv_heads=1", "seeds": [2]}, {"variant": "mha", "lr": 5e-3, "seeds": [0]}]
    csv_path = sweep(out=str(tmp_path / "sw"), points=points, seeds=[3], choices=str(choices), **common)
    assert _rows(csv_path) == [("mha", 2e-3, 0, "finished"), ("mha", 2e-3, 1, "finished"), ("mha", 1e-3, 3, "finished"),
                               ("mea:n_kv_heads=1", 1e-3, 2, "finished"), ("mha", 5e-3, 0, "finished")]
    conf = yaml.safe_load((tmp_path / "sw" / "mea_n_kv_heads-1" / "lr1.00e-03_s2" / "config.yaml").read_text())
    assert conf["model"]["head_norm_init"] == 0.1 and conf["model"]["n_kv_heads"] == 1 and conf["train"]["lr"] == 1e-3
    assert yaml.safe_load((tmp_path / "sw" / "mha" / "lr2.00e-03_s0" / "config.yaml").read_text())["model"][
        "head_norm_init"] == 1.0
    # choices also set the model of a plain grid (its rates come from lrs)
    sweep(out=str(tmp_path / "grid"), variants=["mea:n_kv_heads=1"], lrs=[3e-3], choices=str(choices), **common)
    conf = yaml.safe_load((tmp_path / "grid" / "mea_n_kv_heads-1" / "lr3.00e-03_s0" / "config.yaml").read_text())
    assert conf["model"]["head_norm_init"] == 0.1
    for kw, said in ((dict(points=[{"variant": "gqa"}]), "choices: .* declares nothing for gqa"),
                     (dict(points=[{"variant": "mha", "lr": 1e-3, "lr_mult": 2}]), r"points\[0\]: give lr or lr_mult"),
                     (dict(points=[{"variant": "mha", "rate": 1}]), r"points\[0\]: expected"),
                     (dict(variants=["mea:n_kv_heads=1"], lrs=[1e-3], model={**MICRO, "head_norm_init": 0.3}),
                      "declares head_norm_init=0.1, the sweep sets 0.3"),
                     (dict(points=[{"variant": "mha"}], until_diverged=True), "^points: ")):
        with pytest.raises(ValueError, match=said):
            sweep(out=str(tmp_path / "bad"), choices=str(choices), **{**common, **kw})
    with pytest.raises(ValueError, match=r"points\[0\]: 'mha' has no lr"):
        sweep(out=str(tmp_path / "bad"), points=[{"variant": "mha"}], **common)
    with pytest.raises(FileNotFoundError, match="^choices: .*study-scratch declare"):
        sweep(out=str(tmp_path / "bad"), points=[{"variant": "mha"}], choices=str(tmp_path / "none.yaml"), **common)
    (tmp_path / "pending.yaml").write_text("mha: {lr: null}\n")
    with pytest.raises(ValueError, match="needs a positive lr"):
        sweep(out=str(tmp_path / "bad"), points=[{"variant": "mha"}], choices=str(tmp_path / "pending.yaml"), **common)


def test_until_diverged_climbs_each_variant_to_its_first_all_seed_divergence(tmp_path, corpus):
    """Rates go lowest first; a variant whose seeds all diverge at a rate trains no higher one, the others
    go on; a rerun trains nothing new."""
    from mea.train.sweep import sweep

    train = TrainConfig(max_steps=3, batch_size=2, warmup_steps=0, log_every=1, eval_every=3, eval_batches=1,
                        save_every=3, grad_clip=0.0, diverge_loss=11.5)
    kw = dict(out=str(tmp_path / "st"), variants=["mha", "mea:head_norm=false"], lrs=[300.0, 1e-3, 80.0, 3e-3],
              seeds=[0, 1], preset="tiny", model=MICRO, data=DataConfig(corpus=str(corpus), seq_len=32), train=train,
              device="cpu", until_diverged=True)
    rows = _rows(sweep(**kw))
    assert [(v, lr) for v, lr, _, _ in rows] == [(v, lr) for lr in (1e-3, 3e-3, 80.0) for v in kw["variants"]
                                                  for _ in (0, 1)]
    assert {s for v, lr, _, s in rows if lr < 1} == {"finished"} and {s for v, lr, _, s in rows if lr == 80.0} == {"diverged"}
    assert not any(Path(tmp_path / "st").glob("*/lr3.00e+02_s*"))
    mtimes = {p: p.stat().st_mtime_ns for p in Path(tmp_path / "st").glob("*/*/status.json")}
    assert _rows(sweep(**kw)) == rows
    assert {p: p.stat().st_mtime_ns for p in Path(tmp_path / "st").glob("*/*/status.json")} == mtimes
    # a deadline already passed lists the next rates as missing: the sweep is not complete
    late = _rows(sweep(**dict(kw, out=str(tmp_path / "late"), deadline_s=1e-9)))
    assert {s for _, _, _, s in late} == {"missing"} and {lr for _, lr, _, _ in late} == {1e-3, 3e-3, 80.0, 300.0}
