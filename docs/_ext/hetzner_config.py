"""Sphinx extension: ``.. hetzner-config::`` renders the ``hetzner.*`` reference.

The text comes from :func:`config_reference.render_rst`, read from the installed package's
``hetzner.yaml`` at every build (and the page is rebuilt when that file changes), so the
reference cannot drift from the defaults.
"""

from __future__ import annotations

from typing import Any

import config_reference  # docs/_ext, put on sys.path by conf.py
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class HetznerConfigDirective(SphinxDirective):
    """Sections (one per group of options) parsed in place of the directive."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        path = config_reference.default_yaml_path()
        self.env.note_dependency(str(path))
        text = config_reference.render_rst(config_reference.parse(path))
        container = nodes.section()  # a throwaway parent: its children are returned
        container.document = self.state.document
        nested_parse_with_titles(
            self.state, StringList(text.splitlines(), source=str(path)), container
        )
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("hetzner-config", HetznerConfigDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
