"""The documentation sources: their examples run and print what the pages say, the API reference
covers every public name, and the stated facts agree with ``docs/facts.py``. The built pages are
checked by ``tests/test_docs_rendered.py`` (``sphinx-build -W``, links, figures, the gallery)."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import importlib.util
import io
import re
import textwrap
from pathlib import Path

import pytest

import implicitbilevel

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api.rst"
# Modules whose public names the API reference must document besides the top-level package.
SUBMODULES = ("bissl", "bissl.checkpoint", "tree", "bissl.lars", "parallel.distributed",
              "parallel.sync_batchnorm", "solvers.mfac", "subset")

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
    """The hand-written pages (not the gallery sphinx-gallery generates from ``examples/``)."""
    return sorted(p for p in DOCS.rglob("*.rst")
                  if p.relative_to(DOCS).parts[0] not in ("gallery", "_build"))


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
    """``id`` of every object the API pages document (directive targets and automodule members)."""
    documented: set[int] = set()
    for page in (API, *sorted((DOCS / "api").glob("*.rst"))):
        documented |= _documented_on(page)
    return documented


def _documented_on(page: Path) -> set[int]:
    documented: set[int] = set()
    current = "implicitbilevel"
    lines = page.read_text().splitlines()
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
        if not (kind.startswith("auto") or kind.startswith("py:")) or kind == "autosummary":
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
    source = "\n".join(p.read_text() for p in (API, *(DOCS / "api").glob("*.rst")))
    missing_text = [n for n in implicitbilevel.__all__ if not re.search(rf"\b{n}\b", source)]
    assert not missing_text, f"names of implicitbilevel.__all__ absent from api.rst: {missing_text}"
    documented = _documented_objects()
    undocumented = sorted(name for name, obj in _public().items() if id(obj) not in documented)
    assert not undocumented, f"public names without an API entry in docs/api.rst: {undocumented}"


# -- one source for every stated fact ------------------------------------------------------------


def _fact_sources() -> dict[str, str]:
    """Every text that states a fact: README files, docs pages, config comments, docstrings."""
    paths = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
             *ROOT.glob("recipes/*/README.md"), *ROOT.glob("recipes/configs/*.yaml"), *_pages(),
             ROOT / "implicitbilevel" / "curvature" / "hessian.py"]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_facts_are_read_from_the_measured_benchmark(facts):
    table = (ROOT / "benchmarks" / "results" / "quick-cpu.md").read_text()
    row = next(ln for ln in table.splitlines() if ln.startswith("| resnet18"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # workload | gradient (s) | forward-over-reverse | reverse-over-reverse | kept graph | build
    assert cells[2:5] == [facts.HVP["fr_resnet"], facts.HVP["rr_resnet"], facts.HVP["kept_resnet"]]
    assert facts.HVP["kept_resnet"] == "1.67"


def test_readme_docs_and_configs_agree_with_the_facts(facts):
    sources = _fact_sources()
    for name, text in sources.items():
        for retired in facts.RETIRED:
            assert retired not in text, f"{name} states {retired!r}, against docs/facts.py"
    minutes = f"{facts.VISION_EMBEDDED_MINUTES} minutes"
    assert minutes in sources["README.md"]
    assert minutes in sources["recipes/configs/vision_embedded.yaml"]
    study = f"{facts.STUDY_MINUTES} minutes"
    assert study in sources["README.md"]
    assert study in sources["recipes/configs/vision_embedded.yaml"]
    assert f"{facts.GPT_STUDY_MINUTES} minutes" in sources["recipes/configs/gpt_glue_embedded.yaml"]
    gpt_minutes = f"{facts.GPT_EMBEDDED_MINUTES} minutes"
    assert gpt_minutes in sources["recipes/configs/gpt_glue_embedded.yaml"]
    hessian = sources["implicitbilevel/curvature/hessian.py"]
    for key in ("kept_resnet", "rr_resnet", "fr_resnet", "kept_gpt"):
        assert f"{facts.HVP[key]}x" in hessian, f"hessian.py: HVP ratio {key}"
    # Data roots: Pets is read as <root>/oxford-iiit-pet/..., so the root is the folder above.
    downstream = re.compile(r"data\.downstream_root=([^\s`]*[\w|])")
    corpus = re.compile(r"data\.corpus=([^\s`]*[\w|])")
    for name, text in sources.items():
        assert set(downstream.findall(text)) <= {facts.PETS_ROOT, "|pets_root|"}, name
        assert set(corpus.findall(text)) <= {facts.CORPUS_ROOT, "|corpus_root|"}, name
    from recipes.vision import data as vision_data
    assert facts.PETS_LAYOUT in Path(vision_data.__file__).read_text()


def test_docs_use_the_substitutions_they_define(facts):
    prolog = facts.rst_prolog()
    used = set(re.findall(r"\|(\w+)\|", "\n".join(p.read_text() for p in _pages())))
    defined = set(re.findall(r"^\.\. \|(\w+)\|", prolog, re.M))
    # An undefined substitution fails the Sphinx build; here: the facts are used, not restated.
    assert {"hvp_kept_resnet", "hvp_rr_resnet", "vision_embedded_minutes", "pets_root",
            "corpus_root"} <= used & defined


def test_user_facing_pages_carry_no_internal_notes():
    text = (ROOT / "benchmarks" / "README.md").read_text() + "".join(
        p.read_text() for p in _pages())
    for note in ("The issue", "FACTS.md", "DESIGN.md", "STYLE.md"):
        assert note not in text


def test_display_math_never_puts_a_tag_inside_split():
    """Sphinx wraps a display block holding ``\\\\`` in ``split``, where ``\\tag`` fails."""
    for page in _pages():
        for block in _blocks(page, "math"):
            if "\\tag" in block:
                assert "\\\\" not in block, f"{page.name}: \\tag with a line break:\n{block}"


def test_every_example_is_a_gallery_entry():
    examples = ROOT / "examples"
    assert (examples / "README.txt").is_file()
    for path in examples.glob("*.py"):
        lines = path.read_text().splitlines()
        assert lines[0] == '"""' and set(lines[2]) == {"="} and len(lines[2]) == len(lines[1]), (
            f"{path.name}: the docstring must open with a reST title (sphinx-gallery)")
