"""mea.study.lr_scaling (experiment 5): fake sweeps from a known law lr* = a N^b, CPU only, fast."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [Path(__import__("mea").__file__).resolve().parent / "configs" / "study" / f"lr_scaling_s{k}.yaml"
           for k in (1, 2, 3)]
# The law the fake sweeps follow (near what experiment 1 measured at the `small` preset, 25.7M):
# loss = C + K (ln lr - ln lr*(N))^2 with lr*(N) = A N^B.
LAW = {"mha": (1.0e-3 * 25.7e6 ** 0.40, -0.40), "mea": (1.7e-3 * 25.7e6 ** 0.33, -0.33)}
C, K = 4.5, 0.12


@pytest.fixture(scope="module")
def fit():
    from mea.study import lr_scaling

    return lr_scaling


def law_loss(variant, n, lr, law=LAW):
    a, b = law[variant]
    return C + K * (math.log(lr) - math.log(a * n ** b)) ** 2


def fake_sweep(out: Path, conf: dict, lrs=None, law=LAW, status=lambda v, lr: "finished"):
    """A finished `mea sweep` directory: results.csv (run_dir as the GPU machine wrote it) and each run's
    config.yaml written by pretrain's own _write_config."""
    from mea.train.config import DataConfig, TrainConfig
    from mea.train.pretrain import _write_config, resolve_model_config
    from mea.train.sweep import FIELDS, parse_variant, run_name

    data = DataConfig(**conf["data"])
    rows = []
    for lr in (lrs if lrs is not None else conf["lrs"]):
        for v in conf["variants"]:
            kw = parse_variant(v)
            cfg = resolve_model_config(conf["preset"], kw["attention"], None, None, conf.get("model"), data.seq_len)
            run = out / run_name(v, lr, 0)
            run.mkdir(parents=True)
            _write_config(run, conf["preset"], cfg, data, TrainConfig(**{**conf["train"], "lr": lr, "seed": 0}),
                          None, conf["compile"], "ddp")
            st = status(v, lr)
            loss = law_loss(v, cfg.num_params(non_embedding=True), lr, law) if st == "finished" else None
            rows.append({"variant": v, "lr": lr, "seed": 0, "status": st, "final_val_loss": loss,
                         "best_val_loss": loss, "steps": 400, "tokens": 6553600,
                         "run_dir": f"runs/study/lr_scaling/{out.name}/{run_name(v, lr, 0)}"})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return out


def study_confs():
    return [yaml.safe_load(p.read_text()) for p in CONFIGS]


def test_configs_sizes_and_grids():
    """Three sizes growing ~2-3x in non-embedding parameters, the same data and token budget, 5-point
    geometric grids that move down with size."""
    from mea.train.pretrain import resolve_model_config

    confs = study_confs()
    ns = [resolve_model_config(c["preset"], "mha", None, None, c.get("model"), 512).num_params(True) for c in confs]
    assert [round(n / 1e6, 2) for n in ns] == [4.82, 10.62, 25.7]
    assert all(2 <= b / a <= 3 for a, b in zip(ns, ns[1:]))
    for c in confs:
        assert c["variants"] == ["mha", "mea"] and c["seeds"] == [0]
        assert {k: c[k] for k in ("data", "train", "compile", "gpus", "procs_per_gpu")} == \
               {k: confs[0][k] for k in ("data", "train", "compile", "gpus", "procs_per_gpu")}
        lrs = sorted(c["lrs"])
        assert len(lrs) == 5 and all(abs(b / a - 2) < 0.02 for a, b in zip(lrs, lrs[1:]))
    t = confs[0]["train"]
    assert t["max_steps"] * t["batch_size"] * confs[0]["data"]["seq_len"] == 6553600
    assert [c["out"] for c in confs] == [f"runs/study/lr_scaling/s{k}" for k in (1, 2, 3)]
    assert sorted(confs[0]["lrs"])[0] > sorted(confs[2]["lrs"])[0]


