"""Annotated wire vectors for every iSCSI PDU type (RFC 7143 §11).

Each vector is written out by hand from the PDU diagrams in RFC 7143 §11,
one commented line per field, and the test checks both directions:
``encode(obj) == vector`` and ``decode(vector) == obj``. Field values are
chosen so that every 4-byte word differs from its neighbours: a field
written at the wrong offset cannot go unnoticed.

Digests (RFC 7143 §13.1, Appendix B): CRC32C, sent least significant byte
first; the header digest covers BHS + AHS, the data digest covers the data
segment *including* its padding. The digest values below were checked
against an independent bit-by-bit CRC32C written in this file
(``_crc32c_reference``), itself checked against the RFC's examples.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from iscsi.constants import (
    RESERVED_TAG,
    AsyncEvent,
    ISCSIResponse,
    LogoutReason,
    LogoutResponseCode,
    RejectReason,
    SnackType,
    Stage,
    TaskAttribute,
    TMFunction,
    TMResponse,
)
from iscsi.digest import crc32c, digest_bytes, digest_value
from iscsi.errors import (
    InvalidPDUField,
    PDUFormatError,
    ProtocolError,
    UnsupportedOpcode,
)
from iscsi.framing import decode_pdu
from iscsi.pdu import (
    PDU,
    PDU_CLASSES,
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    decode_lun,
    encode_lun,
)


def h(*fields: str) -> bytes:
    """Join hex field strings (spaces allowed) into bytes."""
    return bytes.fromhex(re.sub(r"\s+", "", "".join(fields)))


def wire(pdu: PDU, hd: bool = False, dd: bool = False) -> bytes:
    return b"".join(bytes(b) for b in pdu.encode(hd, dd))


LUN1 = "0001000000000000"  # LUN 1, SAM peripheral device addressing (byte 1)
LUN0 = "0000000000000000"
ZERO4 = "00000000"

# ---------------------------------------------------------------------------
# The vectors. Each is (object, header fields, data fields); the data fields
# include the padding to a 4-byte boundary (RFC 7143 §11.2.3).

VECTORS: dict[str, tuple[PDU, tuple[str, ...], tuple[str, ...]]] = {}

# §11.18 NOP-Out: a ping that asks for an answer (ITT valid, TTT reserved).
VECTORS["nop_out"] = (
    NopOut(itt=0x11223344, ttt=RESERVED_TAG, lun=encode_lun(1), cmdsn=0x0A0B0C0D,
           expstatsn=0x01020304, immediate=True, data=b"hello"),
    (
        "40",        # byte 0: . | I=1 | opcode 0x00 NOP-Out
        "80",        # byte 1: F=1 (always), reserved
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000005",    # bytes 5-7: DataSegmentLength 5
        LUN1,        # bytes 8-15: LUN 1
        "11223344",  # bytes 16-19: Initiator Task Tag
        "ffffffff",  # bytes 20-23: Target Transfer Tag 0xffffffff (not an answer)
        "0a0b0c0d",  # bytes 24-27: CmdSN
        "01020304",  # bytes 28-31: ExpStatSN
        "00" * 16,   # bytes 32-47: reserved
    ),
    (
        "68656c6c6f",  # ping data "hello"
        "000000",      # padding to a word boundary
    ),
)

# §11.19 NOP-In: the answer to the ping above (ping data echoed).
VECTORS["nop_in"] = (
    NopIn(itt=0x11223344, ttt=RESERVED_TAG, lun=encode_lun(1), statsn=0x21222324,
          expcmdsn=0x31323334, maxcmdsn=0x41424344, data=b"hello"),
    (
        "20",        # byte 0: . | . | opcode 0x20 NOP-In
        "80",        # byte 1: F=1, reserved
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000005",    # bytes 5-7: DataSegmentLength 5
        LUN1,        # bytes 8-15: LUN
        "11223344",  # bytes 16-19: Initiator Task Tag (copied from the NOP-Out)
        "ffffffff",  # bytes 20-23: Target Transfer Tag (no answer wanted)
        "21222324",  # bytes 24-27: StatSN
        "31323334",  # bytes 28-31: ExpCmdSN
        "41424344",  # bytes 32-35: MaxCmdSN
        "00" * 12,   # bytes 36-47: reserved
    ),
    (
        "68656c6c6f",  # ping data "hello"
        "000000",      # padding
    ),
)

# §11.18 NOP-Out answering a target's NOP-In: ITT reserved, TTT copied.
VECTORS["nop_out_answer"] = (
    NopOut(itt=RESERVED_TAG, ttt=0x00ABCDEF, lun=encode_lun(1), cmdsn=0x0A0B0C0E,
           expstatsn=0x21222325, immediate=True),
    (
        "40",        # byte 0: I=1, opcode 0x00 NOP-Out
        "80",        # byte 1: F=1
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN1,        # bytes 8-15: LUN copied from the NOP-In
        "ffffffff",  # bytes 16-19: Initiator Task Tag reserved (no answer wanted)
        "00abcdef",  # bytes 20-23: Target Transfer Tag copied from the NOP-In
        "0a0b0c0e",  # bytes 24-27: CmdSN (not advanced: immediate)
        "21222325",  # bytes 28-31: ExpStatSN
        "00" * 16,   # bytes 32-47: reserved
    ),
    (),
)

READ10 = bytes.fromhex("28000000100000000800")
# §11.3 SCSI Command: READ(10) of 8 blocks, simple task attribute.
VECTORS["scsi_command_read"] = (
    ScsiCommand(itt=0x00000101, lun=encode_lun(1), cdb=READ10 + bytes(6),
                expected_data_transfer_length=4096, cmdsn=0x0A0B0C0F, expstatsn=0x21222326,
                read=True, write=False, final=True, attr=TaskAttribute.SIMPLE),
    (
        "01",        # byte 0: . | I=0 | opcode 0x01 SCSI Command
        "c1",        # byte 1: F=1 R=1 W=0 reserved ATTR=1 (Simple)
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN1,        # bytes 8-15: LUN
        "00000101",  # bytes 16-19: Initiator Task Tag
        "00001000",  # bytes 20-23: Expected Data Transfer Length 4096
        "0a0b0c0f",  # bytes 24-27: CmdSN
        "21222326",  # bytes 28-31: ExpStatSN
        "28000000100000000800",  # bytes 32-41: CDB READ(10) LBA 0x1000, 8 blocks
        "000000000000",          # bytes 42-47: CDB padding to 16 bytes
    ),
    (),
)

WRITE10 = bytes.fromhex("2a000000200000000100")
# §11.3 SCSI Command: WRITE(10) with 7 bytes of immediate data, more to come
# unsolicited (F=0), ordered, immediate delivery.
VECTORS["scsi_command_write"] = (
    ScsiCommand(itt=0x00000102, lun=encode_lun(1), cdb=WRITE10 + bytes(6),
                expected_data_transfer_length=512, cmdsn=0x0A0B0C10, expstatsn=0x21222327,
                read=False, write=True, final=False, attr=TaskAttribute.ORDERED,
                immediate=True, data=b"writ!!7"),
    (
        "41",        # byte 0: . | I=1 | opcode 0x01 SCSI Command
        "22",        # byte 1: F=0 R=0 W=1 reserved ATTR=2 (Ordered)
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000007",    # bytes 5-7: DataSegmentLength 7 (immediate data)
        LUN1,        # bytes 8-15: LUN
        "00000102",  # bytes 16-19: Initiator Task Tag
        "00000200",  # bytes 20-23: Expected Data Transfer Length 512
        "0a0b0c10",  # bytes 24-27: CmdSN
        "21222327",  # bytes 28-31: ExpStatSN
        "2a000000200000000100",  # bytes 32-41: CDB WRITE(10) LBA 0x2000, 1 block
        "000000000000",          # bytes 42-47: CDB padding
    ),
    (
        "77726974212137",  # immediate data "writ!!7"
        "00",              # padding
    ),
)

# A 32-byte variable-length CDB (SPC-4 §4.2.3: opcode 0x7f, additional
# CDB length 0x18); its last 16 bytes travel in an Extended CDB AHS.
CDB32 = bytes.fromhex("7f000000000000180009000000000000") + bytes(range(0xA0, 0xB0))
# §11.3 + §11.2.2: bidirectional SCSI Command with Extended CDB AHS and
# Bidirectional Read Data Length AHS; head-of-queue attribute.
VECTORS["scsi_command_bidi_ahs"] = (
    ScsiCommand(itt=0x00000103, lun=encode_lun(300), cdb=CDB32,
                expected_data_transfer_length=0x00002000, cmdsn=0x0A0B0C11,
                expstatsn=0x21222328, read=True, write=True, final=True,
                attr=TaskAttribute.HEAD_OF_QUEUE, bidi_read_length=0x00003000),
    (
        "01",        # byte 0: I=0, opcode 0x01 SCSI Command
        "e3",        # byte 1: F=1 R=1 W=1 reserved ATTR=3 (Head of Queue)
        "0000",      # bytes 2-3: reserved
        "07",        # byte 4: TotalAHSLength 7 words (20 + 8 bytes)
        "000000",    # bytes 5-7: DataSegmentLength 0
        "412c000000000000",  # bytes 8-15: LUN 300, flat space addressing (01b)
        "00000103",  # bytes 16-19: Initiator Task Tag
        "00002000",  # bytes 20-23: Expected Data Transfer Length (write part)
        "0a0b0c11",  # bytes 24-27: CmdSN
        "21222328",  # bytes 28-31: ExpStatSN
        "7f000000000000180009000000000000",  # bytes 32-47: CDB bytes 0-15
        # AHS 1 (§11.3.5 Extended CDB), 20 bytes, no padding needed:
        "0011",      # bytes 48-49: AHSLength 17 = CDB length 32 - 15
        "01",        # byte 50: AHSType 1 Extended CDB
        "00",        # byte 51: reserved
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",  # bytes 52-67: CDB bytes 16-31
        # AHS 2 (§11.3.6 Bidirectional Read Expected Data Transfer Length):
        "0005",      # bytes 68-69: AHSLength 5
        "02",        # byte 70: AHSType 2 Bidirectional Read Data Length
        "00",        # byte 71: reserved
        "00003000",  # bytes 72-75: Bidirectional Read Expected Data Transfer Length
    ),
    (),
)

# §11.3.5: an 18-byte CDB: the AHS carries 2 CDB bytes and 2 bytes of padding.
VECTORS["scsi_command_ext_cdb_padded"] = (
    ScsiCommand(itt=0x00000104, lun=0, cdb=bytes(range(1, 19)),
                expected_data_transfer_length=0, cmdsn=1, expstatsn=2,
                attr=TaskAttribute.UNTAGGED),
    (
        "01",        # byte 0: opcode 0x01 SCSI Command
        "80",        # byte 1: F=1 R=0 W=0 ATTR=0 (Untagged)
        "0000",      # bytes 2-3: reserved
        "02",        # byte 4: TotalAHSLength 2 words
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN0,        # bytes 8-15: LUN 0
        "00000104",  # bytes 16-19: Initiator Task Tag
        "00000000",  # bytes 20-23: Expected Data Transfer Length 0
        "00000001",  # bytes 24-27: CmdSN
        "00000002",  # bytes 28-31: ExpStatSN
        "0102030405060708090a0b0c0d0e0f10",  # bytes 32-47: CDB bytes 0-15
        "0003",      # bytes 48-49: AHSLength 3 = 18 - 15
        "01",        # byte 50: AHSType 1 Extended CDB
        "00",        # byte 51: reserved
        "1112",      # bytes 52-53: CDB bytes 16-17
        "0000",      # bytes 54-55: AHS padding
    ),
    (),
)

SENSE = bytes.fromhex("700005000000000a00000000240000000000")
# §11.4 SCSI Response: CHECK CONDITION with fixed-format sense data
# ILLEGAL REQUEST / INVALID FIELD IN CDB, and a residual underflow.
VECTORS["scsi_response_sense"] = (
    ScsiResponse(itt=0x00000101, response=ISCSIResponse.COMMAND_COMPLETED, status=0x02,
                 statsn=0x21222324, expcmdsn=0x31323334, maxcmdsn=0x41424344,
                 expdatasn=0x00000003, residual_underflow=True, residual_count=0x00000600,
                 bidi_residual_count=0, snack_tag=0, data=ScsiResponse.sense_segment(SENSE)),
    (
        "21",        # byte 0: opcode 0x21 SCSI Response
        "82",        # byte 1: F=1, o=0 u=0 O=0 U=1 (residual underflow)
        "00",        # byte 2: Response 0x00 Command Completed at Target
        "02",        # byte 3: Status 0x02 CHECK CONDITION
        "00",        # byte 4: TotalAHSLength 0
        "000014",    # bytes 5-7: DataSegmentLength 20 (2 + 18 sense bytes)
        "00" * 8,    # bytes 8-15: reserved
        "00000101",  # bytes 16-19: Initiator Task Tag
        "00000000",  # bytes 20-23: SNACK Tag
        "21222324",  # bytes 24-27: StatSN
        "31323334",  # bytes 28-31: ExpCmdSN
        "41424344",  # bytes 32-35: MaxCmdSN
        "00000003",  # bytes 36-39: ExpDataSN
        "00000000",  # bytes 40-43: Bidirectional Read Residual Count
        "00000600",  # bytes 44-47: Residual Count
    ),
    (
        "0012",                                  # SenseLength 18
        "700005000000000a00000000240000000000",  # fixed sense: 05h / 24h 00h
    ),
)

# §11.4.1: bidirectional residual flags; no data segment (GOOD, no sense).
VECTORS["scsi_response_bidi"] = (
    ScsiResponse(itt=0x00000103, status=0x00, statsn=0x21222325, expcmdsn=0x31323335,
                 maxcmdsn=0x41424345, expdatasn=0x00000002, bidi_overflow=True,
                 bidi_residual_count=0x00000100, residual_overflow=True,
                 residual_count=0x00000080, snack_tag=0x00000009),
    (
        "21",        # byte 0: opcode 0x21 SCSI Response
        "94",        # byte 1: F=1, o=1 (bidi read overflow) u=0 O=1 U=0
        "00",        # byte 2: Response 0x00
        "00",        # byte 3: Status GOOD
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        "00" * 8,    # bytes 8-15: reserved
        "00000103",  # bytes 16-19: Initiator Task Tag
        "00000009",  # bytes 20-23: SNACK Tag
        "21222325",  # bytes 24-27: StatSN
        "31323335",  # bytes 28-31: ExpCmdSN
        "41424345",  # bytes 32-35: MaxCmdSN
        "00000002",  # bytes 36-39: ExpDataSN
        "00000100",  # bytes 40-43: Bidirectional Read Residual Count
        "00000080",  # bytes 44-47: Residual Count
    ),
    (),
)

# §11.5 Task Management Function Request: ABORT TASK.
VECTORS["tmf_request"] = (
    TaskMgmtRequest(function=TMFunction.ABORT_TASK, lun=encode_lun(1), itt=0x00000201,
                    referenced_task_tag=0x00000101, cmdsn=0x0A0B0C12, expstatsn=0x21222329,
                    refcmdsn=0x0A0B0C0F, expdatasn=0x00000004, immediate=True),
    (
        "42",        # byte 0: . | I=1 | opcode 0x02 Task Management Function Request
        "81",        # byte 1: F=1, Function 1 ABORT TASK
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN1,        # bytes 8-15: LUN
        "00000201",  # bytes 16-19: Initiator Task Tag
        "00000101",  # bytes 20-23: Referenced Task Tag
        "0a0b0c12",  # bytes 24-27: CmdSN
        "21222329",  # bytes 28-31: ExpStatSN
        "0a0b0c0f",  # bytes 32-35: RefCmdSN
        "00000004",  # bytes 36-39: ExpDataSN
        "00" * 8,    # bytes 40-47: reserved
    ),
    (),
)

# §11.6 Task Management Function Response.
VECTORS["tmf_response"] = (
    TaskMgmtResponse(response=TMResponse.TASK_DOES_NOT_EXIST, itt=0x00000201,
                     statsn=0x21222329, expcmdsn=0x31323336, maxcmdsn=0x41424346),
    (
        "22",        # byte 0: opcode 0x22 Task Management Function Response
        "80",        # byte 1: F=1, reserved
        "01",        # byte 2: Response 1 Task does not exist
        "00",        # byte 3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        "00" * 8,    # bytes 8-15: reserved
        "00000201",  # bytes 16-19: Initiator Task Tag
        "00000000",  # bytes 20-23: reserved
        "21222329",  # bytes 24-27: StatSN
        "31323336",  # bytes 28-31: ExpCmdSN
        "41424346",  # bytes 32-35: MaxCmdSN
        "00" * 12,   # bytes 36-47: reserved
    ),
    (),
)

LOGIN_TEXT = b"InitiatorName=iqn.2026-11.org.example:init\0SessionType=Normal\0"
# §11.12 Login Request: operational stage, transit to Full Feature Phase.
VECTORS["login_request"] = (
    LoginRequest(transit=True, cont=False, csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                 nsg=Stage.FULL_FEATURE_PHASE, version_max=0, version_min=0,
                 isid=0x400001370000, tsih=0, itt=0x00000001, cid=0x0102, cmdsn=0x0A0B0C0D,
                 expstatsn=0x21222320, data=LOGIN_TEXT),
    (
        "43",            # byte 0: . | I=1 (always) | opcode 0x03 Login Request
        "87",            # byte 1: T=1 C=0 reserved CSG=1 NSG=3
        "00",            # byte 2: Version-max 0
        "00",            # byte 3: Version-min 0
        "00",            # byte 4: TotalAHSLength 0
        "00003e",        # bytes 5-7: DataSegmentLength 62
        "400001370000",  # bytes 8-13: ISID (T=01b IANA enterprise number 0x000137)
        "0000",          # bytes 14-15: TSIH 0 (new session)
        "00000001",      # bytes 16-19: Initiator Task Tag
        "0102",          # bytes 20-21: CID
        "0000",          # bytes 22-23: reserved
        "0a0b0c0d",      # bytes 24-27: CmdSN
        "21222320",      # bytes 28-31: ExpStatSN
        "00" * 16,       # bytes 32-47: reserved
    ),
    (
        "496e69746961746f724e616d653d69716e2e323032362d31312e6f72672e6578616d706c653a696e697400",
        # ^ "InitiatorName=iqn.2026-11.org.example:init\0"
        "53657373696f6e547970653d4e6f726d616c00",  # "SessionType=Normal\0"
        "0000",                                    # padding
    ),
)

# §11.13 Login Response: success, transit to FFP, TSIH assigned.
VECTORS["login_response"] = (
    LoginResponse(transit=True, cont=False, csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                  nsg=Stage.FULL_FEATURE_PHASE, version_max=0, version_active=0,
                  isid=0x400001370000, tsih=0x1234, itt=0x00000001, statsn=0x21222320,
                  expcmdsn=0x0A0B0C0D, maxcmdsn=0x0A0B0C2D, status_class=0, status_detail=0,
                  data=b"TargetPortalGroupTag=1\0"),
    (
        "23",            # byte 0: opcode 0x23 Login Response
        "87",            # byte 1: T=1 C=0 CSG=1 NSG=3
        "00",            # byte 2: Version-max 0
        "00",            # byte 3: Version-active 0
        "00",            # byte 4: TotalAHSLength 0
        "000017",        # bytes 5-7: DataSegmentLength 23
        "400001370000",  # bytes 8-13: ISID
        "1234",          # bytes 14-15: TSIH
        "00000001",      # bytes 16-19: Initiator Task Tag
        "00000000",      # bytes 20-23: reserved
        "21222320",      # bytes 24-27: StatSN
        "0a0b0c0d",      # bytes 28-31: ExpCmdSN
        "0a0b0c2d",      # bytes 32-35: MaxCmdSN
        "00",            # byte 36: Status-Class 0 success
        "00",            # byte 37: Status-Detail 0
        "00" * 10,       # bytes 38-47: reserved
    ),
    (
        "546172676574506f7274616c47726f75705461673d3100",  # "TargetPortalGroupTag=1\0"
        "00",                                              # padding
    ),
)

# §11.13.5 Login Response: authentication failure (class 2, detail 1).
VECTORS["login_response_reject"] = (
    LoginResponse(transit=False, cont=False, csg=Stage.SECURITY_NEGOTIATION,
                  nsg=Stage.SECURITY_NEGOTIATION, isid=0x80FEDCBA9876, tsih=0,
                  itt=0x00000002, statsn=0x00000007, expcmdsn=0x00000008, maxcmdsn=0x00000009,
                  status_class=0x02, status_detail=0x01),
    (
        "23",            # byte 0: opcode 0x23 Login Response
        "00",            # byte 1: T=0 C=0 CSG=0 NSG=0
        "00",            # byte 2: Version-max
        "00",            # byte 3: Version-active
        "00",            # byte 4: TotalAHSLength 0
        "000000",        # bytes 5-7: DataSegmentLength 0
        "80fedcba9876",  # bytes 8-13: ISID (T=10b random)
        "0000",          # bytes 14-15: TSIH
        "00000002",      # bytes 16-19: Initiator Task Tag
        "00000000",      # bytes 20-23: reserved
        "00000007",      # bytes 24-27: StatSN
        "00000008",      # bytes 28-31: ExpCmdSN
        "00000009",      # bytes 32-35: MaxCmdSN
        "02",            # byte 36: Status-Class 2 initiator error
        "01",            # byte 37: Status-Detail 1 authentication failure
        "00" * 10,       # bytes 38-47: reserved
    ),
    (),
)

# §11.10 Text Request: SendTargets=All in a discovery session.
VECTORS["text_request"] = (
    TextRequest(final=True, cont=False, itt=0x00000301, ttt=RESERVED_TAG, lun=0,
                cmdsn=0x0A0B0C13, expstatsn=0x2122232A, immediate=False,
                data=b"SendTargets=All\0"),
    (
        "04",        # byte 0: . | I=0 | opcode 0x04 Text Request
        "80",        # byte 1: F=1 C=0, reserved
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000010",    # bytes 5-7: DataSegmentLength 16
        LUN0,        # bytes 8-15: LUN or reserved
        "00000301",  # bytes 16-19: Initiator Task Tag
        "ffffffff",  # bytes 20-23: Target Transfer Tag (new request)
        "0a0b0c13",  # bytes 24-27: CmdSN
        "2122232a",  # bytes 28-31: ExpStatSN
        "00" * 16,   # bytes 32-47: reserved
    ),
    (
        "53656e64546172676574733d416c6c00",  # "SendTargets=All\0", no padding
    ),
)

SENDTARGETS_REPLY = (b"TargetName=iqn.2026-11.org.example:disk\0"
                     b"TargetAddress=192.0.2.1:3260,1\0")
# §11.11 Text Response: the SendTargets answer.
VECTORS["text_response"] = (
    TextResponse(final=True, cont=False, itt=0x00000301, ttt=RESERVED_TAG, lun=0,
                 statsn=0x2122232A, expcmdsn=0x0A0B0C14, maxcmdsn=0x0A0B0C34,
                 data=SENDTARGETS_REPLY),
    (
        "24",        # byte 0: opcode 0x24 Text Response
        "80",        # byte 1: F=1 C=0
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000047",    # bytes 5-7: DataSegmentLength 71
        LUN0,        # bytes 8-15: LUN or reserved
        "00000301",  # bytes 16-19: Initiator Task Tag
        "ffffffff",  # bytes 20-23: Target Transfer Tag (final answer)
        "2122232a",  # bytes 24-27: StatSN
        "0a0b0c14",  # bytes 28-31: ExpCmdSN
        "0a0b0c34",  # bytes 32-35: MaxCmdSN
        "00" * 12,   # bytes 36-47: reserved
    ),
    (
        "5461726765744e616d653d69716e2e323032362d31312e6f72672e6578616d706c653a6469736b00",
        # ^ "TargetName=iqn.2026-11.org.example:disk\0"
        "546172676574416464726573733d3139322e302e322e313a333236302c3100",
        # ^ "TargetAddress=192.0.2.1:3260,1\0"
        "00",  # padding
    ),
)

# §11.11 Text Response, continued (C=1, F=0), TTT valid for the next part.
VECTORS["text_response_continued"] = (
    TextResponse(final=False, cont=True, itt=0x00000302, ttt=0x00000777, statsn=5,
                 expcmdsn=6, maxcmdsn=7, data=b"A=1"),
    (
        "24",        # byte 0: opcode 0x24 Text Response
        "40",        # byte 1: F=0 C=1
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000003",    # bytes 5-7: DataSegmentLength 3
        LUN0,        # bytes 8-15: LUN
        "00000302",  # bytes 16-19: Initiator Task Tag
        "00000777",  # bytes 20-23: Target Transfer Tag
        "00000005",  # bytes 24-27: StatSN
        "00000006",  # bytes 28-31: ExpCmdSN
        "00000007",  # bytes 32-35: MaxCmdSN
        "00" * 12,   # bytes 36-47: reserved
    ),
    (
        "413d31",  # "A=1" (a key split across PDUs has no NUL yet)
        "00",      # padding
    ),
)

# §11.7 SCSI Data-Out answering an R2T (TTT copied), last of its sequence.
VECTORS["data_out"] = (
    DataOut(final=True, lun=encode_lun(1), itt=0x00000102, ttt=0x00001000,
            expstatsn=0x2122232B, datasn=0x00000000, buffer_offset=0x00000007,
            data=b"writ!!7"),
    (
        "05",        # byte 0: opcode 0x05 SCSI Data-Out
        "80",        # byte 1: F=1, reserved
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000007",    # bytes 5-7: DataSegmentLength 7
        LUN1,        # bytes 8-15: LUN
        "00000102",  # bytes 16-19: Initiator Task Tag
        "00001000",  # bytes 20-23: Target Transfer Tag (from the R2T)
        "00000000",  # bytes 24-27: reserved
        "2122232b",  # bytes 28-31: ExpStatSN
        "00000000",  # bytes 32-35: reserved
        "00000000",  # bytes 36-39: DataSN 0
        "00000007",  # bytes 40-43: Buffer Offset 7
        "00000000",  # bytes 44-47: reserved
    ),
    (
        "77726974212137",  # data "writ!!7"
        "00",              # padding
    ),
)

# §11.7 SCSI Data-In, not the last PDU (F=0, no status).
VECTORS["data_in"] = (
    DataIn(final=False, lun=encode_lun(1), itt=0x00000101, ttt=RESERVED_TAG, statsn=0,
           expcmdsn=0x31323337, maxcmdsn=0x41424347, datasn=0x00000000, buffer_offset=0,
           data=b"hello"),
    (
        "25",        # byte 0: opcode 0x25 SCSI Data-In
        "00",        # byte 1: F=0 A=0 O=0 U=0 S=0
        "00",        # byte 2: reserved
        "00",        # byte 3: Status (reserved, S=0)
        "00",        # byte 4: TotalAHSLength 0
        "000005",    # bytes 5-7: DataSegmentLength 5
        LUN1,        # bytes 8-15: LUN
        "00000101",  # bytes 16-19: Initiator Task Tag
        "ffffffff",  # bytes 20-23: Target Transfer Tag (A=0)
        "00000000",  # bytes 24-27: StatSN (reserved, S=0)
        "31323337",  # bytes 28-31: ExpCmdSN
        "41424347",  # bytes 32-35: MaxCmdSN
        "00000000",  # bytes 36-39: DataSN 0
        "00000000",  # bytes 40-43: Buffer Offset 0
        "00000000",  # bytes 44-47: Residual Count
    ),
    (
        "68656c6c6f",  # data
        "000000",      # padding
    ),
)

# §11.7.4 SCSI Data-In, last PDU carrying status (F=1, S=1) with underflow.
VECTORS["data_in_status"] = (
    DataIn(final=True, residual_underflow=True, status_present=True, status=0x00,
           lun=encode_lun(1), itt=0x00000101, ttt=RESERVED_TAG, statsn=0x2122232C,
           expcmdsn=0x31323338, maxcmdsn=0x41424348, datasn=0x00000001,
           buffer_offset=0x00000005, residual_count=0x00000FF6, data=b"world"),
    (
        "25",        # byte 0: opcode 0x25 SCSI Data-In
        "83",        # byte 1: F=1 A=0 O=0 U=1 S=1
        "00",        # byte 2: reserved
        "00",        # byte 3: Status GOOD
        "00",        # byte 4: TotalAHSLength 0
        "000005",    # bytes 5-7: DataSegmentLength 5
        LUN1,        # bytes 8-15: LUN
        "00000101",  # bytes 16-19: Initiator Task Tag
        "ffffffff",  # bytes 20-23: Target Transfer Tag
        "2122232c",  # bytes 24-27: StatSN
        "31323338",  # bytes 28-31: ExpCmdSN
        "41424348",  # bytes 32-35: MaxCmdSN
        "00000001",  # bytes 36-39: DataSN 1
        "00000005",  # bytes 40-43: Buffer Offset 5
        "00000ff6",  # bytes 44-47: Residual Count 4086
    ),
    (
        "776f726c64",  # data "world"
        "000000",      # padding
    ),
)

# §11.8 Ready To Transfer.
VECTORS["r2t"] = (
    R2T(lun=encode_lun(1), itt=0x00000102, ttt=0x00001000, statsn=0x2122232B,
        expcmdsn=0x31323339, maxcmdsn=0x41424349, r2tsn=0x00000000, buffer_offset=0x00000007,
        desired_data_transfer_length=0x000001F9),
    (
        "31",        # byte 0: opcode 0x31 R2T
        "80",        # byte 1: F=1, reserved
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN1,        # bytes 8-15: LUN
        "00000102",  # bytes 16-19: Initiator Task Tag
        "00001000",  # bytes 20-23: Target Transfer Tag
        "2122232b",  # bytes 24-27: StatSN (next StatSN, not advanced)
        "31323339",  # bytes 28-31: ExpCmdSN
        "41424349",  # bytes 32-35: MaxCmdSN
        "00000000",  # bytes 36-39: R2TSN
        "00000007",  # bytes 40-43: Buffer Offset
        "000001f9",  # bytes 44-47: Desired Data Transfer Length 505
    ),
    (),
)

# §11.14 Logout Request: close this connection.
VECTORS["logout_request"] = (
    LogoutRequest(reason=LogoutReason.CLOSE_CONNECTION, itt=0x00000401, cid=0x0102,
                  cmdsn=0x0A0B0C15, expstatsn=0x2122232D, immediate=True),
    (
        "46",        # byte 0: . | I=1 | opcode 0x06 Logout Request
        "81",        # byte 1: F=1, Reason Code 1 close the connection
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        "00" * 8,    # bytes 8-15: reserved
        "00000401",  # bytes 16-19: Initiator Task Tag
        "0102",      # bytes 20-21: CID
        "0000",      # bytes 22-23: reserved
        "0a0b0c15",  # bytes 24-27: CmdSN
        "2122232d",  # bytes 28-31: ExpStatSN
        "00" * 16,   # bytes 32-47: reserved
    ),
    (),
)

# §11.15 Logout Response.
VECTORS["logout_response"] = (
    LogoutResponse(response=LogoutResponseCode.SUCCESS, itt=0x00000401, statsn=0x2122232D,
                   expcmdsn=0x0A0B0C15, maxcmdsn=0x0A0B0C35, time2wait=2, time2retain=20),
    (
        "26",        # byte 0: opcode 0x26 Logout Response
        "80",        # byte 1: F=1, reserved
        "00",        # byte 2: Response 0 closed successfully
        "00",        # byte 3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        "00" * 8,    # bytes 8-15: reserved
        "00000401",  # bytes 16-19: Initiator Task Tag
        "00000000",  # bytes 20-23: reserved
        "2122232d",  # bytes 24-27: StatSN
        "0a0b0c15",  # bytes 28-31: ExpCmdSN
        "0a0b0c35",  # bytes 32-35: MaxCmdSN
        "00000000",  # bytes 36-39: reserved
        "0002",      # bytes 40-41: Time2Wait 2 s
        "0014",      # bytes 42-43: Time2Retain 20 s
        "00000000",  # bytes 44-47: reserved
    ),
    (),
)

# §11.16 SNACK Request: Status SNACK for StatSN 0x21222320..+2.
VECTORS["snack"] = (
    SnackRequest(type=SnackType.STATUS, lun=0, itt=RESERVED_TAG, ttt=RESERVED_TAG,
                 expstatsn=0x21222320, begrun=0x21222320, runlength=0x00000002),
    (
        "10",        # byte 0: opcode 0x10 SNACK Request
        "81",        # byte 1: F=1, reserved, Type 1 Status
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN0,        # bytes 8-15: LUN or reserved
        "ffffffff",  # bytes 16-19: Initiator Task Tag (reserved for Status SNACK)
        "ffffffff",  # bytes 20-23: Target Transfer Tag / SNACK Tag
        "00000000",  # bytes 24-27: reserved
        "21222320",  # bytes 28-31: ExpStatSN
        "00" * 8,    # bytes 32-39: reserved
        "21222320",  # bytes 40-43: BegRun
        "00000002",  # bytes 44-47: RunLength
    ),
    (),
)

# §11.9 Asynchronous Message: target requests logout within 5 s.
VECTORS["async_message"] = (
    AsyncMessage(lun=0, statsn=0x2122232E, expcmdsn=0x0A0B0C16, maxcmdsn=0x0A0B0C36,
                 async_event=AsyncEvent.LOGOUT_REQUEST, async_vcode=0, parameter1=0,
                 parameter2=0, parameter3=5),
    (
        "32",        # byte 0: opcode 0x32 Asynchronous Message
        "80",        # byte 1: F=1, reserved
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000000",    # bytes 5-7: DataSegmentLength 0
        LUN0,        # bytes 8-15: LUN or reserved
        "ffffffff",  # bytes 16-19: 0xffffffff (no task)
        "00000000",  # bytes 20-23: reserved
        "2122232e",  # bytes 24-27: StatSN
        "0a0b0c16",  # bytes 28-31: ExpCmdSN
        "0a0b0c36",  # bytes 32-35: MaxCmdSN
        "01",        # byte 36: AsyncEvent 1 logout requested
        "00",        # byte 37: AsyncVCode
        "0000",      # bytes 38-39: Parameter1
        "0000",      # bytes 40-41: Parameter2
        "0005",      # bytes 42-43: Parameter3 (Time2Wait for event 1)
        "00000000",  # bytes 44-47: reserved
    ),
    (),
)

# §11.9.1 Asynchronous Message, AsyncEvent 0: SCSI sense data in the data
# segment (SenseLength + sense), byte 1 parameters reserved.
VECTORS["async_message_sense"] = (
    AsyncMessage(lun=encode_lun(1), statsn=0x2122232F, expcmdsn=0x0A0B0C17,
                 maxcmdsn=0x0A0B0C37, async_event=AsyncEvent.SCSI_ASYNC_EVENT,
                 data=bytes.fromhex("0012") + SENSE),
    (
        "32",        # byte 0: opcode 0x32 Asynchronous Message
        "80",        # byte 1: F=1
        "0000",      # bytes 2-3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000014",    # bytes 5-7: DataSegmentLength 20
        LUN1,        # bytes 8-15: LUN
        "ffffffff",  # bytes 16-19: 0xffffffff
        "00000000",  # bytes 20-23: reserved
        "2122232f",  # bytes 24-27: StatSN
        "0a0b0c17",  # bytes 28-31: ExpCmdSN
        "0a0b0c37",  # bytes 32-35: MaxCmdSN
        "00",        # byte 36: AsyncEvent 0 SCSI async event
        "00",        # byte 37: AsyncVCode
        "0000",      # bytes 38-39: Parameter1
        "0000",      # bytes 40-41: Parameter2
        "0000",      # bytes 42-43: Parameter3
        "00000000",  # bytes 44-47: reserved
    ),
    (
        "0012",                                  # SenseLength 18
        "700005000000000a00000000240000000000",  # sense data
    ),
)

_TMF_BHS = "".join(VECTORS["tmf_request"][1])
# §11.17 Reject: the rejected PDU's header is the data segment.
VECTORS["reject"] = (
    Reject(reason=RejectReason.INVALID_PDU_FIELD, statsn=0x21222330, expcmdsn=0x0A0B0C18,
           maxcmdsn=0x0A0B0C38, datasn_r2tsn=0, data=h(_TMF_BHS)),
    (
        "3f",        # byte 0: opcode 0x3f Reject
        "80",        # byte 1: F=1, reserved
        "09",        # byte 2: Reason 0x09 Invalid PDU field
        "00",        # byte 3: reserved
        "00",        # byte 4: TotalAHSLength 0
        "000030",    # bytes 5-7: DataSegmentLength 48
        "00" * 8,    # bytes 8-15: reserved
        "ffffffff",  # bytes 16-19: 0xffffffff
        "00000000",  # bytes 20-23: reserved
        "21222330",  # bytes 24-27: StatSN
        "0a0b0c18",  # bytes 28-31: ExpCmdSN
        "0a0b0c38",  # bytes 32-35: MaxCmdSN
        "00000000",  # bytes 36-39: DataSN/R2TSN or reserved
        "00" * 8,    # bytes 40-47: reserved
    ),
    (
        _TMF_BHS,  # the 48-byte header of the rejected TMF Request (above)
    ),
)


# ---------------------------------------------------------------------------
# The same PDUs with HeaderDigest=CRC32C and DataDigest=CRC32C. The digest
# values are written out here (LSB first) and cross-checked against the
# independent reference CRC below.

DIGESTS: dict[str, tuple[str, str | None]] = {
    # name: (header digest over BHS+AHS, data digest over data+padding)
    "nop_out": ("cf197612", "b3ed0390"),                    # data "hello"+000000
    "scsi_command_bidi_ahs": ("1008cd0f", None),            # digest covers the AHS
    "scsi_command_write": ("3707c841", "0505a8dd"),         # "writ!!7"+00
    "scsi_response_sense": ("426e21c8", "4827ac37"),        # no padding
    "data_in_status": ("72901ecc", "5014296f"),             # "world"+000000
    "login_request": ("55e64876", "eabf032f"),
    "r2t": ("f8581a59", None),                              # no data: no data digest
}


def _vector(name: str, hd: bool = False, dd: bool = False) -> bytes:
    _, hdr, data = VECTORS[name]
    parts = list(hdr)
    if hd:
        parts.append(DIGESTS[name][0])
    parts.extend(data)
    if dd and DIGESTS[name][1] is not None:
        parts.append(DIGESTS[name][1] or "")
    return h(*parts)


def _crc32c_reference(data: bytes) -> int:
    """Bit-at-a-time CRC32C (Castagnoli, reflected polynomial 0x82F63B78),
    RFC 7143 §13.1 / RFC 3385: an independent check on the digest values."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------


