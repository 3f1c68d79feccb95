"""The shell scripts that start and stop a server's long-running processes (dask scheduler/worker).

A process is started detached, in its own session (so its own process group), and outlives the
SSH connection. It is stopped by process group through a command run on the server, never with
an SSH signal request (which OpenSSH ignores for non-pty sessions and the simulator refuses).
:class:`dask_hetzner.remote.Remote` runs these scripts; they are only strings here.
"""

from __future__ import annotations

import shlex
from typing import Literal

from .errors import short

StopOutcome = Literal["not running", "terminated", "killed"]
STOP_OUTCOMES: tuple[StopOutcome, ...] = ("not running", "terminated", "killed")

# `alive PGID`: is any non-zombie process in process group PGID?  Read from /proc because
# `kill -0 -PGID` also succeeds for zombies nobody has reaped yet.
_ALIVE_FN = r"""alive() {
    local f s
    local -a a
    for f in /proc/[0-9]*/stat; do
        { read -r s <"$f"; } 2>/dev/null || continue
        a=(${s##*\) })
        if [ "${a[2]}" = "$1" ] && [ "${a[0]}" != Z ] && [ "${a[0]}" != X ]; then
            return 0
        fi
    done
    return 1
}"""


def _shell_path(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading ``~/`` meaning the home directory."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _bash(script: str) -> str:
    """Run ``script`` with bash whatever root's login shell is."""
    return "bash -c " + shlex.quote(script)


def start_command(cmd: str, *, log: str, pidfile: str) -> str:
    """A command starting ``cmd`` detached; it prints the process (group) id as its last line.

    Output goes to ``log`` (appended), the id to ``pidfile``; exits 3 without starting anything
    if ``pidfile`` names a group that is still running.
    """
    script = f"""set -eu
log={_shell_path(log)}
pidfile={_shell_path(pidfile)}
{_ALIVE_FN}
mkdir -p -- "$(dirname -- "$log")" "$(dirname -- "$pidfile")"
if [ -s "$pidfile" ]; then
    old=$(cat -- "$pidfile")
    if alive "$old"; then
        echo "already running as process group $old (pidfile $pidfile)" >&2
        exit 3
    fi
fi
printf '=== %s starting: %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" {shlex.quote(short(cmd, 500))} >>"$log"
# Not a process-group leader here (no job control), so setsid(1) calls setsid() in place
# instead of forking: $! is the new session's leader, and its pid is the process group id.
setsid nohup bash -c {shlex.quote(cmd)} >>"$log" 2>&1 </dev/null &
pid=$!
printf '%s\\n' "$pid" >"$pidfile.tmp.$$"
mv -f -- "$pidfile.tmp.$$" "$pidfile"
printf '%s\\n' "$pid"
"""
    return _bash(script)


def stop_command(pidfile: str, timeout: float) -> str:
    """A command stopping the group in ``pidfile``: SIGTERM, ``timeout`` s, SIGKILL.

    Its last line of output is one of :data:`STOP_OUTCOMES`.
    """
    ticks = max(int(timeout * 10), 1)
    script = f"""set -u
pidfile={_shell_path(pidfile)}
{_ALIVE_FN}
if [ ! -s "$pidfile" ]; then echo "not running"; exit 0; fi
pid=$(cat -- "$pidfile")
case "$pid" in ''|*[!0-9]*) echo "bad pidfile $pidfile: $pid" >&2; exit 2;; esac
if ! alive "$pid"; then rm -f -- "$pidfile"; echo "not running"; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || true
i=0
while alive "$pid" && [ "$i" -lt {ticks} ]; do sleep 0.1; i=$((i + 1)); done
result=terminated
if alive "$pid"; then
    result=killed
    kill -KILL -- "-$pid" 2>/dev/null || true
    i=0
    while alive "$pid" && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if alive "$pid"; then echo "process group $pid survived SIGKILL for 10 s" >&2; exit 3; fi
fi
rm -f -- "$pidfile"
echo "$result"
"""
    return _bash(script)

