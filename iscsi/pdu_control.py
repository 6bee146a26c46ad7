"""The control PDUs (RFC 7143 §11.9-§11.19): NOP, Task Management, Login,
Text, Logout, SNACK, Asynchronous Message and Reject."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    BHS_LEN,
    RESERVED_TAG,
    AsyncEvent,
    LogoutReason,
    LogoutResponseCode,
    Opcode,
    RejectReason,
    SnackType,
    Stage,
    TMFunction,
    TMResponse,
)
from .errors import InvalidPDUField, PDUFormatError
from .pdu_base import PDU, Buffer, _byte0, _check_tag, _len, _F_BIT, _I_BIT

_NOP_OUT = struct.Struct(">BBBBIQIIII16x")
_NOP_IN = struct.Struct(">BBBBIQIIIII12x")
_TMF_REQ = struct.Struct(">BBBBIQIIIIII8x")
_TMF_RSP = struct.Struct(">BBBBI8xI4xIII12x")
_LOGIN_REQ = struct.Struct(">BBBBIHIHIHHII16x")
_LOGIN_RSP = struct.Struct(">BBBBIHIHI4xIIIBB10x")
_LOGOUT_REQ = struct.Struct(">BBBBI8xIH2xII16x")
_LOGOUT_RSP = struct.Struct(">BBBBI8xI4xIII4xHH4x")
_SNACK = struct.Struct(">BBBBIQII4xI8xII")
_ASYNC = struct.Struct(">BBBBIQI4xIIIBBHHH4x")
_REJECT = struct.Struct(">BBBBI8xI4xIIII8x")
_TEXT_REQ = _NOP_OUT
_TEXT_RSP = _NOP_IN
_ISID_MAX = (1 << 48) - 1


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

