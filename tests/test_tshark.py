"""Cross-check the codec against an independent decoder: Wireshark's iSCSI
dissector (tshark).

A whole session is built with our encoder -- login with real key=value
text, a SendTargets exchange, a READ(10) answered by two Data-In PDUs (the
last with status), a WRITE(10) with immediate data then R2T and Data-Out,
a NOP-Out/NOP-In ping and a logout -- once without digests and once with
HeaderDigest=CRC32C and DataDigest=CRC32C negotiated in the login text.
The bytes go into a pcap (tests/pcap.py) and tshark must decode every PDU
as the opcode and field values we meant, find every digest good, and report
no malformed packet and no expert error or warning.

Wireshark 4.0 has no digest preferences any more (the old
``iscsi.header_digest_is_crc32c`` / ``enable_data_digests`` are gone): it
learns HeaderDigest/DataDigest from the login key=value text it dissects, so
the login PDUs of the capture are what turn digest checking on. The digests
are reported "Good CRC32" only if ours are right; a negative control
corrupts one and expects "Bad CRC32".
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iscsi.constants import RESERVED_TAG, LogoutReason, Opcode, Stage
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
    decode_lun,
    encode_lun,
)
from tests.pcap import write_session_pcap
from tests.tools import require_tool

pytestmark = pytest.mark.interop

ISID = 0x400001370000
TSIH = 0x0042
LUN = encode_lun(1)
INITIATOR = "iqn.2026-11.org.example:init"
TARGET = "iqn.2026-11.org.example:disk"


@dataclass(frozen=True)
class Sent:
    """One PDU of the session and the side that sends it."""

    from_initiator: bool
    pdu: PDU


def session(digests: bool) -> list[Sent]:
    """The PDUs of a short but complete session, in wire order."""
    digest_value = b"CRC32C" if digests else b"None"
    # Key=value text written out by hand (RFC 7143 §6.1, §13): iscsi/text.py
    # is not used so that this test checks the codec alone.
    security = (b"InitiatorName=" + INITIATOR.encode() + b"\0"
                b"InitiatorAlias=aioiscsi test\0"
                b"SessionType=Normal\0"
                b"TargetName=" + TARGET.encode() + b"\0"
                b"AuthMethod=None\0")
    operational = (b"HeaderDigest=" + digest_value + b"\0"
                   b"DataDigest=" + digest_value + b"\0"
                   b"MaxRecvDataSegmentLength=262144\0"
                   b"InitialR2T=Yes\0"
                   b"ImmediateData=Yes\0"
                   b"MaxBurstLength=262144\0"
                   b"FirstBurstLength=65536\0"
                   b"ErrorRecoveryLevel=0\0")
    answer = (b"HeaderDigest=" + digest_value + b"\0"
              b"DataDigest=" + digest_value + b"\0"
              b"MaxRecvDataSegmentLength=65536\0"
              b"InitialR2T=Yes\0"
              b"ImmediateData=Yes\0"
              b"MaxBurstLength=262144\0"
              b"FirstBurstLength=65536\0"
              b"ErrorRecoveryLevel=0\0")
    read10 = bytes.fromhex("28000000010000000200") + bytes(6)   # LBA 0x100, 2 blocks
    write10 = bytes.fromhex("2a000000020000000200") + bytes(6)  # LBA 0x200, 2 blocks
    block_a = bytes(range(256)) * 2
    block_b = bytes(range(255, -1, -1)) * 2
    return [
        Sent(True, LoginRequest(transit=True, csg=Stage.SECURITY_NEGOTIATION,
                                nsg=Stage.LOGIN_OPERATIONAL_NEGOTIATION, isid=ISID, tsih=0,
                                itt=0x0A000000, cid=1, cmdsn=0x00000010, expstatsn=0,
                                data=security)),
        Sent(False, LoginResponse(transit=True, csg=Stage.SECURITY_NEGOTIATION,
                                  nsg=Stage.LOGIN_OPERATIONAL_NEGOTIATION, isid=ISID,
                                  tsih=0, itt=0x0A000000, statsn=0x00000500,
                                  expcmdsn=0x00000010, maxcmdsn=0x00000010,
                                  data=b"TargetPortalGroupTag=1\0AuthMethod=None\0")),
        Sent(True, LoginRequest(transit=True, csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                                nsg=Stage.FULL_FEATURE_PHASE, isid=ISID, tsih=0,
                                itt=0x0A000001, cid=1, cmdsn=0x00000010,
                                expstatsn=0x00000501, data=operational)),
        Sent(False, LoginResponse(transit=True, csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                                  nsg=Stage.FULL_FEATURE_PHASE, isid=ISID, tsih=TSIH,
                                  itt=0x0A000001, statsn=0x00000501, expcmdsn=0x00000010,
                                  maxcmdsn=0x00000030, data=answer)),
        # Full Feature Phase: digests (if negotiated) from here on.
        Sent(True, TextRequest(itt=0x0B000001, ttt=RESERVED_TAG, cmdsn=0x00000010,
                               expstatsn=0x00000502, data=b"SendTargets=All\0")),
        Sent(False, TextResponse(itt=0x0B000001, ttt=RESERVED_TAG, statsn=0x00000502,
                                 expcmdsn=0x00000011, maxcmdsn=0x00000031,
                                 data=(b"TargetName=" + TARGET.encode() + b"\0"
                                       b"TargetAddress=192.0.2.1:3260,1\0"))),
        Sent(True, ScsiCommand(itt=0x0C000001, lun=LUN, cdb=read10,
                               expected_data_transfer_length=1024, cmdsn=0x00000011,
                               expstatsn=0x00000503, read=True)),
        Sent(False, DataIn(itt=0x0C000001, lun=LUN, final=False, datasn=0, buffer_offset=0,
                           expcmdsn=0x00000012, maxcmdsn=0x00000032, data=block_a)),
        Sent(False, DataIn(itt=0x0C000001, lun=LUN, final=True, status_present=True, status=0,
                           datasn=1, buffer_offset=512, statsn=0x00000503,
                           expcmdsn=0x00000012, maxcmdsn=0x00000032, data=block_b)),
        Sent(True, ScsiCommand(itt=0x0C000002, lun=LUN, cdb=write10,
                               expected_data_transfer_length=1024, cmdsn=0x00000012,
                               expstatsn=0x00000504, write=True, final=True, data=block_a)),
        Sent(False, R2T(itt=0x0C000002, lun=LUN, ttt=0x00000777, statsn=0x00000504,
                        expcmdsn=0x00000013, maxcmdsn=0x00000033, r2tsn=0,
                        buffer_offset=512, desired_data_transfer_length=512)),
        Sent(True, DataOut(itt=0x0C000002, lun=LUN, ttt=0x00000777, final=True,
                           expstatsn=0x00000504, datasn=0, buffer_offset=512, data=block_b)),
        Sent(False, ScsiResponse(itt=0x0C000002, status=0, statsn=0x00000504,
                                 expcmdsn=0x00000013, maxcmdsn=0x00000033, expdatasn=0)),
        Sent(True, NopOut(itt=0x0D000001, ttt=RESERVED_TAG, lun=0, cmdsn=0x00000013,
                          expstatsn=0x00000505, immediate=True, data=b"are you there?")),
        Sent(False, NopIn(itt=0x0D000001, ttt=RESERVED_TAG, lun=0, statsn=0x00000505,
                          expcmdsn=0x00000013, maxcmdsn=0x00000033, data=b"are you there?")),
        Sent(True, LogoutRequest(reason=LogoutReason.CLOSE_SESSION, itt=0x0E000001, cid=1,
                                 cmdsn=0x00000013, expstatsn=0x00000506, immediate=True)),
        Sent(False, LogoutResponse(itt=0x0E000001, statsn=0x00000506, expcmdsn=0x00000014,
                                   maxcmdsn=0x00000034, time2wait=0, time2retain=0)),
    ]


def session_messages(sent: list[Sent], digests: bool) -> list[tuple[bool, bytes]]:
    """Each PDU encoded as it goes on the wire: login PDUs never carry
    digests (RFC 7143 §13.1), Full Feature Phase ones do if negotiated."""
    out = []
    for s in sent:
        ffp = s.pdu.opcode not in (Opcode.LOGIN_REQUEST, Opcode.LOGIN_RESPONSE)
        out.append((s.from_initiator, s.pdu.to_bytes(digests and ffp, digests and ffp)))
    return out


# -- running tshark ------------------------------------------------------------------


def tshark_json(pcap: Path) -> list[dict[str, Any]]:
    tshark = require_tool("tshark")
    cmd = [
        tshark, "-n", "-r", str(pcap), "-T", "json", "--no-duplicate-keys",
        "-o", "tcp.desegment_tcp_streams:TRUE",
        "-o", "iscsi.desegment_iscsi_messages:TRUE",
        "-o", "iscsi.target_ports:3260",
        "-o", "iscsi.demand_good_f_bit:TRUE",
    ]
    env = dict(os.environ, HOME=str(pcap.parent))  # no user preferences
    res = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    packets: list[dict[str, Any]] = json.loads(res.stdout)
    return packets


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def iscsi_frames(packets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The layers above TCP of every frame that carries iSCSI. Each of our
    PDUs is sent in its own TCP segment, so there is one PDU per frame; the
    iSCSI dissector hangs some fields (SCSI Command flags, the SCSI layer)
    beside its own layer, so the whole frame is kept."""
    out: list[dict[str, Any]] = []
    for pkt in packets:
        layers = pkt["_source"]["layers"]
        if "iscsi" in layers:
            assert not isinstance(layers["iscsi"], list), "two PDUs in one frame"
            out.append({k: v for k, v in layers.items()
                        if k not in ("frame", "eth", "ip", "tcp")})
    return out


