"""Tests of the key table and the table-driven negotiator (RFC 7143 §6.2, §13)."""

from __future__ import annotations

import dataclasses

import pytest

from iscsi.constants import LoginStatus, Stage
from iscsi.errors import NegotiationError
from iscsi.keys import (
    KEYS,
    KeyKind,
    NegotiatedParams,
    Negotiator,
    Result,
    Role,
    Scope,
    Sender,
    is_auth_key,
    parse_number,
)

OP = Stage.LOGIN_OPERATIONAL_NEGOTIATION
SEC = Stage.SECURITY_NEGOTIATION
FFP = Stage.FULL_FEATURE_PHASE


def target(local: dict[str, str] | None = None, leading: bool = True) -> Negotiator:
    return Negotiator(Role.TARGET, local, leading=leading)


def initiator(local: dict[str, str] | None = None, leading: bool = True) -> Negotiator:
    return Negotiator(Role.INITIATOR, local, leading=leading)


# ------------------------------------------------------------------ the table


def test_table_has_every_rfc_key() -> None:
    names = {
        "HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName",
        "InitiatorName", "TargetAlias", "InitiatorAlias", "TargetAddress",
        "TargetPortalGroupTag", "InitialR2T", "ImmediateData", "MaxRecvDataSegmentLength",
        "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
        "SessionType", "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R",
        "iSCSIProtocolLevel", "TaskReporting", "OFMarker", "IFMarker", "OFMarkInt", "IFMarkInt",
    }
    assert names <= set(KEYS)


@pytest.mark.parametrize(
    "name, kind, result, default",
    [
        ("HeaderDigest", KeyKind.LIST, Result.SELECT, "None"),
        ("MaxConnections", KeyKind.NUMERIC, Result.MIN, "1"),
        ("InitialR2T", KeyKind.BOOLEAN, Result.OR, "Yes"),
        ("ImmediateData", KeyKind.BOOLEAN, Result.AND, "Yes"),
        ("MaxRecvDataSegmentLength", KeyKind.DECLARATIVE, Result.NONE, "8192"),
        ("MaxBurstLength", KeyKind.NUMERIC, Result.MIN, "262144"),
        ("FirstBurstLength", KeyKind.NUMERIC, Result.MIN, "65536"),
        ("DefaultTime2Wait", KeyKind.NUMERIC, Result.MAX, "2"),
        ("DefaultTime2Retain", KeyKind.NUMERIC, Result.MIN, "20"),
        ("MaxOutstandingR2T", KeyKind.NUMERIC, Result.MIN, "1"),
        ("DataPDUInOrder", KeyKind.BOOLEAN, Result.OR, "Yes"),
        ("DataSequenceInOrder", KeyKind.BOOLEAN, Result.OR, "Yes"),
        ("ErrorRecoveryLevel", KeyKind.NUMERIC, Result.MIN, "0"),
        ("SessionType", KeyKind.DECLARATIVE, Result.NONE, "Normal"),
        ("AuthMethod", KeyKind.LIST, Result.SELECT, "None"),
        ("iSCSIProtocolLevel", KeyKind.NUMERIC, Result.MIN, "1"),
        ("TaskReporting", KeyKind.LIST, Result.SELECT, "RFC3720"),
    ],
)
def test_table_rows(name: str, kind: KeyKind, result: Result, default: str) -> None:
    spec = KEYS[name]
    assert (spec.kind, spec.result, spec.default) == (kind, result, default)


def test_table_properties() -> None:
    assert KEYS["MaxRecvDataSegmentLength"].scope is Scope.CONNECTION
    assert KEYS["HeaderDigest"].scope is Scope.CONNECTION
    assert KEYS["MaxBurstLength"].leading_only
    assert not KEYS["HeaderDigest"].leading_only
    assert KEYS["InitiatorName"].sender is Sender.INITIATOR
    assert KEYS["TargetAlias"].sender is Sender.TARGET
    assert KEYS["SendTargets"].stages == frozenset({FFP})
    assert (KEYS["MaxBurstLength"].low, KEYS["MaxBurstLength"].high) == (512, 2**24 - 1)
    assert (KEYS["DefaultTime2Wait"].low, KEYS["DefaultTime2Wait"].high) == (0, 3600)
    assert is_auth_key("CHAP_R") and is_auth_key("SRP_A") and not is_auth_key("AuthMethod")


