"""A blocking, PDU-level connection to a target for the conformance kit.

Unlike the initiator's transport it does exactly what the test says --
including the wrong thing: any header can be altered after encoding, digests
can be corrupted, reserved opcodes sent -- and it keeps every PDU both ways
in a transcript. Every wait is bounded by the test's deadline.

Received PDUs are delimited here (not by :class:`iscsi.framing.PDUReader`)
so the raw bytes of whatever the target sends are at hand when they do not
decode: that is a finding to report, not a crash.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from iscsi.constants import BHS_LEN, RESERVED_TAG, Stage
from iscsi.digest import crc32c, digest_bytes, digest_value
from iscsi.errors import ProtocolError
from iscsi.keys import NegotiatedParams
from iscsi.login import ChapAuth, InitiatorLogin
from iscsi.pdu import (
    PDU,
    AsyncMessage,
    DataIn,
    LoginRequest,
    LoginResponse,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiResponse,
    TaskMgmtResponse,
    TextResponse,
    decode_header_and_data,
)
from iscsi.text import decode_text, encode_text

from .describe import describe, describe_raw
from .model import Failed, TestError

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
# PDUs whose StatSN field is meaningful and advances ExpStatSN (§4.2.2.2).
_STATUS_PDUS = (ScsiResponse, TaskMgmtResponse, TextResponse, LogoutResponse, Reject,
                AsyncMessage, LoginResponse)


class PeerClosed(Exception):
    """The target closed (or reset) the connection."""


class TestTimeout(Exception):
    """The test's time is up."""


@dataclass
class Transcript:
    """What a test exchanged, one line per PDU or event."""

    lines: list[str]
    start: float

    def add(self, conn: int, arrow: str, text: str) -> None:
        """Record one line, stamped with the time since the test began."""
        self.lines.append(f"{time.monotonic() - self.start:7.3f} c{conn} {arrow} {text}")


