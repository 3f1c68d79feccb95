"""Server types as preference lists: which type goes where, in what order, and why not.

A role's server types are tried in order in the cluster's location, then in each same-zone
fallback location. A pair the catalog shows unavailable (sold out, deprecated) or does not
offer at all is skipped without a request; a pair that answered 412 ``resource_unavailable``
recently goes last. Pure functions over the catalog, so they are tested without the API.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .model import ServerTypeInfo

Types = Mapping[str, ServerTypeInfo]


@dataclass(frozen=True)
class Skipped:
    """A type × location pair not tried, and why (for the message when nothing fits)."""

    server_type: str
    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.server_type} in {self.location}: {self.reason}"


def why_not(types: Types, server_type: str, location: str) -> str | None:
    """Why the catalog says ``server_type`` cannot be ordered in ``location``; None if it can."""
    info = types.get(server_type)
    if info is None:
        return "unknown type"
    if location not in info.hourly and location not in info.available:
        return "not offered there"
    if location not in info.available:
        return "deprecated" if info.deprecated else "unavailable (catalog)"
    return None


def candidates(
    types: Types,
    names: Sequence[str],
    locations: Sequence[str],
    sold_out: Collection[tuple[str, str]] = (),
) -> tuple[list[tuple[str, str]], list[Skipped]]:
    """The (type, location) pairs to try, in order, and those skipped by the catalog.

    Location first: every type of the list in the location, then in each fallback. Pairs that
    answered 412 lately keep their order but come after all the others.
    """
    ordered: list[tuple[str, str]] = []
    skipped: list[Skipped] = []
    for location in locations:
        for name in names:
            reason = why_not(types, name, location)
            if reason is None:
                ordered.append((name, location))
            else:
                skipped.append(Skipped(name, location, reason))
    fresh = [p for p in ordered if p not in sold_out]
    return fresh + [p for p in ordered if p in sold_out], skipped


def check_list(types: Types, names: Sequence[str], locations: Sequence[str], what: str) -> str:
    """Refuse (``ConfigError``) a list with an unknown type, mixed architectures, or no type
    orderable in any location; return its architecture."""
    unknown = [n for n in names if n not in types]
    if unknown:
        valid = sorted(n for n, t in types.items() if t.available)
        raise ConfigError(
            f"unknown server type{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {what}; orderable types: {', '.join(valid)}"
        )
    arches = {types[n].architecture for n in names}
    if len(arches) > 1:
        # One environment per role: a fallback must not silently change the wheels a
        # server installs (some packages have none for Arm) or what tasks compute on.
        by_arch = {a: [n for n in names if types[n].architecture == a] for a in sorted(arches)}
        raise ConfigError(
            f"{what} mixes architectures ("
            + "; ".join(f"{a}: {', '.join(n)}" for a, n in by_arch.items())
            + "): list types of one architecture"
        )
    pairs, skipped = candidates(types, names, locations)
    if not pairs:
        raise ConfigError(
            f"no type of {what} can be ordered in {', '.join(locations)}: "
            + "; ".join(map(str, skipped))
        )
    return arches.pop()


def dearest(types: Types, names: Sequence[str], locations: Sequence[str]) -> float:
    """Gross EUR/h of one server that may get any of ``names`` in any of ``locations``."""
    return max((types[n].price(locations) for n in names if n in types), default=0.0)
