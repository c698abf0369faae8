"""Sphinx configuration for the implicitbilevel documentation.

Build with ``sphinx-build -W -n -q -b html docs docs/_build/html`` (warnings are errors, every
reference must resolve); run the doctest blocks with ``sphinx-build -q -b doctest docs
docs/_build/doctest``. The build needs no network: MathJax is bundled
(``sphinx-mathjax-offline``), the torch and Python inventories are the small files in
``docs/_inventories/`` (regenerate them with ``python docs/_inventories/make.py``), and the
gallery runs every example in ``examples/`` at a reduced size (``docs/gallery_args.py``) and shows
its printed output and figures.
"""

from __future__ import annotations

import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(DOCS, ".."))
sys.path.insert(0, ROOT)  # the library when it is not installed, and the recipes package
sys.path.insert(0, DOCS)  # the facts module

import facts  # noqa: E402

import implicitbilevel  # noqa: E402

project = "implicitbilevel"
author = "The implicitbilevel authors"
copyright = "2026, the implicitbilevel authors"
release = implicitbilevel.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx-mathjax-offline",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_inventories", "gallery/*.ipynb",
                    "gallery/*.py", "gallery/*.zip", "gallery/*.codeobj.json"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
rst_prolog = facts.rst_prolog()  # the measured facts, stated once (docs/facts.py)

# -- autodoc / autosummary / napoleon ----------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- cross-references --------------------------------------------------------------------------
# Every name of this project must resolve (-n). torch and Python resolve through local inventories
# (no network needed); the URL is where the links point.
nitpicky = True
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", os.path.join(DOCS, "_inventories", "python.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", os.path.join(DOCS, "_inventories",
                                                                  "torch.inv")),
}
intersphinx_timeout = 1
# Type-hint fragments that are not objects anywhere (typing aliases spelt out by autodoc).
nitpick_ignore_regex = [
    (r"py:.*", r"(torch\._|typing_extensions\.).*"),
    # The recipes are scripts with their own pages (recipes/vision, recipes/nlp), not API: a
    # :mod:`recipes.common.ij` names the module and renders as code without a link.
    (r"py:mod", r"recipes\..*"),
]

# -- MyST (benchmarks/README.md is rendered from its one source) -------------------------------
# The Markdown pages read the measured facts as {{ name }} (the same names as the reST |name|).
myst_enable_extensions = ["dollarmath", "substitution"]
myst_substitutions = facts.substitutions()
myst_heading_anchors = 3
# The results files start at the heading level their script writes; pages include them as is.
suppress_warnings = ["myst.xref_missing", "myst.header"]


def _benchmark_tables() -> None:
    """One page per committed ``benchmarks/results/*.md`` under ``docs/benchmark_tables/``.

    Generated at every build (the folder is not committed), so a results file that a benchmark
    adds or removes appears in or leaves the appendix without an edit; its figure of the same
    name (``external-cpu.png``) is shown under it.
    """
    results = os.path.join(ROOT, "benchmarks", "results")
    out = os.path.join(DOCS, "benchmark_tables")
    os.makedirs(out, exist_ok=True)
    wanted = set()
    for name in sorted(os.listdir(results)):
        stem, ext = os.path.splitext(name)
        if ext != ".md":
            continue
        with open(os.path.join(results, name), encoding="utf-8") as handle:
            first = handle.readline().strip().lstrip("#").strip() or stem
        page = [f"# {first}", "", f"`benchmarks/results/{name}`", "",
                f"```{{include}} ../../benchmarks/results/{name}", ":start-line: 1",
                ":relative-images:", "```", ""]
        if os.path.isfile(os.path.join(results, stem + ".png")):
            page += [f"```{{image}} ../../benchmarks/results/{stem}.png", f":alt: {first}",
                     ":width: 100%", "```", ""]
        text = "\n".join(page)
        wanted.add(stem + ".md")
        target = os.path.join(out, stem + ".md")
        if not os.path.isfile(target) or open(target, encoding="utf-8").read() != text:
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(text)
    for name in os.listdir(out):
        if name not in wanted:
            os.remove(os.path.join(out, name))


_benchmark_tables()

# -- gallery -----------------------------------------------------------------------------------
# Every example runs at build time, at the reduced size of docs/gallery_args.py (each script's
# command line keeps its full-size defaults), with one torch thread, so the gallery executes in
# about a minute on 2 CPU cores. tests/test_docs_rendered.py checks each example's output and
# figure.
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "examples"),
    "gallery_dirs": "gallery",
    "filename_pattern": r"\.py$",  # execute every example
    "plot_gallery": "True",
    "reset_argv": "gallery_args.reset_argv",  # docs/gallery_args.py
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "show_signature": False,
    "write_computation_times": False,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "min_reported_time": 0,
}

# -- doctest -----------------------------------------------------------------------------------
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
"""

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"implicitbilevel {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # wrapped code lines, scrolling wide tables (docs/_static)
math_number_all = False


def _public_bases(app, name, obj, options, bases: list) -> None:
    """Show a class's public ancestors instead of a private base (``_Interpolated`` → its base)."""
    public = []
    for base in bases:
        while base.__name__.startswith("_") and base.__bases__:
            base = base.__bases__[0]
        if base not in public:
            public.append(base)
    bases[:] = public


