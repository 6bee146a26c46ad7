"""The option haggling phase of an NBD connection (proto.md §Option
haggling): EXPORT_NAME, INFO/GO with their information requests, LIST,
ABORT, STRUCTURED_REPLY and the "base:allocation" meta context, until the
client enters transmission; and the rules what was negotiated imposes on
each request (structured replies, block sizes, metadata contexts).

A mixin of :class:`initiator.nbd._Connection`, which provides the socket,
the send queue and the transmission phase; what it needs of the server is
the :class:`ExportTerms` shape, so this module does not import the server.
"""

from __future__ import annotations

from typing import Protocol

from .nbd_export import ExportDevice
from .nbd_proto import (
    BytesLike, CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_META_QUERIES,
    META_BASE_ALLOCATION, META_ID_ALLOCATION, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM,
    OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID,
    REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,

)
from iscsi.nbdproto import (
    EXPORT_REPLY as _EXPORT_REPLY, INFO_BLOCK_SIZE_BODY as _INFO_BLOCK_SIZE,
    INFO_EXPORT_BODY as _INFO_EXPORT, OPT_REPLY as _OPT_REPLY, U16 as _U16, U32 as _U32,
)

#: Connection states (the handshake, options, transmission, closed).
HANDSHAKE, OPTIONS, TRANSMISSION, DONE = range(4)


class ExportTerms(Protocol):
    """What the option phase announces and enforces about the export
    (:class:`initiator.nbd.NBDServer` has this shape)."""

    @property
    def export_name(self) -> str:
        """The one export's name (proto.md §NBD_OPT_EXPORT_NAME)."""

    @property
    def description(self) -> str:
        """Free text for NBD_INFO_DESCRIPTION and NBD_OPT_LIST."""

    @property
    def read_only(self) -> bool:
        """True if write requests must fail with EPERM."""

    @property
    def minimum_block(self) -> int:
        """Minimum block size (proto.md §Block size constraints)."""

    @property
    def preferred_block(self) -> int:
        """Preferred block size."""

    @property
    def max_payload(self) -> int:
        """Largest READ/WRITE payload we accept."""

    def transmission_flags(self, structured: bool) -> int:
        """The transmission flags (proto.md §Transmission flags)."""


