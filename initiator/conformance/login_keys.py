"""Login family, key negotiation: the rules of RFC 7143 §6.1-§6.2 and the
key table of §13, checked one key kind at a time."""

from __future__ import annotations

from iscsi.constants import LoginStatus
from iscsi.keys import parse_number

from .context import Context
from .describe import describe
from .login import first_request
from .model import Failed, Level, TestError, Warned, conformance_test
from .steps import Negotiation, first_keys, negotiate, refusal, start
from .wire import login_keys

MUST, SHOULD = Level.MUST, Level.SHOULD


def _answer(n: Negotiation, key: str, what: str) -> str | None:
    """The answer to ``key``; a refused login is an error of the test."""
    if n.dropped or n.refused:
        raise Failed(f"target refused a login offering {what}: {refusal(n)}", n.pdu())
    return n.one(key)


def _numeric(ctx: Context, key: str, offer: int, expect: int, section: str) -> str:
    n = negotiate(ctx, [(key, str(offer))])
    got = _answer(n, key, f"{key}={offer}")
    if got is None:
        raise Failed(f"no answer to {key}={offer}: a numerical offer MUST be answered "
                     f"(§6.2.2)", n.pdu())
    if parse_number(got) != expect:
        raise Failed(f"{key}={offer} answered {got}; the result function allows only "
                     f"{expect} (§{section})", n.pdu())
    return f"{key}={got}"


@conformance_test("login.keys.numeric_min", "13.13", MUST,
                  "MaxBurstLength=512 (the minimum; result function Min): answer 512")
def numeric_min(ctx: Context) -> str:
    return _numeric(ctx, "MaxBurstLength", 512, 512, "13.13")


@conformance_test("login.keys.numeric_max", "13.15", MUST,
                  "DefaultTime2Wait=3600 (the maximum; result function Max): answer 3600")
def numeric_max(ctx: Context) -> str:
    return _numeric(ctx, "DefaultTime2Wait", 3600, 3600, "13.15")


@conformance_test("login.keys.max_connections", "13.2", MUST,
                  "MaxConnections=1 (result function Min): answer 1")
def max_connections(ctx: Context) -> str:
    return _numeric(ctx, "MaxConnections", 1, 1, "13.2")


@conformance_test("login.keys.out_of_range", "6.2.2", MUST,
                  "MaxBurstLength=100 (below the range 512..2^24-1): answer Reject or a Login "
                  "reject; an in-range value is a warning; 100 is a failure")
def out_of_range(ctx: Context) -> str:
    n = negotiate(ctx, [("MaxBurstLength", "100")])
    if n.dropped or n.refused:
        return refusal(n)
    got = n.one("MaxBurstLength")
    if got == "Reject":
        return "Reject"
    v = parse_number(got or "")
    if v is not None and 512 <= v <= (1 << 24) - 1:
        raise Warned(f"out-of-range offer answered with the admissible value {got}")
    raise Failed(f"MaxBurstLength=100 answered {got!r}", n.pdu())


@conformance_test("login.keys.boolean_and", "13.11", MUST,
                  "ImmediateData=No (result function AND): answer No, or no answer")
def boolean_and(ctx: Context) -> str:
    n = negotiate(ctx, [("ImmediateData", "No")])
    got = _answer(n, "ImmediateData", "ImmediateData=No")
    if got not in (None, "No"):
        raise Failed(f"ImmediateData=No answered {got}: AND with No is No (§6.2.2)", n.pdu())
    return f"ImmediateData={got or '(omitted)'}"


@conformance_test("login.keys.boolean_or", "13.10", MUST,
                  "InitialR2T=Yes (result function OR): answer Yes, or no answer")
def boolean_or(ctx: Context) -> str:
    n = negotiate(ctx, [("InitialR2T", "Yes")])
    got = _answer(n, "InitialR2T", "InitialR2T=Yes")
    if got not in (None, "Yes"):
        raise Failed(f"InitialR2T=Yes answered {got}: OR with Yes is Yes (§6.2.2)", n.pdu())
    return f"InitialR2T={got or '(omitted)'}"


@conformance_test("login.keys.boolean_bad", "6.2", MUST,
                  "DataPDUInOrder=Maybe (not a boolean): answer Reject, or a Login reject")
def boolean_bad(ctx: Context) -> str:
    n = negotiate(ctx, [("DataPDUInOrder", "Maybe")])
    if n.dropped or n.refused:
        return refusal(n)
    got = n.one("DataPDUInOrder")
    if got != "Reject":
        raise Failed(f"DataPDUInOrder=Maybe answered {got!r}, not Reject", n.pdu())
    return "Reject"


