"""Crash safety of the dynamic formats: a process writing an image is
killed with SIGKILL in the middle of random writes; afterwards the image
passes ``qemu-img check`` (and our own check) with no corruption, and every
write acknowledged before a completed flush reads back - through our
backend and through qemu.

Two writers: a child process driving the backend directly (``python -c``,
so every format is covered quickly), and the real thing - a target process
(``iscsi-target serve``) written to over iSCSI, killed while writes are in
flight, with SYNCHRONIZE CACHE as the flush.

Every 512-byte sector written carries its write's sequence number and its
own LBA plus a digest of both, so after the crash each sector can be
classified: it must hold the last write that was flushed before the crash,
or any later write to it (those may or may not have reached the file), and
never garbage or another sector's data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from target.backends.registry import create_image, formats, open_image
from target.image_check import check_image
from tests.tools import require_tool

ROOT = str(Path(__file__).resolve().parent.parent)
SECTOR = 512
SIZE = 32 << 20
DYNAMIC = [f for f in ("qcow2", "vdi", "vhd", "vhdx", "vmdk", "parallels") if f in formats()]
QFMT = {"vhd": "vpc"}
# qemu-img check answers 63 for formats it cannot check (VHD).
QEMU_NO_CHECK = 63

_HEAD = struct.Struct("<QQ")


def sector_bytes(seq: int, lba: int) -> bytes:
    """The 512 bytes write ``seq`` puts at ``lba``."""
    head = _HEAD.pack(seq, lba)
    return head + hashlib.blake2b(head, digest_size=16).digest() * 31


def write_plan(seed: int, size: int) -> Iterator[tuple[int, int, int]]:
    """The writes (seq, first lba, sectors), the same in writer and checker."""
    rng = random.Random(seed)
    sectors = size // SECTOR
    seq = 0
    while True:
        seq += 1
        n = rng.choice((1, 8, 8, 64, 128, 256))
        # Half the writes cluster in a hot area so later writes overwrite
        # earlier ones (in place and during allocation).
        if rng.random() < 0.5:
            lba = rng.randrange(0, min(sectors, 4096) - n)
        else:
            lba = rng.randrange(0, sectors - n)
        yield seq, lba, n


def write_data(seq: int, lba: int, n: int) -> bytes:
    return b"".join(sector_bytes(seq, lba + i) for i in range(n))


# The child process: writes the plan, logs every completed write ("W seq")
# and every completed flush ("F seq": all writes up to seq acknowledged and
# flushed), fsyncs the log after each flush, and tells the parent on stdout.
WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from tests.test_crash_safety import write_plan, write_data
from target.backends.registry import open_image
path, fmt, logp, seed, every = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
img = open_image(path, fmt=fmt)
log = os.open(logp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for seq, lba, n in write_plan(seed, img.size):
    img.write(lba * 512, write_data(seq, lba, n))
    os.write(log, b"W %d\n" % seq)
    if seq % every == 0:
        img.flush()
        os.write(log, b"F %d\n" % seq)
        os.fsync(log)
    sys.stdout.write("%d\n" % seq)
    sys.stdout.flush()
"""


def verify(image: bytes | memoryview, seed: int, flushed: int, last_started: int,
           what: str) -> None:
    """Check the crash image against the plan: ``flushed`` is the last seq
    covered by a completed flush, ``last_started`` the last seq that may
    have reached the file."""
    sectors = len(image) // SECTOR
    durable = array("q", [0]) * sectors  # last flushed seq per sector
    later: dict[int, set[int]] = {}
    for seq, lba, n in write_plan(seed, len(image)):
        if seq > last_started:
            break
        if seq <= flushed:
            durable[lba : lba + n] = array("q", [seq]) * n
        else:
            for s in range(lba, lba + n):
                later.setdefault(s, set()).add(seq)
    zero = bytes(SECTOR)
    mv = memoryview(image)
    bad: list[str] = []
    for s in range(sectors):
        got = mv[s * SECTOR : (s + 1) * SECTOR]
        want = durable[s]
        allowed = later.get(s, ())
        if got == zero:
            if want:
                bad.append(f"sector {s}: zeroes, flushed write {want} lost")
            continue
        seq, lba = _HEAD.unpack_from(got)
        if lba != s or got != sector_bytes(seq, lba):
            bad.append(f"sector {s}: garbage (stamp seq={seq} lba={lba})")
        elif seq != want and seq not in allowed:
            bad.append(f"sector {s}: holds write {seq}, expected {want} or one of {sorted(allowed)[:5]}")
        if len(bad) > 10:
            break
    assert not bad, f"{what}: " + "; ".join(bad)


