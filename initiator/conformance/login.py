"""Login family: versions, ISID/TSIH, T/C bits and stage transitions,
names, timeouts, connection limits and session reinstatement
(RFC 7143 §6.3, §11.12, §11.13)."""

from __future__ import annotations

from collections.abc import Callable

from iscsi.constants import LoginStatus
from iscsi.errors import ProtocolError
from iscsi.login import LoginRejected
from iscsi.pdu import LoginResponse

from .context import Context
from .describe import describe
from .model import Failed, Level, NotSupported, TestError, Warned, conformance_test
from .wire import PeerClosed
from .steps import FFP, OP, SEC, first_keys, negotiate, refusal, start

MUST, SHOULD = Level.MUST, Level.SHOULD


def login_status(ctx: Context, *, isid: int, tsih: int, cid: int = 0) -> int | None:
    """Log in with our state machine (CHAP from the URL); the final status,
    0 for success, None when the target closed the connection."""
    w = ctx.connect()
    try:
        resp = w.login(ctx.config.initiator_name, ctx.target, isid=isid, tsih=tsih, cid=cid,
                       chap=ctx.chap())
    except LoginRejected as exc:
        return exc.status_class << 8 | exc.status_detail
    except PeerClosed:
        return None
    except ProtocolError as exc:
        raise Failed(f"the login with ISID 0x{isid:x} TSIH 0x{tsih:x} went wrong: {exc}") \
            from exc
    return resp.status


def first_request(ctx: Context, keys: list[tuple[str, str]] | None = None, *,
                  isid: int | None = None, tsih: int = 0, cid: int = 0, version_max: int = 0,
                  version_min: int = 0) -> LoginResponse | None:
    """Send a first Login Request by hand: straight to the operational stage
    (T=1, NSG=3) without CHAP credentials, else a security-stage request
    offering AuthMethod=CHAP; ``kw`` sets header fields (tsih, cid,
    version_max, version_min)."""
    w = ctx.connect()
    pairs = first_keys(ctx) if keys is None else keys
    chap = ctx.chap() is not None
    if chap:
        pairs = pairs + [("AuthMethod", "CHAP")]
    return w.login_pdu(pairs, isid=isid or ctx.new_isid(), csg=SEC if chap else OP, nsg=FFP,
                       transit=not chap, tsih=tsih, cid=cid, version_max=version_max,
                       version_min=version_min)


def _status(resp_status: int) -> str:
    try:
        return f"0x{resp_status:04x} ({LoginStatus(resp_status).words})"
    except ValueError:
        return f"0x{resp_status:04x}"


@conformance_test("login.basic.normal", "11.13", MUST,
                  "a plain leading login: every response echoes ISID and ITT, keeps "
                  "VersionActive 0, CSG equal to the request's, NSG never beyond the one "
                  "asked for; the last response moves to FFP with a non-zero TSIH")
def basic_normal(ctx: Context) -> str:
    n = negotiate(ctx, [])
    if n.final is None or n.refused:
        raise TestError(f"plain login refused: {refusal(n)}")
    for resp in n.login.responses:
        pdu = describe(resp)
        if resp.isid != n.login.isid or resp.itt != 0:
            raise Failed("Login Response does not echo the request's ISID/ITT (§11.13)", pdu)
        if resp.version_active != 0:
            raise Failed(f"VersionActive {resp.version_active}, only 0 exists (§11.13.4)", pdu)
        if resp.csg not in (SEC, OP):
            raise Failed(f"Login Response with CSG {resp.csg} (§11.13.3)", pdu)
        if resp.transit and resp.nsg not in (OP, FFP):
            raise Failed(f"Login Response with T=1 and reserved NSG {resp.nsg}", pdu)
    if n.final.tsih == 0:
        raise Failed("final Login Response of a leading login has TSIH 0 (§11.13.6: the "
                     "target sets the TSIH in the final response)", describe(n.final))
    return f"TSIH 0x{n.final.tsih:04x}"


@conformance_test("login.version.unsupported", "11.12.4", MUST,
                  "VersionMax=VersionMin=0x10 (no such version): Login reject 0x0205 "
                  "(Unsupported version)")
def version_unsupported(ctx: Context) -> str:
    resp = first_request(ctx, version_max=0x10, version_min=0x10)
    if resp is None:
        raise Failed("target closed the connection instead of answering 0x0205")
    if resp.status != LoginStatus.UNSUPPORTED_VERSION:
        raise Failed(f"answered {_status(resp.status)}, not 0x0205 Unsupported version",
                     describe(resp))
    return "0x0205"


