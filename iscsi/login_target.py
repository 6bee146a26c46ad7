"""The target's login state machine (RFC 7143 §6.3, §11.13) and the policy
it consults (targets, ACLs, authentication, the session table), sans-I/O."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from .chap import (
    DEFAULT_ALGORITHMS,
    ChapCredentials,
    ChapTarget,
    RandomBytes,
)
from .constants import VERSION_MAX, VERSION_MIN, LoginStatus, Stage
from .errors import AuthenticationError, LoginError, ProtocolError
from .keys import REJECT, NegotiatedParams, Negotiator, Role, is_auth_key
from .login_common import (
    _FFP,
    _OP,
    _SEC,
    LOGIN_SEGMENT_LENGTH,
    MAX_LOGIN_ROUNDS,
    TRANSITIONS,
    LoginRedirect,
)
from .login_common import (
    stage_name as _stage_name,
)
from .names import validate_name
from .pdu import LoginRequest, LoginResponse
from .text import (
    DEFAULT_TEXT_CAP,
    Pair,
    TextAssembler,
    decode_text,
    encode_text,
    split_text,
)

# ------------------------------------------------------------------- target


@dataclass(frozen=True, slots=True)
class TargetAuth:
    """Authentication a target (or the discovery service) demands.

    Attributes:
        incoming: the credentials initiators must prove; None = no CHAP.
        outgoing: the target's own credentials for mutual CHAP.
        required: refuse AuthMethod=None (only meaningful with ``incoming``).
        require_mutual: refuse one-way CHAP.
        algorithms: CHAP_A values accepted.
        encoding: "hex" or "base64" for the CHAP values we send.
    """

    incoming: ChapCredentials | None = None
    outgoing: ChapCredentials | None = None
    required: bool = True
    require_mutual: bool = False
    algorithms: Sequence[int] = DEFAULT_ALGORITHMS
    encoding: str = "hex"

    @property
    def methods(self) -> str:
        """The AuthMethod values acceptable, in our preference order."""
        if self.incoming is None:
            return "None"
        return "CHAP" if self.required else "CHAP,None"


class LoginTarget(Protocol):
    """What the login needs to know of a configured target."""

    @property
    def name(self) -> str:
        """The target's iSCSI name."""
        ...

    @property
    def alias(self) -> str | None:
        """TargetAlias to declare, or None."""
        ...

    @property
    def auth(self) -> TargetAuth | None:
        """Authentication demanded for this target (None: none)."""
        ...

    @property
    def offers(self) -> Mapping[str, str]:
        """The target's operational settings/limits (key -> wire value)."""
        ...

    def initiator_allowed(self, initiator_name: str) -> bool:
        """ACL check: may this initiator log in (else status 0x0202)?"""
        ...


class TargetLoginPolicy(Protocol):
    """Callbacks into the target server.

    Any method may raise :class:`LoginError` with the status to answer
    (e.g. TARGET_REMOVED, TOO_MANY_CONNECTIONS, SERVICE_UNAVAILABLE, or a
    :class:`LoginRedirect`); any other exception is answered TARGET_ERROR.
    """

    def find_target(self, name: str) -> LoginTarget | None:
        """The target called ``name``, or None (status 0x0203)."""
        ...

    def discovery_auth(self, initiator_name: str) -> TargetAuth | None:
        """Authentication for Discovery sessions; raise LoginError with
        SESSION_TYPE_NOT_SUPPORTED to refuse discovery."""
        ...

    def session_exists(self, isid: int, tsih: int, initiator_name: str,
                       target_name: str | None) -> bool:
        """Whether a connection may join session (isid, tsih) (else 0x020A).

        ``target_name`` is the TargetName of this login (None for a
        Discovery session). A session exists for this login only when the
        ISID, InitiatorName, *and* target (or session type) all match: a
        non-leading login names one I_T nexus, and RFC 7143 §6.3.5 lets it
        join or reinstate only that nexus. The login has already been
        authenticated and authorized against the named target, so matching
        the target here is what makes that check count.
        """
        ...

    def allocate_tsih(self, isid: int, initiator_name: str,
                      target_name: str | None = None) -> int:
        """A fresh non-zero TSIH for a new session of ``initiator_name``
        with ``target_name`` (None: Discovery)."""
        ...


