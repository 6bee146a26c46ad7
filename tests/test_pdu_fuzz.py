"""Property tests of the PDU codec and the stream reader (hypothesis).

* every PDU class round-trips through encode/decode with arbitrary valid
  field values, with and without digests;
* any byte string, fed whole or one byte at a time, yields PDUs or an
  ``iscsi.errors.ProtocolError`` subclass -- never another exception, never
  a hang -- with the same events either way and bounded buffering;
* so do random mutations of valid PDUs.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi.constants import RESERVED_TAG
from iscsi.errors import FramingError, ProtocolError
from iscsi.framing import PDUReader
from iscsi.framing import decode_pdu
from iscsi.pdu import (
    PDU,
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)

# Modest by default (the file runs in seconds); AIOISCSI_FUZZ_EXAMPLES=5000
# for a long soak.
FUZZ = settings(max_examples=int(os.environ.get("AIOISCSI_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
tag = st.integers(0, 0xFFFFFFFE)  # a valid (non-reserved) task tag
lun = st.integers(0, (1 << 64) - 1)
data = st.binary(max_size=600)
isid = st.integers(0, (1 << 48) - 1)


@st.composite
def login_stages(draw: st.DrawFn, check: bool = True) -> dict[str, Any]:
    """T/C/CSG/NSG combinations §11.12.3 allows (any bits if not checked)."""
    if not check:
        return {"transit": draw(st.booleans()), "cont": draw(st.booleans()),
                "csg": draw(st.integers(0, 3)), "nsg": draw(st.integers(0, 3))}
    csg = draw(st.sampled_from([0, 1]))
    transit = draw(st.booleans())
    cont = False if transit else draw(st.booleans())
    nsg = draw(st.sampled_from([n for n in (1, 3) if n > csg])) if transit else draw(
        st.integers(0, 3))
    return {"transit": transit, "cont": cont, "csg": csg, "nsg": nsg}


def _nop_out(d: st.DrawFn) -> PDU:
    itt = d(st.one_of(tag, st.just(RESERVED_TAG)))
    ttt = RESERVED_TAG if itt != RESERVED_TAG else d(u32)
    return NopOut(itt=itt, ttt=ttt, lun=d(lun), cmdsn=d(u32), expstatsn=d(u32),
                  immediate=d(st.booleans()), data=d(data))


def _scsi_command(d: st.DrawFn) -> PDU:
    write = d(st.booleans())
    payload = d(data) if write else b""
    return ScsiCommand(
        itt=d(tag), lun=d(lun), cdb=d(st.binary(min_size=16, max_size=80)),
        expected_data_transfer_length=d(st.integers(len(payload), 0xFFFFFFFF)),
        cmdsn=d(u32), expstatsn=d(u32), read=d(st.booleans()), write=write,
        final=d(st.booleans()) if write else True, attr=d(st.integers(0, 7)),
        immediate=d(st.booleans()), bidi_read_length=d(st.one_of(st.none(), u32)),
        data=payload)


def _scsi_response(d: st.DrawFn) -> PDU:
    o, u = d(st.sampled_from([(False, False), (True, False), (False, True)]))
    big_o, big_u = d(st.sampled_from([(False, False), (True, False), (False, True)]))
    seg = b""
    if d(st.booleans()):
        seg = ScsiResponse.sense_segment(d(st.binary(min_size=1, max_size=252))) + d(
            st.binary(max_size=20))
    return ScsiResponse(itt=d(u32), response=d(u8), status=d(u8), statsn=d(u32),
                        expcmdsn=d(u32), maxcmdsn=d(u32), expdatasn=d(u32),
                        residual_overflow=big_o, residual_underflow=big_u,
                        residual_count=d(u32), bidi_overflow=o, bidi_underflow=u,
                        bidi_residual_count=d(u32), snack_tag=d(u32), data=seg)


def _login_request(d: st.DrawFn) -> PDU:
    return LoginRequest(**d(login_stages()), version_max=d(u8), version_min=d(u8),
                        isid=d(isid), tsih=d(u16), itt=d(u32), cid=d(u16), cmdsn=d(u32),
                        expstatsn=d(u32), data=d(data))


def _login_response(d: st.DrawFn) -> PDU:
    status_class = d(st.sampled_from([0, 1, 2, 3]))
    return LoginResponse(**d(login_stages(check=status_class == 0)), version_max=d(u8),
                         version_active=d(u8), isid=d(isid), tsih=d(u16), itt=d(u32),
                         statsn=d(u32), expcmdsn=d(u32), maxcmdsn=d(u32),
                         status_class=status_class, status_detail=d(u8), data=d(data))


def _final_cont(d: st.DrawFn) -> tuple[bool, bool]:
    return d(st.sampled_from([(True, False), (False, True), (False, False)]))


def _text_request(d: st.DrawFn) -> PDU:
    final, cont = _final_cont(d)
    return TextRequest(final=final, cont=cont, itt=d(tag), ttt=d(u32), lun=d(lun),
                       cmdsn=d(u32), expstatsn=d(u32), immediate=d(st.booleans()),
                       data=d(data))


def _text_response(d: st.DrawFn) -> PDU:
    final, cont = _final_cont(d)
    return TextResponse(final=final, cont=cont, itt=d(u32), ttt=d(u32), lun=d(lun),
                        statsn=d(u32), expcmdsn=d(u32), maxcmdsn=d(u32), data=d(data))


def _data_in(d: st.DrawFn) -> PDU:
    s_bit = d(st.booleans())
    over, under = d(st.sampled_from([(False, False), (True, False), (False, True)]))
    return DataIn(final=True if s_bit else d(st.booleans()), ack=d(st.booleans()),
                  residual_overflow=over, residual_underflow=under, status_present=s_bit,
                  status=d(u8) if s_bit else 0, lun=d(lun), itt=d(u32), ttt=d(u32),
                  statsn=d(u32), expcmdsn=d(u32), maxcmdsn=d(u32), datasn=d(u32),
                  buffer_offset=d(u32), residual_count=d(u32), data=d(data))


BUILDERS: dict[type[PDU], Any] = {
    NopOut: _nop_out,
    NopIn: lambda d: NopIn(itt=d(u32), ttt=d(u32), lun=d(lun), statsn=d(u32),
                           expcmdsn=d(u32), maxcmdsn=d(u32), data=d(data)),
    ScsiCommand: _scsi_command,
    ScsiResponse: _scsi_response,
    TaskMgmtRequest: lambda d: TaskMgmtRequest(
        function=d(st.integers(0, 127)), lun=d(lun), itt=d(u32), referenced_task_tag=d(u32),
        cmdsn=d(u32), expstatsn=d(u32), refcmdsn=d(u32), expdatasn=d(u32),
        immediate=d(st.booleans())),
    TaskMgmtResponse: lambda d: TaskMgmtResponse(response=d(u8), itt=d(u32), statsn=d(u32),
                                                 expcmdsn=d(u32), maxcmdsn=d(u32)),
    LoginRequest: _login_request,
    LoginResponse: _login_response,
    TextRequest: _text_request,
    TextResponse: _text_response,
    DataOut: lambda d: DataOut(final=d(st.booleans()), lun=d(lun), itt=d(u32), ttt=d(u32),
                               expstatsn=d(u32), datasn=d(u32), buffer_offset=d(u32),
                               data=d(data)),
    DataIn: _data_in,
    R2T: lambda d: R2T(lun=d(lun), itt=d(u32), ttt=d(tag), statsn=d(u32), expcmdsn=d(u32),
                       maxcmdsn=d(u32), r2tsn=d(u32), buffer_offset=d(u32),
                       desired_data_transfer_length=d(st.integers(1, 0xFFFFFFFF))),
    LogoutRequest: lambda d: LogoutRequest(reason=d(st.integers(0, 2)), itt=d(u32),
                                           cid=d(u16), cmdsn=d(u32), expstatsn=d(u32),
                                           immediate=d(st.booleans())),
    LogoutResponse: lambda d: LogoutResponse(response=d(u8), itt=d(u32), statsn=d(u32),
                                             expcmdsn=d(u32), maxcmdsn=d(u32),
                                             time2wait=d(u16), time2retain=d(u16)),
    SnackRequest: lambda d: SnackRequest(type=d(st.integers(0, 15)), lun=d(lun), itt=d(u32),
                                         ttt=d(u32), expstatsn=d(u32), begrun=d(u32),
                                         runlength=d(u32)),
    # Async Message and Reject: bytes 16-19 are always 0xffffffff (§11.9, §11.17).
    AsyncMessage: lambda d: AsyncMessage(lun=d(lun), statsn=d(u32), expcmdsn=d(u32),
                                         maxcmdsn=d(u32), async_event=d(u8),
                                         async_vcode=d(u8), parameter1=d(u16),
                                         parameter2=d(u16), parameter3=d(u16), data=d(data)),
    Reject: lambda d: Reject(reason=d(u8), statsn=d(u32), expcmdsn=d(u32), maxcmdsn=d(u32),
                             datasn_r2tsn=d(u32), data=d(data)),
}


@st.composite
def any_pdu(draw: st.DrawFn) -> PDU:
    cls = draw(st.sampled_from(sorted(BUILDERS, key=lambda c: c.__name__)))
    pdu: PDU = BUILDERS[cls](draw)
    return pdu


def test_every_pdu_class_has_a_strategy() -> None:
    from iscsi.pdu import PDU_CLASSES

    assert set(BUILDERS) == set(PDU_CLASSES.values())


@FUZZ
@given(any_pdu(), st.booleans(), st.booleans())
def test_round_trip(pdu: PDU, hd: bool, dd: bool) -> None:
    raw = pdu.to_bytes(hd, dd)
    assert len(raw) % 4 == 0
    got = decode_pdu(raw, header_digest=hd, data_digest=dd)
    assert type(got) is type(pdu)
    assert got == pdu
    assert got.to_bytes(hd, dd) == raw


@FUZZ
@given(st.lists(any_pdu(), min_size=1, max_size=6), st.booleans(), st.booleans(),
       st.integers(1, 200))
def test_stream_round_trip(pdus: list[PDU], hd: bool, dd: bool, chunk: int) -> None:
    raw = b"".join(p.to_bytes(hd, dd) for p in pdus)
    r = PDUReader(max_data_segment_length=8192, header_digest=hd, data_digest=dd)
    got: list[PDU] = []
    for i in range(0, len(raw), chunk):
        got.extend(r.feed(raw[i : i + chunk]))
    while more := r.feed(b""):  # past Login PDUs, where parsing pauses
        got.extend(more)
    assert got == pdus
    assert r.buffered == 0


# -- arbitrary input ---------------------------------------------------------------

MAX_DSL = 4096
LIMIT = 256 * 1024 + MAX_DSL + 48 + 1024 + 4 + 3 + 4


Event = Any  # a PDU or an exception class


def run(reader: PDUReader, chunks: list[bytes]) -> list[Event]:
    """Feed chunks like an adapter: keep going after recoverable errors,
    stop at a framing error; return the PDUs and error types seen."""
    events: list[Event] = []

    def call(chunk: bytes) -> list[PDU]:
        try:
            return reader.feed(chunk)
        except ProtocolError as exc:  # anything else fails the test
            assert str(exc)
            assert exc.header is None or len(exc.header) == 48
            events.append(type(exc))
            if isinstance(exc, FramingError):
                raise
            return []
        finally:
            assert reader.buffered <= LIMIT

    try:
        for chunk in chunks:
            events.extend(call(chunk))
        for _ in range(10_000):  # drain: past Login PDUs and pending errors
            before = len(events)
            events.extend(call(b""))
            if len(events) == before:
                break
        else:  # pragma: no cover
            raise AssertionError("reader never stops producing events")
    except FramingError:
        pass
    return events


def both_ways(raw: bytes, hd: bool, dd: bool) -> list[Event]:
    whole = run(PDUReader(max_data_segment_length=MAX_DSL, header_digest=hd,
                          data_digest=dd), [raw])
    bytewise = run(PDUReader(max_data_segment_length=MAX_DSL, header_digest=hd,
                             data_digest=dd), [raw[i : i + 1] for i in range(len(raw))])
    assert whole == bytewise
    return whole


@FUZZ
@given(st.binary(max_size=1500), st.booleans(), st.booleans())
def test_arbitrary_bytes(raw: bytes, hd: bool, dd: bool) -> None:
    both_ways(raw, hd, dd)


@st.composite
def plausible_stream(draw: st.DrawFn) -> bytes:
    """Random bytes that look like PDU headers: a known opcode and a small
    DataSegmentLength, so that decoding gets past the framing checks."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        hdr = bytearray(draw(st.binary(min_size=48, max_size=48)))
        hdr[0] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x20,
                                       0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3F,
                                       0x41, 0x43, 0x1C]))
        hdr[4] = draw(st.integers(0, 3))
        dlen = draw(st.integers(0, 70))
        hdr[5:8] = dlen.to_bytes(3, "big")
        body = draw(st.binary(min_size=hdr[4] * 4 + dlen + (-dlen & 3),
                              max_size=hdr[4] * 4 + dlen + (-dlen & 3)))
        out += bytes(hdr) + body
    return out