def test_every_opcode_has_a_vector() -> None:
    covered = {type(v[0]) for v in VECTORS.values()}
    assert covered == set(PDU_CLASSES.values())


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_layout_is_48_byte_aligned(name: str) -> None:
    _, hdr, data = VECTORS[name]
    assert len(h(*hdr)) % 4 == 0 and len(h(*hdr)) >= 48
    assert len(h(*data)) % 4 == 0


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_encode_matches_vector(name: str) -> None:
    pdu = VECTORS[name][0]
    assert wire(pdu) == _vector(name)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_decode_matches_object(name: str) -> None:
    pdu = VECTORS[name][0]
    got = decode_pdu(_vector(name))
    assert type(got) is type(pdu)
    assert got == pdu


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_digest_vectors(name: str) -> None:
    pdu = VECTORS[name][0]
    vec = _vector(name, hd=True, dd=True)
    assert wire(pdu, True, True) == vec
    assert decode_pdu(vec, header_digest=True, data_digest=True) == pdu
    # header digest only / data digest only
    assert wire(pdu, True, False) == _vector(name, hd=True)
    assert wire(pdu, False, True) == _vector(name, dd=True)
    assert decode_pdu(_vector(name, hd=True), header_digest=True) == pdu
    assert decode_pdu(_vector(name, dd=True), data_digest=True) == pdu


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_digest_values_independent(name: str) -> None:
    _, hdr, data = VECTORS[name]
    hd, dd = DIGESTS[name]
    assert _crc32c_reference(h(*hdr)).to_bytes(4, "little") == bytes.fromhex(hd)
    if dd is not None:
        assert _crc32c_reference(h(*data)).to_bytes(4, "little") == bytes.fromhex(dd)
    else:
        assert not data