@dataclass
class TargetEntry:
    """A plain :class:`LoginTarget` (for simple servers and tests)."""

    name: str
    alias: str | None = None
    auth: TargetAuth | None = None
    offers: Mapping[str, str] = field(default_factory=dict)
    allowed_initiators: frozenset[str] | None = None  # None: everyone

    def initiator_allowed(self, initiator_name: str) -> bool:
        """True when no ACL is set or the initiator is in it."""
        return self.allowed_initiators is None or initiator_name in self.allowed_initiators


@dataclass
class SimpleLoginPolicy:
    """A dictionary-backed :class:`TargetLoginPolicy`."""

    targets: dict[str, TargetEntry] = field(default_factory=dict)
    discovery: bool = True
    discovery_authentication: TargetAuth | None = None
    #: (ISID, TSIH) -> (InitiatorName, TargetName or None for discovery).
    sessions: dict[tuple[int, int], tuple[str, str | None]] = field(default_factory=dict)
    next_tsih: int = 1

    def find_target(self, name: str) -> LoginTarget | None:
        """Look the target up by name."""
        return self.targets.get(name)

    def discovery_auth(self, initiator_name: str) -> TargetAuth | None:
        """Discovery authentication, or refuse discovery when disabled."""
        if not self.discovery:
            raise LoginError("discovery sessions are disabled",
                             LoginStatus.SESSION_TYPE_NOT_SUPPORTED)
        return self.discovery_authentication

    def session_exists(self, isid: int, tsih: int, initiator_name: str,
                       target_name: str | None) -> bool:
        """True for a session of this initiator and target created by
        :meth:`allocate_tsih`."""
        return self.sessions.get((isid, tsih)) == (initiator_name, target_name)

    def allocate_tsih(self, isid: int, initiator_name: str,
                      target_name: str | None = None) -> int:
        """Hand out TSIHs 1, 2, ... (never 0, §11.12.6). Predictable: for
        tests and examples; a server should pick them at random."""
        tsih = self.next_tsih
        self.next_tsih = self.next_tsih % 0xFFFF + 1
        self.sessions[(isid, tsih)] = (initiator_name, target_name)
        return tsih


_T = TypeVar("_T")


def _call(fn: Callable[..., _T], *args: object) -> _T:
    """Run a policy callback, turning unexpected exceptions into TARGET_ERROR."""
    try:
        return fn(*args)
    except LoginError:
        raise
    except Exception as exc:
        raise LoginError(f"target error: {exc}", LoginStatus.TARGET_ERROR) from exc


