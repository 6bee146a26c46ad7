"""The FUSE export (initiator/fuse.py): a device shown as one file.

The export runs in the test's event loop on a MemoryDevice; everything that
touches the mounted file runs in a thread (asyncio.to_thread) or a
subprocess, because the FUSE thread needs this loop free to answer.

FUSE needs pyfuse3 (extra ``fuse``) and a usable /dev/fuse: without them the
tests skip, and fail when AIOISCSI_REQUIRE_TOOLS=1 (CI).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from initiator.fuse import MISSING_PYFUSE3, FuseExport, FuseUnavailable, load_pyfuse3, serve_fuse
from tests.test_nbd import MemoryDevice
from tests.tools import require_tool, tools_required

KiB = 1 << 10
MiB = 1 << 20


def _unavailable(why: str) -> None:
    if tools_required():
        pytest.fail(why)
    pytest.skip(why)


def _need_fuse() -> None:
    try:
        load_pyfuse3()
    except FuseUnavailable as exc:
        _unavailable(str(exc))
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        _unavailable(f"/dev/fuse is unusable here: {exc}")
    else:
        os.close(fd)


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[tuple[FuseExport, MemoryDevice]]:
    _need_fuse()
    mem = MemoryDevice(4 * MiB)
    mem.data[:] = random.Random(3).randbytes(mem.size)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    paths: list[str] = []
    export = await serve_fuse(mem, str(mnt), ready=paths.append)
    try:
        assert paths == [str(mnt / "lun")]
        yield export, mem
    finally:
        export.close()
        await asyncio.wait_for(export.wait_closed(), 30)
    assert not export.mounted
    assert not os.path.ismount(mnt)


def test_missing_pyfuse3_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # makes the import fail
    with pytest.raises(FuseUnavailable) as info:
        load_pyfuse3()
    assert str(info.value) == MISSING_PYFUSE3
    assert "pip install 'aioiscsi[fuse]'" in MISSING_PYFUSE3
    assert "libfuse3-dev pkg-config fuse3" in MISSING_PYFUSE3


def test_attach_fuse_without_pyfuse3_is_one_line(tmp_path: Path) -> None:
    """The CLI says it in one line, before it even tries to log in (the
    portal here does not exist)."""
    code = ("import sys; sys.modules['pyfuse3'] = None; from initiator.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "attach",
                           "iscsi://127.0.0.1:1/iqn.2024-01.org.example:x/0",
                           "--fuse", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "pyfuse3" in proc.stderr, proc.stderr


async def test_one_file_with_the_device_bytes(mounted: tuple[FuseExport, MemoryDevice]) -> None:
    export, mem = mounted

    def check() -> None:
        assert os.listdir(export.mountpoint) == ["lun"]
        st = os.stat(export.path)
        assert st.st_size == mem.size and st.st_mode & 0o777 == 0o644
        with open(export.path, "rb") as f:
            assert f.read() == mem.data
            f.seek(mem.size - 10)
            assert f.read(100) == mem.data[-10:]  # stops at the end
        assert not os.path.exists(os.path.join(export.mountpoint, "other"))

    await asyncio.to_thread(check)


async def test_writes_and_fsync_reach_the_device(
        mounted: tuple[FuseExport, MemoryDevice]) -> None:
    export, mem = mounted
    rng = random.Random(9)
    patches = [(rng.randrange(0, mem.size - 70 * KiB), rng.randbytes(rng.randrange(1, 70 * KiB)))
               for _ in range(20)]

    def write() -> None:
        fd = os.open(export.path, os.O_RDWR)
        try:
            for off, data in patches:
                assert os.pwrite(fd, data, off) == len(data)
            os.fsync(fd)
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", mem.size)  # the file cannot grow
            assert info.value.errno in (errno.ENOSPC, errno.EFBIG)
        finally:
            os.close(fd)

    expect = bytearray(mem.data)
    for off, data in patches:
        expect[off : off + len(data)] = data
    flushes = mem.flushes
    await asyncio.to_thread(write)
    assert mem.flushes > flushes  # fsync became a device flush
    assert mem.data == expect

    def truncate() -> None:
        with pytest.raises(OSError) as info:
            os.truncate(export.path, 4096)
        assert info.value.errno == errno.EINVAL
        os.truncate(export.path, mem.size)  # its own size: allowed

    await asyncio.to_thread(truncate)
    assert mem.data == expect


async def test_device_errors_become_eio(mounted: tuple[FuseExport, MemoryDevice]) -> None:
    export, mem = mounted
    mem.fail = OSError(errno.EIO, "medium error")

    def read() -> None:
        fd = os.open(export.path, os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 0)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)

    await asyncio.to_thread(read)


@pytest.mark.interop
async def test_qemu_img_compares_the_file(mounted: tuple[FuseExport, MemoryDevice],
                                          tmp_path: Path) -> None:
    export, mem = mounted
    ref = tmp_path / "ref.img"
    ref.write_bytes(mem.data)
    proc = await asyncio.create_subprocess_exec(
        require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(ref), export.path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode() + err.decode()


async def test_read_only(tmp_path: Path) -> None:
    _need_fuse()
    mem = MemoryDevice(1 * MiB, read_only=True)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    async with await serve_fuse(mem, str(mnt)) as export:
        def check() -> None:
            assert os.stat(export.path).st_mode & 0o777 == 0o444
            with pytest.raises(OSError) as info:
                os.open(export.path, os.O_RDWR)
            assert info.value.errno in (errno.EROFS, errno.EACCES)
            with open(export.path, "rb") as f:
                assert f.read(16) == bytes(16)

        await asyncio.to_thread(check)
    assert not os.path.ismount(mnt)


async def test_one_export_per_process(mounted: tuple[FuseExport, MemoryDevice],
                                      tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RuntimeError, match="one FUSE export per process"):
        await serve_fuse(MemoryDevice(MiB), str(other))


async def test_bad_mountpoint(tmp_path: Path) -> None:
    _need_fuse()
    with pytest.raises(FileNotFoundError):
        await serve_fuse(MemoryDevice(MiB), str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        FuseExport(MemoryDevice(MiB), str(tmp_path), name="a/b")


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


@pytest.mark.interop
async def test_loop_device_ext4_round_trip(tmp_path: Path) -> None:
    """losetup on the file, mkfs.ext4, mount, write files, unmount, detach;
    mount again on a fresh export of the same device and read them back."""
    _need_fuse()
    if os.geteuid() != 0:
        _unavailable("losetup and mount need root")
    losetup, mkfs, mount, umount = (require_tool(t) for t in
                                    ("losetup", "mkfs.ext4", "mount", "umount"))
    mem = MemoryDevice(32 * MiB)
    mnt = tmp_path / "fuse"
    fs = tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    files = {f"f{i}.bin": random.Random(i).randbytes(50 * KiB * (i + 1)) for i in range(4)}

    def attach(path: str) -> str:
        try:
            return _run(losetup, "--find", "--show", path).strip()
        except AssertionError as exc:
            _unavailable(f"losetup cannot attach a FUSE file here: {exc}")
            raise

    def first(path: str) -> None:
        loopdev = attach(path)
        try:
            _run(mkfs, "-q", "-F", loopdev)
            _run(mount, loopdev, str(fs))
            try:
                for name, data in files.items():
                    (fs / name).write_bytes(data)
            finally:
                _run(umount, str(fs))
        finally:
            _run(losetup, "-d", loopdev)

    def second(path: str) -> None:
        loopdev = attach(path)
        try:
            _run(mount, "-o", "ro", loopdev, str(fs))
            try:
                for name, data in files.items():
                    assert (fs / name).read_bytes() == data
            finally:
                _run(umount, str(fs))
        finally:
            _run(losetup, "-d", loopdev)

    async with await serve_fuse(mem, str(mnt)) as export:
        await asyncio.to_thread(first, export.path)
    assert mem.data[1024 + 56 : 1024 + 58] == b"\x53\xef"  # ext4 superblock magic
    async with await serve_fuse(mem, str(mnt)) as export:
        await asyncio.to_thread(second, export.path)


@pytest.mark.interop
async def test_serve_fuse_until_on_a_tgt_lun(tmp_path: Path) -> None:
    """The CLI's path: an iSCSI BlockDevice (tgt) mounted until told to
    stop; writes through the file land in tgt's backing file."""
    _need_fuse()
    from initiator.blockdev import BlockDevice
    from initiator.fuse import serve_fuse_until
    from initiator.session import Session, SessionOptions
    from tests.tgt import TgtConfig, Tgtd

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    patch = random.Random(2).randbytes(200 * KiB)
    with Tgtd(tmp_path, TgtConfig(size=4 * MiB)) as tgt:
        s = await Session.connect("127.0.0.1", tgt.port, tgt.iqn,
                                  SessionOptions(nop_interval=None))
        try:
            dev = await BlockDevice.from_session(s, 1)
            stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            serving = asyncio.ensure_future(serve_fuse_until(dev, str(mnt), stop,
                                                             ready=ready.set_result))
            path = await asyncio.wait_for(ready, 30)

            def io() -> None:
                fd = os.open(path, os.O_RDWR)
                try:
                    assert os.fstat(fd).st_size == 4 * MiB
                    os.pwrite(fd, patch, 100_000)  # unaligned: read-modify-write
                    assert os.pread(fd, len(patch), 100_000) == patch
                finally:
                    os.close(fd)

            await asyncio.to_thread(io)
            stop.set_result(None)
            await asyncio.wait_for(serving, 30)
            assert not os.path.ismount(mnt)
            assert tgt.backing.read_bytes()[100_000 : 100_000 + len(patch)] == patch
        finally:
            await s.logout()