def test_crc32c_rfc_examples() -> None:
    # RFC 7143 Appendix B.4 (RFC 3720 B.4): CRC examples, bytes as sent.
    examples = {
        bytes(32): "aa36918a",
        b"\xff" * 32: "43aba862",
        bytes(range(32)): "4e79dd46",
        bytes(range(31, -1, -1)): "5cdb3f11",
    }
    for data, wire_hex in examples.items():
        assert digest_bytes(data) == bytes.fromhex(wire_hex)
        assert _crc32c_reference(data).to_bytes(4, "little") == bytes.fromhex(wire_hex)
        assert digest_value(bytes.fromhex(wire_hex)) == crc32c(data)
    # incremental form used for data + padding
    assert digest_bytes(b"hel", b"lo", b"\0\0\0") == digest_bytes(b"hello\0\0\0")


def test_bad_header_digest_is_fatal() -> None:
    from iscsi.errors import HeaderDigestError

    vec = bytearray(_vector("r2t", hd=True))
    vec[-1] ^= 1
    with pytest.raises(HeaderDigestError) as ei:
        decode_pdu(bytes(vec), header_digest=True)
    assert ei.value.drop_connection


def test_bad_data_digest_names_reject_reason() -> None:
    from iscsi.errors import DataDigestError

    vec = bytearray(_vector("nop_out", hd=True, dd=True))
    vec[-5] ^= 0x80  # a padding byte: padding is covered by the data digest
    with pytest.raises(DataDigestError) as ei:
        decode_pdu(bytes(vec), header_digest=True, data_digest=True)
    assert ei.value.reject_reason == RejectReason.DATA_DIGEST_ERROR
    assert int(RejectReason.DATA_DIGEST_ERROR) == 0x02
    assert not ei.value.drop_connection
    assert ei.value.header == h(*VECTORS["nop_out"][1])


