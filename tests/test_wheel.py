"""The loss library as others install it: a wheel of apl-repro, installed where there is torch and nothing
else, and no compiler, computes a fused loss and its gradient; a wheel built for another torch says so.

The wheel is built here (``python -m build --wheel --no-isolation``, as a user builds it) from a copy of
the sources, without CUDA kernels whatever the machine (CUDA_VISIBLE_DEVICES empty, FORCE_CUDA unset)
and without debug information (CFLAGS=-g0): both would take minutes more and change nothing of what
is tested (the wheel's content and its install). The CPU extension is compiled for real, which takes
most of this file's time (about two minutes of CPU time).

The environment "with torch and nothing else" is a fresh venv whose only addition is a ``.pth`` file
naming a folder of links to exactly the distributions torch requires (torch's own metadata,
recursively: its dependency closure) in the test interpreter's site-packages. Installing torch into it
instead would copy the same files (several GB, minutes) and test nothing more. The wheel is then
installed with pip from its file alone (no index, no links, no config): a runtime dependency the wheel
declared beyond torch would fail the install. No compiler is reachable: CC and CXX are ``false``, and
so are gcc, g++, cc and c++ first on PATH.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import apl

ROOT = Path(__file__).resolve().parent.parent
#: What a wheel build reads: the sources of the package and the extension, and the build's own files.
SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "requirements", "csrc", "apl")
#: What the library must not load: the reproduction's dependencies (the extra apl-repro[repro]).
REPRO_MODULES = ("matplotlib", "torchvision", "numpy", "tqdm")

pytest.importorskip("build", reason="the wheel is built with `build` (scripts/setup_env.sh --test installs it)")


def _closure(name: str, extras=("",), seen=None) -> dict:
    """``{distribution name: Distribution}`` of ``name`` and everything it requires (markers evaluated
    here, the requested extras' requirements included), as installed for this interpreter."""
    seen = {} if seen is None else seen
    dist = importlib.metadata.distribution(name)
    key = dist.metadata["Name"].lower().replace("_", "-")
    if key in seen and extras == ("",):
        return seen
    seen[key] = dist
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            _closure(req.name, ("",) + tuple(sorted(req.extras)), seen)
    return seen


def _link_torch_alone(folder: Path) -> set[str]:
    """Links in ``folder`` to the top-level files and folders of torch's dependency closure; returns the
    distributions linked."""
    folder.mkdir()
    dists = _closure("torch")
    for dist in dists.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return set(dists)


def _no_compiler(folder: Path) -> dict:
    """An environment in which every C/C++ compiler is ``false``."""
    folder.mkdir()
    for name in ("gcc", "g++", "cc", "c++", "clang", "clang++", "nvcc"):
        (folder / name).symlink_to(shutil.which("false"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(CC="false", CXX="false", PATH=f"{folder}{os.pathsep}{env['PATH']}", PIP_CONFIG_FILE=os.devnull,
               PYTHONNOUSERSITE="1")
    return env


def _copy_sources(src: Path) -> None:
    """SOURCES into ``src``, without build products (the checkout stays untouched by a build)."""
    src.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.so", "_C_build.json", "*.egg-info"))
        else:
            shutil.copy2(source, src / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's python, the environment to run it in, the wheel's path), the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    _copy_sources(src)
    build_env = {k: v for k, v in os.environ.items() if k != "FORCE_CUDA"}
    build_env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU kernels alone, without debug information (see above)
    build_env["CFLAGS"] = f"{os.environ.get('CFLAGS', '')} -g0".strip()
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist")],
                          cwd=src, env=build_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    linked = _link_torch_alone(tmp / "torch_alone")
    assert "torch" in linked and not linked & {"numpy", "torchvision", "matplotlib", "tqdm", "apl-repro"}, linked
    (site / "torch_alone.pth").write_text(f"{tmp / 'torch_alone'}\n")
    env = _no_compiler(tmp / "no_compiler")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                           "--no-build-isolation", str(wheel)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python, env, wheel, site


def _run(installed, code: str) -> dict:
    """Run ``code`` with the venv's python, outside the checkout; it prints one JSON object last."""
    python, env, _, site = installed
    proc = subprocess.run([str(python), "-c", textwrap.dedent(code)], cwd=site.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"stderr": proc.stderr}


def test_the_wheel_holds_the_extension_and_the_torch_it_was_built_against(installed):
    _, _, wheel, site = installed
    assert wheel.name.startswith(f"apl_repro-{apl.__version__}-")  # one version: apl.__version__
    assert next(site.glob("apl/_C*.so")).is_file()
    assert json.loads((site / "apl" / "_C_build.json").read_text()) == {"torch": torch.__version__}
    assert not (site / "benchmarks").exists() and not (site / "tests").exists()


def test_with_torch_alone_and_no_compiler_the_fused_loss_and_its_gradient(installed):
    result = _run(installed, f"""
        import json, sys
        import torch
        import apl
        import apl.functional as AF
        import apl.fused as fused
        from apl.losses import get_loss

        torch.manual_seed(0)
        logits = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
        target = torch.randint(0, 10, (16,))
        losses, grads = {{}}, {{}}
        for backend in ("fused", "reference"):
            loss = get_loss("nce+rce", num_classes=10, backend=backend)(logits, target)
            grads[backend], = torch.autograd.grad(loss, logits)
            losses[backend] = loss.item()
        functional = AF.nfl_rce(logits, target, variant="paper", lam=0.6, fused=True)
        reference = AF.nfl_rce(logits, target, variant="paper", lam=0.6, fused=False)
        print(json.dumps({{
            "apl": apl.__file__, "version": apl.__version__, "fused": fused.is_available(),
            "reason": fused.unavailable_reason(), "loss": losses,
            "grad_close": torch.allclose(grads["fused"], grads["reference"], rtol=1e-10, atol=1e-12),
            "grad_nonzero": bool(grads["fused"].abs().sum() > 0),
            "functional": [functional.item(), reference.item()],
            "loaded": [m for m in {REPRO_MODULES!r} if m in sys.modules]}}))
    """)
    _, _, _, site = installed
    assert result["apl"].startswith(str(site)), result  # the wheel's apl, not the checkout's
    assert result["version"] == apl.__version__
    assert result["fused"], result["reason"]
    assert result["loss"]["fused"] == pytest.approx(result["loss"]["reference"], rel=1e-12)
    assert result["grad_close"] and result["grad_nonzero"]
    assert result["functional"][0] == pytest.approx(result["functional"][1], rel=1e-12)
    assert result["loaded"] == [], f"the loss library imported {result['loaded']}"


def test_a_build_for_another_torch_is_not_loaded_and_says_so(installed):
    """The record says another torch: the extension is left unloaded (a library of another ABI may crash
    the process), the reason names both releases, and the losses fall back with one warning."""
    _, _, _, site = installed
    record = site / "apl" / "_C_build.json"
    kept = record.read_text()
    record.write_text(json.dumps({"torch": "2.0.0+other"}))
    try:
        result = _run(installed, """
            import json, sys, warnings
            import torch
            import apl.fused as fused
            from apl.losses import get_loss

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
                loss = get_loss("ce", num_classes=3)(logits, target)
                again = get_loss("ce", num_classes=3)(logits, target)
            print(json.dumps({"fused": fused.is_available(), "reason": fused.unavailable_reason(),
                              "loaded": "apl._C" in sys.modules, "torch": torch.__version__,
                              "same": torch.allclose(loss, torch.nn.functional.cross_entropy(logits, target)),
                              "warnings": [str(w.message) for w in caught]}))
        """)
    finally:
        record.write_text(kept)
    assert not result["fused"] and not result["loaded"]
    assert "built against torch 2.0.0+other" in result["reason"] and f"this is torch {result['torch']}" in \
        result["reason"], result["reason"]
    assert result["same"]
    assert len(result["warnings"]) == 1 and result["reason"] in result["warnings"][0], result["warnings"]


def test_the_build_requirement_names_the_torch_the_library_requires():
    """pyproject.toml cannot read requirements/torch.txt: the two must name the same release."""
    pins = [line.split("#")[0].strip() for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()]
    (pin,) = [p for p in pins if p]
    assert f'"{pin}"' in (ROOT / "pyproject.toml").read_text()


def test_the_source_distribution_holds_everything_its_build_reads(tmp_path):
    """``pip install apl_repro-*.tar.gz`` compiles the extension from the sdist alone: every file under
    csrc/ (headers and CUDA sources included) and the requirement lists setup.py reads must be in it."""
    _copy_sources(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                           str(tmp_path / "dist")], cwd=tmp_path / "src", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("apl_repro-*.tar.gz")
    with tarfile.open(sdist) as tar:
        held = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    wanted = {p.relative_to(ROOT).as_posix() for folder in ("csrc", "requirements") for p in (ROOT / folder).rglob("*")
              if p.is_file()}
    assert wanted and not wanted - held, sorted(wanted - held)
