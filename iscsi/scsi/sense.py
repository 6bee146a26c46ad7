"""SCSI sense data (SPC-4 §4.5): encode and decode both formats, the
``CheckCondition`` exception the target emulation raises, and the
(ASC, ASCQ) pairs of SPC-4 Annex D that this stack uses, by name.

Fixed format (response codes 70h/71h, SPC-4 §4.5.3) carries a 32-bit
INFORMATION field; descriptor format (72h/73h, §4.5.2) carries a 64-bit one
in an information descriptor (type 00h) and the sense-key-specific bytes in
a descriptor of type 02h. Which one a target sends is chosen by the D_SENSE
bit of the control mode page or the DESC bit of REQUEST SENSE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import SenseKey

__all__ = [
    "CheckCondition",
    "SenseData",
    "SenseDecodeError",
    "asc_name",
    "data_protect",
    "illegal_request",
    "invalid_field_in_cdb",
    "invalid_field_in_parameter_list",
    "medium_error",
    "miscompare",
    "not_ready",
    "unit_attention",
]

AscAscq = tuple[int, int]

# --- SPC-4 Annex D (ASC, ASCQ) pairs used by this stack ------------------
NO_ADDITIONAL_SENSE: AscAscq = (0x00, 0x00)
LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE: AscAscq = (0x04, 0x00)
LOGICAL_UNIT_IS_IN_PROCESS_OF_BECOMING_READY: AscAscq = (0x04, 0x01)
LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED: AscAscq = (0x04, 0x02)
LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED: AscAscq = (0x04, 0x03)
LOGICAL_UNIT_NOT_READY_FORMAT_IN_PROGRESS: AscAscq = (0x04, 0x04)
LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION: AscAscq = (0x04, 0x0A)
LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE: AscAscq = (0x04, 0x0B)
LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE: AscAscq = (0x04, 0x0C)
WRITE_ERROR: AscAscq = (0x0C, 0x00)
UNRECOVERED_READ_ERROR: AscAscq = (0x11, 0x00)
MISCOMPARE_DURING_VERIFY: AscAscq = (0x1D, 0x00)
PARAMETER_LIST_LENGTH_ERROR: AscAscq = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE: AscAscq = (0x20, 0x00)
LBA_OUT_OF_RANGE: AscAscq = (0x21, 0x00)
INVALID_FIELD_IN_CDB: AscAscq = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED: AscAscq = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: AscAscq = (0x26, 0x00)
PARAMETER_NOT_SUPPORTED: AscAscq = (0x26, 0x01)
PARAMETER_VALUE_INVALID: AscAscq = (0x26, 0x02)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION: AscAscq = (0x26, 0x04)
TOO_MANY_TARGET_DESCRIPTORS: AscAscq = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: AscAscq = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS: AscAscq = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: AscAscq = (0x26, 0x09)
INSUFFICIENT_REGISTRATION_RESOURCES: AscAscq = (0x55, 0x04)
WRITE_PROTECTED: AscAscq = (0x27, 0x00)
HARDWARE_WRITE_PROTECTED: AscAscq = (0x27, 0x01)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT: AscAscq = (0x27, 0x07)
NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED: AscAscq = (0x28, 0x00)
POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED: AscAscq = (0x29, 0x00)
POWER_ON_RESET: AscAscq = POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
POWER_ON_OCCURRED: AscAscq = (0x29, 0x01)
BUS_DEVICE_RESET_FUNCTION_OCCURRED: AscAscq = (0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED: AscAscq = (0x29, 0x07)
PARAMETERS_CHANGED: AscAscq = (0x2A, 0x00)
MODE_PARAMETERS_CHANGED: AscAscq = (0x2A, 0x01)
RESERVATIONS_PREEMPTED: AscAscq = (0x2A, 0x03)
RESERVATIONS_RELEASED: AscAscq = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED: AscAscq = (0x2A, 0x05)
ASYMMETRIC_ACCESS_STATE_CHANGED: AscAscq = (0x2A, 0x06)
CAPACITY_DATA_HAS_CHANGED: AscAscq = (0x2A, 0x09)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: AscAscq = (0x2F, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED: AscAscq = (0x39, 0x00)
MEDIUM_NOT_PRESENT: AscAscq = (0x3A, 0x00)
MEDIUM_NOT_PRESENT_TRAY_CLOSED: AscAscq = (0x3A, 0x01)
MEDIUM_NOT_PRESENT_TRAY_OPEN: AscAscq = (0x3A, 0x02)
REPORTED_LUNS_DATA_HAS_CHANGED: AscAscq = (0x3F, 0x0E)
INQUIRY_DATA_HAS_CHANGED: AscAscq = (0x3F, 0x03)
INTERNAL_TARGET_FAILURE: AscAscq = (0x44, 0x00)
INVALID_MESSAGE_ERROR: AscAscq = (0x49, 0x00)
COMMAND_PHASE_ERROR: AscAscq = (0x4A, 0x00)
DATA_PHASE_ERROR: AscAscq = (0x4B, 0x00)
OVERLAPPED_COMMANDS_ATTEMPTED: AscAscq = (0x4E, 0x00)
MEDIUM_REMOVAL_PREVENTED: AscAscq = (0x53, 0x02)
SYSTEM_RESOURCE_FAILURE: AscAscq = (0x55, 0x00)
INSUFFICIENT_RESOURCES: AscAscq = (0x55, 0x03)
LOW_POWER_CONDITION_ON: AscAscq = (0x5E, 0x00)
COPY_TARGET_DEVICE_NOT_REACHABLE: AscAscq = (0x0D, 0x02)
COPY_SEGMENT_GRANULARITY_VIOLATION: AscAscq = (0x0D, 0x05)
THIRD_PARTY_DEVICE_FAILURE: AscAscq = (0x0D, 0x01)
UNREACHABLE_COPY_TARGET: AscAscq = (0x08, 0x04)
INCOMPATIBLE_MEDIUM_INSTALLED: AscAscq = (0x30, 0x00)
CANNOT_READ_MEDIUM_INCOMPATIBLE_FORMAT: AscAscq = (0x30, 0x02)
INVALID_ADDRESS_FOR_WRITE: AscAscq = (0x21, 0x02)

_NAMES: dict[AscAscq, str] = {
    NO_ADDITIONAL_SENSE: "no additional sense information",
    LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE: "logical unit not ready, cause not reportable",
    LOGICAL_UNIT_IS_IN_PROCESS_OF_BECOMING_READY: "logical unit is in process of becoming ready",
    LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED: "logical unit not ready, initializing command required",
    LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED: "logical unit not ready, manual intervention required",
    LOGICAL_UNIT_NOT_READY_FORMAT_IN_PROGRESS: "logical unit not ready, format in progress",
    LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION: "logical unit not accessible, asymmetric access state transition",
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE: "logical unit not accessible, target port in standby state",
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE: "logical unit not accessible, target port in unavailable state",
    UNREACHABLE_COPY_TARGET: "unreachable copy target",
    WRITE_ERROR: "write error",
    THIRD_PARTY_DEVICE_FAILURE: "third party device failure",
    COPY_TARGET_DEVICE_NOT_REACHABLE: "copy target device not reachable",
    COPY_SEGMENT_GRANULARITY_VIOLATION: "copy segment granularity violation",
    UNRECOVERED_READ_ERROR: "unrecovered read error",
    PARAMETER_LIST_LENGTH_ERROR: "parameter list length error",
    MISCOMPARE_DURING_VERIFY: "miscompare during verify operation",
    INVALID_COMMAND_OPERATION_CODE: "invalid command operation code",
    LBA_OUT_OF_RANGE: "logical block address out of range",
    INVALID_ADDRESS_FOR_WRITE: "invalid address for write",
    INVALID_FIELD_IN_CDB: "invalid field in CDB",
    LOGICAL_UNIT_NOT_SUPPORTED: "logical unit not supported",
    INVALID_FIELD_IN_PARAMETER_LIST: "invalid field in parameter list",
    PARAMETER_NOT_SUPPORTED: "parameter not supported",
    PARAMETER_VALUE_INVALID: "parameter value invalid",
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION: "invalid release of persistent reservation",
    TOO_MANY_TARGET_DESCRIPTORS: "too many target descriptors",
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: "unsupported target descriptor type code",
    TOO_MANY_SEGMENT_DESCRIPTORS: "too many segment descriptors",
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: "unsupported segment descriptor type code",
    WRITE_PROTECTED: "write protected",
    HARDWARE_WRITE_PROTECTED: "hardware write protected",
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT: "space allocation failed write protect",
    NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED: "not ready to ready change, medium may have changed",
    POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED: "power on, reset, or bus device reset occurred",
    POWER_ON_OCCURRED: "power on occurred",
    BUS_DEVICE_RESET_FUNCTION_OCCURRED: "bus device reset function occurred",
    I_T_NEXUS_LOSS_OCCURRED: "I_T nexus loss occurred",
    PARAMETERS_CHANGED: "parameters changed",
    MODE_PARAMETERS_CHANGED: "mode parameters changed",
    RESERVATIONS_PREEMPTED: "reservations preempted",
    RESERVATIONS_RELEASED: "reservations released",
    REGISTRATIONS_PREEMPTED: "registrations preempted",
    ASYMMETRIC_ACCESS_STATE_CHANGED: "asymmetric access state changed",
    CAPACITY_DATA_HAS_CHANGED: "capacity data has changed",
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: "commands cleared by another initiator",
    INCOMPATIBLE_MEDIUM_INSTALLED: "incompatible medium installed",
    CANNOT_READ_MEDIUM_INCOMPATIBLE_FORMAT: "cannot read medium, incompatible format",
    SAVING_PARAMETERS_NOT_SUPPORTED: "saving parameters not supported",
    MEDIUM_NOT_PRESENT: "medium not present",
    MEDIUM_NOT_PRESENT_TRAY_CLOSED: "medium not present, tray closed",
    MEDIUM_NOT_PRESENT_TRAY_OPEN: "medium not present, tray open",
    INQUIRY_DATA_HAS_CHANGED: "inquiry data has changed",
    REPORTED_LUNS_DATA_HAS_CHANGED: "reported LUNs data has changed",
    INTERNAL_TARGET_FAILURE: "internal target failure",
    INVALID_MESSAGE_ERROR: "invalid message error",
    COMMAND_PHASE_ERROR: "command phase error",
    DATA_PHASE_ERROR: "data phase error",
    OVERLAPPED_COMMANDS_ATTEMPTED: "overlapped commands attempted",
    MEDIUM_REMOVAL_PREVENTED: "medium removal prevented",
    SYSTEM_RESOURCE_FAILURE: "system resource failure",
    INSUFFICIENT_RESOURCES: "insufficient resources",
    INSUFFICIENT_REGISTRATION_RESOURCES: "insufficient registration resources",
    LOW_POWER_CONDITION_ON: "low power condition on",
}


def asc_name(asc: int, ascq: int) -> str:
    """Words for an (ASC, ASCQ) pair (SPC-4 Annex D), or a hex fallback."""
    name = _NAMES.get((asc, ascq))
    if name is not None:
        return name
    if (asc, 0x00) in _NAMES and ascq != 0:
        return f"{_NAMES[(asc, 0x00)]} (ascq 0x{ascq:02x})"
    return f"asc 0x{asc:02x} ascq 0x{ascq:02x}"


class SenseDecodeError(ValueError):
    """Bytes that cannot be sense data (too short, unknown response code)."""


_FIXED = struct.Struct(">BBBIBIBBB3s")  # bytes 0..17 of fixed sense
_DESC_HDR = struct.Struct(">BBBB3xB")  # bytes 0..7 of descriptor sense
_INFO_DESC = struct.Struct(">BBBxQ")  # information descriptor, type 00h
_CMD_DESC = struct.Struct(">BBxxQ")  # command-specific descriptor, type 01h
_SKS_DESC = struct.Struct(">BBxx3sx")  # sense-key specific, type 02h


@dataclass(frozen=True, slots=True)
class _Sks:
    """Decoded sense-key-specific bytes."""

    field_pointer: int | None = None
    bit_pointer: int | None = None
    cd: bool = True
    progress: int | None = None


@dataclass(frozen=True, slots=True)
class SenseData:
    """One sense data record (SPC-4 §4.5).

    ``field_pointer`` / ``bit_pointer`` / ``cd`` form the sense-key-specific
    field of ILLEGAL REQUEST (§4.5.2.4.2): the byte (and bit) of the CDB
    (cd=True) or parameter list (cd=False) at fault. ``progress`` is the
    progress indication of NOT READY / NO SENSE (§4.5.2.4.4), 0..65535.
    ``descriptor`` records which format the record was decoded from or
    should be encoded in by :meth:`encode`.
    """

    key: int
    asc: int = 0
    ascq: int = 0
    information: int | None = None
    command_specific: int | None = None
    field_pointer: int | None = None
    bit_pointer: int | None = None
    cd: bool = True
    progress: int | None = None
    deferred: bool = False
    descriptor: bool = False
    ili: bool = False

    @property
    def asc_ascq(self) -> AscAscq:
        """The (ASC, ASCQ) pair."""
        return (self.asc, self.ascq)

    def _sks(self) -> bytes | None:
        """The three sense-key-specific bytes with SKSV set, or None."""
        if self.field_pointer is not None:
            b0 = 0x80 | (0x40 if self.cd else 0)
            if self.bit_pointer is not None:
                b0 |= 0x08 | (self.bit_pointer & 0x07)
            return bytes((b0, (self.field_pointer >> 8) & 0xFF, self.field_pointer & 0xFF))
        if self.progress is not None:
            return bytes((0x80, (self.progress >> 8) & 0xFF, self.progress & 0xFF))
        return None

    def encode(self) -> bytes:
        """Encode in the format named by ``self.descriptor``."""
        return self.encode_descriptor() if self.descriptor else self.encode_fixed()

    def encode_fixed(self) -> bytes:
        """Fixed format, 18 bytes (SPC-4 §4.5.3). An INFORMATION value that
        does not fit 32 bits is sent with VALID=0, as the standard says."""
        info = self.information
        valid = info is not None and 0 <= info <= 0xFFFFFFFF
        sks = self._sks() or b"\x00\x00\x00"
        cmd = self.command_specific or 0
        return _FIXED.pack(
            (0x80 if valid else 0) | (0x71 if self.deferred else 0x70),
            0,
            (0x20 if self.ili else 0) | (self.key & 0x0F),
            (info or 0) & 0xFFFFFFFF if valid else 0,
            10,
            cmd & 0xFFFFFFFF,
            self.asc & 0xFF,
            self.ascq & 0xFF,
            0,
            sks,
        )

    def encode_descriptor(self) -> bytes:
        """Descriptor format (SPC-4 §4.5.2) with information, command-specific
        and sense-key-specific descriptors as needed."""
        parts: list[bytes] = []
        if self.information is not None:
            parts.append(_INFO_DESC.pack(0x00, 0x0A, 0x80, self.information & 0xFFFFFFFFFFFFFFFF))
        if self.command_specific is not None:
            parts.append(_CMD_DESC.pack(0x01, 0x0A, self.command_specific & 0xFFFFFFFFFFFFFFFF))
        sks = self._sks()
        if sks is not None:
            parts.append(_SKS_DESC.pack(0x02, 0x06, sks))
        if self.ili:
            # Block commands descriptor (type 05h, SBC-3 §4.18.2) carries ILI.
            parts.append(bytes((0x05, 0x02, 0x00, 0x20)))
        body = b"".join(parts)
        hdr = _DESC_HDR.pack(
            0x73 if self.deferred else 0x72, self.key & 0x0F, self.asc & 0xFF, self.ascq & 0xFF, len(body)
        )
        return hdr + body

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SenseData:
        """Decode fixed or descriptor sense data; raise SenseDecodeError on
        bytes that are not sense data. Truncated but well-formed records
        (fewer additional bytes than announced) are accepted as far as they go."""
        buf = bytes(data)
        if len(buf) < 1:
            raise SenseDecodeError("sense data is empty")
        code = buf[0] & 0x7F
        if code in (0x70, 0x71):
            return cls._decode_fixed(buf, code == 0x71)
        if code in (0x72, 0x73):
            return cls._decode_descriptor(buf, code == 0x73)
        raise SenseDecodeError(f"unknown sense response code 0x{code:02x}")

    @staticmethod
    def _sks_fields(key: int, sks: bytes) -> _Sks:
        """Interpret three sense-key-specific bytes (SPC-4 §4.5.2.4)."""
        if len(sks) < 3 or not sks[0] & 0x80:
            return _Sks()
        value = int.from_bytes(sks[1:3], "big")
        if key == SenseKey.ILLEGAL_REQUEST:
            bit = sks[0] & 0x07 if sks[0] & 0x08 else None
            return _Sks(field_pointer=value, bit_pointer=bit, cd=bool(sks[0] & 0x40))
        if key in (SenseKey.NOT_READY, SenseKey.NO_SENSE):
            return _Sks(progress=value)
        return _Sks()

    @classmethod
    def _decode_fixed(cls, buf: bytes, deferred: bool) -> SenseData:
        if len(buf) < 8:
            raise SenseDecodeError(f"fixed sense data is {len(buf)} bytes, needs at least 8")
        total = min(len(buf), 8 + buf[7])
        buf = buf[:total].ljust(18, b"\x00")
        b0, _, b2, info, _, cmd, asc, ascq, _, sks = _FIXED.unpack_from(buf)
        key = b2 & 0x0F
        extra = cls._sks_fields(key, sks if total >= 18 else b"")
        return cls(
            key=key,
            asc=asc if total >= 13 else 0,
            ascq=ascq if total >= 14 else 0,
            information=info if b0 & 0x80 else None,
            command_specific=cmd if total >= 12 and cmd else None,
            deferred=deferred,
            descriptor=False,
            ili=bool(b2 & 0x20),
            field_pointer=extra.field_pointer,
            bit_pointer=extra.bit_pointer,
            cd=extra.cd,
            progress=extra.progress,
        )

    @classmethod
    def _decode_descriptor(cls, buf: bytes, deferred: bool) -> SenseData:
        if len(buf) < 8:
            raise SenseDecodeError(f"descriptor sense data is {len(buf)} bytes, needs at least 8")
        key = buf[1] & 0x0F
        end = min(len(buf), 8 + buf[7])
        information: int | None = None
        command_specific: int | None = None
        sks = _Sks()
        ili = False
        pos = 8
        while pos + 2 <= end:
            dtype, dlen = buf[pos], buf[pos + 1]
            body = buf[pos + 2 : pos + 2 + dlen]
            if len(body) < dlen:
                raise SenseDecodeError(
                    f"sense descriptor 0x{dtype:02x} at byte {pos} runs past the end of the sense data"
                )
            if dtype == 0x00 and dlen >= 10 and body[0] & 0x80:
                information = int.from_bytes(body[2:10], "big")
            elif dtype == 0x01 and dlen >= 10:
                command_specific = int.from_bytes(body[2:10], "big")
            elif dtype == 0x02 and dlen >= 5:
                sks = cls._sks_fields(key, body[2:5])
            elif dtype == 0x05 and dlen >= 2:
                ili = bool(body[1] & 0x20)
            pos += 2 + dlen
        return cls(
            key=key,
            asc=buf[2],
            ascq=buf[3],
            information=information,
            command_specific=command_specific,
            field_pointer=sks.field_pointer,
            bit_pointer=sks.bit_pointer,
            cd=sks.cd,
            progress=sks.progress,
            deferred=deferred,
            descriptor=True,
            ili=ili,
        )

    def __str__(self) -> str:
        try:
            kname = SenseKey(self.key).name
        except ValueError:
            kname = f"0x{self.key:x}"
        s = f"{kname}: {asc_name(self.asc, self.ascq)}"
        if self.information is not None:
            s += f" (information {self.information})"
        return s


class CheckCondition(Exception):
    """Raised by the target emulation to end a command with CHECK CONDITION
    status and the given sense data (SAM-5 §5.3.1)."""

    def __init__(
        self,
        key: int,
        asc: int,
        ascq: int,
        *,
        information: int | None = None,
        field_pointer: int | None = None,
        bit_pointer: int | None = None,
        cd: bool = True,
        progress: int | None = None,
        command_specific: int | None = None,
    ) -> None:
        self.sense = SenseData(
            key=key,
            asc=asc,
            ascq=ascq,
            information=information,
            field_pointer=field_pointer,
            bit_pointer=bit_pointer,
            cd=cd,
            progress=progress,
            command_specific=command_specific,
        )
        super().__init__(str(self.sense))

    @classmethod
    def from_sense(cls, sense: SenseData) -> CheckCondition:
        """Wrap an existing SenseData record."""
        exc = cls(sense.key, sense.asc, sense.ascq)
        exc.sense = sense
        exc.args = (str(sense),)
        return exc


# --- helpers --------------------------------------------------------------


def illegal_request(
    asc_ascq: AscAscq,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    cd: bool = True,
) -> CheckCondition:
    """ILLEGAL REQUEST with an optional field pointer (SPC-4 §4.5.2.4.2)."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST,
        *asc_ascq,
        field_pointer=field_pointer,
        bit_pointer=bit_pointer,
        cd=cd,
    )


