"""The progress displays a sync start shows without a callback (progress.py)."""

from __future__ import annotations

import io
import sys

import dask
import pytest
from rich.console import Console

from dask_hetzner import progress


def test_terminal_table_counts_nodes_up():
    out = io.StringIO()
    with progress.TerminalProgress(Console(file=out, force_terminal=True, width=80)) as p:
        p("scheduler", "creating")
        p("worker-0", "installing")
        p("scheduler", "running")
        p("scheduler", "running")  # a repeat changes nothing
    text = out.getvalue()
    assert "scheduler" in text and "worker-0" in text and "installing" in text
    assert [r[:2] for r in p.rows()] == [("scheduler", "running"), ("worker-0", "installing")]


def test_plain_output_is_one_line_per_change(capsys):
    with progress.TerminalProgress(Console(file=io.StringIO(), force_terminal=False)) as p:
        p("worker-1", "booting")
    assert capsys.readouterr().out == "worker-1: booting\n"


def test_notebook_table_updates_in_place(monkeypatch):
    display = pytest.importorskip("IPython.display")
    shown: list = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj.data))

    def fake_display(obj, display_id=None):
        shown.append(("display", obj.data))
        return Handle()

    monkeypatch.setattr(display, "display", fake_display)
    with progress.NotebookProgress() as p:
        p("scheduler", "booting")
        p("scheduler", "running")
    assert [kind for kind, _ in shown] == ["display", "update", "update"]
    assert "<td>running</td>" in shown[-1][1]


def test_default_follows_config_and_place(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(progress.default(), progress.TerminalProgress)
    with dask.config.set({"hetzner.progress": False}):
        assert progress.default() is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.default() is None
