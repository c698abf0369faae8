"""The documentation: its examples run and print what the pages say, the API reference covers every
public name, and ``sphinx-build -W`` (warnings are errors) succeeds."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import importlib.util
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import implicitbilevel

DOCS = Path(__file__).resolve().parents[1] / "docs"
API = DOCS / "api.rst"
# Modules whose public names the API reference must document besides the top-level package.
SUBMODULES = ("bissl", "checkpoint", "tree", "optim", "distributed")

_DIRECTIVE = re.compile(r"^\.\. ([\w:-]+)::[ \t]*(.*)$")


def _blocks(path: Path, name: str) -> list[str]:
    """The bodies of every ``.. <name>::`` directive in ``path``, dedented, options dropped."""
    lines = path.read_text().splitlines()
    bodies = []
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if not match or match.group(1) != name:
            continue
        body = []
        for following in lines[i + 1:]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        text = textwrap.dedent("\n".join(body)).strip("\n")
        text = "\n".join(ln for ln in text.splitlines() if not re.match(r"^:[\w-]+:", ln))
        bodies.append(text.strip("\n") + "\n")
    return bodies


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    return out.getvalue()


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.rst"))


def test_quickstart_has_examples():
    codes = _blocks(DOCS / "quickstart.rst", "testcode")
    outputs = _blocks(DOCS / "quickstart.rst", "testoutput")
    assert len(codes) >= 2 and len(codes) == len(outputs)
    assert "pip install torch==2.14.1 torchvision==0.29.1" in (DOCS / "quickstart.rst").read_text()


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_print_what_the_page_says(page):
    codes = _blocks(page, "testcode")
    outputs = _blocks(page, "testoutput")
    assert len(codes) == len(outputs), f"{page.name}: every testcode needs its testoutput"
    for code, expected in zip(codes, outputs):
        assert _run(code).strip() == expected.strip()


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_doctests_pass(page):
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for i, block in enumerate(_blocks(page, "doctest")):
        test = parser.get_doctest(block, {}, f"{page.name}[{i}]", str(page), 0)
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def _documented_objects() -> set[int]:
    """``id`` of every object the API page documents (directive targets and automodule members)."""
    documented: set[int] = set()
    current = "implicitbilevel"
    lines = API.read_text().splitlines()
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if not match:
            continue
        kind, target = match.group(1), match.group(2).strip()
        options = []
        for following in lines[i + 1:]:
            if not following.strip().startswith(":"):
                break
            options.append(following.strip())
        if kind in ("currentmodule", "py:currentmodule", "module", "py:module"):
            current = target
            continue
        if kind == "automodule":
            if ":no-members:" in options:
                continue
            module = importlib.import_module(target)
            excluded = set()
            for option in options:
                if option.startswith(":exclude-members:"):
                    excluded |= {n.strip() for n in option.split(":", 2)[2].split(",")}
            documented |= {id(getattr(module, n)) for n in module.__all__ if n not in excluded}
            continue
        if not (kind.startswith("auto") or kind.startswith("py:")):
            continue
        dotted = target if target.startswith("implicitbilevel") else f"{current}.{target}"
        module_name, _, attr = dotted.rpartition(".")
        documented.add(id(getattr(importlib.import_module(module_name), attr)))
    return documented


def _public() -> dict[str, object]:
    names = {f"implicitbilevel.{n}": getattr(implicitbilevel, n) for n in implicitbilevel.__all__}
    for sub in SUBMODULES:
        if importlib.util.find_spec(f"implicitbilevel.{sub}") is None:
            continue
        module = importlib.import_module(f"implicitbilevel.{sub}")
        names.update({f"implicitbilevel.{sub}.{n}": getattr(module, n) for n in module.__all__})
    return names


def test_api_reference_covers_every_public_name():
    source = API.read_text()
    missing_text = [n for n in implicitbilevel.__all__ if not re.search(rf"\b{n}\b", source)]
    assert not missing_text, f"names of implicitbilevel.__all__ absent from api.rst: {missing_text}"
    documented = _documented_objects()
    undocumented = sorted(name for name, obj in _public().items() if id(obj) not in documented)
    assert not undocumented, f"public names without an API entry in docs/api.rst: {undocumented}"


def test_sphinx_build_has_no_warnings(tmp_path):
    pytest.importorskip("sphinx")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "api.html").is_file()
