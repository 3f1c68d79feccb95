"""Firewalls enforced: the API's rules as an nftables ruleset inside a server's network namespace.

As on Hetzner (docs.hetzner.com/cloud/firewalls/faq, "Can Firewalls secure traffic to my
private Hetzner Cloud Networks?": no), a firewall filters the public interface only: here
traffic to and from the server's public address, never its private ones or its loopback.
Once a firewall applies, inbound traffic is dropped unless a rule allows it; outbound
stays open unless some firewall has an outbound rule, then it is dropped unless one
allows it. Firewalls are stateful: answers to allowed connections pass.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from .netns import in_netns, run
from .sandbox import tool

_TABLE = "hcloud"
# Private addresses of simulated servers (store/addresses.py): never filtered.
_PRIVATE_BLOCK = "127.128.0.0/9"


def ruleset(public_ip: str, rules: Sequence[dict[str, Any]] | None) -> str:
    """The nft script replacing the server's firewall table (none when ``rules`` is None)."""
    script = [f"add table inet {_TABLE}", f"delete table inet {_TABLE}"]
    if rules is None:
        return "\n".join(script) + "\n"
    inbound = [_match(r, "saddr") for r in rules if r["direction"] == "in"]
    outbound = [_match(r, "daddr") for r in rules if r["direction"] == "out"]
    script += [
        f"table inet {_TABLE} {{",
        "  chain inbound {",
        "    type filter hook input priority 0; policy accept;",
        "    meta nfproto ipv6 accept",  # the simulated servers have no IPv6
        f"    ip daddr != {public_ip} accept",
        "    ct state established,related accept",
        *(f"    {m} accept" for m in inbound),
        "    drop",
        "  }",
    ]
    if outbound:
        script += [
            "  chain outbound {",
            "    type filter hook output priority 0; policy accept;",
            "    meta nfproto ipv6 accept",
            "    oif lo accept",
            f"    ip daddr {_PRIVATE_BLOCK} accept",
            "    ct state established,related accept",
            *(f"    {m} accept" for m in outbound),
            "    drop",
            "  }",
        ]
    script.append("}")
    return "\n".join(script) + "\n"


def _match(rule: dict[str, Any], direction: str) -> str:
    """One rule as an nft match; IPv6 CIDRs are dropped (no IPv6 here)."""
    key = "source_ips" if direction == "saddr" else "destination_ips"
    v4 = [c for c in rule.get(key) or [] if ipaddress.ip_network(c, strict=False).version == 4]
    cidrs = ", ".join(str(ipaddress.ip_network(c, strict=False)) for c in v4)
    addresses = f"ip {direction} {{ {cidrs} }}" if v4 else "ip saddr 255.255.255.255"  # matches nothing
    protocol = rule["protocol"]
    port = rule.get("port")
    if protocol in ("tcp", "udp"):
        ports = "" if port in (None, "any") else f" {protocol} dport {port}"
        return f"{addresses} meta l4proto {protocol}{ports}"
    return f"{addresses} meta l4proto {protocol}"


async def apply(netns_pid: int, public_ip: str, rules: Sequence[dict[str, Any]] | None) -> None:
    """Load the ruleset into the namespace held by ``netns_pid``."""
    await run(in_netns(netns_pid, tool("nft"), "-f", "-"), ruleset(public_ip, rules))