@conformance_test("login.keys.list_select", "6.2.1", MUST,
                  "HeaderDigest=Bogus,None: the first supported value in the offer's order, "
                  "None")
def list_select(ctx: Context) -> str:
    n = negotiate(ctx, [("HeaderDigest", "Bogus,None")])
    got = _answer(n, "HeaderDigest", "HeaderDigest=Bogus,None")
    if got != "None":
        raise Failed(f"HeaderDigest=Bogus,None answered {got!r}; the only supported value "
                     "offered is None (§6.2.1)", n.pdu())
    return "None"


@conformance_test("login.keys.list_none_supported", "6.2.1", MUST,
                  "DataDigest=Foo,Bar (nothing supported): answer Reject, or a Login reject")
def list_none(ctx: Context) -> str:
    n = negotiate(ctx, [("DataDigest", "Foo,Bar")])
    if n.dropped or n.refused:
        return refusal(n)
    got = n.one("DataDigest")
    if got != "Reject":
        raise Failed(f"DataDigest=Foo,Bar answered {got!r}, not Reject (§6.2.1)", n.pdu())
    return "Reject"


@conformance_test("login.keys.twice_same_pdu", "6.2", MUST,
                  "MaxBurstLength offered twice in one Login Request: Login reject, initiator "
                  "error (class 2); a dropped connection is a warning")
def twice_same(ctx: Context) -> str:
    n = negotiate(ctx, [("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")])
    return _twice(n)


def _twice(n: Negotiation) -> str:
    if n.dropped:
        raise Warned("connection closed; §6.2 asks for a Login reject (initiator error)")
    assert n.final is not None
    if n.final.status_class == 2:
        return refusal(n)
    how = refusal(n) if n.refused else "login completed"
    raise Failed(f"a key negotiated twice was accepted ({how}); §6.2: the target MUST answer "
                 "Login reject (initiator error)", n.pdu())


@conformance_test("login.keys.twice_across_pdus", "6.2", MUST,
                  "MaxBurstLength offered with T=0, then again in the next request: Login "
                  "reject, initiator error (class 2)")
def twice_across(ctx: Context) -> str:
    hl = start(ctx)
    resp = hl.send([("MaxBurstLength", "65536")], transit=False)
    if resp is None or resp.status_class != 0:
        raise TestError("target refused a plain MaxBurstLength offer")
    n = negotiate(ctx, [("MaxBurstLength", "65536")], hl=hl)
    return _twice(n)


@conformance_test("login.keys.unknown", "6.2", MUST,
                  "an unknown key (ConformanceUnknownKey=1): answer NotUnderstood")
def unknown(ctx: Context) -> str:
    n = negotiate(ctx, [("ConformanceUnknownKey", "1")])
    got = _answer(n, "ConformanceUnknownKey", "an unknown key")
    if got != "NotUnderstood":
        raise Failed(f"unknown key answered {got!r}, not NotUnderstood (§6.2)", n.pdu())
    return "NotUnderstood"


@conformance_test("login.keys.x_key", "13.5.4", MUST,
                  "a private extension key X-org.aioiscsi.conformance=1: an answer "
                  "(NotUnderstood unless implemented), the login goes on")
def x_key(ctx: Context) -> str:
    n = negotiate(ctx, [("X-org.aioiscsi.conformance", "1")])
    got = _answer(n, "X-org.aioiscsi.conformance", "an X- key")
    if got is None:
        raise Failed("an X- key was not answered; §6.2: a key not understood MUST be answered "
                     "NotUnderstood", n.pdu())
    return got


@conformance_test("login.keys.x_sharp_key", "13.5.4", MUST,
                  "a public extension key X#org.aioiscsi.conformance=1: an answer "
                  "(NotUnderstood unless implemented), the login goes on")
def x_sharp_key(ctx: Context) -> str:
    n = negotiate(ctx, [("X#org.aioiscsi.conformance", "1")])
    got = _answer(n, "X#org.aioiscsi.conformance", "an X# key")
    if got is None:
        raise Failed("an X# key was not answered (§6.2: NotUnderstood)", n.pdu())
    return got


@conformance_test("login.keys.first_burst_le_max", "13.14", MUST,
                  "MaxBurstLength=4096 with FirstBurstLength=65536 (InitialR2T=No, "
                  "ImmediateData=Yes): the FirstBurstLength answer does not exceed the "
                  "MaxBurstLength answer")
