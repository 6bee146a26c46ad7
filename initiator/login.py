"""Driving :class:`iscsi.login.InitiatorLogin` over a live connection.

The protocol (stages, keys, CHAP) is all in :mod:`iscsi.login`; this module
only moves its PDUs over a connection given as two callables (send the
wire buffers; await the next received PDU or failure) and turns its
exceptions into the initiator's one-line errors. Everything it needs comes
in as explicit arguments (:class:`LoginSettings`), nothing from the session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from iscsi.constants import ISCSI_PORT, LoginStatus
from iscsi.errors import LoginError, ProtocolError
from iscsi.keys import NegotiatedParams
from iscsi.login import ChapAuth, InitiatorLogin, LoginRejected
from iscsi.names import Portal, default_initiator_name, parse_portal
from iscsi.pdu import PDU, Buffer, LoginRequest, LoginResponse

from .errors import LoginFailed, LoginRefused, TargetProtocolError


class LoginRedirected(LoginRefused):
    """Status class 1: the target lives at ``address`` (``host:port``)."""

    def __init__(self, status: int, address: str) -> None:
        super().__init__(status, f"target moved to {address}")
        self.address = address


@dataclass(frozen=True, slots=True)
class LoginResult:
    """What the session needs once the login has completed."""

    params: NegotiatedParams
    tsih: int
    cmdsn: int
    expcmdsn: int
    maxcmdsn: int
    exp_statsn: int


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


@dataclass(frozen=True)
class LoginSettings:
    """Everything one login exchange needs (RFC 7143 §6, §13)."""

    #: None for a Discovery session (SessionType=Discovery, §13.21).
    target_name: str | None
    isid: int
    cid: int
    cmdsn: int
    itt: int
    portal: str
    initiator_name: str | None = None
    initiator_alias: str | None = None
    #: Keys offered in wire syntax (HeaderDigest, MaxBurstLength, ...).
    offers: dict[str, str] = field(default_factory=dict)
    chap_user: str | None = None
    chap_secret: str | None = None
    target_chap_user: str | None = None
    target_chap_secret: str | None = None
    chap_algorithms: tuple[int, ...] = (5,)
    #: 0 for a leading login; the session's TSIH to add a connection to it.
    tsih: int = 0


def login_offers(*, header_digest: str, data_digest: str, max_recv_data_segment_length: int,
                 max_burst_length: int, first_burst_length: int, initial_r2t: bool,
                 immediate_data: bool, max_outstanding_r2t: int,
                 keys: dict[str, str], max_connections: int = 1,
                 error_recovery_level: int = 0) -> dict[str, str]:
    """The operational keys we offer (§13), ``keys`` winning."""
    offers = {
        "MaxConnections": str(max_connections),
        "ErrorRecoveryLevel": str(error_recovery_level),
        "HeaderDigest": header_digest,
        "DataDigest": data_digest,
        "MaxRecvDataSegmentLength": str(max_recv_data_segment_length),
        "MaxBurstLength": str(max_burst_length),
        "FirstBurstLength": str(min(first_burst_length, max_burst_length)),
        "InitialR2T": _yes(initial_r2t),
        "ImmediateData": _yes(immediate_data),
        "MaxOutstandingR2T": str(max_outstanding_r2t),
    }
    if error_recovery_level:
        offers["ErrorRecoveryLevel"] = str(error_recovery_level)
    offers.update(keys)
    return offers


Send = Callable[[list[Buffer]], None]
Receive = Callable[[], Awaitable["PDU | BaseException"]]


class LoginDriver:
    """One login exchange over ``send``/``receive``."""

    def __init__(self, settings: LoginSettings, send: Send, receive: Receive) -> None:
        self.settings = settings
        self.send = send
        self.receive = receive

    def _auth(self) -> ChapAuth | None:
        o = self.settings
        if o.chap_user is None or o.chap_secret is None:
            if o.target_chap_user is not None:
                raise LoginFailed("mutual CHAP needs our own CHAP user and secret too")
            return None
        return ChapAuth(o.chap_user, o.chap_secret, o.target_chap_user, o.target_chap_secret,
                        algorithms=o.chap_algorithms)

    async def run(self) -> LoginResult:
        """Exchange Login PDUs until Full Feature Phase; raise on refusal."""
        o = self.settings
        try:
            name = o.initiator_name or default_initiator_name()
            login = InitiatorLogin(
                name, o.target_name, o.isid, tsih=o.tsih, cid=o.cid, auth=self._auth(),
                offers=dict(o.offers), initiator_alias=o.initiator_alias, cmdsn=o.cmdsn,
                itt=o.itt)
        except ValueError as exc:
            raise LoginFailed(f"bad login settings: {exc}") from exc
        req: LoginRequest | None = login.start()
        while req is not None:
            self.send(list(req.encode()))
            item = await self.receive()
            if isinstance(item, BaseException):
                if isinstance(item, ProtocolError):
                    raise TargetProtocolError(f"bad PDU from the target during login: {item}")
                raise LoginFailed(f"target closed the connection during login ({item or 'EOF'})")
            if not isinstance(item, LoginResponse):
                raise TargetProtocolError(
                    f"target sent {type(item).__name__} during login (expected Login Response)")
            try:
                req = login.receive(item)
            except LoginRejected as exc:
                status = exc.status_class << 8 | exc.status_detail
                if exc.status_class == 1 and exc.target_address:
                    raise LoginRedirected(status, exc.target_address) from None
                raise _refusal(status, login, o) from None
            except (LoginError, ProtocolError) as exc:
                raise LoginFailed(f"login to {o.portal} failed: {exc}") from None
        return LoginResult(login.params, login.tsih, login.cmdsn, login.expcmdsn,
                           login.maxcmdsn, login.exp_statsn)


def _refusal(status: int, login: InitiatorLogin, o: LoginSettings) -> LoginRefused:
    """The refusal with a hint that follows its likely cause."""
    if status in (LoginStatus.INITIATOR_ERROR, LoginStatus.AUTHENTICATION_FAILURE) \
            and login.chap_algorithm_pending:
        # Refused right after our CHAP_A offer, without CHAP_A=Reject: the
        # target takes none of our algorithms (istgt answers 0x0201, tgt
        # 0x0200).
        offered = ",".join(str(a) for a in o.chap_algorithms)
        return LoginRefused(status, f"login refused: the target accepts none of the CHAP "
                            f"algorithms offered (CHAP_A={offered}), status 0x{status:04x}",
                            hint="--chap-algorithms 5 (MD5, the one every target takes) or "
                                 "the list the target documents")
    if status == LoginStatus.SERVICE_UNAVAILABLE and o.target_name is not None:
        # LIO answers a TargetName it does not know with 0x0301, not 0x0203.
        return LoginRefused(status, f"login refused: target {o.target_name} not found or "
                            f"unavailable (status 0x{status:04x})",
                            hint="run 'iscsi-initiator discover HOST' to list the targets, or "
                                 "try again later")
    return LoginRefused(status)


# ------------------------------------------------------------- redirection


def parse_target_address(text: str, default_port: int = ISCSI_PORT) -> Portal:
    """Parse the TargetAddress of a login redirection (status class 1,
    RFC 7143 §11.13.5; syntax §13.8: ``domainname[:port][,portal-group-tag]``,
    IPv6 in brackets); raise TargetProtocolError if malformed."""
    try:
        return parse_portal(text, default_port=default_port)
    except ValueError as exc:
        raise TargetProtocolError(f"malformed TargetAddress from the target: {exc}") from None


__all__ = ["LoginDriver", "LoginRedirected", "LoginResult", "LoginSettings", "login_offers",
           "parse_target_address"]