class Wire:
    """One TCP connection to the target under test."""

    _ids = itertools.count(1)

    def __init__(self, host: str, port: int, transcript: Transcript, deadline: float) -> None:
        self.id = next(Wire._ids)
        self.transcript = transcript
        self.deadline = deadline
        self.buf = bytearray()
        try:
            self.sock = socket.create_connection((host, port), timeout=max(0.1, self.remaining()))
        except OSError as exc:
            raise TestError(f"cannot connect to {host}:{port}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transcript.add(self.id, "..", f"connected to {host}:{port}")
        self.closed = False
        self.hd = self.dd = False
        self.params: NegotiatedParams | None = None
        self.isid = 0
        self.tsih = 0
        self.cmdsn = 0
        self.expstatsn = 0
        self.maxcmdsn = 0
        self.expcmdsn = 0
        self._itt = itertools.count(0x10)

    # -- housekeeping -------------------------------------------------------
    def remaining(self) -> float:
        """Seconds left before the test's deadline."""
        return self.deadline - time.monotonic()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def next_itt(self) -> int:
        """A fresh Initiator Task Tag."""
        return next(self._itt)

    def next_cmdsn(self) -> int:
        """The CmdSN for a non-immediate command, advancing the counter."""
        sn = self.cmdsn
        self.cmdsn = (sn + 1) & 0xFFFFFFFF
        return sn

    # -- sending --------------------------------------------------------------
    def encode(self, pdu: PDU, *, mutate: Callable[[bytearray], None] | None = None,
               bad_header_digest: bool = False, bad_data_digest: bool = False) -> bytes:
        """The PDU's wire bytes with the connection's digests; ``mutate``
        edits the header (BHS + AHS) before the digests are computed."""
        bufs = pdu.encode(False, False)
        hdr = bytearray(bufs[0])
        if mutate is not None:
            mutate(hdr)
        data = bytes(pdu.data)
        out = bytearray(hdr)
        if self.hd:
            d = bytearray(digest_bytes(hdr))
            if bad_header_digest:
                d[0] ^= 0xFF
            out += d
        if data:
            pad = _PAD[len(data) & 3]
            out += data + pad
            if self.dd:
                d = bytearray(digest_bytes(data, pad))
                if bad_data_digest:
                    d[0] ^= 0xFF
                out += d
        return bytes(out)

    def send(self, pdu: PDU, *, note: str = "",
             mutate: Callable[[bytearray], None] | None = None,
             bad_header_digest: bool = False, bad_data_digest: bool = False) -> bytes:
        """Send ``pdu`` (the keywords as for :meth:`encode`); returns the
        48-byte header as sent."""
        raw = self.encode(pdu, mutate=mutate, bad_header_digest=bad_header_digest,
                          bad_data_digest=bad_data_digest)
        shown = describe(pdu)
        if mutate is not None:
            shown = "(altered) " + describe_raw(raw[:BHS_LEN]) + " from " + shown
        self.send_raw(raw, shown + (f"  [{note}]" if note else ""))
        return raw[:BHS_LEN]

    def send_raw(self, raw: bytes, text: str) -> None:
        """Send bytes as they are."""
        self.transcript.add(self.id, "->", text)
        try:
            self.sock.settimeout(max(0.1, self.remaining()))
            self.sock.sendall(raw)
        except OSError as exc:
            raise PeerClosed(f"send failed: {exc}") from exc

    # -- receiving ------------------------------------------------------------
    def _fill(self, n: int, until: float) -> bool:
        """Read until ``n`` bytes are buffered; False when ``until`` passes."""
        while len(self.buf) < n:
            left = until - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                return False
            except OSError as exc:
                self.transcript.add(self.id, "<-", f"connection error: {exc}")
                raise PeerClosed(str(exc)) from exc
            if not chunk:
                self.transcript.add(self.id, "<-", "connection closed by target")
                raise PeerClosed("connection closed by target")
            self.buf += chunk
        return True

    def recv(self, wait: float | None = None) -> PDU | None:
        """The next PDU, or None when ``wait`` seconds pass without one.

        With ``wait`` None it waits until the test's deadline and raises
        :class:`TestTimeout`. Raises :class:`PeerClosed` on EOF and
        :class:`Failed` when the target's PDU does not decode or its digest
        is wrong.
        """
        if self.closed:
            raise PeerClosed("connection already closed")
        until = self.deadline if wait is None else min(self.deadline, time.monotonic() + wait)
        if not self._fill(BHS_LEN, until):
            self._timed_out(wait)
            return None
        ahs = self.buf[4] * 4
        dlen = int.from_bytes(self.buf[5:8], "big")
        hd = 4 if self.hd else 0
        pad = (-dlen) & 3
        dd = 4 if (self.dd and dlen) else 0
        total = BHS_LEN + ahs + hd + dlen + pad + dd
        if not self._fill(total, until):
            self._timed_out(wait)
            return None
        raw = bytes(self.buf[:total])
        del self.buf[:total]
        head = raw[: BHS_LEN + ahs]
        if hd and digest_value(raw[len(head): len(head) + 4]) != crc32c(head):
            self.transcript.add(self.id, "<-", "header digest error: " + describe_raw(head))
            raise Failed("target sent a PDU with a wrong header digest (RFC 7143 §13.1)",
                         describe_raw(head))
        start = len(head) + hd
        data = raw[start: start + dlen]
        if dd and digest_value(raw[start + dlen + pad: start + dlen + pad + 4]) != crc32c(
                raw[start: start + dlen + pad]):
            self.transcript.add(self.id, "<-", "data digest error: " + describe_raw(head))
            raise Failed("target sent a PDU with a wrong data digest (RFC 7143 §13.1)",
                         describe_raw(head))
        try:
            pdu = decode_header_and_data(head[:BHS_LEN], head[BHS_LEN:], data)
        except ProtocolError as exc:
            self.transcript.add(self.id, "<-", f"undecodable: {exc}: {describe_raw(head)}")
            raise Failed(f"target sent a malformed PDU: {exc}", describe_raw(head)) from exc
        self.transcript.add(self.id, "<-", describe(pdu))
        self._track(pdu)
        return pdu

    def _timed_out(self, wait: float | None) -> None:
        if wait is None or time.monotonic() >= self.deadline:
            raise TestTimeout("no answer before the test's time limit")

    def _track(self, pdu: PDU) -> None:
        statsn = getattr(pdu, "statsn", None)
        counts = isinstance(pdu, _STATUS_PDUS) or (isinstance(pdu, DataIn) and pdu.status_present) \
            or (isinstance(pdu, NopIn) and pdu.itt != RESERVED_TAG)
        if statsn is not None and counts:
            self.expstatsn = (statsn + 1) & 0xFFFFFFFF
        maxcmdsn = getattr(pdu, "maxcmdsn", None)
        if maxcmdsn is not None and not isinstance(pdu, LoginResponse):
            self.expcmdsn = int(getattr(pdu, "expcmdsn"))
            self.maxcmdsn = int(maxcmdsn)

    def next_pdu(self, wait: float | None = None) -> PDU | None:
        """Like :meth:`recv`, but answers the target's NOP-In pings (TTT set)
        and skips them, so a test sees only what it asked for."""
        while True:
            pdu = self.recv(wait)
            if isinstance(pdu, NopIn) and pdu.ttt != RESERVED_TAG:
                self.send(NopOut(itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self.cmdsn,
                                 expstatsn=self.expstatsn, immediate=True),
                          note="answer to the target's ping")
                continue
            return pdu

    def expect(self, cls: type[PDU] | tuple[type[PDU], ...], what: str,
               wait: float | None = None) -> PDU:
        """The next PDU, which must be of ``cls``; fails otherwise."""
        try:
            pdu = self.next_pdu(wait)
        except PeerClosed as exc:
            raise Failed(f"target closed the connection while we waited for {what}") from exc
        except TestTimeout as exc:
            raise Failed(f"no {what} before the test's time limit") from exc
        if pdu is None:
            raise Failed(f"no {what} within {wait} s")
        if not isinstance(pdu, cls):
            raise Failed(f"expected {what}, got {describe(pdu).split(' ')[0]} "
                         f"{type(pdu).__name__}", describe(pdu))
        return pdu

    def drops_within(self, wait: float) -> tuple[bool, list[PDU]]:
        """Read for up to ``wait`` seconds: (closed by the target?, PDUs seen)."""
        seen: list[PDU] = []
        until = time.monotonic() + wait
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    return False, seen
                pdu = self.next_pdu(left)
                if pdu is None:
                    return False, seen
                seen.append(pdu)
        except PeerClosed:
            return True, seen
        except TestTimeout:
            return False, seen

    # -- login ----------------------------------------------------------------
    def login_pdu(self, keys: Sequence[tuple[str, str]] | bytes, *, isid: int, csg: int,
                  nsg: int = 0, transit: bool = False, cont: bool = False, tsih: int = 0,
                  cid: int = 0, version_max: int = 0, version_min: int = 0, itt: int = 0,
                  cmdsn: int = 0, expstatsn: int = 0,
                  mutate: Callable[[bytearray], None] | None = None) -> LoginResponse | None:
        """Send one hand-made Login Request; return the response, or None
        when the target closed the connection instead of answering."""
        data = keys if isinstance(keys, bytes) else encode_text(keys)
        req = LoginRequest(transit=transit, cont=cont, csg=csg, nsg=nsg if transit else 0,
                           version_max=version_max, version_min=version_min, isid=isid,
                           tsih=tsih, itt=itt, cid=cid, cmdsn=cmdsn, expstatsn=expstatsn,
                           data=data)
        self.send(req, mutate=mutate)
        try:
            pdu = self.next_pdu()
        except PeerClosed:
            return None
        if not isinstance(pdu, LoginResponse):
            raise Failed("a Login Request was answered by a non-Login PDU (RFC 7143 §11.13)",
                         describe(pdu) if pdu is not None else None)
        return pdu

    def login(self, initiator: str, target: str | None, *, isid: int, tsih: int = 0,
              cid: int = 0, chap: ChapAuth | None = None,
              offers: Mapping[str, str | None] | None = None) -> LoginResponse:
        """A complete, well-behaved login with our initiator state machine.

        Raises :class:`iscsi.login.LoginRejected` (a ProtocolError) when the
        target refuses, and :class:`PeerClosed` when it hangs up.
        """
        lg = InitiatorLogin(initiator, target, isid, tsih=tsih, cid=cid, auth=chap,
                            offers=offers or {}, itt=0)
        req: LoginRequest | None = lg.start()
        resp: LoginResponse | None = None
        while req is not None:
            self.send(req)
            pdu = self.next_pdu()
            if not isinstance(pdu, LoginResponse):
                raise Failed("a Login Request was answered by a non-Login PDU (RFC 7143 §11.13)",
                             describe(pdu) if pdu is not None else None)
            resp = pdu
            req = lg.receive(pdu)
        assert resp is not None
        self.params = lg.params
        self.hd, self.dd = self.params.header_digest, self.params.data_digest
        self.isid, self.tsih = isid, lg.tsih
        self.cmdsn = self.expcmdsn = lg.expcmdsn
        self.maxcmdsn = lg.maxcmdsn
        self.expstatsn = lg.exp_statsn
        return resp


def login_keys(resp: LoginResponse | TextResponse) -> list[tuple[str, str]]:
    """The key=value pairs of a response; a malformed text is a failure."""
    try:
        return decode_text(bytes(resp.data))
    except ProtocolError as exc:
        raise Failed(f"target's text does not decode: {exc} (RFC 7143 §6.1)",
                     describe(resp)) from exc


__all__ = ["PeerClosed", "Stage", "TestTimeout", "Transcript", "Wire", "login_keys"]