def invalid_field_in_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at ``byte`` (and bit)."""
    return illegal_request(INVALID_FIELD_IN_CDB, byte, bit, True)


def invalid_field_in_parameter_list(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at ``byte``."""
    return illegal_request(INVALID_FIELD_IN_PARAMETER_LIST, byte, bit, False)


def unit_attention(asc_ascq: AscAscq) -> CheckCondition:
    """UNIT ATTENTION with the given condition."""
    return CheckCondition(SenseKey.UNIT_ATTENTION, *asc_ascq)


def not_ready(asc_ascq: AscAscq) -> CheckCondition:
    """NOT READY with the given condition."""
    return CheckCondition(SenseKey.NOT_READY, *asc_ascq)


def data_protect(asc_ascq: AscAscq = WRITE_PROTECTED) -> CheckCondition:
    """DATA PROTECT (default WRITE PROTECTED)."""
    return CheckCondition(SenseKey.DATA_PROTECT, *asc_ascq)


def medium_error(asc_ascq: AscAscq, information: int | None = None) -> CheckCondition:
    """MEDIUM ERROR, e.g. UNRECOVERED READ ERROR at LBA ``information``."""
    return CheckCondition(SenseKey.MEDIUM_ERROR, *asc_ascq, information=information)


def miscompare(offset: int) -> CheckCondition:
    """MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION; INFORMATION is the
    byte offset of the first differing byte (SBC-3 §5.2, §5.41)."""
    return CheckCondition(SenseKey.MISCOMPARE, *MISCOMPARE_DURING_VERIFY, information=offset)