class TargetLogin:
    """The target's login state machine for one connection.

    Args:
        policy: the server's configuration and session table.
        portal_group_tag: declared as TargetPortalGroupTag (§13.9).
        initial_statsn: StatSN of the first response (may be random).
        cmd_window: MaxCmdSN = ExpCmdSN + cmd_window - 1 in responses.
        max_segment: largest data segment we send during login.
        rng: random bytes for CHAP challenges (injectable for tests).
        now, timeout: when the connection arrived and how long the login
            may take; :meth:`get_timer` / :meth:`handle_timer` tell the
            owner when to give up on a login that does not complete (the
            engine never reads the clock).

    Feed each LoginRequest to :meth:`receive` and send back the response.
    When :attr:`complete` is True the connection is in Full Feature Phase;
    when :attr:`failed_status` is set the response was a login reject and the
    connection must be closed after sending it.
    """

    def __init__(self, policy: TargetLoginPolicy, portal_group_tag: int, *,
                 initial_statsn: int = 0, cmd_window: int = 32,
                 max_segment: int = LOGIN_SEGMENT_LENGTH,
                 rng: RandomBytes = secrets.token_bytes,
                 now: float = 0.0, timeout: float | None = None) -> None:
        self.policy = policy
        self._deadline = None if timeout is None else now + timeout
        self.portal_group_tag = portal_group_tag
        self.cmd_window = cmd_window
        #: For a non-leading login: the session's (ExpCmdSN, MaxCmdSN) now,
        #: which its responses carry instead of the request's CmdSN (the
        #: session's commands may be behind it, e.g. after a connection
        #: failure; set by the owner once the session is found).
        self.session_window: Callable[[], tuple[int, int]] | None = None
        self.complete = False
        self.failed_status: LoginStatus | None = None
        self.isid = 0
        self.tsih = 0
        self.cid = 0
        self.leading = True
        self.initiator_name: str | None = None
        self.target_name: str | None = None
        self.target: LoginTarget | None = None
        self.session_type = "Normal"
        self.negotiator: Negotiator | None = None
        self.tsih_request = 0
        self.failure_reason = ""
        self._statsn = initial_statsn & 0xFFFFFFFF
        self._max_segment = max_segment
        self._rng = rng
        self._auth: TargetAuth | None = None
        self._chap: ChapTarget | None = None
        self._stage: Stage = _SEC
        self._started = False
        self._assembler = TextAssembler(DEFAULT_TEXT_CAP)
        self._out: list[bytes] = []
        self._final: tuple[bool, Stage, int] = (False, _SEC, 0)  # T, NSG, TSIH of last segment
        self._rounds = 0
        self._params: NegotiatedParams | None = None

    @property
    def started(self) -> bool:
        """True once a first Login Request was accepted for processing."""
        return self._started

    @property
    def progress(self) -> str:
        """Where the login stands, in words (RFC 7143 §6.3 stages), for the
        log line of a login the initiator abandons."""
        if self.complete:
            return "login complete"
        if self.failed_status is not None:
            return f"login refused ({self.failure_reason or self.failed_status.name})"
        if not self._started:
            return "no Login Request received"
        stage = f"{_stage_name(self._stage)} negotiation"
        if self._chap is not None:
            return f"{stage}: {self._chap.progress}"
        return stage

    def get_timer(self) -> float | None:
        """When the login times out, or None (no timeout, or it ended)."""
        if self.complete or self.failed_status is not None:
            return None
        return self._deadline

    def handle_timer(self, now: float) -> bool:
        """True when the login has not completed by its deadline: the owner
        drops the connection (RFC 7143 §6 leaves the login timeout to the
        implementation; an initiator that stalls must not hold a slot)."""
        deadline = self.get_timer()
        return deadline is not None and now >= deadline

    @property
    def params(self) -> NegotiatedParams:
        """The negotiated parameters (valid once :attr:`complete`)."""
        if self._params is None:
            raise RuntimeError("login is not complete")
        return self._params

    @property
    def next_statsn(self) -> int:
        """The StatSN for the first Full Feature Phase response."""
        return self._statsn

    def receive(self, req: LoginRequest) -> LoginResponse:
        """Handle one Login Request and return the Login Response to send."""
        if self.complete or self.failed_status is not None:
            return self._fail(req, LoginError("Login Request after the login ended",
                                              LoginStatus.INVALID_DURING_LOGIN))
        try:
            return self._receive(req)
        except LoginError as exc:
            return self._fail(req, exc)
        except ProtocolError as exc:
            return self._fail(req, LoginError(str(exc), exc.login_status
                                              or LoginStatus.INITIATOR_ERROR))

    # ------------------------------------------------------------ plumbing

    def _response(self, req: LoginRequest, *, transit: bool, cont: bool, nsg: int,
                  tsih: int, data: bytes, status: LoginStatus = LoginStatus.SUCCESS) -> LoginResponse:
        statsn = self._statsn
        self._statsn = (self._statsn + 1) & 0xFFFFFFFF
        exp, mx = req.cmdsn, (req.cmdsn + self.cmd_window - 1) & 0xFFFFFFFF
        if self.session_window is not None and not self.leading:
            exp, mx = self.session_window()
        return LoginResponse(
            transit=transit, cont=cont, csg=req.csg if req.csg in (0, 1) else 0,
            nsg=nsg if transit else 0, version_max=VERSION_MAX, version_active=VERSION_MAX,
            isid=req.isid, tsih=tsih, itt=req.itt, statsn=statsn, expcmdsn=exp,
            maxcmdsn=mx,
            status_class=status.status_class, status_detail=status.status_detail, data=data,
        )

    def _fail(self, req: LoginRequest, exc: LoginError) -> LoginResponse:
        status = exc.login_status or LoginStatus.INITIATOR_ERROR
        self.failed_status = status
        self.failure_reason = str(exc)
        data = b""
        if isinstance(exc, LoginRedirect):
            data = encode_text([("TargetAddress", exc.target_address)])
        return self._response(req, transit=False, cont=False, nsg=0, tsih=req.tsih, data=data,
                              status=status)

    def _next_segment(self, req: LoginRequest) -> LoginResponse:
        data = self._out.pop(0)
        if self._out:
            return self._response(req, transit=False, cont=True, nsg=0, tsih=req.tsih, data=data)
        transit, nsg, tsih = self._final
        if transit and nsg is _FFP:
            self._complete(tsih)
        elif transit:
            self._stage = nsg
        return self._response(req, transit=transit, cont=False, nsg=nsg, tsih=tsih, data=data)

    def _send(self, req: LoginRequest, pairs: list[Pair], transit: bool, nsg: Stage) -> LoginResponse:
        tsih = req.tsih
        if transit and nsg is _FFP and self.leading:
            # §11.13.4: a new session's TSIH appears only in the final response.
            tsih = _call(self.policy.allocate_tsih, self.isid, self.initiator_name or "",
                         self.target_name if self.session_type == "Normal" else None)
            if not 0 < tsih <= 0xFFFF:
                raise LoginError(f"policy gave invalid TSIH {tsih}", LoginStatus.TARGET_ERROR)
        elif transit and nsg is _FFP and not _call(
                self.policy.session_exists, self.isid, req.tsih, self.initiator_name or "",
                self.target_name if self.session_type == "Normal" else None):
            # The session may have ended while this connection authenticated.
            raise LoginError(f"no session with TSIH {req.tsih}",
                             LoginStatus.SESSION_DOES_NOT_EXIST)
        if transit and nsg is _FFP:
            assert self.negotiator is not None
            self.negotiator.finish()
        self._final = (transit, nsg, tsih)
        self._out = split_text(encode_text(pairs), self._max_segment)
        return self._next_segment(req)

    def _complete(self, tsih: int) -> None:
        assert self.negotiator is not None
        self.tsih = tsih
        self._params = self.negotiator.params()
        self._stage = _FFP
        self.complete = True

    # --------------------------------------------------------------- logic

    def _receive(self, req: LoginRequest) -> LoginResponse:
        self._rounds += 1
        if self._rounds > MAX_LOGIN_ROUNDS:
            raise LoginError("login takes too many rounds", LoginStatus.INITIATOR_ERROR)
        if not self._started:
            self._first(req)
        elif (req.isid, req.tsih, req.cid) != (self.isid, self.tsih_request, self.cid):
            raise LoginError("ISID/TSIH/CID changed during login", LoginStatus.INITIATOR_ERROR)
        self._check_stages(req)
        if self._out:
            # Our continued response: the initiator acknowledges each segment
            # with an empty request (§11.12.2).
            if req.data or req.cont or req.transit:
                raise LoginError("initiator sent text while our response was continued",
                                 LoginStatus.INITIATOR_ERROR)
            return self._next_segment(req)
        text = self._assembler.feed(req.data, req.cont)
        if text is None:
            # Partial text: acknowledge with an empty response (§11.13.2).
            return self._response(req, transit=False, cont=False, nsg=0, tsih=req.tsih, data=b"")
        pairs = decode_text(text)
        first = self.negotiator is None
        if first:
            self._identify(req, pairs)
        neg = self.negotiator
        assert neg is not None
        auth_pairs = [(k, v) for k, v in pairs if is_auth_key(k)]
        other = [(k, v) for k, v in pairs if not is_auth_key(k)]
        if auth_pairs and self._stage is not _SEC:
            raise LoginError(f"{auth_pairs[0][0]} outside the security stage",
                             LoginStatus.INITIATOR_ERROR)
        return self._STAGE_HANDLERS[self._stage](self, req, neg, other, auth_pairs)

    def _check_stages(self, req: LoginRequest) -> None:
        if req.transit and req.cont:
            raise LoginError("T and C both set", LoginStatus.INVALID_DURING_LOGIN)
        if req.csg not in TRANSITIONS:
            raise LoginError(f"invalid CSG {req.csg}", LoginStatus.INVALID_DURING_LOGIN)
        if req.csg != self._stage:
            raise LoginError(
                f"request in stage {_stage_name(req.csg)} while in {_stage_name(self._stage)}",
                LoginStatus.INVALID_DURING_LOGIN,
            )
        if req.transit and req.nsg not in TRANSITIONS[Stage(req.csg)]:
            raise LoginError(f"invalid transition {req.csg}->{req.nsg}",
                             LoginStatus.INVALID_DURING_LOGIN)

    def _first(self, req: LoginRequest) -> None:
        self._started = True
        # §11.12.4: we speak version 0 only.
        if not req.version_min <= VERSION_MAX or req.version_max < VERSION_MIN \
                or req.version_min > req.version_max:
            raise LoginError(
                f"versions {req.version_min}..{req.version_max} not supported",
                LoginStatus.UNSUPPORTED_VERSION,
            )
        self.isid, self.tsih_request, self.cid = req.isid, req.tsih, req.cid
        self.leading = req.tsih == 0
        if req.csg not in TRANSITIONS:
            raise LoginError(f"invalid CSG {req.csg}", LoginStatus.INVALID_DURING_LOGIN)
        self._stage = Stage(req.csg)

    def _identify(self, req: LoginRequest, pairs: list[Pair]) -> None:
        """First complete text: who is this, what do they want (§6.3.1, §13.4-§13.5)."""
        keys = dict(pairs)
        name = keys.get("InitiatorName")
        if not name:
            raise LoginError("InitiatorName missing from the first Login Request",
                             LoginStatus.MISSING_PARAMETER)
        try:
            # RFC 3720 §3.2.6 / RFC 7143 §4.2.7: iqn., eui. or naa. names of
            # the allowed characters; ACLs and reservations key on it.
            validate_name(name)
        except ValueError as exc:
            raise LoginError(f"InitiatorName is not an iSCSI name: {exc}",
                             LoginStatus.INITIATOR_ERROR) from None
        self.initiator_name = name
        session_type = keys.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise LoginError(f"SessionType={session_type} is not supported",
                             LoginStatus.SESSION_TYPE_NOT_SUPPORTED)
        self.session_type = session_type
        local: dict[str, str] = {}
        if session_type == "Discovery":
            auth = _call(self.policy.discovery_auth, name)
        else:
            target_name = keys.get("TargetName")
            if not target_name:
                raise LoginError("TargetName missing for a Normal session",
                                 LoginStatus.MISSING_PARAMETER)
            target = _call(self.policy.find_target, target_name)
            if target is None:
                raise LoginError(f"no target named {target_name}", LoginStatus.NOT_FOUND)
            if not _call(target.initiator_allowed, name):
                raise LoginError(f"{name} may not log in to {target_name}",
                                 LoginStatus.AUTHORIZATION_FAILURE)
            self.target, self.target_name = target, target_name
            auth = target.auth
            local.update(target.offers)
            if target.alias:
                local["TargetAlias"] = target.alias
        if not self.leading and not _call(
                self.policy.session_exists, self.isid, req.tsih, name,
                self.target_name if session_type == "Normal" else None):
            raise LoginError(f"no session with TSIH {req.tsih}",
                             LoginStatus.SESSION_DOES_NOT_EXIST)
        self._auth = auth
        local["AuthMethod"] = auth.methods if auth is not None else "None"
        local["TargetPortalGroupTag"] = str(self.portal_group_tag)
        try:
            self.negotiator = Negotiator(Role.TARGET, local, leading=self.leading)
        except ValueError as exc:
            raise LoginError(f"bad target configuration: {exc}", LoginStatus.TARGET_ERROR) from exc
        if self._stage is _OP and self._auth_required():
            # §6.3: a target that needs authentication refuses a login that
            # starts in the operational stage.
            raise AuthenticationError("authentication required; login skipped the security stage")

    def _auth_required(self) -> bool:
        return self._auth is not None and self._auth.incoming is not None and self._auth.required

    def _security(self, req: LoginRequest, neg: Negotiator, other: list[Pair],
                  auth_pairs: list[Pair]) -> LoginResponse:
        offered_method = any(k == "AuthMethod" for k, _ in other)
        answers = neg.respond(other, _SEC)
        if offered_method and (("AuthMethod", REJECT) in answers):
            raise AuthenticationError("no acceptable AuthMethod offered")
        out: list[Pair] = list(answers)
        out += neg.offers(_SEC)
        method = neg.value("AuthMethod")
        if auth_pairs:
            if method != "CHAP":
                raise AuthenticationError("CHAP keys without AuthMethod=CHAP")
            keys = dict(auth_pairs)
            if len(keys) != len(auth_pairs):
                raise AuthenticationError("CHAP key sent twice")
            if self._chap is None:
                auth = self._auth
                assert auth is not None and auth.incoming is not None
                self._chap = ChapTarget(auth.incoming, auth.outgoing, algorithms=auth.algorithms,
                                        require_mutual=auth.require_mutual,
                                        encoding=auth.encoding, rng=self._rng)
            out += self._chap.receive(keys)
        if not req.transit:
            return self._send(req, out, False, _OP)
        done = self._chap.complete if self._chap is not None else (
            method == "None" or (method is None and not self._auth_required())
        )
        if method == "CHAP" and self._chap is None:
            done = False
        if not done:
            if method is None and self._auth_required():
                raise AuthenticationError("initiator tried to skip authentication")
            return self._send(req, out, False, _OP)
        nsg = Stage(req.nsg)
        if nsg is _FFP and neg.unresolved_offers(_OP, dry_run=True):
            # We must negotiate something the initiator skipped: stop in the
            # operational stage instead (the target may lower NSG, §11.13.3).
            nsg = _OP
        return self._send(req, out, True, nsg)

    def _operational(self, req: LoginRequest, neg: Negotiator, other: list[Pair],
                     auth_pairs: list[Pair]) -> LoginResponse:
        out = neg.respond(other, _OP)
        out += neg.offers(_OP)
        if not req.transit:
            return self._send(req, out, False, _FFP)
        extra = neg.unresolved_offers(_OP)
        if extra or neg.pending:
            return self._send(req, out + extra, False, _FFP)
        return self._send(req, out, True, _FFP)

    #: What the target does with a complete request, by current stage.
    _STAGE_HANDLERS: Mapping[Stage, Callable[
        [TargetLogin, LoginRequest, Negotiator, list[Pair], list[Pair]], LoginResponse]] = {
        _SEC: _security,
        _OP: _operational,
    }
