"""The login state machines, initiator <-> target in memory (RFC 7143 §6.3, §11.12-13).

Every PDU is encoded to bytes and decoded again between the two sides, so
the matrix also exercises the Login PDU codec.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi.chap import (
    ChapAlgorithm,
    ChapCredentials,
    chap_response,
    decode_binary,
    encode_binary,
)
from iscsi.constants import LoginStatus, Stage
from iscsi.errors import (
    AuthenticationError,
    LoginError,
    NegotiationError,
    ProtocolError,
)
from iscsi.login import (
    ChapAuth,
    InitiatorLogin,
    LoginRedirect,
    LoginRejected,
    SimpleLoginPolicy,
    TargetAuth,
    TargetEntry,
    TargetLogin,
)
from iscsi.framing import decode_pdu
from iscsi.pdu import LoginRequest, LoginResponse
from iscsi.text import decode_text, encode_text

INI = "iqn.2024-01.org.example:client"
TGT = "iqn.2024-01.org.example:disk1"
ISID = 0x23D000000001
SEC, OP, FFP = (Stage.SECURITY_NEGOTIATION, Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                Stage.FULL_FEATURE_PHASE)

USER = ChapCredentials("alice", b"alice-secret-1234")
TUSER = ChapCredentials("disk1", b"target-secret-5678")


def rng_from(seed: int) -> Callable[[int], bytes]:
    counter = itertools.count(seed)

    def rng(n: int) -> bytes:
        out, state = b"", next(counter).to_bytes(8, "big")
        while len(out) < n:
            state = hashlib.sha256(state).digest()
            out += state
        return out[:n]

    return rng


def wire_req(req: LoginRequest) -> LoginRequest:
    out = decode_pdu(req.to_bytes())
    assert isinstance(out, LoginRequest)
    return out


def wire_resp(resp: LoginResponse) -> LoginResponse:
    out = decode_pdu(resp.to_bytes())
    assert isinstance(out, LoginResponse)
    return out


@dataclass
class Trace:
    requests: list[LoginRequest] = field(default_factory=list)
    responses: list[LoginResponse] = field(default_factory=list)


def pump(ini: InitiatorLogin, tgt: TargetLogin) -> Trace:
    """Run a whole login; exceptions from the initiator propagate."""
    trace = Trace()
    req: LoginRequest | None = ini.start()
    while req is not None:
        req = wire_req(req)
        trace.requests.append(req)
        resp = wire_resp(tgt.receive(req))
        trace.responses.append(resp)
        req = ini.receive(resp)
    return trace


def policy(**entry: Any) -> SimpleLoginPolicy:
    return SimpleLoginPolicy(targets={TGT: TargetEntry(TGT, **entry)})


def make(pol: SimpleLoginPolicy, *, target_name: str | None = TGT, **kw: Any
         ) -> tuple[InitiatorLogin, TargetLogin]:
    ini = InitiatorLogin(INI, target_name, ISID, rng=rng_from(1000), **kw)
    tgt = TargetLogin(pol, 7, initial_statsn=0x1234, rng=rng_from(0))
    return ini, tgt


def rejected(pol: SimpleLoginPolicy, status: LoginStatus, **kw: Any) -> TargetLogin:
    ini, tgt = make(pol, **kw)
    with pytest.raises(LoginRejected) as info:
        pump(ini, tgt)
    assert info.value.login_status == status
    assert (info.value.status_class, info.value.status_detail) == (
        status.status_class, status.status_detail)
    assert tgt.failed_status == status
    assert not tgt.complete and not ini.complete
    return tgt


# ---------------------------------------------------------------- success


@pytest.mark.parametrize("security_stage", [False, True])
def test_no_auth_login(security_stage: bool) -> None:
    ini, tgt = make(policy(alias="Disk One"), security_stage=security_stage)
    trace = pump(ini, tgt)
    assert ini.complete and tgt.complete
    assert trace.requests[0].csg == (SEC if security_stage else OP)
    assert len(trace.requests) == (2 if security_stage else 1)
    p = ini.params
    assert p.target_alias == "Disk One" and p.target_portal_group_tag == 7
    assert p.target_name == TGT and p.initiator_name == INI
    assert tgt.params.initiator_name == INI
    assert tgt.initiator_name == INI and tgt.target_name == TGT
    assert "max_burst_length=" in str(p)


def test_sequence_numbers_and_tsih() -> None:
    ini, tgt = make(policy(auth=TargetAuth(USER)), auth=ChapAuth("alice", USER.secret),
                    cmdsn=77)
    trace = pump(ini, tgt)
    n = len(trace.responses)
    assert [r.statsn for r in trace.responses] == list(range(0x1234, 0x1234 + n))
    assert all(r.expcmdsn == 77 and r.maxcmdsn == 77 + 31 for r in trace.responses)
    assert all(r.cmdsn == 77 for r in trace.requests)
    # ExpStatSN acknowledges the previous response.
    assert [q.expstatsn for q in trace.requests[1:]] == [
        r.statsn + 1 for r in trace.responses[:-1]]
    # TSIH: zero until the final response (§11.13.4), then assigned.
    assert all(r.tsih == 0 for r in trace.responses[:-1])
    assert trace.responses[-1].tsih == ini.tsih == tgt.tsih == 1
    assert tgt.next_statsn == 0x1234 + n
    assert ini.statsn == 0x1234 + n - 1
    assert (ini.expcmdsn, ini.maxcmdsn) == (77, 108)
    assert trace.responses[-1].transit and trace.responses[-1].nsg == FFP


@pytest.mark.parametrize("alg", list(ChapAlgorithm))
@pytest.mark.parametrize("encoding", ["hex", "base64"])
@pytest.mark.parametrize("mutual", [False, True])
def test_chap_matrix(alg: ChapAlgorithm, encoding: str, mutual: bool) -> None:
    pol = policy(auth=TargetAuth(USER, TUSER, encoding=encoding))
    auth = ChapAuth("alice", USER.secret, "disk1" if mutual else None,
                    TUSER.secret if mutual else None, algorithms=[alg], encoding=encoding)
    ini, tgt = make(pol, auth=auth)
    trace = pump(ini, tgt)
    assert ini.complete and tgt.complete
    sent = b"".join(bytes(r.data) for r in trace.responses)
    prefix = b"0x" if encoding == "hex" else b"0b"
    assert b"CHAP_C=" + prefix in sent
    assert (b"CHAP_R=" + prefix in sent) is mutual
    assert f"CHAP_A={int(alg)}".encode() in sent


def test_target_chap_optional_accepts_none() -> None:
    pol = policy(auth=TargetAuth(USER, required=False))
    ini, tgt = make(pol, security_stage=True)
    pump(ini, tgt)
    assert tgt.complete


def test_discovery_session() -> None:
    pol = policy()
    ini, tgt = make(pol, target_name=None)
    trace = pump(ini, tgt)
    assert ini.params.discovery and tgt.params.discovery
    text = dict(decode_text(trace.requests[0].data))
    assert text["SessionType"] == "Discovery" and "TargetName" not in text
    # Discovery-irrelevant keys are not offered at all.
    assert "MaxBurstLength" not in text and "InitialR2T" not in text
    assert tgt.target is None


def test_discovery_with_chap() -> None:
    pol = SimpleLoginPolicy(discovery_authentication=TargetAuth(USER))
    ini, tgt = make(pol, target_name=None, auth=ChapAuth("alice", USER.secret))
    pump(ini, tgt)
    assert tgt.complete and tgt.session_type == "Discovery"


def digest_result(offer: str, allowed: str) -> str | None:
    for value in offer.split(","):
        if value in allowed.split(","):
            return value
    return None


DIGESTS = ["CRC32C,None", "None,CRC32C", "None", "CRC32C"]


@pytest.mark.parametrize("offer", DIGESTS)
@pytest.mark.parametrize("allowed", DIGESTS)
def test_digest_matrix(offer: str, allowed: str) -> None:
    pol = policy(offers={"HeaderDigest": allowed, "DataDigest": allowed})
    ini, tgt = make(pol, offers={"HeaderDigest": offer, "DataDigest": offer})
    expected = digest_result(offer, allowed)
    if expected is None and "None" in allowed:
        # The target answers Reject (the default None suits it); the
        # initiator, which insisted on CRC32C, gives up and drops (§6.2).
        with pytest.raises(NegotiationError, match="not acceptable"):
            pump(ini, tgt)
        assert not ini.complete
        return
    if expected is None:
        # The target insists on CRC32C and the initiator offered only None.
        with pytest.raises(LoginRejected) as info:
            pump(ini, tgt)
        assert info.value.login_status == LoginStatus.INITIATOR_ERROR
        return
    pump(ini, tgt)
    want = expected == "CRC32C"
    assert ini.params.header_digest is want and ini.params.data_digest is want
    assert tgt.params.header_digest is want and tgt.params.data_digest is want


@pytest.mark.parametrize("allowed, want", [("CRC32C", True), ("None,CRC32C", False)])
def test_target_offers_required_digest_when_initiator_silent(allowed: str, want: bool) -> None:
    pol = policy(offers={"HeaderDigest": allowed})
    ini, tgt = make(pol, offers={"HeaderDigest": None})
    trace = pump(ini, tgt)
    assert ini.params.header_digest is want and tgt.params.header_digest is want
    if want:
        # The target held T=0 and offered the key; the initiator answered.
        assert any(("HeaderDigest", "CRC32C") in decode_text(r.data) for r in trace.responses)
        assert any(("HeaderDigest", "CRC32C") in decode_text(q.data) for q in trace.requests)


def test_target_lowers_nsg_to_offer_from_security_stage() -> None:
    pol = policy(offers={"DataDigest": "CRC32C"})
    ini = InitiatorLogin(INI, TGT, ISID, security_stage=True, offers={"DataDigest": None})
    tgt = TargetLogin(pol, 1)
    # The initiator wants to go straight to FFP from security.
    first = ini.start()
    direct = LoginRequest(transit=True, csg=SEC, nsg=FFP, isid=ISID, itt=first.itt,
                          data=first.data)
    resp = tgt.receive(direct)
    assert resp.status == 0 and resp.transit and resp.nsg == OP


def test_operational_limits_and_mrdsl_per_direction() -> None:
    pol = policy(offers={"MaxRecvDataSegmentLength": "65536", "MaxBurstLength": "131072",
                         "FirstBurstLength": "16384", "InitialR2T": "Yes",
                         "MaxOutstandingR2T": "4", "DefaultTime2Wait": "5"})
    ini, tgt = make(pol, offers={"MaxRecvDataSegmentLength": "32768",
                                 "MaxOutstandingR2T": "8"})
    pump(ini, tgt)
    pi, pt = ini.params, tgt.params
    assert (pi.max_recv_data_segment_length, pi.max_xmit_data_segment_length) == (32768, 65536)
    assert (pt.max_recv_data_segment_length, pt.max_xmit_data_segment_length) == (65536, 32768)
    for p in (pi, pt):
        assert p.max_burst_length == 131072 and p.first_burst_length == 16384
        assert p.initial_r2t and p.immediate_data
        assert p.max_outstanding_r2t == 4 and p.default_time2wait == 5


def test_initiator_text_continuation() -> None:
    ini, tgt = make(policy(), max_segment=64, initiator_alias="a" * 200)
    trace = pump(ini, tgt)
    conts = [q for q in trace.requests if q.cont]
    assert len(conts) >= 3
    assert all(len(q.data) <= 64 for q in trace.requests)
    # Each partial request was acknowledged by an empty response.
    for q, r in zip(trace.requests, trace.responses):
        if q.cont:
            assert r.data == b"" and not r.transit and not r.cont
    assert tgt.params.initiator_alias == "a" * 200
    assert ini.complete and tgt.complete


def test_target_text_continuation() -> None:
    pol = policy(alias="b" * 250, offers={"MaxRecvDataSegmentLength": "65536"})
    ini = InitiatorLogin(INI, TGT, ISID)
    tgt = TargetLogin(pol, 3, max_segment=48)
    trace = pump(ini, tgt)
    conts = [r for r in trace.responses if r.cont]
    assert len(conts) >= 5
    assert all(len(r.data) <= 48 for r in trace.responses)
    for r, q in zip(trace.responses, trace.requests[1:]):
        if r.cont:
            assert q.data == b"" and not q.transit and not q.cont
    assert trace.responses[-1].transit and not trace.responses[-1].cont
    assert ini.params.target_alias == "b" * 250
    assert ini.params.max_xmit_data_segment_length == 65536


def test_non_leading_login_joins_session() -> None:
    pol = policy()
    ini, tgt = make(pol)
    pump(ini, tgt)
    ini2 = InitiatorLogin(INI, TGT, ISID, tsih=ini.tsih, cid=1)
    tgt2 = TargetLogin(pol, 7)
    trace = pump(ini2, tgt2)
    assert tgt2.complete and not tgt2.leading and tgt2.tsih == ini.tsih
    sent = dict(decode_text(b"".join(bytes(q.data) for q in trace.requests)))
    assert "MaxBurstLength" not in sent and "SessionType" not in sent
    assert sent["HeaderDigest"] == "None"


# --------------------------------------------------------------- failures


def test_wrong_secret_is_authentication_failure() -> None:
    pol = policy(auth=TargetAuth(USER))
    rejected(pol, LoginStatus.AUTHENTICATION_FAILURE,
             auth=ChapAuth("alice", b"not-alice-secret"))


def test_auth_required_but_initiator_has_none() -> None:
    pol = policy(auth=TargetAuth(USER))
    rejected(pol, LoginStatus.AUTHENTICATION_FAILURE)  # starts in operational stage
    rejected(pol, LoginStatus.AUTHENTICATION_FAILURE, security_stage=True)


def test_initiator_wants_chap_target_has_none() -> None:
    rejected(policy(), LoginStatus.AUTHENTICATION_FAILURE, auth=ChapAuth("alice", USER.secret))


def test_mutual_chap_impostor_target() -> None:
    pol = policy(auth=TargetAuth(USER, ChapCredentials("disk1", b"impostor-secret!")))
    ini, tgt = make(pol, auth=ChapAuth("alice", USER.secret, "disk1", TUSER.secret))
    with pytest.raises(AuthenticationError, match="target failed"):
        pump(ini, tgt)
    assert not ini.complete


def test_target_requires_mutual() -> None:
    pol = policy(auth=TargetAuth(USER, TUSER, require_mutual=True))
    rejected(pol, LoginStatus.AUTHENTICATION_FAILURE, auth=ChapAuth("alice", USER.secret))


def _fresh_target(pol: SimpleLoginPolicy) -> TargetLogin:
    return TargetLogin(pol, 1, rng=rng_from(5))


def _req(pairs: list[tuple[str, str]], *, csg: Stage = SEC, nsg: Stage = OP,
         transit: bool = False, **kw: Any) -> LoginRequest:
    return LoginRequest(transit=transit, csg=csg, nsg=nsg if transit else SEC, isid=ISID,
                        itt=1, data=encode_text(pairs), **kw)


def test_reflection_refused_at_login() -> None:
    pol = policy(auth=TargetAuth(USER, TUSER))
    tgt = _fresh_target(pol)
    r = tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT), ("AuthMethod", "CHAP")]))
    assert r.status == 0
    r = tgt.receive(_req([("CHAP_A", "5")]))
    keys = dict(decode_text(r.data))
    challenge = decode_binary(keys["CHAP_C"])
    proof = chap_response(ChapAlgorithm.MD5, int(keys["CHAP_I"]), USER.key, challenge)
    r = tgt.receive(_req([("CHAP_N", "alice"), ("CHAP_R", encode_binary(proof)),
                          ("CHAP_I", keys["CHAP_I"]), ("CHAP_C", keys["CHAP_C"])],
                         transit=True))
    assert r.status == LoginStatus.AUTHENTICATION_FAILURE
    assert not r.transit and r.data == b""


def test_unknown_extension_key_not_understood() -> None:
    tgt = _fresh_target(policy())
    r = tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT),
                          ("X-com.example.Magic", "1"), ("X#vendor", "on"),
                          ("IFMarker", "Yes"), ("MaxBurstLength", "100"),
                          ("DefaultTime2Wait", "99999"), ("ErrorRecoveryLevel", "0x1")],
                         csg=OP, nsg=FFP, transit=True))
    assert r.status == 0 and r.transit
    answers = dict(decode_text(r.data))
    assert answers["X-com.example.Magic"] == "NotUnderstood"
    assert answers["X#vendor"] == "NotUnderstood"
    assert answers["IFMarker"] == "Reject"
    assert answers["MaxBurstLength"] == "Reject"  # below 512
    assert answers["DefaultTime2Wait"] == "Reject"  # above 3600
    assert answers["ErrorRecoveryLevel"] == "1"  # hex numbers are numbers
    assert tgt.complete and tgt.params.max_burst_length == 262144


def test_missing_initiator_name() -> None:
    tgt = _fresh_target(policy())
    r = tgt.receive(_req([("TargetName", TGT)]))
    assert r.status == LoginStatus.MISSING_PARAMETER
    assert r.status == 0x0207
    assert tgt.failed_status == LoginStatus.MISSING_PARAMETER


def test_missing_target_name_on_normal_session() -> None:
    tgt = _fresh_target(policy())
    r = tgt.receive(_req([("InitiatorName", INI), ("SessionType", "Normal")]))
    assert r.status == LoginStatus.MISSING_PARAMETER


def test_unknown_target() -> None:
    rejected(policy(), LoginStatus.NOT_FOUND, target_name="iqn.2024-01.org.example:nope")


def test_initiator_not_in_acl() -> None:
    pol = policy(allowed_initiators=frozenset({"iqn.2024-01.org.example:other"}))
    rejected(pol, LoginStatus.AUTHORIZATION_FAILURE)
    pol = policy(allowed_initiators=frozenset({INI}))
    ini, tgt = make(pol)
    pump(ini, tgt)
    assert tgt.complete


@pytest.mark.parametrize("vmin, vmax", [(1, 2), (2, 1), (5, 9)])
def test_unsupported_version(vmin: int, vmax: int) -> None:
    tgt = _fresh_target(policy())
    r = tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT)], version_min=vmin,
                         version_max=vmax))
    assert r.status == LoginStatus.UNSUPPORTED_VERSION
    assert r.status == 0x0205
    with pytest.raises(LoginRejected) as info:
        InitiatorLogin(INI, TGT, ISID).receive(r)
    assert info.value.login_status == LoginStatus.UNSUPPORTED_VERSION


def test_discovery_disabled() -> None:
    pol = SimpleLoginPolicy(discovery=False)
    rejected(pol, LoginStatus.SESSION_TYPE_NOT_SUPPORTED, target_name=None)


def test_bad_session_type() -> None:
    tgt = _fresh_target(policy())
    r = tgt.receive(_req([("InitiatorName", INI), ("SessionType", "Boot")]))
    assert r.status == LoginStatus.SESSION_TYPE_NOT_SUPPORTED


def test_session_does_not_exist() -> None:
    rejected(policy(), LoginStatus.SESSION_DOES_NOT_EXIST, tsih=42)


def test_non_leading_login_for_another_target_is_refused() -> None:
    """A connection naming a session's ISID and TSIH but a different target
    (one with no CHAP) must not join it (RFC 7143 §6.3.5)."""
    other = "iqn.2026-11.org.example:open"
    pol = SimpleLoginPolicy(targets={TGT: TargetEntry(TGT, auth=TargetAuth(USER)),
                                     other: TargetEntry(other)})
    ini, tgt = make(pol, auth=ChapAuth("alice", b"alice-secret-1234"))
    pump(ini, tgt)
    assert tgt.complete
    ini2 = InitiatorLogin(INI, other, ISID, tsih=ini.tsih, cid=1)
    tgt2 = TargetLogin(pol, 7)
    with pytest.raises(LoginRejected) as info:
        pump(ini2, tgt2)
    assert info.value.login_status == LoginStatus.SESSION_DOES_NOT_EXIST
    assert not tgt2.complete


def test_leading_only_key_on_non_leading_login() -> None:
    pol = policy()
    pol.sessions[(ISID, 9)] = (INI, TGT)
    tgt = _fresh_target(pol)
    r = tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT),
                          ("MaxBurstLength", "65536")], csg=OP, nsg=FFP, transit=True,
                         tsih=9))
    assert r.status == LoginStatus.INITIATOR_ERROR


class Exploding(SimpleLoginPolicy):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def find_target(self, name: str) -> TargetEntry | None:
        raise self.exc


@pytest.mark.parametrize(
    "exc, status",
    [
        (RuntimeError("disk on fire"), LoginStatus.TARGET_ERROR),
        (LoginError("busy", LoginStatus.SERVICE_UNAVAILABLE), LoginStatus.SERVICE_UNAVAILABLE),
        (LoginError("gone", LoginStatus.TARGET_REMOVED), LoginStatus.TARGET_REMOVED),
        (LoginError("full", LoginStatus.OUT_OF_RESOURCES), LoginStatus.OUT_OF_RESOURCES),
    ],
)
def test_policy_failures(exc: Exception, status: LoginStatus) -> None:
    rejected(Exploding(exc), status)


def test_too_many_connections_from_policy() -> None:
    class Full(SimpleLoginPolicy):
        def session_exists(self, isid: int, tsih: int, initiator_name: str,
                           target_name: str | None) -> bool:
            raise LoginError("session full", LoginStatus.TOO_MANY_CONNECTIONS)

    rejected(Full(targets={TGT: TargetEntry(TGT)}), LoginStatus.TOO_MANY_CONNECTIONS, tsih=3)


def test_redirect() -> None:
    rejected_tgt = rejected(Exploding(LoginRedirect("192.0.2.9:3260,1")),
                            LoginStatus.TARGET_MOVED_TEMPORARILY)
    assert rejected_tgt.failed_status == LoginStatus.TARGET_MOVED_TEMPORARILY
    ini, tgt = make(Exploding(LoginRedirect("192.0.2.9:3260,1", permanent=True)))
    with pytest.raises(LoginRejected) as info:
        pump(ini, tgt)
    assert info.value.target_address == "192.0.2.9:3260,1"
    assert info.value.login_status == LoginStatus.TARGET_MOVED_PERMANENTLY


@pytest.mark.parametrize(
    "csg, nsg, transit",
    [
        (OP, SEC, True),  # backwards
        (OP, OP, True),  # NSG must be beyond CSG
    ],
)
def test_invalid_stage_transition(csg: Stage, nsg: Stage, transit: bool) -> None:
    tgt = _fresh_target(policy())
    req = LoginRequest(transit=transit, csg=csg, nsg=nsg, isid=ISID, itt=1,
                       data=encode_text([("InitiatorName", INI), ("TargetName", TGT)]))
    r = tgt.receive(req)
    assert r.status == LoginStatus.INVALID_DURING_LOGIN
    assert r.status == 0x020B


def test_wrong_stage_after_start() -> None:
    tgt = _fresh_target(policy(auth=TargetAuth(USER)))
    r = tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT), ("AuthMethod", "CHAP")]))
    assert r.status == 0
    # Claims the operational stage while the target is still in security.
    r = tgt.receive(_req([], csg=OP, nsg=FFP, transit=True))
    assert r.status == LoginStatus.INVALID_DURING_LOGIN
    # And after a failure every further request is refused.
    assert tgt.receive(_req([])).status == LoginStatus.INVALID_DURING_LOGIN


def test_isid_change_during_login() -> None:
    tgt = _fresh_target(policy(auth=TargetAuth(USER)))
    tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT), ("AuthMethod", "CHAP")]))
    bad = LoginRequest(csg=SEC, nsg=SEC, isid=ISID + 1, itt=1, data=encode_text([("CHAP_A", "5")]))
    assert tgt.receive(bad).status == LoginStatus.INITIATOR_ERROR


def test_key_repeated_across_login_pdus() -> None:
    tgt = _fresh_target(policy(auth=TargetAuth(USER)))
    tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT), ("AuthMethod", "CHAP")]))
    r = tgt.receive(_req([("AuthMethod", "CHAP")]))
    assert r.status == LoginStatus.INITIATOR_ERROR


def test_malformed_text_is_initiator_error() -> None:
    tgt = _fresh_target(policy())
    req = LoginRequest(csg=SEC, nsg=SEC, isid=ISID, itt=1, data=b"InitiatorName")
    assert tgt.receive(req).status == LoginStatus.INITIATOR_ERROR


def test_oversized_continued_text_is_refused() -> None:
    tgt = _fresh_target(policy())
    chunk = b"X-pad=" + b"p" * 8000
    status = 0
    for _ in range(10):
        r = tgt.receive(LoginRequest(cont=True, csg=SEC, nsg=SEC, isid=ISID, itt=1, data=chunk))
        status = r.status
        if status:
            break
    assert status == LoginStatus.INITIATOR_ERROR


def test_initiator_rejects_unasked_transit() -> None:
    ini = InitiatorLogin(INI, TGT, ISID, auth=ChapAuth("alice", USER.secret))
    req = ini.start()
    assert not req.transit
    resp = LoginResponse(transit=True, csg=SEC, nsg=OP, isid=ISID, itt=req.itt,
                         data=encode_text([("AuthMethod", "CHAP")]))
    with pytest.raises(LoginError, match="without the initiator asking"):
        ini.receive(resp)


def test_initiator_rejects_missing_tsih() -> None:
    ini = InitiatorLogin(INI, TGT, ISID)
    req = ini.start()
    assert req.transit and req.csg == OP and req.nsg == FFP
    resp = LoginResponse(transit=True, csg=OP, nsg=FFP, isid=ISID, itt=req.itt, tsih=0)
    with pytest.raises(LoginError, match="TSIH"):
        ini.receive(resp)


def test_params_before_completion() -> None:
    ini = InitiatorLogin(INI, TGT, ISID)
    with pytest.raises(RuntimeError):
        _ = ini.params
    with pytest.raises(ValueError):
        InitiatorLogin("", TGT, ISID)


def test_libiscsi_style_chap_login() -> None:
    """The sequence libiscsi sends: T=1 on the AuthMethod offer, MD5 only,
    hex values, and the declarations repeated in the operational stage."""
    pol = policy(auth=TargetAuth(USER, TUSER))
    tgt = _fresh_target(pol)
    ident = [("InitiatorName", INI), ("TargetName", TGT), ("SessionType", "Normal")]
    r = tgt.receive(_req(ident + [("AuthMethod", "CHAP,None")], transit=True))
    assert r.status == 0 and not r.transit  # CHAP still to do
    assert ("AuthMethod", "CHAP") in decode_text(r.data)
    r = tgt.receive(_req([("CHAP_A", "5")]))
    keys = dict(decode_text(r.data))
    assert keys["CHAP_A"] == "5" and keys["CHAP_C"].startswith("0x")
    proof = chap_response(ChapAlgorithm.MD5, int(keys["CHAP_I"]), USER.key,
                          decode_binary(keys["CHAP_C"]))
    mine = bytes(range(32))
    r = tgt.receive(_req([("CHAP_N", "alice"), ("CHAP_R", "0x" + proof.hex().upper()),
                          ("CHAP_I", "1"), ("CHAP_C", "0x" + mine.hex())], transit=True))
    assert r.status == 0 and r.transit and r.nsg == OP
    back = dict(decode_text(r.data))
    assert back["CHAP_N"] == "disk1"
    assert decode_binary(back["CHAP_R"]) == chap_response(ChapAlgorithm.MD5, 1, TUSER.key, mine)
    ops = ident + [("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"),
                   ("InitialR2T", "Yes"), ("ImmediateData", "Yes"),
                   ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"),
                   ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
                   ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"),
                   ("IFMarker", "No"), ("OFMarker", "No"), ("MaxConnections", "1"),
                   ("MaxRecvDataSegmentLength", "262144"), ("DataPDUInOrder", "Yes"),
                   ("DataSequenceInOrder", "Yes")]
    r = tgt.receive(_req(ops, csg=OP, nsg=FFP, transit=True))
    assert r.status == 0 and r.transit and r.nsg == FFP and r.tsih != 0
    answers = dict(decode_text(r.data))
    assert answers["IFMarker"] == "Reject" and answers["HeaderDigest"] == "None"
    assert "InitiatorName" not in answers
    assert tgt.complete and tgt.params.default_time2retain == 0


def test_redeclaring_a_different_name_is_an_error() -> None:
    tgt = _fresh_target(policy(auth=TargetAuth(USER, required=False)))
    r = tgt.receive(_req([("InitiatorName", INI), ("TargetName", TGT),
                          ("AuthMethod", "None")], transit=True))
    assert r.status == 0 and r.transit
    r = tgt.receive(_req([("InitiatorName", "iqn.2024-01.org.example:evil")], csg=OP,
                         nsg=FFP, transit=True))
    assert r.status == LoginStatus.INITIATOR_ERROR


_pairs = st.lists(
    st.tuples(st.sampled_from(["InitiatorName", "TargetName", "SessionType", "AuthMethod",
                               "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C",
                               "HeaderDigest", "MaxBurstLength", "FirstBurstLength",
                               "InitialR2T", "ImmediateData", "MaxRecvDataSegmentLength",
                               "X-foo", "OFMarker", "SendTargets", "TargetAlias"]),
              st.sampled_from(["", "0", "1", "5", "Yes", "No", "None", "CHAP", "CHAP,None",
                               "Discovery", "Normal", TGT, INI, "0x00", "0b", "512",
                               "99999999", "Reject", "CRC32C,None"])),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_pairs, st.booleans(), st.booleans(),
                          st.sampled_from([0, 1, 3]), st.sampled_from([0, 1, 3])),
                min_size=1, max_size=5),
       st.booleans())
def test_target_always_answers(steps: list[tuple[list[tuple[str, str]], bool, bool, int, int]],
                               with_auth: bool) -> None:
    """Whatever the initiator sends, the target answers with a Login
    Response (success or a status), never an exception."""
    pol = policy(auth=TargetAuth(USER) if with_auth else None)
    tgt = _fresh_target(pol)
    for pairs, transit, cont, csg, nsg in steps:
        req = LoginRequest(transit=transit, cont=cont, csg=csg, nsg=nsg, isid=ISID, itt=1,
                           data=encode_text(pairs))
        resp = tgt.receive(req)
        assert isinstance(resp, LoginResponse)
        if resp.status:
            assert tgt.failed_status is not None and resp.status == tgt.failed_status
            assert not resp.transit and resp.data == b""


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.booleans(), st.sampled_from([0, 1, 3]),
       st.integers(0, 0x0305))
def test_initiator_raises_only_protocol_errors(data: bytes, transit: bool, cont: bool,
                                               nsg: int, status: int) -> None:
    ini = InitiatorLogin(INI, TGT, ISID, auth=ChapAuth("alice", USER.secret))
    req = ini.start()
    resp = LoginResponse(transit=transit, cont=cont, csg=req.csg, nsg=nsg, isid=ISID,
                         itt=req.itt, tsih=1, status_class=status >> 8,
                         status_detail=status & 0xFF, data=data)
    try:
        out = ini.receive(resp)
    except ProtocolError:
        return
    assert out is None or isinstance(out, LoginRequest)


# ------------------------------------------------------------- login timeout


def test_login_timeout_by_time_passed_in() -> None:
    """The login's deadline is data: the owner asks get_timer() and passes
    the time to handle_timer(); no clock is read."""
    pol = policy()
    stalled = TargetLogin(pol, 1, now=100.0, timeout=15.0)
    assert stalled.get_timer() == 115.0
    assert not stalled.handle_timer(114.999)
    assert stalled.handle_timer(115.0)
    # A login that completes no longer times out.
    ini = InitiatorLogin(INI, TGT, ISID, rng=rng_from(1000))
    done = TargetLogin(pol, 7, rng=rng_from(0), now=100.0, timeout=15.0)
    pump(ini, done)
    assert done.complete and done.get_timer() is None and not done.handle_timer(1e9)
    # Nor does one that failed (its reject ends the connection anyway).
    failed = TargetLogin(policy(allowed_initiators=frozenset({"iqn.2000-01.x:other"})), 7,
                         now=0.0, timeout=1.0)
    with pytest.raises(LoginRejected):
        pump(InitiatorLogin(INI, TGT, ISID, rng=rng_from(1)), failed)
    assert failed.failed_status is not None and failed.get_timer() is None
    # Without a timeout there is no deadline at all.
    assert TargetLogin(pol, 1).get_timer() is None


@pytest.mark.parametrize("bad", ["not a name", "iqn.bad", "eui.12", "iqn.2024-01.org.example:a b"])
def test_target_refuses_invalid_initiator_name(bad: str) -> None:
    """RFC 3720 §3.2.6: the name ACLs and reservations key on must be a
    real iSCSI name; anything else is an initiator error (0x0200)."""
    pol = policy()
    tgt = TargetLogin(pol, 1)
    good = InitiatorLogin(INI, TGT, ISID)
    req = good.start()
    # Swap the InitiatorName in the first request's text for the bad one.
    pairs = [(k, bad if k == "InitiatorName" else v) for k, v in decode_text(req.data)]
    forged = LoginRequest(transit=req.transit, csg=req.csg, nsg=req.nsg, isid=req.isid,
                          itt=req.itt, cmdsn=req.cmdsn, data=encode_text(pairs))
    resp = tgt.receive(forged)
    assert (resp.status_class, resp.status_detail) == (2, 0)
    assert tgt.failed_status is not None
