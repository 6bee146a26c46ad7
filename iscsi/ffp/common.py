"""Pieces of the full-feature phase both roles share: the outbox that turns
PDUs into wire buffers, deadlines driven by a caller-supplied clock, and the
splitting of a transfer into data PDUs and bursts (RFC 7143 §11.7.1, §13.13,
§13.14)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..pdu import PDU, Buffer


@dataclass
class Outbox:
    """Wire buffers queued for the peer, in order.

    Digests are applied here (the engine knows when they start: with the
    first PDU after the final Login Response, RFC 7143 §13.1), and payloads
    stay views: :meth:`PDU.encode` never concatenates a data segment.
    """

    header_digest: bool = False
    data_digest: bool = False
    buffers: list[Buffer] = field(default_factory=list)

    def add(self, pdu: PDU) -> None:
        """Queue one PDU."""
        self.buffers.extend(pdu.encode(self.header_digest, self.data_digest))

    def take(self) -> list[Buffer]:
        """Everything queued since the last call (one ``writelines``)."""
        out, self.buffers = self.buffers, []
        return out

    def __bool__(self) -> bool:
        return bool(self.buffers)


class Deadlines:
    """Named deadlines on the caller's clock.

    An engine arms ``set(name, when)``, disarms with ``cancel(name)``;
    the owner asks :meth:`next` for the earliest and passes ``now`` to
    :meth:`expired`, which removes and returns what is due.
    """

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def set(self, name: str, when: float) -> None:
        """Arm (or re-arm) ``name`` for time ``when``."""
        self._at[name] = when

    def cancel(self, name: str) -> None:
        """Disarm ``name`` (no error if it was not armed)."""
        self._at.pop(name, None)

    def get(self, name: str) -> float | None:
        """When ``name`` is due, or None."""
        return self._at.get(name)

    def next(self) -> float | None:
        """The earliest armed deadline, or None."""
        return min(self._at.values()) if self._at else None

    def expired(self, now: float) -> list[str]:
        """Remove and return every deadline at or before ``now``, earliest first."""
        due = sorted((t, n) for n, t in self._at.items() if t <= now)
        for _, n in due:
            del self._at[n]
        return [n for _, n in due]


def segments(start: int, end: int, max_segment: int,
             burst: int | None = None, burst_origin: int = 0) -> Iterator[tuple[int, int, bool]]:
    """Split bytes [start, end) into data PDUs: yields (offset, length,
    final), where no PDU exceeds ``max_segment`` (the receiver's
    MaxRecvDataSegmentLength, §13.12) and, with ``burst``, none crosses a
    multiple of ``burst`` counted from ``burst_origin`` (MaxBurstLength,
    §13.13); ``final`` marks the last PDU of each burst and of the range
    (the F bit, §11.7.1)."""
    if max_segment <= 0:
        raise ValueError("max_segment must be positive")
    offset = start
    while offset < end:
        n = min(max_segment, end - offset)
        if burst:
            n = min(n, burst - (offset - burst_origin) % burst)
        nxt = offset + n
        final = nxt >= end or (burst is not None and (nxt - burst_origin) % burst == 0)
        yield offset, n, final
        offset = nxt
