"""Hand-made login steps the login, key and CHAP tests share: reach the
operational stage (through CHAP when the URL has credentials), then send
whatever the test wants, answering the target's own offers so the login
can finish."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from iscsi.chap import ChapCredentials, ChapInitiator
from iscsi.errors import ProtocolError
from iscsi.keys import KEYS, SPECIAL_VALUES, KeyKind
from iscsi.pdu import LoginResponse

from .context import Context
from .describe import describe
from .model import Failed, TestError
from .wire import Wire, login_keys

Pairs = list[tuple[str, str]]

SEC, OP, FFP = 0, 1, 3


@dataclass
class HandLogin:
    """State of a hand-made login on one connection."""

    wire: Wire
    isid: int
    #: Keys that must go in the next PDU because it is the first one.
    pending_first: Pairs = field(default_factory=list)
    stage: int = OP
    responses: list[LoginResponse] = field(default_factory=list)
    first_response: LoginResponse | None = None
    statsn: int = 0

    def send(self, pairs: Sequence[tuple[str, str]] | bytes, *, transit: bool = True,
             nsg: int = FFP, cont: bool = False, csg: int | None = None, tsih: int = 0,
             version_max: int = 0, version_min: int = 0,
             mutate: Callable[[bytearray], None] | None = None) -> LoginResponse | None:
        """One Login Request in the current stage (first-PDU keys added)."""
        if isinstance(pairs, bytes):
            data: Sequence[tuple[str, str]] | bytes = pairs
        else:
            data = self.pending_first + list(pairs)
            self.pending_first = []
        expstatsn = (self.statsn + 1) & 0xFFFFFFFF if self.responses else 0
        resp = self.wire.login_pdu(data, isid=self.isid, csg=self.stage if csg is None else csg,
                                   nsg=nsg, transit=transit, cont=cont, tsih=tsih,
                                   version_max=version_max, version_min=version_min,
                                   expstatsn=expstatsn, mutate=mutate)
        if resp is not None:
            if self.first_response is None:
                self.first_response = resp
            self.responses.append(resp)
            self.statsn = resp.statsn
            if resp.status_class == 0 and resp.transit:
                self.stage = resp.nsg
        return resp


def first_keys(ctx: Context, *, target: str | None = None) -> Pairs:
    """InitiatorName, SessionType and TargetName for a first Login Request."""
    return [("InitiatorName", ctx.config.initiator_name), ("SessionType", "Normal"),
            ("TargetName", target or ctx.target)]


def start(ctx: Context, *, isid: int | None = None, wire: Wire | None = None,
          first: Pairs | None = None) -> HandLogin:
    """Open a connection and get to the operational stage.

    Without CHAP credentials nothing is sent yet: the test's first PDU
    (stage 1) carries the first-PDU keys. With credentials the security
    stage is done here with CHAP, so the caller continues in stage 1.
    """
    w = wire or ctx.connect()
    hl = HandLogin(w, isid if isid is not None else ctx.new_isid(),
                   list(first if first is not None else first_keys(ctx)))
    auth = ctx.chap()
    if auth is None:
        return hl
    hl.stage = SEC
    chap = ChapInitiator(ChapCredentials(auth.user, auth.secret, False),
                         ChapCredentials(auth.target_user, auth.target_secret, False)
                         if auth.target_user and auth.target_secret else None,
                         algorithms=auth.algorithms)
    resp = hl.send([("AuthMethod", "CHAP")], transit=False)
    _ok(resp, "AuthMethod=CHAP")
    resp = hl.send(chap.start(), transit=False)
    keys = dict(_ok(resp, "CHAP_A"))
    try:
        answer = chap.receive(keys)
    except ProtocolError as exc:
        raise TestError(f"CHAP with the URL's credentials failed: {exc}") from exc
    resp = hl.send(answer, transit=True, nsg=OP)
    keys = dict(_ok(resp, "CHAP_R"))
    if chap.target is not None:
        try:
            chap.receive({k: v for k, v in keys.items() if k.startswith("CHAP_")})
        except ProtocolError as exc:
            raise TestError(f"mutual CHAP failed: {exc}") from exc
    assert resp is not None
    for _ in range(4):
        if resp.transit:
            break
        resp = hl.send([], transit=True, nsg=OP)
        _ok(resp, "the move to the operational stage")
        assert resp is not None
    if hl.stage != OP:
        raise TestError(f"target moved to stage {hl.stage}, not the operational stage")
    return hl


def _ok(resp: LoginResponse | None, what: str) -> Pairs:
    if resp is None:
        raise TestError(f"target closed the connection after {what}")
    if resp.status_class != 0:
        raise TestError(f"login refused after {what}: status 0x{resp.status:04x}")
    return login_keys(resp)


def answer_offers(sent: dict[str, str], got: Pairs) -> Pairs:
    """Our answers to keys the target offered (keys we never sent that are
    not declarations): echo its value (admissible under every result
    function), first item of a list."""
    out: Pairs = []
    for k, v in got:
        if k in sent or v in SPECIAL_VALUES:
            continue
        spec = KEYS.get(k)
        if spec is None or spec.kind is KeyKind.DECLARATIVE or k.startswith("CHAP_"):
            continue
        out.append((k, v.split(",")[0]))
    return out


@dataclass
class Negotiation:
    """The outcome of :func:`negotiate`."""

    login: HandLogin
    final: LoginResponse | None
    answers: dict[str, list[str]]

    @property
    def refused(self) -> bool:
        """True when the login ended with a non-zero status class."""
        return self.final is not None and self.final.status_class != 0

    @property
    def dropped(self) -> bool:
        """True when the target closed the connection instead of answering."""
        return self.final is None

    def one(self, key: str) -> str | None:
        """The target's answer for ``key`` (the first occurrence: a later
        one is the target's own offer), None if it gave none."""
        vals = self.answers.get(key)
        return vals[0] if vals else None

    def pdu(self) -> str | None:
        """The last response, described."""
        return describe(self.final) if self.final is not None else None


def negotiate(ctx: Context, offers: Pairs | bytes, *, rounds: int = 6,
              hl: HandLogin | None = None) -> Negotiation:
    """Offer ``offers`` in the operational stage asking for Full Feature
    Phase, and keep answering until the login ends (or fails)."""
    hl = hl or start(ctx)
    sent = dict(offers) if not isinstance(offers, bytes) else {}
    answers: dict[str, list[str]] = {}
    resp = hl.send(offers, transit=True, nsg=FFP)
    for _ in range(rounds):
        if resp is None or resp.status_class != 0:
            break
        got = login_keys(resp)
        for k, v in got:
            answers.setdefault(k, []).append(v)
        if resp.transit and resp.nsg == FFP:
            break
        resp = hl.send(answer_offers(sent, got), transit=True, nsg=FFP)
    else:
        raise Failed(f"login did not reach Full Feature Phase in {rounds} rounds although "
                     "we asked for it each time (RFC 7143 §6.3)",
                     describe(resp) if resp else None)
    return Negotiation(hl, resp, answers)


def refusal(n: Negotiation) -> str:
    """How the target refused, in words (for pass notes)."""
    if n.dropped:
        return "connection closed"
    assert n.final is not None
    return f"Login reject 0x{n.final.status:04x}"
