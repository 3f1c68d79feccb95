"""The private address, on the server: the API shows it before the server has configured it.

``attach_to_network`` finishing makes the API show a server's private IP, but inside the
server the NIC (``enp7s0``, ``ens10``) is configured later, by hc-utils or cloud-init, and
on some fresh Ubuntu 24.04 servers never (docs/simulator.md, fault ``private_nic_missing``).
A dask process bound to it before then fails. So the address is awaited on the server
(polled there, bounded), the NICs are nudged once half-way (their udev "add" events
replayed, which runs hc-utils' rule, and hc-utils' scan), then a clear error.
"""

from __future__ import annotations

import shlex

from . import remote

# Exit status of the script when the address never came.
_MISSING = 3
_NUDGE = (
    "udevadm trigger --action=add --subsystem-match=net >/dev/null 2>&1; "
    "hc-ifscan >/dev/null 2>&1; true"
)


class PrivateAddressMissing(RuntimeError):
    """The server's private address is not on any of its interfaces."""


def _script(ip: str, seconds: float) -> str:
    ticks = max(int(seconds * 5), 2)  # one look every 0.2 s, on the server: no round trips
    return (
        f"ip={shlex.quote(ip)}; n=0\n"
        f"while [ $n -lt {ticks} ]; do\n"
        '  ip -o -4 addr show 2>/dev/null | grep -q " inet $ip/" && exit 0\n'
        f"  if [ $n -eq {ticks // 2} ]; then {_NUDGE}; echo nudged; fi\n"
        "  sleep 0.2; n=$((n + 1))\n"
        "done\n"
        "ip -o -4 addr show 2>&1\n"
        f"exit {_MISSING}\n"
    )


async def wait_private_address(conn: remote.Remote, server: str, ip: str, timeout: float) -> bool:
    """Until ``ip`` is on an interface of ``server``; True if it took a nudge. Raises
    ``PrivateAddressMissing`` after ``timeout`` seconds."""
    result = await conn.run(
        f"sh -c {shlex.quote(_script(ip, timeout))}", check=False, timeout=timeout + 30
    )
    if result.exit_status == _MISSING:
        shown = " | ".join(line.split("\\")[0].strip() for line in result.stdout.splitlines() if " inet " in line)
        raise PrivateAddressMissing(
            f"server {server}: its private address {ip} (the API's) is on none of its interfaces "
            f"after {timeout:g} s, and a nudge of the network did not help (it has: {shown}); "
            "see docs/troubleshooting.md, 'Private address missing'"
        )
    if result.exit_status != 0:
        raise PrivateAddressMissing(
            f"server {server}: checking its private address {ip} failed with exit status "
            f"{result.exit_status}: {(result.stdout + result.stderr).strip()[-300:]}"
        )
    return "nudged" in result.stdout
