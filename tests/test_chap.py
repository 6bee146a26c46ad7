"""Tests of CHAP (RFC 1994, RFC 7143 §12.1.3)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

import pytest

from iscsi.chap import (
    ChapAlgorithm,
    ChapCredentials,
    ChapInitiator,
    ChapTarget,
    chap_response,
    decode_binary,
    encode_binary,
)
from iscsi.constants import LoginStatus
from iscsi.errors import AuthenticationError

USER = ChapCredentials("alice", b"initiator-secret-1")
TARGET = ChapCredentials("tgt", b"target-secret-xyz")


def counter_rng(start: int = 0) -> Callable[[int], bytes]:
    """Deterministic but never-repeating 'random' bytes."""
    counter = itertools.count(start)

    def rng(n: int) -> bytes:
        seed = next(counter).to_bytes(8, "big")
        out = b""
        while len(out) < n:
            seed = hashlib.sha256(seed).digest()
            out += seed
        return out[:n]

    return rng


def run(initiator: ChapInitiator, target: ChapTarget) -> None:
    """Drive a full exchange in memory."""
    keys = dict(initiator.start())
    answer = dict(target.receive(keys))
    reply = dict(initiator.receive(answer))
    final = dict(target.receive(reply))
    initiator.receive(final)


def test_rfc1994_response_formula() -> None:
    # Independent computation: MD5(id || secret || challenge).
    challenge = bytes(range(16))
    expected = hashlib.md5(b"\x07" + b"secret" + challenge).digest()
    assert chap_response(ChapAlgorithm.MD5, 7, b"secret", challenge) == expected
    assert ChapAlgorithm.MD5.digest_size == 16
    assert ChapAlgorithm.SHA1.digest_size == 20
    assert ChapAlgorithm.SHA256.digest_size == 32
    assert ChapAlgorithm.SHA3_256.digest_size == 32
    assert chap_response(ChapAlgorithm.SHA3_256, 0, b"s", b"c") == hashlib.sha3_256(
        b"\0sc"
    ).digest()


def test_binary_encodings() -> None:
    data = bytes([0, 1, 254, 255])
    assert encode_binary(data, "hex") == "0x0001feff"
    assert encode_binary(data, "base64") == "0bAAH+/w=="
    assert decode_binary("0x0001FEFF") == data
    assert decode_binary("0X0001feff") == data
    assert decode_binary("0bAAH+/w==") == data
    assert decode_binary("0BAAH+/w==") == data
    assert decode_binary("0x1ff") == b"\x01\xff"  # odd digit count: implied 0
    with pytest.raises(ValueError):
        encode_binary(data, "octal")


@pytest.mark.parametrize("text", ["0001feff", "0x", "0b", "0xzz", "0b!!!!", "0bAAH", "", "0z12"])
def test_bad_binary_values(text: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        decode_binary(text)
    assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE


@pytest.mark.parametrize("alg", list(ChapAlgorithm))
@pytest.mark.parametrize("encoding", ["hex", "base64"])
@pytest.mark.parametrize("mutual", [False, True])
def test_exchange(alg: ChapAlgorithm, encoding: str, mutual: bool) -> None:
    ini = ChapInitiator(USER, TARGET if mutual else None, algorithms=[alg], encoding=encoding,
                        rng=counter_rng(100))
    tgt = ChapTarget(USER, TARGET, encoding=encoding, rng=counter_rng(0))
    run(ini, tgt)
    assert tgt.authenticated and tgt.complete
    assert tgt.mutual is mutual
    assert tgt.algorithm is alg
    assert ini.complete


def test_target_picks_first_supported_in_initiator_order() -> None:
    ini = ChapInitiator(USER, algorithms=[5, 7, 6])
    tgt = ChapTarget(USER, algorithms=[6, 7])
    answer = dict(tgt.receive(dict(ini.start())))
    assert answer["CHAP_A"] == "7"
    assert ini.start() == [("CHAP_A", "5,7,6")]


def test_no_common_algorithm() -> None:
    tgt = ChapTarget(USER, algorithms=[7])
    with pytest.raises(AuthenticationError, match="no supported"):
        tgt.receive({"CHAP_A": "5,6,garbage"})


def test_initiator_refuses_algorithm_it_did_not_offer() -> None:
    ini = ChapInitiator(USER, algorithms=[7])
    ini.start()
    with pytest.raises(AuthenticationError, match="did not offer"):
        ini.receive({"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x" + "00" * 16})


def test_wrong_secret_fails() -> None:
    ini = ChapInitiator(ChapCredentials("alice", b"wrong-secret-123"))
    tgt = ChapTarget(USER)
    answer = tgt.receive(dict(ini.start()))
    reply = ini.receive(dict(answer))
    with pytest.raises(AuthenticationError) as info:
        tgt.receive(dict(reply))
    assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE
    assert not tgt.authenticated


def test_wrong_user_fails() -> None:
    ini = ChapInitiator(ChapCredentials("mallory", USER.secret))
    tgt = ChapTarget(USER)
    reply = ini.receive(dict(tgt.receive(dict(ini.start()))))
    with pytest.raises(AuthenticationError):
        tgt.receive(dict(reply))


def test_response_length_must_match_digest() -> None:
    tgt = ChapTarget(USER, algorithms=[7])
    tgt.receive({"CHAP_A": "7"})
    with pytest.raises(AuthenticationError, match="16 bytes"):
        tgt.receive({"CHAP_N": "alice", "CHAP_R": "0x" + "00" * 16})


def test_target_refuses_reflected_challenge() -> None:
    tgt = ChapTarget(USER, TARGET, algorithms=[5], rng=counter_rng())
    answer = dict(tgt.receive({"CHAP_A": "5"}))
    challenge = decode_binary(answer["CHAP_C"])
    ident = int(answer["CHAP_I"])
    proof = chap_response(ChapAlgorithm.MD5, ident, USER.key, challenge)
    with pytest.raises(AuthenticationError, match="reflected"):
        tgt.receive({
            "CHAP_N": "alice",
            "CHAP_R": encode_binary(proof),
            # A reflection attack: hand the target its own I and challenge,
            # base64 this time to show the check is on the decoded bytes.
            "CHAP_I": answer["CHAP_I"],
            "CHAP_C": encode_binary(challenge, "base64"),
        })
    assert not tgt.authenticated


def test_initiator_never_reflects_even_with_a_stuck_rng() -> None:
    fixed = bytes(range(17))
    ini = ChapInitiator(USER, TARGET, algorithms=[5], rng=lambda n: fixed[:n])
    ini.start()
    with pytest.raises(AuthenticationError, match="different"):
        ini.receive({"CHAP_A": "5", "CHAP_I": "0", "CHAP_C": encode_binary(fixed[1:17])})


def test_mutual_required_but_not_requested() -> None:
    ini = ChapInitiator(USER)
    tgt = ChapTarget(USER, TARGET, require_mutual=True)
    reply = ini.receive(dict(tgt.receive(dict(ini.start()))))
    with pytest.raises(AuthenticationError, match="mutual CHAP required"):
        tgt.receive(dict(reply))


def test_mutual_requested_without_target_secret() -> None:
    ini = ChapInitiator(USER, TARGET)
    tgt = ChapTarget(USER)
    reply = ini.receive(dict(tgt.receive(dict(ini.start()))))
    with pytest.raises(AuthenticationError, match="no target secret"):
        tgt.receive(dict(reply))


def test_initiator_detects_impostor_target() -> None:
    ini = ChapInitiator(USER, TARGET)
    tgt = ChapTarget(USER, ChapCredentials("tgt", b"not-the-right-one"))
    reply = ini.receive(dict(tgt.receive(dict(ini.start()))))
    final = tgt.receive(dict(reply))
    assert ini.awaiting_target_proof
    with pytest.raises(AuthenticationError, match="target failed"):
        ini.receive(dict(final))
    assert not ini.complete


def test_initiator_checks_target_name() -> None:
    ini = ChapInitiator(USER, TARGET)
    tgt = ChapTarget(USER, ChapCredentials("other-name", TARGET.secret))
    reply = ini.receive(dict(tgt.receive(dict(ini.start()))))
    with pytest.raises(AuthenticationError):
        ini.receive(dict(tgt.receive(dict(reply))))


@pytest.mark.parametrize("size, ok", [(7, False), (8, True), (1024, True), (1025, False)])
def test_received_challenge_length_bounds(size: int, ok: bool) -> None:
    ini = ChapInitiator(USER, algorithms=[5])
    ini.start()
    keys = {"CHAP_A": "5", "CHAP_I": "3", "CHAP_C": encode_binary(b"\x01" * size)}
    if ok:
        assert dict(ini.receive(keys))["CHAP_N"] == "alice"
    else:
        with pytest.raises(AuthenticationError, match="challenge"):
            ini.receive(keys)


@pytest.mark.parametrize("ident", ["256", "-1", "abc", "0x100", ""])
def test_bad_identifier(ident: str) -> None:
    ini = ChapInitiator(USER, algorithms=[5])
    ini.start()
    with pytest.raises(AuthenticationError, match="CHAP_I"):
        ini.receive({"CHAP_A": "5", "CHAP_I": ident, "CHAP_C": "0x" + "01" * 16})


def test_identifier_hex_accepted() -> None:
    ini = ChapInitiator(USER, algorithms=[5])
    ini.start()
    out = dict(ini.receive({"CHAP_A": "5", "CHAP_I": "0xff", "CHAP_C": "0x" + "01" * 16}))
    expected = chap_response(ChapAlgorithm.MD5, 255, USER.key, b"\x01" * 16)
    assert decode_binary(out["CHAP_R"]) == expected


def test_target_challenge_is_sized_to_digest_and_uses_rng() -> None:
    tgt = ChapTarget(USER, rng=lambda n: bytes([9]) * n)
    answer = dict(tgt.receive({"CHAP_A": "7"}))
    assert answer["CHAP_I"] == "9"
    assert decode_binary(answer["CHAP_C"]) == bytes([9]) * 32
    tgt5 = ChapTarget(USER, rng=lambda n: bytes(n))
    assert len(decode_binary(dict(tgt5.receive({"CHAP_A": "5"}))["CHAP_C"])) == 16


def test_missing_and_unexpected_keys() -> None:
    tgt = ChapTarget(USER)
    with pytest.raises(AuthenticationError, match="unexpected"):
        tgt.receive({"CHAP_A": "5", "CHAP_N": "x"})
    tgt = ChapTarget(USER)
    tgt.receive({"CHAP_A": "5"})
    with pytest.raises(AuthenticationError, match="CHAP_R missing"):
        tgt.receive({"CHAP_N": "alice"})


def test_short_secrets_refused_by_default() -> None:
    with pytest.raises(ValueError, match="96 bits"):
        ChapCredentials("u", b"elevenbytes")
    ChapCredentials("u", b"twelve bytes")  # exactly 12 is fine
    weak = ChapCredentials("u", b"short", refuse_short_secrets=False)
    assert weak.key == b"short"
    with pytest.raises(ValueError):
        ChapCredentials("", b"twelve bytes")
    with pytest.raises(ValueError):
        ChapCredentials("u", b"", refuse_short_secrets=False)


def test_str_secret_is_utf8_and_repr_hides_it() -> None:
    cred = ChapCredentials("u", "sécret-passphrase")
    assert cred.key == "sécret-passphrase".encode()
    assert "passphrase" not in repr(cred)


@pytest.mark.parametrize("alg_list", ["²", "5²", "٥", "0x-5", ""])
def test_non_ascii_digits_in_chap_a(alg_list: str) -> None:
    # str.isdigit() accepts these and int() then refuses some: make sure the
    # answer is an AuthenticationError, never a ValueError.
    with pytest.raises(AuthenticationError):
        ChapTarget(USER).receive({"CHAP_A": alg_list})
    ini = ChapInitiator(USER)
    ini.start()
    with pytest.raises(AuthenticationError):
        ini.receive({"CHAP_A": alg_list, "CHAP_I": "1", "CHAP_C": "0x" + "01" * 16})
