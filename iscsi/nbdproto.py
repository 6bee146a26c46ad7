"""The NBD protocol's values and wire layouts, with no I/O (doc/proto.md of
the NBD project, cited as "proto.md §section").

Here, in the package of sans-I/O protocol code both roles import, because
both roles speak NBD: the initiator *serves* a LUN as an NBD export
(:mod:`initiator.nbd`) and the target *uses* an NBD export as a LUN
(:mod:`target.backends.nbd`); ``target`` must not import ``initiator`` (nor
the reverse), and the project's layout has no other shared package.
"""

from __future__ import annotations

import errno
import struct

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
#: The error values proto.md allows on the wire.
NBD_ERRNOS = frozenset((NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC,
                         NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN))

# ------------------------------------------------------------ layouts
# Big-endian, as every NBD field (proto.md §Conventions).
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HELLO = struct.Struct(">QQH")
OPT_HDR = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + 64-bit offset (OFFSET_DATA)
CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
INFO_EXPORT_BODY = struct.Struct(">HQH")  # NBD_INFO_EXPORT: type, size, flags
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")  # type, min, preferred, max
EXPORT_REPLY = struct.Struct(">QH")  # NBD_OPT_EXPORT_NAME answer (size, flags)
EXTENT = struct.Struct(">II")