def test_params_defaults_are_rfc_defaults() -> None:
    p = Negotiator(Role.INITIATOR).params()
    assert p == NegotiatedParams()
    assert (p.max_burst_length, p.first_burst_length, p.max_recv_data_segment_length) == (
        262144, 65536, 8192)
    assert p.initial_r2t and p.immediate_data and not p.header_digest
    assert (p.default_time2wait, p.default_time2retain, p.error_recovery_level) == (2, 20, 0)
    assert "header_digest=False" in str(p)


def test_parse_number() -> None:
    assert parse_number("8192") == 8192
    assert parse_number("0x2000") == 8192
    for bad in ("", "-1", "1.5", "0x", "12a", " 1"):
        assert parse_number(bad) is None


def test_bad_local_configuration() -> None:
    for local in ({"Nope": "1"}, {"MaxBurstLength": "100"}, {"InitialR2T": "maybe"},
                  {"HeaderDigest": "MD5"}, {"SessionType": "Other"}, {"CHAP_A": "5"}):
        with pytest.raises(ValueError):
            target(local)


# ------------------------------------------------------------- as responder


@pytest.mark.parametrize(
    "ours, offer, result",
    [
        ("CRC32C,None", "None,CRC32C", "None"),  # offerer's order wins
        ("CRC32C,None", "CRC32C,None", "CRC32C"),
        ("None,CRC32C", "CRC32C,None", "CRC32C"),
        ("CRC32C", "None,CRC32C", "CRC32C"),
        ("None", "CRC32C,None", "None"),
        ("CRC32C,None", "Foo,CRC32C", "CRC32C"),  # unknown values skipped
    ],
)
def test_list_selection(ours: str, offer: str, result: str) -> None:
    neg = target({"HeaderDigest": ours})
    assert neg.respond([("HeaderDigest", offer)], OP) == [("HeaderDigest", result)]
    assert neg.params().header_digest is (result == "CRC32C")


def test_list_no_common_value_is_reject_or_failure() -> None:
    # Default None acceptable -> plain Reject.
    neg = target({"HeaderDigest": "None,CRC32C"})
    assert neg.respond([("HeaderDigest", "Foo")], OP) == [("HeaderDigest", "Reject")]
    # We insist on CRC32C: the default None would apply -> negotiation fails.
    neg = target({"HeaderDigest": "CRC32C"})
    with pytest.raises(NegotiationError):
        neg.respond([("HeaderDigest", "None")], OP)


@pytest.mark.parametrize(
    "key, ours, offer, result",
    [
        ("MaxBurstLength", "65536", "262144", "65536"),
        ("MaxBurstLength", "1048576", "262144", "262144"),
        ("MaxBurstLength", None, "4096", "4096"),
        ("MaxBurstLength", "65536", "0x1000", "4096"),
        ("DefaultTime2Wait", "5", "2", "5"),  # Max function
        ("DefaultTime2Wait", "0", "2", "2"),
        ("DefaultTime2Retain", "10", "20", "10"),
        ("MaxOutstandingR2T", "8", "16", "8"),
        ("ErrorRecoveryLevel", "0", "2", "0"),
        ("MaxConnections", "4", "8", "4"),
        ("MaxBurstLength", "1048576", "100", "Reject"),  # below range
        ("MaxBurstLength", None, "16777216", "Reject"),  # above range
        ("DefaultTime2Wait", None, "3601", "Reject"),
        ("ErrorRecoveryLevel", None, "3", "Reject"),
        ("MaxOutstandingR2T", None, "0", "Reject"),
        ("MaxBurstLength", None, "lots", "Reject"),
    ],
)
def test_numeric(key: str, ours: str | None, offer: str, result: str) -> None:
    neg = target({key: ours} if ours is not None else None)
    assert neg.respond([(key, offer)], OP) == [(key, result)]


def test_numeric_reject_with_unacceptable_default_fails() -> None:
    neg = target({"MaxBurstLength": "65536"})
    with pytest.raises(NegotiationError):
        neg.respond([("MaxBurstLength", "nonsense")], OP)


