"""Boot farm proof with real machines (issue 13): QEMU TCG guests SAN-boot
one golden image at the same time through iPXE ``sanboot`` from our farm
targets on loopback (QEMU's user network: the host is 10.0.2.2 to the
guest; its built-in TFTP hands the NIC's iPXE ROM the boot script the farm
prints). Linux then logs in again from the iBFT (``iscsistart -b``), reads
the marker sector, writes its own marker and powers off. A second boot of
each machine (a new QEMU with the same SMBIOS UUID, so the same initiator
name: a reboot, new sessions) shows its own marker on the persistent farm
and none on the reset farm; the golden image is byte-identical afterwards.

The disk is built by tests/farm_vm.py (SYSLINUX + the Debian kernel + a
small initramfs). Each round is bounded: QEMU is killed by PID at the
deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from target.config import ChapConfig, FarmSpec, PortalGroup, ServerConfig, TargetSpec
from target.farm_admin import farm_lun
from target.image_cli import convert
from tests.farm_vm import FarmVmBuildError, build_golden, qemu_argv
from tests.linux_vm import HOST_FROM_GUEST, VmBuildError
from tests.target_fixture import RunningTarget, running_target
from tests.tools import require_tool, tools_required

PERSISTENT = "iqn.2026-12.org.aioiscsi.test:farm-persistent"
RESET = "iqn.2026-12.org.aioiscsi.test:farm-reset"
CHAP = ChapConfig("farm", "farm-secret-1234")
#: (SMBIOS UUID, farm) of each machine. Two under TCG keep the test near a
#: minute (three boots at once on two cores took ~55 s a round);
#: AIOISCSI_FARM_VM_MACHINES=3 adds a second machine on the persistent farm.
MACHINES = [("00000000-0000-4000-8000-00000000000a", PERSISTENT),
            ("00000000-0000-4000-8000-00000000000c", RESET),
            ("00000000-0000-4000-8000-00000000000b", PERSISTENT)
            ][:3 if os.environ.get("AIOISCSI_FARM_VM_MACHINES") == "3" else 2]
ROUND_TIMEOUT = 180.0  # a kill deadline for a loaded machine; ~30 s a round when idle
_LINE = re.compile(r"(FARM-[A-Z]+) ?(.*)$")


def _require() -> Path:
    for tool in ("qemu-system-x86_64", "iscsistart", "busybox", "syslinux", "mkfs.vfat",
                 "mcopy"):
        require_tool(tool)
    if not any(Path(d, f).exists() for d in ("/usr/share/qemu", "/usr/lib/ipxe/qemu")
               for f in ("efi-e1000.rom", "pxe-e1000.rom")):
        msg = "QEMU's e1000 iPXE ROM is not installed (Debian package ipxe-qemu)"
        if tools_required():
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        return build_golden().path
    except (FarmVmBuildError, VmBuildError) as exc:
        if tools_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _boot_round(t: RunningTarget, tftp: dict[str, Path], logs: Path, n: int
                ) -> list[dict[str, str]]:
    """Boot every machine at once; each one's FARM-* lines."""
    procs = []
    for i, (uuid, farm) in enumerate(MACHINES):
        log = open(logs / f"round{n}-machine{i}.log", "wb")
        procs.append((subprocess.Popen(qemu_argv(tftp[farm], uuid), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + ROUND_TIMEOUT
    try:
        for proc, _log in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()  # by PID: this Popen's own child
                proc.wait()
            log.close()
    out = []
    for i in range(len(procs)):
        console = (logs / f"round{n}-machine{i}.log").read_text(errors="replace")
        lines: dict[str, str] = {}
        for raw in console.replace("\r", "\n").splitlines():
            m = _LINE.search(raw.strip())
            if m:
                lines[m.group(1)] = m.group(2)
        assert "FARM-DONE" in lines, f"machine {i} round {n}:\n" + console[-3000:]
        out.append(lines)
    # The machines are off: their connections close, their sessions end.
    deadline = time.monotonic() + 30
    while t.call(lambda: len(t.server.sessions)):
        assert time.monotonic() < deadline, "sessions did not end after the machines stopped"
        time.sleep(0.05)
    return out


def _ini(uuid: str) -> str:
    # The boot script's initiator name: iqn.2010-04.org.ipxe:${uuid}.
    return f"iqn.2010-04.org.ipxe:{uuid}"


def test_machines_boot_one_golden_image_through_ipxe(tmp_path: Path) -> None:
    raw = _require()
    golden = tmp_path / "golden.qcow2"  # any format: qcow2 here
    convert(str(raw), str(golden), "qcow2")
    before = hashlib.sha256(golden.read_bytes()).hexdigest()
    specs = []
    for name, mode, chap in ((PERSISTENT, "persistent", CHAP), (RESET, "reset", None)):
        fs = FarmSpec(golden=str(golden), mode=mode)
        specs.append(TargetSpec(name=name, luns=(farm_lun(fs),), farm=fs, chap=chap))
    cfg = ServerConfig(targets=tuple(specs), state_dir=str(tmp_path / "state"),
                       portal_groups=(PortalGroup(1, (("127.0.0.1", 0),)),))
    with running_target(cfg) as t:
        tftp = {}
        for name in (PERSISTENT, RESET):
            d = tmp_path / f"tftp-{name.rsplit(':', 1)[1]}"
            d.mkdir()
            script = t.call(lambda n=name: t.server.farm_boot(n, HOST_FROM_GUEST,
                                                              show_secrets=True))["ipxe"]
            assert "sanboot iscsi:10.0.2.2::" in script
            assert ("set password farm-secret-1234" in script) == (name == PERSISTENT)
            (d / "boot.ipxe").write_text(script)
            tftp[name] = d
        first = _boot_round(t, tftp, tmp_path, 1)
        for (uuid, farm), lines in zip(MACHINES, first):
            assert lines["FARM-IBFT"] == f"target={farm} initiator={_ini(uuid)}"
            assert lines["FARM-BEFORE"] == "-"  # the golden image has no marker
            assert lines["FARM-AFTER"] == f"MARK:{_ini(uuid)}:END"
        listed = t.call(lambda: t.server.farm_list(PERSISTENT))
        assert sorted(o["initiator"] for o in listed["overlays"]) == \
            sorted(_ini(u) for u, f in MACHINES if f == PERSISTENT)
        # The reset machine's overlay is kept only for its session's recovery.
        assert [o["sessions"] for o in t.call(lambda: t.server.farm_list(RESET))["overlays"]] \
            == [0]
        second = _boot_round(t, tftp, tmp_path, 2)
        for (uuid, farm), lines in zip(MACHINES, second):
            # A reboot: its own marker on the persistent farm, none on the reset one.
            want = f"MARK:{_ini(uuid)}:END" if farm == PERSISTENT else "-"
            assert lines["FARM-BEFORE"] == want, (uuid, farm, lines)
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == before
