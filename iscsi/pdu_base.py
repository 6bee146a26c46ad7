"""Shared pieces of the PDU classes (RFC 7143 §11): the base class, framing
into buffers, LUN fields and the byte-0/flag helpers.

The PDU classes themselves live in :mod:`iscsi.pdu_scsi` (the SCSI data path)
and :mod:`iscsi.pdu_control` (everything else); :mod:`iscsi.pdu` gathers them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    RESERVED_TAG,
    Opcode,
)
from .digest import digest_bytes
from .errors import InvalidPDUField
from .scsi.lun import lun_from_u64, lun_to_u64


Buffer = bytes | bytearray | memoryview

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_I_BIT = 0x40
_F_BIT = 0x80
_DATA_IN = struct.Struct(">BBBBIQIIIIIIII")


def encode_lun(lun: int) -> int:
    """The 8-byte LUN field (as an int) for a LUN number, SAM-5 §4.7.

    LUNs below 256 use peripheral device addressing (byte 1), larger ones
    the flat space addressing method (01b in the top bits), as Linux and
    libiscsi do. (The encoding itself lives in :mod:`iscsi.scsi.lun`.)
    """
    return lun_to_u64(lun)


def decode_lun(raw: int) -> int:
    """The LUN number of an 8-byte LUN field (peripheral or flat addressing).

    Other addressing methods return the raw value, which never matches a
    configured LUN, so the target answers LOGICAL UNIT NOT SUPPORTED.
    """
    lun = lun_from_u64(raw)
    return raw if lun is None else lun


def _len(data: Buffer) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


@dataclass(slots=True, kw_only=True)
class PDU:
    """Common base: every PDU has an Initiator Task Tag and a data segment.

    PDUs are values: nothing changes one after it is built. The classes are
    not declared frozen only because a frozen dataclass's ``__init__`` sets
    every field through ``object.__setattr__``, about three times the cost
    of plain slot stores, and a SCSI Command is decoded for every I/O.
    """

    opcode: ClassVar[Opcode]
    itt: int = RESERVED_TAG
    data: Buffer = b""

    # -- encoding -----------------------------------------------------------
    def _header(self, ahs_words: int, dlen: int) -> bytes:
        raise NotImplementedError

    def _ahs(self) -> bytes:
        return b""

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> list[Buffer]:
        """Return the wire form as buffers to write in order (no payload copy)."""
        data = self.data
        dlen = _len(data)
        ahs = self._ahs()
        hdr = self._header(len(ahs) >> 2, dlen)
        if ahs:
            hdr += ahs
        return frame(hdr, data, dlen, header_digest, data_digest)

    def to_bytes(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        """The whole PDU as one bytes object (tests and logging only)."""
        return b"".join(bytes(b) for b in self.encode(header_digest, data_digest))

    # -- decoding -----------------------------------------------------------
    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        raise NotImplementedError


def _byte0(opcode: int, immediate: bool) -> int:
    return opcode | _I_BIT if immediate else opcode


def frame(hdr: bytes, data: Buffer, dlen: int, header_digest: bool = False,
          data_digest: bool = False) -> list[Buffer]:
    """The buffers of one PDU on the wire (RFC 7143 §11.1): header (+ AHS),
    its digest, the data segment as given (never copied), padding to a
    4-byte boundary and the data digest."""
    out: list[Buffer] = [hdr]
    if header_digest:
        out.append(digest_bytes(hdr))
    if dlen:
        out.append(data)
        pad = _PAD[dlen & 3]
        if pad:
            out.append(pad)
        if data_digest:
            out.append(digest_bytes(data, pad))
    return out


def _check_tag(value: int, name: str, hdr: bytes) -> None:
    if value == RESERVED_TAG:
        raise InvalidPDUField(f"{name} must not be the reserved tag 0xffffffff", header=hdr)

