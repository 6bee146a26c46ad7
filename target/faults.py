"""A target that misbehaves on purpose, to test initiators:
``iscsi-target serve ... --fault PROFILE`` (and :class:`FaultInjector` from
Python).

A profile is a comma-separated list of ``KIND:N`` items, counted in SCSI
commands per connection (the Nth, 2Nth, ... command, except ``drop`` and
``logout``, which fire once per connection)::

    drop:N            close the TCP connection when command N arrives
                      (it is neither executed nor answered)
    logout:N          after command N, ask for a logout with an Asynchronous
                      Message (event 1, RFC 7143 §11.9.1), Parameter3 2 s
    busy:N            answer every Nth command BUSY (SAM-5 §5.3.1)
    task-set-full:N   answer every Nth command TASK SET FULL
    unit-attention:N  answer every Nth command CHECK CONDITION, UNIT
                      ATTENTION / POWER ON, RESET (29/00)
    delay:N           hold back every Nth command's status for one second
                      (time from the event loop's clock)

None of these is a protocol violation: each is an answer a real target may
give, and the point is to see what the initiator makes of it. The
injector keeps a report: for every fault, what the same initiator did next
(the next command for BUSY and the like; a new login or a logout for a
dropped connection or a logout request; or nothing before the target
stopped) -- ``--fault-report FILE`` writes it
as JSON when the target stops.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from iscsi.scsi.constants import SenseKey, Status
from iscsi.scsi.sense import POWER_ON_RESET, SenseData

#: Fault kinds and whether they repeat every N commands (else: once, at N).
KINDS: dict[str, bool] = {
    "drop": False,
    "logout": False,
    "busy": True,
    "task-set-full": True,
    "unit-attention": True,
    "delay": True,
}

#: Seconds ``delay`` holds a status back; Parameter3 of ``logout``.
DELAY_SECONDS = 1.0
LOGOUT_WAIT = 2

_UA_SENSE = SenseData(SenseKey.UNIT_ATTENTION, *POWER_ON_RESET).encode_fixed()
_STATUS: dict[str, int] = {"busy": Status.BUSY, "task-set-full": Status.TASK_SET_FULL,
                           "unit-attention": Status.CHECK_CONDITION}


class FaultProfileError(ValueError):
    """A --fault profile that cannot be parsed (the message says how)."""


@dataclass(frozen=True)
class Fault:
    """One ``KIND:N`` item of a profile."""

    kind: str
    n: int

    def fires(self, count: int) -> bool:
        """Whether the ``count``-th command of a connection triggers it."""
        return count % self.n == 0 if KINDS[self.kind] else count == self.n


def parse_profile(text: str) -> tuple[Fault, ...]:
    """``"drop:20,busy:5"`` -> faults; raises :class:`FaultProfileError`."""
    out: list[Fault] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        kind, sep, num = item.partition(":")
        if kind not in KINDS:
            raise FaultProfileError(f"unknown fault {kind!r} (one of: {', '.join(KINDS)})")
        if not sep or not num.isdigit() or int(num) < 1:
            raise FaultProfileError(f"{item!r}: give a command count, e.g. {kind}:10")
        out.append(Fault(kind, int(num)))
    if not out:
        raise FaultProfileError("empty fault profile (e.g. --fault drop:20,busy:5)")
    return tuple(out)


@dataclass
class Verdict:
    """What the target does with one command instead of (or besides)
    running it. ``status`` set: answer with it, do not execute; ``drop``:
    close the connection; ``delay``: seconds to hold the status back;
    ``logout``: ask for a logout once it is answered."""

    status: int | None = None
    sense: bytes = b""
    drop: bool = False
    delay: float = 0.0
    logout: bool = False


@dataclass
class _Event:
    fault: str
    initiator: str
    connection: str
    command: int
    cdb: str
    at: float
    next: str | None = None
    next_after: float | None = None


@dataclass
class FaultInjector:
    """Decides, per command, which fault applies, and keeps the report."""

    faults: tuple[Fault, ...]
    events: list[_Event] = field(default_factory=list)
    _counts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str) -> FaultInjector:
        """An injector for a ``--fault`` profile."""
        return cls(parse_profile(text))

    def on_command(self, conn_id: int, initiator: str, peer: str, cdb: bytes,
                   now: float) -> Verdict | None:
        """Count a command of connection ``conn_id``; the verdict for it,
        or None to run it as usual."""
        count = self._counts.get(conn_id, 0) + 1
        self._counts[conn_id] = count
        self._observe(initiator, f"sent command 0x{cdb[:1].hex()}", now)
        verdict: Verdict | None = None
        for f in self.faults:
            if not f.fires(count):
                continue
            verdict = verdict or Verdict()
            if f.kind == "drop":
                verdict.drop = True
            elif f.kind == "logout":
                verdict.logout = True
            elif f.kind == "delay":
                verdict.delay = DELAY_SECONDS
            elif verdict.status is None:
                verdict.status = _STATUS[f.kind]
                verdict.sense = _UA_SENSE if f.kind == "unit-attention" else b""
            self.events.append(_Event(f.kind, initiator, peer, count, cdb[:1].hex(), now))
            if verdict.drop:
                break
        return verdict

    def on_login(self, initiator: str, now: float) -> None:
        """A login from ``initiator`` completed."""
        self._observe(initiator, "logged in again", now)

    def on_logout(self, initiator: str, now: float) -> None:
        """``initiator`` sent a Logout Request."""
        self._observe(initiator, "logged out", now)

    def _observe(self, initiator: str, what: str, now: float) -> None:
        # A dropped connection or a logout request is answered by a login or
        # a logout (commands on other connections say nothing about it); any
        # other fault by whatever the initiator sends next.
        session_event = not what.startswith("sent")
        for ev in self.events:
            if ev.initiator == initiator and ev.next is None and (
                    session_event or ev.fault not in ("drop", "logout")):
                ev.next, ev.next_after = what, round(now - ev.at, 3)

    def report(self) -> dict[str, Any]:
        """The report: every fault injected and what the initiator did next."""
        return {
            "profile": ",".join(f"{f.kind}:{f.n}" for f in self.faults),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "faults": [{"fault": e.fault, "initiator": e.initiator, "connection": e.connection,
                        "command": e.command, "opcode": e.cdb,
                        "initiator_then": e.next or "nothing before the target stopped",
                        "after_seconds": e.next_after} for e in self.events],
        }

    def write_report(self, path: str) -> None:
        """Write :meth:`report` as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.report(), f, indent=2)
            f.write("\n")


__all__ = ["KINDS", "Fault", "FaultInjector", "FaultProfileError", "Verdict", "parse_profile"]
