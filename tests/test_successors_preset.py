"""The successors' preset: each loss trained as its own paper trains it (apl.presets, apl.plan,
TrainConfig.successors), its grid through the CLI, its report from run records, and reproduce.sh."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apl.cli import build_parser, config_from_args
from apl.config import TrainConfig
from apl.data import write_cifar10_folder
from apl.losses.spec import spec_for
from apl.paper import successor_accuracy, successor_numbers
from apl.plan import plan_grid, preset_config
from apl.presets import (
    NOISE_FAMILIES,
    NOISE_RULES,
    PRESETS,
    PROTOCOLS,
    SUCCESSOR_L1,
    SUCCESSOR_LOSSES,
    SUCCESSOR_NOISE,
    SUCCESSOR_SETTINGS,
)
from apl.report import make_report

ROOT = Path(__file__).resolve().parents[1]
CELLS = [(family, eta) for family, etas in SUCCESSOR_NOISE.items() for eta in etas]
ANL_JAL = ("anl-ce", "anl-fl", "nce+amse", "nfl+amse")
EPS = ("ece", "efl", "ece+mae", "efl+mae")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHON=sys.executable)


# --------------------------------------------------------------------------- the protocol and each paper's setting

def test_every_loss_shares_the_cited_works_protocol():
    for loss in SUCCESSOR_LOSSES:
        for family, eta in CELLS:
            cfg = preset_config("successors", loss=loss, variant="ma2020", noise=eta, seed=0, family=family)
            assert (cfg.model, cfg.width, cfg.init, cfg.optimizer, cfg.lr, cfg.momentum, cfg.scheduler, cfg.epochs,
                    cfg.batch_size, cfg.grad_clip, cfg.augment, cfg.normalize, cfg.variant) == \
                ("ma2020", 1.0, "kaiming", "sgd", 0.01, 0.9, "cosine", 120, 128, 5.0, True, "cifar", "ma2020")
            assert cfg.noise == eta


@pytest.mark.parametrize("family", ["symmetric", "asymmetric"])
def test_anl_and_jal_train_with_l1_and_exact_counts_the_others_with_l2_and_the_cited_works_noise(family):
    for loss in SUCCESSOR_LOSSES:
        cfg = preset_config("successors", loss=loss, variant="ma2020", noise=0.4, seed=0, family=family)
        if loss in ANL_JAL:
            assert (cfg.weight_decay, cfg.l1, cfg.noise_type) == (0.0, 5e-5, NOISE_RULES["exact"][family]), loss
        else:
            assert (cfg.weight_decay, cfg.l1, cfg.noise_type) == (1e-4, 0.0, NOISE_RULES["apl"][family]), loss
    assert SUCCESSOR_L1 == 5e-5
    assert {SUCCESSOR_SETTINGS[loss].paper.split(" (")[0] for loss in SUCCESSOR_LOSSES} == {
        "the cited work", "ALFs", "ANL", "JAL", "epsilon-softmax"}


def test_epsilon_softmax_switches_its_parameters_on_the_noise_family():
    """Its code's CIFAR-10 values: symmetric alpha 0.01, beta 5, m 1e5 (the library's defaults);
    asymmetric alpha 0.02, beta 5, m 1e3; the single losses take m alone."""
    for loss in EPS:
        sym = preset_config("successors", loss=loss, variant="ma2020", noise=0.8, seed=0).loss_params
        asym = preset_config("successors", loss=loss, variant="ma2020", noise=0.2, seed=0,
                             family="asymmetric").loss_params
        if "+" in loss:
            assert {k: sym[k] for k in ("alpha", "beta", "m")} == {"alpha": 0.01, "beta": 5.0, "m": 1e5}
            assert {k: asym[k] for k in ("alpha", "beta", "m")} == {"alpha": 0.02, "beta": 5.0, "m": 1e3}
        else:
            assert sym["m"] == 1e5 and asym["m"] == 1e3 and "alpha" not in asym
        explicit = {k: v for k, v in sym.items() if k in ("alpha", "beta", "m")}
        assert spec_for(loss, **explicit) == spec_for(loss)  # the symmetric values are the defaults
    # the other losses train with their defaults (each paper's CIFAR-10 values) in both families
    for loss in set(SUCCESSOR_LOSSES) - set(EPS):
        sym, asym = (preset_config("successors", loss=loss, variant="ma2020", noise=0.4, seed=0,
                                   family=family).loss_params for family in SUCCESSOR_NOISE)
        assert sym == asym and spec_for(loss, **sym) == spec_for(loss), (loss, sym)


def test_the_protocol_applies_outside_the_grid_and_the_callers_values_win():
    anl = TrainConfig.successors(loss="anl-ce", noise=0.4)
    assert (anl.weight_decay, anl.l1, anl.noise_type) == (0.0, 5e-5, "exact_symmetric")
    assert TrainConfig.successors(loss="jal-ce").loss == "nce+amse"
    assert TrainConfig.successors(loss="anl-ce", l1=1e-4, noise_type="asymmetric").l1 == 1e-4
    ece = TrainConfig.successors(loss="ece+mae", noise=0.2, noise_type="asymmetric")
    assert (ece.loss_params["alpha"], ece.loss_params["m"]) == (0.02, 1e3)
    assert TrainConfig.successors(loss="ece+mae", noise_type="asymmetric", loss_params={"m": 10.0}).loss_params[
        "m"] == 10.0
    assert TrainConfig.successors(loss="ece+mae", noise_type="asymmetric", loss_params={"lam": 0.5}).loss_params == {
        "lam": 0.5, "m": 1e3}
    assert PROTOCOLS["successors"].noise_type("nfl+amse", "asymmetric") == "exact_asymmetric"
    assert PROTOCOLS["paper"].noise_type("nce", "symmetric") == "symmetric"
    with pytest.raises(ValueError, match="noise family"):
        PROTOCOLS["successors"].noise_type("ce", "pairflip")


def test_the_train_command_takes_the_new_fields_and_the_protocol():
    args = build_parser().parse_args(["train", "--protocol", "successors", "--loss", "anl-fl", "--noise", "0.2",
                                      "--min-prob", "1e-6"])
    cfg = config_from_args(args)
    assert (cfg.l1, cfg.weight_decay, cfg.noise_type, cfg.loss_params["min_prob"]) == \
        (5e-5, 0.0, "exact_symmetric", 1e-6)
    args = build_parser().parse_args(["train", "--protocol", "ma2020", "--loss", "nce+agce", "--a", "5", "--q", "2",
                                      "--l1", "1e-5", "--weight-decay", "0"])
    cfg = config_from_args(args)
    assert (cfg.l1, cfg.weight_decay, cfg.loss_params["a"], cfg.loss_params["q"]) == (1e-5, 0.0, 5.0, 2.0)


# --------------------------------------------------------------------------- the grid

def test_the_grid_has_every_loss_in_every_cell_once():
    for name in ("successors", "successors_quick"):
        plan = plan_grid(name, seeds=1)
        assert len(plan) == len({c.run_name() for c in plan}) == len(SUCCESSOR_LOSSES) * len(CELLS)
        cells = {(c.loss, c.noise, "asymmetric" if "asymmetric" in c.noise_type else "symmetric") for c in plan}
        assert cells == {(loss, eta, f) for loss in SUCCESSOR_LOSSES for f, eta in CELLS}
    assert PRESETS["successors"].seeds == 3 and PRESETS["successors_quick"].cpu_workers == 2
    quick = plan_grid("successors_quick")
    assert {(c.train_subset, c.test_subset, c.epochs, c.width) for c in quick} == {(1500, 1000, 5, 0.125)}
    # a selection: aliases resolve, a noise rate picks it in every family that has it
    some = plan_grid("successors_quick", losses=["jal-ce", "ce"], noise=[0.2])
    assert [(c.loss, c.noise_type) for c in some] == [
        ("ce", "ma2020_symmetric"), ("nce+amse", "exact_symmetric"), ("ce", "asymmetric"),
        ("nce+amse", "exact_asymmetric")]
    with pytest.raises(ValueError, match="unknown loss"):
        plan_grid("successors", losses=["nce+mae"])
    with pytest.raises(ValueError, match="unknown noise rate"):
        plan_grid("successors", noise=[0.5])


def test_the_grid_command_plans_the_successors_quick_grid():
    proc = subprocess.run([sys.executable, "-m", "apl", "grid", "--preset", "successors_quick", "--dry-run",
                           "--losses", "anl-ce,ece+mae", "--noise", "0.0", "0.4"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = proc.stdout.split("\n")[:-2]
    assert [n.rsplit("_", 2)[0] for n in names] == [
        "anl-ce_ma2020_xsym0", "ece+mae_ma2020_msym0", "anl-ce_ma2020_xsym0.4", "ece+mae_ma2020_msym0.4",
        "anl-ce_ma2020_xasym0.4", "ece+mae_ma2020_asym0.4"]
    assert "6 runs, 30 epochs" in proc.stdout


# --------------------------------------------------------------------------- published numbers

def test_published_numbers_come_from_one_table_with_its_source():
    published = successor_numbers()
    assert "NeurIPS 2024, Table 2" in published["source"] and "last-epoch" in published["metric"]
    assert successor_accuracy("nce+agce", 0.8) == 49.98 and successor_accuracy("ece+mae", 0.4, "asymmetric") == 78.91
    assert successor_accuracy("ce", 0.2, "asymmetric") == 83.82  # a baseline: the "ma2020" row of that table
    assert successor_accuracy("anl-ce", 0.8) is None and successor_accuracy("agce", 0.0) is None
    for family, etas in SUCCESSOR_NOISE.items():
        for loss, row in published[family].items():
            assert set(row) <= {f"{e:.1f}" for e in etas}, (family, loss)
    with pytest.raises(ValueError, match="noise family"):
        successor_accuracy("ce", 0.2, "instance")


# --------------------------------------------------------------------------- the report

def _accuracy(loss: str, family: str, eta: float, seed: int) -> float:
    """A closed-form accuracy: falls with eta, differs per loss, family and seed."""
    return round(80.0 - 50.0 * eta - (5.0 if family == "asymmetric" else 0.0)
                 + 0.5 * SUCCESSOR_LOSSES.index(loss) + 0.25 * seed, 2)


def write_successor_runs(root: Path, seeds=(0,), losses=SUCCESSOR_LOSSES, preset="successors_quick") -> list[dict]:
    records = []
    for cfg in plan_grid(preset, seeds=len(seeds), losses=losses, overrides={"epochs": 2}):
        family = "asymmetric" if "asymmetric" in cfg.noise_type else "symmetric"
        accs = [_accuracy(cfg.loss, family, cfg.noise, cfg.seed) + d for d in (3.0, 0.0)]
        rate = cfg.noise * (0.9 if cfg.noise_type == "asymmetric" else 1.0)
        rec = {"run_name": cfg.run_name(), "loss": cfg.loss, "variant": cfg.variant, "noise": cfg.noise,
               "noise_type": cfg.noise_type, "seed": cfg.seed, "config": cfg.to_dict(),
               "history": [{"epoch": e + 1, "test_acc": a, "train_acc_noisy": 50.0, "train_loss": 1.0}
                           for e, a in enumerate(accs)],
               "final_test_acc": accs[-1], "best_test_acc": max(accs), "best_epoch": 1,
               "noise_record": {"kind": cfg.noise_type, "eta": cfg.noise, "realised_rate": rate},
               "data_source": "fixture: generated records", "wall_time_s": 1.0,
               "finished_at": "2025-01-01T00:00:00+00:00"}
        (root / "runs" / rec["run_name"]).mkdir(parents=True)
        (root / "runs" / rec["run_name"] / "result.json").write_text(json.dumps(rec))
        records.append(rec)
    (root / "manifest.json").write_text(json.dumps({
        "preset": preset, "overrides": {"epochs": 2}, "command": f"python -m apl grid --preset {preset}",
        "forms": [["ma2020", "successors"]], "devices": [{"device": "cpu", "name": "fixture CPU"}],
        "torch_version": "x", "started_at": "2025-01-01T00:00:00+00:00", "finished_at": None,
        "runs": {r["run_name"]: {} for r in records}}))
    return records


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("successors")
    write_successor_runs(root, seeds=(0, 1))
    out = tmp_path_factory.mktemp("report")
    return out, make_report(root, out, command="python -m apl report --runs R --out O"), root


def test_the_report_writes_a_table_and_a_figure_per_noise_family(report):
    out, written, _ = report
    names = sorted(p.name for p in written)
    assert names == sorted(["README.md"] + [f"table_{f}.{e}" for f in SUCCESSOR_NOISE for e in ("md", "csv")]
                           + [f"figure_{f}.{e}" for f in SUCCESSOR_NOISE for e in ("png", "pdf")])
    assert all((out / n).stat().st_size > 500 for n in names)
    md = (out / "table_symmetric.md").read_text()
    assert "SUCCESSORS_QUICK PRESET" in md and "not the paper's protocol" in md and "NeurIPS 2024, Table 2" in md
    # a cell: mean ± std over the two seeds, the published number, the difference
    ours = (_accuracy("nce+agce", "symmetric", 0.8, 0) + _accuracy("nce+agce", "symmetric", 0.8, 1)) / 2
    assert "| NCE+AGCE | " in md and f"{ours:.2f} ± 0.18 | 49.98 | {ours - 49.98:+.2f} |" in md
    assert "| ANL-CE | ANL: L1 5e-05, exact counts noise, alpha=5, beta=5, min_prob=1e-07 |" in md
    assert "| ECE+MAE | epsilon-softmax: L2 0.0001, APL-style noise, alpha=0.01, beta=5, m=100000 |" in md
    asym = (out / "table_asymmetric.md").read_text()
    assert "| ECE+MAE | epsilon-softmax: L2 0.0001, APL-style (cascading pairs) noise, alpha=0.02, beta=5, m=1000 |" \
        in asym and "η=0.1 ours" in asym and "η=0.8" not in asym


def test_the_report_csv_has_every_cell_and_metric(report):
    out, _, _ = report
    rows = list(csv.DictReader(io.StringIO((out / "table_asymmetric.csv").read_text())))
    assert len(rows) == 2 * len(SUCCESSOR_LOSSES) * len(SUCCESSOR_NOISE["asymmetric"])
    cell = next(r for r in rows if (r["metric"], r["loss"], r["noise"]) == ("final", "nce+aul", "0.3"))
    assert (cell["n_seeds"], cell["seeds"], cell["published"]) == ("2", "0 1", "85.28")
    best = next(r for r in rows if (r["metric"], r["loss"], r["noise"]) == ("best", "nce+aul", "0.3"))
    assert float(best["ours_mean"]) == pytest.approx(float(cell["ours_mean"]) + 3.0)


def test_the_readme_names_the_source_the_missing_numbers_and_the_realised_rates(report):
    out, _, _ = report
    text = (out / "README.md").read_text()
    assert "No published number was found for: AGCE, AUL, AEL, ANL-CE, ANL-FL, NCE+AMSE, NFL+AMSE, ECE, EFL" in text
    assert "| `asymmetric` | APL-style (cascading pairs) | 0.4 | 0.3600 |" in text
    assert "| `exact_asymmetric` | exact counts | 0.4 | 0.4000 |" in text
    assert "fixture CPU" in text and "`table_symmetric.md`" in text


def test_the_report_is_deterministic_and_refuses_the_papers_references(report, tmp_path):
    out, written, root = report
    again = make_report(root, tmp_path / "again", command="python -m apl report --runs R --out O")
    for a, b in zip(written, again):
        assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name
    with pytest.raises(ValueError, match="successors' report compares"):
        make_report(root, tmp_path / "x", reference="paper")


def test_committed_successors_quick_tables_rebuild_from_their_committed_run_records(tmp_path):
    """paper_figures/successors_quick/ ships the run records it was made from: every run of its manifest
    has its result.json there, and the tables rebuilt from them are the committed ones."""
    committed_dir = ROOT / "paper_figures" / "successors_quick"
    records = committed_dir / "run_records"
    manifest = json.loads((records / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["preset"] == "successors_quick"
    assert sorted(p.parent.name for p in (records / "runs").glob("*/result.json")) == sorted(manifest["runs"])
    make_report(records, tmp_path, figures=False)
    committed = sorted(committed_dir.glob("table_*"))
    assert len(committed) == 2 * len(NOISE_FAMILIES)  # md and csv per noise family
    for path in committed:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_report_command_without_a_manifest_still_reports_the_successors(tmp_path):
    write_successor_runs(tmp_path / "g", losses=["ce", "anl-ce"])
    (tmp_path / "g" / "manifest.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "apl", "report", "--runs", str(tmp_path / "g"), "--out",
                           str(tmp_path / "o"), "--no-figures"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "o" / "table_symmetric.md").read_text()
    assert "PRESET UNKNOWN" in md and "| ANL-CE | ANL: L1 5e-05" in md and "| AGCE | no runs |" in md


# --------------------------------------------------------------------------- reproduce.sh

def test_reproduce_quick_successors_runs_the_grid_and_writes_the_report(tmp_path):
    write_cifar10_folder(tmp_path / "data", n_train=100, n_test=40, seed=0)
    shrink = ["--", "--losses", "ce", "anl-ce", "ece+mae", "--noise", "0.0", "0.4", "--epochs", "1",
              "--set", "train_subset=40", "--set", "test_subset=20", "--set", "width=0.0625",
              "--set", "batch_size=20", "--no-progress"]
    proc = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "--quick", "--preset", "successors", "--data-dir",
                           "data", "--out", "o", "--devices", "cpu", *shrink], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs, figures = tmp_path / "o" / "runs" / "successors_quick", tmp_path / "o" / "paper_figures" / "successors_quick"
    manifest = json.loads((runs / "manifest.json").read_text())
    assert manifest["preset"] == "successors_quick" and len(manifest["runs"]) == 3 * 3
    results = [json.loads(p.read_text()) for p in (runs / "runs").glob("*/result.json")]
    assert len(results) == 9
    anl = [r for r in results if r["loss"] == "anl-ce"]
    assert {r["noise_record"]["kind"] for r in anl} == {"exact_symmetric", "exact_asymmetric"}
    assert all(r["config"]["l1"] == 5e-5 for r in anl)
    for name in ("table_symmetric.md", "table_asymmetric.csv", "figure_asymmetric.png", "README.md"):
        assert (figures / name).stat().st_size > 500, name
    bad = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "--quick", "--preset", "author"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no quick variant" in bad.stderr