def qemu_check_no_corruption(path: str, fmt: str, *, unclean_cleared: bool = False) -> None:
    """``qemu-img check``: leaks are fine after a crash, corruption is not."""
    exe = require_tool("qemu-img")
    proc = subprocess.run([exe, "check", "-f", QFMT.get(fmt, fmt), "--output=json", path],
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode == QEMU_NO_CHECK:
        return
    if fmt == "parallels" and proc.returncode == 2 and "not closed correctly" in proc.stderr \
            and not unclean_cleared:
        # parallels.txt: in_use stays 0x746F6E59 when the writer dies, and
        # qemu counts that mark as one corruption. It is the format's crash
        # flag, not damage: clear it on a copy, and everything else must
        # then be clean.
        copy = path + ".closed"
        shutil.copyfile(path, copy)
        with open(copy, "r+b") as f:
            f.seek(44)
            f.write(struct.pack("<I", 0x312E3276))
        qemu_check_no_corruption(copy, fmt, unclean_cleared=True)
        return
    assert proc.returncode in (0, 3), f"qemu-img check {fmt}: rc={proc.returncode}\n{proc.stdout}{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report


def qemu_read_all(path: str, fmt: str, tmp: Path) -> bytes:
    exe = require_tool("qemu-img")
    out = str(tmp / "qemu-view.raw")
    # -U: the image may still carry the "in use" mark of the killed writer.
    subprocess.run([exe, "convert", "-U", "-f", QFMT.get(fmt, fmt), "-O", "raw", path, out],
                   check=True, capture_output=True, timeout=60)
    with open(out, "rb") as f:
        return f.read()


def our_read_all(path: str) -> bytes:
    with open_image(path, read_only=True) as img:
        return bytes(img.read(0, img.size))


def check_after_crash(path: str, fmt: str, tmp: Path, seed: int, flushed: int,
                      last_started: int) -> None:
    res = check_image(path)
    assert res.ok, f"our check of {fmt} after the crash: {res.errors}"
    qpath = path
    if fmt == "vhdx":
        # MS-VHDX 2.3.3: a log left by the killed writer must be replayed
        # before the image is read; qemu refuses to read it otherwise, so
        # qemu replays the log we wrote on a copy (we replay it in memory
        # for the read-only open below).
        qpath = str(tmp / "qemu-replayed.vhdx")
        shutil.copyfile(path, qpath)
        subprocess.run([require_tool("qemu-img"), "check", "-r", "all", "-f", "vhdx", qpath],
                       check=True, capture_output=True, timeout=60)
    qemu_check_no_corruption(qpath, fmt)
    verify(our_read_all(path), seed, flushed, last_started, f"{fmt} read by us")
    verify(qemu_read_all(qpath, fmt, tmp), seed, flushed, last_started, f"{fmt} read by qemu")


@pytest.mark.interop
@pytest.mark.parametrize("fmt", DYNAMIC)
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_during_backend_writes(tmp_path: Path, fmt: str, seed: int) -> None:
    img = str(tmp_path / f"crash.{fmt}")
    create_image(img, fmt, SIZE)
    log = str(tmp_path / "writes.log")
    rng = random.Random(seed * 1000 + len(fmt))
    kill_after = rng.randint(40, 400)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, ROOT, img, fmt, log, str(seed), str(rng.choice((4, 16, 32)))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    try:
        acked = 0
        while acked < kill_after:
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line)
        # The writer keeps going while the signal is on its way: the kill
        # lands at an arbitrary point of a write or a flush.
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert acked >= kill_after, f"writer died early: {err.decode()}"
    flushed = last = 0
    with open(log) as f:
        for entry in f:
            kind, num = entry.split()
            if kind == "F":
                flushed = int(num)
            last = max(last, int(num))
    assert flushed > 0
    # The write after the last logged one may have been under way.
    check_after_crash(img, fmt, tmp_path, seed, flushed, last + 1)


# ---------------------------------------------------------------- over iSCSI


def _start_target(img: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "target.cli", "serve", img, "--portal", "127.0.0.1:0",
         "--name", "iqn.2026-11.org.aioiscsi.test:crash"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "iscsi-inq iscsi://" in line:
            url = line.split()[-1]
            return proc, url
    proc.kill()
    raise AssertionError("target did not start:\n" + "".join(seen))


@pytest.mark.interop
@pytest.mark.parametrize("fmt", DYNAMIC)
def test_sigkill_target_during_iscsi_writes(tmp_path: Path, fmt: str) -> None:
    from initiator.blockdev import LUNFile
    from initiator.session import SessionOptions

    seed = 7
    img = str(tmp_path / f"served.{fmt}")
    create_image(img, fmt, SIZE)
    proc, url = _start_target(img)
    rng = random.Random(len(fmt))
    kill_after = rng.randint(50, 300)
    every = 8
    reached = threading.Event()
    flushed = 0
    last_started = 0
    try:
        # No waiting for the dead target to come back: fail the I/O at once.
        f = LUNFile.open(url, "r+b", SessionOptions(replacement_timeout=0.5, connect_timeout=2.0))
        def kill_when_reached() -> None:
            reached.wait(30)
            proc.kill()

        killer = threading.Thread(target=kill_when_reached)
        killer.start()
        try:
            for seq, lba, n in write_plan(seed, f.size):
                last_started = seq
                f.seek(lba * SECTOR)
                f.write(write_data(seq, lba, n))  # acknowledged by the target
                if seq % every == 0:
                    f.flush()  # SYNCHRONIZE CACHE completed
                    flushed = seq
                if seq == kill_after:
                    reached.set()  # the target dies while we keep writing
        except Exception as exc:  # noqa: BLE001 - the writes fail once the target is dead
            assert reached.is_set(), f"I/O failed before the kill: {exc!r}"
        finally:
            reached.set()
            killer.join(30)
            with contextlib.suppress(Exception):  # the session is gone
                f.close()
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert last_started >= kill_after and flushed > 0
    check_after_crash(img, fmt, tmp_path, seed, flushed, last_started)
