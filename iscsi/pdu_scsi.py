"""The SCSI data-path PDUs (RFC 7143 §11.3-§11.8): SCSI Command and Response,
Data-Out, Data-In and R2T, plus the Data-In header the target's hot path
builds directly and the AHS splitter the SCSI Command needs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    RESERVED_TAG,
    AHSType,
    ISCSIResponse,
    Opcode,
    TaskAttribute,
)
from .errors import InvalidPDUField, PDUFormatError
from .pdu_base import _DATA_IN, _F_BIT, _I_BIT, _PAD, PDU, Buffer, _byte0, _check_tag, _len

_SCSI_CMD = struct.Struct(">BBBBIQIIII16s")
_SCSI_RSP = struct.Struct(">BBBBI8xIIIIIIII")
_DATA_OUT = struct.Struct(">BBBBIQII4xI4xII4x")
_AHS_HDR = struct.Struct(">HBx")
_U32 = struct.Struct(">I")
_R2T = _DATA_IN


def data_in_header(*, itt: int, lun: int, dlen: int, final: bool, status: int | None,
                   statsn: int, expcmdsn: int, maxcmdsn: int, datasn: int, buffer_offset: int,
                   overflow: bool = False, underflow: bool = False, residual_count: int = 0,
                   ack: bool = False, ttt: int = RESERVED_TAG) -> bytes:
    """The 48-byte header of a SCSI Data-In (§11.7); ``status`` not None
    sets the S bit (phase collapse, §11.7.4). The target's hot path builds
    it directly; :class:`DataIn` encodes through it too."""
    b1 = ((_F_BIT if final else 0) | (0x40 if ack else 0) | (0x04 if overflow else 0)
          | (0x02 if underflow else 0) | (0x01 if status is not None else 0))
    return _DATA_IN.pack(0x25, b1, 0, status or 0, dlen, lun, itt, ttt, statsn, expcmdsn,
                         maxcmdsn, datasn, buffer_offset, residual_count)


def iter_ahs(ahs: bytes, hdr: bytes) -> list[tuple[int, bytes]]:
    """Split an AHS area into (type, body) pairs; body excludes the 3-byte
    AHS header but includes the reserved byte (§11.2.2)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(ahs):
        if pos + 4 > len(ahs):
            raise PDUFormatError("truncated AHS", header=hdr)
        length, typ = _AHS_HDR.unpack_from(ahs, pos)
        body = ahs[pos + 3 : pos + 3 + length]
        if length == 0 or len(body) != length:
            raise PDUFormatError("AHS length exceeds TotalAHSLength", header=hdr)
        out.append((typ, body))
        pos += 3 + length
        pos += (-pos) & 3
    return out


# ---------------------------------------------------------------------------
# SCSI Command / Response (RFC 7143 §11.3, §11.4)


