"""The control socket and the ``iscsi-target`` administration commands:
the socket's permissions and life cycle (stale replaced, live refused,
removed on exit), the line-delimited JSON protocol, and the commands run
against ``iscsi-target serve`` as a subprocess, as an administrator would
(``show --json``, ``lun add``, ``resize``, ``saveconfig``, ``reload`` and
SIGHUP, errors as one line with exit status 1)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from target.config import LunSpec, load_config
from target.control import ControlError, RemoteError, request
from target.server import TargetServer
from tests.initiator_checks import ROOT, MiB
from tests.target_fixture import make_config
from tests.tgt import free_port
from tests.tools import require_tool

NAME = "iqn.2026-11.org.aioiscsi.test:admin"


def _memory_config() -> Any:
    return make_config([LunSpec(lun=0, path="", backend="memory", size=4 * MiB)], name=NAME)


async def test_control_socket_is_private_speaks_json_and_goes_away(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl" / "control.sock")
    async with TargetServer(_memory_config(), control=path) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        shown = await asyncio.to_thread(request, path, "show")
        assert shown["targets"][0]["name"] == NAME and shown["control"] == path
        assert shown["targets"][0]["luns"][0]["format"] == "memory"
        with pytest.raises(RemoteError, match="unknown operation 'nope'"):
            await asyncio.to_thread(request, path, "nope")
        with pytest.raises(RemoteError, match=f"no target iqn.2026-11.org.aioiscsi.test:x"):
            await asyncio.to_thread(request, path, "lun_remove",
                                    {"target": "iqn.2026-11.org.aioiscsi.test:x", "lun": 0})
        with pytest.raises(RemoteError, match="lun: 'zero' is not allowed"):
            await asyncio.to_thread(request, path, "lun_remove", {"target": NAME, "lun": "zero"})
        # Garbage gets a one-line answer; the connection and server go on.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"{not json\n" + json.dumps({"op": "sessions"}).encode() + b"\n")
        assert json.loads(await reader.readline()) == {"ok": False,
                                                       "error": "request is not JSON"}
        assert json.loads(await reader.readline()) == {"ok": True, "result": []}
        writer.close()
        # A second target on the same path is refused while this one lives.
        other = TargetServer(_memory_config())
        with pytest.raises(ControlError, match="in use by another running target"):
            await other.start_control(path)
        assert server.control_path == path
    assert not os.path.exists(path)


async def test_stale_socket_is_replaced_and_a_file_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # what a SIGKILLed target leaves behind
    dead.close()
    async with TargetServer(_memory_config(), control=path):
        assert (await asyncio.to_thread(request, path, "sessions")) == []
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await TargetServer(_memory_config()).start_control(str(regular))
    with pytest.raises(ControlError, match="no target is running with control socket"):
        request(path, "show")


# ------------------------------------------------------------ the commands
def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "target.cli", *args], capture_output=True,
                         text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def _one_line_error(out: subprocess.CompletedProcess[str], match: str) -> None:
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iscsi-target: error: ") \
        and match in lines[0], out.stderr


class Served:
    """``iscsi-target serve ... --control SOCK`` as a subprocess."""

    def __init__(self, tmp: Path, *args: str, port: int | None = None) -> None:
        self.sock = str(tmp / "control.sock")
        # With --config the file names the portal.
        self.port = port or free_port()
        portal = [] if port else ["--portal", f"127.0.0.1:{self.port}", "--nop-interval", "0"]
        self.log = tmp / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "target.cli", "serve", *args, *portal,
                 "--control", self.sock],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while "Press Ctrl-C to stop." not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.02)  # polling a condition with a deadline

    def url(self, lun: int, name: str = NAME) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{name}/{lun}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    s = Served(tmp_path, str(img), "--name", NAME)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.interop
def test_admin_commands_against_a_running_target(served: Served, tmp_path: Path) -> None:
    c = ("--control", served.sock)
    data = json.loads(_cli("show", "--json", *c).stdout)
    assert data["targets"][0]["name"] == NAME and data["sessions"] == []
    assert data["targets"][0]["luns"][0]["size"] == 64 * MiB
    extra = tmp_path / "extra.img"
    with open(extra, "wb") as f:
        f.truncate(8 * MiB)
    assert "LUN 1 added" in _cli("lun", "add", NAME, str(extra), *c).stdout
    _cli("resize", NAME, "0", "128M", *c)
    rc16 = subprocess.run([require_tool("iscsi-readcapacity16"), served.url(0)],
                          capture_output=True, text=True, timeout=30)
    assert f"Total size:{128 * MiB}" in rc16.stdout, rc16.stdout
    human = _cli("show", *c).stdout
    assert "128 MiB" in human and str(extra) in human
    _one_line_error(_cli("kick", "4242", *c, ok=False), "kick: no session TSIH 4242")
    _one_line_error(_cli("resize", NAME, "0", "1M", *c, ok=False), "shrinking it")
    _one_line_error(_cli("reload", *c, ok=False), "started without --config")
    saved = tmp_path / "saved.toml"
    _cli("saveconfig", str(saved), *c)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert [ls.path for ls in load_config(str(saved)).targets[0].luns] == \
        [str(tmp_path / "disk.img"), str(extra)]
    # A second target cannot take a control socket that is in use.
    again = _cli("serve", str(extra), "--portal", f"127.0.0.1:{free_port()}", *c, ok=False)
    assert again.returncode == 2 and "in use by another running target" in again.stderr
    served.stop()
    assert not os.path.exists(served.sock)


def test_admin_command_without_a_running_target(tmp_path: Path) -> None:
    out = _cli("show", "--control", str(tmp_path / "none.sock"), ok=False)
    _one_line_error(out, "no target is running with control socket")
    out = _cli("sessions", "--state-dir", str(tmp_path), "--json", ok=False)
    _one_line_error(out, f"{tmp_path}/control.sock")


TOML = """
[server]
portals = ["127.0.0.1:{port}"]
nop_interval = 0
"""

TARGET = """
[[target]]
name = "{name}"
[[target.lun]]
backend = "memory"
size = "4M"
"""


@pytest.mark.interop
def test_sighup_and_reload_apply_the_config_file(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "site.toml"
    first = TOML.format(port=port) + TARGET.format(name=NAME)
    cfg.write_text(first)
    s = Served(tmp_path, "--config", str(cfg), port=port)
    try:
        second = "iqn.2026-11.org.aioiscsi.test:second"
        cfg.write_text(first + TARGET.format(name=second))
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while len(request(s.sock, "show")["targets"]) < 2:
            assert time.monotonic() < deadline, "SIGHUP did not add the target"
            time.sleep(0.02)  # polling a condition with a deadline
        inq = subprocess.run([require_tool("iscsi-inq"), f"iscsi://127.0.0.1:{port}/{second}/0"],
                             capture_output=True, text=True, timeout=30)
        assert inq.returncode == 0, inq.stderr
        cfg.write_text(first)
        report = json.loads(_cli("reload", "--json", "--control", s.sock).stdout)
        assert report["applied"] == [f"target {second} removed"] and report["error"] is None
        assert "no changes" in _cli("reload", "--control", s.sock).stdout
    finally:
        s.stop()