def find_all(tree: Any, key: str) -> list[Any]:
    """All values of ``key`` anywhere in a tshark JSON subtree."""
    found: list[Any] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                found.extend(_as_list(v))
            found.extend(find_all(v, key))
    elif isinstance(tree, list):
        for v in tree:
            found.extend(find_all(v, key))
    return found


def one(tree: Any, key: str) -> str:
    values = find_all(tree, key)
    assert len(values) == 1, f"{key}: {values!r}"
    return str(values[0])


def num(tree: Any, key: str) -> int:
    return int(one(tree, key), 0)


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
def test_tshark_decodes_session(tmp_path: Path, digests: bool) -> None:
    sent = session(digests)
    pcap = tmp_path / "session.pcap"
    write_session_pcap(str(pcap), session_messages(sent, digests))
    packets = tshark_json(pcap)
    pdus = iscsi_frames(packets)
    assert len(pdus) == len(sent), [find_all(p, "iscsi.opcode") for p in pdus]

    # Nothing malformed, no expert info of warning/error severity anywhere.
    for pkt in packets:
        layers = pkt["_source"]["layers"]
        assert "_ws.malformed" not in json.dumps(layers), layers
        for sev in find_all(layers, "_ws.expert.severity"):
            assert int(sev, 0) < 0x00600000, layers  # below PI_WARN

    for s, got in zip(sent, pdus):
        check_pdu(s.pdu, got, digests)


