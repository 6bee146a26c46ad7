"""Deterministic fault injection for iSCSI byte streams, in memory and over
TCP: split a stream into whole PDUs, then drop, duplicate or corrupt the
ones a rule picks. Shared by the error-recovery tests (and meant for the
MC/S tests and a conformance kit).

- :func:`split_pdus` cuts complete PDUs off a byte buffer (login PDUs never
  carry digests, RFC 7143 §13.1; others do when negotiated).
- :class:`Fault` says what to do to which PDU: ``match`` picks PDUs by
  their header (opcode, ITT, DataSN...), ``nth`` which match (0 = first),
  ``times`` how many consecutive matches.
- :class:`FaultPlan` applies a list of faults to one direction's PDUs and
  records what it did (``done``), so a test can assert every fault fired.
- :class:`FaultyRelay` is a loopback TCP relay (asyncio) that applies a
  plan per direction: flip bytes of a chosen PDU's data segment so its data
  digest fails, drop or duplicate PDUs, or cut the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from iscsi.constants import Opcode

_LEN = struct.Struct(">I")
_LOGIN = (Opcode.LOGIN_REQUEST, Opcode.LOGIN_RESPONSE)

#: A rule picks PDUs by their 48-byte header.
Match = Callable[[bytes], bool]


def opcode(raw: bytes) -> int:
    """The opcode of a raw PDU."""
    return raw[0] & 0x3F


def u32(raw: bytes, at: int) -> int:
    """A big-endian 32-bit header field (ITT at 16, TTT at 20, StatSN at
    24, DataSN at 36, Buffer Offset at 40...)."""
    return int(_LEN.unpack_from(raw, at)[0])


def is_op(op: int, *, data: bool | None = None, final: bool | None = None,
          status: bool | None = None) -> Match:
    """A rule: opcode ``op``; optionally with/without a data segment, the
    F bit, the S bit (Data-In status)."""
    def match(hdr: bytes) -> bool:
        if opcode(hdr) != op:
            return False
        if data is not None and bool(u32(hdr, 4) & 0xFFFFFF) != data:
            return False
        if final is not None and bool(hdr[1] & 0x80) != final:
            return False
        if status is not None and bool(hdr[1] & 0x01) != status:
            return False
        return True
    return match


def pdu_length(buf: bytes | bytearray | memoryview, header_digest: bool,
               data_digest: bool) -> int | None:
    """Bytes of the PDU at the start of ``buf`` (None: its header is not
    complete yet)."""
    if len(buf) < 48:
        return None
    word = _LEN.unpack_from(buf, 4)[0]
    dlen, ahs = word & 0xFFFFFF, (word >> 24) * 4
    login = buf[0] & 0x3F in _LOGIN
    hd = 4 if header_digest and not login else 0
    dd = 4 if data_digest and dlen and not login else 0
    return 48 + ahs + hd + dlen + (-dlen & 3) + dd


def split_pdus(buf: bytearray, header_digest: bool, data_digest: bool) -> list[bytes]:
    """Cut every complete PDU off the front of ``buf`` (in place)."""
    out: list[bytes] = []
    while True:
        n = pdu_length(buf, header_digest, data_digest)
        if n is None or len(buf) < n:
            return out
        out.append(bytes(buf[:n]))
        del buf[:n]


def corrupt_data(raw: bytes, header_digest: bool) -> bytes:
    """``raw`` with one byte of its data segment flipped: the data digest
    fails, the header (and its digest) stay sound."""
    word = _LEN.unpack_from(raw, 4)[0]
    dlen, ahs = word & 0xFFFFFF, (word >> 24) * 4
    if not dlen:
        raise ValueError("the PDU has no data segment to corrupt")
    at = 48 + ahs + (4 if header_digest else 0) + dlen // 2
    b = bytearray(raw)
    b[at] ^= 0x5A
    return bytes(b)


@dataclass
class Fault:
    """Do ``action`` ("drop", "dup", "corrupt", "corrupt-header",
    "corrupt-length" or "cut") to the ``nth``
    PDU that ``match`` picks (and the ``times - 1`` matches after it)."""

    action: str
    match: Match
    nth: int = 0
    times: int = 1
    seen: int = 0

    def picks(self, hdr: bytes) -> bool:
        """Count a PDU; True when this fault applies to it."""
        if not self.match(hdr):
            return False
        self.seen += 1
        return self.nth < self.seen <= self.nth + self.times


@dataclass
class FaultPlan:
    """Faults for one direction of one connection."""

    faults: list[Fault] = field(default_factory=list)
    header_digest: bool = False
    data_digest: bool = False
    #: (action, opcode, ITT) of every fault applied, in order.
    done: list[tuple[str, int, int]] = field(default_factory=list)
    #: Set by a "cut" fault: the relay closes the connection.
    cut: bool = False
    #: Every Login PDU that passed (never faulted): what was negotiated.
    logins: list[bytes] = field(default_factory=list)

    def apply(self, raw: bytes) -> list[bytes]:
        """What goes on the wire instead of PDU ``raw``."""
        if opcode(raw) in _LOGIN:
            self.logins.append(raw)
            return [raw]
        for f in self.faults:
            if not f.picks(raw):
                continue
            self.done.append((f.action, opcode(raw), u32(raw, 16)))
            if f.action == "drop":
                return []
            if f.action == "dup":
                return [raw, raw]
            if f.action == "corrupt":
                return [corrupt_data(raw, self.header_digest)]
            if f.action == "corrupt-header":
                # The ITT's last byte: the header digest fails, the lengths
                # are intact (what a receiver at ERL >= 1 can recover from).
                return [raw[:19] + bytes([raw[19] ^ 0x01]) + raw[20:]]
            if f.action == "corrupt-length":
                # DataSegmentLength off by 4: the header digest fails and the
                # damaged length cannot be used to skip the PDU.
                return [raw[:7] + bytes([raw[7] ^ 0x04]) + raw[8:]]
            if f.action == "cut":
                self.cut = True
                return []
            raise ValueError(f"unknown fault action {f.action!r}")
        return [raw]

    def stream(self, buf: bytearray) -> list[bytes]:
        """Apply the plan to every complete PDU in ``buf`` (consumed)."""
        out: list[bytes] = []
        for raw in split_pdus(buf, self.header_digest, self.data_digest):
            out.extend(self.apply(raw))
        return out


class FaultyRelay:
    """A loopback TCP relay between an initiator and a target that applies
    ``to_target`` / ``to_initiator`` plans (made fresh per connection by
    the factories) to whole PDUs. Start with :meth:`start`, stop with
    :meth:`close`; :attr:`plans` keeps each connection's pair of plans."""

    def __init__(self, target: tuple[str, int],
                 to_target: Callable[[], FaultPlan],
                 to_initiator: Callable[[], FaultPlan]) -> None:
        self.target = target
        self.to_target = to_target
        self.to_initiator = to_initiator
        self.plans: list[tuple[FaultPlan, FaultPlan]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        """The relay's listening port."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen on 127.0.0.1, any free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, ir: asyncio.StreamReader, iw: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(*self.target)
        self._writers += [iw, tw]
        up, down = self.to_target(), self.to_initiator()
        self.plans.append((up, down))
        for task in (self._pump(ir, tw, up, iw), self._pump(tr, iw, down, tw)):
            t = asyncio.ensure_future(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, plan: FaultPlan,
                    other: asyncio.StreamWriter) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = await src.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                out = plan.stream(buf)
                if out:
                    dst.writelines(out)
                if plan.cut:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (dst, other):
                with contextlib.suppress(Exception):
                    w.close()

    async def close(self) -> None:
        """Stop listening and end every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