# -- encode() returns buffers; the payload is never copied ---------------------


def test_encode_buffers_do_not_copy_payload() -> None:
    payload = memoryview(bytearray(b"x" * 4097))
    pdu = DataIn(final=True, itt=1, datasn=0, data=payload)
    bufs = pdu.encode(header_digest=True, data_digest=True)
    assert len(bufs) == 5  # header, header digest, payload, pad, data digest
    assert bufs[2] is payload
    assert bytes(bufs[3]) == b"\0\0\0"
    assert bufs[4] == digest_bytes(payload, b"\0\0\0")
    assert len(pdu.encode()) == 3  # header, payload, pad
    assert pdu.encode()[1] is payload
    no_pad = DataIn(final=True, itt=1, data=b"abcd")
    assert len(no_pad.encode()) == 2


def test_to_bytes_matches_encode() -> None:
    pdu = VECTORS["nop_out"][0]
    assert pdu.to_bytes(True, True) == _vector("nop_out", hd=True, dd=True)


# -- properties and details of individual PDUs -----------------------------------


def test_short_cdb_is_padded_to_16_bytes() -> None:
    # The CDB field is always 16 bytes (§11.3.5); decode returns all 16.
    pdu = ScsiCommand(itt=1, cdb=READ10, read=True, expected_data_transfer_length=512)
    got = decode_pdu(wire(pdu))
    assert isinstance(got, ScsiCommand)
    assert got.cdb == READ10 + bytes(6)
    assert got == replace(pdu, cdb=READ10 + bytes(6))


def test_cdb_of_exactly_16_bytes_has_no_ahs() -> None:
    pdu = ScsiCommand(itt=1, cdb=bytes(range(16)))
    assert len(wire(pdu)) == 48


def test_scsi_response_sense_helpers() -> None:
    pdu = VECTORS["scsi_response_sense"][0]
    assert isinstance(pdu, ScsiResponse)
    assert pdu.sense == SENSE
    assert ScsiResponse(itt=1).sense == b""
    assert ScsiResponse.sense_segment(b"") == b""


def test_login_response_status_property() -> None:
    pdu = VECTORS["login_response_reject"][0]
    assert isinstance(pdu, LoginResponse)
    assert pdu.status == 0x0201


def test_reject_helpers() -> None:
    pdu = VECTORS["reject"][0]
    assert isinstance(pdu, Reject)
    assert pdu.rejected_opcode == 0x02
    assert pdu.rejected_itt == 0x00000201
    assert Reject(data=b"short").rejected_opcode is None
    assert Reject(data=b"short").rejected_itt is None


def test_login_request_always_sets_i_bit() -> None:
    pdu = LoginRequest(itt=1, isid=1)
    assert wire(pdu)[0] == 0x43


def test_isid_must_fit_48_bits() -> None:
    with pytest.raises(ValueError):
        wire(LoginRequest(itt=1, isid=1 << 48))


