"""Wire constants of RFC 7143 §11 as IntEnums.

Every numeric code that travels in a PDU and that more than one module needs
lives here, so the codec, the login state machine, the target and the
initiator agree on one spelling.
"""

from __future__ import annotations

from enum import IntEnum

#: Length of the Basic Header Segment (RFC 7143 §11.2.1).
BHS_LEN = 48
#: Reserved Initiator/Target Task Tag value (RFC 7143 §11.2.1.8, §11.7.4).
RESERVED_TAG = 0xFFFFFFFF
#: MaxRecvDataSegmentLength in force before (and unless) negotiated (§13.12).
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192
#: Largest value the 24-bit DataSegmentLength field can carry.
MAX_DATA_SEGMENT_LENGTH_FIELD = (1 << 24) - 1
#: Well-known iSCSI port (RFC 7143 §13.1 / IANA).
ISCSI_PORT = 3260
#: Highest and lowest protocol versions defined (RFC 7143 §11.12.4).
VERSION_MAX = 0x00
VERSION_MIN = 0x00


class Opcode(IntEnum):
    """PDU opcodes, RFC 7143 §11.2.1.2 (the low six bits of byte 0)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(op for op in Opcode if op < 0x20)
TARGET_OPCODES = frozenset(op for op in Opcode if op >= 0x20)


class RejectReason(IntEnum):
    """Reject PDU reason codes, RFC 7143 §11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    OUT_OF_RESOURCES = 0x0A
    NEGOTIATION_RESET = 0x0B  # deprecated by RFC 7143
    WAITING_FOR_LOGOUT = 0x0C


class LoginStatus(IntEnum):
    """Login Response Status-Class << 8 | Status-Detail, RFC 7143 §11.13.5."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        """The Status-Class byte."""
        return self.value >> 8

    @property
    def status_detail(self) -> int:
        """The Status-Detail byte."""
        return self.value & 0xFF

    @property
    def words(self) -> str:
        """A short human description, e.g. ``"authentication failed"``."""
        return _LOGIN_WORDS[self]


_LOGIN_WORDS = {
    LoginStatus.SUCCESS: "success",
    LoginStatus.TARGET_MOVED_TEMPORARILY: "target moved temporarily",
    LoginStatus.TARGET_MOVED_PERMANENTLY: "target moved permanently",
    LoginStatus.INITIATOR_ERROR: "initiator error",
    LoginStatus.AUTHENTICATION_FAILURE: "authentication failed",
    LoginStatus.AUTHORIZATION_FAILURE: "authorization failed (initiator not allowed)",
    LoginStatus.NOT_FOUND: "target not found",
    LoginStatus.TARGET_REMOVED: "target removed",
    LoginStatus.UNSUPPORTED_VERSION: "unsupported iSCSI version",
    LoginStatus.TOO_MANY_CONNECTIONS: "too many connections",
    LoginStatus.MISSING_PARAMETER: "missing parameter",
    LoginStatus.CANT_INCLUDE_IN_SESSION: "cannot include connection in session",
    LoginStatus.SESSION_TYPE_NOT_SUPPORTED: "session type not supported",
    LoginStatus.SESSION_DOES_NOT_EXIST: "session does not exist",
    LoginStatus.INVALID_DURING_LOGIN: "invalid request during login",
    LoginStatus.TARGET_ERROR: "target error",
    LoginStatus.SERVICE_UNAVAILABLE: "service unavailable",
    LoginStatus.OUT_OF_RESOURCES: "target out of resources",
}


class Stage(IntEnum):
    """Login stages for CSG/NSG, RFC 7143 §11.12.3."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


class TaskAttribute(IntEnum):
    """ATTR field of the SCSI Command PDU, RFC 7143 §11.3.1."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TMFunction(IntEnum):
    """Task Management Function codes, RFC 7143 §11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8
    QUERY_TASK = 9
    QUERY_TASK_SET = 10
    I_T_NEXUS_RESET = 11
    QUERY_ASYNC_EVENT = 12


class TMResponse(IntEnum):
    """Task Management Function Response codes, RFC 7143 §11.6.1."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    FUNCTION_AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class ISCSIResponse(IntEnum):
    """Response field of the SCSI Response PDU, RFC 7143 §11.4.3."""

    COMMAND_COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class LogoutReason(IntEnum):
    """Logout Request reason codes, RFC 7143 §11.14.1."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(IntEnum):
    """Logout Response codes, RFC 7143 §11.15.1."""

    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class AsyncEvent(IntEnum):
    """Asynchronous Message AsyncEvent codes, RFC 7143 §11.9.1."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUEST = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255


class SnackType(IntEnum):
    """SNACK Type field, RFC 7143 §11.16.1."""

    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    R_DATA = 3


class AHSType(IntEnum):
    """Additional Header Segment types, RFC 7143 §11.2.2.1."""

    EXTENDED_CDB = 1
    BIDI_READ_DATA_LENGTH = 2