def test_parabola_is_exact_on_a_quadratic(fit):
    x0, y0, k = math.log(1.3e-3), 3.7, 0.21
    lrs = [4e-4, 9e-4, 2.1e-3, 3.0e-3, 8e-3]  # uneven spacing
    pts = {lr: y0 + k * (math.log(lr) - x0) ** 2 for lr in lrs}
    o = fit.optimum(pts)
    assert o["edge"] is None and o["grid_best_lr"] == 9e-4 and o["used"] == [4e-4, 9e-4, 2.1e-3]
    assert o["lr_star"] == pytest.approx(1.3e-3, rel=1e-9)
    assert o["loss_star"] == pytest.approx(y0, abs=1e-12)
    assert fit.parabola_vertex([0.0, 1.0, 2.0], [1.0, 0.0, 1.0]) == pytest.approx((1.0, 0.0))
    assert fit.parabola_vertex([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]) is None


def test_edge_optima_are_flagged(fit):
    low = fit.optimum({1e-3: 4.0, 2e-3: 4.1, 4e-3: 4.3})
    assert low["edge"] == "low" and low["lr_star"] == 1e-3 and low["loss_star"] == 4.0
    high = fit.optimum({1e-3: 4.3, 2e-3: 4.1, 4e-3: 4.0}, diverged=[8e-3])
    assert high["edge"] == "high" and high["lr_star"] == 4e-3 and high["diverged_above"]
    assert "lower bound" in fit.edge_note(high) and "diverged" in fit.edge_note(high)
    assert fit.optimum({1e-3: 4.0})["edge"] == "single"


