"""Release metadata agrees with itself: one version, a citation file that names the thesis and the
BiSSL paper, a changelog entry for the version, and package metadata that an index would accept."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import implicitbilevel

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")


def test_the_version_is_defined_once_and_everything_names_it():
    version = implicitbilevel.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert metadata.version("implicitbilevel") == version  # what pip installed
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == version
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()


def test_citation_names_the_thesis_and_the_bissl_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    kinds = {ref["type"]: ref for ref in citation["references"]}
    assert "Revisiting Bilevel Optimization" in kinds["thesis"]["title"]
    assert kinds["thesis"]["authors"][0]["family-names"] == "Zakarias"
    assert "2410.02387" in kinds["article"]["url"]


def test_package_metadata_is_complete():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for key in ("name", "description", "readme", "requires-python", "license", "authors",
                "classifiers", "urls", "dependencies"):
        assert project.get(key), key
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "implicitbilevel" / "py.typed").exists()
