"""Sphinx configuration for the implicitbilevel documentation.

Build with ``sphinx-build -W -q -b html docs docs/_build/html`` (warnings are errors); run the
doctest blocks with ``sphinx-build -q -b doctest docs docs/_build/doctest``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the library when it is not installed, and the recipes package

import implicitbilevel  # noqa: E402

project = "implicitbilevel"
author = "The implicitbilevel authors"
copyright = "2026, the implicitbilevel authors"
release = implicitbilevel.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"

# -- autodoc / napoleon ------------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
nitpicky = False

# -- doctest -----------------------------------------------------------------------------------
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
"""

# -- HTML --------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"implicitbilevel {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Implicit differentiation through bilevel problems in PyTorch",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
math_number_all = False