@conformance_test("login.version.range", "11.12.4", MUST,
                  "VersionMax=0x10, VersionMin=0: the target picks version 0 "
                  "(VersionActive=0) and goes on")
def version_range(ctx: Context) -> str:
    resp = first_request(ctx, version_max=0x10, version_min=0)
    if resp is None:
        raise Failed("target closed the connection on a valid version range")
    if resp.status_class != 0:
        raise Failed(f"refused a range that contains version 0: {_status(resp.status)}",
                     describe(resp))
    if resp.version_active != 0:
        raise Failed(f"VersionActive {resp.version_active} (§11.13.4)", describe(resp))
    return "VersionActive 0"


@conformance_test("login.tsih.unknown", "11.13.5", MUST,
                  "a login with a fresh ISID and TSIH 0x4d2f (no such session): Login reject "
                  "0x020a (Session does not exist)")
def tsih_unknown(ctx: Context) -> str:
    status = login_status(ctx, isid=ctx.new_isid(), tsih=0x4D2F)
    if status is None:
        raise Failed("target closed the connection instead of answering 0x020a")
    if status != LoginStatus.SESSION_DOES_NOT_EXIST:
        raise Failed(f"answered {_status(status)}, not 0x020a Session does not exist")
    return "0x020a"


def _expect_refused(ctx: Context, resp_or_none: object, what: str) -> str:
    if resp_or_none is None:
        return "connection closed"
    assert isinstance(resp_or_none, LoginResponse)
    if resp_or_none.status_class == 2:
        return f"Login reject {_status(resp_or_none.status)}"
    raise Failed(f"{what} was answered with status {_status(resp_or_none.status)}; an "
                 "initiator error (class 2) or a dropped connection conforms",
                 describe(resp_or_none))


def _set(mask: int, value: int) -> Callable[[bytearray], None]:
    """A header edit: byte 1 (T, C, CSG, NSG) with ``mask`` bits set to ``value``."""
    def mutate(hdr: bytearray) -> None:
        hdr[1] = (hdr[1] & ~mask) | value
    return mutate


@conformance_test("login.flags.t_and_c", "11.12.2", MUST,
                  "a Login Request with both T and C set: Login reject (class 2) or the "
                  "connection closed")
def t_and_c(ctx: Context) -> str:
    hl = start(ctx)
    resp = hl.send([], transit=True, nsg=FFP, mutate=_set(0x40, 0x40))
    return _expect_refused(ctx, resp, "T=1 with C=1")


@conformance_test("login.stage.reserved_nsg", "11.12.3", MUST,
                  "T=1 with NSG=2 (reserved): Login reject (class 2) or the connection closed")
def reserved_nsg(ctx: Context) -> str:
    hl = start(ctx)
    resp = hl.send([], transit=True, nsg=FFP, mutate=_set(0x03, 0x02))
    return _expect_refused(ctx, resp, "NSG=2")


@conformance_test("login.stage.backward", "6.3", MUST,
                  "from the operational stage, T=1 with NSG=0 (back to security): Login "
                  "reject (class 2) or the connection closed")
def backward(ctx: Context) -> str:
    hl = start(ctx)
    resp = hl.send([], transit=True, nsg=FFP, csg=OP, mutate=_set(0x03, 0x00))
    return _expect_refused(ctx, resp, "a transition from stage 1 to stage 0")


@conformance_test("login.stage.csg_ffp", "11.12.3", MUST,
                  "a Login Request with CSG=3 (Full Feature Phase is not a login stage): "
                  "Login reject (class 2) or the connection closed")
def csg_ffp(ctx: Context) -> str:
    hl = start(ctx)
    resp = hl.send([], transit=False, mutate=_set(0x0C, 0x0C))
    return _expect_refused(ctx, resp, "CSG=3")


@conformance_test("login.stage.no_transit_unasked", "11.13.3", MUST,
                  "an operational-stage request with T=0: the response keeps T=0 (the target "
                  "may not move on unasked)")
def no_transit_unasked(ctx: Context) -> str:
    hl = start(ctx)
    resp = hl.send([("MaxOutstandingR2T", "1")], transit=False)
    if resp is None or resp.status_class != 0:
        raise TestError("target refused a plain operational-stage request")
    if resp.transit:
        raise Failed("target set T=1 although the request had T=0 (§11.13.3)", describe(resp))
    return "T=0 kept"


@conformance_test("login.name.target_unknown", "11.13.5", MUST,
                  "TargetName of a target that does not exist: Login reject 0x0203 (Not "
                  "found); 0x0202 is tolerated with a warning")
