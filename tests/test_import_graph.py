"""The package's layout: no import cycle among apl's modules, layers that only point down, the loss
library on torch alone, and only the CLI knows every command. Read from the source (nothing is imported),
except where a command's imports are measured as it runs."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "apl"
#: What the training stack is: modules ``apl report`` must neither import nor load.
TRAINING_STACK = ("apl.grid", "apl.runner", "apl.ray_engine", "apl.train")
#: The reproduction's third-party dependencies (the ``repro`` extra): the loss library needs none of them.
REPRO_PACKAGES = ("numpy", "torchvision", "matplotlib", "tqdm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _parsed() -> dict[str, tuple[frozenset, frozenset]]:
    """``{module: (the apl modules it imports, the top-level names of the other packages it imports)}``,
    anywhere in the file (a function's own imports too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        deps, external = set(), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t not in ("apl", name)}
            external |= {t.split(".")[0] for t in targets if t.split(".")[0] != "apl"}
        out[name] = (frozenset(deps), frozenset(external))
    return out


def _imports() -> dict[str, set[str]]:
    """``{module: the apl modules it imports}``."""
    return {name: set(deps) for name, (deps, _) in _parsed().items()}


def _reach(roots) -> set[str]:
    """Every apl module importing ``roots`` loads: what they import, and each one's parent packages."""
    graph, seen, todo = _imports(), set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [m for m in list(graph[name]) + parents if m in graph]
    return seen


def test_no_import_cycle():
    graph = _imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_report_never_reaches_the_training_stack():
    """``apl.report`` reads run records; the grid, its runners and training are above it."""
    report = [m for m in _imports() if m == "apl.report" or m.startswith("apl.report.")]
    reached = _reach(report)
    assert not reached & set(TRAINING_STACK), sorted(reached & set(TRAINING_STACK))
    assert "apl.plan" in reached  # the grid's cells come from the plan, below both


def test_apl_report_help_loads_no_training_stack():
    """What ``python -X importtime -m apl report --help`` imports, as a user runs it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "apl", "report", "--help"],
                          cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--runs" in proc.stdout, proc.stderr[-2000:]
    loaded = set(re.findall(r"^import time:.*\|\s*(\S+)\s*$", proc.stderr, flags=re.MULTILINE))
    assert "apl.report" in loaded and "apl.cli" in loaded  # the measurement saw the command's imports
    assert not loaded & set(TRAINING_STACK), sorted(loaded & set(TRAINING_STACK))


def test_the_loss_library_needs_torch_alone():
    """``import apl``, ``apl.losses`` and its aliases (apl.fused, apl.functional) import no module of the
    reproduction and no third-party package but torch: ``pip install apl-repro`` needs torch alone."""
    library = _reach(["apl", "apl.fused", "apl.functional"]
                     + [m for m in _imports() if m == "apl.losses" or m.startswith("apl.losses.")])
    assert all(m in ("apl", "apl.fused", "apl.functional") or m.startswith("apl.losses") for m in library), \
        sorted(library)
    external = set().union(*(_parsed()[m][1] for m in library))
    assert not external & set(REPRO_PACKAGES), sorted(external & set(REPRO_PACKAGES))
    assert external - set(sys.stdlib_module_names) == {"torch"}, sorted(external - set(sys.stdlib_module_names))


def test_only_the_cli_imports_the_cli():
    importers = sorted(m for m, deps in _imports().items() if "apl.cli" in deps)
    assert importers == ["apl.__main__"]


def test_the_readme_layout_table_names_every_module():
    """README's layout table (a newcomer's map) names every module of apl/ and folder of csrc/."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]  # to the next section, or the end
    missing = [f"apl/{p.name}" for p in sorted(PACKAGE.glob("*.py")) if p.name != "__init__.py"
               and f"`apl/{p.name}`" not in table]
    missing += [f"apl/{p.name}/" for p in sorted(PACKAGE.iterdir()) if p.is_dir() and (p / "__init__.py").exists()
                and f"`apl/{p.name}/`" not in table]
    csrc = PACKAGE.parent / "csrc"
    missing += [f"csrc/{p.name}/" for p in sorted(csrc.iterdir()) if p.is_dir() and f"`csrc/{p.name}/`" not in table]
    assert not missing, f"README's layout table does not name {missing}"
