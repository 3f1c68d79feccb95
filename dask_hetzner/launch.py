"""The dask processes on a server: TLS files, command lines, detached starts.

Every string that reaches a remote command is built here, from the settings and the
server's addresses; option values are quoted.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

from . import early_start, layout, memory, remote
from .cloud import ServerTypeInfo
from .security import ClusterCA

TLS_ARGS = (
    f"--tls-ca-file {layout.TLS_DIR}/ca.pem --tls-cert {layout.TLS_DIR}/node.pem "
    f"--tls-key {layout.TLS_DIR}/node.key"
)
# Plain TCP is refused by the processes themselves, not only by the firewall. Bytecode goes
# to the dask user's own cache: a restart (a kept server) then imports without compiling;
# never into root's environment, which root's own processes run from.
PROCESS_ENV = f'DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True PYTHONPYCACHEPREFIX="$HOME"/{layout.PYCACHE_DIR}'
# The user's variables and secrets (payload.py): read from their 0600 file by the shell that
# starts the process, so no value is ever on a command line. That shell is root's; the dask
# process itself runs as the unprivileged dask user (layout.RUN_AS, docs/security.md).
SOURCE_ENV = f'[ ! -f "$HOME"/{layout.PROCESS_ENV} ] || . "$HOME"/{layout.PROCESS_ENV}; exec {layout.RUN_AS} '


def worker_defaults(server_type: ServerTypeInfo) -> dict[str, Any]:
    """``dask worker`` options that fit the server: all its cores, its memory less the OS's
    and the nanny's (estimated here; ``provision.node.launch_worker`` measures it)."""
    return {
        "nthreads": server_type.cores,
        "memory_limit": memory.estimated_limit(server_type.memory_gb),
    }


def options_args(options: Mapping[str, Any]) -> list[str]:
    """``{"memory_limit": "4GiB"}`` -> ``["--memory-limit 4GiB"]`` (values quoted; keys are
    checked by the settings, and again here: a key is never quoted, so never let through)."""
    for key in options:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ValueError(f"invalid option name {key!r}")
    return [f"--{key.replace('_', '-')} {shlex.quote(str(value))}" for key, value in options.items()]


async def write_tls(ca: ClusterCA, conn: remote.Remote, common_name: str, ips: list[str]) -> None:
    """Copy the CA certificate and a key and certificate made for this node alone.

    They are the dask process's identity: readable by its group (the bootstrap made the
    directory root:dask, setgid), writable by root alone.
    """
    cert = ca.issue(common_name, ips=ips)
    await conn.put(f"{layout.TLS_DIR}/ca.pem", ca.cert_pem, mode=0o640)
    await conn.put(f"{layout.TLS_DIR}/node.pem", cert.cert_pem, mode=0o640)
    await conn.put(f"{layout.TLS_DIR}/node.key", cert.key_pem, mode=0o640)


def scheduler_command(
    *, host: str, port: int, dashboard: str, options: Mapping[str, Any], preload: str | None
) -> str:
    args = [
        layout.DASK,
        "scheduler",
        "--protocol tls",
        f"--host {host}",
        f"--port {port}",
        f"--dashboard-address {dashboard}",
        f"--scheduler-file {layout.SCHEDULER_FILE}",
        TLS_ARGS,
    ]
    if preload is not None:
        args.append(f"--preload {preload}")
    return f"{SOURCE_ENV}env {PROCESS_ENV} " + " ".join(args + options_args(options))


def worker_command(
    *, scheduler: str, name: str, ip: str, preload: str, options: Mapping[str, Any], wait: float
) -> str:
    args = [
        layout.DASK,
        "worker",
        shlex.quote(scheduler),
        f"--name {shlex.quote(name)}",
        f"--host {ip}",
        "--no-dashboard",
        # Its HTTP server (/health, /metrics) runs even without a dashboard, and would
        # otherwise listen on every interface, the public one included.
        f"--dashboard-address {ip}:0",
        f"--local-directory {layout.WORK_DIR}",
        # The nanny's and its worker process's: both wait for the scheduler (early_start.py).
        f"--preload-nanny {preload}",
        f"--preload {preload}",
        TLS_ARGS,
    ]
    env = f"{PROCESS_ENV} {early_start.PROCESS_ENV} {early_start.WAIT_ENV}={int(wait)}"
    return f"{SOURCE_ENV}env {env} " + " ".join(args + options_args(options))


async def wait_for_file(conn: remote.Remote, path: str, *, timeout: float, what: str, log: str) -> dict[str, Any]:
    """Wait on the server itself (one SSH command, bounded) for a JSON file to appear."""
    q = shlex.quote(path)
    script = (
        f"end=$(( $(date +%s) + {int(timeout)} )); "
        f"until [ -s {q} ] && python3 -c 'import json,sys; json.load(open(sys.argv[1]))' {q} 2>/dev/null; do "
        f"  [ $(date +%s) -ge $end ] && exit 124; sleep 0.2; done; cat {q}"
    )
    result = await conn.run(script, check=False, timeout=timeout + 30)
    if result.exit_status != 0:
        tail = await conn.run(f"tail -n 25 {shlex.quote(log)}", check=False, timeout=30)
        raise TimeoutError(
            f"{what} did not start within {timeout:.0f} s; last lines of ~/{log}:\n{tail.stdout.rstrip()}"
        )
    return dict(json.loads(result.stdout))
