"""The docs point only at files and sections that exist.

Checked: every relative link and ``#anchor`` in README.md, CONTRIBUTING.md and docs/*.md, and every pointer written
as text — ``docs/<name>.md`` or ``docs/<name>.md, "Section title"`` — there and in the code's
docstrings and messages (a section title is the start of a heading of that page).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted([*(ROOT / "qualiclip").rglob("*.py"), *(ROOT / "flows").glob("*.py")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images (![..](..)) are not pointers
MENTION = re.compile(r'\b(docs/[\w.-]+\.md)`?(?:,\s*"([^"]+)")?')
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
SECTION_NUMBER = re.compile(r"(?:([\w./-]+)\]?\s*)?§(\d+)")  # "operations.md §3", "[scale.md §4](…)", "§3"
NAMED_PART = re.compile(r"\bthe ((?:[\w-]+ ){0,3}[\w-]+) (?:section )?(?:of|in) \[[^\]]*\]\(([^)#\s]+\.md)\)")
EXTERNAL = {"METHOD.md", "METHOD"}  # the method notes the docs cite by section; not a file of this repository
REPO_PATH = re.compile(r"(?<![\w./-])((?:qualiclip|flows|tests|benchmarks|docs|\.ci)/[\w./*<>{}…-]*[\w*>}…])")


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


def section_numbers(page: Path) -> set[str]:
    """The numbers of a page's numbered headings (``## 3. The scheduled deployment`` → "3")."""
    return {m.group(1) for h in headings(page) if (m := re.match(r"(\d+)\.\s", h))}


def resolve_page(page: Path, name: str) -> Path | None:
    """A page named in ``page``'s text: relative to it, to the repository root, or in docs/."""
    for base in (page.parent, ROOT, ROOT / "docs"):
        if (base / name).is_file():
            return base / name
    return None


def broken_section_numbers(page: Path, where: str, line: str) -> list[str]:
    """``operations.md §3`` (or a bare ``§3``, a section of ``page`` itself) must number a heading of that page."""
    broken, previous, end = [], "", 0
    for m in SECTION_NUMBER.finditer(line):
        name, number = m.groups()
        if not name and previous and re.fullmatch(r"\s*(,|and|or)\s*", line[end : m.start()]):
            name = previous  # "METHOD.md §2, §4": the second of the same page
        previous, end = name or "", m.end()
        if name in EXTERNAL or (name and not name.endswith(".md")):  # "limit §3" is no page
            continue
        target = resolve_page(page, name) if name else page
        if target is None:
            broken.append(f"{where}: {name} §{number} — no such file")
        elif number not in section_numbers(target):
            broken.append(f"{where}: {name or page.name} §{number} — no section {number} in {target.name}")
    return broken


def broken_named_parts(page: Path, where: str, line: str) -> list[str]:
    """ "the quiet environment of [stack.md](stack.md)": a part named in words, linked without an
    anchor, must be a heading of that page (else the reader looks for a section that is not there)."""
    broken = []
    for words, target in NAMED_PART.findall(line):
        file = (page.parent / target).resolve()
        if file.is_file() and not any(words.lower() in h.lower() for h in headings(file)):
            broken.append(f'{where}: "the {words}" of {target} — no such heading in {file.name}')
    return broken


def broken_paths(where: str, line: str) -> list[str]:
    """Files of the repository named in the text (``flows/retrain.py``, ``tests/test_x.py``) must exist
    (pages, ``docs/x.md``, are `broken_mentions`' to check)."""
    return [
        f"{where}: {path} — no such file"
        for path in REPO_PATH.findall(line)
        if not any(c in path for c in "*<{…")
        and not path.endswith(".md")
        and not (ROOT / path).exists()
        and not (ROOT / (path.split(".")[0] + ".py")).is_file()
    ]  # `flows/retrain.GPU_STAGE`: module.name


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
        broken += broken_named_parts(page, f"{page.name}:{number}", line)
    for number, line in markdown_lines(page, keep_code=True):  # pointers in `code` too: `tests/test_x.py`
        broken += broken_section_numbers(page, f"{page.name}:{number}", line)
        broken += broken_paths(f"{page.name}:{number}", line)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_anchor_and_section_in_the_docs_exists(page):
    assert broken_pointers(page) == []


def test_every_docs_section_the_code_names_exists():
    broken = [b for src in SOURCES for b in broken_mentions(str(src.relative_to(ROOT)), src.read_text())]
    assert broken == []


