"""The initiator's login state machine (RFC 7143 §6.3, §11.12): it
produces Login Requests and consumes Login Responses, sans-I/O."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .chap import (
    DEFAULT_ALGORITHMS,
    ChapCredentials,
    ChapInitiator,
    RandomBytes,
)
from .constants import VERSION_MAX, VERSION_MIN, Stage
from .errors import AuthenticationError, LoginError, ProtocolError
from .keys import NegotiatedParams, Negotiator, Role, is_auth_key
from .login_common import (
    _FFP,
    _OP,
    _SEC,
    _VALID_STAGES,
    DEFAULT_INITIATOR_OFFERS,
    LOGIN_SEGMENT_LENGTH,
    MAX_LOGIN_ROUNDS,
    TRANSITIONS,
    LoginRejected,
)
from .login_common import (
    stage_name as _stage_name,
)
from .login_common import (
    status_of as _status_of,
)
from .pdu import LoginRequest, LoginResponse
from .text import (
    DEFAULT_TEXT_CAP,
    Pair,
    TextAssembler,
    decode_text,
    encode_text,
    split_text,
)

# ---------------------------------------------------------------- initiator


@dataclass(frozen=True, slots=True)
class ChapAuth:
    """CHAP settings of an initiator.

    ``target_user``/``target_secret`` turn on mutual CHAP: the target must
    prove it knows them.
    """

    user: str
    secret: bytes | str
    target_user: str | None = None
    target_secret: bytes | str | None = None
    algorithms: Sequence[int] = DEFAULT_ALGORITHMS
    encoding: str = "hex"
    refuse_short_secrets: bool = True

    def __repr__(self) -> str:
        return f"ChapAuth(user={self.user!r}, mutual={self.target_user is not None})"


class InitiatorLogin:
    """The initiator's login state machine.

    Args:
        initiator_name: our iSCSI name.
        target_name: the target to log in to; None for a Discovery session.
        isid: the 48-bit initiator session ID.
        tsih: 0 for a new session, the session's TSIH to add a connection.
        cid: connection ID.
        auth: CHAP settings, or None for AuthMethod=None.
        offers: operational keys to offer, merged over
            :data:`DEFAULT_INITIATOR_OFFERS` (a None value drops that key).
        initiator_alias: optional InitiatorAlias.
        cmdsn: the CmdSN carried by login requests (first command's CmdSN).
        itt: the Initiator Task Tag of the login requests.
        security_stage: start with SecurityNegotiation; default: only when
            ``auth`` is given (else log in straight into the operational
            stage, as RFC 7143 §6.3 permits).
        rng: random bytes for CHAP challenges (injectable for tests).

    Use: send :meth:`start`, then feed each response to :meth:`receive` and
    send what it returns until it returns None (:attr:`complete` is then
    True and :attr:`params` holds the result).
    """

    def __init__(self, initiator_name: str, target_name: str | None, isid: int, *,
                 tsih: int = 0, cid: int = 0, auth: ChapAuth | None = None,
                 offers: Mapping[str, str | None] | None = None, initiator_alias: str | None = None,
                 cmdsn: int = 0, itt: int = 0, security_stage: bool | None = None,
                 max_segment: int = LOGIN_SEGMENT_LENGTH,
                 rng: RandomBytes = secrets.token_bytes) -> None:
        if not initiator_name:
            raise ValueError("initiator_name is required")
        self.initiator_name = initiator_name
        self.target_name = target_name
        self.isid = isid
        self.tsih = tsih
        self.cid = cid
        self.cmdsn = cmdsn
        self.itt = itt
        self.auth = auth
        self.statsn = 0
        self.expcmdsn = cmdsn
        self.maxcmdsn = cmdsn
        self.complete = False
        self._max_segment = max_segment
        self._security = auth is not None if security_stage is None else security_stage
        local: dict[str, str] = dict(DEFAULT_INITIATOR_OFFERS)
        for key, value in (offers or {}).items():
            if value is None:
                local.pop(key, None)  # do not offer this key at all
            else:
                local[key] = value
        local["InitiatorName"] = initiator_name
        local["SessionType"] = "Discovery" if target_name is None else "Normal"
        if target_name is not None:
            local["TargetName"] = target_name
        if initiator_alias:
            local["InitiatorAlias"] = initiator_alias
        local["AuthMethod"] = "CHAP" if auth is not None else "None"
        self.negotiator = Negotiator(Role.INITIATOR, local, leading=tsih == 0)
        self._chap: ChapInitiator | None = None
        if auth is not None:
            mutual = None
            if auth.target_user is not None and auth.target_secret is not None:
                mutual = ChapCredentials(auth.target_user, auth.target_secret,
                                         auth.refuse_short_secrets)
            self._chap = ChapInitiator(
                ChapCredentials(auth.user, auth.secret, auth.refuse_short_secrets), mutual,
                algorithms=auth.algorithms, encoding=auth.encoding, rng=rng,
            )
        self._chap_started = False
        self._stage: Stage = _SEC if self._security else _OP
        self._assembler = TextAssembler(DEFAULT_TEXT_CAP)
        self._out: list[bytes] = []  # remaining continuation segments
        self._final: tuple[bool, Stage] = (False, _OP)  # T and NSG of the last segment
        self._asked_transit = False
        self._rounds = 0
        self._params: NegotiatedParams | None = None

    # ------------------------------------------------------------ results

    @property
    def stage(self) -> Stage:
        """The current stage (CSG of the next request)."""
        return self._stage

    @property
    def params(self) -> NegotiatedParams:
        """The negotiated parameters (valid once :attr:`complete`)."""
        if self._params is None:
            raise RuntimeError("login is not complete")
        return self._params

    @property
    def exp_statsn(self) -> int:
        """The next StatSN we expect (§11.12: ExpStatSN of the next request)."""
        return (self.statsn + 1) & 0xFFFFFFFF

    # ------------------------------------------------------------ driving

    def start(self) -> LoginRequest:
        """The first Login Request."""
        pairs = self.negotiator.offers(self._stage)
        if self._stage is _SEC:
            if self._chap is None:
                return self._send(pairs, True, _OP, expstatsn=0)
            return self._send(pairs, False, _OP, expstatsn=0)
        return self._send(pairs, True, _FFP, expstatsn=0)

    def _send(self, pairs: list[Pair], transit: bool, nsg: Stage, *,
              expstatsn: int | None = None) -> LoginRequest:
        segments = split_text(encode_text(pairs), self._max_segment)
        self._final = (transit, nsg)
        self._out = segments[1:]
        return self._request(segments[0], expstatsn=expstatsn)

    def _request(self, data: bytes, *, expstatsn: int | None = None,
                 ack: bool = False) -> LoginRequest:
        last = not self._out
        if ack:
            # An empty request acknowledging a continued response: T and C
            # clear, and our pending intent (T/NSG) is left as it was.
            transit, nsg = False, self._final[1]
        else:
            transit, nsg = self._final if last else (False, self._final[1])
            self._asked_transit = transit
        return LoginRequest(
            transit=transit, cont=not last, csg=self._stage, nsg=nsg if transit else 0,
            version_max=VERSION_MAX, version_min=VERSION_MIN, isid=self.isid, tsih=self.tsih,
            itt=self.itt, cid=self.cid, cmdsn=self.cmdsn,
            expstatsn=self.exp_statsn if expstatsn is None else expstatsn, data=data,
        )

    def receive(self, resp: LoginResponse) -> LoginRequest | None:
        """Handle one Login Response; return the next request, or None when
        the login has completed.

        Raises :class:`LoginRejected` when the target refuses (status class
        non-zero), :class:`AuthenticationError` when mutual CHAP fails, and
        :class:`LoginError`/:class:`NegotiationError` on protocol violations
        (the connection must then be dropped).
        """
        if self.complete:
            raise LoginError("Login Response after the login completed")
        self._rounds += 1
        if self._rounds > MAX_LOGIN_ROUNDS:
            raise LoginError(f"login did not finish in {MAX_LOGIN_ROUNDS} rounds")
        if resp.status_class != 0:
            self._reject(resp)
        if resp.itt != self.itt or resp.isid != self.isid:
            raise LoginError("Login Response for another ITT/ISID")
        if resp.version_active != VERSION_MAX:
            raise LoginError(f"target chose unsupported version {resp.version_active}")
        if resp.csg != self._stage:
            raise LoginError(
                f"target answered in stage {_stage_name(resp.csg)}, "
                f"we are in {_stage_name(self._stage)}"
            )
        self.statsn = resp.statsn
        self.expcmdsn = resp.expcmdsn
        self.maxcmdsn = resp.maxcmdsn
        if self._out:
            # We are sending a continued text: the target acknowledges each
            # segment with an empty response (§11.13.2).
            if resp.data or resp.transit or resp.cont:
                raise LoginError("target sent text while our text was being continued")
            data = self._out.pop(0)
            return self._request(data)
        text = self._assembler.feed(resp.data, resp.cont)
        if text is None:
            if resp.transit:
                raise LoginError("Login Response with both T and C set")
            # The target continues: ask for the rest with an empty request.
            return self._request(b"", ack=True)
        return self._process(resp, decode_text(text))

    def _reject(self, resp: LoginResponse) -> None:
        status = _status_of(resp.status_class, resp.status_detail)
        address = None
        if resp.status_class == 1:
            try:
                address = dict(decode_text(resp.data)).get("TargetAddress")
            except ProtocolError:
                address = None
        raise LoginRejected(
            f"login refused by target: {status.words} "
            f"(0x{resp.status_class:02x}{resp.status_detail:02x})",
            status, resp.status_class, resp.status_detail, address,
        )

    def _process(self, resp: LoginResponse, pairs: list[Pair]) -> LoginRequest | None:
        neg = self.negotiator
        stage = self._stage
        auth_keys = {k: v for k, v in pairs if is_auth_key(k)}
        if len(auth_keys) != sum(1 for k, _ in pairs if is_auth_key(k)):
            raise AuthenticationError("CHAP key sent twice")
        if auth_keys and stage is not _SEC:
            raise LoginError("authentication keys outside the security stage")
        answers = neg.respond([(k, v) for k, v in pairs if not is_auth_key(k)], stage)
        out: list[Pair] = list(answers)
        if stage is _SEC:
            out += self._security_step(auth_keys)
        if resp.transit:
            if not self._asked_transit:
                raise LoginError("target set T without the initiator asking (§11.13.3)")
            nsg = Stage(resp.nsg) if resp.nsg in _VALID_STAGES else None
            if nsg is None or nsg not in TRANSITIONS.get(stage, ()) or nsg > self._final[1]:
                raise LoginError(f"target chose invalid NSG {resp.nsg}")
            if stage is _SEC and not self._auth_done():
                raise AuthenticationError("target left the security stage before CHAP completed")
            self._stage = nsg
            if nsg is _FFP:
                self._finish(resp)
                return None
            out += neg.offers(_OP)
            return self._send(out, True, _FFP)
        if stage is _SEC:
            transit = self._auth_done() or (self._chap is not None and self._chap.awaiting_target_proof)
            return self._send(out, transit, _OP)
        return self._send(out, True, _FFP)

    def _security_step(self, auth_keys: dict[str, str]) -> list[Pair]:
        method = self.negotiator.value("AuthMethod")
        if self._chap is None:
            if auth_keys:
                raise AuthenticationError("target sent CHAP keys but we use AuthMethod=None")
            return []
        if method is None:
            if auth_keys:
                raise AuthenticationError("CHAP keys before AuthMethod was agreed")
            return []
        if method != "CHAP":
            raise AuthenticationError(f"target chose AuthMethod={method}; we require CHAP")
        if not self._chap_started:
            self._chap_started = True
            if auth_keys:
                raise AuthenticationError("CHAP keys before our CHAP_A")
            return self._chap.start()
        return self._chap.receive(auth_keys)

    @property
    def chap_algorithm_pending(self) -> bool:
        """True while our CHAP_A offer waits for the target's choice."""
        return self._chap is not None and self._chap.awaiting_challenge

    def _auth_done(self) -> bool:
        if self._chap is None:
            return True
        return self._chap.complete

    def _finish(self, resp: LoginResponse) -> None:
        if self.tsih == 0:
            if resp.tsih == 0:
                raise LoginError("target completed a new session without assigning a TSIH")
            self.tsih = resp.tsih
        elif resp.tsih != self.tsih:
            raise LoginError(f"target changed TSIH {self.tsih} to {resp.tsih}")
        self.negotiator.finish()
        self._params = self.negotiator.params()
        self.complete = True


