"""The README and docs/: every link resolves (file and heading), every page is reachable from the README."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def pages() -> list[Path]:
    return [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_every_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in pages():
        for target in links(page):
            if re.match(r"^[a-z]+:", target):  # http(s), mailto: not followed (no network here)
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    linked = set()
    for page in pages():
        for target in links(page):
            path = target.partition("#")[0]
            if path and not re.match(r"^[a-z]+:", target):
                linked.add((page.parent / path).resolve())
    orphans = [p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
    assert orphans == []


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    text = (REPO / "README.md").read_text()
    first = FENCE.search(text).group(0).splitlines()
    assert first[1].startswith("make run") and first[2].startswith("make test")
    assert len(text.encode()) < 16_000, "the README is for a newcomer: reference material goes into docs/"


def test_the_ways_to_choose_sample_points_are_on_the_kline_page():
    """Found by a new user: factor.sample_file was documented only in config/README.md, not on the page."""
    text = (REPO / "docs" / "kline_factor.md").read_text()
    for key in ("factor.samples", "factor.sample_file", "factor.warmup_bars", "unknown_point", "series_checks.parquet"):
        assert f"`{key}`" in text, key
