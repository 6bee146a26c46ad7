"""The VHDX metadata log (MS-VHDX 2.3): writing entries and finding the
active sequence to replay.

The log is a circular buffer of 4 KiB sectors. An entry is a header sector
(signature "loge", CRC-32C of the whole entry, length, tail, sequence
number, the log GUID of the current file header, the file sizes) whose
sector also holds the first 32-byte descriptors, more descriptor sectors if
needed, then one data sector per data descriptor. A data descriptor ("desc")
says where a 4 KiB page goes and carries its first 8 and last 4 bytes; the
data sector ("data") carries the middle 4084 with the sequence number split
around it, so a torn write shows as a mismatch. A zero descriptor ("zero")
zeroes a range.

Entries are only valid under the log GUID of the current header; a header
whose log GUID is zero has an empty log. The active sequence is the run of
valid entries with consecutive sequence numbers ending in the highest one;
replaying writes its pages in order, then grows the file to the last entry's
LastFileOffset (MS-VHDX 2.3.3).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .vhdx_format import LOG_SECTOR, checksum

_ENTRY_HDR = struct.Struct("<4sIIIQII16sQQ")
_DESC = struct.Struct("<4sIQQQ")
_DATA_HEAD = struct.Struct("<4sI")
_U32 = struct.Struct("<I")


def _desc_sectors(count: int) -> int:
    return -(-(_ENTRY_HDR.size + _DESC.size * count) // LOG_SECTOR)


def build_entry(seq: int, log_guid: uuid.UUID, pages: list[tuple[int, bytes]], *, tail: int,
                flushed_file_offset: int, last_file_offset: int) -> bytes:
    """One log entry writing each (file offset, 4 KiB page) of ``pages``."""
    n = len(pages)
    ds = _desc_sectors(n)
    buf = bytearray((ds + n) * LOG_SECTOR)
    _ENTRY_HDR.pack_into(buf, 0, b"loge", 0, len(buf), tail, seq, n, 0, log_guid.bytes_le,
                         flushed_file_offset, last_file_offset)
    for i, (off, page) in enumerate(pages):
        assert len(page) == LOG_SECTOR and off % LOG_SECTOR == 0
        (trailing,) = _U32.unpack_from(page, LOG_SECTOR - 4)
        (leading,) = struct.unpack_from("<Q", page, 0)
        _DESC.pack_into(buf, _ENTRY_HDR.size + _DESC.size * i, b"desc", trailing, leading, off, seq)
        at = (ds + i) * LOG_SECTOR
        _DATA_HEAD.pack_into(buf, at, b"data", seq >> 32)
        buf[at + 8 : at + LOG_SECTOR - 4] = page[8 : LOG_SECTOR - 4]
        _U32.pack_into(buf, at + LOG_SECTOR - 4, seq & 0xFFFFFFFF)
    _U32.pack_into(buf, 4, checksum(buf))
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class LogWrite:
    """One write a replay makes: ``data`` at ``offset``, or ``length``
    zero bytes when ``data`` is None."""

    offset: int
    length: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class _Entry:
    pos: int
    length: int
    tail: int
    seq: int
    flushed: int
    last: int
    writes: tuple[LogWrite, ...]


@dataclass(frozen=True, slots=True)
class Replay:
    """The active sequence: the writes in order and the file size bounds."""

    writes: tuple[LogWrite, ...]
    flushed_file_offset: int
    last_file_offset: int
    entries: int
    last_seq: int


def _parse(log: bytes, pos: int, log_guid: uuid.UUID) -> _Entry | None:
    size = len(log)

    def circ(at: int, n: int) -> bytes:
        at %= size
        if at + n <= size:
            return log[at : at + n]
        return log[at:] + log[: n - (size - at)]

    head = circ(pos, _ENTRY_HDR.size)
    sig, csum, length, tail, seq, count, _res, guid, flushed, last = _ENTRY_HDR.unpack(head)
    if sig != b"loge" or length == 0 or length % LOG_SECTOR or length > size or seq == 0:
        return None
    if uuid.UUID(bytes_le=guid) != log_guid or count * _DESC.size > length:
        return None
    ds = _desc_sectors(count)
    entry = circ(pos, length)
    if checksum(entry) != csum:
        return None
    writes: list[LogWrite] = []
    data_at = ds * LOG_SECTOR
    for i in range(count):
        dsig, trailing, lead_or_len, off, dseq = _DESC.unpack_from(entry, _ENTRY_HDR.size + _DESC.size * i)
        if dseq != seq or off % LOG_SECTOR:
            return None
        if dsig == b"zero":
            if lead_or_len % LOG_SECTOR:
                return None
            writes.append(LogWrite(off, lead_or_len, None))
        elif dsig == b"desc":
            if data_at + LOG_SECTOR > length:
                return None
            sector = entry[data_at : data_at + LOG_SECTOR]
            dsig2, hi = _DATA_HEAD.unpack_from(sector)
            (lo,) = _U32.unpack_from(sector, LOG_SECTOR - 4)
            if dsig2 != b"data" or (hi << 32 | lo) != seq:
                return None
            page = struct.pack("<Q", lead_or_len) + sector[8 : LOG_SECTOR - 4] + _U32.pack(trailing)
            writes.append(LogWrite(off, LOG_SECTOR, page))
            data_at += LOG_SECTOR
        else:
            return None
    return _Entry(pos % size, length, tail, seq, flushed, last, tuple(writes))


def find_active(read: Callable[[int, int], bytes], log_offset: int, log_length: int,
                log_guid: uuid.UUID) -> Replay | None:
    """Scan the log for its active sequence (None: nothing to replay).
    ``read(offset, length)`` reads the image file."""
    log = read(log_offset, log_length)
    if len(log) < log_length:
        log = log + bytes(log_length - len(log))
    valid: dict[int, _Entry] = {}
    for pos in range(0, log_length, LOG_SECTOR):
        if log[pos : pos + 4] == b"loge":
            e = _parse(log, pos, log_guid)
            if e is not None:
                valid[pos] = e
    best: list[_Entry] | None = None
    for start in valid.values():
        seq_run = [start]
        seen = {start.pos}
        while True:
            cur = seq_run[-1]
            nxt = valid.get((cur.pos + cur.length) % log_length)
            if nxt is None or nxt.seq != cur.seq + 1 or nxt.pos in seen:
                break
            seq_run.append(nxt)
            seen.add(nxt.pos)
        if best is None or (seq_run[-1].seq, len(seq_run)) > (best[-1].seq, len(best)):
            best = seq_run
    if best is None:
        return None
    # The last entry's tail names the first entry still needed (MS-VHDX
    # 2.3.1.1); entries before it were applied already.
    last = best[-1]
    starts = [e.pos for e in best]
    if last.tail in starts:
        best = best[starts.index(last.tail) :]
    writes = tuple(w for e in best for w in e.writes)
    return Replay(writes, last.flushed, last.last, len(best), last.seq)
