"""Tests of the key=value text codec (RFC 7143 §6.1) and continuations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi.errors import TextError
from iscsi.text import (
    MAX_LARGE_VALUE_LENGTH,
    TextAssembler,
    decode_text,
    encode_text,
    split_text,
)


def test_encode_layout() -> None:
    assert encode_text([("HeaderDigest", "CRC32C,None"), ("MaxBurstLength", "262144")]) == (
        b"HeaderDigest=CRC32C,None\0MaxBurstLength=262144\0"
    )


def test_decode_keeps_order_and_duplicates() -> None:
    raw = b"B=2\0A=1\0B=3\0"
    assert decode_text(raw) == [("B", "2"), ("A", "1"), ("B", "3")]


def test_empty_text_and_empty_value() -> None:
    assert decode_text(b"") == []
    assert encode_text([]) == b""
    # SendTargets= with an empty value is legal (RFC 7143 Appendix C).
    assert decode_text(b"SendTargets=\0") == [("SendTargets", "")]


def test_value_may_contain_equals_and_utf8() -> None:
    # base64 large-binary values end in '=' padding; aliases are UTF-8.
    pairs = [("CHAP_C", "0bAAEC/w=="), ("TargetAlias", "disque-été")]
    assert decode_text(encode_text(pairs)) == pairs


def test_extension_keys_are_legal() -> None:
    pairs = [("X-com.example.foo", "1"), ("X#vendor", "yes"), ("iSCSIProtocolLevel", "2")]
    assert decode_text(encode_text(pairs)) == pairs


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"A=1", "NUL"),
        (b"A=1\0B", "NUL"),
        (b"A1\0", "without '='"),
        (b"=1\0", "empty"),
        (b"A=1\0\0", "without '='"),
        (b"A B=1\0", "illegal"),
        (b"1A=1\0", "illegal"),
        (b"K\xc3\xa9=1\0", "not ASCII"),
        (b"A=\xff\0", "not UTF-8"),
        (b"K" * 64 + b"=1\0", "longer than 63"),
        (b"A=" + b"v" * 256 + b"\0", "over 255"),
        (b"CHAP_C=0x" + b"0" * (MAX_LARGE_VALUE_LENGTH - 1) + b"\0", "over"),
    ],
)
def test_decode_rejects_malformed(raw: bytes, words: str) -> None:
    with pytest.raises(TextError, match=words):
        decode_text(raw)


def test_limits_are_inclusive() -> None:
    assert decode_text(b"K" * 63 + b"=1\0")[0][0] == "K" * 63
    assert len(decode_text(b"A=" + b"v" * 255 + b"\0")[0][1]) == 255
    big = "0x" + "ab" * 8192
    assert decode_text(encode_text([("CHAP_R", big)])) == [("CHAP_R", big)]


@pytest.mark.parametrize(
    "pairs",
    [
        [("", "x")],
        [("A=B", "x")],
        [("A", "x\0y")],
        [("A", "v" * 256)],
    ],
)
def test_encode_rejects_malformed(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(TextError):
        encode_text(pairs)


def test_text_error_maps_to_wire_answers() -> None:
    with pytest.raises(TextError) as info:
        decode_text(b"nope")
    assert info.value.login_status is not None and info.value.login_status.value == 0x0200
    assert info.value.reject_reason is not None


def test_assembler_joins_a_pair_split_across_segments() -> None:
    asm = TextAssembler()
    assert asm.feed(b"MaxBurst", True) is None
    assert asm.pending
    assert asm.feed(b"Length=512\0Header", True) is None
    whole = asm.feed(b"Digest=None\0", False)
    assert whole is not None
    assert decode_text(whole) == [("MaxBurstLength", "512"), ("HeaderDigest", "None")]
    assert not asm.pending


def test_assembler_cap() -> None:
    asm = TextAssembler(cap=100)
    assert asm.feed(b"x" * 60, True) is None
    with pytest.raises(TextError, match="exceeds 100"):
        asm.feed(b"x" * 41, True)
    # The partial text is forgotten: a fresh text works again.
    assert not asm.pending
    assert asm.feed(b"A=1\0", False) == b"A=1\0"


def test_assembler_exact_cap_is_fine() -> None:
    asm = TextAssembler(cap=8)
    assert asm.feed(b"A=1\0", True) is None
    assert asm.feed(b"B=2\0", False) == b"A=1\0B=2\0"


def test_split_text() -> None:
    data = encode_text([(f"X-k{i}", "v" * 50) for i in range(20)])
    segs = split_text(data, 128)
    assert all(len(s) <= 128 for s in segs)
    assert len(segs) == -(-len(data) // 128)
    assert b"".join(segs) == data
    assert split_text(b"", 100) == [b""]
    assert split_text(b"abc", 3) == [b"abc"]
    with pytest.raises(ValueError):
        split_text(b"abc", 0)


_key = st.from_regex(r"[A-Za-z][A-Za-z0-9.\-+@_#]{0,62}", fullmatch=True)
_value = st.text(
    alphabet=st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=60
)


@settings(max_examples=200)
@given(st.lists(st.tuples(_key, _value), max_size=20))
def test_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert decode_text(encode_text(pairs)) == pairs


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_text_error(raw: bytes) -> None:
    try:
        out = decode_text(raw)
    except TextError:
        return
    assert isinstance(out, list)
    # Whatever decodes re-encodes to the same bytes.
    assert encode_text(out) == raw


@settings(max_examples=100)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_split_then_assemble(raw: bytes, size: int) -> None:
    segs = split_text(raw, size)
    asm = TextAssembler()
    for seg in segs[:-1]:
        assert asm.feed(seg, True) is None
    assert asm.feed(segs[-1], False) == raw
