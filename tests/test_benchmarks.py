"""The benchmark script runs and prints the table it documents (times are not checked here:
speed goals live in the benchmark's own output, benchmarks/RESULTS.md)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_fused

from benchmarks import bench_losses as bench
from benchmarks import compare_builds

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["benchmarks.bench_losses", "benchmarks.compare_builds", "benchmarks.rerun_records"])
def test_the_benchmarks_run_as_modules_of_the_checkout(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def printed_table(out: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the Markdown table a benchmark printed."""
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    cells = [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[1:]


@requires_fused
def test_bench_losses_prints_one_row_per_loss_and_shape(capsys):
    assert bench.main(["--quick", "--no-compile", "--min-time", "0",
                       "--losses", "CE", "NCE+RCE (ma2020)"]) == 0
    header, rows = printed_table(capsys.readouterr().out)
    assert header == ["loss", "N", "C", "fused", "module", "reference", "compiled", "F.cross_entropy", "floor",
                      "reference/fused", "compiled/fused", "fused/F.ce", "module/F.ce", "reference/floor"]
    # --quick: N in {128, 1000} x C in {10, 1000}, for each loss asked for
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (loss, n, c) for loss in ("CE", "NCE+RCE (ma2020)") for n in ("128", "1000") for c in ("10", "1000")]
    number = re.compile(r"^\d+(\.\d+)?$")
    ratio = re.compile(r"^\d+\.\d\dx$")
    for r in rows:
        cells = dict(zip(header, r))
        for col in ("fused", "module", "reference", "floor"):
            assert number.match(cells[col]), (col, r)
        assert cells["compiled"] == "-" and cells["compiled/fused"] == "-"  # --no-compile
        assert ratio.match(cells["reference/fused"]) and ratio.match(cells["reference/floor"]), r
        if cells["loss"] == "CE":
            assert number.match(cells["F.cross_entropy"]) and ratio.match(cells["fused/F.ce"]), r
            assert ratio.match(cells["module/F.ce"]), r
        else:
            assert cells["F.cross_entropy"] == "-" and cells["fused/F.ce"] == "-" == cells["module/F.ce"], r


@requires_fused
def test_bench_losses_takes_its_shapes_from_the_options(capsys):
    assert bench.main(["--ns", "3", "--cs", "10,20", "--no-compile", "--min-time", "0", "--losses", "CE"]) == 0
    rows = [ln.split("|")[1:4] for ln in capsys.readouterr().out.splitlines() if ln.startswith("| CE")]
    assert [tuple(c.strip() for c in r) for r in rows] == [("CE", "3", "10"), ("CE", "3", "20")]
    with pytest.raises(SystemExit):
        bench.main(["--ns", "0,x"])


def test_bench_losses_rejects_an_unknown_loss(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--no-compile", "--min-time", "0", "--losses", "nonsense"])
    assert exc.value.code == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_compare_builds_table_takes_medians_over_rounds(tmp_path, capsys):
    before = [{"CE|128|1000": t} for t in (1e-3, 3e-3, 2e-3)]
    now = [{"CE|128|1000": t} for t in (1e-3, 1e-3)]
    files = []
    for i, run in enumerate(before + now):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(run))
    assert compare_builds.main(["table", "--before", *map(str, files[:3]), "--now", *map(str, files[3:])]) == 0
    out = capsys.readouterr().out
    assert "| CE | 128 | 1000 | 2.000 | 1.000 | 0.50x |" in out
    assert "median 0.50x" in out
    with pytest.raises(SystemExit):
        compare_builds.main(["table", "--before", str(files[0])])


@requires_fused
def test_bench_losses_times_the_segmentation_layout(capsys):
    assert bench.main(["--shape", "2,5,4,4", "--min-time", "0", "--losses", "CE", "NCE (paper)"]) == 0
    header, rows = printed_table(capsys.readouterr().out)
    assert header == ["loss", "shape", "fused", "fused on rows", "reference", "F.cross_entropy",
                      "reference/fused", "fused/F.ce"]
    assert [(r[0], r[1]) for r in rows] == [("CE", "2x5x4x4"), ("NCE (paper)", "2x5x4x4")]
    assert rows[0][5] != "-" and rows[1][5] == "-"  # F.cross_entropy only on the CE row
    assert bench.main(["--shape", "2,5", "--min-time", "0"]) == 2


@requires_fused
def test_bench_losses_times_the_distribution_targets(capsys):
    assert bench.main(["--soft", "--ns", "8", "--cs", "3,40", "--min-time", "0"]) == 0
    header, rows = printed_table(capsys.readouterr().out)
    assert header == ["loss", "N", "C", "fused", "reference", "F.cross_entropy", "reference/fused", "fused/F.ce"]
    assert [(r[0], r[2]) for r in rows] == [(name, c) for name in bench.SOFT_LOSSES for c in ("3", "40")]
    ce_rows = [r for r in rows if r[0].startswith("CE")]
    assert all(r[5] != "-" for r in ce_rows) and all(r[5] == "-" for r in rows if r not in ce_rows)
    assert bench.main(["--soft", "--shape", "2,5,3,2", "--min-time", "0"]) == 0
    _, rows = printed_table(capsys.readouterr().out)
    assert [(r[0], r[1]) for r in rows] == [(name, "2x5x3x2") for name in bench.SOFT_LOSSES]
    assert all((r[5] != "-") == r[0].startswith("CE") for r in rows)


@requires_fused
def test_bench_losses_times_the_successors_against_their_official_formulas(capsys):
    assert bench.main(["--successors", "anl-ce", "ece+mae", "--ns", "8", "--cs", "3,40", "--min-time", "0",
                       "--no-compile"]) == 0
    header, rows = printed_table(capsys.readouterr().out)
    assert header == ["loss", "N", "C", "fused", "module", "official", "official compiled", "official/fused",
                      "compiled/fused"]
    assert [(r[0], r[2]) for r in rows] == [(name, c) for name in ("anl-ce", "ece+mae") for c in ("3", "40")]
    assert all(r[3] != "-" and r[5] != "-" and r[6] == "-" for r in rows)
    assert bench.main(["--successors", "agce", "--ns", "4", "--cs", "5", "--min-time", "0"]) == 0
    _, rows = printed_table(capsys.readouterr().out)
    assert rows[0][6] != "-" and rows[0][8].endswith("x")


def test_rerun_records_picks_records_across_the_grid_and_names_what_differs():
    from benchmarks import rerun_records

    results = [{"run_name": f"run{i:02d}"} for i in range(10)]
    assert [r["run_name"] for r in rerun_records.pick(results, 3)] == ["run00", "run03", "run06"]
    assert len(rerun_records.pick(results, 20)) == 10
    assert rerun_records.differing_fields({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == ["b", "c"]
