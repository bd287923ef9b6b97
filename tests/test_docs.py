"""The project stands alone: every file it cites is in the repository, every cited section of
the docs exists, and nothing points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = [
    p
    for pattern in ("tgr_bench/**/*.py", "tests/**/*.py", "conf/**/*.yaml", "scripts/*", "*.md")
    for p in ROOT.glob(pattern)
] + [ROOT / "Makefile", *ROOT.glob("docs/*.md"), *ROOT.glob("results/*.md")]


def test_no_reference_outside_the_repository():
    outside = re.compile(r"\.\./|shared/spec|/work/|/home/\w+|\bspec/(tgr|cnn|protocol)")
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in TEXT
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []


def test_every_cited_document_and_section_exists():
    cited = re.compile(r"docs/(\w+)\.md(?: sections? (\d+))?")
    missing = []
    for p in TEXT:
        for name, section in cited.findall(p.read_text()):
            doc = ROOT / "docs" / f"{name}.md"
            if not doc.is_file():
                missing.append(f"{p.relative_to(ROOT)} cites docs/{name}.md")
            elif section and not re.search(rf"^## {section}\. ", doc.read_text(), re.M):
                missing.append(f"{p.relative_to(ROOT)} cites docs/{name}.md section {section}")
    assert missing == []


def test_bare_spec_names_are_not_cited():
    """`tgr.md` alone would point at a file users do not have; cite `docs/tgr.md`."""
    bare = re.compile(r"(?<![/\w])(tgr|protocol|baselines|cnn|transforms)\.md")
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in TEXT
        if p.parent.name != "docs" and p != Path(__file__)
        for m in bare.finditer(p.read_text())
    ]
    assert hits == []


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme
