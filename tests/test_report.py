"""The report (apl.report, apl.records' loading) from fixed run records: golden tables, statistics,
stamps, figures, errors.

The records are generated here by code (accuracies from a closed formula), so the tables
are fully determined. The golden files under tests/golden/report/ were produced by
``make_report`` once and reviewed by eye; regenerate them after an intended format change
with ``APL_UPDATE_GOLDEN=1 pytest tests/test_report.py`` and review the diff.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from apl.config import TrainConfig
from apl.presets import GRID_LOSSES, GRID_NOISE, GRID_VARIANTS, PRESETS, is_variant_free, protocol_variant
from apl.records import load_run_records
from apl.report import make_report
from apl.report.cells import group_runs, table_rows
from apl.report.figures import EPOCH_PANELS, FIGURE1_LOSSES, FIGURE_NOISE, draw_epoch_figure
from apl.report.readme import nce_ce_pair
from apl.report.stamp import preset_banner

GOLDEN = Path(__file__).parent / "golden" / "report"
QUICK = Path(__file__).resolve().parents[1] / "paper_figures" / "quick"  # committed quick report
TABLES = [f"table1_{v}.{ext}" for v in GRID_VARIANTS for ext in ("md", "csv", "tex")]
EPOCHS = 3


#: The protocol of each form of the paper's grid (the fixture's records follow it).
PROTOCOL_OF = dict(PRESETS["paper"].forms)


def fake_accuracy(loss: str, variant: str, noise: float, seed: int, epoch: int) -> float:
    """A closed-form test accuracy: falls with noise, differs per loss/variant/seed/epoch."""
    i = GRID_LOSSES.index(loss)
    peak = 85.0 - 70.0 * noise + 1.25 * i - {"ma2020": 2.5, "author": 1.5}.get(variant, 0.0)
    # Rises to a peak at epoch 2, then drops under noise: best and final differ.
    shape = {1: -8.0, 2: 0.0, 3: -20.0 * noise}[epoch]
    return round(peak + shape + 0.75 * seed, 2)


def fake_train_accuracy(loss: str, variant: str, noise: float, seed: int, epoch: int) -> float:
    """A closed-form training accuracy on the noisy labels: keeps rising (memorisation), never the test one."""
    return round(30.0 + 12.0 * epoch + 0.5 * GRID_LOSSES.index(loss) + 0.25 * seed - 10.0 * noise, 2)


def _record(loss, variant, noise, seed, protocol=None) -> dict:
    """A run record of ``loss`` under ``variant``'s form (its protocol), scaled down as the quick preset."""
    cfg = TrainConfig.from_protocol(protocol or PROTOCOL_OF[variant], loss=loss, variant=variant,
                                    noise=noise, seed=seed, width=0.125, epochs=EPOCHS,
                                    train_subset=400, test_subset=200)
    history = [{"epoch": e, "test_acc": fake_accuracy(loss, variant, noise, seed, e),
                "train_acc_noisy": fake_train_accuracy(loss, variant, noise, seed, e),
                "train_loss": 1.0 / e, "epoch_time_s": 0.5} for e in range(1, EPOCHS + 1)]
    accs = [h["test_acc"] for h in history]
    return {"run_name": cfg.run_name(), "loss": loss, "variant": variant, "noise": noise,
            "noise_type": cfg.noise_type, "seed": seed, "config": cfg.to_dict(), "history": history,
            "final_test_acc": accs[-1], "best_test_acc": max(accs),
            "best_epoch": accs.index(max(accs)) + 1, "final_train_acc_noisy": history[-1]["train_acc_noisy"],
            "data_source": "fixture: generated records", "data_official": False,
            "wall_time_s": 1.5, "finished_at": "2025-01-01T00:00:00+00:00"}


