"""SendTargets discovery, both roles, without I/O (RFC 7143 §12.3, Appendix C).

The target side decides which targets a ``SendTargets=<value>`` asks for and
formats the answer; the initiator side groups an answer into targets with all
their portals. ``TargetAddress`` values are ``host[:port],tpgt`` with IPv6
hosts in brackets (§13.8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .constants import ISCSI_PORT
from .errors import TextError
from .names import Portal, format_portal, parse_portal

Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class DiscoveredTarget:
    """One target of a SendTargets answer with all its portals."""

    name: str
    portals: tuple[Portal, ...]


def select_targets(value: str, known: Iterable[str], session_target: str | None) -> list[str]:
    """Which targets ``SendTargets=value`` asks for (Appendix C).

    ``All`` lists every target, but only in a Discovery session
    (``session_target`` None); in a Normal session it and the empty value
    mean the session's own target. Any other value names one target.
    Unknown names give an empty answer, never an error.
    """
    names = list(known)
    if value == "All":
        return names if session_target is None else [session_target]
    if value == "":
        return [session_target] if session_target is not None else []
    return [value] if value in names else []


def send_targets_answer(entries: Iterable[tuple[str, Iterable[Portal]]]) -> list[Pair]:
    """Format the answer: each TargetName followed by its TargetAddress keys."""
    pairs: list[Pair] = []
    for name, portals in entries:
        pairs.append(("TargetName", name))
        for p in portals:
            pairs.append(("TargetAddress", format_portal(p.host, p.port, p.tpgt)))
    return pairs


def parse_send_targets(pairs: Iterable[Pair], *, default_host: str,
                       default_port: int = ISCSI_PORT) -> list[DiscoveredTarget]:
    """Group an answer by target. A target without TargetAddress is reached
    through the portal the discovery session used (Appendix C.1).

    Raises :class:`TextError` for a TargetAddress before any TargetName or a
    malformed address.
    """
    out: list[DiscoveredTarget] = []
    name: str | None = None
    portals: list[Portal] = []

    def close() -> None:
        if name is not None:
            found = tuple(portals) or (Portal(default_host, default_port, None),)
            out.append(DiscoveredTarget(name, found))

    for key, value in pairs:
        if key == "TargetName":
            close()
            name, portals = value, []
        elif key == "TargetAddress":
            if name is None:
                raise TextError("SendTargets answer has TargetAddress before TargetName")
            try:
                portals.append(parse_portal(value, default_port=default_port))
            except ValueError as exc:
                raise TextError(f"malformed TargetAddress {value!r}: {exc}") from None
    close()
    return out
