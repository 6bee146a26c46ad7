"""Stream delimiting (iscsi.framing.PDUReader): RFC 7143 §11.2 framing,
limits checked before buffering (§7.2, §13.12), digests (§13.1) and the
error semantics the adapters rely on."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import pytest

from iscsi.constants import RESERVED_TAG, RejectReason, Stage
from iscsi.errors import (
    AHSTooLong,
    DataDigestError,
    DataSegmentTooLong,
    FramingError,
    HeaderDigestDiscarded,
    HeaderDigestError,
    InvalidPDUField,
    ProtocolError,
)
from iscsi.framing import PDUReader
from iscsi.pdu import (
    PDU,
    R2T,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TextRequest,
)

STAGE = 256 * 1024
DIRECT = 16 * 1024


def wire(pdu: PDU, hd: bool = False, dd: bool = False) -> bytes:
    return b"".join(bytes(b) for b in pdu.encode(hd, dd))


def stream_pdus() -> list[PDU]:
    """A mixed stream (no Login PDUs: parsing stops after those)."""
    return [
        NopOut(itt=1, cmdsn=1, expstatsn=2, data=b"ping!"),
        ScsiCommand(itt=2, cdb=bytes.fromhex("28000000000000000100") + bytes(6), read=True,
                    expected_data_transfer_length=512, cmdsn=2, expstatsn=3),
        ScsiCommand(itt=3, cdb=bytes(range(32)), write=True, final=True,
                    expected_data_transfer_length=100, cmdsn=3, bidi_read_length=7,
                    data=b"w" * 33),
        DataIn(itt=2, datasn=0, data=b"r" * 511),
        DataIn(itt=2, final=True, status_present=True, datasn=1, buffer_offset=511,
               data=b"r"),
        DataOut(itt=3, ttt=9, datasn=0, buffer_offset=33, data=b"d" * 67),
        R2T(itt=3, ttt=9, r2tsn=0, buffer_offset=33, desired_data_transfer_length=67),
        ScsiResponse(itt=4, status=2, data=ScsiResponse.sense_segment(bytes(18))),
        TextRequest(itt=5, data=b"SendTargets=All\0"),
        NopIn(itt=RESERVED_TAG, ttt=77, statsn=9),
        DataIn(itt=6, datasn=0, data=bytes(range(256)) * 80),  # 20 KiB: direct mode
        NopOut(itt=7, data=b""),
    ]


def feed_chunks(reader: PDUReader, data: bytes, sizes: Iterable[int]) -> list[PDU]:
    out: list[PDU] = []
    pos = 0
    for n in sizes:
        if pos >= len(data):
            break
        out.extend(reader.feed(data[pos : pos + n]))
        pos += n
    assert pos >= len(data)
    return out


def pump(reader: PDUReader, data: bytes, sizes: Iterable[int]) -> list[PDU]:
    """Drive the BufferedProtocol interface like the asyncio adapter: the
    'kernel' writes at most ``size`` bytes into get_buffer() per call."""
    out: list[PDU] = []
    pos = 0
    it = iter(sizes)
    while pos < len(data):
        buf = reader.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), next(it), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        out.extend(reader.buffer_updated(n))
        while more := reader.parse():  # what TargetConnection._pump does
            out.extend(more)
    return out


def random_sizes(seed: int, hi: int) -> Iterable[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, hi)


def ones() -> Iterable[int]:
    while True:
        yield 1


@pytest.mark.parametrize("digests", [(False, False), (True, True), (True, False), (False, True)])
def test_mixed_stream_whole_bytewise_and_chunked(digests: tuple[bool, bool]) -> None:
    hd, dd = digests
    pdus = stream_pdus()
    data = b"".join(wire(p, hd, dd) for p in pdus)

    def reader() -> PDUReader:
        return PDUReader(max_data_segment_length=65536, header_digest=hd, data_digest=dd)

    assert reader().feed(data) == pdus
    r = reader()
    assert [p for i in range(len(data)) for p in r.feed(data[i : i + 1])] == pdus
    assert r.buffered == 0
    for seed in range(5):
        r = reader()
        assert feed_chunks(r, data, random_sizes(seed, 3000)) == pdus
        assert r.buffered == 0
        r = reader()
        assert pump(r, data, random_sizes(100 + seed, 5000)) == pdus
        assert r.buffered == 0
    assert pump(reader(), data, ones()) == pdus


def test_stage_wraps_many_times() -> None:
    # More than the 256 KiB stage of small PDUs forces compaction.
    pdus: list[PDU] = [NopOut(itt=i, cmdsn=i, data=bytes([i & 0xFF]) * (i % 700))
                       for i in range(2000)]
    data = b"".join(wire(p) for p in pdus)
    assert len(data) > 2 * STAGE
    r = PDUReader()
    assert pump(r, data, random_sizes(7, 9000)) == pdus
    assert feed_chunks(PDUReader(), data, random_sizes(8, 70000)) == pdus


# -- limits are enforced on the header alone ---------------------------------------


def test_data_segment_too_long_before_data_arrives() -> None:
    big = DataOut(itt=1, ttt=2, data=bytes(8193))
    hdr = wire(big)[:48]
    r = PDUReader(max_data_segment_length=8192)
    assert r.feed(hdr[:47]) == []
    with pytest.raises(DataSegmentTooLong) as ei:
        r.feed(hdr[47:])  # the 48th header byte, no data at all
    assert ei.value.drop_connection
    assert ei.value.reject_reason == RejectReason.PROTOCOL_ERROR
    assert ei.value.header == hdr
    assert "8193" in str(ei.value)
    # The stream is dead from now on (framing cannot be trusted).
    with pytest.raises(DataSegmentTooLong):
        r.feed(bytes(100))
    with pytest.raises(DataSegmentTooLong):
        r.parse()


def test_data_segment_at_the_limit_is_fine() -> None:
    pdu = DataOut(itt=1, ttt=2, data=bytes(range(256)) * 32)
    r = PDUReader(max_data_segment_length=8192)
    assert r.feed(wire(pdu)) == [pdu]


def test_ahs_cap_on_header_alone() -> None:
    cmd = ScsiCommand(itt=1, cdb=bytes(64), expected_data_transfer_length=0)  # 13 words AHS
    hdr = wire(cmd)[:48]
    r = PDUReader(max_ahs_length=16)
    with pytest.raises(AHSTooLong) as ei:
        r.feed(hdr)
    assert ei.value.drop_connection
    # The default cap admits every AHS RFC 7143 can express (255 words).
    assert PDUReader().feed(wire(cmd)) == [cmd]


def test_login_pdus_always_limited_to_8192() -> None:
    big_login = LoginRequest(itt=1, isid=1, data=b"k" * 8193)
    ok_login = LoginRequest(itt=1, isid=1, data=b"k" * 8192)
    # A larger negotiated limit does not apply during login (§13.12).
    with pytest.raises(DataSegmentTooLong):
        PDUReader(max_data_segment_length=1 << 20).feed(wire(big_login))
    with pytest.raises(DataSegmentTooLong):
        PDUReader(max_data_segment_length=1 << 20).feed(
            wire(LoginResponse(itt=1, data=b"k" * 8193)))
    # ... and a smaller one does not either.
    assert PDUReader(max_data_segment_length=512).feed(wire(ok_login)) == [ok_login]
    with pytest.raises(DataSegmentTooLong):
        PDUReader(max_data_segment_length=512).feed(wire(NopOut(itt=1, data=bytes(513))))


# -- digests -----------------------------------------------------------------------


def test_header_digest_error_is_fatal() -> None:
    good = wire(NopOut(itt=1), hd=True)
    bad = bytearray(good)
    bad[20] ^= 0x01  # corrupt the TTT: the header digest no longer matches
    r = PDUReader(header_digest=True)
    with pytest.raises(HeaderDigestError) as ei:
        r.feed(bytes(bad) + good)
    assert ei.value.drop_connection and isinstance(ei.value, FramingError)
    with pytest.raises(HeaderDigestError):
        r.feed(good)


@pytest.mark.parametrize("size", [0, 5, 40000])  # no data / staged / beyond the direct size
@pytest.mark.parametrize("chunked", [False, True])
def test_erl1_discards_a_pdu_with_a_bad_header_digest(size: int, chunked: bool) -> None:
    """At ErrorRecoveryLevel >= 1 (§7.8) the PDU goes, by its own lengths,
    and the stream carries on with the next PDU, whose header passes."""
    lost = DataIn(itt=1, datasn=0, data=b"a" * size)
    nxt = NopIn(itt=2, statsn=3, data=b"pong")
    bad = bytearray(wire(lost, True, True))
    bad[16] ^= 0x01  # the ITT: only the digest notices
    stream = bytes(bad) + wire(nxt, True, True)
    r = PDUReader(header_digest=True, data_digest=True, max_data_segment_length=65536)
    r.discard_bad_headers = True
    got: list[PDU] = []
    errors: list[ProtocolError] = []
    for piece in ([stream] if not chunked else [stream[i : i + 1000]
                                                 for i in range(0, len(stream), 1000)]):
        try:
            got += r.feed(piece)
        except HeaderDigestDiscarded as exc:
            errors.append(exc)
            assert not exc.drop_connection and exc.header is None
    got += r.feed(b"")
    assert got == [nxt] and len(errors) == 1 and r.buffered == 0


def test_a_second_bad_header_after_a_discard_ends_the_stream() -> None:
    """The next header is what shows the damaged length was right: if it
    fails too (here the length itself was hit), the stream is lost."""
    nop = NopOut(itt=1, data=b"x" * 64)
    bad = bytearray(wire(nop, hd=True))
    bad[7] ^= 0x08  # DataSegmentLength 64 -> 72: the skip lands mid-PDU
    r = PDUReader(header_digest=True)
    r.discard_bad_headers = True
    with pytest.raises(HeaderDigestDiscarded):
        r.feed(bytes(bad) + wire(nop, hd=True) + wire(nop, hd=True))
    with pytest.raises(HeaderDigestError) as ei:
        r.feed(b"")
    assert ei.value.drop_connection


def test_header_digest_covers_ahs() -> None:
    cmd = ScsiCommand(itt=1, cdb=bytes(range(20)))
    bad = bytearray(wire(cmd, hd=True))
    bad[50] ^= 0x01  # AHS byte
    with pytest.raises(HeaderDigestError):
        PDUReader(header_digest=True).feed(bytes(bad))


@pytest.mark.parametrize("size", [5, 40000])  # staged / direct receive
def test_data_digest_error_keeps_stream_in_sync(size: int) -> None:
    first = DataIn(itt=1, datasn=0, data=b"a" * size)
    second = NopIn(itt=2, statsn=3, data=b"pong")
    bad = bytearray(wire(first, True, True))
    bad[60] ^= 0xFF  # a payload byte
    stream = bytes(bad) + wire(second, True, True)
    for sizes in (iter([len(stream)]), ones(), random_sizes(size, 999)):
        r = PDUReader(max_data_segment_length=65536, header_digest=True, data_digest=True)
        got: list[PDU] = []
        errors: list[ProtocolError] = []
        pos = 0
        for n in sizes:
            if pos >= len(stream):
                break
            try:
                got.extend(r.feed(stream[pos : pos + n]))
            except ProtocolError as exc:
                errors.append(exc)
            pos += n
        got.extend(r.feed(b""))
        assert len(errors) == 1
        err = errors[0]
        assert isinstance(err, DataDigestError) and not err.drop_connection
        assert err.reject_reason == 0x02
        assert err.header == wire(first, True, True)[:48]
        assert got == [second]
        assert r.buffered == 0


def test_padding_is_covered_by_data_digest() -> None:
    pdu = NopOut(itt=1, data=b"abcde")
    bad = bytearray(wire(pdu, dd=True))
    bad[48 + 6] = 0x55  # a padding byte
    with pytest.raises(DataDigestError):
        PDUReader(data_digest=True).feed(bytes(bad))


# -- large payloads and placement ------------------------------------------------------


def test_large_payload_received_directly() -> None:
    payload = bytes(range(256)) * 100  # 25600 bytes
    pdu = DataIn(itt=1, datasn=0, data=payload)
    raw = wire(pdu, True, True)
    r = PDUReader(max_data_segment_length=65536, header_digest=True, data_digest=True)
    assert r.feed(raw[:1000]) == []
    assert r.buffered == 1000
    # The next receive buffer is the payload's own buffer, sized to the
    # rest of the payload: the kernel writes straight into it.
    buf = r.get_buffer(-1)
    assert len(buf) == len(payload) - (1000 - 52)
    buf[:] = raw[1000 : 52 + len(payload)]
    assert r.buffer_updated(len(buf)) == []
    assert r.buffered == 52 + len(payload)
    tail = r.get_buffer(-1)
    assert len(tail) == 4  # no padding, 4 digest bytes
    tail[:] = raw[-4:]
    (got,) = r.buffer_updated(4)
    assert got == pdu
    assert isinstance(got.data, memoryview) and got.data.nbytes == len(payload)
    assert r.buffered == 0


def test_small_payload_is_copied_out_of_the_stage() -> None:
    r = PDUReader()
    (got,) = r.feed(wire(NopOut(itt=1, data=b"x" * 100)))
    assert isinstance(got.data, bytes)  # the stage is reused: a copy is required


@pytest.mark.parametrize("piecewise", [False, True])
@pytest.mark.parametrize("dd", [False, True])
def test_placement_receives_into_caller_buffer(piecewise: bool, dd: bool) -> None:
    target = bytearray(b"\xee" * 1000)
    calls: list[tuple[bytes, int]] = []

    def place(hdr: bytes, dlen: int) -> memoryview | None:
        calls.append((hdr, dlen))
        if hdr[0] & 0x3F != 0x05:
            return None
        offset = int.from_bytes(hdr[40:44], "big")
        return memoryview(target)[offset : offset + dlen]

    out1 = DataOut(itt=1, ttt=2, datasn=0, buffer_offset=100, data=b"A" * 301)
    nop = NopOut(itt=3, data=b"not placed")
    raw = wire(out1, dd=dd) + wire(nop, dd=dd)
    r = PDUReader(placement=place, data_digest=dd)
    got = pump(r, raw, ones()) if piecewise else r.feed(raw)
    assert got == [out1, nop]
    data = got[0].data
    assert isinstance(data, memoryview)
    assert data.obj is target  # no copy: the PDU's data IS the caller's buffer
    assert bytes(target[100:401]) == b"A" * 301
    assert target[99] == 0xEE and target[401] == 0xEE
    assert calls[0] == (raw[:48], 301)
    assert isinstance(got[1].data, bytes)


def test_short_placed_segments_stay_staged_across_receives() -> None:
    """A 4 KiB Data-In cut by a receive boundary is completed in the stage,
    so the next receive can take the rest of it and the PDUs after it in
    one system call; only segments of DIRECT bytes or more are received
    into their own buffer (each of those receives would otherwise end at
    the segment's end and again at its digest)."""
    target = bytearray(8 * 4096)

    def place(hdr: bytes, dlen: int) -> memoryview | None:
        offset = int.from_bytes(hdr[40:44], "big")
        return memoryview(target)[offset : offset + dlen]

    pdus = [DataIn(itt=1, datasn=k, buffer_offset=k * 4096, data=bytes([k + 1]) * 4096)
            for k in range(8)]
    raw = b"".join(wire(p, dd=True) for p in pdus)
    r = PDUReader(placement=place, data_digest=True)
    half = len(wire(pdus[0], dd=True)) // 2
    buf = r.get_buffer()
    buf[:half] = raw[:half]
    assert r.buffer_updated(half) == []
    room = r.get_buffer()
    assert len(room) >= len(raw) - half  # the stage, not the segment's rest
    room[: len(raw) - half] = raw[half:]
    got = r.buffer_updated(len(raw) - half)
    assert [p.datasn for p in got] == list(range(8))  # type: ignore[attr-defined]
    assert bytes(target) == b"".join(bytes([k + 1]) * 4096 for k in range(8))
    assert all(isinstance(p.data, memoryview) and p.data.obj is target for p in got)


def test_placement_not_called_without_data() -> None:
    calls: list[int] = []

    def place(hdr: bytes, dlen: int) -> memoryview | None:
        calls.append(dlen)
        return None

    r = PDUReader(placement=place)
    assert r.feed(wire(NopOut(itt=1))) == [NopOut(itt=1)]
    assert calls == []


# -- Login: parsing stops so the adapter can switch settings ----------------------------


def test_parse_stops_after_login_pdu() -> None:
    login = LoginResponse(itt=1, transit=True, csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                          nsg=Stage.FULL_FEATURE_PHASE, tsih=5, data=b"HeaderDigest=CRC32C\0")
    nop = NopIn(itt=RESERVED_TAG, ttt=1, statsn=2)
    after = wire(nop, hd=True)  # the first FFP PDU already carries a digest
    r = PDUReader()
    assert r.feed(wire(login) + after) == [login]
    assert r.buffered == len(after)
    r.header_digest = True  # what the adapter does once login completes
    assert r.parse() == [nop]
    assert r.buffered == 0


def test_parse_stops_after_login_with_buffered_protocol() -> None:
    login = LoginRequest(itt=1, isid=7, data=b"a=b\0")
    r = PDUReader()
    raw = wire(login) + wire(login) + wire(NopOut(itt=2))
    buf = r.get_buffer(-1)
    buf[: len(raw)] = raw
    assert r.buffer_updated(len(raw)) == [login]
    assert r.parse() == [login]
    assert r.parse() == [NopOut(itt=2)]
    assert r.parse() == []


def test_feed_holds_much_data_after_login() -> None:
    login = LoginRequest(itt=1, isid=7)
    rest = [NopOut(itt=i, data=bytes(4000)) for i in range(100)]  # > stage size
    r = PDUReader()
    raw = wire(login) + b"".join(wire(p) for p in rest)
    assert r.feed(raw) == [login]
    assert r.buffered == len(raw) - 48
    assert r.parse() == rest
    assert r.buffered == 0


# -- error ordering -------------------------------------------------------------------


def test_recoverable_error_after_pdus_is_raised_by_the_next_call() -> None:
    good1 = NopOut(itt=1, data=b"one")
    bad = bytearray(wire(ScsiCommand(itt=9, read=True)))
    bad[16:20] = b"\xff\xff\xff\xff"  # reserved ITT: Invalid PDU Field
    good2 = NopOut(itt=2, data=b"two")
    r = PDUReader()
    assert r.feed(wire(good1) + bytes(bad) + wire(good2)) == [good1]
    with pytest.raises(InvalidPDUField) as ei:
        r.parse()
    assert ei.value.header == bytes(bad)
    assert r.parse() == [good2]


def test_recoverable_error_first_is_raised_at_once() -> None:
    bad = bytearray(wire(ScsiCommand(itt=9, read=True)))
    bad[16:20] = b"\xff\xff\xff\xff"
    good = NopOut(itt=2)
    r = PDUReader()
    with pytest.raises(InvalidPDUField):
        r.feed(bytes(bad) + wire(good))
    assert r.feed(b"") == [good]


def test_framing_error_after_pdus_then_dead() -> None:
    good = NopOut(itt=1)
    huge = DataOut(itt=1, ttt=1, data=bytes(9000))
    r = PDUReader()
    assert r.feed(wire(good) + wire(huge)[:48]) == [good]
    with pytest.raises(DataSegmentTooLong):
        r.parse()
    with pytest.raises(DataSegmentTooLong):
        r.feed(wire(good))


def test_unknown_opcode_is_skipped_after_the_error() -> None:
    raw = bytearray(wire(NopOut(itt=1, data=b"zz")))
    raw[0] = 0x1F  # not an opcode
    good = NopOut(itt=2)
    r = PDUReader()
    with pytest.raises(ProtocolError) as ei:
        r.feed(bytes(raw) + wire(good))
    assert ei.value.reject_reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert r.parse() == [good]


# -- bookkeeping ----------------------------------------------------------------------


def test_buffered_counts_pending_bytes() -> None:
    pdu = NopOut(itt=1, data=b"12345")
    raw = wire(pdu)
    r = PDUReader()
    assert r.buffered == 0
    for i in range(len(raw) - 1):
        assert r.feed(raw[i : i + 1]) == []
        assert r.buffered == i + 1
    assert r.feed(raw[-1:]) == [pdu]
    assert r.buffered == 0


def test_get_buffer_is_never_empty() -> None:
    r = PDUReader()
    sizes: Sequence[int] = [48, 1, STAGE - 49, 7]
    raw = b"".join(wire(NopOut(itt=i, data=bytes(1000))) for i in range(300))
    pos = 0
    for n in list(sizes) * 3:
        buf = r.get_buffer(-1)
        assert len(buf) > 0
        n = min(n, len(buf), len(raw) - pos)
        if n <= 0:
            break
        buf[:n] = raw[pos : pos + n]
        pos += n
        r.buffer_updated(n)


def test_placement_of_the_wrong_size_is_a_caller_bug() -> None:
    r = PDUReader(placement=lambda hdr, dlen: memoryview(bytearray(dlen + 1)))
    with pytest.raises(ValueError, match="placement returned 6 bytes"):
        r.feed(wire(NopOut(itt=1, data=b"12345")))
    r = PDUReader(placement=lambda hdr, dlen: memoryview(bytes(dlen)))
    with pytest.raises(ValueError, match="read-only"):
        r.feed(wire(NopOut(itt=1, data=b"12345")))
