"""One-line, tshark-like descriptions of PDUs for transcripts and failure
reports: opcode name, flags, tags and sequence numbers, and the key=value
text of Login/Text PDUs."""

from __future__ import annotations

import dataclasses

from iscsi.constants import RESERVED_TAG
from iscsi.errors import ProtocolError
from iscsi.pdu import (
    PDU,
    LoginRequest,
    LoginResponse,
    ScsiCommand,
    TextRequest,
    TextResponse,
    decode_lun,
)
from iscsi.text import decode_text

_NAMES = {
    "NopOut": "NOP-Out", "NopIn": "NOP-In", "ScsiCommand": "SCSI Command",
    "ScsiResponse": "SCSI Response", "TaskMgmtRequest": "Task Mgmt Request",
    "TaskMgmtResponse": "Task Mgmt Response", "LoginRequest": "Login Request",
    "LoginResponse": "Login Response", "TextRequest": "Text Request",
    "TextResponse": "Text Response", "DataOut": "SCSI Data-Out", "DataIn": "SCSI Data-In",
    "R2T": "R2T", "LogoutRequest": "Logout Request", "LogoutResponse": "Logout Response",
    "SnackRequest": "SNACK Request", "AsyncMessage": "Async Message", "Reject": "Reject",
}
# Fields shown in hex (tags, ISID) rather than decimal.
_HEX = {"itt", "ttt", "referenced_task_tag", "isid", "snack_tag"}
# Boolean fields shown as one-letter flags, in this order.
_FLAGS = (("immediate", "I"), ("final", "F"), ("transit", "T"), ("cont", "C"), ("read", "R"),
          ("write", "W"), ("ack", "A"), ("status_present", "S"), ("residual_overflow", "O"),
          ("residual_underflow", "U"), ("bidi_overflow", "o"), ("bidi_underflow", "u"))
_SKIP = {"data", "cdb"} | {name for name, _ in _FLAGS}
_CAMEL = {
    "itt": "ITT", "ttt": "TTT", "cmdsn": "CmdSN", "expstatsn": "ExpStatSN", "statsn": "StatSN",
    "expcmdsn": "ExpCmdSN", "maxcmdsn": "MaxCmdSN", "datasn": "DataSN", "r2tsn": "R2TSN",
    "expdatasn": "ExpDataSN", "refcmdsn": "RefCmdSN", "isid": "ISID", "tsih": "TSIH",
    "cid": "CID", "lun": "LUN", "csg": "CSG", "nsg": "NSG",
    "expected_data_transfer_length": "EDTL", "buffer_offset": "Offset",
    "desired_data_transfer_length": "DDTL", "referenced_task_tag": "RTT",
    "residual_count": "Residual", "status_class": "StatusClass", "status_detail": "StatusDetail",
    "datasn_r2tsn": "DataSN/R2TSN", "version_max": "VersionMax", "version_min": "VersionMin",
    "version_active": "VersionActive",
}


def pdu_name(pdu: PDU) -> str:
    """The PDU type as Wireshark spells it."""
    return _NAMES.get(type(pdu).__name__, type(pdu).__name__)


def _value(name: str, value: object) -> str:
    if name == "lun" and isinstance(value, int):
        return str(decode_lun(value))  # the LUN number, as tshark shows it
    if isinstance(value, int) and not isinstance(value, bool):
        if name in _HEX or (name.endswith("tag") and value == RESERVED_TAG):
            return f"0x{value:x}"
        if name in ("status", "reason", "response") or name.startswith("status_"):
            return f"0x{value:02x}"
    return str(value)


def describe(pdu: PDU) -> str:
    """``Login Response T CSG=1 NSG=3 ... | key=value ...``."""
    flags = "".join(letter for name, letter in _FLAGS if getattr(pdu, name, False) is True)
    parts = [pdu_name(pdu)]
    if flags:
        parts.append(flags)
    for f in dataclasses.fields(pdu):
        if f.name in _SKIP:
            continue
        value = getattr(pdu, f.name)
        if value is None or (f.name == "bidi_read_length"):
            continue
        if f.name.startswith("bidi_") and not value:
            continue
        parts.append(f"{_CAMEL.get(f.name, f.name)}={_value(f.name, value)}")
    if isinstance(pdu, ScsiCommand):
        parts.append("CDB=" + bytes(pdu.cdb).hex(" "))
    data = bytes(pdu.data)
    if data:
        if isinstance(pdu, (LoginRequest, LoginResponse, TextRequest, TextResponse)):
            try:
                text = " ".join(f"{k}={v}" for k, v in decode_text(data))
            except ProtocolError:
                text = "(undecodable text) " + data[:64].hex()
            parts.append("| " + _shorten(text))
        else:
            more = "..." if len(data) > 16 else ""
            parts.append(f"| {len(data)} bytes {data[:16].hex()}{more}")
    return " ".join(parts)


def _shorten(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def describe_raw(header: bytes) -> str:
    """A header that did not decode: opcode and the raw bytes."""
    op = header[0] & 0x3F if header else -1
    return f"opcode=0x{op:02x} raw={header[:48].hex()}"
