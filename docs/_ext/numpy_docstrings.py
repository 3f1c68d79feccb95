"""NumPy-style sections (``Parameters`` / ``----------``) in docstrings, for autodoc.

napoleon's converter, applied to functions, classes and methods only: on properties and
attributes napoleon would read a first line such as ``The most workers (None: no limit)``
as ``type: description``, and those docstrings are prose here.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.ext.napoleon import Config
from sphinx.ext.napoleon.docstring import NumpyDocstring

_CONFIG = Config(napoleon_google_docstring=False, napoleon_numpy_docstring=True)


def _convert(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what in ("attribute", "property", "data"):
        return
    lines[:] = NumpyDocstring(lines, _CONFIG, app, what, name, obj, options).lines()


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.connect("autodoc-process-docstring", _convert)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