def test_recovers_the_law_and_writes_runnable_configs(fit, tmp_path, capsys):
    from mea.train.pretrain import resolve_model_config
    from mea.train.sweep import run_name

    s1, s2, s3 = study_confs()
    dirs = [fake_sweep(tmp_path / "s1", s1), fake_sweep(tmp_path / "s2", s2)]
    # s3 in two sweeps of the same size (as when merging runs/study/lr_sweep): their points merge;
    # the top rate diverged.
    lrs3 = sorted(s3["lrs"])
    dirs.append(fake_sweep(tmp_path / "s3", s3, lrs3[:3]))
    dirs.append(fake_sweep(tmp_path / "s3b", s3, lrs3[3:],
                           status=lambda v, lr: "diverged" if lr == lrs3[-1] else "finished"))
    out = tmp_path / "fit"
    check = tmp_path / "check"
    res = fit.main(sweeps=[str(d) for d in dirs] + [str(tmp_path / "s4")], out=str(out), check_root=str(check),
                   plots=False)
    text = capsys.readouterr()
    assert "s4: not run yet" in text.out and "s4: not run yet" in text.err

    n125 = {}
    for v, (a, b) in LAW.items():
        r = res["variants"][v]
        assert [p["size"] for p in r["points"]] == ["256/6/4", "384/6/6", "512/8/8"]
        for p in r["points"]:  # the grids bracket these optima, and the vertex is exact on the law
            assert p["edge"] is None
            assert p["lr_star"] == pytest.approx(a * p["N"] ** b, rel=1e-9)
        assert r["points"][2]["diverged"] == [lrs3[-1]] and len(r["points"][2]["grid"]) == 4
        assert r["fit"]["b"] == pytest.approx(b, abs=1e-9)
        assert r["fit"]["a"] == pytest.approx(a, rel=1e-6)
        assert r["fit"]["rms_log10"] < 1e-9
        pred = r["prediction"]
        n125[v] = resolve_model_config("125m", v, None, None, None, 512).num_params(True)
        assert pred["N"] == n125[v] and pred["size"] == "768/12/12"
        assert pred["lr"] == pytest.approx(a * n125[v] ** b, rel=5e-3)
        assert f"{pred['lr']:.3g}" in text.out

    saved = json.loads((out / "lr_scaling.json").read_text())
    assert saved["variants"]["mha"]["fit"]["b"] == pytest.approx(-0.40)

    # predicted_<v>.yaml: a `mea pretrain --config` file for 125m at the predicted rate, the sweeps'
    # data and training settings; check_<v>.yaml: a `mea sweep` whose middle run is that same run.
    for v in LAW:
        pre = yaml.safe_load((out / f"predicted_{v}.yaml").read_text())
        lr = res["variants"][v]["prediction"]["lr"]
        assert pre["preset"] == "125m" and pre["attention"] == v and pre["train"]["lr"] == lr
        run_train = yaml.safe_load((dirs[2] / "mha/lr1.41e-03_s0/config.yaml").read_text())["train"]
        assert {**pre["train"], "lr": None} == {**run_train, "lr": None}
        cfg = resolve_model_config(pre["preset"], pre["attention"], None, None, pre.get("model"), 512)
        assert cfg.num_params(True) == n125[v]
        sw = yaml.safe_load((out / f"check_{v}.yaml").read_text())
        assert sw["lrs"][0] == lr and sorted(sw["lrs"]) == pytest.approx([lr / 2, lr, 2 * lr], rel=5e-3)
        assert str(Path(sw["out"]) / run_name(v, sw["lrs"][0], 0)) == pre["out"]
    proc = subprocess.run([sys.executable, "-m", "mea.cli", "pretrain", "--config", str(out / "predicted_mha.yaml"),
                           "--print_config"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["attention"] == "mha" and printed["preset"] == "125m"
    assert printed["train"]["lr"] == res["variants"]["mha"]["prediction"]["lr"]
    from mea.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["sweep", "--config", str(out / "check_mea.yaml"), "--print_config"])
    assert e.value.code in (0, None)

    # The check at 125m, once run (faked here at the law): read back and compared with the prediction.
    pre = yaml.safe_load((out / "predicted_mha.yaml").read_text())
    sw = yaml.safe_load((out / "check_mha.yaml").read_text())
    fake_sweep(Path(sw["out"]), {**sw, "model": None}, sorted(sw["lrs"]))
    assert Path(sw["out"]).parent == check
    res = fit.main(sweeps=[str(d) for d in dirs], out=str(out), check_root=str(check))
    chk = res["variants"]["mha"]["check"]
    assert chk["edge"] is None and chk["lr_star"] == pytest.approx(LAW["mha"][0] * n125["mha"] ** LAW["mha"][1])
    assert chk["ratio_measured_to_predicted"] == pytest.approx(1, abs=5e-3)
    assert chk["loss_at_predicted"] == pytest.approx(C, abs=1e-4)
    assert "mha (check)" in capsys.readouterr().out
    assert (out / "lr_scaling.png").stat().st_size > 0 and (out / "loss_vs_lr.png").stat().st_size > 0


def test_edges_unfinished_and_too_few_sizes(fit, tmp_path, capsys):
    s1, s2, _ = study_confs()
    # A law whose optimum lies far above s2's grid: its best is the top rate, flagged, and used as is.
    far = {"mha": (LAW["mha"][0] * 50, LAW["mha"][1]), "mea": LAW["mea"]}
    a = fake_sweep(tmp_path / "s1", s1)
    b = fake_sweep(tmp_path / "s2", s2, law=far)
    res = fit.main(sweeps=[str(a), str(b)], out=str(tmp_path / "fit"), variants=["mha"], plots=False)
    out = capsys.readouterr().out
    p = res["variants"]["mha"]["points"][1]
    assert p["edge"] == "high" and p["lr_star"] == max(s2["lrs"])
    assert "EDGE" in out and "WARNING" in out and "mea" not in res["variants"]
    res = fit.main(sweeps=[str(a), str(b)], out=str(tmp_path / "fit2"), variants=["mha"], exclude_edges=True,
                   plots=False)
    assert res["variants"]["mha"]["fit"] is None and "no fit possible" in capsys.readouterr().out
    # An unfinished sweep is skipped unless --allow_partial; one size alone gives no fit.
    c = fake_sweep(tmp_path / "s2u", s2, status=lambda v, lr: "missing" if lr == max(s2["lrs"]) else "finished")
    res = fit.main(sweeps=[str(c)], out=str(tmp_path / "fit3"), plots=False)
    assert res["variants"] == {} and any("unfinished" in s for s in res["skipped"])
    res = fit.main(sweeps=[str(c)], out=str(tmp_path / "fit4"), allow_partial=True, plots=False)
    assert res["variants"]["mha"]["fit"] is None and "no fit possible" in res["variants"]["mha"]["no_fit"]
    assert len(res["variants"]["mha"]["points"][0]["grid"]) == 4
    assert not (tmp_path / "fit4" / "predicted_mha.yaml").exists()


def test_parameter_count_is_the_models():
    """N is ModelConfig.num_params(non_embedding=True): the count of the built Transformer."""
    from mea import Transformer
    from mea.train.pretrain import resolve_model_config

    conf = study_confs()[0]
    for v in conf["variants"]:
        cfg = resolve_model_config(conf["preset"], v, None, None, conf["model"], 512)
        assert cfg.num_params(non_embedding=True) == Transformer(cfg).num_params(non_embedding=True)
