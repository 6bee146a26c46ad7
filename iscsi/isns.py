"""iSNS protocol (iSNSP, RFC 4171) codec: the 12-byte PDU header, TLV
attributes, multi-PDU messages, and the few messages an iSCSI target and
initiator exchange with an iSNS server. No I/O: bytes in, messages out.

A message (RFC 4171 §5.1) is one or more PDUs sharing a Transaction ID,
numbered by Sequence ID, the first flagged FIRST_PDU and the last
LAST_PDU. A request's payload is a list of attributes; a response's starts
with a 4-byte status (§5.7). Every byte string given to
:class:`MessageReader` either decodes or raises :class:`IsnsError`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from .errors import ProtocolError

__all__ = [
    "DEFAULT_PORT", "Attribute", "Function", "Flag", "IsnsError", "Message", "MessageReader",
    "NodeType", "Status", "Tag", "DiscoveredNode", "dev_attr_qry", "dev_attr_reg", "dev_dereg",
    "encode_message", "parse_query_response",
]

#: The iSNS server's well-known port (RFC 4171 §5.1, IANA "isns").
DEFAULT_PORT = 3205
#: iSNSP Version (§5.1.1).
VERSION = 1
#: Header: version, function ID, PDU length, flags, transaction ID, sequence ID (§5.1).
_HEADER = struct.Struct(">HHHHHH")
_TL = struct.Struct(">II")
_U32 = struct.Struct(">I")
#: Largest PDU payload we send (the length field is 16 bits; §5.1.3).
MAX_PDU_PAYLOAD = 0xFFFC
#: Largest message we accept, summed over its PDUs (a query answer for a
#: large SAN is well below this; a hostile server cannot grow us past it).
MAX_MESSAGE = 4 << 20


class IsnsError(ProtocolError):
    """A malformed iSNSP PDU, message or attribute (one line)."""


class Function(IntEnum):
    """Function IDs (RFC 4171 §5.1.2); responses are ``| 0x8000``."""

    DEV_ATTR_REG = 0x0001
    DEV_ATTR_QRY = 0x0002
    DEV_GET_NEXT = 0x0003
    DEV_DEREG = 0x0004
    SCN_REG = 0x0005
    SCN_DEREG = 0x0006
    SCN_EVENT = 0x0007
    SCN = 0x0008
    ESI = 0x000D
    HEARTBEAT = 0x000E
    DEV_ATTR_REG_RSP = 0x8001
    DEV_ATTR_QRY_RSP = 0x8002
    DEV_GET_NEXT_RSP = 0x8003
    DEV_DEREG_RSP = 0x8004
    ESI_RSP = 0x800D


class Flag(IntFlag):
    """iSNSP header flags (RFC 4171 §5.1.4)."""

    CLIENT = 0x8000
    SERVER = 0x4000
    AUTH = 0x2000
    REPLACE = 0x1000
    LAST_PDU = 0x0800
    FIRST_PDU = 0x0400


class Tag(IntEnum):
    """Attribute tags used here (RFC 4171 §6.1)."""

    DELIMITER = 0
    ENTITY_IDENTIFIER = 1
    ENTITY_PROTOCOL = 2
    MGMT_IP_ADDRESS = 3
    TIMESTAMP = 4
    REGISTRATION_PERIOD = 6
    ENTITY_INDEX = 7
    PORTAL_IP_ADDRESS = 16
    PORTAL_PORT = 17
    PORTAL_SYMBOLIC_NAME = 18
    ESI_INTERVAL = 19
    ESI_PORT = 20
    PORTAL_INDEX = 22
    SCN_PORT = 23
    ISCSI_NAME = 32
    ISCSI_NODE_TYPE = 33
    ISCSI_ALIAS = 34
    ISCSI_SCN_BITMAP = 35
    ISCSI_NODE_INDEX = 36
    PG_ISCSI_NAME = 48
    PG_PORTAL_IP_ADDR = 49
    PG_PORTAL_PORT = 50
    PG_TAG = 51
    PG_INDEX = 52


class Status(IntEnum):
    """Response status codes (RFC 4171 §5.4)."""

    SUCCESSFUL = 0
    UNKNOWN_ERROR = 1
    MESSAGE_FORMAT_ERROR = 2
    INVALID_REGISTRATION = 3
    INVALID_QUERY = 5
    SOURCE_UNKNOWN = 6
    SOURCE_ABSENT = 7
    SOURCE_UNAUTHORIZED = 8
    NO_SUCH_ENTRY = 9
    VERSION_NOT_SUPPORTED = 10
    INTERNAL_ERROR = 11
    BUSY = 12
    OPTION_NOT_UNDERSTOOD = 13
    INVALID_UPDATE = 14
    MESSAGE_NOT_SUPPORTED = 15
    AUTHENTICATION_UNKNOWN = 20
    INVALID_DEREGISTRATION = 23


class NodeType(IntFlag):
    """iSCSI Node Type bitmap (RFC 4171 §6.4.2)."""

    TARGET = 0x1
    INITIATOR = 0x2
    CONTROL = 0x4


#: Entity Protocol value for iSCSI (RFC 4171 §6.2.2).
ENTITY_PROTOCOL_ISCSI = 2


@dataclass(frozen=True, slots=True)
class Attribute:
    """One TLV (RFC 4171 §5.2, payload TLVs): tag and raw value (already padded for
    strings; empty for a query's "return this" and for the delimiter)."""

    tag: int
    value: bytes = b""

    @classmethod
    def string(cls, tag: int, text: str) -> Attribute:
        """A null-terminated UTF-8 string padded to 4 bytes (§5.2)."""
        raw = text.encode() + b"\0"
        return cls(tag, raw + b"\0" * (-len(raw) % 4))

    @classmethod
    def u32(cls, tag: int, value: int) -> Attribute:
        """A 32-bit unsigned integer."""
        return cls(tag, _U32.pack(value))

    @classmethod
    def ip(cls, tag: int, address: str) -> Attribute:
        """A 16-byte IP address; IPv4 as IPv4-mapped IPv6 (§6.3.1)."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv4Address):
            ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        return cls(tag, ip.packed)

    def as_str(self) -> str:
        """The value as a string (up to the first NUL)."""
        return self.value.split(b"\0", 1)[0].decode("utf-8", "replace")

    def as_u32(self) -> int:
        """The value as a 32-bit integer."""
        if len(self.value) != 4:
            raise IsnsError(f"iSNS attribute {self.tag}: {len(self.value)} bytes, not 4")
        return int(_U32.unpack(self.value)[0])

    def as_ip(self) -> str:
        """The value as an address string (IPv4-mapped shown as IPv4)."""
        if len(self.value) != 16:
            raise IsnsError(f"iSNS attribute {self.tag}: {len(self.value)} bytes, not an address")
        ip = ipaddress.IPv6Address(self.value)
        return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


@dataclass(frozen=True)
class Message:
    """One iSNSP message; ``status`` is set for responses only."""

    function: int
    xid: int
    attributes: tuple[Attribute, ...] = ()
    flags: int = Flag.CLIENT
    status: int | None = None

    @property
    def is_response(self) -> bool:
        """Responses have bit 15 of the function ID set (§5.1.2)."""
        return bool(self.function & 0x8000)


def encode_attributes(attrs: Iterable[Attribute]) -> bytes:
    """TLVs in order (§5.2): 4-byte tag, 4-byte length, value."""
    out = bytearray()
    for a in attrs:
        if len(a.value) % 4:
            raise ValueError(f"iSNS attribute {a.tag}: value length {len(a.value)} is not a "
                             "multiple of 4")
        out += _TL.pack(a.tag, len(a.value)) + a.value
    return bytes(out)


def decode_attributes(payload: bytes | memoryview) -> tuple[Attribute, ...]:
    """Split a payload into TLVs; IsnsError on a truncated or misaligned one."""
    view = memoryview(payload)
    out: list[Attribute] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < 8:
            raise IsnsError(f"iSNS attribute header truncated at byte {pos}")
        tag, length = _TL.unpack_from(view, pos)
        pos += 8
        if length % 4:
            raise IsnsError(f"iSNS attribute {tag}: length {length} is not a multiple of 4")
        if length > len(view) - pos:
            raise IsnsError(f"iSNS attribute {tag}: length {length} runs past the message")
        out.append(Attribute(tag, bytes(view[pos:pos + length])))
        pos += length
    return tuple(out)


def encode_message(msg: Message) -> list[bytes]:
    """The PDUs of a message (split when the payload exceeds one PDU;
    §5.1.3), each with FIRST_PDU/LAST_PDU as fits."""
    body = b""
    if msg.status is not None:
        body = _U32.pack(msg.status)
    body += encode_attributes(msg.attributes)
    pieces = [body[i:i + MAX_PDU_PAYLOAD] for i in range(0, len(body), MAX_PDU_PAYLOAD)] or [b""]
    out = []
    base = int(msg.flags) & ~(Flag.FIRST_PDU | Flag.LAST_PDU)
    for seq, piece in enumerate(pieces):
        flags = base | (Flag.FIRST_PDU if seq == 0 else 0) | \
            (Flag.LAST_PDU if seq == len(pieces) - 1 else 0)
        out.append(_HEADER.pack(VERSION, msg.function, len(piece), flags, msg.xid, seq) + piece)
    return out


class MessageReader:
    """Stream of bytes -> messages (sans-I/O). Feed with :meth:`feed`;
    each complete message is returned once."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._parts: list[bytes] = []
        self._current: tuple[int, int, int] | None = None  # function, xid, flags
        self._next_seq = 0
        self._size = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add bytes; return the messages they complete."""
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _HEADER.size:
            version, function, length, flags, xid, seq = _HEADER.unpack_from(self._buf)
            if version != VERSION:
                raise IsnsError(f"iSNSP version {version} is not supported (RFC 4171 §5.1.1)")
            if len(self._buf) < _HEADER.size + length:
                break
            payload = bytes(self._buf[_HEADER.size:_HEADER.size + length])
            del self._buf[:_HEADER.size + length]
            msg = self._pdu(function, flags, xid, seq, payload)
            if msg is not None:
                out.append(msg)
        if len(self._buf) > _HEADER.size + 0xFFFF:
            raise IsnsError("iSNS PDU buffer overflow")  # cannot happen: length is 16 bits
        return out

    def _pdu(self, function: int, flags: int, xid: int, seq: int,
             payload: bytes) -> Message | None:
        if self._current is None:
            # A PDU that starts a message: sequence 0 (§5.1.6); FIRST_PDU
            # is set by conforming senders, but a lone PDU with neither flag
            # is accepted as a whole message, as open-isns does.
            if seq != 0:
                raise IsnsError(f"iSNS message {xid} starts with sequence {seq}, not 0")
            self._current = (function, xid, flags)
            self._parts, self._next_seq, self._size = [], 0, 0
        else:
            cf, cx, _ = self._current
            if (function, xid) != (cf, cx) or seq != self._next_seq:
                raise IsnsError(f"iSNS PDU (function {function:#06x}, transaction {xid}, "
                                f"sequence {seq}) breaks message {cx}")
        self._next_seq += 1
        self._size += len(payload)
        if self._size > self._max:
            raise IsnsError(f"iSNS message {xid} exceeds {self._max} bytes")
        self._parts.append(payload)
        lone = seq == 0 and not flags & (Flag.FIRST_PDU | Flag.LAST_PDU)
        if not (flags & Flag.LAST_PDU or lone):
            return None
        body = b"".join(self._parts)
        function, xid, first_flags = self._current
        self._current = None
        self._parts = []
        status = None
        if function & 0x8000:
            if len(body) < 4:
                raise IsnsError(f"iSNS response {function:#06x} has no status")
            status = int(_U32.unpack_from(body)[0])
            body = body[4:]
        return Message(function, xid, decode_attributes(body), first_flags, status)


# ----------------------------------------------------------- the messages


@dataclass(frozen=True)
class PortalInfo:
    """A portal: address, TCP port, and its portal group tag."""

    address: str
    port: int
    tag: int = 1


@dataclass(frozen=True)
class NodeInfo:
    """A storage node to register: iSCSI name, alias, its portals."""

    name: str
    alias: str | None = None
    portals: tuple[PortalInfo, ...] = ()


def dev_attr_reg(xid: int, source: str, entity: str, portals: Sequence[PortalInfo],
                 nodes: Sequence[NodeInfo], *, replace: bool = False,
                 node_type: int = NodeType.TARGET, period: int | None = None) -> Message:
    """DevAttrReg (RFC 4171 §5.6.5.1) of a Network Entity with its portals,
    storage nodes and portal groups. With ``replace`` the server drops what
    it held for the entity first (the Replace flag, §5.1.4), which is how
    a removed target disappears and an added one appears in one message.

    Attribute order follows §5.6.5.1: Source, Message Key (the EID),
    Delimiter, then the Entity's operating attributes, each Portal, each
    Storage Node, and each Portal Group (PG iSCSI Name, PG Portal IP,
    PG Portal Port, PGT: the Portal Group object, §6.5)."""
    attrs = [Attribute.string(Tag.ISCSI_NAME, source),
             Attribute.string(Tag.ENTITY_IDENTIFIER, entity),
             Attribute(Tag.DELIMITER),
             Attribute.string(Tag.ENTITY_IDENTIFIER, entity),
             Attribute.u32(Tag.ENTITY_PROTOCOL, ENTITY_PROTOCOL_ISCSI)]
    if period is not None:
        attrs.append(Attribute.u32(Tag.REGISTRATION_PERIOD, period))
    for address, port in dict.fromkeys((p.address, p.port) for p in portals):
        attrs += [Attribute.ip(Tag.PORTAL_IP_ADDRESS, address),
                  Attribute.u32(Tag.PORTAL_PORT, port)]
    for n in nodes:
        attrs += [Attribute.string(Tag.ISCSI_NAME, n.name),
                  Attribute.u32(Tag.ISCSI_NODE_TYPE, node_type)]
        if n.alias:
            attrs.append(Attribute.string(Tag.ISCSI_ALIAS, n.alias))
    for n in nodes:
        for p in n.portals:
            attrs += [Attribute.string(Tag.PG_ISCSI_NAME, n.name),
                      Attribute.ip(Tag.PG_PORTAL_IP_ADDR, p.address),
                      Attribute.u32(Tag.PG_PORTAL_PORT, p.port),
                      Attribute.u32(Tag.PG_TAG, p.tag)]
    flags = Flag.CLIENT | (Flag.REPLACE if replace else 0)
    return Message(Function.DEV_ATTR_REG, xid, tuple(attrs), flags)


def dev_dereg(xid: int, source: str, entity: str) -> Message:
    """DevDereg of a whole Network Entity (RFC 4171 §5.6.5.4): Source,
    Delimiter, then the EID as operating attribute (no Message Key)."""
    return Message(Function.DEV_DEREG, xid, (
        Attribute.string(Tag.ISCSI_NAME, source), Attribute(Tag.DELIMITER),
        Attribute.string(Tag.ENTITY_IDENTIFIER, entity)))


#: What a target query asks the server to return (RFC 4171 §5.6.5.2:
#: zero-length operating attributes name the attributes wanted).
_QUERY_RETURNS = (Tag.ISCSI_NAME, Tag.ISCSI_NODE_TYPE, Tag.ISCSI_ALIAS, Tag.PORTAL_IP_ADDRESS,
                  Tag.PORTAL_PORT, Tag.PG_ISCSI_NAME, Tag.PG_PORTAL_IP_ADDR, Tag.PG_PORTAL_PORT,
                  Tag.PG_TAG)


def dev_attr_qry(xid: int, source: str) -> Message:
    """DevAttrQry for every iSCSI target visible to ``source`` (RFC 4171
    §5.6.5.2): key Node Type = Target, returning names, aliases, portals
    and portal groups."""
    attrs = [Attribute.string(Tag.ISCSI_NAME, source),
             Attribute.u32(Tag.ISCSI_NODE_TYPE, NodeType.TARGET),
             Attribute(Tag.DELIMITER)]
    attrs += [Attribute(t) for t in _QUERY_RETURNS]
    return Message(Function.DEV_ATTR_QRY, xid, tuple(attrs))


@dataclass
class DiscoveredNode:
    """A target found through iSNS: name, alias and ``(address, port, tag)``."""

    name: str
    alias: str | None = None
    portals: list[tuple[str, int, int]] = field(default_factory=list)


def parse_query_response(msg: Message) -> list[DiscoveredNode]:
    """The targets of a DevAttrQryRsp (RFC 4171 §5.7.5.2): attributes after
    the key and delimiter, grouped by object (a node starts at iSCSI Name,
    a portal at Portal IP, a portal group at PG iSCSI Name). Portal groups
    say which portals reach which node; with none, every portal reached
    every node (the Portal Group object, §6.5)."""
    attrs = list(msg.attributes)
    delim = next((i for i, a in enumerate(attrs) if a.tag == Tag.DELIMITER), -1)
    attrs = attrs[delim + 1:]
    nodes: dict[str, DiscoveredNode] = {}
    node: DiscoveredNode | None = None
    portals: list[tuple[str, int]] = []
    pgs: list[list[object]] = []
    pg: list[object] | None = None
    portal_ip: str | None = None
    for a in attrs:
        tag = a.tag
        if tag == Tag.ISCSI_NAME:
            node = nodes.setdefault(a.as_str(), DiscoveredNode(a.as_str()))
            pg = None
        elif tag == Tag.ISCSI_NODE_TYPE and node is not None:
            if not a.as_u32() & NodeType.TARGET:
                nodes.pop(node.name, None)
                node = None
        elif tag == Tag.ISCSI_ALIAS and node is not None:
            node.alias = a.as_str() or None
        elif tag == Tag.PORTAL_IP_ADDRESS:
            portal_ip, node, pg = a.as_ip(), None, None
        elif tag == Tag.PORTAL_PORT and portal_ip is not None:
            portals.append((portal_ip, a.as_u32() & 0xFFFF))
            portal_ip = None
        elif tag == Tag.PG_ISCSI_NAME:
            pg = [a.as_str(), None, None, None]
            pgs.append(pg)
            node = None
        elif pg is not None and tag == Tag.PG_PORTAL_IP_ADDR:
            pg[1] = a.as_ip()
        elif pg is not None and tag == Tag.PG_PORTAL_PORT:
            pg[2] = a.as_u32() & 0xFFFF
        elif pg is not None and tag == Tag.PG_TAG:
            # A zero-length PGT means "no access through this portal" (§6.5).
            pg[3] = a.as_u32() if a.value else None
    used = False
    for name, ip, port, pgt in pgs:
        n = nodes.get(str(name))
        if n is not None and isinstance(ip, str) and isinstance(port, int) and \
                isinstance(pgt, int):
            n.portals.append((ip, port, pgt))
            used = True
    if not used:
        for n in nodes.values():
            n.portals.extend((ip, port, 1) for ip, port in portals)
    return list(nodes.values())