@pytest.mark.parametrize(
    "key, ours, offer, result",
    [
        ("InitialR2T", "Yes", "No", "Yes"),  # OR
        ("InitialR2T", "No", "No", "No"),
        ("InitialR2T", "No", "Yes", "Yes"),
        ("ImmediateData", "No", "Yes", "No"),  # AND
        ("ImmediateData", "Yes", "Yes", "Yes"),
        ("DataPDUInOrder", "No", "No", "No"),
        ("DataSequenceInOrder", "Yes", "No", "Yes"),
        ("InitialR2T", None, "No", "No"),
        ("ImmediateData", None, "maybe", "Reject"),
    ],
)
def test_boolean(key: str, ours: str | None, offer: str, result: str) -> None:
    neg = target({key: ours} if ours is not None else None)
    assert neg.respond([(key, offer)], OP) == [(key, result)]


def test_first_burst_irrelevant_even_when_listed_first() -> None:
    neg = target()
    out = neg.respond(
        [("FirstBurstLength", "4096"), ("InitialR2T", "Yes"), ("ImmediateData", "No")], OP
    )
    # Answers keep the received order; the dependency was resolved first.
    assert out == [("FirstBurstLength", "Irrelevant"), ("InitialR2T", "Yes"),
                   ("ImmediateData", "No")]


def test_first_burst_clamped_to_max_burst() -> None:
    neg = target()
    out = dict(neg.respond([("FirstBurstLength", "262144"), ("MaxBurstLength", "65536")], OP))
    assert out == {"FirstBurstLength": "65536", "MaxBurstLength": "65536"}
    p = neg.params()
    assert p.first_burst_length == 65536 and p.max_burst_length == 65536
    # Only MaxBurstLength lowered below the default FirstBurstLength: clamp too.
    neg = target()
    neg.respond([("MaxBurstLength", "16384")], OP)
    assert neg.params().first_burst_length == 16384


def test_discovery_session_irrelevant_keys() -> None:
    neg = target()
    out = neg.respond([("SessionType", "Discovery"), ("MaxBurstLength", "65536"),
                       ("InitialR2T", "No"), ("HeaderDigest", "None"),
                       ("MaxConnections", "2")], OP)
    assert out == [("MaxBurstLength", "Irrelevant"), ("InitialR2T", "Irrelevant"),
                   ("HeaderDigest", "None"), ("MaxConnections", "Irrelevant")]
    assert neg.params().discovery


@pytest.mark.parametrize("key", ["X-com.example.feature", "X#example", "FancyNewKey"])
def test_unknown_keys_not_understood(key: str) -> None:
    neg = target()
    assert neg.respond([(key, "Yes")], OP) == [(key, "NotUnderstood")]
    assert neg.not_understood == [key]


@pytest.mark.parametrize("key", ["OFMarker", "IFMarker", "OFMarkInt", "IFMarkInt"])
def test_obsolete_marker_keys_rejected(key: str) -> None:
    # RFC 7143 §13.26: markers SHOULD, marker intervals MUST be answered Reject.
    assert target().respond([(key, "Yes")], OP) == [(key, "Reject")]


def test_key_offered_twice_in_one_pdu() -> None:
    with pytest.raises(NegotiationError, match="twice") as info:
        target().respond([("MaxBurstLength", "512"), ("MaxBurstLength", "1024")], OP)
    assert info.value.login_status == LoginStatus.INITIATOR_ERROR


def test_key_offered_twice_across_pdus() -> None:
    neg = target()
    neg.respond([("MaxBurstLength", "8192")], OP)
    with pytest.raises(NegotiationError, match="twice"):
        neg.respond([("MaxBurstLength", "8192")], OP)
    # new_exchange() allows renegotiation in a later FFP text exchange.
    neg.new_exchange()
    assert neg.respond([("MaxRecvDataSegmentLength", "4096")], FFP) == []


def test_leading_only_key_on_non_leading_login() -> None:
    neg = target(leading=False)
    with pytest.raises(NegotiationError, match="leading"):
        neg.respond([("MaxBurstLength", "8192")], OP)
    # Connection-scoped keys are fine on any login.
    assert target(leading=False).respond([("HeaderDigest", "None")], OP) == [
        ("HeaderDigest", "None")]