class OptionHaggling:
    """Answers the client's options; records what was negotiated."""

    server: ExportTerms
    dev: ExportDevice
    state: int
    no_zeroes: bool
    structured: bool
    meta_allocation: bool
    block_size_agreed: bool

    def _send(self, parts: list[BytesLike]) -> None:
        raise NotImplementedError

    def _hard_disconnect(self, why: str | None) -> None:
        raise NotImplementedError

    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._send([_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)), data])

    def _option(self, opt: int, data: bytes) -> None:
        if opt == OPT_EXPORT_NAME:
            self._export_name(data)
        elif opt == OPT_ABORT:
            # proto.md: the server MUST reply with ACK, then the client drops.
            self._opt_reply(opt, REP_ACK)
            self._hard_disconnect(None)
        elif opt == OPT_LIST:
            if data:
                self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return
            name = self.server.export_name.encode()
            self._opt_reply(opt, REP_SERVER,
                            _U32.pack(len(name)) + name + self.server.description.encode())
            self._opt_reply(opt, REP_ACK)
        elif opt == OPT_STRUCTURED_REPLY:
            if data:
                self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                return
            self.structured = True
            self._opt_reply(opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            self._info_or_go(opt, data)
        elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            # STARTTLS included: we run without TLS (proto.md §NOTLS mode).
            self._opt_reply(opt, REP_ERR_UNSUP, f"option {opt} is not supported".encode())

    def _export_name(self, data: bytes) -> None:
        name = data.decode("utf-8", "replace")
        if name != self.server.export_name:
            # No error reply exists for EXPORT_NAME: the session must end.
            self._hard_disconnect(f"client asked for unknown export {name!r}")
            return
        reply = _EXPORT_REPLY.pack(self.dev.size, self.server.transmission_flags(self.structured))
        self._send([reply] if self.no_zeroes else [reply, bytes(124)])
        self._enter_transmission()

    def _info_or_go(self, opt: int, data: bytes) -> None:
        # proto.md §NBD_OPT_INFO and NBD_OPT_GO: name length, name, count of
        # information requests, the requests (16 bits each).
        if len(data) < 6:
            self._opt_reply(opt, REP_ERR_INVALID, b"option data too short")
            return
        (nlen,) = _U32.unpack_from(data)
        if nlen > len(data) - 6:
            self._opt_reply(opt, REP_ERR_INVALID, b"export name overruns the option")
            return
        (nreq,) = _U16.unpack_from(data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * nreq:
            self._opt_reply(opt, REP_ERR_INVALID, b"information request list has the wrong size")
            return
        name = self._name(opt, data[4 : 4 + nlen])
        if name is None:
            return
        requests = {_U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(nreq)}
        size = self.dev.size
        srv = self.server
        self._opt_reply(opt, REP_INFO, _INFO_EXPORT.pack(
            INFO_EXPORT, size, srv.transmission_flags(self.structured)))
        # Sent even unrequested: the client is free to ignore it, and
        # nbdinfo/qemu show it.
        self._opt_reply(opt, REP_INFO, _INFO_BLOCK_SIZE.pack(
            INFO_BLOCK_SIZE, srv.minimum_block, srv.preferred_block, srv.max_payload))
        if INFO_NAME in requests:
            self._opt_reply(opt, REP_INFO, _U16.pack(INFO_NAME) + srv.export_name.encode())
        if INFO_DESCRIPTION in requests and srv.description:
            self._opt_reply(opt, REP_INFO,
                            _U16.pack(INFO_DESCRIPTION) + srv.description.encode())
        self._opt_reply(opt, REP_ACK)
        if opt == OPT_GO:
            # proto.md §Size constraints: a GO that asked for block sizes
            # binds the client to them, so misaligned requests are errors.
            self.block_size_agreed = INFO_BLOCK_SIZE in requests
            self._enter_transmission()

    def _name(self, opt: int, raw: bytes) -> str | None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._opt_reply(opt, REP_ERR_INVALID, b"export name is not UTF-8")
            return None
        if name != self.server.export_name:
            self._opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        return name

    def _meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == OPT_SET_META_CONTEXT
        if setting:
            self.meta_allocation = False  # replaced even when the option fails
            if not self.structured:
                self._opt_reply(opt, REP_ERR_INVALID, b"negotiate structured replies first")
                return
        queries = self._meta_queries(opt, data)
        if queries is None:
            return
        if setting:
            # "base:" selects nothing on SET; unknown leaves/namespaces are ignored.
            self.meta_allocation = META_BASE_ALLOCATION in queries
            chosen = self.meta_allocation
            ctx_id = META_ID_ALLOCATION
        else:
            chosen = not queries or bool({"base:", META_BASE_ALLOCATION} & set(queries))
            ctx_id = 0  # proto.md: reserved in LIST replies
        if chosen:
            self._opt_reply(opt, REP_META_CONTEXT,
                            _U32.pack(ctx_id) + META_BASE_ALLOCATION.encode())
        self._opt_reply(opt, REP_ACK)

    def _meta_queries(self, opt: int, data: bytes) -> list[str] | None:
        if len(data) < 8:
            self._opt_reply(opt, REP_ERR_INVALID, b"option data too short")
            return None
        (nlen,) = _U32.unpack_from(data)
        if nlen > len(data) - 8:
            self._opt_reply(opt, REP_ERR_INVALID, b"export name overruns the option")
            return None
        if self._name(opt, data[4 : 4 + nlen]) is None:
            return None
        pos = 4 + nlen
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if count > MAX_META_QUERIES:
            self._opt_reply(opt, REP_ERR_TOO_BIG, b"too many metadata queries")
            return None
        queries: list[str] = []
        for _ in range(count):
            if pos + 4 > len(data):
                self._opt_reply(opt, REP_ERR_INVALID, b"query overruns the option")
                return None
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > len(data) - pos:
                self._opt_reply(opt, REP_ERR_INVALID, b"query overruns the option")
                return None
            try:
                query = data[pos : pos + qlen].decode("utf-8")
            except UnicodeDecodeError:
                self._opt_reply(opt, REP_ERR_INVALID, b"query is not UTF-8")
                return None
            pos += qlen
            if ":" not in query:
                self._opt_reply(opt, REP_ERR_INVALID, b"query lacks a namespace")
                return None
            queries.append(query)
        if pos != len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"trailing bytes after the queries")
            return None
        return queries

    def _enter_transmission(self) -> None:
        self.state = TRANSMISSION
        if not self.structured:
            self.meta_allocation = False

    def _check(self, flags: int, cmd: int, offset: int, length: int) -> tuple[int, str] | None:
        """Check a request against the protocol and what was negotiated
        (proto.md §Request types, §Block size constraints): the error value
        and message, or None."""
        srv = self.server
        allowed = CMD_FLAG_FUA  # valid on every command (proto.md §Command flags)
        if cmd == CMD_READ:
            allowed |= CMD_FLAG_DF if self.structured else 0
        elif cmd == CMD_WRITE_ZEROES:
            allowed |= CMD_FLAG_NO_HOLE
        elif cmd == CMD_BLOCK_STATUS:
            allowed |= CMD_FLAG_REQ_ONE
        elif cmd not in (CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE):
            return NBD_EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return NBD_EINVAL, f"command flags {flags:#x} are not valid for command {cmd}"
        writing = cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
        if writing and srv.read_only:
            return NBD_EPERM, "the export is read-only"
        if cmd == CMD_FLUSH:
            return None
        if offset + length > self.dev.size:
            # proto.md §Error values: ENOSPC for writes past the end, EINVAL
            # for reads, trims and status queries.
            code = NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
            return code, f"{offset}+{length} is beyond the end of the export ({self.dev.size})"
        if cmd == CMD_READ and length > srv.max_payload:
            return (NBD_EOVERFLOW if self.structured else NBD_EINVAL,
                    f"read of {length} bytes exceeds the maximum payload {srv.max_payload}")
        if cmd == CMD_BLOCK_STATUS:
            if not self.meta_allocation:
                return NBD_EINVAL, "no metadata context was negotiated"
            if not length:
                return NBD_EINVAL, "block status of an empty range"
        elif self.block_size_agreed and (offset | length) % srv.minimum_block:
            return NBD_EINVAL, (f"{offset}+{length} is not aligned to the minimum block "
                                f"size {srv.minimum_block}")
        return None
