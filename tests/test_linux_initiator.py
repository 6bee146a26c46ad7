"""Linux's own iSCSI initiator against our target (issue #3 proof).

The Debian kernel boots in QEMU (TCG) with an initramfs built by
:mod:`tests.linux_vm`; open-iscsi's ``iscsistart`` logs in through the
kernel's ``iscsi_tcp``, the kernel's SCSI layer sees the disk, and ext4 made
on it reads back a known file after a remount with dropped caches.  The host
then checks the backing file independently with ``debugfs``: the file really
landed on our LUN.

One boot runs every case for a target (a few seconds each), so the whole file
stays well under the three-minute budget under TCG.  The same harness runs
against ``tgtd`` first, as the reference that shows the harness itself works.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from target.config import ChapConfig, Limits, LunSpec
from tests.linux_vm import (
    RESIZE_MARK,
    Cpio,
    Scenario,
    ScenarioResult,
    VmBuildError,
    VmImage,
    VmRun,
    build_initramfs,
    find_kernel,
    module_closure,
    parse_console,
    payload,
    qemu_command,
    raw_pattern,
    run_vm,
    sha256,
)
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tools import require_tool, tools_required

LUN_SIZE = 64 << 20
GROWN_SIZE = 96 << 20
USER, SECRET = "linux", "linux-secret-12"
MUTUAL_USER, MUTUAL_SECRET = "aioiscsi", "target-secret-34"
CRC32C_ONLY = Limits(header_digests=("CRC32C",), data_digests=("CRC32C",))


def require_vm() -> VmImage:
    """The kernel + initramfs, or skip (fail under AIOISCSI_REQUIRE_TOOLS=1)."""
    for tool in ("qemu-system-x86_64", "iscsistart", "busybox", "mke2fs", "debugfs"):
        require_tool(tool)
    try:
        return build_initramfs()
    except VmBuildError as exc:
        if tools_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def lun_image(path: Path) -> Path:
    """A sparse LUN file whose first MiB is the pattern the guest hashes."""
    with open(path, "wb") as f:
        f.truncate(LUN_SIZE)
        f.write(raw_pattern())
    return path


def file_on_image(image: Path) -> bytes:
    """``/payload`` read from an ext4 image on the host by debugfs."""
    proc = subprocess.run([require_tool("debugfs"), "-R", "cat /payload", str(image)],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@dataclass(frozen=True)
class Case:
    """One login: how our target is configured and what the guest offers."""

    name: str
    target: dict[str, Any] = field(default_factory=dict)
    initiator: dict[str, Any] = field(default_factory=dict)
    block_size: int = 512
    login_ok: bool = True
    digests: bool = False
    resize: bool = False


OURS = (
    Case("plain"),
    Case("chap", target={"chap": ChapConfig(USER, SECRET)},
         initiator={"user": USER, "secret": SECRET}),
    Case("mutual-chap",
         target={"chap": ChapConfig(USER, SECRET, MUTUAL_USER, MUTUAL_SECRET)},
         initiator={"user": USER, "secret": SECRET, "mutual_user": MUTUAL_USER,
                    "mutual_secret": MUTUAL_SECRET}),
    # The target accepts only CRC32C, so both digests are really in force;
    # the guest also reports what the kernel negotiated.
    Case("crc32c-digests", target={"limits": CRC32C_ONLY},
         initiator={"header_digest": "CRC32C", "data_digest": "CRC32C"}, digests=True),
    Case("4k-sectors", block_size=4096),
    # Issue 10: the host grows the LUN while the guest is logged in.
    Case("online-resize", resize=True),
    Case("wrong-chap-secret", target={"chap": ChapConfig(USER, SECRET)},
         initiator={"user": USER, "secret": "not-the-secret"}, login_ok=False),
)


@dataclass
class Booted:
    """One VM run and the LUN files it used, by case name."""

    run: VmRun
    images: dict[str, Path]
    log: Path

    def result(self, name: str) -> ScenarioResult:
        res = self.run.results.get(name)
        assert res is not None, (f"no result for {name} (timed out={self.run.timed_out}); "
                                 f"console {self.log}:\n{self.run.tail()}")
        return res


def check_roundtrip(booted: Booted, name: str, *, digests: bool) -> None:
    """Everything a good login must show, guest side and host side."""
    res = booted.result(name)
    assert res.ok, f"{name}: {res.detail}\n{booted.run.tail()}"
    f = res.fields
    # SBC-3 READ CAPACITY as the kernel saw it, in 512-byte units.
    assert int(f["size"]) == LUN_SIZE // 512
    # The kernel read back what the host wrote (Data-In path) ...
    assert f["raw"] == sha256(raw_pattern())
    # ... and ext4 wrote, flushed and re-read the payload (Data-Out, R2T,
    # SYNCHRONIZE CACHE / FUA from the journal).
    assert f["file"] == sha256(payload())
    expected = "1" if digests else "0"
    assert (f["hd"], f["dd"]) == (expected, expected)
    # Independent of the guest: the filesystem is on the LUN's backing file.
    assert sha256(file_on_image(booted.images[name])) == sha256(payload())


# --------------------------------------------------------------------------
# our target
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """Every case of :data:`OURS` in one boot, each against its own target."""
    image = require_vm()
    wd = tmp_path_factory.mktemp("linux-ours")
    images: dict[str, Path] = {}
    scenarios: list[Scenario] = []
    log = wd / "console.log"
    targets: dict[str, RunningTarget] = {}
    resized: list[int] = []

    def on_line(line: str) -> None:
        # The guest is logged in and waiting: grow its LUN through the admin
        # API, which queues CAPACITY DATA HAS CHANGED for every nexus.
        if line.startswith(RESIZE_MARK):
            t = targets[line[len(RESIZE_MARK):].strip()]
            resized.append(t.call(t.server.resize_lun, TARGET_NAME, 0, GROWN_SIZE))

    with ExitStack() as stack:
        for case in OURS:
            img = images[case.name] = lun_image(wd / f"{case.name}.img")
            lun = LunSpec(lun=0, path=str(img), backend="raw", block_size=case.block_size)
            t = stack.enter_context(running_target(make_config([lun], **case.target)))
            targets[case.name] = t
            scenarios.append(Scenario(case.name, t.port, TARGET_NAME, resize=case.resize,
                                      **case.initiator))
        run = run_vm(image, scenarios, timeout=240, log_path=log, login_timeout=60,
                     on_line=on_line)
    assert resized in ([], [GROWN_SIZE]), resized
    # Targets are stopped (backends flushed) before the host reads the files.
    yield Booted(run, images, log)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in OURS if c.login_ok], ids=lambda c: c.name)
def test_linux_initiator_filesystem_roundtrip(ours: Booted, case: Case) -> None:
    check_roundtrip(ours, case.name, digests=case.digests)


@pytest.mark.interop
@pytest.mark.slow
def test_linux_guest_sees_online_resize(ours: Booted) -> None:
    """Issue 10: ``resize`` while Linux is logged in. The kernel receives the
    unit attention 2A/09 on its next command (it logs "Capacity data has
    changed") and a rescan (what udev does on that event) reads the new
    READ CAPACITY; the file system written before is intact."""
    res = ours.result("online-resize")
    assert res.ok, f"{res.detail}\n{ours.run.tail()}"
    assert res.fields["size"] == str(LUN_SIZE // 512)
    assert res.fields["ua"] == "1", res.detail
    assert res.fields["grown"] == str(GROWN_SIZE // 512), res.detail
    assert ours.images["online-resize"].stat().st_size == GROWN_SIZE
    assert sha256(file_on_image(ours.images["online-resize"])) == sha256(payload())


@pytest.mark.interop
@pytest.mark.slow
def test_linux_initiator_refused_with_wrong_chap_secret(ours: Booted) -> None:
    res = ours.result("wrong-chap-secret")
    assert not res.ok
    # RFC 7143 §11.13.5: status class 2, detail 01 (authentication failure),
    # which open-iscsi reports as its error 24.
    assert "login" in res.detail and "authorization failure" in res.detail, res.detail
    # Nothing was written: the LUN still holds the host's pattern.
    with open(ours.images["wrong-chap-secret"], "rb") as f:
        assert f.read(len(raw_pattern())) == raw_pattern()


@pytest.mark.interop
@pytest.mark.slow
def test_linux_vm_ran_every_case_and_powered_off(ours: Booted) -> None:
    assert not ours.run.timed_out, ours.run.tail()
    assert ours.run.done and ours.run.returncode == 0, ours.run.tail()
    assert set(ours.run.results) == {c.name for c in OURS}


# --------------------------------------------------------------------------
# tgtd: the reference target, proving the harness itself
# --------------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.slow
def test_harness_against_tgtd(tmp_path: Path) -> None:
    from tests.tgt import TgtConfig, Tgtd

    image = require_vm()
    cases: dict[str, tuple[TgtConfig, dict[str, Any]]] = {
        "tgt-plain": (TgtConfig(), {}),
        "tgt-mutual-chap": (TgtConfig(incoming=(USER, SECRET),
                                      outgoing=(MUTUAL_USER, MUTUAL_SECRET)),
                            {"user": USER, "secret": SECRET, "mutual_user": MUTUAL_USER,
                             "mutual_secret": MUTUAL_SECRET}),
        "tgt-crc32c-digests": (TgtConfig(header_digest=True, data_digest=True),
                               {"header_digest": "CRC32C", "data_digest": "CRC32C"}),
    }
    images: dict[str, Path] = {}
    scenarios: list[Scenario] = []
    log = tmp_path / "console.log"
    with ExitStack() as stack:
        for name, (config, initiator) in cases.items():
            img = images[name] = lun_image(tmp_path / f"{name}.img")
            t = stack.enter_context(Tgtd(tmp_path, config, backing=img))
            scenarios.append(Scenario(name, t.port, t.iqn, **initiator))
        run = run_vm(image, scenarios, timeout=240, log_path=log)
    booted = Booted(run, images, log)
    for name in cases:
        check_roundtrip(booted, name, digests="digests" in name)


# --------------------------------------------------------------------------
# the harness's own pieces (fast, no VM)
# --------------------------------------------------------------------------

@pytest.mark.interop
def test_cpio_archive_extracts_with_gnu_cpio(tmp_path: Path) -> None:
    cpio_tool = require_tool("cpio")
    archive = Cpio()
    archive.file("etc/aio/modules", b"/lib/x.ko\n")
    archive.file("init", b"#!/bin/sh\n", 0o755)
    archive.file("odd", b"abc")  # a length needing padding
    archive.symlink("bin/sh", "busybox")
    archive.directory("mnt")
    out = tmp_path / "a.cpio"
    archive.write(out)
    dest = tmp_path / "x"
    dest.mkdir()
    with open(out, "rb") as f:
        proc = subprocess.run([cpio_tool, "-i", "-d", "--quiet", "--no-absolute-filenames"],
                              stdin=f, cwd=dest, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "etc/aio/modules").read_bytes() == b"/lib/x.ko\n"
    assert (dest / "odd").read_bytes() == b"abc"
    assert (dest / "init").stat().st_mode & 0o777 == 0o755
    assert (dest / "bin/sh").is_symlink() and str((dest / "bin/sh").readlink()) == "busybox"
    assert (dest / "mnt").is_dir()


def test_module_closure_puts_dependencies_first() -> None:
    try:
        _, version = find_kernel()
    except VmBuildError as exc:
        pytest.skip(str(exc))
    order = [p.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")
             for p in module_closure(version, ["iscsi_tcp", "sd_mod"])]
    for before, after in (("scsi_mod", "scsi_transport_iscsi"), ("scsi_transport_iscsi", "libiscsi"),
                          ("libiscsi", "libiscsi_tcp"), ("libiscsi_tcp", "iscsi_tcp"),
                          ("scsi_mod", "sd_mod")):
        assert order.index(before) < order.index(after), order
    assert len(order) == len(set(order))
    with pytest.raises(VmBuildError, match="no_such_module"):
        module_closure(version, ["no_such_module"])


def test_parse_console_reads_result_lines() -> None:
    console = ("noise\r\nAIOISCSI-RESULT a ok dev=sda size=8 hd=0 dd=1 raw=ab file=cd\r\n"
               "AIOISCSI-RESULT b fail login rc=1 iscsistart: x=y\n")
    res = parse_console(console)
    assert res["a"].ok and res["a"].fields == {"dev": "sda", "size": "8", "hd": "0", "dd": "1",
                                               "raw": "ab", "file": "cd"}
    assert not res["b"].ok and res["b"].detail.startswith("login rc=1")


def test_unsafe_command_line_values_are_refused() -> None:
    image = VmImage(Path("/boot/vmlinuz"), Path("/tmp/initrd"), "v")
    with pytest.raises(ValueError, match="s0.secret"):
        qemu_command(image, [Scenario("x", 3260, "iqn.a:b", user="u", secret="a b")])
    with pytest.raises(ValueError, match="unique"):
        qemu_command(image, [Scenario("x", 1, "iqn.a:b"), Scenario("x", 2, "iqn.a:b")])
