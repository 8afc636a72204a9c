"""The package's layout: no import cycle among apl's modules, and only the CLI knows every command."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "apl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """``{module: the apl modules it imports}``, read from the source (nothing is imported)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t not in ("apl", name)}
        graph[name] = deps
    return graph


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


def test_only_the_cli_imports_the_cli():
    importers = sorted(m for m, deps in _imports().items() if "apl.cli" in deps)
    assert importers == ["apl.__main__"]


def test_the_readme_layout_table_names_every_module():
    """README's layout table (a newcomer's map) names every module of apl/ and folder of csrc/."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout"):readme.index("## Libraries")]
    missing = [f"apl/{p.name}" for p in sorted(PACKAGE.glob("*.py")) if p.name != "__init__.py"
               and f"`apl/{p.name}`" not in table]
    missing += [f"apl/{p.name}/" for p in sorted(PACKAGE.iterdir()) if p.is_dir() and (p / "__init__.py").exists()
                and f"`apl/{p.name}/`" not in table]
    csrc = PACKAGE.parent / "csrc"
    missing += [f"csrc/{p.name}/" for p in sorted(csrc.iterdir()) if p.is_dir() and f"`csrc/{p.name}/`" not in table]
    assert not missing, f"README's layout table does not name {missing}"