def test_the_checker_catches_missing_files_anchors_and_sections(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# 6. Seeing the runs: the UI\n\n[ok](#6-seeing-the-runs-the-ui) [gone](#seeing-runs) "
        "[file](nowhere.md) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        'see docs/evaluation.md, "Outputs" and docs/evaluation.md, "Inputs", docs/nowhere.md\n'
    )
    assert broken_pointers(page) == [
        "page.md:3: #seeing-runs — no heading with that anchor in page.md",
        "page.md:3: nowhere.md — no such file",
        'page.md:7: docs/evaluation.md, "Inputs" — no such section',
        "page.md:7: docs/nowhere.md — no such file",
    ]


# Every text file of the project a reader may open: docs, code, tests, benchmarks, configs, CI
# (.ci-scratch holds third-party packages CI installs for one test, not project files).
SKIP_DIRS = {
    ".git",
    ".venv",
    ".ci-scratch",
    ".dvc",
    ".pytest_cache",
    "__pycache__",
    "qualiclip.egg-info",
    "data",
    "outputs",
}
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yaml", ".yml", ".txt", ".cfg"}
FILE_MENTION = re.compile(r"(?<![\w.*/-])((?:\.\.?/)*(?:[\w-]+/)*[\w-]+\.md)\b")
OUTSIDE = re.compile(r"\.\./shared/(?!data\b)[\w./-]*|/work/shared\S*")  # ../shared/data: the real-data folder


def project_text_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # pruned: .venv alone holds ~100,000 files
        found += [Path(folder, f) for f in files if Path(f).suffix in TEXT_SUFFIXES or Path(folder).name == ".ci"]
    return sorted(found)


def outside_references(root: Path, file: Path) -> list[str]:
    """References in ``file`` to a file the repository does not hold: ``X.md`` that is neither a
    path from the project root or from the file's folder nor a page of the root or ``docs/``, and
    anything under ``../shared/`` other than the real-data folder."""
    text, where = file.read_text(errors="replace"), file.relative_to(root)
    outside = OUTSIDE.findall(text)
    bad = [f"{where}: {m}" for m in outside]
    for name in FILE_MENTION.findall(text):
        candidates = [root / name, file.parent / name] + ([root / "docs" / name] if "/" not in name else [])
        if name not in outside and not any(
            c.is_file() and c.resolve().is_relative_to(root.resolve()) for c in candidates
        ):
            bad.append(f"{where}: {name}")
    return bad


def test_no_file_outside_the_repository_is_cited():
    """A clone holds everything the docs and the code point to (the method facts are in docs/method.md)."""
    bad = [b for f in project_text_files(ROOT) if f.name != "test_docs.py" for b in outside_references(ROOT, f)]
    assert bad == []


def test_the_outside_reference_check_catches_missing_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Method\n")
    (tmp_path / "README.md").write_text(
        "See docs/method.md, method.md and [the table](docs/method.md#method).\nReal data: ../shared/data/clive.\n"
    )
    (tmp_path / "code.py").write_text('"""The score (METHOD.md §2; ../shared/STYLE.md; docs/gone.md)."""\n')
    assert project_text_files(tmp_path) == [tmp_path / "README.md", tmp_path / "code.py", tmp_path / "docs/method.md"]
    assert outside_references(tmp_path, tmp_path / "README.md") == []
    assert outside_references(tmp_path, tmp_path / "code.py") == [
        "code.py: ../shared/STYLE.md",
        "code.py: METHOD.md",
        "code.py: docs/gone.md",
    ]


def test_the_checker_catches_named_parts_section_numbers_and_files_that_do_not_exist(tmp_path):
    """Issue 23: "the quiet environment of [stack.md](stack.md)" pointed at a section stack.md never had."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other\n\n## 1. Drop photos\n\n## A quiet environment\n")
    page = docs / "page.md"
    page.write_text(
        "# 1. Page\n\nSet the quiet environment of [other.md](other.md) first; "
        "the noise of [other.md](other.md).\n"
        "See other.md §1 and §1, other.md §2, §4 and METHOD.md §9, `flows/retrain.py`, "
        "`flows/retrain.GPU_STAGE`, `tests/test_nowhere.py`.\n"
    )
    assert broken_pointers(page) == [
        'page.md:3: "the noise" of other.md — no such heading in other.md',
        "page.md:4: other.md §2 — no section 2 in other.md",
        "page.md:4: other.md §4 — no section 4 in other.md",
        "page.md:4: tests/test_nowhere.py — no such file",
    ]