# Short spellings in annotations and docstrings of third-party names, and their documented names.
THIRD_PARTY = {
    "Tensor": "torch.Tensor",
    "nn.Module": "torch.nn.Module",
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "dist.ProcessGroup": "torch.distributed.ProcessGroup",
    "Path": "pathlib.Path",
}


def _resolve(app, env, node, contnode):
    """Resolve a reference to one of our names however the docstring spells it.

    The API reference documents each public name once, where users import it from
    (``implicitbilevel.CG``, not ``implicitbilevel.solvers.cg.CG``), while a module docstring may
    write ``CG``, ``IJSystem.diagonal`` or ``implicitbilevel.implicit_jacobian.IJSystem``. The
    target is
    looked up as ``implicitbilevel.<suffix>``, in the current module and in the current class;
    third-party short spellings (``Tensor``) go to the inventories.
    """
    if node.get("refdomain") != "py":
        return None
    from sphinx.ext import intersphinx
    from sphinx.util.nodes import make_refnode

    target = node["reftarget"].lstrip(".~")
    if target in THIRD_PARTY:
        node["reftarget"] = THIRD_PARTY[target]
        return intersphinx.missing_reference(app, env, node, contnode)
    objects = env.get_domain("py").objects
    parts = target.split(".")
    candidates = [f"implicitbilevel.{'.'.join(parts[i:])}" for i in range(len(parts))]
    for scope in (node.get("py:module"), node.get("py:class")):
        if scope:
            candidates.append(f"{node.get('py:module')}.{scope}.{target}"
                              if scope == node.get("py:class") else f"{scope}.{target}")
            candidates.append(f"implicitbilevel.{scope.split('.')[-1]}.{target}")
    found = [name for name in candidates if name in objects]
    if not found:  # a unique documented name that ends with the target (``params``)
        tail = "." + target.removeprefix("implicitbilevel.").split(".", 1)[-1]
        ends = [name for name in objects if name.endswith("." + target) or
                (target.startswith("implicitbilevel.") and name.endswith(tail))]
        found = ends if len(ends) == 1 else []
    if found:
        entry = objects[found[0]]
        return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id,
                            contnode, found[0])
    return None


_LINK = re.compile(r'<a ([^>]*?)href="([^"#:]*)(?:#([^"]*))?"([^>]*)>(.*?)</a>', re.S)


def _fix_source_links(app, exception) -> None:
    """Repair the links of the ``_modules`` source pages after the build.

    viewcode keeps one documented module name per source module, so an object documented under
    its public name (``implicitbilevel.NonFiniteError``) and also under a submodule
    (``implicitbilevel.bissl.checkpoint``) gets a "[docs]" link to an anchor that does not exist,
    and its index lists modules it has no page for (``builtins``). Each such link is pointed at the
    one documented object whose name ends like the anchor, or dropped (its text kept) when none
    does. ``tests/test_docs_rendered.py`` checks every link of the built pages.
    """
    if exception is not None or app.builder.format != "html":
        return
    out = app.outdir
    sources = os.path.join(out, "_modules")
    if not os.path.isdir(sources):
        return
    objects = app.env.get_domain("py").objects
    anchors: dict[str, set[str]] = {}

    def ids(path: str) -> set[str]:
        if path not in anchors:
            with open(path, encoding="utf-8") as handle:
                anchors[path] = set(re.findall(r'\bid="([^"]+)"', handle.read()))
        return anchors[path]

    def relocate(anchor: str) -> tuple[str, str] | None:
        parts = anchor.split(".")
        for start in range(len(parts)):
            tail = ".".join(parts[start:])
            found = [n for n in objects if n == tail or n.endswith("." + tail)]
            if len(found) == 1:
                entry = objects[found[0]]
                return app.builder.get_target_uri(entry.docname), entry.node_id
            if found:
                return None
        return None

    for folder, _, files in os.walk(sources):
        for name in files:
            if not name.endswith(".html"):
                continue
            page = os.path.join(folder, name)
            to_root = os.path.relpath(out, folder)

            def repair(match: re.Match, folder: str = folder, to_root: str = to_root) -> str:
                before, target, anchor, after, text = match.groups()
                if not target:
                    return match.group(0)
                dest = os.path.normpath(os.path.join(folder, target))
                if os.path.isfile(dest) and (not anchor or anchor in ids(dest)):
                    return match.group(0)
                moved = relocate(anchor) if anchor and os.path.isfile(dest) else None
                if moved is None:
                    return text
                href = f"{to_root}/{moved[0]}#{moved[1]}".replace(os.sep, "/")
                return f'<a {before}href="{href}"{after}>{text}</a>'

            with open(page, encoding="utf-8") as handle:
                html = handle.read()
            fixed = _LINK.sub(repair, html)
            if fixed != html:
                with open(page, "w", encoding="utf-8") as handle:
                    handle.write(fixed)


def setup(app) -> None:
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("missing-reference", _resolve, priority=900)
    app.connect("build-finished", _fix_source_links)