@FUZZ
@given(plausible_stream())
def test_plausible_headers(raw: bytes) -> None:
    both_ways(raw, False, False)


@FUZZ
@given(st.lists(any_pdu(), min_size=1, max_size=3), st.booleans(), st.booleans(),
       st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert"]),
                          st.integers(0, 10_000), u8), min_size=1, max_size=5))
def test_mutated_pdus(pdus: list[PDU], hd: bool, dd: bool,
                      mutations: list[tuple[str, int, int]]) -> None:
    raw = bytearray(b"".join(p.to_bytes(hd, dd) for p in pdus))
    for op, pos, value in mutations:
        if not raw:
            break
        pos %= len(raw)
        if op == "flip":
            raw[pos] ^= value or 1
        elif op == "set":
            raw[pos] = value
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = bytes([value])
    both_ways(bytes(raw), hd, dd)
    try:
        decode_pdu(bytes(raw), header_digest=hd, data_digest=dd)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_with_placement(raw: bytes) -> None:
    buffers: list[bytearray] = []

    def place(hdr: bytes, dlen: int) -> memoryview | None:
        if hdr[1] & 1:
            return None
        buffers.append(bytearray(dlen))
        return memoryview(buffers[-1])

    run(PDUReader(max_data_segment_length=MAX_DSL, placement=place), [raw])
    run(PDUReader(max_data_segment_length=MAX_DSL, placement=place),
        [raw[i : i + 1] for i in range(len(raw))])
