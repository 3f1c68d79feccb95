"""`make demo` is a user's first minute: it must run, explain itself and leave nothing behind."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dask_hetzner import demo

pytestmark = pytest.mark.slow


def test_demo_runs_and_sums_up():
    out = io.StringIO()
    summary = demo.run(console=Console(file=out, width=120))
    text = out.getvalue()
    assert summary["leftovers"] == {}
    assert summary["tasks_computed"] > 0
    assert summary["servers_created"] == 4  # scheduler, two workers, a third when scaling up
    assert summary["cost_eur"] > 0
    for words in ("Creating a cluster", "Scaling to 3 workers", "Closing", "demo summary"):
        assert words in text
