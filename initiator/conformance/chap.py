"""CHAP family: algorithms, binary encodings, wrong and malformed
responses, reflection and mutual authentication (RFC 7143 §12.1.3, §6.1,
§11.13.5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from iscsi.chap import ChapAlgorithm, ChapCredentials, ChapInitiator
from iscsi.constants import LoginStatus
from iscsi.errors import ProtocolError
from iscsi.pdu import LoginResponse

from .context import Context
from .describe import describe
from .model import Failed, Level, NotSupported, TestError, Warned, conformance_test
from .steps import OP, SEC, HandLogin, Pairs, first_keys, negotiate
from .wire import login_keys

MUST, SHOULD = Level.MUST, Level.SHOULD

Tamper = Callable[[Pairs, dict[str, str]], Pairs]


@dataclass
class ChapRun:
    """Where a hand-driven CHAP exchange ended."""

    login: HandLogin
    chap: ChapInitiator
    #: The target's keys with its challenge.
    challenge_keys: dict[str, str]
    #: The response to our CHAP_N/CHAP_R (None: connection closed).
    resp: LoginResponse | None


def run_chap(ctx: Context, *, algorithms: tuple[int, ...] = (5,), encoding: str = "hex",
             tamper: Tamper | None = None, mutual: bool = False) -> ChapRun:
    """Security stage by hand: AuthMethod=CHAP, CHAP_A, then our response
    (altered by ``tamper``) with T=1 NSG=1. Raises NotSupported when the
    target declines the algorithms offered."""
    auth = ctx.chap()
    assert auth is not None
    target = None
    if mutual:
        if not (auth.target_user and auth.target_secret):
            raise NotSupported("needs mutual CHAP credentials (target_user/target_password "
                               "in the URL)")
        target = ChapCredentials(auth.target_user, auth.target_secret, False)
    chap = ChapInitiator(ChapCredentials(auth.user, auth.secret, False), target,
                         algorithms=algorithms, encoding=encoding)
    hl = HandLogin(ctx.connect(), ctx.new_isid(), first_keys(ctx), stage=SEC)
    resp = hl.send([("AuthMethod", "CHAP")], transit=False)
    if resp is None or resp.status_class != 0:
        raise TestError("target refused AuthMethod=CHAP")
    if dict(login_keys(resp)).get("AuthMethod") not in (None, "CHAP"):
        raise TestError("target did not pick AuthMethod=CHAP")
    resp = hl.send(chap.start(), transit=False)
    if resp is None:
        raise NotSupported(f"CHAP_A={algorithms}: connection closed")
    if resp.status_class != 0:
        raise NotSupported(f"CHAP_A={','.join(map(str, algorithms))} declined: Login reject "
                           f"0x{resp.status:04x}")
    keys = dict(login_keys(resp))
    if keys.get("CHAP_A") == "Reject":
        raise NotSupported(f"CHAP_A={','.join(map(str, algorithms))} answered Reject")
    try:
        pairs = chap.receive(keys)
    except ProtocolError as exc:
        raise Failed(f"target's CHAP challenge is not acceptable: {exc} (§12.1.3)",
                     describe(resp)) from exc
    if tamper is not None:
        pairs = tamper(pairs, keys)
    return ChapRun(hl, chap, keys, hl.send(pairs, transit=True, nsg=OP))


def finish(ctx: Context, run: ChapRun) -> LoginResponse | None:
    """Carry a CHAP exchange through to Full Feature Phase; the final
    response (status may be non-zero), None when closed."""
    resp = run.resp
    for _ in range(4):
        if resp is None or resp.status_class != 0:
            return resp
        keys = {k: v for k, v in login_keys(resp) if k.startswith("CHAP_")}
        if run.chap.awaiting_target_proof:
            try:
                run.chap.receive(keys)
            except ProtocolError as exc:
                raise Failed(f"mutual CHAP: {exc} (§12.1.3)", describe(resp)) from exc
        if resp.transit:
            break
        resp = run.login.send([], transit=True, nsg=OP)
    n = negotiate(ctx, [], hl=run.login)
    return n.final


def _login_ok(ctx: Context, run: ChapRun, what: str) -> str:
    final = finish(ctx, run)
    if final is None:
        raise Failed(f"{what}: the target closed the connection")
    if final.status_class != 0:
        raise Failed(f"{what}: Login reject 0x{final.status:04x}", describe(final))
    return "logged in"


def _algorithm_test(alg: ChapAlgorithm, level: Level) -> None:
    name = alg.name.lower()

    @conformance_test(f"chap.algorithm.{name}", "12.1.3", level,
                      f"CHAP_A={int(alg)} ({alg.name}) offered alone, answered correctly: the "
                      f"login succeeds" + (" (MD5 is mandatory)" if alg is ChapAlgorithm.MD5
                                           else "; declining it is not-supported"),
                      needs_chap=True)
    def test(ctx: Context) -> str:
        try:
            run = run_chap(ctx, algorithms=(int(alg),))
        except NotSupported as exc:
            if alg is ChapAlgorithm.MD5:
                raise Failed(f"MD5 declined: {exc}; CHAP_A=5 MUST be supported") from exc
            raise
        return _login_ok(ctx, run, f"a correct {alg.name} response")


for _alg in ChapAlgorithm:
    _algorithm_test(_alg, MUST if _alg is ChapAlgorithm.MD5 else SHOULD)


@conformance_test("chap.algorithm.unknown", "12.1.3", MUST,
                  "CHAP_A=250 (no such algorithm) alone: CHAP_A=Reject or a Login reject, "
                  "never a challenge", needs_chap=True)
def algorithm_unknown(ctx: Context) -> str:
    hl = HandLogin(ctx.connect(), ctx.new_isid(), first_keys(ctx), stage=SEC)
    resp = hl.send([("AuthMethod", "CHAP")], transit=False)
    if resp is None or resp.status_class != 0:
        raise TestError("target refused AuthMethod=CHAP")
    resp = hl.send([("CHAP_A", "250")], transit=False)
    if resp is None:
        return "connection closed"
    if resp.status_class != 0:
        return f"Login reject 0x{resp.status:04x}"
    keys = dict(login_keys(resp))
    if keys.get("CHAP_A") == "Reject" and "CHAP_C" not in keys:
        return "CHAP_A=Reject"
    raise Failed("an unknown CHAP_A was answered with a challenge", describe(resp))


@conformance_test("chap.encoding.base64", "6.1", MUST,
                  "CHAP_R in base64 (0b...): accepted, the login succeeds", needs_chap=True)
def base64(ctx: Context) -> str:
    return _login_ok(ctx, run_chap(ctx, encoding="base64"), "a correct base64 CHAP_R")


@conformance_test("chap.encoding.hex_upper", "6.1", MUST,
                  "CHAP_R as 0X with upper-case hex digits: accepted, the login succeeds",
                  needs_chap=True)
def hex_upper(ctx: Context) -> str:
    def upper(pairs: Pairs, keys: dict[str, str]) -> Pairs:
        return [(k, "0X" + v[2:].upper() if k == "CHAP_R" else v) for k, v in pairs]
    return _login_ok(ctx, run_chap(ctx, tamper=upper), "a correct 0X CHAP_R")


def _refused(ctx: Context, run: ChapRun, exact: set[int], what: str) -> str:
    resp = run.resp
    if resp is None:
        raise Warned(f"{what}: connection closed instead of Login reject 0x0201")
    if resp.status in exact:
        return f"0x{resp.status:04x}"
    if resp.status_class == 2:
        raise Warned(f"{what}: Login reject 0x{resp.status:04x}; 0x0201 is exact")
    final = finish(ctx, run) if resp.status_class == 0 else resp
    if final is not None and final.status_class == 0:
        raise Failed(f"{what} was accepted: the initiator is logged in", describe(final))
    if final is None or final.status in exact:
        return "refused later"
    raise Failed(f"{what}: status 0x{final.status:04x}", describe(final))


def _replace(key: str, fn: Callable[[str], str]) -> Tamper:
    def tamper(pairs: Pairs, keys: dict[str, str]) -> Pairs:
        return [(k, fn(v) if k == key else v) for k, v in pairs]
    return tamper


@conformance_test("chap.response.wrong", "12.1.3", MUST,
                  "a CHAP_R with one bit flipped: Login reject 0x0201 (Authentication failure)",
                  needs_chap=True)
def wrong(ctx: Context) -> str:
    flip = _replace("CHAP_R", lambda v: v[:2] + f"{int(v[2:4], 16) ^ 1:02x}" + v[4:])
    return _refused(ctx, run_chap(ctx, tamper=flip), {LoginStatus.AUTHENTICATION_FAILURE},
                    "a wrong CHAP_R")


@conformance_test("chap.response.short", "12.1.3", MUST,
                  "a CHAP_R of 8 bytes for MD5 (16 expected): Login reject 0x0201",
                  needs_chap=True)
def short(ctx: Context) -> str:
    cut = _replace("CHAP_R", lambda v: v[:2 + 16])
    return _refused(ctx, run_chap(ctx, tamper=cut), {LoginStatus.AUTHENTICATION_FAILURE},
                    "a short CHAP_R")


@conformance_test("chap.response.malformed", "6.1", MUST,
                  "CHAP_R=0xZZ (not hex): Login reject 0x0201 or 0x0200", needs_chap=True)
def malformed(ctx: Context) -> str:
    bad = _replace("CHAP_R", lambda v: "0xZZ")
    return _refused(ctx, run_chap(ctx, tamper=bad),
                    {LoginStatus.AUTHENTICATION_FAILURE, LoginStatus.INITIATOR_ERROR},
                    "a malformed CHAP_R")


@conformance_test("chap.response.wrong_name", "12.1.3", MUST,
                  "the right CHAP_R under another CHAP_N: Login reject 0x0201 (or 0x0202)",
                  needs_chap=True)
def wrong_name(ctx: Context) -> str:
    other = _replace("CHAP_N", lambda v: v + "-not")
    return _refused(ctx, run_chap(ctx, tamper=other),
                    {LoginStatus.AUTHENTICATION_FAILURE, LoginStatus.AUTHORIZATION_FAILURE},
                    "an unknown CHAP_N")


@conformance_test("chap.none.refused", "12", MUST,
                  "with CHAP required, AuthMethod=None offered alone: never Full Feature Phase "
                  "(Login reject 0x0201, class 2, or the connection closed)", needs_chap=True)
def none_refused(ctx: Context) -> str:
    hl = HandLogin(ctx.connect(), ctx.new_isid(), first_keys(ctx), stage=SEC)
    resp = hl.send([("AuthMethod", "None")], transit=True, nsg=OP)
    for _ in range(4):
        if resp is None:
            return "connection closed"
        if resp.status_class != 0:
            return f"Login reject 0x{resp.status:04x}"
        if resp.transit:
            break
        resp = hl.send([], transit=True, nsg=OP)
    final = negotiate(ctx, [], hl=hl).final
    if final is None or final.status_class != 0:
        return "refused in the operational stage"
    raise Failed("an initiator that declined CHAP reached Full Feature Phase", describe(final))


@conformance_test("chap.mutual.verify", "12.1.3", MUST,
                  "mutual CHAP: the target's CHAP_N/CHAP_R answer our challenge correctly",
                  needs_chap=True)
def mutual(ctx: Context) -> str:
    return _login_ok(ctx, run_chap(ctx, mutual=True), "mutual CHAP")


@conformance_test("chap.mutual.reflection", "12.1.3", MUST,
                  "mutual CHAP with our challenge equal to the target's (a reflection "
                  "attack): the target refuses (class 2 or closed), never answers it",
                  needs_chap=True)
def reflection(ctx: Context) -> str:
    def reflect(pairs: Pairs, keys: dict[str, str]) -> Pairs:
        return [(k, v) for k, v in pairs if k not in ("CHAP_I", "CHAP_C")] + [
            ("CHAP_I", keys["CHAP_I"]), ("CHAP_C", keys["CHAP_C"])]
    run = run_chap(ctx, mutual=True, tamper=reflect)
    resp = run.resp
    if resp is None:
        return "connection closed"
    if resp.status_class != 0:
        return f"Login reject 0x{resp.status:04x}"
    keys = dict(login_keys(resp))
    if "CHAP_R" in keys:
        raise Failed("the target answered a reflected challenge: an attacker can use the "
                     "target's own response (§12.1.3)", describe(resp))
    raise Warned("the target neither refused nor answered the reflected challenge")
