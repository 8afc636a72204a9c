"""The documents: every relative link and anchor resolves, the README links every page of docs/ and stays a
front page, and no file cites the development machines' notes (a clone does not have them)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "LOSSES.md", ROOT / "benchmarks" / "RESULTS.md", *DOCS]
#: Where the documents may not point: notes and papers that exist only on the development machines.
MACHINE_ONLY = ("shared" + "/notes/", "shared" + "/seed/")
TEXT_SUFFIXES = {".py", ".md", ".json", ".tex", ".csv", ".tsv", ".sh", ".txt", ".toml", ".h", ".cpp", ".cu", ".yml"}
SKIP_DIRS = {".git", ".venv", "build", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", _outside_code_blocks(page.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _outside_code_blocks(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with anchor #{anchor}")
    assert not broken, broken


def test_the_readme_is_a_front_page_that_links_every_page_of_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "the README is the two-minute page; details go to docs/"
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked]


def test_no_file_cites_the_development_machines_notes():
    citing = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP_DIRS or "__pycache__" in rel.parts or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name == "Dockerfile":
            text = path.read_text(encoding="utf-8", errors="replace")
            citing += [str(rel) for needle in MACHINE_ONLY if needle in text]
    assert not citing, f"cite docs/sources.md instead: {sorted(set(citing))}"