@dataclass(slots=True, kw_only=True)
class ScsiCommand(PDU):
    """SCSI Command. CDBs longer than 16 bytes travel partly in an Extended
    CDB AHS (§11.3.5); bidirectional commands carry the expected read length
    in a Bidirectional Read Data Length AHS (§11.3.6)."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    lun: int = 0
    cdb: bytes = b""
    expected_data_transfer_length: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    read: bool = False
    write: bool = False
    final: bool = True
    attr: int = TaskAttribute.SIMPLE
    immediate: bool = False
    bidi_read_length: int | None = None

    def _ahs(self) -> bytes:
        out = b""
        if len(self.cdb) > 16:
            extra = self.cdb[16:]
            out += _AHS_HDR.pack(len(extra) + 1, AHSType.EXTENDED_CDB) + extra + _PAD[len(extra) & 3]
        if self.bidi_read_length is not None:
            out += _AHS_HDR.pack(5, AHSType.BIDI_READ_DATA_LENGTH) + _U32.pack(self.bidi_read_length)
        return out

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        b1 = (_F_BIT if self.final else 0) | (0x40 if self.read else 0) | (0x20 if self.write else 0) | (self.attr & 7)
        cdb = self.cdb[:16]
        if len(cdb) < 16:
            cdb = cdb + bytes(16 - len(cdb))
        return _SCSI_CMD.pack(
            _byte0(0x01, self.immediate), b1, 0, 0, ahs_words << 24 | dlen, self.lun,
            self.itt, self.expected_data_transfer_length, self.cmdsn, self.expstatsn, cdb,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        b0, b1, _, _, _, lun, itt, edtl, cmdsn, expstatsn, cdb = _SCSI_CMD.unpack(hdr)
        _check_tag(itt, "SCSI Command ITT", hdr)
        read, write, final = bool(b1 & 0x40), bool(b1 & 0x20), bool(b1 & _F_BIT)
        bidi: int | None = None
        for typ, body in iter_ahs(ahs, hdr) if ahs else ():
            if typ == AHSType.EXTENDED_CDB:
                cdb = cdb + body[1:]
            elif typ == AHSType.BIDI_READ_DATA_LENGTH:
                if len(body) != 5:
                    raise InvalidPDUField("bad Bidirectional Read Data Length AHS", header=hdr)
                bidi = _U32.unpack_from(body, 1)[0]
            else:
                raise InvalidPDUField(f"unknown AHS type {typ}", header=hdr)
        # §11.3.1: F=0 with W=0 (no unsolicited data to follow) is a
        # protocol error; data without W is too (§11.3.1.2).
        if not final and not write:
            raise PDUFormatError("SCSI Command with F=0 but W=0", header=hdr)
        if not write and _len(data):
            raise PDUFormatError("SCSI Command carries data but W=0", header=hdr)
        if edtl == 0 and (read or write) and _len(data):
            raise PDUFormatError("SCSI Command data exceeds ExpectedDataTransferLength 0", header=hdr)
        if _len(data) > edtl:
            raise PDUFormatError("immediate data longer than ExpectedDataTransferLength", header=hdr)
        return cls(itt=itt, lun=lun, cdb=cdb, expected_data_transfer_length=edtl, cmdsn=cmdsn,
                   expstatsn=expstatsn, read=read, write=write, final=final, attr=b1 & 7,
                   immediate=bool(b0 & _I_BIT), bidi_read_length=bidi, data=data)


@dataclass(slots=True, kw_only=True)
class ScsiResponse(PDU):
    """SCSI Response. The data segment holds SenseLength (2 bytes), sense
    data and response data (§11.4.7)."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    response: int = ISCSIResponse.COMMAND_COMPLETED
    status: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    residual_overflow: bool = False
    residual_underflow: bool = False
    residual_count: int = 0
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    bidi_residual_count: int = 0
    snack_tag: int = 0

    @staticmethod
    def sense_segment(sense: Buffer) -> bytes:
        """Build the data segment that carries ``sense`` (§11.4.7.2)."""
        return struct.pack(">H", _len(sense)) + bytes(sense) if _len(sense) else b""

    @property
    def sense(self) -> bytes:
        """The sense data carried in the data segment (empty if none)."""
        data = self.data
        if _len(data) < 2:
            return b""
        n = int.from_bytes(bytes(data[:2]), "big")
        return bytes(data[2 : 2 + n])

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        b1 = (_F_BIT | (0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0)
              | (0x04 if self.residual_overflow else 0) | (0x02 if self.residual_underflow else 0))
        return _SCSI_RSP.pack(
            0x21, b1, self.response, self.status, ahs_words << 24 | dlen, self.itt,
            self.snack_tag, self.statsn, self.expcmdsn, self.maxcmdsn, self.expdatasn,
            self.bidi_residual_count, self.residual_count,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        (_, b1, response, status, _, itt, snack, statsn, expcmdsn, maxcmdsn, expdatasn,
         bidi_res, res) = _SCSI_RSP.unpack(hdr)
        # §11.4.1: o/u and O/U are mutually exclusive.
        if (b1 & 0x18) == 0x18 or (b1 & 0x06) == 0x06:
            raise PDUFormatError("SCSI Response with both overflow and underflow", header=hdr)
        if _len(data) >= 2 and int.from_bytes(bytes(data[:2]), "big") + 2 > _len(data):
            raise PDUFormatError("SenseLength exceeds the data segment", header=hdr)
        return cls(itt=itt, response=response, status=status, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, expdatasn=expdatasn, residual_overflow=bool(b1 & 0x04),
                   residual_underflow=bool(b1 & 0x02), residual_count=res,
                   bidi_overflow=bool(b1 & 0x10), bidi_underflow=bool(b1 & 0x08),
                   bidi_residual_count=bidi_res, snack_tag=snack, data=data)


# ---------------------------------------------------------------------------
# Data (RFC 7143 §11.7, §11.8)


@dataclass(slots=True, kw_only=True)
class DataOut(PDU):
    """SCSI Data-Out (solicited by an R2T, or unsolicited with TTT reserved)."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_DATA_OUT
    final: bool = True
    lun: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _DATA_OUT.pack(0x05, _F_BIT if self.final else 0, 0, 0, ahs_words << 24 | dlen,
                              self.lun, self.itt, self.ttt, self.expstatsn, self.datasn,
                              self.buffer_offset)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, b1, _, _, _, lun, itt, ttt, expstatsn, datasn, offset = _DATA_OUT.unpack(hdr)
        return cls(itt=itt, final=bool(b1 & _F_BIT), lun=lun, ttt=ttt, expstatsn=expstatsn,
                   datasn=datasn, buffer_offset=offset, data=data)


@dataclass(slots=True, kw_only=True)
class DataIn(PDU):
    """SCSI Data-In; may carry the command's status (S bit, §11.7.4)."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_DATA_IN
    final: bool = False
    ack: bool = False
    residual_overflow: bool = False
    residual_underflow: bool = False
    status_present: bool = False
    status: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual_count: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return data_in_header(
            itt=self.itt, lun=self.lun, dlen=ahs_words << 24 | dlen, final=self.final,
            status=self.status if self.status_present else None, statsn=self.statsn,
            expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn, datasn=self.datasn,
            buffer_offset=self.buffer_offset, overflow=self.residual_overflow,
            underflow=self.residual_underflow, residual_count=self.residual_count,
            ack=self.ack, ttt=self.ttt)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        (_, b1, _, status, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, datasn, offset,
         res) = _DATA_IN.unpack(hdr)
        final, s_bit = bool(b1 & _F_BIT), bool(b1 & 0x01)
        # §11.7.1: S may be set only together with F; O and U exclusive.
        if s_bit and not final:
            raise PDUFormatError("Data-In with S bit but no F bit", header=hdr)
        if (b1 & 0x06) == 0x06:
            raise PDUFormatError("Data-In with both overflow and underflow", header=hdr)
        # Byte 3 is reserved unless S is set (§11.7.4): ignore it then.
        return cls(itt=itt, final=final, ack=bool(b1 & 0x40), residual_overflow=bool(b1 & 0x04),
                   residual_underflow=bool(b1 & 0x02), status_present=s_bit,
                   status=status if s_bit else 0,
                   lun=lun, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn,
                   datasn=datasn, buffer_offset=offset, residual_count=res, data=data)


@dataclass(slots=True, kw_only=True)
class R2T(PDU):
    """Ready To Transfer (§11.8)."""

    opcode: ClassVar[Opcode] = Opcode.R2T
    lun: int = 0
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_data_transfer_length: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _R2T.pack(0x31, _F_BIT, 0, 0, ahs_words << 24 | dlen, self.lun, self.itt, self.ttt,
                         self.statsn, self.expcmdsn, self.maxcmdsn, self.r2tsn,
                         self.buffer_offset, self.desired_data_transfer_length)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        (_, _, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset,
         ddtl) = _R2T.unpack(hdr)
        if _len(data):
            raise PDUFormatError("R2T must not carry data", header=hdr)
        _check_tag(ttt, "R2T TTT", hdr)
        if ddtl == 0:
            raise InvalidPDUField("R2T with Desired Data Transfer Length 0", header=hdr)
        return cls(itt=itt, lun=lun, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn,
                   r2tsn=r2tsn, buffer_offset=offset, desired_data_transfer_length=ddtl)


