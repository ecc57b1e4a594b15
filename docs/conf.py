"""Sphinx configuration of the API reference site: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

project = "kl_precond"
author = "kl_precond authors"
copyright = "2026, kl_precond authors"
release = "0.1.0"

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings; their math is reST ``.. math::``, which MathJax renders in the browser
# (nothing is downloaded at build time).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
# Types go beside the documented arguments, not into the signatures (whose schedules' types are
# long) nor into a list of the undocumented ones.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}

# Markdown: "#anchor" links to headings, as GitHub renders them.
myst_heading_anchors = 3
# The pages link to two files outside docs/, ../README.md and ../benchmarks/README.md, which are
# not part of the site (on GitHub the links work). myst warns "Unknown source document" for them
# (myst.xref_missing) and renders their text unlinked; ignore exactly those two targets, so that
# any other missing page or anchor still fails the build.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
nitpick_ignore_regex = [("myst", re.escape(_root) + r"/(benchmarks/)?README")]

html_theme = "alabaster"
html_title = "kl_precond"
