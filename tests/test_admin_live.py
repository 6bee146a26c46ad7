"""Live administration with real initiators logged in: LUNs added and
removed and a LUN grown while libiscsi's ``iscsi-perf`` keeps reading and
our initiator holds a session; what each sees (SPC-4 §7.8 unit attentions,
LOGICAL UNIT NOT SUPPORTED, the new capacity); counters in ``show``;
``kick``; ACL changes; ``reload`` adding a target; ``saveconfig``.

The target runs in-process (tests/target_fixture.py); administration calls
run on its loop through ``RunningTarget.call``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from initiator.errors import LoginRefused
from initiator.scsi import LUN
from initiator.session import Session, ScsiResult
from iscsi.scsi.constants import SenseKey, Status
from iscsi.scsi.sense import SenseData
from iscsi.scsi.spc import build_test_unit_ready
from target.admin import AdminError
from target.config import LunSpec, load_config
from tests.initiator_checks import MiB, opts, until
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tools import require_tool

pytestmark = pytest.mark.interop

PERF_INITIATOR = "iqn.2010-11.libiscsi:iscsi-perf"
OUR_INITIATOR = "iqn.2026-11.org.aioiscsi.test:admin-initiator"


def _image(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def target(tmp_path: Path) -> Iterator[RunningTarget]:
    img = _image(tmp_path, "lun0.img", 64 * MiB)
    with running_target(make_config([LunSpec(lun=0, path=str(img), backend="raw")])) as t:
        yield t


async def _tur(s: Session, lun: int) -> ScsiResult:
    """TEST UNIT READY without the initiator's unit attention retry, so the
    test sees what the target reports."""
    return await s.execute(lun, build_test_unit_ready())


def _sense(r: ScsiResult) -> tuple[int, int, int]:
    assert r.status == Status.CHECK_CONDITION, r
    sd = SenseData.decode(r.sense)
    return sd.key, sd.asc, sd.ascq


def _session_of(t: RunningTarget, initiator: str) -> dict[str, Any] | None:
    for s in t.call(t.server.session_info):
        if s["initiator"] == initiator:
            return dict(s)
    return None


async def test_lun_add_remove_resize_with_initiators_logged_in(
        target: RunningTarget, tmp_path: Path) -> None:
    t = target
    perf_tool = require_tool("iscsi-perf")
    img0 = tmp_path / "lun0.img"
    img1 = _image(tmp_path, "lun1.img", 8 * MiB)
    # libiscsi keeps reading LUN 0 through every change below.
    perf = subprocess.Popen([perf_tool, "-m", "4", "-t", "600", "-b", "8", "-r", t.url(0)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await until(lambda: _session_of(t, PERF_INITIATOR) is not None, "iscsi-perf login")
        perf_tsih = _session_of(t, PERF_INITIATOR)["tsih"]  # type: ignore[index]
        s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OUR_INITIATOR))
        try:
            lun0 = await LUN.open(s, 0)
            assert lun0.capacity is not None and lun0.capacity.blocks == 64 * MiB // 512

            # Adding a LUN: REPORTED LUNS DATA HAS CHANGED (SPC-4 §7.8).
            info = t.call(t.server.add_lun, TARGET_NAME,
                          LunSpec(lun=1, path=str(img1), backend="raw"))
            assert info["size"] == 8 * MiB and info["format"] == "raw"
            assert _sense(await _tur(s, 0)) == (SenseKey.UNIT_ATTENTION, 0x3F, 0x0E)
            assert sorted(await lun0.report_luns()) == [0, 1]
            lun1 = await LUN.open(s, 1)
            await lun1.write(5, b"\xa5" * 512)
            assert bytes(await lun1.read(5, 1)) == b"\xa5" * 512
            ls = subprocess.run([require_tool("iscsi-ls"), "-s", f"iscsi://{t.portal()}"],
                                capture_output=True, text=True, timeout=30)
            assert re.search(r"Lun:1\s", ls.stdout), ls.stdout

            # Growing LUN 0: CAPACITY DATA HAS CHANGED (SBC-3 §4.10), then
            # READ CAPACITY reports the new size.
            assert t.call(t.server.resize_lun, TARGET_NAME, 0, 128 * MiB) == 128 * MiB
            assert os.path.getsize(img0) == 128 * MiB
            assert _sense(await _tur(s, 0)) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
            cap = await lun0.read_capacity()
            assert cap.blocks == 128 * MiB // 512
            last = cap.blocks - 1
            await lun0.write(last, b"\x5a" * 512)
            assert bytes(await lun0.read(last, 1)) == b"\x5a" * 512
            rc16 = subprocess.run([require_tool("iscsi-readcapacity16"), t.url(0)],
                                  capture_output=True, text=True, timeout=30)
            assert f"Total size:{128 * MiB}" in rc16.stdout, rc16.stdout

            # Removing LUN 1: it answers LOGICAL UNIT NOT SUPPORTED, the
            # remaining LUN reports 3F/0E.
            t.call(t.server.remove_lun, TARGET_NAME, 1)
            assert _sense(await _tur(s, 1)) == (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
            assert _sense(await _tur(s, 0)) == (SenseKey.UNIT_ATTENTION, 0x3F, 0x0E)
            assert await lun0.report_luns() == [0]
            inq = subprocess.run([require_tool("iscsi-inq"), t.url(1)], capture_output=True,
                                 text=True, timeout=30)
            # libiscsi's login probes the LUN with TEST UNIT READY.
            assert inq.returncode != 0 and "LOGICAL_UNIT_NOT_SUPPORTED" in inq.stderr, inq

            # iscsi-perf rode through all of it on its one session.
            before = _session_of(t, PERF_INITIATOR)
            assert before is not None and before["tsih"] == perf_tsih
            await until(lambda: (_session_of(t, PERF_INITIATOR) or before)["counters"]
                        ["commands"] > before["counters"]["commands"], "iscsi-perf reading on")
            assert perf.poll() is None, perf.stderr.read() if perf.stderr else ""
        finally:
            await s.close()
    finally:
        # Not SIGINT: iscsi-perf retries a command that got a unit attention
        # and still counts it as completed, so after the UAs above its
        # in-flight count goes negative and it never leaves its loop.
        perf.kill()
        perf.wait(30)


async def test_show_reports_counters_sessions_and_json(target: RunningTarget) -> None:
    t = target
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OUR_INITIATOR))
    try:
        lun = await LUN.open(s, 0)
        for i in range(16):
            await lun.write(i * 8, bytes([i]) * 4096)
        for i in range(16):
            await lun.read(i * 8, 8)
        data = json.loads(json.dumps(t.call(t.server.show)))  # JSON-clean
        (tgt,) = data["targets"]
        assert tgt["name"] == TARGET_NAME and tgt["acl"] == [] and tgt["chap"] is None
        assert tgt["portals"] == [t.portal()]
        (l0,) = tgt["luns"]
        assert (l0["format"], l0["mode"], l0["size"], l0["device_type"]) == \
            ("raw", "normal", 64 * MiB, "disk")
        c = l0["counters"]
        assert c["written_bytes"] == 16 * 4096 and c["read_bytes"] >= 16 * 4096
        assert c["commands"] >= 32 and c["latency_count"] == c["commands"]
        assert c["latency_ns_sum"] > 0
        (sess,) = data["sessions"]
        assert sess["initiator"] == OUR_INITIATOR and sess["target"] == TARGET_NAME
        assert sess["connections"][0]["address"].startswith("127.0.0.1:")
        assert sess["params"]["max_burst_length"] > 0
        assert sess["luns"]["0"]["written_bytes"] == 16 * 4096
        # A session's counters stay in the LUN's totals after it ends.
        await s.close()
        await until(lambda: not t.call(t.server.session_info), "session end")
        after = t.call(t.server.show)["targets"][0]["luns"][0]["counters"]
        assert after["written_bytes"] == 16 * 4096
    finally:
        await s.close()


async def test_kick_ends_the_session(target: RunningTarget) -> None:
    t = target
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OUR_INITIATOR))
    try:
        lun = await LUN.open(s, 0)
        tsih = s.tsih
        assert t.call(partial(t.server.kick, initiator=OUR_INITIATOR)) == [tsih]
        assert _session_of(t, OUR_INITIATOR) is None
        with pytest.raises(AdminError, match="no session"):
            t.call(partial(t.server.kick, tsih=tsih))
        # Our initiator notices the dropped connection and logs in again.
        await lun.read(0, 1)
        assert s.recoveries >= 1
        await until(lambda: _session_of(t, OUR_INITIATOR) is not None, "new login")
    finally:
        await s.close()


async def test_acl_changes_end_and_refuse_sessions(target: RunningTarget) -> None:
    t = target
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OUR_INITIATOR))
    try:
        await LUN.open(s, 0)
        other = "iqn.2026-11.org.aioiscsi.test:someone-else"
        assert t.call(t.server.add_acl, TARGET_NAME, other) == [other]
        # The first ACL entry restricts the target: our session ended.
        assert _session_of(t, OUR_INITIATOR) is None
        with pytest.raises(LoginRefused):
            await Session.connect(t.host, t.port, TARGET_NAME,
                                  opts(initiator_name=OUR_INITIATOR))
        t.call(t.server.add_acl, TARGET_NAME, OUR_INITIATOR)
        s2 = await Session.connect(t.host, t.port, TARGET_NAME,
                                   opts(initiator_name=OUR_INITIATOR))
        await s2.close()
        with pytest.raises(AdminError, match="not in the ACL"):
            t.call(t.server.remove_acl, TARGET_NAME, "iqn.2026-11.org.aioiscsi.test:nobody")
    finally:
        await s.close()


def test_resize_refusals_are_one_line(target: RunningTarget, tmp_path: Path) -> None:
    t = target
    qemu_img = require_tool("qemu-img")
    q = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(q), "16M"], check=True)
    t.call(t.server.add_lun, TARGET_NAME, LunSpec(lun=3, path=str(q)))
    for args, match in (((3, 32 * MiB), "qcow2 image, which cannot grow while served"),
                        ((0, 32 * MiB), "shrinking it"),
                        ((0, 64 * MiB + 100), "not a multiple of the block size"),
                        ((9, None), "has no LUN 9")):
        with pytest.raises(AdminError, match=match) as exc:
            t.call(t.server.resize_lun, TARGET_NAME, *args)
        assert "\n" not in str(exc.value)
    # Without a size the LUN takes the size its file has now.
    os.truncate(tmp_path / "lun0.img", 80 * MiB)
    assert t.call(t.server.resize_lun, TARGET_NAME, 0, None) == 80 * MiB


TOML = """
[server]
portals = ["127.0.0.1:0"]
nop_interval = 0
{extra_server}
[[target]]
name = "iqn.2026-11.org.aioiscsi.test:first"
[[target.lun]]
path = "a.img"
{more}
"""

SECOND = """
[[target]]
name = "iqn.2026-11.org.aioiscsi.test:second"
allow = ["{ini}"]
[[target.lun]]
path = "b.img"
[[target.lun]]
backend = "memory"
size = "4M"
"""


async def test_reload_adds_a_target_and_saveconfig_round_trips(tmp_path: Path) -> None:
    for name in ("a.img", "b.img"):
        _image(tmp_path, name, 8 * MiB)
    cfg = tmp_path / "site.toml"
    cfg.write_text(TOML.format(extra_server="", more=""))
    with running_target(load_config(str(cfg))) as t:
        second = "iqn.2026-11.org.aioiscsi.test:second"
        cfg.write_text(TOML.format(extra_server="max_connections = 50",
                                   more=SECOND.format(ini=OUR_INITIATOR)))
        report = t.call(t.server.reload)
        assert f"target {second} added" in report.applied, report
        assert "server.max_connections = 50 (new connections)" in report.applied
        assert report.error is None and not report.failed and not report.restart
        s = await Session.connect(t.host, t.port, second, opts(initiator_name=OUR_INITIATOR))
        try:
            assert sorted(await (await LUN.open(s, 0)).report_luns()) == [0, 1]
        finally:
            await s.close()
        ls = subprocess.run([require_tool("iscsi-ls"), f"iscsi://{t.portal()}"],
                            capture_output=True, text=True, timeout=30)
        assert "test:first" in ls.stdout  # the ACL keeps libiscsi out of the second
        # A LUN whose settings changed is reported, not silently ignored.
        cfg.write_text(TOML.format(extra_server="", more="read_only = true"))
        report = t.call(t.server.reload)
        assert f"target {second} removed" in report.applied
        assert any("LUN 0 settings changed" in r for r in report.restart), report
        # A file that does not load changes nothing.
        cfg.write_text("[[target]]\nname = 'iqn.bad'\n")
        report = t.call(t.server.reload)
        assert report.error and "nothing changed" in report.error
        assert list(t.server.targets) == ["iqn.2026-11.org.aioiscsi.test:first"]
        # saveconfig writes what runs; loading it gives the same targets.
        # b.img was the removed target's read-write LUN: its handle holds
        # the image (and its lock) until its commands are done and it is
        # flushed and closed, and only then may another LUN open it.
        await until(lambda: not t.server.retiring, "the removed target's LUNs to close")
        t.call(t.server.add_lun, "iqn.2026-11.org.aioiscsi.test:first",
               LunSpec(lun=7, path=str(tmp_path / "b.img"), read_only=True))
        saved = tmp_path / "saved.toml"
        t.call(t.server.save_config, str(saved))
        assert (saved.stat().st_mode & 0o777) == 0o600
        again = load_config(str(saved))
        assert again.targets == tuple(rt.spec for rt in t.server.targets.values())
        assert again.max_connections == 1024


async def test_media_change_on_a_cdrom_lun(tmp_path: Path) -> None:
    from tests.test_iso_media import make_iso

    first, second = tmp_path / "first.iso", tmp_path / "second.iso"
    make_iso(first, 0xAA)
    make_iso(second, 0xBB)
    with running_target(make_config([LunSpec(lun=0, path=str(first))])) as t:
        s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OUR_INITIATOR))
        try:
            cd = await LUN.open(s, 0)
            assert bytes(await cd.read(20, 1))[:4] == b"\xaa" * 4
            assert t.call(t.server.set_medium, TARGET_NAME, 0, str(second)) is True
            # A disc swap: NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED.
            assert _sense(await _tur(s, 0)) == (SenseKey.UNIT_ATTENTION, 0x28, 0x00)
            assert bytes(await cd.read(20, 1))[:4] == b"\xbb" * 4
            assert t.server.targets[TARGET_NAME].spec.luns[0].path == str(second)
            t.call(t.server.set_medium, TARGET_NAME, 0, None)
            lun = t.call(t.server.show)["targets"][0]["luns"][0]
            assert (lun["device_type"], lun["medium"]) == ("cdrom", False)
            with pytest.raises(AdminError, match="not a CD/DVD LUN"):
                t.call(t.server.add_lun, TARGET_NAME,
                       LunSpec(lun=1, path="", backend="memory", size=MiB))
                t.call(t.server.set_medium, TARGET_NAME, 1, str(first))
        finally:
            await s.close()


def test_reload_reports_logging_and_metrics_settings_and_saveconfig_keeps_them(
        tmp_path: Path) -> None:
    """``log_format``, ``log_file`` and ``metrics`` are taken at start: a
    reload that changes them says a restart is needed (or, when the command
    line set them, that the command line's value stays), and saveconfig
    writes the running values."""
    import dataclasses

    for name in ("a.img", "b.img"):
        _image(tmp_path, name, 8 * MiB)
    cfg = tmp_path / "site.toml"
    cfg.write_text(TOML.format(extra_server="", more=""))
    config = load_config(str(cfg))
    config = dataclasses.replace(config, metrics="127.0.0.1:9", cli_overrides=frozenset({"metrics"}))
    with running_target(config) as t:
        cfg.write_text(TOML.format(extra_server='log_format = "json"\nmetrics = "127.0.0.1:10"',
                                   more=""))
        report = t.call(t.server.reload)
        assert "server.log_format" in report.restart, report
        assert any(r.startswith("server.metrics: the command line's --metrics stays")
                   for r in report.restart), report
        assert t.server.config.log_format == "text"  # nothing half-applied
        saved = tmp_path / "saved.toml"
        t.call(t.server.save_config, str(saved))
        again = load_config(str(saved))
        assert again.metrics == "127.0.0.1:9"
        assert again.log_format == "text"
