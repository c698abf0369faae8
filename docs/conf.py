"""Sphinx configuration for the implicitbilevel documentation.

Build with ``sphinx-build -W -n -q -b html docs docs/_build/html`` (warnings are errors, every
reference must resolve); run the doctest blocks with ``sphinx-build -q -b doctest docs
docs/_build/doctest``. The build needs no network: MathJax is bundled
(``sphinx-mathjax-offline``), the torch and Python inventories are the small files in
``docs/_inventories/`` (regenerate them with ``python docs/_inventories/make.py``), and the gallery
renders ``examples/`` without running it (``tests/test_examples.py`` runs every example).
"""

from __future__ import annotations

import os
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
]

# -- MyST (benchmarks/README.md is rendered from its one source) -------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]

# -- gallery -----------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "examples"),
    "gallery_dirs": "gallery",
    "filename_pattern": r"^$",  # render every example; tests/test_examples.py runs them
    "plot_gallery": "False",
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "show_signature": False,
    "write_computation_times": False,
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
html_static_path: list[str] = []
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


def setup(app) -> None:
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("missing-reference", _resolve, priority=900)