def write_runs(root: Path, seeds=(0, 1), noise=GRID_NOISE, losses=GRID_LOSSES,
               manifest: dict | None = None) -> list[dict]:
    """A paper-preset grid's records: CE once per protocol, noise and seed, labelled with the
    protocol's variant (the author's, and the paper's shared by the paper and ma2020 forms)."""
    records = []
    for seed in seeds:
        for variant in GRID_VARIANTS:
            for eta in noise:
                for loss in losses:
                    if is_variant_free(loss) and variant != protocol_variant(PROTOCOL_OF[variant]):
                        continue
                    rec = _record(loss, variant, eta, seed)
                    run = root / "runs" / rec["run_name"]
                    run.mkdir(parents=True)
                    (run / "result.json").write_text(json.dumps(rec))
                    records.append(rec)
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest))
    return records


MANIFEST = {"preset": "quick", "overrides": {}, "command": "python -m apl grid --preset quick",
            "forms": [list(f) for f in PRESETS["quick"].forms],
            "devices": [{"device": "cpu", "name": "fixture CPU"}], "torch_version": "x",
            "started_at": "2025-01-01T00:00:00+00:00", "finished_at": None, "runs": {}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    write_runs(root, manifest=MANIFEST)
    out = tmp_path_factory.mktemp("figures")
    written = make_report(root, out, command="python -m apl report --runs R --out O")
    return root, out, written


def test_tables_match_golden_files(report):
    _, out, _ = report
    if os.environ.get("APL_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            (GOLDEN / name).write_bytes((out / name).read_bytes())
    for name in TABLES:
        assert (out / name).read_bytes() == (GOLDEN / name).read_bytes(), name


def test_same_records_give_byte_identical_tables_and_figures(report, tmp_path):
    root, out, written = report
    make_report(root, tmp_path)
    for path in written:
        if path.name != "README.md":  # the README names the output folder
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_figures_and_readme_are_written(report):
    _, out, written = report
    for variant in GRID_VARIANTS:
        for n in (1, 2, 3):
            png = out / f"figure{n}_{variant}.png"
            pdf = out / f"figure{n}_{variant}.pdf"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
            assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    readme = (out / "README.md").read_text()
    # Every written file is described, and the stamp names the preset.
    for path in written:
        if path.name != "README.md":
            assert f"`{path.name}`" in readme
    assert "QUICK PRESET" in readme and "not the paper's protocol" in readme
    assert "fixture CPU" in readme


def test_cells_are_mean_and_sample_std_over_seeds_minus_the_paper():
    records = [_record(loss, "paper", 0.6, s) for loss in ("nce", "ce") for s in (0, 1, 2)]
    for r in records:
        r["_run"] = r["run_name"]
    cells = group_runs(records)["paper"]
    rows = {(r["loss"], r["noise"]): r for r in table_rows(cells, "final", "paper")}
    finals = [fake_accuracy("nce", "paper", 0.6, s, EPOCHS) for s in (0, 1, 2)]
    row = rows[("nce", 0.6)]
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["mean"] == pytest.approx(statistics.fmean(finals))
    assert row["std"] == pytest.approx(statistics.stdev(finals))
    assert row["reference"] == 53.70  # the paper's Table 1, NCE at eta = 0.6
    assert row["diff"] == pytest.approx(row["mean"] - 53.70)
    best = {(r["loss"], r["noise"]): r for r in table_rows(cells, "best", "paper")}
    assert best[("nce", 0.6)]["mean"] == pytest.approx(
        statistics.fmean(max(fake_accuracy("nce", "paper", 0.6, s, e) for e in (1, 2, 3))
                         for s in (0, 1, 2)))
    # Cells without runs, and the clean column against the paper, have no numbers.
    assert rows[("nfl", 0.6)]["mean"] is None and rows[("nfl", 0.6)]["n"] == 0
    assert rows[("ce", 0.0)]["reference"] is None


def test_a_ce_run_serves_the_forms_of_its_protocol_only(tmp_path):
    records = write_runs(tmp_path, seeds=(0,), noise=(0.2,), losses=("ce", "nce"))
    groups = group_runs(load_run_records(tmp_path))
    assert len(records) == 5  # ce once per protocol (author, paper), nce per form
    assert [r["variant"] for r in groups["author"][("ce", 0.2)]] == ["author"]  # trained as the author's code
    for variant in ("paper", "ma2020"):  # both trained under the paper's protocol: one CE run
        assert [r["variant"] for r in groups[variant][("ce", 0.2)]] == ["paper"]
    for variant in GRID_VARIANTS:
        assert [r["variant"] for r in groups[variant][("nce", 0.2)]] == [variant]


def test_banner_says_whose_protocol_it_is():
    assert preset_banner("paper", "author", "author", "P").startswith(
        "PAPER PRESET, form author (the author's code): P")
    assert preset_banner("paper", "ma2020", "paper", "P").endswith("the full protocol")
    assert "not the paper's protocol" in preset_banner("paper", "paper", "paper", "P", {"epochs": 1})
    assert preset_banner("quick", "paper", "paper", "P").startswith("QUICK PRESET, form paper (the paper's text): P")
    assert preset_banner("quick", "paper", "paper", "P").endswith("not the paper's protocol")
    assert preset_banner(None, "paper", None, "P").startswith("PRESET UNKNOWN (no manifest.json), form paper: P")


def test_single_seed_cells_show_no_std_and_missing_cells_a_dash(tmp_path):
    write_runs(tmp_path / "g", seeds=(0,), noise=(0.2, 0.6), manifest=MANIFEST)
    make_report(tmp_path / "g", tmp_path / "o", figures=False)
    md = (tmp_path / "o" / "table1_paper.md").read_text()
    nce = next(line for line in md.splitlines() if line.startswith("| NCE |"))
    cells = [c.strip() for c in nce.strip("|").split("|")]
    final = fake_accuracy("nce", "paper", 0.2, 0, EPOCHS)
    # Loss, clean (no run: dash), then eta=0.2: ours, paper, diff.
    assert cells[:5] == ["NCE", "—", f"{final:.2f}", "73.07", f"{final - 73.07:+.2f}"]
    assert "±" not in nce
    assert "single run per cell (seed 0)" in md


def test_ma2020_preset_compares_with_the_cited_works_numbers(tmp_path):
    write_runs(tmp_path / "g", seeds=(0,), noise=(0.0, 0.8), losses=("ce", "nce+rce"),
               manifest=dict(MANIFEST, preset="ma2020"))
    make_report(tmp_path / "g", tmp_path / "o", figures=False)
    csv_lines = (tmp_path / "o" / "table1_ma2020.csv").read_text().splitlines()
    ce_clean = next(line for line in csv_lines if line.startswith("ma2020,final,ce,0.0,"))
    assert ce_clean.split(",")[8:10] == ["90.50", "ma2020"]
    md = (tmp_path / "o" / "table1_ma2020.md").read_text()
    assert "MA2020 PRESET" in md and "clean publ." in md


def test_no_manifest_still_reports_with_an_unknown_preset_stamp(tmp_path):
    write_runs(tmp_path / "g", seeds=(0,), noise=(0.6,))
    make_report(tmp_path / "g", tmp_path / "o", figures=False)
    assert "PRESET UNKNOWN" in (tmp_path / "o" / "table1_paper.md").read_text()
    assert "no manifest.json" in (tmp_path / "o" / "README.md").read_text()


def test_bad_inputs_raise_value_errors_naming_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_report(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished runs"):
        make_report(tmp_path / "empty", tmp_path / "o")
    bad = tmp_path / "bad" / "runs" / "x"
    bad.mkdir(parents=True)
    (bad / "result.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read run record .*x.result\.json"):
        make_report(tmp_path / "bad", tmp_path / "o")
    (bad / "result.json").write_text(json.dumps({"loss": "ce"}))
    with pytest.raises(ValueError, match="lacks variant, noise, seed"):
        make_report(tmp_path / "bad", tmp_path / "o")
    with pytest.raises(ValueError, match="reference must be"):
        write_runs(tmp_path / "ok", seeds=(0,), noise=(0.2,), losses=("ce",))
        make_report(tmp_path / "ok", tmp_path / "o", reference="other")


def test_two_records_of_one_cell_are_an_error(tmp_path):
    write_runs(tmp_path, seeds=(0,), noise=(0.2,), losses=("nce",))
    rec = json.loads(next((tmp_path / "runs").glob("nce_paper*/result.json")).read_text())
    (tmp_path / "runs" / "copy").mkdir()
    (tmp_path / "runs" / "copy" / "result.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="same grid cell"):
        make_report(tmp_path, tmp_path / "o")


def test_runs_outside_the_grid_are_left_out(tmp_path):
    write_runs(tmp_path, seeds=(0,), noise=(0.2,), losses=("ce",))
    extra = _record("ce", "paper", 0.2, 0)
    extra.update(noise_type="asymmetric", run_name="asym")
    (tmp_path / "runs" / "asym").mkdir()
    (tmp_path / "runs" / "asym" / "result.json").write_text(json.dumps(extra))
    groups = group_runs(load_run_records(tmp_path))
    assert len(groups["paper"][("ce", 0.2)]) == 1


def test_committed_quick_tables_rebuild_from_their_committed_run_records(tmp_path):
    """paper_figures/quick/ ships the run records it was made from (README): every run of its
    manifest has its result.json there, and the tables rebuilt from them are the committed ones."""
    records = QUICK / "run_records"
    manifest = json.loads((records / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(r["_run"] for r in load_run_records(records)) == sorted(manifest["runs"])
    make_report(records, tmp_path, figures=False)
    committed = sorted(QUICK.glob("table1_*"))
    assert len(committed) == 3 * len(GRID_VARIANTS)  # md, csv, tex per form
    for path in committed:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


# --------------------------------------------------------------------------- the author form and Figures 1-2

def _cells(variant: str, losses, noise=FIGURE_NOISE, seeds=(0,)) -> dict:
    records = [_record(loss, variant, noise, seed) for loss in losses for seed in seeds]
    for r in records:
        r["_run"] = r["run_name"]
    return group_runs(records)[variant]


@pytest.mark.parametrize("number, losses", [(1, FIGURE1_LOSSES), (2, GRID_LOSSES)])
def test_figures_1_2_plot_noisy_training_accuracy_left_and_test_accuracy_right(number, losses):
    """As the paper drew them: the left panel is each run's training accuracy on its noisy labels
    (train_acc_noisy), the right one clean test accuracy, one line per loss of the figure."""
    fig = draw_epoch_figure(number, losses, "author", _cells("author", GRID_LOSSES, seeds=(0, 1)), ["stamp"])
    assert [key for key, _, _ in EPOCH_PANELS] == ["train_acc_noisy", "test_acc"]
    for ax, fake in zip(fig.axes, (fake_train_accuracy, fake_accuracy)):
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert sorted(lines) == sorted(loss.upper() for loss in losses)
        for loss in losses:
            x, y = lines[loss.upper()].get_data()
            assert list(x) == list(range(1, EPOCHS + 1))
            expected = [statistics.fmean(fake(loss, "author", FIGURE_NOISE, s, e) for s in (0, 1))
                        for e in range(1, EPOCHS + 1)]
            assert list(y) == pytest.approx(expected)
    assert fig.axes[1].get_legend() is not None  # the losses named once, right of the test panel


def test_readme_lists_the_author_form_first_and_says_where_text_and_code_differ(report):
    _, out, _ = report
    readme = (out / "README.md").read_text()
    tables = readme[readme.index("## Tables"):readme.index("## Where")]
    positions = [tables.index(f"`table1_{v}.md`") for v in ("author", "paper", "ma2020")]
    assert positions == sorted(positions)
    assert "faithful reproduction" in tables[positions[0]:positions[1]]
    files = readme[readme.index("## Files"):]
    assert files.index("table1_author.md") < files.index("table1_paper.md") < files.index("table1_ma2020.md")
    differ = readme[readme.index("## Where the paper's text and its code differ"):readme.index("## Machine")]
    for topic in ("APL weights", "MAE and RCE", "NCE", "Focal exponent", "Initialisation", "Noise",
                  "What is plotted"):
        assert f"**{topic}" in differ, topic
    assert "0.4 · active + 0.6 · passive" in differ and "0.2 (1 − p_y)" in differ


def test_the_measured_nce_ce_pair_is_read_from_the_author_forms_records(report):
    """The README's NCE-vs-CE rows are the author form's own records (mean over the seeds), per eta."""
    _, out, _ = report
    readme = (out / "README.md").read_text()
    for noise in GRID_NOISE:
        ce, nce = (statistics.fmean(fake_accuracy(loss, "author", noise, s, EPOCHS) for s in (0, 1))
                   for loss in ("ce", "nce"))
        ce_train, nce_train = (statistics.fmean(fake_train_accuracy(loss, "author", noise, s, EPOCHS)
                                                for s in (0, 1)) for loss in ("ce", "nce"))
        heading = "clean" if noise == 0.0 else f"η={noise:.1f}"
        assert (f"| {heading} | {ce:.2f} | {nce:.2f} | {nce - ce:+.2f} | {ce_train:.2f} | {nce_train:.2f} |"
                in readme), noise
    rows = nce_ce_pair(_cells("author", ("ce", "nce"), noise=0.4))
    assert [r["noise"] for r in rows] == [0.4]
    assert rows[0]["nce_test"] == fake_accuracy("nce", "author", 0.4, 0, EPOCHS)


def test_without_author_runs_the_pair_is_said_to_be_missing(tmp_path):
    run = tmp_path / "g" / "runs"
    for loss in ("ce", "nce"):
        rec = _record(loss, "paper", 0.6, 0)
        (run / rec["run_name"]).mkdir(parents=True)
        (run / rec["run_name"] / "result.json").write_text(json.dumps(rec))
    make_report(tmp_path / "g", tmp_path / "o", figures=False)
    readme = (tmp_path / "o" / "README.md").read_text()
    assert "No author-form CE and NCE runs" in readme and not (tmp_path / "o" / "table1_author.md").exists()


def test_records_of_an_earlier_version_are_left_out_and_named(tmp_path):
    """A record whose name is not the one this version gives its config (e.g. the earlier paper
    protocol: implicit gamma 0.5, batch 128, no init/normalize fields) is never reported as a run."""
    write_runs(tmp_path / "g", seeds=(0,), noise=(0.6,), losses=("nfl",))
    old = _record("nfl", "paper", 0.6, 1)
    old["config"] = {k: v for k, v in old["config"].items() if k not in ("init", "normalize")}
    old["config"].update(batch_size=128, loss_params={})
    old["run_name"] = "nfl_paper_sym0.6_s1"
    (tmp_path / "g" / "runs" / old["run_name"]).mkdir()
    (tmp_path / "g" / "runs" / old["run_name"] / "result.json").write_text(json.dumps(old))
    make_report(tmp_path / "g", tmp_path / "o", figures=False)
    md = (tmp_path / "o" / "table1_paper.md").read_text()
    assert "single run per cell (seed 0)" in md  # seed 1 is the old run: not in the table
    assert "Left out: 1 run record(s) written by an earlier version" in (tmp_path / "o" / "README.md").read_text()
    only_old = tmp_path / "old"
    (only_old / "runs" / "x").mkdir(parents=True)
    (only_old / "runs" / "x" / "result.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="written by an earlier version"):
        make_report(only_old, tmp_path / "o2")
