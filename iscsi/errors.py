"""The exception hierarchy of the protocol core.

Every error raised while decoding or negotiating is a :class:`ProtocolError`
and carries the answer the RFC gives for it on the wire, so the adapters never
have to guess: a Reject reason, a Login status, or "drop the connection".
"""

from __future__ import annotations

from .constants import LoginStatus, RejectReason


class ProtocolError(Exception):
    """Base class of everything the sans-I/O core raises on bad input.

    Attributes:
        reject_reason: the Reject PDU reason code to answer with, if any.
        login_status: the Login Response status to answer with, if any.
        drop_connection: True when the RFC says the connection must be closed
            (e.g. a header digest error or an unrecoverable framing error,
            RFC 7143 §7.8 / §7.9).
        header: the 48 offending header bytes when known, so a Reject can echo
            them (RFC 7143 §11.17.2).
    """

    reject_reason: RejectReason | None = None
    login_status: LoginStatus | None = None
    drop_connection: bool = False

    def __init__(self, message: str, *, header: bytes | None = None) -> None:
        super().__init__(message)
        self.header = header


class FramingError(ProtocolError):
    """The byte stream cannot be delimited into PDUs any more; drop it."""

    drop_connection = True


class HeaderDigestError(FramingError):
    """HeaderDigest CRC32C mismatch: the header cannot be trusted (§7.8)."""


class HeaderDigestDiscarded(ProtocolError):
    """A PDU whose header digest failed was discarded at ErrorRecoveryLevel
    1 or more (§7.8: "discard the header and all data up to the beginning of
    a later PDU"); recovery follows from sequence numbers. Its header cannot
    be trusted, so :attr:`header` is None and nothing is rejected. The
    stream goes on only if the next header passes its digest -- that is
    what shows the damaged length was right; otherwise
    :class:`HeaderDigestError` ends the connection."""


class DataSegmentTooLong(FramingError):
    """DataSegmentLength exceeds the negotiated MaxRecvDataSegmentLength.

    RFC 7143 §7.2 / §13.12: the receiver has not agreed to accept it; the
    length itself cannot be trusted, so the stream is abandoned after a
    Reject (Protocol Error).
    """

    reject_reason = RejectReason.PROTOCOL_ERROR


class AHSTooLong(FramingError):
    """TotalAHSLength is larger than this implementation accepts."""

    reject_reason = RejectReason.PROTOCOL_ERROR


class DataDigestError(ProtocolError):
    """DataDigest CRC32C mismatch: Reject with reason 0x02 (§7.8, §11.17.1);
    the header was sound so the stream stays in sync."""

    reject_reason = RejectReason.DATA_DIGEST_ERROR


class PDUFormatError(ProtocolError):
    """A field holds a value the RFC forbids: Reject, Protocol Error (§7.9)."""

    reject_reason = RejectReason.PROTOCOL_ERROR


class InvalidPDUField(PDUFormatError):
    """A field value is invalid for this PDU: Reject, Invalid PDU Field."""

    reject_reason = RejectReason.INVALID_PDU_FIELD


class UnsupportedOpcode(PDUFormatError):
    """An opcode we do not implement or the peer's role must not send."""

    reject_reason = RejectReason.COMMAND_NOT_SUPPORTED


class TextError(ProtocolError):
    """A malformed key=value text segment (RFC 7143 §6.1)."""

    reject_reason = RejectReason.PROTOCOL_ERROR
    login_status = LoginStatus.INITIATOR_ERROR


class LoginError(ProtocolError):
    """Login must end with the given status (RFC 7143 §11.13.5)."""

    def __init__(
        self,
        message: str,
        status: LoginStatus = LoginStatus.INITIATOR_ERROR,
        *,
        header: bytes | None = None,
    ) -> None:
        super().__init__(message, header=header)
        self.login_status = status


class NegotiationError(LoginError):
    """A key negotiation that cannot be resolved (RFC 7143 §6.2)."""


class AuthenticationError(LoginError):
    """CHAP or another AuthMethod failed (status 0x0201)."""

    def __init__(self, message: str, *, header: bytes | None = None) -> None:
        super().__init__(message, LoginStatus.AUTHENTICATION_FAILURE, header=header)


class SequenceError(ProtocolError):
    """A sequence number (CmdSN, StatSN, DataSN, R2TSN) out of its window."""

    reject_reason = RejectReason.PROTOCOL_ERROR
