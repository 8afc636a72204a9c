"""Sweeps without Ray: parsing --set/--lam/--gamma (apl.sweeps), their expansion into a grid's runs, and
the report of a sweep (apl.report.sweep): Table 1 at the grid's own value, a figure per swept axis."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from apl.cli import main
from apl.plan import plan_grid
from apl.records import load_manifest, load_run_records
from apl.report import make_report
from apl.report.sweep import split_sweep, sweep_points
from apl.sweeps import expand, make_sweep, parse_numbers, parse_set

PAIR = dict(losses=["ce", "nce+mae"], noise=[0.2], variants=["paper"])


# --------------------------------------------------------------------------- parsing

def test_set_values_split_on_commas_outside_json():
    assert parse_set(["lr=0.1,0.01", "optimizer=adam,sgd", "epochs=3"]) == {
        "lr": [0.1, 0.01], "optimizer": ["adam", "sgd"], "epochs": [3]}
    # A JSON value is one value, its commas included; a list of JSON objects splits between them.
    assert parse_set(['loss_params={"q": 0.5, "gamma": 1}']) == {"loss_params": [{"q": 0.5, "gamma": 1}]}
    assert parse_set(['loss_params={"q":0.5,"gamma":1},{"q":0.9}']) == {
        "loss_params": [{"q": 0.5, "gamma": 1}, {"q": 0.9}]}
    assert parse_set(["grad_clip=null", "augment=true"]) == {"grad_clip": [None], "augment": [True]}
    assert parse_set(["lr=0.1", "lr=0.2,0.3"]) == {"lr": [0.2, 0.3]}  # the last one given wins


@pytest.mark.parametrize("item, message", [
    ("lr", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("nosuch=1", "no such config field"),
    ("lam=0.2,0.4", "the sweep flag is --lam"), ("lr=0.1,", "empty value")])
def test_bad_set_items_are_value_errors(item, message):
    with pytest.raises(ValueError, match=message):
        parse_set([item])


def test_sweep_of_the_flags_keeps_their_order_and_drops_duplicates():
    assert parse_numbers(["0.2,0.4", "0.6"], "--lam") == [0.2, 0.4, 0.6]
    assert parse_numbers(None, "--lam") is None
    with pytest.raises(ValueError, match="--gamma takes numbers"):
        parse_numbers(["1,two"], "--gamma")
    sweep = make_sweep(lam=[0.2, 0.4, 0.2], gamma=[1.0], sets={"lr": [0.1, 0.01], "epochs": [3]})
    assert sweep == {"lam": [0.2, 0.4], "gamma": [1.0], "lr": [0.1, 0.01]}  # one --set value is an override
    assert make_sweep() == {}


# --------------------------------------------------------------------------- expansion

def test_lam_multiplies_the_apl_sums_only():
    plan = plan_grid("quick", sweep={"lam": [0.2, 0.4, 0.8]}, **PAIR)
    lams = sorted(c.loss_params["lam"] for c in plan if c.loss == "nce+mae")
    assert lams == [0.2, 0.4, 0.8] and [c.loss for c in plan].count("ce") == 1
    assert len({c.run_name() for c in plan}) == len(plan) == 4
    base = plan_grid("quick", **PAIR)
    assert [c.run_name() for c in plan_grid("quick", sweep={}, **PAIR)] == [c.run_name() for c in base]
    # The grid's own λ is one of the sweep's points: the same run (folder) as without the sweep.
    own = next(c for c in base if c.loss == "nce+mae")
    assert own.run_name() in {c.run_name() for c in plan_grid("quick", sweep={"lam": [0.6, 0.2]}, **PAIR)}


def test_gamma_applies_to_focal_losses_and_fields_to_every_run():
    plan = plan_grid("quick", losses=["nce", "nfl", "nfl+rce"], noise=[0.4], variants=["paper"],
                     sweep={"gamma": [1.0, 3.0], "lr": [0.01, 0.001]})
    by_loss = {}
    for c in plan:
        by_loss.setdefault(c.loss, []).append((c.loss_params.get("gamma"), c.lr))
    assert sorted(by_loss["nce"]) == [(None, 0.001), (None, 0.01)]  # NCE has no focal term
    for loss in ("nfl", "nfl+rce"):
        assert sorted(by_loss[loss]) == [(1.0, 0.001), (1.0, 0.01), (3.0, 0.001), (3.0, 0.01)]


def test_lam_replaces_the_cited_works_alpha_beta_weighting():
    (own,) = plan_grid("ma2020", seeds=1, losses=["nce+rce"], noise=[0.2])
    assert "lam" not in own.loss_params
    (swept,) = plan_grid("ma2020", seeds=1, losses=["nce+rce"], noise=[0.2], sweep={"lam": [0.3]})
    assert swept.loss_params["lam"] == 0.3 and not {"alpha", "beta"} & set(swept.loss_params)


@pytest.mark.parametrize("sweep, message", [
    ({"lam": [0.2]}, "none of the planned losses"),         # CE alone: no APL sum
    ({"gamma": [1.0]}, "none of the planned losses"),
    ({"seed": [0, 1]}, "cannot be swept"),                  # the grid's own axes have their own flags
    ({"noise": [0.2, 0.4]}, "cannot be swept"),
    ({"lr": []}, "no values"),
])
def test_bad_sweeps_are_value_errors(sweep, message):
    with pytest.raises(ValueError, match=message):
        plan_grid("quick", losses=["ce"], noise=[0.2], variants=["paper"], sweep=sweep)


def test_a_value_the_config_refuses_is_named():
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        plan_grid("quick", sweep={"lam": [0.5, 1.5]}, **PAIR)
    with pytest.raises(ValueError, match="lr must be a number"):
        expand(plan_grid("quick", **PAIR), {"lr": [0.1, "fast"]})


def test_grid_dry_run_lists_the_sweeps_runs(capsys):
    assert main(["grid", "--preset", "quick", "--losses", "ce", "nce+mae", "--noise", "0.2", "--variants", "paper",
                 "--lam", "0.2,0.4", "--set", "lr=0.01,0.001", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("6 runs")  # CE x 2 lr, NCE+MAE x 2 lam x 2 lr
    assert main(["grid", "--preset", "quick", "--losses", "ce", "--lam", "0.2", "--dry-run"]) == 2
    assert "active+passive" in capsys.readouterr().err


# --------------------------------------------------------------------------- the report of a sweep

def _accuracy(config) -> float:
    """A closed-form final accuracy that tells every λ apart (CE: 40)."""
    return round(50.0 + 10.0 * config.loss_params["lam"], 2) if "lam" in config.loss_params else 40.0


def _write_sweep(root: Path, sweep: dict, **selection) -> None:
    """Run records and manifest of a quick grid with ``sweep``, without training."""
    for cfg in plan_grid("quick", sweep=sweep, **selection):
        acc = _accuracy(cfg)
        history = [{"epoch": e, "test_acc": acc, "train_acc_noisy": acc, "train_loss": 1.0}
                   for e in range(1, cfg.epochs + 1)]
        record = {"run_name": cfg.run_name(), "loss": cfg.loss, "variant": cfg.variant, "noise": cfg.noise,
                  "noise_type": cfg.noise_type, "seed": cfg.seed, "config": cfg.to_dict(), "history": history,
                  "final_test_acc": acc, "best_test_acc": acc, "best_epoch": 1, "data_source": "fixture",
                  "wall_time_s": 1.0}
        (root / "runs" / cfg.run_name()).mkdir(parents=True)
        (root / "runs" / cfg.run_name() / "result.json").write_text(json.dumps(record))
    manifest = {"preset": "quick", "overrides": {}, "sweep": sweep, "runs": {}, "invocations": [],
                "forms": [["paper", "paper"]]}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _final_means(path: Path, variant: str, loss: str) -> dict[float, str]:
    rows = csv.DictReader(path.read_text().splitlines())
    return {float(r["noise"]): r["ours_mean"] for r in rows
            if r["variant"] == variant and r["metric"] == "final" and r["loss"] == loss and r["ours_mean"]}


@pytest.mark.parametrize("lams, shown", [([0.2, 0.6, 0.8], "56.00"),   # the paper's own λ = 0.6 is swept
                                         ([0.4, 0.2], "54.00")])       # it is not: the sweep's first value
def test_report_of_a_sweep_tables_one_run_per_cell_and_draws_accuracy_vs_lambda(tmp_path, lams, shown):
    _write_sweep(tmp_path / "grid", {"lam": lams}, losses=["ce", "nce+mae"], noise=[0.2, 0.6], variants=["paper"])
    paths = {p.name for p in make_report(tmp_path / "grid", tmp_path / "report")}
    assert {"sweep_lam_paper.png", "sweep_lam_paper.pdf", "table1_paper.csv"} <= paths
    assert _final_means(tmp_path / "report" / "table1_paper.csv", "paper", "nce+mae") == {0.2: shown, 0.6: shown}
    assert _final_means(tmp_path / "report" / "table1_paper.csv", "paper", "ce") == {0.2: "40.00", 0.6: "40.00"}
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "sweep_lam_paper.png" in readme and "Sweep: lam" in readme
    _, sweep = split_sweep(load_run_records(tmp_path / "grid"), load_manifest(tmp_path / "grid"))
    lines = sweep_points(sweep, "lam")["paper"]
    assert lines[0.6]["nce+mae"] == {lam: [50.0 + 10.0 * lam] for lam in lams} and "ce" not in lines[0.6]


def test_without_a_sweep_the_report_keeps_every_record(tmp_path):
    _write_sweep(tmp_path, {}, **PAIR)
    records = load_run_records(tmp_path)
    assert split_sweep(records, load_manifest(tmp_path)) == (records, None)
    assert split_sweep(records, None) == (records, None)
