"""One class per iSCSI PDU (RFC 7143 §11), encoded and decoded with
precompiled ``struct.Struct`` layouts.

Encoding returns a list of buffers -- header (+AHS), optional header digest,
the payload object itself, padding, optional data digest -- so a payload is
never concatenated or copied on its way to ``transport.writelines``.

Decoding is split: :mod:`iscsi.framing` finds the PDU boundaries and checks
lengths before buffering; :func:`decode_header_and_data` turns one delimited
PDU into its class. Reserved fields are ignored on receipt and zero on send
(RFC 7143 §11.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    BHS_LEN,
    RESERVED_TAG,
    AHSType,
    AsyncEvent,
    ISCSIResponse,
    LogoutReason,
    LogoutResponseCode,
    Opcode,
    RejectReason,
    SnackType,
    Stage,
    TaskAttribute,
    TMFunction,
    TMResponse,
)
from .digest import digest_bytes
from .errors import InvalidPDUField, PDUFormatError, UnsupportedOpcode
from .scsi.lun import lun_from_u64, lun_to_u64

Buffer = bytes | bytearray | memoryview

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_I_BIT = 0x40
_F_BIT = 0x80

# Byte 4..7 of every BHS: TotalAHSLength (words) << 24 | DataSegmentLength.
_NOP_OUT = struct.Struct(">BBBBIQIIII16x")
_NOP_IN = struct.Struct(">BBBBIQIIIII12x")
_SCSI_CMD = struct.Struct(">BBBBIQIIII16s")
_SCSI_RSP = struct.Struct(">BBBBI8xIIIIIIII")
_TMF_REQ = struct.Struct(">BBBBIQIIIIII8x")
_TMF_RSP = struct.Struct(">BBBBI8xI4xIII12x")
_LOGIN_REQ = struct.Struct(">BBBBIHIHIHHII16x")
_LOGIN_RSP = struct.Struct(">BBBBIHIHI4xIIIBB10x")
_TEXT_REQ = _NOP_OUT
_TEXT_RSP = _NOP_IN
_DATA_OUT = struct.Struct(">BBBBIQII4xI4xII4x")
_DATA_IN = struct.Struct(">BBBBIQIIIIIIII")
_LOGOUT_REQ = struct.Struct(">BBBBI8xIH2xII16x")
_LOGOUT_RSP = struct.Struct(">BBBBI8xI4xIII4xHH4x")
_SNACK = struct.Struct(">BBBBIQII4xI8xII")
_R2T = _DATA_IN
_ASYNC = struct.Struct(">BBBBIQI4xIIIBBHHH4x")
_REJECT = struct.Struct(">BBBBI8xI4xIIII8x")
_AHS_HDR = struct.Struct(">HBx")
_U32 = struct.Struct(">I")

_ISID_MAX = (1 << 48) - 1


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


def _check_tag(value: int, name: str, hdr: bytes) -> None:
    if value == RESERVED_TAG:
        raise InvalidPDUField(f"{name} must not be the reserved tag 0xffffffff", header=hdr)


# ---------------------------------------------------------------------------
# NOP (RFC 7143 §11.18, §11.19)


@dataclass(slots=True, kw_only=True)
class NopOut(PDU):
    """NOP-Out: a ping (ITT valid) or the answer to a NOP-In (TTT valid)."""

    opcode: ClassVar[Opcode] = Opcode.NOP_OUT
    ttt: int = RESERVED_TAG
    lun: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    immediate: bool = True

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _NOP_OUT.pack(
            _byte0(0x00, self.immediate), _F_BIT, 0, 0, ahs_words << 24 | dlen,
            self.lun, self.itt, self.ttt, self.cmdsn, self.expstatsn,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        b0, _b1, _, _, _, lun, itt, ttt, cmdsn, expstatsn = _NOP_OUT.unpack(hdr)
        # §11.18.3: ITT and TTT must not both be 0xffffffff... unless it is
        # a "ping that wants no answer", which is allowed (ITT reserved,
        # TTT reserved, I bit set). Both valid is not allowed.
        if itt != RESERVED_TAG and ttt != RESERVED_TAG:
            raise InvalidPDUField("NOP-Out with both ITT and TTT set", header=hdr)
        return cls(itt=itt, ttt=ttt, lun=lun, cmdsn=cmdsn, expstatsn=expstatsn,
                   immediate=bool(b0 & _I_BIT), data=data)


@dataclass(slots=True, kw_only=True)
class NopIn(PDU):
    """NOP-In: a ping from the target (TTT valid) or a NOP-Out's answer."""

    opcode: ClassVar[Opcode] = Opcode.NOP_IN
    ttt: int = RESERVED_TAG
    lun: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _NOP_IN.pack(
            0x20, _F_BIT, 0, 0, ahs_words << 24 | dlen, self.lun, self.itt,
            self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, _, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn = _NOP_IN.unpack(hdr)
        return cls(itt=itt, ttt=ttt, lun=lun, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, data=data)


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
# Task management (RFC 7143 §11.5, §11.6)


@dataclass(slots=True, kw_only=True)
class TaskMgmtRequest(PDU):
    """Task Management Function Request."""

    opcode: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    function: int = TMFunction.ABORT_TASK
    lun: int = 0
    referenced_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0
    immediate: bool = True

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _TMF_REQ.pack(
            _byte0(0x02, self.immediate), _F_BIT | (self.function & 0x7F), 0, 0,
            ahs_words << 24 | dlen, self.lun, self.itt, self.referenced_task_tag,
            self.cmdsn, self.expstatsn, self.refcmdsn, self.expdatasn,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        b0, b1, _, _, _, lun, itt, rtt, cmdsn, expstatsn, refcmdsn, expdatasn = _TMF_REQ.unpack(hdr)
        if _len(data):
            raise PDUFormatError("Task Management Request must not carry data", header=hdr)
        return cls(itt=itt, function=b1 & 0x7F, lun=lun, referenced_task_tag=rtt, cmdsn=cmdsn,
                   expstatsn=expstatsn, refcmdsn=refcmdsn, expdatasn=expdatasn,
                   immediate=bool(b0 & _I_BIT))


@dataclass(slots=True, kw_only=True)
class TaskMgmtResponse(PDU):
    """Task Management Function Response."""

    opcode: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    response: int = TMResponse.FUNCTION_COMPLETE
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _TMF_RSP.pack(0x22, _F_BIT, self.response, 0, ahs_words << 24 | dlen, self.itt,
                             self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, _, response, _, _, itt, statsn, expcmdsn, maxcmdsn = _TMF_RSP.unpack(hdr)
        return cls(itt=itt, response=response, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn)


# ---------------------------------------------------------------------------
# Login (RFC 7143 §11.12, §11.13)


def _fc_bits(final: bool, cont: bool) -> int:
    # Byte 1 of Login and Text PDUs: F (T for Login) and C, §11.10-§11.13.
    return (_F_BIT if final else 0) | (0x40 if cont else 0)


def _split_fc(b1: int, hdr: bytes, what: str, f: str = "F") -> tuple[bool, bool]:
    """(F/T, C) of a Login or Text PDU; both set is a protocol error
    (§11.10.2, §11.12.2)."""
    final, cont = bool(b1 & _F_BIT), bool(b1 & 0x40)
    if final and cont:
        raise InvalidPDUField(f"{what} with both {f} and C bits set", header=hdr)
    return final, cont


def _stage_bits(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    return _fc_bits(transit, cont) | ((csg & 3) << 2) | (nsg & 3)


@dataclass(slots=True, kw_only=True)
class LoginRequest(PDU):
    """Login Request. The I bit is always set (§11.12)."""

    opcode: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    transit: bool = False
    cont: bool = False
    csg: int = Stage.SECURITY_NEGOTIATION
    nsg: int = Stage.SECURITY_NEGOTIATION
    version_max: int = 0
    version_min: int = 0
    isid: int = 0
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        if not 0 <= self.isid <= _ISID_MAX:
            raise ValueError("ISID is a 48-bit value")
        return _LOGIN_REQ.pack(
            0x43, _stage_bits(self.transit, self.cont, self.csg, self.nsg), self.version_max,
            self.version_min, ahs_words << 24 | dlen, self.isid >> 32, self.isid & 0xFFFFFFFF,
            self.tsih, self.itt, self.cid, 0, self.cmdsn, self.expstatsn,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        (_, b1, vmax, vmin, _, isid_hi, isid_lo, tsih, itt, cid, _, cmdsn,
         expstatsn) = _LOGIN_REQ.unpack(hdr)
        transit, cont, csg, nsg = _check_stages(b1, hdr)
        return cls(itt=itt, transit=transit, cont=cont, csg=csg, nsg=nsg, version_max=vmax,
                   version_min=vmin, isid=isid_hi << 32 | isid_lo, tsih=tsih, cid=cid,
                   cmdsn=cmdsn, expstatsn=expstatsn, data=data)


def _check_stages(b1: int, hdr: bytes, check: bool = True) -> tuple[bool, bool, int, int]:
    """(T, C, CSG, NSG) of a Login PDU's byte 1, checked unless ``check`` is False."""
    csg, nsg = (b1 >> 2) & 3, b1 & 3
    if not check:
        return bool(b1 & _F_BIT), bool(b1 & 0x40), csg, nsg
    # §11.12.2: T and C must not both be set; stage 2 is reserved; CSG
    # cannot be Full Feature Phase.
    transit, cont = _split_fc(b1, hdr, "Login PDU", "T")
    if csg == 2 or csg == 3:
        raise InvalidPDUField(f"Login PDU with invalid CSG {csg}", header=hdr)
    if transit and (nsg == 2 or nsg <= csg):
        raise InvalidPDUField(f"Login PDU with invalid NSG {nsg} from CSG {csg}", header=hdr)
    return transit, cont, csg, nsg


@dataclass(slots=True, kw_only=True)
class LoginResponse(PDU):
    """Login Response."""

    opcode: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    transit: bool = False
    cont: bool = False
    csg: int = Stage.SECURITY_NEGOTIATION
    nsg: int = Stage.SECURITY_NEGOTIATION
    version_max: int = 0
    version_active: int = 0
    isid: int = 0
    tsih: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0

    @property
    def status(self) -> int:
        """Status-Class << 8 | Status-Detail (compare with LoginStatus)."""
        return self.status_class << 8 | self.status_detail

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _LOGIN_RSP.pack(
            0x23, _stage_bits(self.transit, self.cont, self.csg, self.nsg), self.version_max,
            self.version_active, ahs_words << 24 | dlen, self.isid >> 32, self.isid & 0xFFFFFFFF,
            self.tsih, self.itt, self.statsn, self.expcmdsn, self.maxcmdsn, self.status_class,
            self.status_detail,
        )

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        (_, b1, vmax, vact, _, isid_hi, isid_lo, tsih, itt, statsn, expcmdsn, maxcmdsn, scls,
         sdet) = _LOGIN_RSP.unpack(hdr)
        # A failed login's stage bits are not checked (§11.13.5).
        transit, cont, csg, nsg = _check_stages(b1, hdr, check=scls == 0)
        return cls(itt=itt, transit=transit, cont=cont, csg=csg, nsg=nsg, version_max=vmax,
                   version_active=vact, isid=isid_hi << 32 | isid_lo, tsih=tsih, statsn=statsn,
                   expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, status_class=scls, status_detail=sdet,
                   data=data)


# ---------------------------------------------------------------------------
# Text (RFC 7143 §11.10, §11.11)


@dataclass(slots=True, kw_only=True)
class TextRequest(PDU):
    """Text Request (SendTargets, renegotiation)."""

    opcode: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    final: bool = True
    cont: bool = False
    ttt: int = RESERVED_TAG
    lun: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    immediate: bool = False

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        b1 = _fc_bits(self.final, self.cont)
        return _TEXT_REQ.pack(_byte0(0x04, self.immediate), b1, 0, 0, ahs_words << 24 | dlen,
                              self.lun, self.itt, self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        b0, b1, _, _, _, lun, itt, ttt, cmdsn, expstatsn = _TEXT_REQ.unpack(hdr)
        final, cont = _split_fc(b1, hdr, "Text Request")
        _check_tag(itt, "Text Request ITT", hdr)
        return cls(itt=itt, final=final, cont=cont, ttt=ttt, lun=lun, cmdsn=cmdsn,
                   expstatsn=expstatsn, immediate=bool(b0 & _I_BIT), data=data)


@dataclass(slots=True, kw_only=True)
class TextResponse(PDU):
    """Text Response."""

    opcode: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    final: bool = True
    cont: bool = False
    ttt: int = RESERVED_TAG
    lun: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        b1 = _fc_bits(self.final, self.cont)
        return _TEXT_RSP.pack(0x24, b1, 0, 0, ahs_words << 24 | dlen, self.lun, self.itt,
                              self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, b1, _, _, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn = _TEXT_RSP.unpack(hdr)
        final, cont = _split_fc(b1, hdr, "Text Response")
        return cls(itt=itt, final=final, cont=cont, ttt=ttt, lun=lun, statsn=statsn,
                   expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, data=data)


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


# ---------------------------------------------------------------------------
# Logout (RFC 7143 §11.14, §11.15)


@dataclass(slots=True, kw_only=True)
class LogoutRequest(PDU):
    """Logout Request."""

    opcode: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    reason: int = LogoutReason.CLOSE_SESSION
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    immediate: bool = False

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _LOGOUT_REQ.pack(_byte0(0x06, self.immediate), _F_BIT | (self.reason & 0x7F), 0, 0,
                                ahs_words << 24 | dlen, self.itt, self.cid, self.cmdsn,
                                self.expstatsn)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        b0, b1, _, _, _, itt, cid, cmdsn, expstatsn = _LOGOUT_REQ.unpack(hdr)
        reason = b1 & 0x7F
        if reason > LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            raise InvalidPDUField(f"Logout reason code {reason} is reserved", header=hdr)
        return cls(itt=itt, reason=reason, cid=cid, cmdsn=cmdsn, expstatsn=expstatsn,
                   immediate=bool(b0 & _I_BIT))


@dataclass(slots=True, kw_only=True)
class LogoutResponse(PDU):
    """Logout Response."""

    opcode: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    response: int = LogoutResponseCode.SUCCESS
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _LOGOUT_RSP.pack(0x26, _F_BIT, self.response, 0, ahs_words << 24 | dlen, self.itt,
                                self.statsn, self.expcmdsn, self.maxcmdsn, self.time2wait,
                                self.time2retain)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, _, response, _, _, itt, statsn, expcmdsn, maxcmdsn, t2w, t2r = _LOGOUT_RSP.unpack(hdr)
        return cls(itt=itt, response=response, statsn=statsn, expcmdsn=expcmdsn,
                   maxcmdsn=maxcmdsn, time2wait=t2w, time2retain=t2r)


# ---------------------------------------------------------------------------
# SNACK, Async Message, Reject (RFC 7143 §11.16, §11.9, §11.17)


@dataclass(slots=True, kw_only=True)
class SnackRequest(PDU):
    """SNACK Request (only meaningful at ErrorRecoveryLevel > 0)."""

    opcode: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    type: int = SnackType.DATA_R2T
    lun: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _SNACK.pack(0x10, _F_BIT | (self.type & 0x0F), 0, 0, ahs_words << 24 | dlen,
                           self.lun, self.itt, self.ttt, self.expstatsn, self.begrun,
                           self.runlength)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, b1, _, _, _, lun, itt, ttt, expstatsn, begrun, runlength = _SNACK.unpack(hdr)
        return cls(itt=itt, type=b1 & 0x0F, lun=lun, ttt=ttt, expstatsn=expstatsn, begrun=begrun,
                   runlength=runlength)


@dataclass(slots=True, kw_only=True)
class AsyncMessage(PDU):
    """Asynchronous Message (logout request, connection/session drop...)."""

    opcode: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    lun: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    async_event: int = AsyncEvent.SCSI_ASYNC_EVENT
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _ASYNC.pack(0x32, _F_BIT, 0, 0, ahs_words << 24 | dlen, self.lun, RESERVED_TAG,
                           self.statsn, self.expcmdsn, self.maxcmdsn, self.async_event,
                           self.async_vcode, self.parameter1, self.parameter2, self.parameter3)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        (_, _, _, _, _, lun, itt, statsn, expcmdsn, maxcmdsn, event, vcode, p1, p2,
         p3) = _ASYNC.unpack(hdr)
        return cls(itt=itt, lun=lun, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn,
                   async_event=event, async_vcode=vcode, parameter1=p1, parameter2=p2,
                   parameter3=p3, data=data)


@dataclass(slots=True, kw_only=True)
class Reject(PDU):
    """Reject; the data segment is the rejected PDU's header (§11.17.2)."""

    opcode: ClassVar[Opcode] = Opcode.REJECT
    reason: int = RejectReason.PROTOCOL_ERROR
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn_r2tsn: int = 0

    def _header(self, ahs_words: int, dlen: int) -> bytes:
        return _REJECT.pack(0x3F, _F_BIT, self.reason, 0, ahs_words << 24 | dlen, RESERVED_TAG,
                            self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn_r2tsn)

    @classmethod
    def _decode(cls, hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
        _, _, reason, _, _, itt, statsn, expcmdsn, maxcmdsn, dsn = _REJECT.unpack(hdr)
        return cls(itt=itt, reason=reason, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn,
                   datasn_r2tsn=dsn, data=data)

    @property
    def rejected_opcode(self) -> int | None:
        """Opcode of the PDU this Reject refers to, if its header is present."""
        return (self.data[0] & 0x3F) if _len(self.data) >= BHS_LEN else None

    @property
    def rejected_itt(self) -> int | None:
        """ITT of the rejected PDU, if its header is present."""
        if _len(self.data) < BHS_LEN:
            return None
        return int.from_bytes(bytes(self.data[16:20]), "big")


# ---------------------------------------------------------------------------

PDU_CLASSES: dict[int, type[PDU]] = {
    cls.opcode: cls
    for cls in (NopOut, NopIn, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
                LoginRequest, LoginResponse, TextRequest, TextResponse, DataOut, DataIn, R2T,
                LogoutRequest, LogoutResponse, SnackRequest, AsyncMessage, Reject)
}


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


def decode_header_and_data(hdr: bytes, ahs: bytes, data: Buffer) -> PDU:
    """Build the PDU object from its delimited parts.

    ``hdr`` is the 48-byte BHS, ``ahs`` the AHS bytes, ``data`` the data
    segment without padding. Raises a ProtocolError subclass on any field
    the RFC says to reject.
    """
    opcode = hdr[0] & 0x3F
    cls = PDU_CLASSES.get(opcode)
    if cls is None:
        # §11.17.1 / §7.9: an opcode the receiver does not support is
        # rejected with "Command not supported".
        raise UnsupportedOpcode(f"unknown opcode 0x{opcode:02x}", header=hdr)
    if ahs and cls is not ScsiCommand:
        # Only the SCSI Command defines AHS types (§11.2.2).
        raise PDUFormatError(f"AHS on {cls.__name__}", header=hdr)
    try:
        return cls._decode(hdr, ahs, data)
    except (ValueError, struct.error) as exc:  # pragma: no cover - defensive
        raise PDUFormatError(f"malformed {cls.__name__}: {exc}", header=hdr) from exc


__all__ = [
    "PDU",
    "PDU_CLASSES",
    "R2T",
    "AsyncMessage",
    "Buffer",
    "DataIn",
    "DataOut",
    "LoginRequest",
    "LoginResponse",
    "LogoutRequest",
    "LogoutResponse",
    "NopIn",
    "NopOut",
    "Reject",
    "ScsiCommand",
    "ScsiResponse",
    "SnackRequest",
    "TaskMgmtRequest",
    "TaskMgmtResponse",
    "TextRequest",
    "TextResponse",
    "decode_header_and_data",
    "data_in_header",
    "decode_lun",
    "frame",
    "encode_lun",
    "iter_ahs",
]