@pytest.mark.parametrize("n", [0, 1, 255, 256, 300, 16383])
def test_lun_helpers_round_trip(n: int) -> None:
    assert decode_lun(encode_lun(n)) == n


def test_lun_encodings() -> None:
    assert encode_lun(5) == 0x0005_0000_0000_0000  # peripheral: byte 1
    assert encode_lun(256) == 0x4100_0000_0000_0000  # flat: 01b + 14 bits
    with pytest.raises(ValueError):
        encode_lun(16384)
    with pytest.raises(ValueError):
        encode_lun(-1)
    weird = 0x0001_0000_0000_0001  # extended bytes in use: not a flat LUN
    assert decode_lun(weird) == weird
    assert decode_lun(0x0101_0000_0000_0000) == 0x0101_0000_0000_0000  # bus 1
    assert decode_lun(0x8001_0000_0000_0000) == 0x8001_0000_0000_0000  # LU addressing


# -- decode rejects what the RFC forbids ---------------------------------------------


def _patch(vec: bytes, offset: int, value: bytes) -> bytes:
    return vec[:offset] + value + vec[offset + len(value):]


REJECTS = [
    # (vector, byte offset, new bytes, error class)
    ("scsi_command_read", 16, b"\xff\xff\xff\xff", InvalidPDUField),  # reserved ITT
    ("scsi_command_read", 1, b"\x41", PDUFormatError),  # F=0 and W=0 (§11.3.1)
    ("scsi_command_write", 1, b"\xc2", PDUFormatError),  # data but W=0
    ("scsi_command_write", 20, b"\x00\x00\x00\x06", PDUFormatError),  # data > EDTL
    ("scsi_response_bidi", 1, b"\x86", PDUFormatError),  # O and U together
    ("scsi_response_bidi", 1, b"\x98", PDUFormatError),  # o and u together
    ("scsi_response_sense", 48, b"\x00\x13", PDUFormatError),  # SenseLength too long
    ("data_in_status", 1, b"\x01", PDUFormatError),  # S without F
    ("data_in_status", 1, b"\x87", PDUFormatError),  # O and U together
    ("r2t", 20, b"\xff\xff\xff\xff", InvalidPDUField),  # reserved TTT
    ("r2t", 44, b"\x00\x00\x00\x00", InvalidPDUField),  # zero desired length
    ("login_request", 1, b"\xc7", InvalidPDUField),  # T and C both set
    ("login_request", 1, b"\x8b", InvalidPDUField),  # CSG 2 is reserved
    ("login_request", 1, b"\x84", InvalidPDUField),  # transit back to stage 0
    ("text_request", 1, b"\xc0", InvalidPDUField),  # F and C both set
    ("text_request", 16, b"\xff\xff\xff\xff", InvalidPDUField),  # reserved ITT
    ("text_response", 1, b"\xc0", InvalidPDUField),  # F and C both set
    ("nop_out", 20, b"\x00\x00\x00\x01", InvalidPDUField),  # ITT and TTT both valid
    ("logout_request", 1, b"\x83", InvalidPDUField),  # reason 3 reserved
    ("login_request", 0, b"\x1f", UnsupportedOpcode),  # opcode 0x1f undefined
]


