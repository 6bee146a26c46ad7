"""NBD protocol values and wire layouts (fixed newstyle handshake and
transmission, from doc/proto.md of the NBD project, cited as
"proto.md §section"), and the mapping of failures to NBD error values.

Shared by the NBD server (:mod:`initiator.nbd`) and the device adapters
(:mod:`initiator.nbd_export`, :mod:`initiator.fuse`).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable

BytesLike = bytes | bytearray | memoryview

# --------------------------------------------------------------- constants
# proto.md §Values. Magic numbers first (§Newstyle negotiation, §Request message).
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# base:allocation status flags (proto.md §`base:allocation` metadata context).
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
META_BASE_ALLOCATION = "base:allocation"
#: Our one metadata context ID for base:allocation (any nonzero value would do).
META_ID_ALLOCATION = 1

# Error values (proto.md §Error values): a fixed subset of Linux errno values.
NBD_EPERM = errno.EPERM
NBD_EIO = errno.EIO
NBD_ENOMEM = errno.ENOMEM
NBD_EINVAL = errno.EINVAL
NBD_ENOSPC = errno.ENOSPC
NBD_EOVERFLOW = errno.EOVERFLOW
NBD_ENOTSUP = errno.ENOTSUP
NBD_ESHUTDOWN = errno.ESHUTDOWN
_NBD_ERRNOS = frozenset((NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC,
                         NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN))

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
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HELLO = struct.Struct(">QQH")
_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + 64-bit offset (OFFSET_DATA)
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_REPLY = struct.Struct(">QH")  # NBD_OPT_EXPORT_NAME answer (size, flags)
_EXTENT = struct.Struct(">II")


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