def check_pdu(pdu: PDU, got: dict[str, Any], digests: bool) -> None:
    """Compare one tshark-decoded PDU with the object we encoded."""
    name = type(pdu).__name__
    assert num(got, "iscsi.opcode") == pdu.opcode, name
    assert num(got, "iscsi.initiatortasktag") == pdu.itt, name
    assert num(got, "iscsi.datasegmentlength") == len(bytes(pdu.data)), name
    fields: dict[str, int] = {}
    if isinstance(pdu, (LoginRequest, LoginResponse)):
        fields |= {"iscsi.login.csg": pdu.csg, "iscsi.login.nsg": pdu.nsg,
                   "iscsi.tsih": pdu.tsih}
        assert bytes.fromhex(one(got, "iscsi.isid").replace(":", "")) == \
            pdu.isid.to_bytes(6, "big")
        keys = [k.encode() + b"\0" for k in find_all(got, "iscsi.keyvalue")]
        assert b"".join(keys) == bytes(pdu.data), name
    if isinstance(pdu, LoginRequest):
        fields |= {"iscsi.cid": pdu.cid, "iscsi.cmdsn": pdu.cmdsn,
                   "iscsi.expstatsn": pdu.expstatsn}
    if isinstance(pdu, LoginResponse):
        fields |= {"iscsi.statsn": pdu.statsn, "iscsi.expcmdsn": pdu.expcmdsn,
                   "iscsi.maxcmdsn": pdu.maxcmdsn, "iscsi.login.status": pdu.status}
    if isinstance(pdu, (TextRequest, NopOut)):
        fields |= {"iscsi.targettransfertag": pdu.ttt, "iscsi.cmdsn": pdu.cmdsn,
                   "iscsi.expstatsn": pdu.expstatsn}
    if isinstance(pdu, (TextResponse, NopIn)):
        fields |= {"iscsi.targettransfertag": pdu.ttt, "iscsi.statsn": pdu.statsn,
                   "iscsi.expcmdsn": pdu.expcmdsn, "iscsi.maxcmdsn": pdu.maxcmdsn}
    if isinstance(pdu, (TextRequest, TextResponse)):
        keys = [k.encode() + b"\0" for k in find_all(got, "iscsi.keyvalue")]
        assert b"".join(keys) == bytes(pdu.data), name
    if isinstance(pdu, ScsiCommand):
        fields |= {"iscsi.cmdsn": pdu.cmdsn, "iscsi.expstatsn": pdu.expstatsn,
                   "iscsi.scsicommand.expecteddatatransferlength":
                       pdu.expected_data_transfer_length}
        flags = find_all(got, "iscsi.scsicommand.R") + find_all(got, "iscsi.scsicommand.W")
        assert [int(f, 0) for f in flags] == [int(pdu.read), int(pdu.write)], name
    if isinstance(pdu, DataIn):
        fields |= {"iscsi.datasn": pdu.datasn, "iscsi.bufferOffset": pdu.buffer_offset,
                   "iscsi.expcmdsn": pdu.expcmdsn, "iscsi.maxcmdsn": pdu.maxcmdsn,
                   "iscsi.scsidata.S": int(pdu.status_present),
                   "iscsi.scsidata.F": int(pdu.final)}
        if pdu.status_present:
            fields |= {"iscsi.statsn": pdu.statsn}
    if isinstance(pdu, DataOut):
        fields |= {"iscsi.datasn": pdu.datasn, "iscsi.bufferOffset": pdu.buffer_offset,
                   "iscsi.targettransfertag": pdu.ttt, "iscsi.expstatsn": pdu.expstatsn}
    if isinstance(pdu, R2T):
        fields |= {"iscsi.r2tsn": pdu.r2tsn, "iscsi.bufferOffset": pdu.buffer_offset,
                   "iscsi.desireddatalength": pdu.desired_data_transfer_length,
                   "iscsi.targettransfertag": pdu.ttt, "iscsi.statsn": pdu.statsn}
    if isinstance(pdu, ScsiResponse):
        fields |= {"iscsi.statsn": pdu.statsn, "iscsi.expcmdsn": pdu.expcmdsn,
                   "iscsi.maxcmdsn": pdu.maxcmdsn, "iscsi.expdatasn": pdu.expdatasn,
                   "iscsi.scsiresponse.status": pdu.status,
                   "iscsi.scsiresponse.response": pdu.response}
    if isinstance(pdu, LogoutRequest):
        fields |= {"iscsi.logout.reason": pdu.reason, "iscsi.cid": pdu.cid,
                   "iscsi.cmdsn": pdu.cmdsn, "iscsi.expstatsn": pdu.expstatsn}
    if isinstance(pdu, LogoutResponse):
        fields |= {"iscsi.logout.response": pdu.response, "iscsi.statsn": pdu.statsn,
                   "iscsi.time2wait": pdu.time2wait, "iscsi.time2retain": pdu.time2retain}
    for key, want in fields.items():
        assert num(got, key) == want, f"{name}: {key}"
    if isinstance(pdu, (ScsiCommand, DataIn, DataOut)):
        luns = find_all(got, "scsi.lun")
        assert luns and {int(v, 0) for v in luns} == {decode_lun(pdu.lun)}, name
    # The payload as tshark shows it (it shows a Data-In's data only with
    # the final PDU of the sequence).
    payload = [bytes.fromhex(v.replace(":", "")) for key in
               ("data.data", "iscsi.immediatedata", "iscsi.pingdata")
               for v in find_all(got, key)]
    if payload or isinstance(pdu, (DataOut, NopOut, NopIn)) or (
            isinstance(pdu, ScsiCommand) and pdu.data) or (
            isinstance(pdu, DataIn) and pdu.final):
        assert payload == [bytes(pdu.data)], name
    ffp = not isinstance(pdu, (LoginRequest, LoginResponse))
    hd = find_all(got, "iscsi.headerdigest32")
    dd = find_all(got, "iscsi.datadigest32")
    if digests and ffp:
        raw = pdu.to_bytes(True, True)
        # tshark shows the 4 digest bytes read big-endian.
        assert [int(v, 0) for v in hd] == [int.from_bytes(raw[48:52], "big")], name
        if len(bytes(pdu.data)):
            assert [int(v, 0) for v in dd] == [int.from_bytes(raw[-4:], "big")], name
        else:
            assert dd == [], name
    else:
        assert hd == [] and dd == [], name


