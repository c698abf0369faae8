"""The changelog: every release is dated, the unreleased changes come first, and the docs page
includes the file itself (one source)."""

import datetime
import re
from pathlib import Path

import implicitbilevel

ROOT = Path(__file__).resolve().parents[1]


def test_every_release_is_dated_and_the_current_version_is_one():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.M)
    assert headings[0] == ("Unreleased", "")
    releases = headings[1:]
    assert releases and implicitbilevel.__version__ in [v for v, _ in releases]
    dates = []
    for version, rest in releases:
        match = re.fullmatch(r" - (\d{4}-\d{2}-\d{2})", rest)
        assert match, f"release {version} has no date (## [{version}] - YYYY-MM-DD)"
        dates.append(datetime.date.fromisoformat(match.group(1)))
    assert dates == sorted(dates, reverse=True), "releases are listed newest first"


def test_the_docs_page_includes_the_changelog():
    page = (ROOT / "docs" / "changelog.md").read_text()
    assert "{include} ../CHANGELOG.md" in page
    assert re.search(r"^\s+changelog$", (ROOT / "docs" / "index.rst").read_text(), re.M)
