"""The docs point only at files and sections that exist.

Checked: every relative link and ``#anchor`` in README.md and docs/*.md, and every pointer written
as text — ``docs/<name>.md`` or ``docs/<name>.md, "Section title"`` — there and in the code's
docstrings and messages (a section title is the start of a heading of that page).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted([*(ROOT / "qualiclip").rglob("*.py"), *(ROOT / "flows").glob("*.py")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images (![..](..)) are not pointers
MENTION = re.compile(r'\b(docs/[\w.-]+\.md)`?(?:,\s*"([^"]+)")?')
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def markdown_lines(page: Path, keep_code: bool = False) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks; inline code removed unless ``keep_code``."""
    lines, fenced = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line if keep_code else re.sub(r"`[^`]*`", "", line)))
    return lines


def headings(page: Path) -> list[str]:
    """Heading texts as rendered: links reduced to their text, code marks dropped."""
    found = [HEADING.match(line) for _, line in markdown_lines(page, keep_code=True)]
    return [re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "") for m in found if m]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for text in headings(page):
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_mentions(where: str, text: str) -> list[str]:
    """Pointers written as text: the page must exist, a quoted section must start one of its headings."""
    broken = []
    for path, section in MENTION.findall(text):
        if not (ROOT / path).is_file():
            broken.append(f"{where}: {path} — no such file")
        elif section and not any(re.sub(r"^\d+\.\s*", "", h).startswith(section) for h in headings(ROOT / path)):
            broken.append(f'{where}: {path}, "{section}" — no such section')
    return broken


def broken_pointers(page: Path) -> list[str]:
    broken = []
    for number, line in markdown_lines(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...: not ours to check offline
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}:{number}: {target} — no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}:{number}: {target} — no heading with that anchor in {file.name}")
        broken += broken_mentions(f"{page.name}:{number}", line)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_anchor_and_section_in_the_docs_exists(page):
    assert broken_pointers(page) == []


def test_every_docs_section_the_code_names_exists():
    broken = [b for src in SOURCES for b in broken_mentions(str(src.relative_to(ROOT)), src.read_text())]
    assert broken == []


def test_the_checker_catches_missing_files_anchors_and_sections(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('# 6. Seeing the runs: the UI\n\n[ok](#6-seeing-the-runs-the-ui) [gone](#seeing-runs) '
                    '[file](nowhere.md) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n'
                    'see docs/evaluation.md, "Outputs" and docs/evaluation.md, "Inputs", docs/nowhere.md\n')
    assert broken_pointers(page) == [
        "page.md:3: #seeing-runs — no heading with that anchor in page.md",
        "page.md:3: nowhere.md — no such file",
        'page.md:7: docs/evaluation.md, "Inputs" — no such section',
        "page.md:7: docs/nowhere.md — no such file",
    ]
