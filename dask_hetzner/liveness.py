"""A dask process just started detached: alive and listening, or its log's last lines.

``start_detached`` returns once the process is forked; a ``dask worker`` that exits at
once (a bad option, a missing package, an address it cannot bind) would otherwise count
as running. Checked on the server, in one SSH command, bounded: a process of the group
the pidfile names listens on a TCP port (the nanny listens before its preloads run, so
before a worker waits for its scheduler), or none is left.
"""

from __future__ import annotations

import shlex

from . import remote

_DIED, _TIMED_OUT = 4, 5

# In process group $1: `alive` (any non-zombie process), `listening` (a TCP listener).
_FUNCTIONS = r"""pgid_of() {  # prints "PGID STATE" of process $1
    local s; { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
    local -a a=(${s##*\) }); echo "${a[2]} ${a[0]}"
}
alive() {
    local f info
    for f in /proc/[0-9]*; do
        info=$(pgid_of "${f#/proc/}") || continue
        [ "${info% *}" = "$1" ] && [ "${info#* }" != Z ] && return 0
    done
    return 1
}
listening() {
    local p info
    for p in $(ss -Hltnp 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        info=$(pgid_of "$p") || continue
        [ "${info% *}" = "$1" ] && return 0
    done
    return 1
}"""


class ProcessDied(RuntimeError):
    """A dask process exited right after its start, or never listened."""


def _script(pidfile: str, timeout: float) -> str:
    return (
        f"{_FUNCTIONS}\n"
        f"pg=$(cat {pidfile}); end=$(( $(date +%s) + {int(timeout) + 1} ))\n"
        "while :; do\n"
        '  listening "$pg" && exit 0\n'
        f'  alive "$pg" || exit {_DIED}\n'
        f"  [ $(date +%s) -ge $end ] && exit {_TIMED_OUT}\n"
        "  sleep 0.2\n"
        "done\n"
    )


async def wait_listening(conn: remote.Remote, *, pidfile: str, log: str, what: str, timeout: float) -> None:
    """Until the process group in ``pidfile`` listens; ``ProcessDied`` with the log's end."""
    result = await conn.run(f"bash -c {shlex.quote(_script(pidfile, timeout))}", check=False, timeout=timeout + 30)
    if result.exit_status == 0:
        return
    tail = await conn.run(f"tail -n 15 {log}", check=False, timeout=30)
    if result.exit_status == _DIED:
        happened = "exited right after its start"
    elif result.exit_status == _TIMED_OUT:
        happened = f"runs but listens on no port after {timeout:g} s"
    else:
        happened = f"could not be checked (exit status {result.exit_status}: {result.stderr.strip()[-200:]})"
    raise ProcessDied(f"{what} {happened}; last lines of ~/{log}:\n{tail.stdout.rstrip()}")
