"""CPU shares of simulated servers: each an equal share, all of them below the client.

On Hetzner every server is a machine of its own, and so is the client's. Here
they share this machine's cores, so the simulator gives the servers the weight
of niceness 10 (``HOST_NICENESS``) against the client, and each server an equal part of that,
however many processes it runs.

Niceness alone does not do it. With the kernel's autogroups (on by default in
most distributions) every session gets a CPU group of its own at the weight of
niceness 0, whatever its processes' niceness, and every command of a server
and every daemon it starts with ``setsid`` (``dask worker`` is one) is a
session. Fifty servers would then take fifty fifty-firsts of the CPU from the
client's event loop.

Where a ``cpu`` cgroup can be made (root, cgroup v1 ``cpu`` or v2 with ``cpu``
delegated), the simulator makes ``dask-hetzner-sim-<pid>/`` beside its own
cgroup, at the weight of niceness 10, and in it one group per server: a
command enters its server's group before it runs, and its children, daemons
included, stay there. Otherwise each command's own session gets niceness 10
(``/proc/<pid>/autogroup``); daemons that start a session of their own then
escape it, which is logged once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_PREFIX = "dask-hetzner-sim-"

# Moves itself into the group, then becomes the command: children inherit the group.
_ENTER = 'echo $$ >"$0" 2>/dev/null; exec "$@"'


def own_cgroup() -> tuple[Path, str] | None:
    """This process's cpu cgroup directory and the hierarchy's version, if writable."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1_mount = v2_mount = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            v1_mount = fields[1]
        elif fields[2] == "cgroup2" and v2_mount is None:
            v2_mount = fields[1]
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if v1_mount and "cpu" in controllers.split(","):
            return Path(v1_mount + path.rstrip("/")), "v1"
        if v2_mount and hier == "0" and not v1_mount:
            return Path(v2_mount + path.rstrip("/")), "v2"
    return None


class CpuShares:
    """The CPU groups of one simulator's servers."""

    def __init__(self, niceness: int, sh: str = "/bin/sh") -> None:
        self.niceness = niceness
        # The kernel's weight for that niceness (each step is 1.25x), against niceness 0's 1024
        # (v1 shares) or 100 (v2 weights): 110 and 11 for niceness 10.
        self._shares = round(1024 / 1.25**niceness)
        self._sh = sh
        self.root: Path | None = None
        self.version = ""
        self._warned = False
        self._made: set[int] = set()
        if os.geteuid() == 0:
            self._make_root()
        if self.root is None:
            log.info("simulated servers: no writable cpu cgroup, their sessions are niced")

    @property
    def grouped(self) -> bool:
        """Whether servers run in cgroups (else in niced sessions)."""
        return self.root is not None

    def _make_root(self) -> None:
        own = own_cgroup()
        if own is None:
            return
        parent, version = own
        _sweep(parent)
        root = parent / f"{_PREFIX}{os.getpid()}"
        try:
            if version == "v2":
                # A child's cpu weight needs the controller enabled here, which cgroup v2
                # refuses for a non-root group holding processes (ours does).
                (parent / "cgroup.subtree_control").write_text("+cpu")
            root.mkdir(exist_ok=True)
            if version == "v2":
                (root / "cgroup.subtree_control").write_text("+cpu")
                (root / "cpu.weight").write_text(str(max(1, round(self._shares * 100 / 1024))))
            else:
                (root / "cpu.shares").write_text(str(self._shares))
        except OSError as exc:
            log.info("simulated servers: cannot make a cpu cgroup in %s: %s", parent, exc)
            with contextlib.suppress(OSError):
                root.rmdir()
            return
        self.root, self.version = root, version

    def wrap(self, server_id: int, argv: list[str]) -> list[str]:
        """``argv`` run inside the server's group (unchanged without cgroups)."""
        if self.root is None:
            return argv
        group = self.root / str(server_id)
        if server_id not in self._made:
            try:
                group.mkdir(exist_ok=True)
            except OSError as exc:
                log.warning("server %s: no cpu group: %s", server_id, exc)
                return argv
            self._made.add(server_id)
        return [self._sh, "-c", _ENTER, str(group / "cgroup.procs"), *argv]

    def spawned(self, pid: int, *, own_session: bool) -> None:
        """Without cgroups: nice the session a command just started in (best effort)."""
        if self.root is not None or not own_session:
            return  # a pty command's session starts later, inside it
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(self.niceness))
        except OSError:
            return  # no autogroups (so niceness already works), or the process is gone
        if not self._warned:
            self._warned = True
            log.warning(
                "simulated servers share the client's CPU through niced sessions only; daemons "
                "that start their own session (dask's) compete with the client at full weight "
                "(a cpu cgroup, as root, would keep them below it)"
            )

    def release(self, server_id: int) -> None:
        """Remove a server's group once its processes are gone (best effort)."""
        if self.root is None or server_id not in self._made:
            return
        with contextlib.suppress(OSError):
            (self.root / str(server_id)).rmdir()
            self._made.discard(server_id)

    def close(self) -> None:
        """Remove every group this simulator made (those still holding processes stay)."""
        if self.root is None:
            return
        for server_id in list(self._made):
            self.release(server_id)
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _sweep(parent: Path) -> None:
    """Remove empty groups left by simulators that died (SIGKILL leaves them)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            m = re.fullmatch(rf"{_PREFIX}(\d+)", entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                for child in entry.iterdir():
                    if child.is_dir():
                        child.rmdir()
                entry.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
