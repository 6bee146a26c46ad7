"""Delimiting a TCP byte stream into PDUs (RFC 7143 §11.2).

:class:`PDUReader` is shaped for ``asyncio.BufferedProtocol``: the adapter
asks :meth:`PDUReader.get_buffer` where the kernel should write and reports
with :meth:`PDUReader.buffer_updated`. Small PDUs are parsed straight out of
a reused staging buffer; a large data segment gets its own buffer (or the
caller's, through a *placement* callback) and the rest of it is received
directly into that buffer, so payloads are copied at most once and usually
not at all.

The header is checked before anything is buffered for it: a
DataSegmentLength above the negotiated MaxRecvDataSegmentLength or an AHS
above the cap raises at once (RFC 7143 §7.2, §13.12), so a hostile peer cannot
make us allocate.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .constants import BHS_LEN, DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH, Opcode
from .digest import crc32c, digest_value
from .errors import (
    AHSTooLong,
    DataDigestError,
    DataSegmentTooLong,
    FramingError,
    HeaderDigestDiscarded,
    HeaderDigestError,
    PDUFormatError,
    ProtocolError,
)
from .pdu import PDU, decode_header_and_data

Buffer = bytes | bytearray | memoryview

#: Placement callback: (header bytes, data segment length) -> a writable
#: memoryview of exactly that length to receive the payload into, or None to
#: let the reader allocate. Used to land Data-Out/Data-In payloads directly in
#: the command's buffer.
Placement = Callable[[bytes, int], "memoryview | None"]

_LEN = struct.Struct(">I")  # bytes 4..7: TotalAHSLength << 24 | DataSegmentLength
_STAGE_SIZE = 256 * 1024
#: Data segments at least this long are received into their own buffer.
_DIRECT_THRESHOLD = 16 * 1024
#: A staging buffer that holds any PDU staged whole: the largest header
#: (BHS + AHS + digest) and a data segment just under the direct threshold
#: with its padding and digest. A connection still logging in needs no more
#: (login PDUs carry at most 8192 bytes, RFC 7143 §13.12), so silent
#: connections cost little; the adapter grows it after login.
SMALL_STAGE = 48 + 1024 + 4 + _DIRECT_THRESHOLD + 8
#: RFC 7143 allows 255 words of AHS; we never need more than an extended CDB.
DEFAULT_MAX_AHS = 1024
_LOGIN_OPCODES = (Opcode.LOGIN_REQUEST, Opcode.LOGIN_RESPONSE)


class PDUReader:
    """Incremental, bounded PDU decoder for one connection direction."""

    def __init__(
        self,
        *,
        max_data_segment_length: int = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
        header_digest: bool = False,
        data_digest: bool = False,
        max_ahs_length: int = DEFAULT_MAX_AHS,
        placement: Placement | None = None,
        stage_size: int = _STAGE_SIZE,
    ) -> None:
        #: The limit we declared (our MaxRecvDataSegmentLength); the adapter
        #: raises it after login. Login PDUs always get the 8192 default.
        self.max_data_segment_length = max_data_segment_length
        self.header_digest = header_digest
        self.data_digest = data_digest
        self.max_ahs_length = max_ahs_length
        self.placement = placement
        if max_ahs_length + 4 + BHS_LEN + _DIRECT_THRESHOLD + 8 > stage_size:
            raise ValueError(f"stage_size {stage_size} cannot hold a staged PDU")
        self._stage_size = stage_size
        self._stage = bytearray(stage_size)
        self._view = memoryview(self._stage)
        self._start = 0
        self._end = 0
        # Direct mode: the current PDU's header, its data destination and a
        # small tail buffer for padding + data digest.
        self._hdr: bytes | None = None
        self._ahs = b""
        self._head_len = 0
        self._dest: memoryview | None = None
        self._dest_filled = 0
        self._dlen = 0
        self._tail = bytearray(7)
        self._tail_len = 0
        self._tail_filled = 0
        self._pending_error: ProtocolError | None = None
        self._dead: FramingError | None = None
        #: At ErrorRecoveryLevel >= 1 a PDU whose header digest fails is
        #: discarded by its (untrusted) lengths instead of ending the stream;
        #: the next header must then pass, or the stream ends after all.
        self.discard_bad_headers = False
        self._resyncing = False
        self._discard = 0

    def resize_stage(self, size: int) -> None:
        """Use a staging buffer of ``size`` bytes from now on (after login:
        larger receives per system call). Bytes staged but not parsed are
        kept."""
        if size == self._stage_size:
            return
        n = self._end - self._start
        if n > size:
            raise ValueError(f"{n} bytes staged do not fit {size}")
        fresh = bytearray(size)
        fresh[:n] = self._view[self._start : self._end]
        self._stage, self._view = fresh, memoryview(fresh)
        self._start, self._end = 0, n
        self._stage_size = size

    # -- BufferedProtocol interface -----------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned PDU."""
        if self._dest is not None:
            return self._head_len + self._dest_filled + self._tail_filled
        return self._end - self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should be written."""
        if self._dest is not None:
            if self._dest_filled < self._dlen:
                return self._dest[self._dest_filled :]
            return memoryview(self._tail)[self._tail_filled : self._tail_len]
        if self._end == len(self._stage):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[PDU]:
        """Account for ``nbytes`` written into the last buffer and return the
        PDUs now complete (see :meth:`parse`)."""
        if self._dest is not None:
            if self._dest_filled < self._dlen:
                self._dest_filled += nbytes
            else:
                self._tail_filled += nbytes
            if self._dest_filled == self._dlen and self._tail_filled == self._tail_len:
                return self._finish_direct()
            return []
        self._end += nbytes
        return self.parse()

    def feed(self, data: Buffer) -> list[PDU]:
        """Copy ``data`` in and return every PDU it completes (tests and
        blocking sockets; the asyncio adapter uses get_buffer/buffer_updated).

        Like :meth:`parse`, parsing stops after a Login PDU, so the caller
        can switch digests and limits first; it also stops at a recoverable
        error that follows returned PDUs. Either way all of ``data`` is kept
        (nothing is lost and the stream stays in sync): the next call, e.g.
        ``feed(b"")`` or :meth:`parse`, raises the pending error or goes on
        parsing. An error with no PDU before it is raised at once, also after
        keeping the rest of ``data``. ``feed(b"")`` is :meth:`parse`.
        """
        if self._dead is not None:
            raise self._dead
        mv = memoryview(data).cast("B")
        if not len(mv):
            return self.parse()
        out: list[PDU] = []
        error: ProtocolError | None = None
        pos = 0
        while pos < len(mv):
            if error is not None or self._pending_error is not None or (
                    out and out[-1].opcode in _LOGIN_OPCODES):
                # Hold the rest unparsed: it must be delimited with the
                # settings in force after this Login PDU or this error.
                self._hold(mv[pos:])
                break
            buf = self.get_buffer()
            n = min(len(buf), len(mv) - pos)
            if n == 0:  # pragma: no cover - the stage always has room
                raise FramingError("receive buffer full")
            buf[:n] = mv[pos : pos + n]
            pos += n
            try:
                out.extend(self.buffer_updated(n))
            except FramingError:
                if out:  # _dead is set; the next call raises it
                    return out
                raise
            except ProtocolError as exc:
                error = exc
        if error is not None:
            if out:
                self._pending_error = error
                return out
            raise error
        return out

    def _hold(self, chunk: memoryview) -> None:
        """Append ``chunk`` to the stage without parsing it, growing the
        stage if a caller of :meth:`feed` handed us more than fits."""
        n = len(chunk)
        if self._end + n > len(self._stage):
            self._compact()
        if self._end + n > len(self._stage):
            grown = bytearray(self._end + n)
            grown[: self._end] = self._view[: self._end]
            self._stage, self._view = grown, memoryview(grown)
        self._view[self._end : self._end + n] = chunk
        self._end += n

    # -- parsing --------------------------------------------------------------
    def parse(self) -> list[PDU]:
        """Return the PDUs complete in the staging buffer.

        Parsing stops after a Login Request/Response, because the adapter
        must switch digests and limits before the next PDU is delimited
        (RFC 7143 §13.1: digests start with the first PDU after login).
        A recoverable error (bad data digest, invalid field) is raised in
        stream order: PDUs before it are returned first and the error is
        raised by the next call. Framing errors are permanent.
        """
        if self._dead is not None:
            raise self._dead
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        out: list[PDU] = []
        while self._dest is None:
            try:
                pdu = self._parse_one()
            except FramingError as exc:
                # Permanent: every later call raises it again (_dead above).
                self._dead = exc
                if out:
                    return out
                raise
            except ProtocolError as exc:
                if out:
                    self._pending_error = exc
                    return out
                raise
            if pdu is None:
                break
            out.append(pdu)
            if pdu.opcode in _LOGIN_OPCODES:
                break
        if self._start == self._end and len(self._stage) != self._stage_size:
            # feed() grew the stage to hold a large input; give it back.
            self._stage = bytearray(self._stage_size)
            self._view = memoryview(self._stage)
            self._start = self._end = 0
        return out

    def _skip(self, n: int) -> None:
        """Drop the next ``n`` bytes of the stream, staged or still to come."""
        have = min(n, self._end - self._start)
        self._start += have
        self._discard = n - have
        if self._start == self._end:
            self._start = self._end = 0

    def _parse_one(self) -> PDU | None:
        if self._discard:
            self._skip(self._discard)
            if self._discard:
                return None
        avail = self._end - self._start
        if avail < BHS_LEN:
            return None
        start = self._start
        stage = self._stage
        (word,) = _LEN.unpack_from(stage, start + 4)
        dlen = word & 0xFFFFFF
        ahs_len = (word >> 24) * 4
        hd = 4 if self.header_digest else 0
        opcode = stage[start] & 0x3F
        limit = self.max_data_segment_length
        if opcode in _LOGIN_OPCODES:
            limit = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
        view = self._view
        if ahs_len > self.max_ahs_length:
            raise AHSTooLong(f"TotalAHSLength {ahs_len} exceeds {self.max_ahs_length}",
                             header=bytes(view[start : start + BHS_LEN]))
        if dlen > limit:
            raise DataSegmentTooLong(
                f"DataSegmentLength {dlen} exceeds MaxRecvDataSegmentLength {limit}",
                header=bytes(view[start : start + BHS_LEN]))
        head_len = BHS_LEN + ahs_len + hd
        if avail < head_len:
            self._make_room(head_len)
            return None
        hdr = bytes(view[start : start + BHS_LEN])
        ahs = bytes(view[start + BHS_LEN : start + BHS_LEN + ahs_len])
        if hd:
            want = digest_value(view[start + BHS_LEN + ahs_len : start + head_len])
            got = crc32c(view[start : start + BHS_LEN + ahs_len])
            if want != got:
                if self.discard_bad_headers and not self._resyncing:
                    self._resyncing = True
                    self._skip(head_len + dlen + ((-dlen) & 3) + (4 if self.data_digest and dlen
                                                                   else 0))
                    raise HeaderDigestDiscarded(
                        f"header digest mismatch (got {got:08x}, expected {want:08x}): "
                        f"PDU discarded")
                raise HeaderDigestError(f"header digest mismatch (got {got:08x}, "
                                        f"expected {want:08x})", header=hdr)
            self._resyncing = False
        pad = (-dlen) & 3
        dd = 4 if (self.data_digest and dlen) else 0
        total = head_len + dlen + pad + dd
        dest = self.placement(hdr, dlen) if (self.placement is not None and dlen) else None
        if dest is not None and (dest.nbytes != dlen or dest.readonly or dest.itemsize != 1):
            # A bug in the caller's callback, not bad input from the peer.
            raise ValueError(f"placement returned {dest.nbytes} bytes "
                             f"({'read-only' if dest.readonly else 'writable'}, "
                             f"format {dest.format!r}) for a {dlen}-byte data segment")
        if avail < total and dlen >= _DIRECT_THRESHOLD:
            # Switch to direct mode: the payload goes to its own buffer (the
            # caller's, when it placed it). A short segment is staged like
            # any PDU and copied to its place once whole: receiving it
            # directly would cost a system call for its rest and another for
            # its digest, where staging takes many such PDUs per call.
            self._start_direct(hdr, ahs, dlen, pad + dd, dest, start + head_len, head_len)
            return None
        if avail < total:
            self._make_room(total)
            return None
        self._start = start + total
        data_start = start + head_len
        data: Buffer = b""
        if dlen:
            if dd:
                self._check_data_digest(view[data_start : data_start + dlen + pad],
                                        view[data_start + dlen + pad : data_start + dlen + pad + 4],
                                        hdr)
            if dest is not None:
                dest[:] = view[data_start : data_start + dlen]
                data = dest
            else:
                data = bytes(view[data_start : data_start + dlen])
        if self._start == self._end:
            self._start = self._end = 0
        return decode_header_and_data(hdr, ahs, data)

    def _check_data_digest(self, covered: Buffer, raw: Buffer, hdr: bytes) -> None:
        want = digest_value(raw)
        got = crc32c(covered)
        if want != got:
            raise DataDigestError(f"data digest mismatch (got {got:08x}, expected {want:08x})",
                                  header=hdr)

    def _start_direct(self, hdr: bytes, ahs: bytes, dlen: int, tail_len: int,
                      dest: memoryview | None, data_start: int, head_len: int) -> None:
        if dest is None:
            dest = memoryview(bytearray(dlen))
        self._head_len = head_len
        have = min(self._end - data_start, dlen)
        dest[:have] = self._view[data_start : data_start + have]
        tail_have = max(0, self._end - data_start - dlen)
        tail_have = min(tail_have, tail_len)
        self._tail[:tail_have] = self._stage[data_start + dlen : data_start + dlen + tail_have]
        self._hdr, self._ahs, self._dest, self._dlen = hdr, ahs, dest, dlen
        self._dest_filled, self._tail_len, self._tail_filled = have, tail_len, tail_have
        # Everything staged belonged to this PDU (we only get here when the
        # PDU is incomplete), so the stage is empty now.
        self._start = self._end = 0

    def _finish_direct(self) -> list[PDU]:
        hdr, ahs, dest, dlen = self._hdr, self._ahs, self._dest, self._dlen
        assert hdr is not None and dest is not None
        self._hdr, self._dest = None, None
        pad = (-dlen) & 3
        try:
            if self._tail_len > pad:  # a data digest follows the padding
                value = crc32c(dest)
                if pad:
                    value = crc32c(self._tail[:pad], value)
                if value != digest_value(self._tail[pad : pad + 4]):
                    raise DataDigestError("data digest mismatch", header=hdr)
            pdu = decode_header_and_data(hdr, ahs, dest)
        finally:
            self._tail_filled = self._tail_len = 0
        # Direct mode receives exactly this PDU's bytes, so the stage is
        # empty here and there is nothing more to parse.
        return [pdu]

    def _make_room(self, needed: int) -> None:
        """Ensure ``needed`` bytes from the current PDU start can be staged."""
        if self._start + needed > len(self._stage):
            self._compact()
        if needed > len(self._stage):  # pragma: no cover - bounded by the caps
            raise FramingError(f"PDU header of {needed} bytes does not fit the receive buffer")

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._stage[:n] = self._stage[self._start : self._end]
            self._start, self._end = 0, n


def decode_pdu(raw: Buffer, *, header_digest: bool = False, data_digest: bool = False,
               max_data_segment_length: int = (1 << 24) - 1) -> PDU:
    """Decode exactly one whole PDU from ``raw`` (tests, tools)."""
    reader = PDUReader(max_data_segment_length=max_data_segment_length,
                       header_digest=header_digest, data_digest=data_digest)
    pdus = reader.feed(raw)
    if len(pdus) != 1 or reader.buffered:
        raise PDUFormatError(f"expected exactly one PDU, got {len(pdus)} "
                             f"and {reader.buffered} bytes left over")
    return pdus[0]
