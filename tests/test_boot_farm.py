"""Boot farm (issue 13): one golden image, many initiators, each with its own
copy-on-write overlay; persistent vs reset; limits refused at login; switch,
commit and the admin interface. In-process, with our own initiator over
loopback. The QEMU/iPXE proof is tests/test_boot_farm_vm.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from iscsi.constants import LoginStatus
from initiator.blockdev import BlockDevice
from initiator.errors import LoginRefused
from initiator.options import SessionOptions
from target.backends.modes import initiator_scope
from target.backends.registry import create_image, open_image
from target.config import ChapConfig, FarmSpec, PortalGroup, ServerConfig, TargetSpec, load_config
from target.control import RemoteError, request
from target.farm_admin import farm_lun, ipxe_script, root_path
from tests.initiator_checks import ROOT
from tests.target_fixture import RunningTarget, running_target
from tests.tgt import free_port

NAME = "iqn.2026-12.org.aioiscsi.test:farm"
SIZE = 8 << 20
INI = [f"iqn.2026-12.org.example:pc{i}" for i in range(4)]


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _golden(path: Path, fmt: str = "qcow2", fill: int = 0x42) -> str:
    create_image(str(path), fmt, SIZE)
    with open_image(str(path), read_only=False) as img:
        img.write(0, bytes([fill]) * (1 << 20))
        img.flush()
    return str(path)


def _config(golden: str, state: Path, *, mode: str = "persistent", max_overlays: int = 64,
            max_bytes: int | None = None, chap: ChapConfig | None = None,
            control: bool = False) -> ServerConfig:
    farm = FarmSpec(golden=golden, mode=mode, max_overlays=max_overlays,
                    max_overlay_bytes=max_bytes)
    spec = TargetSpec(name=NAME, luns=(farm_lun(farm),), farm=farm, chap=chap)
    return ServerConfig(targets=(spec,), portal_groups=(PortalGroup(1, (("127.0.0.1", 0),)),),
                        nop_interval=0.0, state_dir=str(state))


def until(cond: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll server state from the test thread until ``cond`` holds."""
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


async def _session(t: RunningTarget, initiator: str, write: bytes | None = None,
                   at: int = 0) -> bytes:
    """One session of ``initiator``: optionally write ``write`` at ``at``,
    return the 4 KiB there, log out."""
    opts = SessionOptions(initiator_name=initiator, nop_interval=None)
    dev = await BlockDevice.open(t.url(), opts)
    try:
        if write is not None:
            await dev.write(at, write)
            await dev.flush()
        return await dev.read(at, 4096)
    finally:
        await dev.close()


def _run(t: RunningTarget, initiator: str, write: bytes | None = None) -> bytes:
    data = asyncio.run(_session(t, initiator, write))
    until(lambda: t.call(lambda: len(t.server.sessions)) == 0)
    return data


def _marker(i: int) -> bytes:
    return f"MARKER-{i}".encode().ljust(4096, b".")


@pytest.fixture
def golden(tmp_path: Path) -> str:
    return _golden(tmp_path / "golden.qcow2")


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vdi"])
def test_each_initiator_sees_only_its_own_writes_persistent(tmp_path: Path, fmt: str) -> None:
    golden = _golden(tmp_path / f"golden.{fmt}", fmt)
    before = _digest(golden)
    cfg = _config(golden, tmp_path / "state")
    with running_target(cfg) as t:
        # Three machines at once, each writing its marker.
        async def together() -> list[bytes]:
            return list(await asyncio.gather(*(_session(t, INI[i], _marker(i))
                                               for i in range(3))))
        assert asyncio.run(together()) == [_marker(i) for i in range(3)]
        until(lambda: t.call(lambda: len(t.server.sessions)) == 0)
        # A new session (a reboot) of each sees its own marker, nobody else's.
        for i in range(3):
            assert _run(t, INI[i]) == _marker(i)
        # A machine that never wrote sees the golden image, and keeps no overlay.
        assert _run(t, INI[3]) == b"\x42" * 4096
        listed = t.call(lambda: t.server.farm_list())
        assert sorted(o["initiator"] for o in listed["overlays"]) == INI[:3]
        assert all(o["base"] == os.path.abspath(golden) and o["base_state"] == "current"
                   for o in listed["overlays"])
    # Kept across a target restart too.
    with running_target(cfg) as t:
        assert _run(t, INI[1]) == _marker(1)
    assert _digest(golden) == before