def test_stage_rules() -> None:
    with pytest.raises(NegotiationError, match="operational stage"):
        target().respond([("AuthMethod", "None")], OP)
    with pytest.raises(NegotiationError, match="security stage"):
        target().respond([("MaxBurstLength", "8192")], SEC)
    with pytest.raises(NegotiationError, match="operational stage"):
        target().respond([("SendTargets", "All")], OP)
    # Declarations such as InitiatorName belong to both login stages.
    assert target().respond([("InitiatorName", "iqn.x")], SEC) == []


def test_sender_rules() -> None:
    with pytest.raises(NegotiationError, match="initiator"):
        target().respond([("TargetAlias", "x")], OP)
    with pytest.raises(NegotiationError, match="target"):
        initiator().respond([("InitiatorName", "iqn.x")], SEC)


def test_bad_declarations() -> None:
    neg = target()
    assert neg.respond([("MaxRecvDataSegmentLength", "100")], OP) == [
        ("MaxRecvDataSegmentLength", "Reject")]
    with pytest.raises(NegotiationError) as info:
        target().respond([("SessionType", "Weird")], SEC)
    assert info.value.login_status == LoginStatus.SESSION_TYPE_NOT_SUPPORTED
    with pytest.raises(NegotiationError) as info:
        target().respond([("InitiatorName", "")], SEC)
    assert info.value.login_status == LoginStatus.MISSING_PARAMETER


def test_special_value_to_nothing_is_ignored() -> None:
    # E.g. a peer answering our declaration: never answer an answer (§6.2).
    assert target().respond([("MaxRecvDataSegmentLength", "Reject")], OP) == []


# ------------------------------------------------------ both sides together


def test_max_recv_data_segment_length_per_direction() -> None:
    ini = initiator({"MaxRecvDataSegmentLength": "262144"})
    tgt = target({"MaxRecvDataSegmentLength": "65536"})
    offers = ini.offers(OP)
    assert offers == [("MaxRecvDataSegmentLength", "262144")]
    assert tgt.respond(offers, OP) == []  # declarations are not answered
    declared = tgt.offers(OP)
    assert declared == [("MaxRecvDataSegmentLength", "65536")]
    assert ini.respond(declared, OP) == []
    pi, pt = ini.params(), tgt.params()
    assert (pi.max_recv_data_segment_length, pi.max_xmit_data_segment_length) == (262144, 65536)
    assert (pt.max_recv_data_segment_length, pt.max_xmit_data_segment_length) == (65536, 262144)


def test_full_exchange_agrees_on_both_sides() -> None:
    ini = initiator({"HeaderDigest": "CRC32C,None", "DataDigest": "None,CRC32C",
                     "MaxBurstLength": "1048576", "FirstBurstLength": "262144",
                     "InitialR2T": "No", "ImmediateData": "Yes", "DefaultTime2Wait": "1",
                     "ErrorRecoveryLevel": "2", "iSCSIProtocolLevel": "2",
                     "TaskReporting": "FastAbort,ResponseFence,RFC3720"})
    tgt = target({"HeaderDigest": "CRC32C,None", "MaxBurstLength": "262144",
                  "ImmediateData": "No", "DefaultTime2Wait": "3",
                  "TaskReporting": "ResponseFence,RFC3720"})
    answers = tgt.respond(ini.offers(OP), OP)
    assert ini.respond(answers, OP) == []
    ini.finish()
    tgt.finish()
    pi, pt = ini.params(), tgt.params()
    assert pi == dataclasses.replace(pt, max_recv_data_segment_length=pi.max_recv_data_segment_length,
                                     max_xmit_data_segment_length=pi.max_xmit_data_segment_length)
    assert pi.header_digest and not pi.data_digest
    assert pi.max_burst_length == 262144 and pi.first_burst_length == 262144
    assert not pi.initial_r2t and not pi.immediate_data
    assert pi.default_time2wait == 3 and pi.error_recovery_level == 2
    assert pi.iscsi_protocol_level == 2 and pi.task_reporting == "ResponseFence"


@pytest.mark.parametrize(
    "key, offer, answer",
    [
        ("HeaderDigest", "None", "CRC32C"),  # value we did not offer
        ("MaxBurstLength", "8192", "16384"),  # Min result above our offer
        ("DefaultTime2Wait", "5", "2"),  # Max result below our offer
        ("InitialR2T", "Yes", "No"),  # OR with Yes cannot be No
        ("ImmediateData", "No", "Yes"),  # AND with No cannot be Yes
        ("MaxBurstLength", "8192", "100"),  # out of range
    ],
)
def test_inadmissible_answers(key: str, offer: str, answer: str) -> None:
    ini = initiator({key: offer})
    ini.offers(OP)
    with pytest.raises(NegotiationError, match="inadmissible"):
        ini.respond([(key, answer)], OP)