def target_unknown(ctx: Context) -> str:
    resp = first_request(ctx, first_keys(ctx, target="iqn.1999-01.invalid.conformance:nothing"))
    if resp is None:
        raise Failed("target closed the connection instead of answering 0x0203")
    if resp.status in (LoginStatus.NOT_FOUND, LoginStatus.TARGET_REMOVED):
        return _status(resp.status)
    if resp.status == LoginStatus.AUTHORIZATION_FAILURE:
        raise Warned("answered 0x0202 Authorization failure for a target that does not exist")
    raise Failed(f"answered {_status(resp.status)}, not 0x0203 Not found", describe(resp))


@conformance_test("login.name.initiator_missing", "13.5", MUST,
                  "a first Login Request without InitiatorName: Login reject 0x0207 (Missing "
                  "parameter); another class-2 status is a warning")
def initiator_missing(ctx: Context) -> str:
    resp = first_request(ctx, [("SessionType", "Normal"), ("TargetName", ctx.target)])
    if resp is None:
        raise Warned("connection closed instead of Login reject 0x0207")
    if resp.status == LoginStatus.MISSING_PARAMETER:
        return "0x0207"
    if resp.status_class == 2:
        raise Warned(f"answered {_status(resp.status)}, 0x0207 Missing parameter is exact")
    raise Failed(f"a login without InitiatorName got {_status(resp.status)}", describe(resp))


@conformance_test("login.auth.skip_security", "12", MUST,
                  "with CHAP required (credentials in the URL), a login that starts in the "
                  "operational stage: Login reject 0x0201 (Authentication failure) or class 2, "
                  "never Full Feature Phase", needs_chap=True)
def skip_security(ctx: Context) -> str:
    w = ctx.connect()
    resp = w.login_pdu(first_keys(ctx), isid=ctx.new_isid(), csg=OP, nsg=FFP, transit=True)
    if resp is None:
        return "connection closed"
    if resp.status_class == 0:
        raise Failed("target let an unauthenticated initiator skip the security stage although "
                     "it requires CHAP", describe(resp))
    if resp.status_class != 2:
        raise Failed(f"answered {_status(resp.status)}", describe(resp))
    return _status(resp.status)


@conformance_test("login.timeout.idle", "6.3", SHOULD,
                  "a login left unfinished (one operational-stage request, after CHAP if "
                  "the URL has credentials, then nothing): the target SHOULD drop it before "
                  "the test's time limit (a stalled login holds resources)")
def idle_login(ctx: Context) -> str:
    hl = start(ctx)
    if hl.stage == OP:
        resp = hl.send([], transit=False)
    else:
        resp = hl.responses[-1]
    if resp is None:
        raise TestError("target closed the connection at once")
    dropped, _ = hl.wire.drops_within(max(0.1, hl.wire.remaining() - 0.3))
    if not dropped:
        raise Warned(f"an idle login was still open after {ctx.config.timeout:g} s")
    return "dropped"


@conformance_test("login.conn.too_many", "11.13.5", MUST,
                  "with MaxConnections=1 agreed, a second connection joining the session "
                  "(same ISID and TSIH, CID 1): Login reject 0x0206 (Too many connections)")
def too_many(ctx: Context) -> str:
    w1 = ctx.session({"MaxConnections": "1"})
    assert w1.params is not None
    if w1.params.max_connections != 1:
        raise NotSupported(f"target agreed MaxConnections={w1.params.max_connections}")
    status = login_status(ctx, isid=w1.isid, tsih=w1.tsih, cid=1)
    if status is None:
        raise Warned("connection closed instead of Login reject 0x0206")
    if status == LoginStatus.TOO_MANY_CONNECTIONS:
        return "0x0206"
    if status >> 8 == 2:
        raise Warned(f"answered {_status(status)}; 0x0206 Too many connections is exact")
    raise Failed(f"a connection beyond MaxConnections=1 got {_status(status)}")


@conformance_test("login.session.reinstatement", "6.3.5", MUST,
                  "log in, then log in again with the same ISID and TSIH 0: the new login "
                  "succeeds and the target closes the old session's connection")
def reinstatement(ctx: Context) -> str:
    old = ctx.session()
    ctx.ping(old)
    new = ctx.session(isid=old.isid)
    ctx.ping(new)
    closed, _ = old.drops_within(max(0.2, old.remaining() - 0.5))
    if not closed:
        if ctx.alive(old):
            raise Failed("the old session still answers after it was reinstated (§6.3.5: "
                         "the target MUST close the old session's connections)")
    return "old connection closed"
