"""Our initiator as a multipath client (issue 15): ALUA target port groups
configured per portal group on our target, REPORT TARGET PORT GROUPS, the
ASYMMETRIC ACCESS STATE CHANGED unit attention, failover when a path dies
(a session kicked, a gateway process SIGKILLed) and failback.

Real sockets on loopback (127.0.0.1 and 127.0.0.2), our target in-process
or as two ``iscsi-target serve`` processes; nothing is mocked. Waits are
bounded polls of a condition, never sleeps standing in for an event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from initiator.multipath import MultipathDevice
from initiator.session import SessionOptions
from iscsi.scsi import alua
from target.config import LunSpec, PortalGroup, ServerConfig, TargetSpec, load_config
from target.config_toml import dump_config
from tests.initiator_checks import MiB, until
from tests.target_fixture import TARGET_NAME, RunningTarget, running_target
from tests.tgt import free_port

pytestmark = pytest.mark.interop
INITIATOR = "iqn.2026-11.org.aioiscsi.test:multipath"
ROOT = Path(__file__).resolve().parents[1]


def _opts() -> SessionOptions:
    return SessionOptions(initiator_name=INITIATOR, nop_interval=None)


@pytest.fixture
def two_groups(tmp_path: Path) -> Iterator[RunningTarget]:
    """One target on portal group 1 (127.0.0.1, active/optimized) and 2
    (127.0.0.2, active/non-optimized)."""
    img = tmp_path / "lun.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    spec = TargetSpec(name=TARGET_NAME, luns=(LunSpec(lun=0, path=str(img)),),
                      portal_groups=(1, 2))
    config = ServerConfig(targets=(spec,), portal_groups=(
        PortalGroup(1, (("127.0.0.1", 0),), "active/optimized", preferred=True),
        PortalGroup(2, (("127.0.0.2", 0),), "active/non-optimized")), nop_interval=0)
    with running_target(config) as t:
        yield t


def _url(t: RunningTarget) -> str:
    return f"iscsi://{t.portal()}/{TARGET_NAME}/0"


async def test_paths_states_and_alua_changes(two_groups: RunningTarget) -> None:
    t = two_groups
    async with await MultipathDevice.open(_url(t), _opts(), failover_timeout=20) as dev:
        assert sorted(p.portal.host for p in dev.paths) == ["127.0.0.1", "127.0.0.2"]
        assert {p.group: p.state for p in dev.paths} == {1: alua.ACTIVE_OPTIMIZED,
                                                         2: alua.ACTIVE_NON_OPTIMIZED}
        assert dev.active_path is not None and dev.active_path.portal.host == "127.0.0.1"
        await dev.write(0, b"\x11" * 4096)
        # The administrator moves the LUN's optimized path to group 2: the
        # next command sees ASYMMETRIC ACCESS STATE CHANGED (or the standby
        # refusal) and I/O moves, without an error reaching the caller.
        t.call(t.server.set_alua_state, 1, "standby")
        t.call(t.server.set_alua_state, 2, "active/optimized")
        assert await dev.read(0, 4096) == b"\x11" * 4096
        assert dev.active_path is not None and dev.active_path.portal.host == "127.0.0.2"
        await dev.write(4096, b"\x22" * 4096)
        # And back (failback to the preferred group once it is optimized).
        t.call(t.server.set_alua_state, 1, "active/optimized")
        t.call(t.server.set_alua_state, 2, "standby")
        assert await dev.read(4096, 4096) == b"\x22" * 4096
        assert dev.active_path.portal.host == "127.0.0.1"
        assert dev.failovers >= 2


async def test_failover_when_the_session_dies_and_failback(two_groups: RunningTarget) -> None:
    t = two_groups
    async with await MultipathDevice.open(_url(t), _opts(), failover_timeout=20) as dev:
        first = dev.active_path
        assert first is not None and first.portal.host == "127.0.0.1"
        await dev.write(0, b"\x33" * 8192)
        tsih = first.device.lun.session.tsih if first.device else None
        assert tsih is not None
        t.call(lambda: t.server.kick(tsih=tsih))
        # The path is gone; this write goes through group 2 (retried there).
        await dev.write(8192, b"\x44" * 8192)
        assert await dev.read(0, 16384) == b"\x33" * 8192 + b"\x44" * 8192
        assert dev.failovers >= 1
        # The dead path logs in again in the background; the next command
        # after that runs on the optimized path again.
        await until(lambda: first.alive, "the kicked path to log in again", deadline=20)
        assert await dev.read(0, 4096) == b"\x33" * 4096
        assert dev.active_path is first


def test_saveconfig_keeps_alua_states(two_groups: RunningTarget, tmp_path: Path) -> None:
    t = two_groups
    t.call(t.server.set_alua_state, 2, "standby")
    text = dump_config(t.server.config)
    (tmp_path / "saved.toml").write_text(text)
    groups = {g.tag: g for g in load_config(str(tmp_path / "saved.toml")).portal_groups}
    assert (groups[1].alua_state, groups[1].preferred) == ("active/optimized", True)
    assert groups[2].alua_state == "standby"


def _gateway(tmp_path: Path, image: Path, name: str, host: str, port: int, tag: int,
             state: str) -> subprocess.Popen[bytes]:
    """One ``iscsi-target serve`` process: same target name and LU identity
    (NAA, serial) as the other gateway, its own portal group and state; the
    image shared (``shareable``: both may write it)."""
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f"""
[server]
nop_interval = 0
[[portal_group]]
tag = {tag}
portals = ["{host}:{port}"]
alua_state = "{state}"
[[target]]
name = "{TARGET_NAME}"
portal_groups = [{tag}]
[[target.lun]]
path = "{image}"
mode = "shareable"
wwn = "naa.6001405aa10c5e6a7c0ffee000000001"
serial = "MPATHDISK1"
""")
    return subprocess.Popen([sys.executable, "-m", "target.cli", "serve", "--config", str(cfg),
                             "--no-control"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


async def test_two_gateway_processes_survive_sigkill(tmp_path: Path) -> None:
    """Two target processes serve one image under one target name and LU
    identity (each its own portal group); the active one is SIGKILLed in
    the middle of a write stream; the stream carries on through the other
    and every write acknowledged before a SYNCHRONIZE CACHE reads back."""
    import socket

    image = tmp_path / "shared.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    pa, pb = free_port(), free_port()
    a = _gateway(tmp_path, image, "a", "127.0.0.1", pa, 1, "active/optimized")
    b = _gateway(tmp_path, image, "b", "127.0.0.2", pb, 2, "active/non-optimized")
    try:
        def listening(host: str, port: int) -> bool:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return True
            except OSError:
                return False

        await until(lambda: listening("127.0.0.1", pa) and listening("127.0.0.2", pb),
                    "both gateways to listen", deadline=30)
        # The gateways do not know each other: B is named as an extra portal.
        url = f"iscsi://127.0.0.1:{pa}/{TARGET_NAME}/0"
        dev = await MultipathDevice.open(url, _opts(), failover_timeout=20,
                                         extra_portals=[f"127.0.0.2:{pb}"])
        try:
            assert len(dev.paths) == 2 and all(p.alive for p in dev.paths)
            states = {p.portal.port: p.state for p in dev.paths}
            assert states == {pa: alua.ACTIVE_OPTIMIZED, pb: alua.ACTIVE_NON_OPTIMIZED}
            assert dev.active_path is not None and dev.active_path.portal.port == pa
            written: dict[int, bytes] = {}
            for i in range(64):
                if i == 32:
                    await dev.flush()
                    os.kill(a.pid, signal.SIGKILL)
                    a.wait(10)
                block = bytes([i + 1]) * 4096
                await dev.write(i * 4096, block)
                written[i] = block
            await dev.flush()
            assert dev.active_path is not None and dev.active_path.portal.port == pb
            for i, block in written.items():
                assert await dev.read(i * 4096, 4096) == block, i
        finally:
            await dev.close()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    with open(image, "rb") as f:
        data = f.read(64 * 4096)
    assert all(data[i * 4096:(i + 1) * 4096] == bytes([i + 1]) * 4096 for i in range(64))


def test_cli_attach_uses_every_portal_group(two_groups: RunningTarget, tmp_path: Path) -> None:
    """``iscsi-initiator attach`` on a target with two portal groups uses
    both (``--multipath auto``): the NBD export keeps working while the
    optimized path's session is ended."""
    from tests.tools import require_tool

    nbdcopy = require_tool("nbdcopy")
    t = two_groups
    sock = tmp_path / "a.sock"
    proc = subprocess.Popen([sys.executable, "-m", "initiator.cli", "attach", _url(t), "-v",
                             "--initiator-name", INITIATOR, "--nbd", f"unix:{sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={sock}"
        data = os.urandom(1 * MiB)
        (tmp_path / "in.bin").write_bytes(data)
        subprocess.run([nbdcopy, str(tmp_path / "in.bin"), uri], check=True, timeout=60)
        sessions = t.call(t.server.show)["sessions"]
        assert {s["initiator"] for s in sessions} == {INITIATOR} and len(sessions) == 2
        for s in sessions:
            if s["connections"][0]["local"].startswith("127.0.0.1"):
                t.call(lambda tsih=s["tsih"]: t.server.kick(tsih=tsih))
        subprocess.run([nbdcopy, uri, str(tmp_path / "out.bin")], check=True, timeout=60)
        assert (tmp_path / "out.bin").read_bytes()[:MiB] == data
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "failed" in err and "127.0.0.2" in err, err
