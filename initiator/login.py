"""Driving :class:`iscsi.login.InitiatorLogin` over a live connection, and
reading SendTargets answers.

The protocol (stages, keys, CHAP) is all in :mod:`iscsi.login`; this module
only moves its PDUs over the session's connection and turns its exceptions
into the initiator's one-line errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iscsi.constants import ISCSI_PORT
from iscsi.errors import LoginError, ProtocolError
from iscsi.keys import NegotiatedParams
from iscsi.login import ChapAuth, InitiatorLogin, LoginRejected
from iscsi.names import Portal, default_initiator_name, parse_portal
from iscsi.pdu import LoginRequest, LoginResponse

from .errors import LoginFailed, LoginRefused, TargetProtocolError

if TYPE_CHECKING:
    from .session import Session, _Connection


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


class LoginDriver:
    """One login exchange on one connection of ``session``."""

    def __init__(self, session: Session, conn: _Connection) -> None:
        self.session = session
        self.conn = conn

    def _offers(self) -> dict[str, str]:
        o = self.session.options
        offers = {
            "HeaderDigest": o.header_digest,
            "DataDigest": o.data_digest,
            "MaxRecvDataSegmentLength": str(o.max_recv_data_segment_length),
            "MaxBurstLength": str(o.max_burst_length),
            "FirstBurstLength": str(min(o.first_burst_length, o.max_burst_length)),
            "InitialR2T": _yes(o.initial_r2t),
            "ImmediateData": _yes(o.immediate_data),
            "MaxOutstandingR2T": str(o.max_outstanding_r2t),
        }
        offers.update(o.keys)
        return offers

    def _auth(self) -> ChapAuth | None:
        o = self.session.options
        if o.chap_user is None or o.chap_secret is None:
            if o.target_chap_user is not None:
                raise LoginFailed("mutual CHAP needs our own CHAP user and secret too")
            return None
        return ChapAuth(o.chap_user, o.chap_secret, o.target_chap_user, o.target_chap_secret,
                        algorithms=o.chap_algorithms)

    async def run(self) -> LoginResult:
        """Exchange Login PDUs until Full Feature Phase; raise on refusal."""
        s = self.session
        o = s.options
        try:
            name = o.initiator_name or default_initiator_name()
            login = InitiatorLogin(
                name, None if s.discovery else s.target_name, s.isid, tsih=0, cid=s._cid,
                auth=self._auth(), offers=self._offers(), initiator_alias=o.initiator_alias,
                cmdsn=s._cmdsn, itt=s._alloc_itt())
        except ValueError as exc:
            raise LoginFailed(f"bad login settings: {exc}") from exc
        req: LoginRequest | None = login.start()
        while req is not None:
            self.conn.send(list(req.encode()))
            item = await self.conn.login_queue.get()
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
                raise LoginRefused(status) from None
            except (LoginError, ProtocolError) as exc:
                raise LoginFailed(f"login to {s.portal} failed: {exc}") from None
        return LoginResult(login.params, login.tsih, login.cmdsn, login.expcmdsn,
                           login.maxcmdsn, login.exp_statsn)


# ------------------------------------------------------------- SendTargets


@dataclass(frozen=True, slots=True)
class DiscoveredTarget:
    """One target from a SendTargets answer with all its portals."""

    name: str
    portals: tuple[Portal, ...]


def parse_target_address(text: str, default_port: int = ISCSI_PORT) -> Portal:
    """Parse one TargetAddress value (RFC 7143 §13.8:
    ``domainname[:port][,portal-group-tag]``, IPv6 in brackets); raise
    TargetProtocolError if malformed."""
    try:
        return parse_portal(text, default_port=default_port)
    except ValueError as exc:
        raise TargetProtocolError(f"malformed TargetAddress from the target: {exc}") from None


def parse_send_targets(pairs: Iterable[tuple[str, str]], *, default_host: str,
                       default_port: int) -> list[DiscoveredTarget]:
    """Group a SendTargets answer (RFC 7143 Appendix C) by target.

    Each TargetName starts a record; the TargetAddress keys after it are its
    portals. A target without TargetAddress is reached through the portal
    the discovery session used (Appendix C.1).
    """
    out: list[DiscoveredTarget] = []
    name: str | None = None
    portals: list[Portal] = []

    def close() -> None:
        if name is not None:
            found = tuple(portals) or (Portal(default_host, default_port, None),)
            out.append(DiscoveredTarget(name, found))

    for key, value in pairs:
        if key == "TargetName":
            close()
            name, portals = value, []
        elif key == "TargetAddress":
            if name is None:
                raise TargetProtocolError("SendTargets answer has TargetAddress before TargetName")
            portals.append(parse_target_address(value, default_port))
    close()
    return out
