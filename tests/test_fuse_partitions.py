"""Partition nodes in the FUSE mounts, as vboximg-mount shows them:
``iscsi-target image mount IMAGE MNT`` and ``iscsi-initiator attach URL
--fuse MNT`` give MNT/vhdd (the disk) and MNT/vol0, vol1... (its
partitions), so a file system in a partition mounts with ``-o loop`` (or
reads with debugfs) without kpartx.

Images are made by the real tools: sgdisk/sfdisk for the tables,
mkfs.ext4 -d for the file systems, qemu-img/qemu-io for the chains. Every
mount is a subprocess stopped by SIGTERM, which must unmount cleanly.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any
from pathlib import Path

import pytest

from tests.test_fuse import _need_fuse
from tests.tgt import free_port
from tests.tools import require_tool

BIN = Path(sys.executable).parent
TARGET = str(BIN / "iscsi-target")
INITIATOR = str(BIN / "iscsi-initiator")
KiB = 1 << 10
MiB = 1 << 20
IQN = "iqn.2026-11.org.aioiscsi.test:fuseparts"
ROOT = Path(__file__).resolve().parent.parent
#: The console scripts run this checkout's code.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _image_cli(*argv: str) -> tuple[int, str, str]:
    """``iscsi-target image ARGV`` run in this process (commands that mount
    nothing: a process start per call would cost more than the work):
    (exit status, stdout, stderr)."""
    from target import image_cli

    parser = argparse.ArgumentParser(prog="iscsi-target")
    image_cli.add_subparser(parser.add_subparsers())
    args = parser.parse_args(["image", *argv])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err):
        code = image_cli.run(args, out)
    return code, out.getvalue(), err.getvalue()


def _image(*argv: str) -> str:
    """stdout of a successful :func:`_image_cli`."""
    code, out, err = _image_cli(*argv)
    assert code == 0, err
    return out


def _run(*cmd: str, input: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, input=input,
                          env=ENV)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def _read_until(proc: subprocess.Popen[str], needle: str, seconds: float = 60.0) -> str:
    """stdout of ``proc`` up to and including ``needle`` (bounded), or a
    failure with its stderr. Reads the pipe's descriptor directly: a
    buffered readline could hold the awaited line where select cannot see it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + seconds
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            proc.kill()
            pytest.fail(f"no {needle!r} from {proc.args!r} in {seconds} s: {seen!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            err = proc.stderr.read() if proc.stderr else ""
            proc.wait(30)
            pytest.fail(f"{proc.args!r} exited {proc.returncode}: {err}")
        seen += chunk
    return seen.decode()


def _line(proc: subprocess.Popen[str], seconds: float = 60.0) -> str:
    """The first stdout line of ``proc``."""
    return _read_until(proc, "\n", seconds).split("\n", 1)[0]


@contextmanager
def _stopped_by_sigterm(proc: subprocess.Popen[str], mnt: Path,
                        how: str = "SIGTERM") -> Iterator[None]:
    """Stop ``proc`` with ``how`` (a signal, or "umount": the mount taken
    away by hand) when the block ends; it must exit 0, unmounted."""
    try:
        yield
    finally:
        if proc.poll() is None:
            if how == "umount":
                subprocess.run([require_tool("umount"), str(mnt)], timeout=60)
            else:
                proc.send_signal(getattr(signal, how))
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    err = proc.stderr.read() if proc.stderr else ""
    left_mounted = os.path.ismount(mnt)
    if left_mounted:  # a dead FUSE mount must not outlive the test
        subprocess.run([require_tool("umount"), "-l", str(mnt)], timeout=60)
    assert code == 0, err
    assert not left_mounted


@contextmanager
def image_mount(image: Path, mnt: Path, *extra: str,
                how: str = "SIGTERM") -> Iterator[subprocess.Popen[str]]:
    """``iscsi-target image mount ... IMAGE MNT`` until the block ends."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([TARGET, "image", "mount", *extra, str(image), str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    with _stopped_by_sigterm(proc, mnt, how):
        assert _line(proc) == str(mnt / "vhdd")
        yield proc


def _debugfs_cat(fs_file: Path | str, path: str) -> bytes:
    proc = subprocess.run([require_tool("debugfs"), "-R", f"cat {path}", str(fs_file)],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _sfdisk(image: Path) -> list[dict[str, Any]]:
    out = _run(require_tool("sfdisk"), "--json", str(image))
    parts: list[dict[str, Any]] = json.loads(out)["partitiontable"]["partitions"]
    return parts


def _contents(n: int) -> bytes:
    return f"hello from partition {n}\n".encode() + random.Random(n).randbytes(100 * KiB)


def _make_gpt_image(path: Path, work: Path) -> list[tuple[int, int]]:
    """A 64 MiB GPT disk with two ext4 partitions (sgdisk, mkfs.ext4 -d:
    no loop device needed); each holds /file with :func:`_contents`.
    Returns (start, size) in bytes per partition."""
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    _run(require_tool("sgdisk"), "-n", "1:2048:+20M", "-t", "1:8300", "-c", "1:first",
         "-n", "2:0:+30M", "-t", "2:8300", "-c", "2:second", str(path))
    ranges = [(p["start"] * 512, p["size"] * 512) for p in _sfdisk(path)]
    mkfs = require_tool("mkfs.ext4")
    with open(path, "r+b") as disk:
        for n, (start, size) in enumerate(ranges, 1):
            src = work / f"src{n}"
            src.mkdir()
            (src / "file").write_bytes(_contents(n))
            part = work / f"part{n}.img"
            with open(part, "wb") as f:
                f.truncate(size)
            _run(mkfs, "-q", "-F", "-L", f"part{n}", "-d", str(src), str(part))
            disk.seek(start)
            disk.write(part.read_bytes())
    return ranges


@pytest.fixture(scope="module")
def gpt_master(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int]]]:
    work = tmp_path_factory.mktemp("gpt")
    image = work / "disk.img"
    return image, _make_gpt_image(image, work)


@pytest.fixture
def gpt(gpt_master: tuple[Path, list[tuple[int, int]]],
        tmp_path: Path) -> tuple[Path, list[tuple[int, int]]]:
    _need_fuse()
    master, ranges = gpt_master
    image = tmp_path / "disk.img"
    image.write_bytes(master.read_bytes())
    return image, ranges


def _loop_mount(node: Path, where: Path) -> bool:
    """``mount -o loop NODE WHERE``; False where the sandbox has no loop
    devices (then debugfs stands in: it needs no mount)."""
    if os.geteuid() != 0:
        return False
    where.mkdir(exist_ok=True)
    proc = subprocess.run([require_tool("mount"), "-o", "loop", str(node), str(where)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode == 0


def _partition_bytes(image: Path, start: int, size: int, out: Path) -> Path:
    with open(image, "rb") as f:
        f.seek(start)
        out.write_bytes(f.read(size))
    return out


def test_gpt_ext4_partitions_through_vol_nodes(gpt: tuple[Path, list[tuple[int, int]]],
                                               tmp_path: Path) -> None:
    image, ranges = gpt
    mnt = tmp_path / "mnt"
    fs = tmp_path / "fs"
    new = random.Random(7).randbytes(300 * KiB)
    with image_mount(image, mnt):
        assert sorted(os.listdir(mnt)) == ["vhdd", "vol0", "vol1"]
        assert os.stat(mnt / "vhdd").st_size == 64 * MiB
        assert [os.stat(mnt / f"vol{i}").st_size for i in range(2)] == [s for _, s in ranges]
        # debugfs reads each file system straight from its node.
        assert _debugfs_cat(mnt / "vol0", "/file") == _contents(1)
        assert _debugfs_cat(mnt / "vol1", "/file") == _contents(2)
        if _loop_mount(mnt / "vol1", fs):
            try:
                assert (fs / "file").read_bytes() == _contents(2)
                (fs / "new").write_bytes(new)
            finally:
                _run(require_tool("umount"), str(fs))
        else:
            (tmp_path / "new").write_bytes(new)
            _run(require_tool("debugfs"), "-w", "-R", f"write {tmp_path / 'new'} new",
                 str(mnt / "vol1"))
    # The write landed in partition 2 of the image, which stays a clean ext4.
    part2 = _partition_bytes(image, *ranges[1], tmp_path / "p2.img")
    assert _debugfs_cat(part2, "/new") == new
    _run(require_tool("e2fsck"), "-fn", str(part2))
    part1 = _partition_bytes(image, *ranges[0], tmp_path / "p1.img")
    _run(require_tool("e2fsck"), "-fn", str(part1))


def test_partition_nodes_clamp_and_land_at_their_offset(
        gpt: tuple[Path, list[tuple[int, int]]], tmp_path: Path) -> None:
    image, ranges = gpt
    (s0, n0), (s1, n1) = ranges
    mnt = tmp_path / "mnt"
    before = image.read_bytes()
    with image_mount(image, mnt):
        fd = os.open(mnt / "vol1", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"MARK-vol1", 5000) == 9
            os.fsync(fd)
            assert os.pread(fd, 100, n1 - 10) == before[s1 + n1 - 10 : s1 + n1]  # stops at its end
            assert os.pread(fd, 100, n1) == b""
        finally:
            os.close(fd)
        fd = os.open(mnt / "vol0", os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x" * 10, n0)  # one past partition 1: no growing into 2
            assert info.value.errno in (errno.ENOSPC, errno.EFBIG)
            assert os.pwrite(fd, b"END", n0 - 3) == 3
        finally:
            os.close(fd)
        with open(mnt / "vhdd", "rb") as f:
            f.seek(s1 + 5000)
            assert f.read(9) == b"MARK-vol1"  # the disk node sees the partition's write
    after = image.read_bytes()
    assert after[s1 + 5000 : s1 + 5009] == b"MARK-vol1"
    assert after[s0 + n0 - 3 : s0 + n0] == b"END"
    changed = [i for i in range(0, len(after), 4096) if after[i : i + 4096] != before[i : i + 4096]]
    assert changed == sorted([(s1 + 5000) // 4096 * 4096, (s0 + n0 - 3) // 4096 * 4096])


def test_mbr_with_extended_partition(tmp_path: Path) -> None:
    """Primary, extended with two logicals: vol0..vol2; a qcow2 image of
    it, read-only."""
    _need_fuse()
    raw = tmp_path / "mbr.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
    _run(require_tool("sfdisk"), "-q", str(raw), input=(
        "label: dos\nstart=2048,size=8192,type=83\nstart=10240,size=40000,type=5\n"
        "start=12288,size=8192,type=83\nstart=22528,size=16384,type=7\n"))
    parts = [p for p in _sfdisk(raw) if p["type"] != "5"]
    with open(raw, "r+b") as f:
        for i, p in enumerate(parts):
            f.seek(p["start"] * 512)
            f.write(f"partition {i} here".encode())
    image = tmp_path / "mbr.qcow2"
    _run(require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    listed = _image("mount", "--list", str(image))
    assert "Partition table: MBR (DOS)" in listed
    assert listed.count("\nvol") == 3 and "HPFS/NTFS/exFAT" in listed
    mnt = tmp_path / "mnt"
    with image_mount(image, mnt, "--read-only", how="SIGINT"):
        assert sorted(os.listdir(mnt)) == ["vhdd", "vol0", "vol1", "vol2"]
        for i, p in enumerate(parts):
            node = mnt / f"vol{i}"
            assert os.stat(node).st_size == p["size"] * 512
            assert os.stat(node).st_mode & 0o777 == 0o444
            with open(node, "rb") as f:
                assert f.read(16) == f"partition {i} here".encode()[:16]
        with pytest.raises(OSError) as info:
            os.open(mnt / "vol1", os.O_RDWR)
        assert info.value.errno in (errno.EROFS, errno.EACCES)


def _qemu_io(image: Path, fmt: str, *cmds: str) -> None:
    args = [require_tool("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    _run(*args, str(image))


def _chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """raw <- qcow2 <- qcow2, each writing its own byte over the first
    64 KiB and its own region besides."""
    qemu_img = require_tool("qemu-img")
    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    _run(qemu_img, "create", "-q", "-f", "raw", str(base), "8M")
    _qemu_io(base, "raw", "write -P 0x11 0 64k", "write -P 0x1a 1M 64k")
    _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", str(mid))
    _qemu_io(mid, "qcow2", "write -P 0x22 0 64k", "write -P 0x2a 2M 64k")
    _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top))
    _qemu_io(top, "qcow2", "write -P 0x33 0 64k", "write -P 0x3a 3M 64k")
    return base, mid, top


def _probe(node: Path) -> tuple[int, int, int, int]:
    """The byte at 0, 1M, 2M and 3M (each layer's marks)."""
    with open(node, "rb") as f:
        out = []
        for off in (0, MiB, 2 * MiB, 3 * MiB):
            f.seek(off)
            out.append(f.read(1)[0])
    return out[0], out[1], out[2], out[3]


def test_chain_at_each_layer(tmp_path: Path) -> None:
    _need_fuse()
    base, mid, top = _chain(tmp_path)
    mnt = tmp_path / "mnt"
    expect = {
        None: (0x33, 0x1A, 0x2A, 0x3A),
        str(mid): (0x22, 0x1A, 0x2A, 0),
        "base.raw": (0x11, 0x1A, 0, 0),  # any spelling of a chain file
    }
    for at, marks in expect.items():
        extra = ("--read-only",) if at is None else ("--at", at)
        with image_mount(top, mnt, *extra):
            assert _probe(mnt / "vhdd") == marks, at
            assert os.listdir(mnt) == ["vhdd"]  # no partition table here
            if at is not None:  # a historical layer is read-only
                with pytest.raises(OSError):
                    os.open(mnt / "vhdd", os.O_RDWR)
    # The top's files were never written by any of this.
    _run(require_tool("qemu-img"), "check", "-q", str(top))
    # While qemu writes the top, the layers under it (which it only reads)
    # can still be looked at; the top itself cannot be mounted.
    holder = _hold(top, "qcow2")
    try:
        assert "in use by another process" in _fails("mount", "-r", str(top), str(mnt))
        with image_mount(top, mnt, "--at", "mid.qcow2"):
            assert _probe(mnt / "vhdd") == expect[str(mid)]
    finally:
        holder.kill()
        holder.wait(10)


def test_list_prints_chain_and_table(tmp_path: Path) -> None:
    base, mid, top = _chain(tmp_path)
    text = _image("mount", "--list", str(top))
    lines = text.splitlines()
    assert lines[0] == "Chain (top first):"
    assert lines[1] == f"  top: {top}" and f"  parent 1: {mid}" in lines and \
        f"  base: {base}" in lines
    assert "format: qcow2" in lines[2] and "virtual size: 8 MiB (8388608 bytes)" in lines[2]
    assert lines[-1] == "Partition table: no partition table, 512-byte sectors"
    doc = json.loads(_image("mount", "--list", "--json", str(top)))
    assert [(e["filename"], e["format"]) for e in doc["chain"]] == \
        [(str(top), "qcow2"), (str(mid), "qcow2"), (str(base), "raw")]
    assert doc["partition-table"]["scheme"] == "none"
    # --at narrows the chain to that layer and what is under it.
    doc = json.loads(_image("mount", "--list", "--json", "--at", str(mid),
                          str(top)))
    assert [e["filename"] for e in doc["chain"]] == [str(mid), str(base)]


def test_at_by_uuid_on_a_vdi_chain(tmp_path: Path) -> None:
    """VDI layers have UUIDs: --at takes one. The child is written through
    a read-write mount of it, the base by qemu-io."""
    _need_fuse()
    base = tmp_path / "base.vdi"
    _image("create", "-f", "vdi", str(base), "4M")
    _qemu_io(base, "vdi", "write -P 0x55 0 4k")
    child = Path(_image("snapshot", str(base)).strip())
    mnt = tmp_path / "mnt"
    with image_mount(child, mnt):
        fd = os.open(mnt / "vhdd", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x66" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    doc = json.loads(_image("mount", "--list", "--json", str(child)))
    base_uuid = doc["chain"][1]["uuid"]
    assert doc["chain"][0]["parent-uuid"] == base_uuid and doc["chain"][0]["format"] == "vdi"
    with image_mount(child, mnt, "--at", "{" + base_uuid.upper() + "}"):
        assert (mnt / "vhdd").read_bytes()[:4096] == b"\x55" * 4096
    with image_mount(child, mnt, "--read-only", how="umount" if os.geteuid() == 0 else "SIGTERM"):
        assert (mnt / "vhdd").read_bytes()[:4096] == b"\x66" * 4096


def _hold(image: Path, fmt: str) -> subprocess.Popen[str]:
    """qemu-io holding ``image`` open read-write (its locks taken once it
    has answered a read); the caller kills it."""
    holder = subprocess.Popen([require_tool("qemu-io"), "-f", fmt, str(image)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("read 0 512\n")
    holder.stdin.flush()
    assert "read 512/512" in holder.stdout.readline()
    return holder


def _fails(*args: str) -> str:
    """The one line on stderr of a failing ``iscsi-target image ARGS``."""
    code, out, err = _image_cli(*args)
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and err.startswith("iscsi-target image: error: "), err
    assert out == ""
    return err


def test_clear_one_line_errors(gpt: tuple[Path, list[tuple[int, int]]], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    image, _ = gpt
    err = _fails("mount", str(image), str(tmp_path / "nowhere"))
    assert "nowhere: mountpoint is not a directory" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "mountpoint is not empty" in _fails("mount", str(image), str(full))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "MOUNTPOINT is missing" in _fails("mount", str(image))
    assert "not part of the chain" in _fails("mount", "--at", str(full / "x"),
                                             str(image), str(empty))
    assert "no file of the chain" in _fails("mount", "--at", "1234-5678", str(image),
                                            str(empty))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pyfuse3", None)  # makes the import fail
        assert "needs pyfuse3: pip install" in _fails("mount", str(image), str(empty))
    # Image locks: a writer elsewhere (qemu-io holding the image open) refuses
    # a read-write mount and a read-only one alike.
    holder = _hold(image, "raw")
    try:
        assert "in use by another process" in _fails("mount", str(image), str(empty))
        assert "in use by another process" in _fails("mount", "-r", str(image),
                                                     str(empty))
    finally:
        holder.kill()
        holder.wait(10)
    assert not os.path.ismount(empty) and os.listdir(empty) == []


def _serve(image: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([TARGET, "serve", str(image), "--name", IQN, "--portal",
                             f"127.0.0.1:{port}", "--no-control"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _read_until(proc, "Portals:")  # the attach help is printed once the portal listens
    return proc, port


def _attach_list(url: str, *extra: str) -> str:
    """``iscsi-initiator attach URL --list`` in this process: its stdout."""
    from initiator.cli import build_parser
    from initiator.session import run

    args = build_parser().parse_args(["attach", url, "--list", *extra])
    out = io.StringIO()
    with redirect_stdout(out):
        assert run(args.func(args)) == 0
    return out.getvalue()


def test_attach_fuse_over_iscsi_shows_vol_nodes(gpt: tuple[Path, list[tuple[int, int]]],
                                                tmp_path: Path) -> None:
    image, ranges = gpt
    target, port = _serve(image)
    url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
    try:
        listed = _attach_list(url)
        assert f"{url}: {64 * MiB} bytes, 512-byte blocks" in listed
        assert "Partition table: GPT" in listed and "vol1" in listed
        doc = json.loads(_attach_list(url, "--json"))
        assert [(p["node"], p["start"], p["size"]) for p in doc["partition-table"]["partitions"]] \
            == [("vol0", *ranges[0]), ("vol1", *ranges[1])]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        attach = subprocess.Popen(
            [INITIATOR, "attach", url, "--fuse", str(mnt),
             "--control", str(tmp_path / "ctl.sock")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        with _stopped_by_sigterm(attach, mnt):
            assert _line(attach) == str(mnt / "vhdd")
            assert sorted(os.listdir(mnt)) == ["vhdd", "vol0", "vol1"]
            assert os.stat(mnt / "vol1").st_size == ranges[1][1]
            assert _debugfs_cat(mnt / "vol1", "/file") == _contents(2)
            fd = os.open(mnt / "vol0", os.O_RDWR)
            try:
                os.pwrite(fd, b"over iSCSI", 512)  # ext4 leaves its first 1 KiB unused
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        target.terminate()
        target.wait(30)
    with open(image, "rb") as f:
        f.seek(ranges[0][0] + 512)
        assert f.read(10) == b"over iSCSI"