def first_burst(ctx: Context) -> str:
    n = negotiate(ctx, [("InitialR2T", "No"), ("ImmediateData", "Yes"),
                        ("MaxBurstLength", "4096"), ("FirstBurstLength", "65536")])
    mbl = _answer(n, "MaxBurstLength", "MaxBurstLength=4096")
    fbl = n.one("FirstBurstLength")
    if fbl in (None, "Irrelevant"):
        return f"FirstBurstLength {fbl or 'unanswered'} (InitialR2T/ImmediateData made it moot)"
    m, f = parse_number(mbl or "4096"), parse_number(fbl or "")
    if f is None or m is None or f > m:
        raise Failed(f"FirstBurstLength={fbl} exceeds MaxBurstLength={mbl} (§13.14)", n.pdu())
    return f"FirstBurstLength={fbl} MaxBurstLength={mbl}"


@conformance_test("login.keys.tpgt_first_response", "13.9", MUST,
                  "a leading login naming a TargetName: the response to the first request with "
                  "C=0 carries TargetPortalGroupTag")
def tpgt(ctx: Context) -> str:
    n = negotiate(ctx, [])
    first = n.login.first_response
    if first is None:
        raise TestError("no response")
    keys = dict(login_keys(first))
    if "TargetPortalGroupTag" not in keys:
            raise Failed("the first Login Response lacks TargetPortalGroupTag (§13.9)",
                     describe(first))
    return f"TargetPortalGroupTag={keys['TargetPortalGroupTag']}"


@conformance_test("login.keys.declarative_unanswered", "6.2", MUST,
                  "declarations (InitiatorAlias, MaxRecvDataSegmentLength) are not negotiated: "
                  "never answered with Reject/NotUnderstood/Irrelevant")
def declarative(ctx: Context) -> str:
    n = negotiate(ctx, [("InitiatorAlias", "conformance kit"),
                        ("MaxRecvDataSegmentLength", "8192")])
    _answer(n, "InitiatorAlias", "declarations")
    for key in ("InitiatorAlias", "MaxRecvDataSegmentLength"):
        for v in n.answers.get(key, []):
            if v in ("Reject", "NotUnderstood", "Irrelevant"):
                raise Failed(f"the declaration {key} was answered {v} (§6.2)", n.pdu())
    return "not answered"


@conformance_test("login.keys.security_in_operational", "6.3", SHOULD,
                  "AuthMethod=None sent in the operational stage (a security key): Login "
                  "reject (class 2) or the connection closed")
def security_in_op(ctx: Context) -> str:
    n = negotiate(ctx, [("AuthMethod", "None")])
    if n.dropped or (n.final is not None and n.final.status_class == 2):
        return refusal(n)
    raise Warned(f"a security key in the operational stage was tolerated "
                 f"(answered {n.one('AuthMethod')!r})")


@conformance_test("login.keys.session_type_bad", "11.13.5", MUST,
                  "SessionType=Bogus: Login reject 0x0209 (Session type not supported); "
                  "another class-2 status is a warning")
def session_type_bad(ctx: Context) -> str:
    first = [p for p in first_keys(ctx) if p[0] != "SessionType"] + [("SessionType", "Bogus")]
    n = negotiate(ctx, [], hl=start(ctx, first=first)) if ctx.chap() is None else None
    if n is None:
        # With CHAP the first request is in the security stage.
        resp = first_request(ctx, first)
        if resp is None:
            raise Warned("connection closed instead of 0x0209")
        status = resp.status
    else:
        if n.dropped:
            raise Warned("connection closed instead of 0x0209")
        assert n.final is not None
        status = n.final.status
    if status == LoginStatus.SESSION_TYPE_NOT_SUPPORTED:
        return "0x0209"
    if status >> 8 == 2:
        raise Warned(f"answered 0x{status:04x}; 0x0209 is exact")
    raise Failed(f"SessionType=Bogus answered 0x{status:04x}")


@conformance_test("login.text.malformed", "6.1", MUST,
                  "a login text record without '=' (b'HeaderDigest\\0'): Login reject "
                  "(class 2) or the connection closed")
def malformed_text(ctx: Context) -> str:
    hl = start(ctx)
    first = b"".join(f"{k}={v}\0".encode() for k, v in hl.pending_first)
    hl.pending_first = []
    resp = hl.send(first + b"HeaderDigest\0", transit=True)
    if resp is None:
        return "connection closed"
    if resp.status_class == 2:
        return f"Login reject 0x{resp.status:04x}"
    raise Failed("a malformed text record was accepted (§6.1)", describe(resp))
