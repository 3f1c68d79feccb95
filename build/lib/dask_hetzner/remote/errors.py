"""What can go wrong on or talking to a server, and how the messages describe it."""

from __future__ import annotations

import asyncio

import asyncssh

# How many trailing lines of stderr an error message shows.
ERROR_TAIL_LINES = 20


class RemoteError(Exception):
    """Something failed on or talking to a server."""


class SSHConnectError(RemoteError):
    """Could not open an SSH connection."""


class HostKeyMismatch(SSHConnectError):
    """The server presented a host key other than the pinned one: never retried."""


class SSHTimeout(SSHConnectError, TimeoutError):
    """SSH did not become reachable before the deadline."""


class RemoteTimeout(RemoteError, TimeoutError):
    """A remote command or transfer did not finish in time."""


class RemoteCommandError(RemoteError):
    """A command exited with a non-zero status."""

    def __init__(self, host: str, cmd: str, exit_status: int, stdout: str, stderr: str) -> None:
        self.host = host
        self.cmd = cmd
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {short(cmd)!r} on {host} failed with exit status {exit_status}"
            + tail_text(stderr or stdout)
        )


def short(cmd: str, limit: int = 160) -> str:
    """``cmd`` on one line, cut to ``limit`` characters: for messages."""
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."


def tail_text(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``, indented, to append to a message ("" if none)."""
    tail = text.rstrip().splitlines()[-lines:]
    if not tail:
        return ""
    return "; last lines of output:\n" + "\n".join("    " + line for line in tail)


def describe(error: BaseException | None) -> str:
    """An SSH or socket error in a few words."""
    if error is None:
        return "none"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, asyncssh.Error):
        return f"{type(error).__name__}: {error.reason}"
    return f"{type(error).__name__}: {error}"
