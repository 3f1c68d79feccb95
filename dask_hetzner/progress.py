"""Showing a start where people look: a live table in a terminal, one in a notebook.

``HetznerCluster`` reports each node's phase (``creating``, ``booting``, ``installing``,
``running``, ...) to its ``progress`` callback and, always, as INFO log lines
(``dask_hetzner.provision.context``). Without a callback, a sync start shows one of the
displays below when ``hetzner.progress`` is true (the default) and there is somewhere to
show it; ``dask-hetzner create`` uses the terminal one.
"""

from __future__ import annotations

import html
import sys
import time
from typing import Any

from . import config


class Progress:
    """Each node's phase and since when; ``render`` shows it, a context manager around a start."""

    def __init__(self) -> None:
        self.phases: dict[str, tuple[str, float]] = {}
        self.t0 = time.monotonic()

    def rows(self) -> list[tuple[str, str, str]]:
        ordered = sorted(self.phases.items(), key=lambda kv: (kv[0] != "scheduler", kv[0]))
        return [(node, phase, f"{since - self.t0:5.1f} s") for node, (phase, since) in ordered]

    def __call__(self, node: str, phase: str) -> None:
        # Called on the cluster's event loop thread: only cheap, thread-safe work here.
        if self.phases.get(node, ("",))[0] == phase:
            return
        self.phases[node] = (phase, time.monotonic())
        self.render(node, phase)

    def render(self, node: str, phase: str) -> None:
        print(f"{node}: {phase}", flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class TerminalProgress(Progress):
    """A live table on a terminal (rich), one line per change otherwise."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console
        self.live: Any = None

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for column, justify in (("node", "left"), ("phase", "left"), ("since", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for node, phase, since in self.rows():
            style = "green" if phase == "running" else "yellow"
            table.add_row(node, f"[{style}]{phase}[/{style}]", since)
        return table

    def render(self, node: str, phase: str) -> None:
        if self.live is not None:
            self.live.update(self._table())
        else:
            print(f"{node}: {phase}", flush=True)

    def __enter__(self) -> TerminalProgress:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None


class NotebookProgress(Progress):
    """A table in the cell's output, updated in place (IPython's ``display_id``; no widgets)."""

    def __init__(self) -> None:
        super().__init__()
        self.handle: Any = None

    def _html(self) -> Any:
        from IPython.display import HTML

        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{html.escape(p)}</td><td>{s}</td></tr>" for n, p, s in self.rows()
        )
        return HTML(f"<table><tr><th>node</th><th>phase</th><th>since</th></tr>{rows}</table>")

    def render(self, node: str, phase: str) -> None:
        if self.handle is not None:
            self.handle.update(self._html())

    def __enter__(self) -> NotebookProgress:
        from IPython.display import display

        self.handle = display(self._html(), display_id=True)
        return self


def _in_kernel() -> bool:
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"


def default() -> Progress | None:
    """The display for a sync start in this process, or None (nowhere to show it, or off)."""
    if not config.get("progress"):
        return None
    if _in_kernel():
        return NotebookProgress()
    if sys.stderr.isatty():
        from rich.console import Console

        return TerminalProgress(Console(stderr=True))
    return None
