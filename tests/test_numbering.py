"""One number per chapter, everywhere.

The registry (``attn.registry.CHAPTERS``) is the one source. These tests fail
when any of the places a reader sees a chapter number disagrees with it: the
notebook's file-name prefix, its page title, ``_toc.yml`` (generated from the
registry), the intro's chapter map, ``python -m attn list``, the comparison
table, prose that says "chapter N", and, in the built book, the sidebar and
the page heading.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from attn import registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402

BY_NUMBER = {c.number: c for c in registry.CHAPTERS}
SOURCES = build.notebook_sources()
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(md: Path) -> str:
    """The notebook's Markdown with code cells removed."""
    return FENCE.sub("", md.read_text())


def _title_word(title: str) -> str:
    """The word a mention of the chapter must carry: 'local', 'multi-head', 'co-attention', 'comparison'."""
    words = title.lower().split()
    return words[1] if words[0] == "the" else words[0]


def test_registry_numbers_are_the_reading_order():
    numbers = [c.number for c in registry.CHAPTERS]
    assert numbers == list(range(1, len(numbers) + 1))
    in_parts = [n for _, ns in registry.PARTS for n in ns]
    assert in_parts == numbers, "PARTS must list every chapter once, in reading order"
    for m in registry.mechanisms():
        assert m.chapter in registry.MECHANISM_CHAPTERS or m.chapter > 24, f"{m.name} registered in chapter {m.chapter}"


@pytest.mark.parametrize("md", SOURCES, ids=[p.stem for p in SOURCES])
def test_file_prefix_slug_and_title_match_the_registry(md):
    number = int(md.stem[:2])
    assert number in BY_NUMBER, f"{md.name}: no chapter {number} in the registry"
    chapter = BY_NUMBER[number]
    assert md.stem == f"{number:02d}_{chapter.slug}", f"{md.name} should be {number:02d}_{chapter.slug}.md"
    headings = re.findall(r"^# (.+)$", _prose(md), re.M)
    assert headings and headings[0] == f"{number}. {chapter.title}", f"{md.name}: title {headings[:1]}"


def test_toc_is_generated_from_the_registry():
    assert (ROOT / "_toc.yml").read_text() == build.toc_text(), "run `make sync`: _toc.yml is out of step with the registry"


def test_intro_map_numbers_every_chapter_from_the_registry():
    rows = build.chapter_map().splitlines()[2:]
    assert len(rows) == len(registry.CHAPTERS)
    for row, chapter in zip(rows, registry.CHAPTERS, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(chapter.number) and chapter.title in cells[1]
        assert cells[2] == registry.part_of(chapter.number)
        if (ROOT / chapter.notebook).with_suffix(".md").exists():
            assert f"../notebooks/{chapter.number:02d}_{chapter.slug}.ipynb" in cells[1]


def test_cli_list_uses_the_registry_numbers(capsys):
    from attn.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for m in registry.mechanisms():
        assert re.search(rf"^{re.escape(m.name)}\s+{m.chapter}\s", out, re.M) or f" {m.chapter:2d} {BY_NUMBER[m.chapter].title}" in out


@pytest.mark.parametrize("md", SOURCES, ids=[p.stem for p in SOURCES])
def test_prose_chapter_numbers_name_the_right_chapter(md):
    """'chapter 8' in prose must stand next to that chapter's title ('local attention (chapter 8)')."""
    text = _prose(md)
    mentions = re.finditer(r"\bchapters? (\d+(?:(?:,? and |, | or )\d+)*)", text, re.I)
    for mention, number in ((m, int(n)) for m in mentions for n in re.findall(r"\d+", m.group(1))):
        assert number in BY_NUMBER, f"{md.name}: 'chapter {number}' does not exist"
        around = text[max(0, mention.start() - 90) : mention.end() + 40].lower()
        link = f"{number:02d}_{BY_NUMBER[number].slug}.ipynb"
        word = _title_word(BY_NUMBER[number].title)
        assert word in around or link in around, (
            f"{md.name}: 'chapter {number}' is not next to '{word}' ({BY_NUMBER[number].title}): ...{around}..."
        )
    for m in re.finditer(r"\]\((\d\d)_([a-z_]+)\.ipynb", text):
        number, slug = int(m.group(1)), m.group(2)
        assert BY_NUMBER[number].slug == slug, f"{md.name} links {m.group(0)}: chapter {number} is {BY_NUMBER[number].slug}"


@pytest.mark.slow
def test_sidebar_and_page_headings_carry_the_registry_number(built_book):
    intro = (built_book / "book" / "intro.html").read_text()
    for md in SOURCES:
        number = int(md.stem[:2])
        title = f"{number}. {BY_NUMBER[number].title}"
        link = re.search(rf'<a class="reference internal" href="[^"]*{md.stem}\.html">\s*([^<]+?)\s*</a>', intro)
        assert link, f"sidebar has no link to {md.stem}"
        assert link.group(1) == title, f"sidebar says {link.group(1)!r}, registry {title!r}"
        page = (built_book / "notebooks" / f"{md.stem}.html").read_text()
        h1 = re.search(r"<h1[^>]*>(.*?)<", page, re.S)
        assert h1 and h1.group(1).strip() == title, f"{md.stem}: heading {h1 and h1.group(1)!r}"


@pytest.mark.slow
def test_equations_are_numbered_within_each_chapter(built_book):
    """Each page numbers its equations (1), (2), ...: no book-wide counter that would read like another chapter's number."""
    for md in SOURCES:
        page = (built_book / "notebooks" / f"{md.stem}.html").read_text()
        numbers = [int(n) for n in re.findall(r'class="eqno">\((\d+)\)', page)]
        if numbers:
            assert numbers == list(range(1, len(numbers) + 1)), f"{md.stem}: equations numbered {numbers[:5]}..."
