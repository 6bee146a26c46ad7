"""Our initiator against our own target: the tgt suite again, and more.

The target runs in-process (tests/target_fixture.py) for most tests, and as a
subprocess (``python -m target.cli serve``) where it must crash: SIGKILL in
the middle of a verified write stream, then started again on the same port
and file. Beyond what tgt can show, our target does CHAP with every CHAP_A
(5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256, one-way and mutual), discovery CHAP,
several portal groups, COMPARE AND WRITE, persistent reservations, and UNMAP
that punches holes the GET LBA STATUS answer reports as deallocated.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from initiator.blockdev import BlockDevice
from initiator.errors import LoginFailed, LoginRefused, PortalUnreachable
from initiator.scsi import LUN, SCSICheckCondition, SCSIStatusError
from initiator.discover import discover
from initiator.session import Session
from iscsi.constants import LoginStatus
from iscsi.scsi.constants import PROutAction, Status
from iscsi.scsi.sbc import ProvisioningStatus
from target.config import ChapConfig, LunSpec, PortalGroup, TargetSpec
from tests.initiator_checks import (
    LONG,
    ROOT,
    MiB,
    TargetProcess,
    cli_failures_are_one_line,
    fill,
    lun_file_roundtrip,
    opts,
    random_write_verify,
    replacement_timeout_fails,
    unaligned_writes_sharing_a_block,
    until,
    verified_stream_across_crash,
    write_same_roundtrip,
)
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tgt import free_port
from tests.tools import require_tool

pytestmark = pytest.mark.interop

SIZE = 64 * MiB
USER, SECRET = "alice", "alice-secret-1"
TUSER, TSECRET = "target1", "target-secret-2"
DUSER, DSECRET = "finder", "discovery-secret-3"


def _image(tmp_path: Path, size: int = SIZE, name: str = "lun0.img") -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: a thin LU from the start
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return _image(tmp_path)


@pytest.fixture
def ours(image: Path) -> Iterator[RunningTarget]:
    with running_target(make_config([LunSpec(lun=0, path=str(image), backend="raw")])) as t:
        yield t


@pytest.fixture
def chap_ours(image: Path) -> Iterator[RunningTarget]:
    cfg = make_config([LunSpec(lun=0, path=str(image), backend="raw")],
                      chap=ChapConfig(USER, SECRET, TUSER, TSECRET))
    with running_target(cfg) as t:
        yield t


async def _open(t: RunningTarget, **kw: object) -> tuple[Session, LUN]:
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts(**kw))
    return s, await LUN.open(s, 0)


# ------------------------------------------------------------ discovery


async def test_discovery_lists_every_portal_and_group_tag(tmp_path: Path, image: Path) -> None:
    lun = LunSpec(lun=0, path=str(image), backend="raw")
    # Its own image: one image backs one read-write LUN only.
    image2 = tmp_path / "other.img"
    image2.write_bytes(bytes(1 << 20))
    lun2 = LunSpec(lun=0, path=str(image2), backend="raw")
    other = "iqn.2026-11.org.aioiscsi.test:other"
    base = make_config([lun], discovery_chap=ChapConfig(DUSER, DSECRET),
                       extra_targets=(TargetSpec(name=other, luns=(lun2,), portal_groups=(2,)),))
    # Portal group 1 on two addresses, group 2 on a third portal; the first
    # target is reachable through both groups, the second through group 2.
    cfg = replace(base, portal_groups=(
        PortalGroup(1, (("127.0.0.1", 0), ("127.0.0.2", 0))), PortalGroup(2, (("127.0.0.1", 0),))),
        targets=(replace(base.targets[0], portal_groups=(1, 2)), base.targets[1]))
    with running_target(cfg) as t:
        bound = {(host, port): tag for tag, host, port in t.server.bound}
        assert len(bound) == 3
        # Discovery CHAP: no credentials, or wrong ones, are refused.
        for o in (opts(), opts(chap_user=DUSER, chap_secret="wrong-secret-99")):
            with pytest.raises(LoginRefused) as info:
                await discover(t.host, t.port, o)
            assert info.value.status == LoginStatus.AUTHENTICATION_FAILURE
        found = await discover(t.host, t.port, opts(chap_user=DUSER, chap_secret=DSECRET))
        by_name = {d.name: {(p.host, p.port, p.tpgt) for p in d.portals} for d in found}
        assert by_name == {
            TARGET_NAME: {(h, p, tag) for (h, p), tag in bound.items()},
            other: {(h, p, tag) for (h, p), tag in bound.items() if tag == 2},
        }


async def test_unknown_target_is_login_not_found(ours: RunningTarget) -> None:
    with pytest.raises(LoginRefused) as info:
        await Session.connect(ours.host, ours.port, TARGET_NAME + "-nope", opts())
    assert info.value.status == LoginStatus.NOT_FOUND
    assert "target not found" in str(info.value)


# ----------------------------------------------------------------- login


async def test_plain_login_inquiry_capacity_luns(ours: RunningTarget) -> None:
    s, lun = await _open(ours)
    async with s:
        inq = await lun.inquiry()
        assert (inq.vendor, inq.product) == ("AIOISCSI", "VIRTUAL-DISK")
        assert lun.capacity is not None
        assert (lun.capacity.size, lun.capacity.block_size) == (SIZE, 512)
        assert lun.capacity.lbpme and lun.capacity.lbprz  # raw file: holes read as zero
        assert await lun.report_luns() == [0]
        assert {0x80, 0x83, 0xB0, 0xB2} <= set(await lun.vpd_pages())
        assert await lun.unit_serial_number()
        await lun.test_unit_ready()
        assert await s.ping(b"hello") >= 0
        with pytest.raises(SCSICheckCondition) as info:
            await lun.read(lun.capacity.blocks, 1)
        assert info.value.key_name == "ILLEGAL REQUEST"
        assert "out of range" in str(info.value).lower()


@pytest.mark.parametrize("mutual", [False, True], ids=["one-way", "mutual"])
@pytest.mark.parametrize("alg", [5, 6, 7, 8], ids=["MD5", "SHA1", "SHA256", "SHA3-256"])
async def test_chap_each_algorithm(chap_ours: RunningTarget, alg: int, mutual: bool) -> None:
    # Offering one CHAP_A only: the login succeeds only if the target
    # computes that very hash (RFC 7143 §12.1.3 and the IANA registry).
    mutual_kw: dict[str, object] = (
        {"target_chap_user": TUSER, "target_chap_secret": TSECRET} if mutual else {})
    s, lun = await _open(chap_ours, chap_user=USER, chap_secret=SECRET, chap_algorithms=(alg,),
                         **mutual_kw)
    async with s:
        block = bytes([alg]) * 512
        await lun.write(alg, block)
        assert bytes(await lun.read(alg, 1)) == block


async def test_chap_failures(chap_ours: RunningTarget) -> None:
    t = chap_ours
    for kw in ({}, {"chap_user": USER, "chap_secret": "wrong-secret-99"},
               {"chap_user": "mallory", "chap_secret": SECRET}):
        with pytest.raises(LoginRefused) as info:
            await _open(t, **kw)
        assert info.value.status == LoginStatus.AUTHENTICATION_FAILURE
        assert "authentication failed" in str(info.value)
    # The target proving a secret other than the one we expect is refused by us.
    with pytest.raises(LoginFailed, match="(?i)auth|chap|target"):
        await _open(t, chap_user=USER, chap_secret=SECRET, target_chap_user=TUSER,
                    target_chap_secret="not-the-target-secret")


@pytest.mark.parametrize("header,data", [(True, False), (False, True), (True, True)])
async def test_digests(ours: RunningTarget, header: bool, data: bool) -> None:
    # "CRC32C" alone insists on the digest: the login fails unless agreed.
    s, lun = await _open(ours, header_digest="CRC32C" if header else "None",
                         data_digest="CRC32C" if data else "None")
    async with s:
        assert (s.params.header_digest, s.params.data_digest) == (header, data)
        payload = os.urandom(3 * MiB + 512)
        await lun.write(100, payload)
        assert bytes(await lun.read(100, len(payload) // 512)) == payload


# ------------------------------------------------------- verified stream


async def test_random_write_verify_against_model(ours: RunningTarget, image: Path) -> None:
    total = (256 if LONG else 64) * MiB
    s = await Session.connect(ours.host, ours.port, TARGET_NAME, opts())
    async with s:
        model = await random_write_verify(await BlockDevice.from_session(s, 0), total)
    assert image.read_bytes() == model


async def test_unaligned_writes_sharing_a_block(ours: RunningTarget) -> None:
    s = await Session.connect(ours.host, ours.port, TARGET_NAME, opts())
    async with s:
        await unaligned_writes_sharing_a_block(await BlockDevice.from_session(s, 0))


async def test_write_same_and_compare_and_write(ours: RunningTarget) -> None:
    s, lun = await _open(ours)
    async with s:
        await write_same_roundtrip(lun)
        await lun.compare_and_write(10, b"\xab" * 512, b"\xcd" * 512)
        assert bytes(await lun.read(10, 2)) == b"\xcd" * 512 + b"\xab" * 512
        with pytest.raises(SCSICheckCondition) as info:
            await lun.compare_and_write(10, b"\xab" * 512, b"\xef" * 512)
        assert info.value.key_name == "MISCOMPARE"
        assert bytes(await lun.read(10, 1)) == b"\xcd" * 512


async def test_unmap_deallocates_and_punches_holes(ours: RunningTarget, image: Path) -> None:
    s, lun = await _open(ours)
    async with s:
        dev = await BlockDevice.from_session(s, 0)
        await dev.write(0, b"\x11" * (4 * MiB))
        await dev.flush()
        assert await dev.discard(1 * MiB, 2 * MiB) == 2 * MiB
        assert await dev.read(1 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert await dev.read(0, MiB) == b"\x11" * MiB
        assert await dev.read(3 * MiB, MiB) == b"\x11" * MiB
        status = await lun.get_lba_status(0)
        assert [(d.lba, d.blocks, d.status) for d in status[:3]] == [
            (0, 2048, ProvisioningStatus.MAPPED),
            (2048, 4096, ProvisioningStatus.DEALLOCATED),
            (6144, 2048, ProvisioningStatus.MAPPED),
        ]
    # The hole is real in the backing file: 2 of the 4 MiB written remain.
    assert image.stat().st_blocks * 512 <= 2 * MiB + 64 * 1024


async def test_persistent_reservation_round_trip(ours: RunningTarget) -> None:
    a, lun_a = await _open(ours, initiator_name="iqn.2026-11.org.aioiscsi.test:host-a")
    b, lun_b = await _open(ours, initiator_name="iqn.2026-11.org.aioiscsi.test:host-b")
    async with a, b:
        await lun_a.persistent_reserve_out(PROutAction.REGISTER, service_action_key=0xA)
        await lun_b.persistent_reserve_out(PROutAction.REGISTER, service_action_key=0xB)
        keys = await lun_a.read_keys()
        assert sorted(keys.keys) == [0xA, 0xB]
        assert (await lun_a.read_reservation()).key is None
        # Write Exclusive (type 1, SPC-4 §5.9.10): others may read, not write.
        await lun_a.persistent_reserve_out(PROutAction.RESERVE, reservation_key=0xA, pr_type=1)
        held = await lun_b.read_reservation()
        assert (held.key, held.pr_type, held.scope) == (0xA, 1, 0)
        assert held.generation == keys.generation  # RESERVE does not bump PRgeneration
        await lun_a.write(0, b"\x0a" * 512)
        with pytest.raises(SCSIStatusError) as info:
            await lun_b.write(0, b"\x0b" * 512)
        assert info.value.status == Status.RESERVATION_CONFLICT
        assert bytes(await lun_b.read(0, 1)) == b"\x0a" * 512
        await lun_a.persistent_reserve_out(PROutAction.RELEASE, reservation_key=0xA, pr_type=1)
        await lun_b.write(0, b"\x0b" * 512)
        # Unregister both (REGISTER with service action key 0).
        await lun_a.persistent_reserve_out(PROutAction.REGISTER, reservation_key=0xA)
        await lun_b.persistent_reserve_out(PROutAction.REGISTER, reservation_key=0xB)
        after = await lun_b.read_keys()
        assert after.keys == () and after.generation > keys.generation


def test_lun_file_sync_wrapper(ours: RunningTarget, image: Path) -> None:
    lun_file_roundtrip(ours.url(), SIZE, image)


async def test_target_nop_in_is_answered(image: Path) -> None:
    cfg = make_config([LunSpec(lun=0, path=str(image), backend="raw")], nop_interval=0.1)
    with running_target(cfg) as t:
        s, lun = await _open(t)
        async with s:
            await until(lambda: s.target_pings >= 3, "three NOP-Ins from our target")
            # Answered: the target kept the session and commands still work.
            await lun.test_unit_ready()
            assert s.recoveries == 0


# ------------------------------------------------- recovery (subprocess)


@pytest.fixture
def proc_target(tmp_path: Path, image: Path) -> Iterator[TargetProcess]:
    with TargetProcess(image, free_port(), TARGET_NAME, workdir=tmp_path) as t:
        yield t


async def test_recovery_after_sigkill_and_restart(proc_target: TargetProcess,
                                                  image: Path) -> None:
    t = proc_target
    s = await Session.connect("127.0.0.1", t.port, t.name, opts(replacement_timeout=60.0))
    dev = await BlockDevice.from_session(s, 0)
    model = await verified_stream_across_crash(s, dev, t.kill, t.start)
    await dev.flush()
    await s.logout()
    assert image.read_bytes() == model


async def test_target_gone_past_replacement_timeout_then_down_at_connect(
        proc_target: TargetProcess) -> None:
    t = proc_target
    s = await Session.connect("127.0.0.1", t.port, t.name, opts(replacement_timeout=1.5))
    await replacement_timeout_fails(await LUN.open(s, 0), t.kill)
    # Still down: a new session says so within seconds (not minutes).
    start = time.monotonic()
    with pytest.raises(PortalUnreachable, match=f"127.0.0.1:{t.port}"):
        await Session.connect("127.0.0.1", t.port, t.name, opts())
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------- CLI


def test_cli_copy_out_equals_backing_file(ours: RunningTarget, image: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from initiator.cli import main

    rng = random.Random(11)
    fill(ours.url(), [(rng.randrange(0, SIZE - MiB), rng.randbytes(rng.randint(1, MiB)))
                      for _ in range(12)])
    out = tmp_path / "out.img"
    assert main(["copy", ours.url(), str(out), "--no-progress"]) == 0
    assert out.read_bytes() == image.read_bytes()
    err = capsys.readouterr().err
    # GET LBA STATUS let the copy skip the holes of our thin LU.
    assert "copied 64.0 MiB" in err and "skipped" in err
    assert out.stat().st_blocks * 512 < SIZE // 2


def test_cli_discover_ls_inquiry(chap_ours: RunningTarget,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from initiator.cli import main

    t = chap_ours
    assert main(["discover", t.portal()]) == 0
    assert capsys.readouterr().out == f"{TARGET_NAME} {t.portal()},1\n"
    # ls without a target discovers (no discovery CHAP here, although the
    # URL carries the target's credentials) and lists every LUN.
    for url in (f"iscsi://{USER}%{SECRET}@{t.portal()}", t.url(0, None, USER, SECRET)):
        assert main(["ls", url]) == 0
        out = capsys.readouterr().out
        assert out.splitlines() == [
            TARGET_NAME,
            ("  lun 0: disk AIOISCSI VIRTUAL-DISK 0001, 64.0 MiB (131072 x 512 B), "
             "thin-provisioned")]
    assert main(["inquiry", t.url(0, None, USER, SECRET)]) == 0
    out = capsys.readouterr().out
    assert "vendor: AIOISCSI" in out and "capacity: 67108864 bytes" in out
    assert "thin: True" in out


def test_cli_failures_are_one_line(chap_ours: RunningTarget,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    t = chap_ours
    good = f"iscsi://{USER}%{SECRET}@{t.portal()}"
    cli_failures_are_one_line([
        (["inquiry", f"iscsi://127.0.0.1:{free_port()}/{TARGET_NAME}/0"],
         "cannot connect to portal"),
        (["ls", f"iscsi://{USER}%wrong-secret-99@{t.portal()}/{TARGET_NAME}"],
         "login refused: authentication failed"),
        (["inquiry", f"{good}/{TARGET_NAME}x/0"], "login refused: target not found"),
        (["inquiry", f"{good}/{TARGET_NAME}/7"], "LUN 7 does not exist"),
        (["ls", f"{good}/{TARGET_NAME}/7"], "LUN 7 does not exist"),
        (["copy", f"{good}/{TARGET_NAME}/3", "/dev/null"], "LUN 3 does not exist"),
        (["detach", "unix:/nonexistent/aioiscsi.sock"], "no attach is running"),
    ], capsys)


def _sessions(t: RunningTarget) -> int:
    return int(t.call(lambda: len(t.server.sessions)))


def test_cli_attach_detach(ours: RunningTarget, image: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from initiator.cli import main

    nbdcopy = require_tool("nbdcopy")
    sock = tmp_path / "lun0.sock"
    control = tmp_path / "ctl.sock"
    proc = subprocess.Popen([sys.executable, "-m", "initiator.cli", "attach", ours.url(),
                             "--nbd", f"unix:{sock}", "--control", str(control)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()  # printed once the export listens
        assert uri == f"nbd+unix:///?socket={sock}"
        assert _sessions(ours) == 1
        data = random.Random(5).randbytes(2 * MiB)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        subprocess.run([nbdcopy, str(src), uri], check=True, timeout=60)
        # detach asks over the control socket and waits for flush + logout.
        assert main(["detach", "--control", str(control)]) == 0
        assert capsys.readouterr().out.startswith(
            f"detached {ours.url()} from unix:{sock}: flushed and logged out")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"detach with: iscsi-initiator detach unix:{sock}" in err
    assert not sock.exists() and not control.exists()
    assert _sessions(ours) == 0  # logged out, not dropped
    with open(image, "rb") as f:
        assert f.read(len(data)) == data


# -------------------------------------------------------------- examples


def _example(name: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_discovery_example(chap_ours: RunningTarget) -> None:
    proc = _example("initiator_discovery.py", f"iscsi://{USER}%{SECRET}@{chap_ours.portal()}")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        TARGET_NAME,
        f"    portal {chap_ours.portal()} group 1",
        f"    lun 0: AIOISCSI VIRTUAL-DISK, {SIZE} bytes (131072 x 512), thin-provisioned"]


def test_attach_example(ours: RunningTarget, image: Path, tmp_path: Path) -> None:
    import signal

    nbdcopy = require_tool("nbdcopy")
    sock = tmp_path / "ex.sock"
    proc = _example("initiator_attach.py", ours.url(), f"unix:{sock}")
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={sock}"
        data = random.Random(6).randbytes(MiB)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        subprocess.run([nbdcopy, str(src), uri], check=True, timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "flushed and logged out" in err
    assert _sessions(ours) == 0
    with open(image, "rb") as f:
        assert f.read(MiB) == data


async def test_many_sessions_in_parallel(ours: RunningTarget) -> None:
    # Four sessions (distinct ISIDs) writing at once each see their own data.
    sessions = await asyncio.gather(*(_open(ours) for _ in range(4)))
    try:
        await asyncio.gather(*(lun.write(1000 + 8 * i, bytes([i + 1]) * 4096)
                               for i, (_, lun) in enumerate(sessions)))
        for i, (_, lun) in enumerate(sessions):
            assert bytes(await lun.read(1000 + 8 * i, 8)) == bytes([i + 1]) * 4096
    finally:
        await asyncio.gather(*(s.logout() for s, _ in sessions))


async def test_discovery_chap_optional_only_drops_one_way_chap(chap_ours: RunningTarget) -> None:
    # The portal has no discovery CHAP: our one-way credentials are refused
    # there unless chap_optional lets discovery go on without them.
    t = chap_ours
    one_way = opts(chap_user=USER, chap_secret=SECRET)
    with pytest.raises(LoginRefused):
        await discover(t.host, t.port, one_way)
    found = await discover(t.host, t.port, one_way, chap_optional=True)
    assert [d.name for d in found] == [TARGET_NAME]
    # Mutual CHAP asks the target to prove itself: never silently dropped.
    mutual = opts(chap_user=USER, chap_secret=SECRET, target_chap_user=TUSER,
                  target_chap_secret=TSECRET)
    with pytest.raises(LoginRefused) as info:
        await discover(t.host, t.port, mutual, chap_optional=True)
    assert info.value.status == LoginStatus.AUTHENTICATION_FAILURE
