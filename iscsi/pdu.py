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

from .errors import PDUFormatError, UnsupportedOpcode
from .pdu_base import PDU, Buffer, decode_lun, encode_lun, frame
from .pdu_control import (
    AsyncMessage,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)
from .pdu_scsi import R2T, DataIn, DataOut, ScsiCommand, ScsiResponse, data_in_header, iter_ahs

# ---------------------------------------------------------------------------

PDU_CLASSES: dict[int, type[PDU]] = {
    cls.opcode: cls
    for cls in (NopOut, NopIn, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
                LoginRequest, LoginResponse, TextRequest, TextResponse, DataOut, DataIn, R2T,
                LogoutRequest, LogoutResponse, SnackRequest, AsyncMessage, Reject)
}


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