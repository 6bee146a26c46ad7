"""NBD protocol values and wire layouts (fixed newstyle handshake and
transmission, from doc/proto.md of the NBD project, cited as
"proto.md §section"), and the mapping of failures to NBD error values.

Shared by the NBD server (:mod:`initiator.nbd`) and the device adapters
(:mod:`initiator.nbd_export`, :mod:`initiator.fuse`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

# The values and layouts both NBD roles share live in iscsi.nbdproto (the target's
# NBD backend is a client of the same protocol); re-exported here under the
# names this package has always used.
from iscsi.nbdproto import *  # noqa: F401,F403
from iscsi.nbdproto import (
    CHUNK as _CHUNK,
    CHUNK_ERROR as _CHUNK_ERROR,
    CHUNK_OFFSET as _CHUNK_OFFSET,
    EXTENT as _EXTENT,
    NBD_ERRNOS as _NBD_ERRNOS,
    SIMPLE as _SIMPLE,
    U32 as _U32,
)

BytesLike = bytes | bytearray | memoryview

#: Largest READ/WRITE payload (proto.md §Size constraints: 32 MiB is what
#: clients expect to be allowed; more may be treated as denial of service).
MAX_PAYLOAD = 32 << 20
#: Largest option payload we read; bigger ones are skipped and refused with
#: NBD_REP_ERR_TOO_BIG (strings are at most 4096 bytes, proto.md §Conventions).
MAX_OPTION = 64 << 10
#: Most metadata queries in one option.
MAX_META_QUERIES = 128
#: Most extents in one NBD_REPLY_TYPE_BLOCK_STATUS chunk (proto.md: SHOULD
#: NOT exceed 2^20).
MAX_EXTENTS = 1 << 20
#: Per-connection bounds on concurrent requests and bytes they hold.
MAX_INFLIGHT = 128
MAX_INFLIGHT_BYTES = 64 << 20

_STAGING = 128 << 10


# ------------------------------------------------------------------ replies
# proto.md §Simple reply message, §Structured reply chunk message.


def ok_reply(structured: bool, cookie: int) -> list[BytesLike]:
    """Success without data: a simple reply, or one NONE chunk with DONE."""
    if structured:
        return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)]
    return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)]


def read_reply(structured: bool, cookie: int, offset: int, data: BytesLike) -> list[BytesLike]:
    """A READ's data: after a simple reply header, or as one OFFSET_DATA
    chunk with DONE (which must carry at least one byte, else NONE)."""
    if not structured:
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
    if not len(data):
        return ok_reply(True, cookie)
    return [_CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                               cookie, 8 + len(data), offset), data]


def error_reply(structured: bool, cookie: int, code: int, message: str) -> list[BytesLike]:
    """A failed request: an ERROR chunk with its message when structured
    replies are on (proto.md: errors SHOULD be structured, and a READ MUST
    NOT get a simple reply then), else a simple reply with the error."""
    if code not in _NBD_ERRNOS:
        code = NBD_EIO
    if structured:
        msg = message.encode("utf-8", "replace")[:4096]
        return [_CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie,
                                  6 + len(msg), code, len(msg)), msg]
    return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, code, cookie)]


def block_status_reply(cookie: int, length: int, extents: Iterable[tuple[int, bool]], *,
                       req_one: bool, unmapped_reads_zero: bool) -> list[BytesLike]:
    """A BLOCK_STATUS chunk for the "base:allocation" context from a
    device's ``(length, mapped)`` extents: clipped to the request and with
    neighbours of equal status merged (proto.md §NBD_CMD_BLOCK_STATUS:
    consecutive, nonzero, SHOULD differ), at most one with REQ_ONE."""
    unmapped = STATE_HOLE | (STATE_ZERO if unmapped_reads_zero else 0)
    limit = 1 if req_one else MAX_EXTENTS
    out: list[list[int]] = []
    left = length
    for ext_len, mapped in extents:
        if left <= 0:
            break
        n = min(int(ext_len), left)
        if n <= 0:
            continue
        status = 0 if mapped else unmapped
        if out and out[-1][1] == status:
            out[-1][0] += n
        elif len(out) == limit:
            break
        else:
            out.append([n, status])
        left -= n
    if not out:
        out = [[length, 0]]  # status 0 is always safe (proto.md)
    body = b"".join(_EXTENT.pack(n, s) for n, s in out)
    return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                        cookie, 4 + len(body)), _U32.pack(META_ID_ALLOCATION), body]


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value for a failed command (proto.md §Error values)."""
    if isinstance(exc, PermissionError):
        return NBD_EPERM
    if isinstance(exc, OSError) and exc.errno is not None:
        code = exc.errno
        if code in _NBD_ERRNOS:
            return code
        if code in (errno.EROFS, errno.EACCES):
            return NBD_EPERM
        if code in (errno.EDQUOT, errno.EFBIG):  # proto.md: map these to ENOSPC
            return NBD_ENOSPC
        return NBD_EIO
    if isinstance(exc, ValueError):
        return NBD_EINVAL
    # initiator.scsi.SCSICheckCondition carries the sense key (SPC-4 §4.5.6);
    # read it by duck typing so this module does not need the iSCSI stack.
    key = getattr(exc, "key", None)
    if isinstance(key, int):
        asc = getattr(exc, "asc", 0)
        if key == 0x7:  # DATA PROTECT
            # ASC 27h/07h: SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3 §4.7.3.6)
            return NBD_ENOSPC if (asc, getattr(exc, "ascq", 0)) == (0x27, 0x07) else NBD_EPERM
        if key == 0x5:  # ILLEGAL REQUEST (e.g. LBA out of range)
            return NBD_EINVAL
        if key == 0xD:  # VOLUME OVERFLOW
            return NBD_ENOSPC
    return NBD_EIO


def _pow2_or(value: int, default: int, limit: int) -> int:
    return value if 0 < value <= limit and value & (value - 1) == 0 else default
