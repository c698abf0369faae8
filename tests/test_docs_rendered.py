"""The built HTML documentation: it builds with warnings as errors, no ``|substitution|`` is left
unreplaced, every internal link and anchor resolves (the ``_modules`` source pages included),
every figure a page states equals its results file, and every gallery example ran and drew a
figure.

The pages are built once per session (``sphinx-build -W -n``, the gallery executed at its reduced
size: a minute or two on 2 CPU cores). ``IMPLICITBILEVEL_DOCS_HTML=<dir>`` checks an existing build
instead, e.g. the one CI just made.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The HTML output folder of one ``sphinx-build -W -n`` run."""
    given = os.environ.get("IMPLICITBILEVEL_DOCS_HTML")
    if given:
        return Path(given)
    pytest.importorskip("sphinx")
    pytest.importorskip("sphinx_gallery")
    out = tmp_path_factory.mktemp("docs") / "html"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class _Page(HTMLParser):
    """The links, anchors and visible text of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.prose: list[str] = []  # the text outside math
        self._skip = 0
        self._math: list[str] = []  # open tags inside a math element

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        if self._math or "math" in (attrs.get("class") or "").split():
            self._math.append(tag)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag in ("a", "link") and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            self.links.append(attrs["src"])

    def handle_endtag(self, tag) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        if self._math and self._math[-1] == tag:
            self._math.pop()

    def handle_data(self, data) -> None:
        if not self._skip:
            self.text.append(data)
            if not self._math:
                self.prose.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _pages(built: Path) -> dict[Path, _Page]:
    return {p: _parse(p) for p in sorted(built.rglob("*.html"))}


def _text(built: Path, name: str) -> str:
    """The visible text of page ``name`` (``choosing.html``), whitespace collapsed."""
    return " ".join("".join(_parse(built / name).text).split())


def test_no_substitution_is_left(built, facts):
    """No ``|name|`` (reST) or ``{{ name }}`` (MyST) outside math: neither a defined fact nor any
    name in the facts' spelling (``word_word``). Norms like ``|v|`` and ``dtd|flowers|voc07``
    (alternatives in a literal) are not names of that form."""
    defined = set(facts.substitutions())
    leftover = re.compile(r"\|([a-z][a-z0-9_]*)\||\{\{ ?([a-z][a-z0-9_]*) ?\}\}")
    found = {}
    for path, page in _pages(built).items():
        if "_modules" in path.parts:  # source code, shown as written
            continue
        hits = [a or b for a, b in leftover.findall(html.unescape("".join(page.prose)))]
        hits = [h for h in hits if h in defined or re.fullmatch(r"[a-z]{2,}_[a-z0-9_]{2,}", h)]
        if hits:
            found[str(path.relative_to(built))] = sorted(set(hits))
    assert not found, f"unreplaced substitutions: {found}"


def test_every_internal_link_and_anchor_resolves(built):
    pages = _pages(built)
    broken = []
    for path, page in pages.items():
        for link in page.links:
            if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("//"):
                continue  # http:, https:, mailto:, data: (external or inline)
            parts = urlsplit(link)
            target, fragment = parts.path, parts.fragment
            dest = (path.parent / unquote(target)).resolve() if target else path
            if dest.is_dir():
                dest = dest / "index.html"
            if not dest.exists():
                broken.append(f"{path.relative_to(built)} -> {link}")
            elif fragment and dest.suffix == ".html":
                ids = pages[dest].ids if dest in pages else _parse(dest).ids
                if unquote(fragment) not in ids:
                    broken.append(f"{path.relative_to(built)} -> {link} (no such anchor)")
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:40])


def test_stated_figures_equal_their_results_files(built, facts):
    """Each figure is computed here from its results file, independently of ``docs/facts.py``,
    and must appear on the pages that state it; the stale figures must not."""
    quick = json.loads((RESULTS / "quick-cpu.json").read_text())
    peers = quick["peers"]["peers"]
    memory = quick["memory"]["over_finetune"]
    hvp = {w: quick["hvp_solver"][w]["hvp_over_gradient"] for w in ("resnet", "gpt")}
    original = peers["reference (double backward per HVP, blockwise CG)"]
    reference = f"{original['time_over_ours']:.2f}"
    blockwise = f"{peers['ours CG blockwise']['time_over_ours']:.2f}"
    kept, recomputed = (f"{memory['upper step, kept graph']:.2f}",
                        f"{memory['upper step, forward-over-reverse']:.2f}")
    fr, rr = (f"{hvp['resnet']['forward-over-reverse']:.2f}",
              f"{hvp['resnet']['reverse-over-reverse']:.2f}")
    fr_gpt, rr_gpt = (f"{hvp['gpt']['forward-over-reverse']:.2f}",
                      f"{hvp['gpt']['reverse-over-reverse']:.2f}")

    choosing = _text(built, "choosing.html")
    assert f"takes {reference}× the time of plain CG(max_iter=5)" in choosing
    assert f"CG(blockwise=True) {blockwise}×" in choosing
    assert f"{kept}× a fine-tuning step with the kept graph and {recomputed}×" in choosing
    assert f"{fr} gradients per product on ResNet-18 against {rr}" in choosing
    assert f"{fr_gpt} against {rr_gpt} on the small GPT" in choosing
    assert not re.search(r"blockwise=True\)\s*\S*\s*[^.]*\b1\.31× faster", choosing)

    robust = json.loads((RESULTS / "robust_ij-cpu.json").read_text())
    (gpt,) = [s for s in robust["systems"] if s["network"].startswith("GPT") and s["mu"] == 10.001]
    cg = {r["value"]: r for r in gpt["rows"] if r["family"] == "cg"}
    error = f"{cg[5]['rel_error_median']:.1e}".replace("e-0", "e-")
    assert f"error {error} at N_c = 5" in choosing
    cost = f"cost {cg[5]['cost_over_gradient']:.1f} ({cg[5]['cost_over_reference']:.2f}×"
    assert cost in choosing

    howtos = _text(built, "howtos.html")
    assert f"costing {fr} gradients on a ResNet-18 against {rr}" in howtos
    assert (f"peaked at {kept}× a fine-tuning step with the kept graph and at {recomputed}×"
            in howtos)
    residual = facts.VISION_RESIDUAL
    assert f"median {residual['median']}, at most {residual['max']}" in howtos
    assert "0.024, at most 0.055" not in howtos
    readme = (ROOT / "README.md").read_text()
    assert f"median {residual['median']}, max {residual['max']}" in readme

    benchmarks = _text(built, "benchmarks.html")
    assert f"{reference} (block-wise CG" in benchmarks
    assert f"{kept} with the kept graph" in benchmarks
    assert "Target (a)" not in benchmarks

    beyond = _text(built, "beyond.html")
    rows = json.loads((RESULTS / "beyond_ij-cpu.json").read_text())["rows"]
    seconds = {(r["mu"], r["method"]): r["seconds"] for r in rows}
    full = seconds[(10.001, "full IJ, MINRES")]
    mfac = seconds[(10.001, "M-FAC (m = 20), no Hessian product")] / full
    assert f"M-FAC {mfac:.2f}×" in beyond
    assert f"{full:.3f}" in beyond  # the exact-Hessian table, included from its results file


def test_bilevel_suite_figures_equal_their_results_file(built):
    """Every cell of the "Implicit or stochastic?" table, recomputed here from
    ``bilevel_suite-full-cpu.json``: each method's time to target (and its full passes) where it
    got there, else its final ``‖∇h‖²``; the figures the page once typed by hand must not come
    back."""
    suite = json.loads((RESULTS / "bilevel_suite-full-cpu.json").read_text())
    names = {"implicit-cg": "CG", "implicit-minres": "MINRES", "argmin-lbfgs": "argmin + L-BFGS",
             "implicit-nystrom-pcg": "Nyström-PCG", "jaxopt-implicit": "JAXopt"}
    page = _text(built, "implicit_or_stochastic.html")
    budget = suite["settings"]["budget"]
    for problem, p in suite["problems"].items():
        if all(m["time_to_target"] is None for m in p["methods"]):
            mantissa, exponent = f"{p['target']:.1e}".split("e")
            assert f"none within {budget:g} s (target {mantissa}e{int(exponent)})" in page
        for m in p["methods"]:
            name = names.get(m["method"], m["method"])
            if m["time_to_target"] is not None:
                calls = m["calls_to_target"]
                passes = f"{calls:.1f}" if calls < 10 else f"{calls:,.0f}"
                assert f"{name} {m['time_to_target']:#.2g} ({passes})" in page, (problem, name)
            elif 2 * m["diverged"] > len(m["runs"]) and m["final"]["inner_distance"] > 1e4 * min(
                    r["curve"][0]["inner_distance"] for r in m["runs"]):  # still diverged
                assert f"{name} ran away on {m['diverged']}/{len(m['runs'])} seeds" in page
            else:
                mantissa, exponent = f"{m['final']['grad_norm2']:.1e}".split("e")
                assert f"{name} {mantissa}e{int(exponent)}" in page, (problem, name)
    for stale in ("AmIGO 2.1e-6", "550-1,090", "(3.4 and 2.7 passes)", "0.02 ξ²"):
        assert stale not in page


def test_every_benchmark_script_is_listed(built):
    """"How the benchmarks are run" names every script of ``benchmarks/`` and states its targets
    in words, not as letters."""
    page = _text(built, "benchmarks_methods.html")
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    missing = [name for name in scripts + ["gpu_check.sh"] if name not in page]
    assert not missing, f"not on the page: {missing}"
    assert not re.search(r"Target \([ab]\)", page)


_SMART = str.maketrans({"…": "...", "“": '"', "”": '"', "‘": "'", "’": "'", "–": "--",
                        "—": "---"})


def test_every_results_table_is_in_the_appendix(built):
    for table in sorted(RESULTS.glob("*.md")):
        page = built / "benchmark_tables" / f"{table.stem}.html"
        assert page.is_file(), f"{table.name} has no appendix page"
        text = _text(built, f"benchmark_tables/{table.stem}.html").translate(_SMART)
        rows = [ln for ln in table.read_text().splitlines()
                if ln.startswith("|") and not set(ln) <= set("|-: ")]
        for row in rows[:3] + rows[-2:]:  # the first and last rows, cell by cell
            for cell in row.strip("|").split("|"):
                words = cell.replace("`", "").replace("**", "").translate(_SMART).split()
                assert " ".join(words) in text, f"{table.name}: {cell.strip()!r} not rendered"


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_gallery_example_ran_and_drew_a_figure(built, name):
    page = built / "gallery" / f"{name}.html"
    source = page.read_text(encoding="utf-8")
    outputs = re.findall(r'sphx-glr-script-out.*?<pre>(.*?)</pre>', source, re.S)
    assert outputs and any(o.strip() for o in outputs), f"{name}: no printed output"
    figure = built / "_images" / f"sphx_glr_{name}_001.png"
    assert figure.is_file() and figure.stat().st_size > 5000, f"{name}: no figure"
    assert f"sphx_glr_{name}_001.png" in source
    thumb = built / "_images" / f"sphx_glr_{name}_thumb.png"
    assert thumb.is_file(), f"{name}: no thumbnail"
    index = (built / "gallery" / "index.html").read_text(encoding="utf-8")
    assert f"sphx_glr_{name}_thumb.png" in index, f"{name}: the gallery card has no thumbnail"
    # the argument parsing is hidden from the page, the run is shown
    assert "add_argument" not in _text(built, f"gallery/{name}.html")
