"""The command line (apl.cli): ``apl train`` end to end, ``apl grid`` dry run, one-line errors."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apl.cli import main
from apl.errors import INTERRUPTED, NO_DATA
from apl.records import RESULT_FILE

# --------------------------------------------------------------------------- train

def test_cli_end_to_end(tmp_path, cifar_dir, capsys):
    out = tmp_path / "cli_run"
    code = main(["train", "--loss", "nce+rce", "--noise", "0.2", "--epochs", "1", "--width", "0.125",
                 "--batch-size", "32", "--data-dir", str(cifar_dir), "--out", str(out), "--device", "cpu",
                 "--num-threads", "1", "--quiet"])
    assert code == 0
    r = json.loads((out / RESULT_FILE).read_text())
    assert r["loss"] == "nce+rce" and r["variant"] == "paper" and r["config"]["loss_params"] == {"lam": 0.6}
    assert r["config"]["width"] == 0.125 and len(r["history"]) == 1
    printed = capsys.readouterr().out
    assert "final test acc" in printed and str(out) in printed


def test_cli_ma2020_protocol_and_params(tmp_path, cifar_dir):
    out = tmp_path / "m"
    code = main(["train", "--protocol", "ma2020", "--loss", "nfl+rce", "--alpha", "2", "--beta", "0.5",
                 "--noise", "0.4", "--epochs", "1", "--width", "0.125", "--batch-size", "32",
                 "--train-subset", "200", "--data-dir", str(cifar_dir), "--out", str(out), "--quiet",
                 "--device", "cpu"])
    assert code == 0
    r = json.loads((out / RESULT_FILE).read_text())
    c = r["config"]
    assert (c["model"], c["optimizer"], c["scheduler"], c["augment"], c["variant"]) == \
        ("ma2020", "sgd", "cosine", True, "ma2020")
    assert c["loss_params"] == {"alpha": 2.0, "beta": 0.5, "gamma": 0.5}
    assert r["noise_record"]["kind"] == "ma2020_symmetric"
    assert r["num_train"] == 200


def test_cli_errors_are_one_line(tmp_path, cifar_dir, capsys, monkeypatch):
    assert main(["train", "--noise", "1.5", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "a")]) == 2
    assert "noise" in capsys.readouterr().err
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert main(["train", "--epochs", "1", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == NO_DATA
    assert "cifar-10-batches-py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--protocol", "nope"])


# --------------------------------------------------------------------------- grid

def test_cli_rejects_bad_arguments_with_a_message(tmp_path):
    assert main(["grid", "--preset", "quick", "--out", str(tmp_path), "--set", "nosuch=1"]) == 2
    assert main(["grid", "--preset", "quick", "--out", str(tmp_path), "--noise", "high"]) == 2
    assert not (tmp_path / "manifest.json").exists()


def test_dry_run_lists_the_plan(capsys):
    # three forms: nfl in each, ce once per protocol (author's, paper's)
    assert main(["grid", "--preset", "quick", "--dry-run", "--losses", "ce,nfl", "--noise", "0.8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[-1].startswith("5 runs")
    assert main(["grid", "--preset", "author", "--dry-run", "--noise", "0.2", "0.4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("16 runs, 480 epochs") and all("_author_auth0." in n for n in lines[:-1])


def test_train_takes_the_init_and_normalisation(tmp_path, cifar_dir):
    out = tmp_path / "a"
    assert main(["train", "--protocol", "author", "--loss", "nce", "--epochs", "1", "--width", "0.125",
                 "--init", "kaiming", "--normalize", "cifar", "--train-subset", "100", "--data-dir",
                 str(cifar_dir), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    c = json.loads((out / RESULT_FILE).read_text())["config"]
    assert (c["variant"], c["batch_size"], c["init"], c["normalize"], c["noise_type"]) == \
        ("author", 64, "kaiming", "cifar", "author_symmetric")


# --------------------------------------------------------------------------- report

def test_report_rebuilds_the_committed_quick_tables(tmp_path, capsys):
    quick = Path(__file__).resolve().parents[1] / "paper_figures" / "quick"
    assert main(["report", "--runs", str(quick / "run_records"), "--out", str(tmp_path), "--no-figures"]) == 0
    assert capsys.readouterr().out == f"wrote 10 files to {tmp_path}\n"  # 3 forms x 3 tables + README
    assert (tmp_path / "table1_paper.md").read_bytes() == (quick / "table1_paper.md").read_bytes()
    readme = (tmp_path / "README.md").read_text()
    assert f"`python -m apl report --runs {quick / 'run_records'} --out {tmp_path}`" in readme
    assert main(["report", "--runs", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path):
    """``python -m apl grid --dry-run | head -1``: the status of a SIGPIPE, and nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "apl", "grid", "--preset", "paper", "--seeds", "30", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout.readline().strip()  # more than a pipe holds follows: the command is still writing
    proc.stdout.close()
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == INTERRUPTED + signal.SIGPIPE and err == "", err
