"""iSNS (RFC 4171): the codec on its own, then our target registering with
open-isns' isnsd and our initiator discovering through it (issue 15)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from initiator.isns import discover_isns
from iscsi.isns import (
    Attribute,
    Flag,
    Function,
    IsnsError,
    Message,
    MessageReader,
    NodeInfo,
    PortalInfo,
    Tag,
    decode_attributes,
    dev_attr_qry,
    dev_attr_reg,
    encode_attributes,
    encode_message,
    parse_query_response,
)
from target.config import LunSpec, TargetSpec
from tests.target_fixture import RunningTarget, make_config
from tests.tgt import free_port
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ codec


def test_header_and_tlv_layout() -> None:
    """RFC 4171 §5.1: version 1, function, PDU length, flags, xid, seq;
    §5.5: strings NUL-terminated and padded to 4 bytes."""
    msg = Message(Function.DEV_ATTR_QRY, 0x1234,
                  (Attribute.string(Tag.ISCSI_NAME, "iqn.x"), Attribute(Tag.DELIMITER)))
    (pdu,) = encode_message(msg)
    assert pdu[:12] == bytes.fromhex("0001" "0002" "0018" "8c00" "1234" "0000")
    assert pdu[12:20] == bytes.fromhex("00000020" "00000008")
    assert pdu[20:28] == b"iqn.x\0\0\0"
    assert pdu[28:] == bytes(8)
    assert Attribute.ip(Tag.PORTAL_IP_ADDRESS, "10.1.2.3").value == \
        bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert Attribute.ip(Tag.PORTAL_IP_ADDRESS, "10.1.2.3").as_ip() == "10.1.2.3"


def test_response_round_trip_split_over_pdus() -> None:
    attrs = tuple(Attribute.string(Tag.ISCSI_NAME, f"iqn.2026-12.org.t:{i:05d}" + "x" * 200)
                  for i in range(600))  # > 64 KiB: several PDUs (§5.1.3)
    msg = Message(Function.DEV_ATTR_QRY_RSP, 7, attrs, Flag.SERVER, status=0)
    pdus = encode_message(msg)
    assert len(pdus) > 1
    reader = MessageReader()
    got: list[Message] = []
    for pdu in pdus:
        got += reader.feed(pdu)
    assert len(got) == 1 and got[0].attributes == attrs and got[0].status == 0
    # one byte at a time
    reader = MessageReader()
    got = [m for b in b"".join(pdus) for m in reader.feed(bytes([b]))]
    assert len(got) == 1 and got[0].attributes == attrs


@pytest.mark.parametrize("raw, why", [
    (b"\0\0\0\x20\0\0\0\x08abc", "runs past"),
    (b"\0\0\0\x20\0\0\0\x05abcdefgh", "multiple of 4"),
    (b"\0\0\0\x20\0\0", "truncated"),
])
def test_hostile_tlvs_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(IsnsError, match=why):
        decode_attributes(raw)


def test_hostile_pdus_are_refused() -> None:
    with pytest.raises(IsnsError, match="version"):
        MessageReader().feed(bytes.fromhex("0002 0001 0000 8c00 0001 0000"))
    with pytest.raises(IsnsError, match="sequence"):
        MessageReader().feed(bytes.fromhex("0001 8001 0004 4800 0001 0003 00000000"))
    with pytest.raises(IsnsError, match="no status"):
        MessageReader().feed(bytes.fromhex("0001 8001 0000 4c00 0001 0000"))
    with pytest.raises(IsnsError, match="exceeds"):
        MessageReader(max_message=16).feed(
            bytes.fromhex("0001 8002 0014 4400 0001 0000") + bytes(20))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_isns_error(data: bytes) -> None:
    try:
        for m in MessageReader(max_message=4096).feed(data):
            parse_query_response(m)
    except IsnsError:
        pass
    try:
        decode_attributes(data)
    except IsnsError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1),
                          st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4))),
                max_size=20))
def test_tlv_round_trip(tlvs: list[tuple[int, bytes]]) -> None:
    attrs = tuple(Attribute(t, v) for t, v in tlvs)
    assert decode_attributes(encode_attributes(attrs)) == attrs


def test_query_answer_groups_nodes_portals_and_portal_groups() -> None:
    reg = dev_attr_reg(1, "iqn.a", "ent", [PortalInfo("127.0.0.1", 3260, 1)],
                       [NodeInfo("iqn.a", "A", (PortalInfo("127.0.0.1", 3260, 1),))])
    # What a server sends back is shaped like the registration's operating
    # attributes after a key and a delimiter.
    ops = reg.attributes[3:]
    rsp = Message(Function.DEV_ATTR_QRY_RSP, 1, (Attribute.u32(Tag.ISCSI_NODE_TYPE, 1),
                                                 Attribute(Tag.DELIMITER), *ops), status=0)
    (node,) = parse_query_response(rsp)
    assert (node.name, node.alias, node.portals) == ("iqn.a", "A", [("127.0.0.1", 3260, 1)])
    assert dev_attr_qry(2, "iqn.i").attributes[1] == Attribute.u32(Tag.ISCSI_NODE_TYPE, 1)


# ------------------------------------------------------------ with isnsd


class Isnsd:
    """open-isns' server on loopback, its state in a temporary directory."""

    def __init__(self, tmp: Path, period: int = 0) -> None:
        self.tool = require_tool("isnsd")
        self.adm = require_tool("isnsadm")
        self.port = free_port()
        self.dir = tmp
        (tmp / "db").mkdir()
        common = (f"ServerAddress = 127.0.0.1:{self.port}\n"
                  f"ControlSocket = {tmp}/isnsctl\nSecurity = 0\n")
        (tmp / "isnsd.conf").write_text(
            common + f"BindAddress = 127.0.0.1:{self.port}\nPIDFile = {tmp}/isnsd.pid\n"
            f"Database = {tmp}/db\nDefaultDiscoveryDomain = 1\nRegistrationPeriod = {period}\n"
            "SLPRegister = 0\nESIRetries = 0\n")
        (tmp / "isnsadm.conf").write_text(common + "SourceName = iqn.2026-12.org.test:adm\n")
        self.proc = subprocess.Popen([self.tool, "-f", "-4", "-c", str(tmp / "isnsd.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + 20
        while True:  # bounded wait for the listening socket
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"isnsd did not start: {self.proc.stderr!r}")
                time.sleep(0.02)
        self.address = f"127.0.0.1:{self.port}"

    def nodes(self) -> str:
        """isnsadm's own view of the database (its local control socket)."""
        return subprocess.run([self.adm, "-c", str(self.dir / "isnsadm.conf"), "--local",
                               "--list", "nodes"], capture_output=True, text=True,
                              timeout=30).stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def isnsd(tmp_path: Path) -> Iterator[Isnsd]:
    srv = Isnsd(tmp_path)
    try:
        yield srv
    finally:
        srv.stop()


def _until(cond: object, what: str) -> None:
    end = time.monotonic() + 20
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


A = "iqn.2026-12.org.aioiscsi.test:isns-a"
B = "iqn.2026-12.org.aioiscsi.test:isns-b"
C = "iqn.2026-12.org.aioiscsi.test:isns-c"


@pytest.mark.interop
async def test_target_registers_and_initiator_discovers(isnsd: Isnsd) -> None:
    b = TargetSpec(name=B, luns=(LunSpec(lun=0, path="", backend="memory", size=1 << 20),),
                   alias="disk B")
    config = dataclasses.replace(
        make_config([LunSpec(lun=0, path="", backend="memory", size=1 << 20)], name=A,
                    extra_targets=(b,)), isns=isnsd.address)
    t = RunningTarget(config).start()
    try:
        _until(lambda: A in isnsd.nodes() and B in isnsd.nodes(), "both targets in isnsd")
        assert 'iSCSI alias = "disk B"' in isnsd.nodes()
        found = {d.name: d for d in await discover_isns(isnsd.address, "iqn.2026-12.org.test:i")}
        assert set(found) >= {A, B}
        assert [(p.host, p.port, p.tpgt) for p in found[A].portals] == [("127.0.0.1", t.port, 1)]
        # The command line, as a user types it.
        out = subprocess.run([sys.executable, "-m", "initiator.cli", "discover", "--isns",
                              isnsd.address], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"{A} 127.0.0.1:{t.port},1" in out.stdout
        # Removing a target through the admin API takes it out of iSNS;
        # adding one puts it in.
        t.call(t.server.remove_target, B)
        _until(lambda: B not in isnsd.nodes(), "removed target gone from isnsd")
        assert A in isnsd.nodes()
        t.call(t.server.add_target, TargetSpec(name=C, luns=(
            LunSpec(lun=0, path="", backend="memory", size=1 << 20),)))
        _until(lambda: C in isnsd.nodes(), "added target in isnsd")
        names = [d.name for d in await discover_isns(isnsd.address)]
        assert A in names and C in names and B not in names
    finally:
        t.stop()
    # Stopping deregisters the entity.
    assert A not in isnsd.nodes() and C not in isnsd.nodes()


@pytest.mark.interop
def test_registration_is_refreshed_within_the_servers_period(tmp_path: Path) -> None:
    """RFC 4171 §6.2.6: the server drops an entity not refreshed within
    its Registration Period; the target re-registers at half of it."""
    srv = Isnsd(tmp_path, period=2)
    try:
        config = dataclasses.replace(
            make_config([LunSpec(lun=0, path="", backend="memory", size=1 << 20)], name=A),
            isns=srv.address)
        t = RunningTarget(config).start()
        try:
            isns = t.server.isns
            assert isns is not None
            _until(lambda: isns.registrations >= 3, "two refreshes")
            assert A in srv.nodes()
        finally:
            t.stop()
    finally:
        srv.stop()


@pytest.mark.interop
def test_unreachable_isns_server_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "initiator.cli", "--connect-timeout", "2",
                          "discover", "--isns", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "iSNS server" in out.stderr


def test_target_cli_and_toml_take_isns(tmp_path: Path) -> None:
    from target.cli import build_parser, config_from_args, observability
    from target.config import ConfigError, load_config

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    args = build_parser().parse_args(["serve", str(img), "--isns", "isns.example:3205"])
    assert observability(args, config_from_args(args)).isns == "isns.example:3205"
    cfg = tmp_path / "t.toml"
    cfg.write_text('[server]\nisns = "10.0.0.1"\n[[target]]\nname = "iqn.2026-12.org.t:x"\n'
                   f'[[target.lun]]\npath = "{img}"\n')
    assert load_config(str(cfg)).isns == "10.0.0.1"
    cfg.write_text('[server]\nisns = "10.0.0.1:x"\n[[target]]\nname = "iqn.2026-12.org.t:x"\n'
                   f'[[target.lun]]\npath = "{img}"\n')
    with pytest.raises(ConfigError, match="isns"):
        load_config(str(cfg))
