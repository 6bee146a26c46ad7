"""``iscsi-target serve --fault PROFILE``: a target that misbehaves on
purpose (target/faults.py), and what initiators make of it -- ours (it must
recover with the data verified), qemu-img through libiscsi, and libiscsi's
iscsi-inq. Each peer's outcome is asserted as it is today, so a change in
any of them shows up."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from initiator.blockdev import BlockDevice
from initiator.session import Session
from target.config import LunSpec
from target.faults import FaultInjector, FaultProfileError, parse_profile
from tests.initiator_checks import MiB, TargetProcess, opts
from tests.target_fixture import TARGET_NAME, make_config, running_target
from tests.tgt import free_port
from tests.tools import require_tool

SIZE = 8 * MiB


# ----------------------------------------------------------- the profile itself
def test_profiles_parse_and_bad_ones_say_what_is_wrong() -> None:
    assert [(f.kind, f.n) for f in parse_profile("drop:20, busy:5,delay:3")] == [
        ("drop", 20), ("busy", 5), ("delay", 3)]
    for bad, why in (("explode:3", "unknown fault 'explode'"), ("busy", "give a command count"),
                     ("busy:0", "give a command count"), ("", "empty fault profile")):
        with pytest.raises(FaultProfileError, match=why):
            parse_profile(bad)


def test_verdicts_and_the_report_with_time_passed_in() -> None:
    inj = FaultInjector.from_text("busy:2,drop:3,logout:1")
    read10 = bytes.fromhex("28000000000000000100")
    v1 = inj.on_command(1, "iqn.i", "peer", read10, now=10.0)
    assert v1 is not None and v1.logout and v1.status is None and not v1.drop
    v2 = inj.on_command(1, "iqn.i", "peer", read10, now=11.0)
    assert v2 is not None and v2.status == 0x08  # BUSY
    v3 = inj.on_command(1, "iqn.i", "peer", read10, now=12.0)
    assert v3 is not None and v3.drop
    assert inj.on_command(2, "iqn.i", "peer2", read10, now=12.5) is not None  # logout:1 again
    inj.on_login("iqn.i", now=13.0)
    report = inj.report()
    kinds = [(f["fault"], f["initiator_then"], f["after_seconds"]) for f in report["faults"]]
    assert kinds == [("logout", "logged in again", 3.0), ("busy", "sent command 0x28", 1.0),
                     ("drop", "logged in again", 1.0), ("logout", "logged in again", 0.5)]


# ------------------------------------------------------------- our initiator
async def _write_and_verify(dev: BlockDevice) -> bytes:
    """64 writes of 64 KiB, 8 at a time, then every block read back."""
    data = bytes((i * 7) & 0xFF for i in range(4 * MiB))
    for k in range(0, 64, 8):
        await asyncio.gather(*(dev.write(j * 65536, data[j * 65536 : (j + 1) * 65536])
                               for j in range(k, k + 8)))
    back = b"".join(await asyncio.gather(*(dev.read(j * 65536, 65536) for j in range(64))))
    assert back == data
    return data


@pytest.mark.parametrize("profile", ["busy:3,task-set-full:5,unit-attention:7,delay:29",
                                     "drop:40", "logout:30"])
async def test_our_initiator_survives_every_fault(tmp_path: Path, profile: str) -> None:
    image = tmp_path / "lun.img"
    image.write_bytes(bytes(SIZE))
    cfg = dataclasses.replace(make_config([LunSpec(lun=0, path=str(image), backend="raw")]),
                              fault_profile=profile)
    with running_target(cfg) as t:
        s = await Session.connect(t.host, t.port, TARGET_NAME, opts(command_timeout=30.0))
        async with s:
            dev = await BlockDevice.from_session(s, 0)
            data = await _write_and_verify(dev)
        faults = t.call(lambda: t.server.faults)
        assert faults is not None
        report = faults.report()["faults"]
    assert image.read_bytes()[: len(data)] == data
    assert report, "no fault was injected"
    nexts = {f["fault"]: f["initiator_then"] for f in report}
    if "drop" in nexts:
        assert nexts["drop"] == "logged in again"         # session recovery
    elif "logout" in nexts:
        assert nexts["logout"] == "logged out"            # it honoured the Async Message
    else:
        # BUSY, TASK SET FULL and the unit attention are retried; a late
        # status is just waited for.
        assert all(n.startswith("sent command") for n in nexts.values())
        assert {f["fault"] for f in report} == {"busy", "task-set-full", "unit-attention",
                                                 "delay"}


# ------------------------------------------------------ other initiators, CLI
def _serve(tmp_path: Path, profile: str, *extra: str) -> TargetProcess:
    image = tmp_path / "lun.img"
    with open(image, "wb") as f:
        f.write(bytes(range(256)) * (SIZE // 256))
    return TargetProcess(image, free_port(), TARGET_NAME, workdir=tmp_path,
                         extra=("--fault", profile, "--nop-interval", "0", "--no-control",
                                *extra))


@pytest.mark.parametrize("profile,error", [("delay:5", None),
                                            ("busy:4", "BUSY"),
                                            ("unit-attention:9", "UNIT_ATTENTION")])
def test_qemu_img_through_faults(tmp_path: Path, profile: str, error: str | None) -> None:
    """qemu's libiscsi driver (qemu-img convert from an iscsi:// URL) waits
    out late statuses and copies exactly; a BUSY or a unit attention on the
    INQUIRY it sends while opening is not retried: it fails at once with
    the status named (an error surfaced, not a hang)."""
    require_tool("qemu-img")
    report = tmp_path / "report.json"
    t = _serve(tmp_path, profile, "--fault-report", str(report))
    t.start()
    try:
        out = tmp_path / "copy.raw"
        proc = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", t.url(0),
                               str(out)], capture_output=True, text=True, timeout=120)
    finally:
        assert t.proc is not None
        t.proc.send_signal(signal.SIGTERM)
        t.proc.wait(30)
    if error is None:
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == (tmp_path / "lun.img").read_bytes()
    else:
        assert proc.returncode != 0 and "Inquiry command failed" in proc.stderr
        assert error in proc.stderr
    data = json.loads(report.read_text())
    assert data["profile"] == profile
    assert data["faults"] and all(f["fault"] in profile for f in data["faults"])


def test_iscsi_inq_recovers_from_a_dropped_connection(tmp_path: Path) -> None:
    """libiscsi's iscsi-inq when the connection of its first command is
    dropped."""
    require_tool("iscsi-inq")
    t = _serve(tmp_path, "drop:1")
    t.start()
    try:
        proc = subprocess.run(["iscsi-inq", t.url(0)], capture_output=True, text=True,
                              timeout=60)
    finally:
        assert t.proc is not None
        t.proc.send_signal(signal.SIGTERM)
        t.proc.wait(30)
    # Recorded behaviour: libiscsi logs in again by itself and its INQUIRY
    # is answered.
    assert proc.returncode == 0 and "Version Descriptor" in proc.stdout


def test_cli_refuses_a_bad_profile_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(1 << 20))
    for args, want in ((["--fault", "explode:1"], "--fault: unknown fault 'explode'"),
                       (["--fault-report", "r.json"], "--fault-report needs --fault")):
        proc = subprocess.run([sys.executable, "-m", "target.cli", "serve", str(image),
                               "--portal", "127.0.0.1:0", "--no-control", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], proc.stderr