def test_reset_mode_gives_a_fresh_overlay_each_session(tmp_path: Path, golden: str) -> None:
    before = _digest(golden)
    with running_target(_config(golden, tmp_path / "state", mode="reset")) as t:
        assert _run(t, INI[0], _marker(0)) == _marker(0)
        assert _run(t, INI[1], _marker(1)) == _marker(1)
        assert _run(t, INI[0]) == b"\x42" * 4096
        assert _run(t, INI[1]) == b"\x42" * 4096
        # Nothing outlives its session.
        assert t.call(lambda: t.server.farm_list())["overlays"] == []
        assert not [n for n in os.listdir(tmp_path / "state" / NAME.replace(":", "_") / "0")
                    if n.startswith("farm.")]
    assert _digest(golden) == before


def test_limits_refuse_the_login_out_of_resources(tmp_path: Path, golden: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aioiscsi.target")
    with running_target(_config(golden, tmp_path / "state", max_overlays=2,
                                max_bytes=2 << 20)) as t:
        _run(t, INI[0], _marker(0))
        _run(t, INI[1], _marker(1))
        with pytest.raises(LoginRefused) as exc:
            _run(t, INI[2])
        assert exc.value.status == LoginStatus.OUT_OF_RESOURCES
        assert int(LoginStatus.OUT_OF_RESOURCES) == 0x0302  # RFC 7143 §11.13.5
        assert "2 overlays exist (max_overlays)" in caplog.text
        # The existing machines go on.
        assert _run(t, INI[0]) == _marker(0)
        # One fills its overlay past max_overlay_bytes: its next login is refused.
        big = os.urandom(1 << 20)

        async def fill() -> None:
            dev = await BlockDevice.open(t.url(), SessionOptions(initiator_name=INI[1],
                                                                 nop_interval=None))
            try:
                await dev.write(0, big)
                await dev.flush()
                with pytest.raises(Exception, match="insufficient resources"):
                    await dev.write(4 << 20, big + big)
            finally:
                await dev.close()
        asyncio.run(fill())
        until(lambda: t.call(lambda: len(t.server.sessions)) == 0)
        with pytest.raises(LoginRefused) as exc:
            _run(t, INI[1])
        assert exc.value.status == LoginStatus.OUT_OF_RESOURCES
        assert "max_overlay_bytes" in caplog.text
        # farm reset frees it.
        t.call(lambda: t.server.farm_reset(INI[1]))
        assert _run(t, INI[1]) == b"\x42" * 4096


def test_switch_commit_and_set_aside(tmp_path: Path, golden: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aioiscsi.target")
    before = _digest(golden)
    new_golden = str(tmp_path / "golden2.qcow2")
    with running_target(_config(golden, tmp_path / "state")) as t:
        _run(t, INI[0], _marker(0))
        # Commit: the machine's disk (overlay over base) becomes a new image.
        result = asyncio.run_coroutine_threadsafe(
            t.server.farm_commit(INI[0], new_golden), t.loop).result(30)
        assert result["format"] == "qcow2"
        with open_image(new_golden, read_only=True) as img:
            assert img.parent is None  # flattened, standalone
            assert bytes(img.read(0, 4096)) == _marker(0)
            assert bytes(img.read(4096, 4096)) == b"\x42" * 4096
        # A machine running when the farm switches keeps its base.
        async def running_then_switch() -> tuple[bytes, bytes]:
            dev = await BlockDevice.open(t.url(), SessionOptions(initiator_name=INI[1],
                                                                 nop_interval=None))
            try:
                first = await dev.read(4096, 4096)
                t.call(lambda: t.server.farm_switch(_golden(tmp_path / "g3.qcow2", fill=0x77)))
                return first, await dev.read(8192, 4096)
            finally:
                await dev.close()
        first, later = asyncio.run(running_then_switch())
        assert first == later == b"\x42" * 4096
        until(lambda: t.call(lambda: len(t.server.sessions)) == 0)
        # New sessions see the new golden; INI[0]'s old overlay is not rebased:
        # it is set aside (and the log says so), the machine starts afresh.
        assert _run(t, INI[2]) == b"\x77" * 4096
        listed = t.call(lambda: t.server.farm_list())
        assert [o["base_state"] for o in listed["overlays"]] == ["previous"]
        assert _run(t, INI[0]) == b"\x77" * 4096
        assert "not rebased: set aside" in caplog.text
        aside = tmp_path / "state" / NAME.replace(":", "_") / "0" / "set-aside"
        kept = [p for p in aside.iterdir() if p.suffix == ".qcow2"]
        assert len(kept) == 1
        with open_image(str(kept[0]), read_only=True) as img:
            assert bytes(img.read(0, 4096)) == _marker(0)
        # Switching to an image of another size is refused in one line.
        other = tmp_path / "small.qcow2"
        create_image(str(other), "qcow2", SIZE // 2)
        with pytest.raises(Exception, match="same size"):
            t.call(lambda: t.server.farm_switch(str(other)))
    assert _digest(golden) == before


def test_golden_changed_in_place_sets_overlays_aside(tmp_path: Path, golden: str) -> None:
    cfg = _config(golden, tmp_path / "state")
    with running_target(cfg) as t:
        _run(t, INI[0], _marker(0))
    with open_image(golden, read_only=False) as img:  # someone edits the golden image
        img.write(0, b"\x99" * 4096)
    with running_target(cfg) as t:
        listed = t.call(lambda: t.server.farm_list())
        assert [o["base_state"] for o in listed["overlays"]] == ["changed"]
        assert _run(t, INI[0]) == b"\x99" * 4096


def test_admin_commands_over_the_control_socket(tmp_path: Path, golden: str) -> None:
    from target.admin_cli import run
    from target.cli import build_parser

    cfg = dataclasses.replace(_config(golden, tmp_path / "state"))
    control = str(tmp_path / "ctl" / "control.sock")
    t = RunningTarget(cfg)
    t.server._control_request = control  # the control socket serve opens
    t.start()
    try:
        _run(t, INI[0], _marker(0))
        _run(t, INI[1], _marker(1))
        listed = request(control, "farm_list")
        assert {o["initiator"] for o in listed["overlays"]} == set(INI[:2])
        assert all(o["size"] > 0 and o["last_use"] > 0 for o in listed["overlays"])

        def cli(*argv: str) -> int:
            return run(build_parser().parse_args(["farm", *argv, "--control", control]))
        assert cli("list") == 0
        assert cli("list", "--json") == 0
        assert cli("delete", INI[1]) == 0
        assert _run(t, INI[1]) == b"\x42" * 4096
        assert cli("reset", INI[0]) == 0
        assert _run(t, INI[0]) == b"\x42" * 4096
        assert cli("delete", "iqn.2026-12.org.example:nobody") == 1

        # Refused while the machine has a session.
        async def busy() -> None:
            dev = await BlockDevice.open(t.url(), SessionOptions(initiator_name=INI[2],
                                                                 nop_interval=None))
            try:
                await dev.write(0, _marker(2))
                with pytest.raises(RemoteError, match="has 1 session"):
                    request(control, "farm_delete", {"initiator": INI[2]})
                with pytest.raises(RemoteError, match="has 1 session"):
                    request(control, "farm_commit", {"initiator": INI[2],
                                                     "path": str(tmp_path / "x.qcow2")})
            finally:
                await dev.close()
        asyncio.run(busy())
        until(lambda: t.call(lambda: len(t.server.sessions)) == 0)
        assert cli("commit", INI[2], str(tmp_path / "pc2.img")) == 0
        assert Path(tmp_path / "pc2.img").read_bytes()[:4096] == _marker(2)
        assert cli("switch", str(tmp_path / "pc2.img")) == 0
        assert _run(t, INI[3]) == _marker(2)
        # saveconfig writes the farm, and it loads back.
        saved = request(control, "saveconfig", {"path": str(tmp_path / "saved.toml")})
        assert "[target.farm]" in saved["toml"]
        loaded = load_config(str(tmp_path / "saved.toml"))
        assert loaded.targets[0].farm is not None
        assert loaded.targets[0].farm.golden == str(tmp_path / "pc2.img")
    finally:
        t.stop()


def test_boot_script_and_root_path() -> None:
    assert root_path("10.0.2.2", 3261, NAME) == f"iscsi:10.0.2.2::3261:0:{NAME}"
    assert root_path("fe80::1", 3260, NAME) == f"iscsi:[fe80::1]::3260:0:{NAME}"
    chap = ChapConfig("farmuser", "farm-secret-123", "tgtuser", "target-secret-456")
    script = ipxe_script("10.0.2.2", 3260, NAME, chap)
    assert script.startswith("#!ipxe\nisset ${ip} || dhcp\n")
    assert "set username farmuser\nset password farm-secret-123\n" in script
    assert "set reverse-username tgtuser\nset reverse-password target-secret-456\n" in script
    assert script.endswith(f"sanboot iscsi:10.0.2.2::3260:0:{NAME}\n")
    assert "farm-secret-123" not in ipxe_script("h", 1, NAME, chap, show_secrets=False)


def test_toml_farm_table(tmp_path: Path, golden: str) -> None:
    cfg = tmp_path / "farm.toml"
    cfg.write_text(f'[[target]]\nname = "{NAME}"\n[target.farm]\ngolden = "golden.qcow2"\n'
                   'mode = "reset"\nmax_overlays = 5\nmax_overlay_bytes = "64M"\n')
    spec = load_config(str(cfg)).targets[0]
    assert spec.farm == FarmSpec(golden=golden, mode="reset", max_overlays=5,
                                 max_overlay_bytes=64 << 20)
    assert spec.luns[0].path == golden
    cfg.write_text(f'[[target]]\nname = "{NAME}"\n[target.farm]\ngolden = "g"\nmode = "x"\n')
    with pytest.raises(Exception, match=r"target\[0\]\.farm\.mode: 'x' is not allowed"):
        load_config(str(cfg))


def test_serve_boot_farm_command_line(tmp_path: Path, golden: str) -> None:
    from target.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--boot-farm", golden, "--farm-mode", "reset",
                                      "--max-overlays", "3", "--max-overlay-size", "1G",
                                      "--chap", "u:0123456789abcdef"])
    spec = config_from_args(args).targets[0]
    assert spec.farm == FarmSpec(golden=golden, mode="reset", max_overlays=3,
                                 max_overlay_bytes=1 << 30)
    assert spec.chap is not None
    bad = build_parser().parse_args(["serve", "--boot-farm", golden, golden])
    with pytest.raises(Exception, match="not both"):
        config_from_args(bad)


def test_serve_prints_and_writes_the_boot_script(tmp_path: Path, golden: str) -> None:
    port = free_port()
    script = tmp_path / "boot.ipxe"
    sock = str(tmp_path / "control.sock")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "target.cli", "serve", "--boot-farm", golden,
             "--name", NAME, "--portal", f"127.0.0.1:{port}", "--chap", "pxe:pxe-secret-1234",
             "--boot-script", str(script), "--boot-host", "10.0.2.2",
             "--state-dir", str(tmp_path / "state"), "--control", sock],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        until(lambda: "iPXE script written to" in log.read_text() or proc.poll() is not None)
        text = log.read_text()
        assert f"iscsi:10.0.2.2::{port}:0:{NAME}" in text
        assert "set password SECRET" in text and "pxe-secret-1234" not in text
        assert (script.stat().st_mode & 0o777) == 0o600
        assert "set username pxe\nset password pxe-secret-1234\n" in script.read_text()
        assert script.read_text().endswith(f"sanboot iscsi:10.0.2.2::{port}:0:{NAME}\n")
        listed = subprocess.run([sys.executable, "-m", "target.cli", "farm", "list", "--json",
                                 "--control", sock], capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert listed.returncode == 0, listed.stderr
        data = json.loads(listed.stdout)
        assert data["golden"] == golden and data["mode"] == "persistent"
    finally:
        proc.terminate()  # by PID: our own child
        proc.wait(30)


def test_login_during_commit_is_refused_for_now(tmp_path: Path, golden: str) -> None:
    with running_target(_config(golden, tmp_path / "state")) as t:
        _run(t, INI[0], _marker(0))
        farm = t.server.targets[NAME].farm
        assert farm is not None
        held = farm.committing(INI[0])
        t.call(held.__enter__)
        try:
            with pytest.raises(LoginRefused) as exc:
                _run(t, INI[0])
            # RFC 7143 §11.13.5: 0x0301, "service unavailable" -- retry later.
            assert exc.value.status == LoginStatus.SERVICE_UNAVAILABLE
            assert _run(t, INI[1]) == b"\x42" * 4096  # the others go on
        finally:
            t.call(lambda: held.__exit__(None, None, None))
        assert _run(t, INI[0]) == _marker(0)


def test_boot_flags_need_a_farm(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    proc = subprocess.run([sys.executable, "-m", "target.cli", "serve", str(img),
                           "--boot-script", str(tmp_path / "x.ipxe"), "--no-control"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("iscsi-target: error: --boot-script needs a boot farm "
                                   "(--boot-farm GOLDEN, or [target.farm] in the config file)")


def test_reload_never_reopens_a_farm_as_a_plain_lun(tmp_path: Path, golden: str) -> None:
    cfg = tmp_path / "farm.toml"
    body = (f'[server]\nstate_dir = "state"\nportals = ["127.0.0.1:0"]\n[[target]]\n'
            f'name = "{NAME}"\n[target.farm]\ngolden = "golden.qcow2"\n')
    cfg.write_text(body)
    with running_target(load_config(str(cfg))) as t:
        _run(t, INI[0], _marker(0))
        cfg.write_text(body + "max_overlays = 9\n")
        report = t.call(lambda: t.server.reload())
        assert any("boot farm settings changed" in r for r in report.restart)
        assert t.server.targets[NAME].farm is not None
        assert _run(t, INI[0]) == _marker(0)


def test_reset_mode_keeps_the_overlay_for_a_session_recovery(tmp_path: Path,
                                                             golden: str) -> None:
    """A reset farm gives a new session a fresh overlay -- but not a session
    recovered after its connection dropped (same ISID, as open-iscsi logs
    in again): that machine's disk must not revert under it. A login with
    another ISID in between is a new boot (iPXE's ISID is random)."""
    linux_isid, ipxe_isid = 0x00023D000001, 0x40002723CD7E

    async def session(isid: int, write: bytes | None = None) -> bytes:
        opts = SessionOptions(initiator_name=INI[0], nop_interval=None, isid=isid)
        dev = await BlockDevice.open(t.url(), opts)
        try:
            if write is not None:
                await dev.write(0, write)
                await dev.flush()
            return await dev.read(0, 4096)
        finally:
            await dev.close()

    def run(isid: int, write: bytes | None = None) -> bytes:
        data = asyncio.run(session(isid, write))
        until(lambda: t.call(lambda: len(t.server.sessions)) == 0)
        return data

    with running_target(_config(golden, tmp_path / "state", mode="reset")) as t:
        assert run(linux_isid, _marker(0)) == _marker(0)
        assert run(linux_isid) == _marker(0)  # the same session recovered
        assert run(ipxe_isid) == b"\x42" * 4096  # a reboot: iPXE logs in first
        assert run(linux_isid) == b"\x42" * 4096  # ... then Linux: a fresh disk


def test_reset_overlays_kept_for_recovery_expire(tmp_path: Path, golden: str) -> None:
    from target.farm import RESET_RETAIN, FarmBackend

    now = [0.0]
    with FarmBackend(golden, str(tmp_path / "st"), mode="reset", clock=lambda: now[0]) as farm:
        key = farm.admit(INI[0], 1, 7)
        with initiator_scope(key):
            farm.write(0, _marker(0))
        farm.release(1)
        assert len(farm.overlays()) == 1  # kept for a recovery
        now[0] += RESET_RETAIN
        farm.admit(INI[1], 2, 8)  # any login prunes what is past its time
        assert [o.initiator for o in farm.list_overlays()] == [INI[1]]
        farm.release(2)  # never written: not kept
        assert farm.overlays() == []