def tshark_verbose(pcap: Path) -> str:
    tshark = require_tool("tshark")
    res = subprocess.run([tshark, "-n", "-r", str(pcap), "-V"], capture_output=True,
                         env=dict(os.environ, HOME=str(pcap.parent)), timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res.stdout.decode(errors="replace")


def test_tshark_finds_every_digest_good(tmp_path: Path) -> None:
    sent = session(True)
    messages = session_messages(sent, True)
    pcap = tmp_path / "digests.pcap"
    write_session_pcap(str(pcap), messages)
    text = tshark_verbose(pcap)
    ffp = [s.pdu for s in sent if s.pdu.opcode not in (Opcode.LOGIN_REQUEST,
                                                       Opcode.LOGIN_RESPONSE)]
    with_data = [p for p in ffp if len(bytes(p.data))]
    assert text.count("HeaderDigest: ") == len(ffp)
    assert text.count("DataDigest: ") == len(with_data)
    assert text.count("(Good CRC32)") == len(ffp) + len(with_data)
    assert "Bad CRC32" not in text


@pytest.mark.parametrize("where", ["header", "data"])
def test_tshark_sees_a_corrupted_digest(tmp_path: Path, where: str) -> None:
    # Negative control: the checks above would notice a wrong digest.
    sent = session(True)
    messages = session_messages(sent, True)
    index = next(i for i, s in enumerate(sent) if isinstance(s.pdu, DataOut))
    from_initiator, raw = messages[index]
    bad = bytearray(raw)
    bad[51 if where == "header" else -1] ^= 0x01
    messages[index] = (from_initiator, bytes(bad))
    pcap = tmp_path / "bad.pcap"
    write_session_pcap(str(pcap), messages)
    assert "Bad CRC32" in tshark_verbose(pcap)


def other_pdus() -> list[Sent]:
    """The PDU types the session above does not use."""
    sense = bytes.fromhex("700005000000000a00000000240000000000")
    cdb32 = bytes.fromhex("7f000000000000180009000000000000") + bytes(range(0xA0, 0xB0))
    tmf = TaskMgmtRequest(function=1, lun=LUN, itt=0x0F000001,
                          referenced_task_tag=0x0C000001, cmdsn=0x00000013,
                          expstatsn=0x00000505, refcmdsn=0x00000011, expdatasn=0,
                          immediate=True)
    return [
        Sent(True, ScsiCommand(itt=0x0C000003, lun=LUN, cdb=cdb32,
                               expected_data_transfer_length=0x200, cmdsn=0x00000013,
                               expstatsn=0x00000505, read=True, write=True,
                               bidi_read_length=0x400, data=bytes(range(200)))),
        Sent(False, ScsiResponse(itt=0x0C000003, status=0x02, statsn=0x00000505,
                                 expcmdsn=0x00000014, maxcmdsn=0x00000034, expdatasn=1,
                                 residual_underflow=True, residual_count=0x100,
                                 bidi_overflow=True, bidi_residual_count=0x20,
                                 data=ScsiResponse.sense_segment(sense))),
        Sent(True, tmf),
        Sent(False, TaskMgmtResponse(response=1, itt=0x0F000001, statsn=0x00000506,
                                     expcmdsn=0x00000014, maxcmdsn=0x00000034)),
        Sent(True, SnackRequest(type=1, lun=0, itt=RESERVED_TAG, ttt=RESERVED_TAG,
                                expstatsn=0x00000505, begrun=0x00000505, runlength=2)),
        Sent(False, AsyncMessage(lun=0, statsn=0x00000507, expcmdsn=0x00000014,
                                 maxcmdsn=0x00000034, async_event=1, async_vcode=0x11,
                                 parameter1=0x2222, parameter2=0x3333, parameter3=5)),
        Sent(False, Reject(reason=0x09, statsn=0x00000508, expcmdsn=0x00000014,
                           maxcmdsn=0x00000034, datasn_r2tsn=0,
                           data=tmf.to_bytes()[:48])),
    ]


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
def test_tshark_decodes_other_pdus(tmp_path: Path, digests: bool) -> None:
    sent = session(digests)[:4] + other_pdus()
    pcap = tmp_path / "other.pcap"
    write_session_pcap(str(pcap), session_messages(sent, digests))
    packets = tshark_json(pcap)
    frames = iscsi_frames(packets)
    assert len(frames) == len(sent)
    for pkt in packets:
        layers = pkt["_source"]["layers"]
        assert "_ws.malformed" not in json.dumps(layers), layers
        for sev in find_all(layers, "_ws.expert.severity"):
            assert int(sev, 0) < 0x00600000, layers
    for s, got in zip(sent[4:], frames[4:]):
        pdu = s.pdu
        name = type(pdu).__name__
        rejected = got["iscsi"].pop("Rejected Header", None)
        assert num(got, "iscsi.opcode") == pdu.opcode, name
        # tshark leaves DataSegmentLength out of some PDUs (TMF Response).
        assert [int(v, 0) for v in find_all(got, "iscsi.datasegmentlength")] in (
            [len(bytes(pdu.data))], [] if not pdu.data else [-1]), name
        fields: dict[str, int] = {}
        if isinstance(pdu, ScsiCommand):
            assert pdu.bidi_read_length is not None
            fields |= {"iscsi.totalahslength": 7, "iscsi.ahs.bidir.length":
                       pdu.bidi_read_length, "iscsi.initiatortasktag": pdu.itt}
            assert [int(v, 0) for v in find_all(got, "iscsi.ahs.type")] == [1, 2]
            assert [int(v, 0) for v in find_all(got, "iscsi.ahs.length")] == [17, 5]
            ext = one(got, "iscsi.ahs.extended_cdb").replace(":", "")
            assert bytes.fromhex(ext) == pdu.cdb[16:]
        if isinstance(pdu, ScsiResponse):
            fields |= {"iscsi.scsiresponse.status": pdu.status,
                       "iscsi.scsiresponse.senselength": len(pdu.sense),
                       "iscsi.scsiresponse.residualcount": pdu.residual_count,
                       "iscsi.scsiresponse.bidireadresidualcount": pdu.bidi_residual_count,
                       "iscsi.scsiresponse.o": 1, "iscsi.scsiresponse.u": 0,
                       "iscsi.scsiresponse.O": 0, "iscsi.scsiresponse.U": 1,
                       "iscsi.expdatasn": pdu.expdatasn, "iscsi.statsn": pdu.statsn}
        if isinstance(pdu, TaskMgmtRequest):
            fields |= {"iscsi.taskmanfun.function": pdu.function,
                       "iscsi.taskmanfun.referencedtasktag": pdu.referenced_task_tag,
                       "iscsi.refcmdsn": pdu.refcmdsn, "iscsi.cmdsn": pdu.cmdsn,
                       "iscsi.expstatsn": pdu.expstatsn, "iscsi.initiatortasktag": pdu.itt}
        if isinstance(pdu, TaskMgmtResponse):
            fields |= {"iscsi.taskmanfun.response": pdu.response, "iscsi.statsn": pdu.statsn,
                       "iscsi.expcmdsn": pdu.expcmdsn, "iscsi.maxcmdsn": pdu.maxcmdsn}
        if isinstance(pdu, SnackRequest):
            fields |= {"iscsi.snack.type": pdu.type, "iscsi.snack.begrun": pdu.begrun,
                       "iscsi.snack.runlength": pdu.runlength, "iscsi.expstatsn": pdu.expstatsn}
        if isinstance(pdu, AsyncMessage):
            fields |= {"iscsi.asyncevent": pdu.async_event,
                       "iscsi.eventvendorcode": pdu.async_vcode,
                       "iscsi.parameter1": pdu.parameter1, "iscsi.parameter2": pdu.parameter2,
                       "iscsi.parameter3": pdu.parameter3, "iscsi.statsn": pdu.statsn,
                       "iscsi.maxcmdsn": pdu.maxcmdsn}
        if isinstance(pdu, Reject):
            fields |= {"iscsi.reject.reason": pdu.reason, "iscsi.statsn": pdu.statsn,
                       "iscsi.maxcmdsn": pdu.maxcmdsn}
            # The data segment is the rejected header, which tshark decodes.
            assert rejected is not None
            assert num(rejected, "iscsi.opcode") == Opcode.TASK_MGMT_REQUEST
            assert num(rejected, "iscsi.initiatortasktag") == 0x0F000001
        else:
            assert rejected is None
        for key, want in fields.items():
            assert num(got, key) == want, f"{name}: {key}"
        hd = find_all(got, "iscsi.headerdigest32")
        dd = find_all(got, "iscsi.datadigest32")
        assert len(hd) == int(digests), name
        if not isinstance(pdu, Reject):  # tshark shows no data digest for a Reject
            assert len(dd) == int(digests and bool(pdu.data)), name
    if digests:
        text = tshark_verbose(pcap)
        assert "Bad CRC32" not in text
        assert text.count("(Good CRC32)") >= len(sent) - 4