def test_answers_reject_and_not_understood_keep_defaults() -> None:
    ini = initiator({"MaxOutstandingR2T": "4", "DataDigest": "None"})
    ini.offers(OP)
    ini.respond([("MaxOutstandingR2T", "NotUnderstood"), ("DataDigest", "Reject")], OP)
    assert ini.params().max_outstanding_r2t == 1
    # But a Reject that leaves an unacceptable default fails.
    ini = initiator({"DataDigest": "CRC32C"})
    ini.offers(OP)
    with pytest.raises(NegotiationError, match="not acceptable"):
        ini.respond([("DataDigest", "Reject")], OP)


def test_finish_settles_omitted_boolean_answers() -> None:
    ini = initiator({"InitialR2T": "Yes", "ImmediateData": "No", "DataPDUInOrder": "No"})
    ini.offers(OP)
    assert ini.pending == {"InitialR2T", "ImmediateData", "DataPDUInOrder"}
    ini.finish()
    p = ini.params()
    # OR with Yes and AND with No are decided by the offer alone (§6.2.1);
    # DataPDUInOrder=No (OR) needed an answer, so the default Yes stays.
    assert p.initial_r2t and not p.immediate_data and p.data_pdu_in_order
    assert ini.pending == frozenset()


def test_target_offers_what_it_needs_when_initiator_is_silent() -> None:
    tgt = target({"HeaderDigest": "CRC32C", "DataDigest": "None,CRC32C",
                  "MaxBurstLength": "65536", "InitialR2T": "Yes"})
    tgt.respond([("InitiatorName", "iqn.x")], OP)
    extra = tgt.unresolved_offers(OP, dry_run=True)
    assert extra == [("HeaderDigest", "CRC32C"), ("MaxBurstLength", "65536")]
    assert tgt.pending == frozenset()
    assert tgt.unresolved_offers(OP) == extra
    assert tgt.pending == {"HeaderDigest", "MaxBurstLength"}
    ini = initiator({"HeaderDigest": "None,CRC32C"})
    answers = ini.respond(extra, OP)
    assert answers == [("HeaderDigest", "CRC32C"), ("MaxBurstLength", "65536")]
    tgt.respond(answers, OP)
    assert tgt.pending == frozenset()
    assert tgt.params().header_digest and ini.params().header_digest
    assert ini.params().max_burst_length == 65536


def test_initiator_offers_only_what_applies() -> None:
    local = {"InitiatorName": "iqn.i", "SessionType": "Discovery", "MaxBurstLength": "65536",
             "HeaderDigest": "None", "AuthMethod": "None", "DefaultTime2Wait": "2"}
    ini = initiator(local)
    assert ini.offers(SEC) == [("InitiatorName", "iqn.i"), ("SessionType", "Discovery"),
                               ("AuthMethod", "None")]
    # Discovery: MaxBurstLength is irrelevant and is not offered at all.
    assert ini.offers(OP) == [("HeaderDigest", "None"), ("DefaultTime2Wait", "2")]
    assert ini.offers(OP) == []  # nothing twice
    nonleading = initiator({"MaxBurstLength": "65536", "HeaderDigest": "None"}, leading=False)
    assert nonleading.offers(OP) == [("HeaderDigest", "None")]


def test_leading_only_keys_on_a_non_leading_login() -> None:
    # A target refuses them (§13)...
    target = Negotiator(Role.TARGET, {}, leading=False)
    with pytest.raises(NegotiationError):
        target.respond([("MaxBurstLength", "4096")], OP)
    # ...an initiator ignores them from the target (tgt repeats
    # MaxConnections in each response of a non-leading login): the
    # session's values stand, and the login goes on.
    ini = Negotiator(Role.INITIATOR, {}, leading=False)
    assert ini.respond([("MaxConnections", "2")], OP) == []
    assert ini.respond([("MaxConnections", "2")], OP) == []
    assert ini.offers(OP) == [] or all(k != "MaxConnections" for k, _ in ini.offers(OP))
