"""SendTargets, both roles, sans-I/O (RFC 7143 Appendix C)."""

from __future__ import annotations

import pytest

from iscsi.discovery import DiscoveredTarget, parse_send_targets, select_targets, send_targets_answer
from iscsi.errors import TextError
from iscsi.names import Portal

KNOWN = ["iqn.2026-11.org.example:a", "iqn.2026-11.org.example:b"]


@pytest.mark.parametrize("value, session, expect", [
    ("All", None, KNOWN),
    ("All", KNOWN[1], [KNOWN[1]]),             # Normal session: only its own target
    ("", KNOWN[0], [KNOWN[0]]),
    ("", None, []),
    (KNOWN[1], None, [KNOWN[1]]),
    ("iqn.2026-11.org.example:nope", None, []),
])
def test_select_targets(value: str, session: str | None, expect: list[str]) -> None:
    assert select_targets(value, KNOWN, session) == expect


def test_answer_round_trip_with_ipv6_and_tags() -> None:
    portals = [Portal("127.0.0.1", 3260, 1), Portal("::1", 3261, 2)]
    pairs = send_targets_answer([(KNOWN[0], portals), (KNOWN[1], [])])
    assert pairs == [("TargetName", KNOWN[0]), ("TargetAddress", "127.0.0.1:3260,1"),
                     ("TargetAddress", "[::1]:3261,2"), ("TargetName", KNOWN[1])]
    found = parse_send_targets(pairs, default_host="192.0.2.1", default_port=3260)
    assert found == [DiscoveredTarget(KNOWN[0], tuple(portals)),
                     DiscoveredTarget(KNOWN[1], (Portal("192.0.2.1", 3260, None),))]


@pytest.mark.parametrize("pairs", [
    [("TargetAddress", "127.0.0.1:3260,1")],
    [("TargetName", KNOWN[0]), ("TargetAddress", "[::1:3260,1")],
])
def test_malformed_answers(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(TextError):
        parse_send_targets(pairs, default_host="h")