@pytest.mark.parametrize(("name", "offset", "value", "error"), REJECTS)
def test_decode_rejects(name: str, offset: int, value: bytes, error: type[ProtocolError]) -> None:
    vec = _patch(_vector(name), offset, value)
    with pytest.raises(error) as ei:
        decode_pdu(vec)
    assert ei.value.reject_reason is not None
    assert ei.value.header is not None and len(ei.value.header) == 48
    assert str(ei.value)


def test_decode_rejects_data_on_tmf_and_r2t() -> None:
    for name in ("tmf_request", "r2t"):
        vec = _patch(_vector(name), 5, b"\x00\x00\x04") + b"abcd"
        with pytest.raises(PDUFormatError):
            decode_pdu(vec)


def test_decode_rejects_ahs_on_other_pdus() -> None:
    vec = _patch(_vector("nop_in"), 4, b"\x01")
    vec = vec[:48] + b"\x00\x01\x01\x00" + vec[48:]
    with pytest.raises(PDUFormatError):
        decode_pdu(vec)


@pytest.mark.parametrize(
    "ahs",
    [
        b"\x00\x00\x01\x00",  # AHSLength 0
        b"\x00\x09\x01\x00\x00\x00\x00\x00",  # AHSLength past TotalAHSLength
        b"\x00\x03\x02\x00\x00\x00\x00\x00",  # bidi AHS of the wrong length
        b"\x00\x03\x07\x00\x00\x00\x00\x00",  # unknown AHS type
    ],
)
def test_decode_rejects_bad_ahs(ahs: bytes) -> None:
    base = _vector("scsi_command_read")
    vec = _patch(base[:48], 4, bytes([len(ahs) // 4])) + ahs
    with pytest.raises(PDUFormatError):
        decode_pdu(vec)


def test_logout_and_login_response_failures_skip_stage_check() -> None:
    # A failed Login Response may carry any stage bits (§11.13.5).
    vec = _patch(_vector("login_response_reject"), 1, b"\x8b")
    got = decode_pdu(vec)
    assert isinstance(got, LoginResponse) and got.status_class == 2


def test_decode_pdu_needs_exactly_one_pdu() -> None:
    one = _vector("r2t")
    with pytest.raises(PDUFormatError):
        decode_pdu(one + one)
    with pytest.raises(PDUFormatError):
        decode_pdu(one[:-1])
    with pytest.raises(PDUFormatError):
        decode_pdu(b"")
