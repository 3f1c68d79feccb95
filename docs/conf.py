"""Sphinx configuration: ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import dask_hetzner  # noqa: E402  (the installed package: an import error fails the build)

project = "dask-hetzner"
author = "dask-hetzner developers"
copyright = "dask-hetzner developers"
release = dask_hetzner.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "numpy_docstrings",  # docs/_ext: napoleon's NumPy sections, not on properties
    "hetzner_config",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# Markdown pages: anchors for headings (links like page.md#section), fenced directives.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: the real package is imported (no mocks), docstrings in NumPy or field style.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "alabaster"
html_title = f"dask-hetzner {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Dask clusters on Hetzner Cloud, with a local simulator",
    "fixed_sidebar": True,
}
