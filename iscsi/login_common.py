"""What both roles' login state machines share (RFC 7143 §6.3, §11.12,
§11.13): the stage machine as data, limits, the initiator's default offers,
and the errors a login ends with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .constants import LoginStatus, Stage
from .errors import LoginError
from .keys import NegotiatedParams

#: MaxRecvDataSegmentLength in force for Login PDUs (§13.12: the declared
#: values take effect in Full Feature Phase).
LOGIN_SEGMENT_LENGTH = 8192
#: A login that needs more request/response rounds than this is abandoned.
MAX_LOGIN_ROUNDS = 64

#: What an initiator offers unless told otherwise: RFC defaults, except the
#: burst and segment sizes a modern target accepts and that matter for speed.
DEFAULT_INITIATOR_OFFERS: Mapping[str, str] = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "MaxConnections": "1",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "1048576",
    "FirstBurstLength": "262144",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
}

_SEC = Stage.SECURITY_NEGOTIATION
_OP = Stage.LOGIN_OPERATIONAL_NEGOTIATION
_FFP = Stage.FULL_FEATURE_PHASE
_VALID_STAGES = (0, 1, 3)

#: The login's stage machine as data (RFC 7143 §6.3, §11.12.3): the stage a
#: Login PDU may be sent in (CSG) -> the stages it may ask to move to
#: (NSG with T=1). Stages only move forward; the operational stage may be
#: skipped, the security stage only at the start.
TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    _SEC: frozenset({_OP, _FFP}),
    _OP: frozenset({_FFP}),
}


class LoginRejected(LoginError):
    """The target answered with a non-zero Status-Class.

    Attributes:
        status_class, status_detail: the raw codes from the response.
        target_address: the TargetAddress of a redirection (class 1).
    """

    def __init__(self, message: str, status: LoginStatus, status_class: int,
                 status_detail: int, target_address: str | None = None) -> None:
        super().__init__(message, status)
        self.status_class = status_class
        self.status_detail = status_detail
        self.target_address = target_address


class LoginRedirect(LoginError):
    """Raised by a policy to redirect the initiator (status class 1, §11.13.5)."""

    def __init__(self, target_address: str, *, permanent: bool = False) -> None:
        status = (LoginStatus.TARGET_MOVED_PERMANENTLY if permanent
                  else LoginStatus.TARGET_MOVED_TEMPORARILY)
        super().__init__(f"target moved to {target_address}", status)
        self.target_address = target_address


def status_of(status_class: int, status_detail: int) -> LoginStatus:
    try:
        return LoginStatus(status_class << 8 | status_detail)
    except ValueError:
        # Unknown detail: fall back to the class-wide code.
        return {1: LoginStatus.TARGET_MOVED_TEMPORARILY, 2: LoginStatus.INITIATOR_ERROR}.get(
            status_class, LoginStatus.TARGET_ERROR
        )


def stage_name(stage: int) -> str:
    return {0: "Security", 1: "Operational", 3: "FullFeature"}.get(stage, f"stage{stage}")




def join_connection(session: NegotiatedParams, conn: NegotiatedParams) -> NegotiatedParams:
    """The parameters a connection added to a session runs on: the
    session-wide values of the leading login (a non-leading login may not
    negotiate leading-only keys, RFC 7143 §6.1, §13, so it ends with their
    defaults) and this connection's own digests and data segment lengths
    (HeaderDigest/DataDigest and MaxRecvDataSegmentLength are per
    connection, §13.1, §13.12)."""
    return dataclasses.replace(
        session, header_digest=conn.header_digest, data_digest=conn.data_digest,
        max_recv_data_segment_length=conn.max_recv_data_segment_length,
        max_xmit_data_segment_length=conn.max_xmit_data_segment_length)
