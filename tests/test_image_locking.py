"""Image locking compatible with qemu's (target/backends/locking.py): our
target, our image tools and qemu exclude each other both ways; read-only
users coexist; ``-U`` looks anyway. Real qemu tools, no mocks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from target.backends.base import BackendError
from target.backends.locking import (
    ImageInUse,
    ImageOpenHere,
    force_share,
    lock_image,
    reopening,
)
from target.backends.registry import open_image
from tests.tgt import free_port
from tests.tools import require_tool

BIN = Path(sys.executable).parent
TARGET = str(BIN / "iscsi-target")
ROOT = Path(__file__).resolve().parents[1]
#: The checkout under test, not whichever one the console script was
#: installed from.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _until_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@contextmanager
def serving(image: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``iscsi-target serve IMAGE`` in its own process, stopped by PID."""
    port = free_port()
    proc = subprocess.Popen([TARGET, "serve", str(image), "--portal", f"127.0.0.1:{port}",
                             "--no-control", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        _until_listening(port, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def qemu_nbd(image: Path, *extra: str) -> Iterator[None]:
    """qemu-nbd holding ``image`` open (read-write unless ``-r``)."""
    exe = require_tool("qemu-nbd")
    port = free_port()
    proc = subprocess.Popen([exe, "-p", str(port), "-b", "127.0.0.1", *extra, str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _until_listening(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True,
                          timeout=60)


def ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TARGET, *args], capture_output=True, text=True, timeout=60, env=ENV)


@pytest.fixture
def qcow(tmp_path: Path) -> Path:
    p = tmp_path / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(p), "16M").returncode == 0
    return p


def test_two_targets_on_one_image(qcow: Path) -> None:
    with serving(qcow):
        second = subprocess.run([TARGET, "serve", str(qcow), "--portal",
                                 f"127.0.0.1:{free_port()}", "--no-control"],
                                capture_output=True, text=True, timeout=60, env=ENV)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another process" in lines[0], second.stderr
        assert str(qcow) in lines[0]


def test_qemu_refused_while_we_serve(qcow: Path) -> None:
    qemu_io = require_tool("qemu-io")
    with serving(qcow):
        info = qemu_img("info", str(qcow))
        assert info.returncode != 0 and "lock" in info.stderr
        write = subprocess.run([qemu_io, "-c", "write 0 512", str(qcow)], capture_output=True,
                               text=True, timeout=60)
        assert write.returncode != 0 or "lock" in write.stderr + write.stdout
        assert "wrote" not in write.stdout
        assert qemu_img("info", "-U", str(qcow)).returncode == 0


def test_we_refuse_while_qemu_writes(qcow: Path) -> None:
    with qemu_nbd(qcow):
        for args in (["serve", str(qcow), "--portal", f"127.0.0.1:{free_port()}", "--no-control"],
                     ["image", "info", str(qcow)],
                     ["image", "snapshot", str(qcow)],
                     ["image", "check", str(qcow)]):
            r = ours(*args)
            assert r.returncode != 0, args
            assert r.stderr.count("\n") == 1 and "is in use by another process" in r.stderr, r.stderr
        looked = ours("image", "info", "-U", str(qcow))
        assert looked.returncode == 0 and "qcow2" in looked.stdout


def test_readers_coexist_and_exclude_writers(qcow: Path, tmp_path: Path) -> None:
    # A read-only LUN and qemu's read-only users share the image...
    with serving(qcow, "--read-only"), qemu_nbd(qcow, "-r"):
        assert ours("image", "info", str(qcow)).returncode == 0
        # ... and nobody may write under them.
        assert ours("image", "snapshot", "-n", str(tmp_path / "c.qcow2"), str(qcow)).returncode == 0
        with pytest.raises(ImageInUse):
            open_image(str(qcow), read_only=False).close()


def test_backing_file_is_locked_shared_read(qcow: Path, tmp_path: Path) -> None:
    child = tmp_path / "child.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(qcow), "-F", "qcow2",
                    str(child)).returncode == 0
    qemu_io = require_tool("qemu-io")
    with serving(child):
        # The base is read by our target: readers may look, writers may not.
        assert qemu_img("info", str(qcow)).returncode == 0
        w = subprocess.run([qemu_io, "-c", "write 0 512", str(qcow)], capture_output=True,
                           text=True, timeout=60)
        assert "wrote" not in w.stdout and "lock" in w.stderr


def test_locks_released_on_close(qcow: Path) -> None:
    img = open_image(str(qcow), read_only=False)
    img.close()
    with open_image(str(qcow), read_only=False):
        pass
    # Readers in one process are counted; the last one to go releases the
    # file. A writer excludes the process's other users too (two LUNs on one
    # image), except when it reopens what it grew.
    a = lock_image(str(qcow), write=False)
    b = lock_image(str(qcow), write=False)
    assert a is not None and b is not None
    with pytest.raises(ImageInUse, match="already open in this process"):
        lock_image(str(qcow), write=True)
    a.release()
    b.release()
    a.release()  # idempotent
    w = lock_image(str(qcow), write=True)
    assert w is not None
    with pytest.raises(ImageInUse):
        lock_image(str(qcow), write=False)
    with reopening():
        again = lock_image(str(qcow), write=True)
    assert again is not None
    again.release()
    w.release()
    with force_share():
        shared = lock_image(str(qcow), write=False)
        assert shared is not None
        with pytest.raises(BackendError):
            lock_image(str(qcow), write=True)  # -U is for reading only
        shared.release()
    assert qemu_img("info", str(qcow)).returncode == 0


def test_convert_and_commit_keep_data_safe(qcow: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"precious")
    r = ours("image", "convert", "-O", "raw", str(qcow), str(dst))
    assert r.returncode != 0 and "already exists" in r.stderr and dst.read_bytes() == b"precious"
    assert ours("image", "convert", "--force", "-O", "raw", str(qcow), str(dst)).returncode == 0
    assert dst.stat().st_size == 16 << 20
    child = tmp_path / "c.qcow2"
    assert ours("image", "snapshot", "-n", str(child), str(qcow)).returncode == 0
    assert ours("image", "commit", str(child)).returncode == 0
    assert child.exists()  # kept, as qemu-img keeps it
    assert ours("image", "commit", "--drop", str(child)).returncode == 0
    assert not child.exists()
    os.unlink(dst)


def test_convert_force_never_touches_an_image_in_use(qcow: Path, tmp_path: Path) -> None:
    """``convert --force`` onto an image another process writes is refused
    before anything is truncated, and the image is left byte-identical."""
    busy = tmp_path / "busy.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(busy), "8M").returncode == 0
    before = busy.read_bytes()
    with qemu_nbd(busy):
        r = ours("image", "convert", "--force", "-O", "qcow2", str(qcow), str(busy))
        assert r.returncode != 0 and "is in use by another process" in r.stderr
        assert busy.exists() and busy.read_bytes() == before
        r = ours("image", "create", "-f", "raw", str(busy), "1M")
        assert r.returncode != 0 and busy.read_bytes() == before


def test_two_luns_on_one_image_refused(qcow: Path) -> None:
    """One image can back one read-write LUN only: two would each cache
    metadata the other changes."""
    from target.config import LunSpec, TargetSpec
    from target.runtime import build_target

    spec = TargetSpec(name="iqn.2024-01.org.example:twice",
                      luns=(LunSpec(lun=0, path=str(qcow)), LunSpec(lun=1, path=str(qcow))))
    with pytest.raises(ImageInUse, match="one read-write LUN only"):
        build_target(spec, None)


@contextmanager
def qemu_io_holding(image: Path, *extra: str) -> Iterator[None]:
    """An interactive qemu-io with ``image`` open: once it has answered a
    read, its locks are in place; it ends when its input closes."""
    exe = require_tool("qemu-io")
    proc = subprocess.Popen([exe, *extra, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert "read 512/512" in answer, answer
        yield
    finally:
        proc.stdin.close()
        if proc.wait(30) != 0:
            proc.kill()


@contextmanager
def vm_holding(image: Path) -> Iterator[None]:
    """A stopped (-S) qemu-system-x86_64 with ``image`` as its virtio disk,
    as a VM that uses it; its QMP greeting comes once the disk is open."""
    exe = require_tool("qemu-system-x86_64")
    proc = subprocess.Popen([exe, "-nodefaults", "-display", "none", "-S", "-machine", "accel=tcg",
                             "-qmp", "stdio", "-drive", f"file={image},format=qcow2,if=virtio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        greeting = proc.stdout.readline()
        assert '"QMP"' in greeting, (greeting, proc.stderr.read() if proc.stderr else "")
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def _one_line_in_use(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "is in use by another process" in r.stderr, r.stderr


def test_vm_using_a_chain(qcow: Path, tmp_path: Path) -> None:
    """A VM on child.qcow2 (over disk.qcow2): the child is written, its
    backing file read; our tools refuse what would clash, and -U looks."""
    child = tmp_path / "child.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(qcow), "-F", "qcow2",
                    str(child)).returncode == 0
    with vm_holding(child):
        for args in (["image", "info", str(child)], ["image", "commit", str(child)],
                     ["image", "snapshot", str(child)],
                     ["image", "convert", "--force", "-O", "qcow2", str(qcow), str(child)],
                     ["serve", str(child), "--portal", f"127.0.0.1:{free_port()}",
                      "--no-control"],
                     ["serve", str(qcow), "--portal", f"127.0.0.1:{free_port()}",
                      "--no-control"]):
            _one_line_in_use(ours(*args))
        looked = ours("image", "info", "-U", str(child))
        assert looked.returncode == 0 and str(qcow) in looked.stdout
        # The backing file is shared-read: more readers are fine.
        assert ours("image", "info", str(qcow)).returncode == 0
        with open_image(str(qcow), read_only=True):
            pass
    assert ours("image", "commit", str(child)).returncode == 0
    assert child.exists()


def test_qemu_io_writing_raw(tmp_path: Path) -> None:
    """qemu-io writing a raw image shares everything (only bytes 100-101):
    our writers and readers refuse it all the same."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    with qemu_io_holding(raw, "-f", "raw"):
        _one_line_in_use(ours("serve", str(raw), "--portal", f"127.0.0.1:{free_port()}",
                              "--no-control"))
        _one_line_in_use(ours("image", "info", str(raw)))
        _one_line_in_use(ours("image", "snapshot", str(raw)))
        assert ours("image", "info", "-U", str(raw)).returncode == 0
    assert not list(tmp_path.glob("*snap*"))


def test_commit_refused_while_parent_is_read(qcow: Path, tmp_path: Path) -> None:
    """commit writes the parent: a qemu reader of it (qemu-nbd -r) stops
    it before anything is written."""
    child = tmp_path / "child.qcow2"
    assert ours("image", "snapshot", "-n", str(child), str(qcow)).returncode == 0
    qemu_io = require_tool("qemu-io")
    assert subprocess.run([qemu_io, "-c", "write -P 0x5a 0 64k", str(child)],
                          capture_output=True, timeout=60).returncode == 0
    before = qcow.read_bytes()
    with qemu_nbd(qcow, "-r"):
        _one_line_in_use(ours("image", "commit", str(child)))
    assert qcow.read_bytes() == before
    assert ours("image", "commit", str(child)).returncode == 0
    r = subprocess.run([qemu_io, "-c", "read -P 0x5a 0 64k", str(qcow)], capture_output=True,
                       text=True, timeout=60)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_vmdk_extents_stay_locked_after_a_write(tmp_path: Path) -> None:
    """A VMDK's descriptor is rewritten by renaming a new file over it on
    the first write; its extent files keep their inode and their locks, so
    qemu still cannot open the image."""
    vmdk = tmp_path / "d.vmdk"
    assert qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(vmdk),
                    "4M").returncode == 0
    qemu_io = require_tool("qemu-io")
    with open_image(str(vmdk), read_only=False) as img:
        img.write(0, b"\x11" * 512)
        img.flush()
        info = qemu_img("info", str(vmdk))
        assert info.returncode != 0 and "lock" in info.stderr, info
        w = subprocess.run([qemu_io, "-c", "write 0 512", str(vmdk)], capture_output=True,
                           text=True, timeout=60)
        assert "wrote" not in w.stdout and "lock" in w.stderr
    assert qemu_img("info", str(vmdk)).returncode == 0


def test_one_process_never_writes_what_it_reads(qcow: Path, tmp_path: Path) -> None:
    """In one process the kernel sees one open file: the registry refuses a
    file read-only in one use and written in another (qemu refuses the
    same between its own nodes)."""
    child = tmp_path / "child.qcow2"
    assert ours("image", "snapshot", "-n", str(child), str(qcow)).returncode == 0
    with open_image(str(child), read_only=False):
        with pytest.raises(ImageOpenHere):
            open_image(str(qcow), read_only=False)
        with open_image(str(qcow), read_only=True):
            pass
    with open_image(str(qcow), read_only=False):
        with pytest.raises(ImageOpenHere):
            open_image(str(child), read_only=True)
    # Two LUNs of one target: the child's backing file cannot also be served.
    r = ours("serve", str(child), str(qcow), "--portal", f"127.0.0.1:{free_port()}",
             "--no-control")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "cannot also be written" in r.stderr and str(qcow) in r.stderr


def test_convert_never_overwrites_its_own_source(qcow: Path, tmp_path: Path) -> None:
    """--force replaces an existing file, but not the source itself under
    another name nor one of its backing files."""
    qemu_io = require_tool("qemu-io")
    assert subprocess.run([qemu_io, "-c", "write -P 0x33 0 1M", str(qcow)],
                          capture_output=True, timeout=60).returncode == 0
    before = qcow.read_bytes()
    child = tmp_path / "child.qcow2"
    assert ours("image", "snapshot", "-n", str(child), str(qcow)).returncode == 0
    link = tmp_path / "link.qcow2"
    link.symlink_to(qcow)
    r = ours("image", "convert", "--force", "-O", "qcow2", str(child), str(qcow))
    assert r.returncode != 0 and "is part of" in r.stderr and r.stderr.count("\n") == 1
    r = ours("image", "convert", "--force", "-O", "raw", str(qcow), str(link))
    assert r.returncode != 0 and "same file" in r.stderr
    assert qcow.read_bytes() == before


def test_convert_force_share_reads_a_busy_source(qcow: Path, tmp_path: Path) -> None:
    """convert -U shares its source only (qemu-img convert -U): the copy is
    made while qemu-nbd writes the source, and the copy is locked as usual."""
    out = tmp_path / "copy.raw"
    with qemu_nbd(qcow):
        _one_line_in_use(ours("image", "convert", "-O", "raw", str(qcow), str(out)))
        r = ours("image", "convert", "-U", "-O", "raw", str(qcow), str(out))
        assert r.returncode == 0, r.stderr
    assert out.stat().st_size == 16 << 20


def test_shareable_luns_share_writing_across_processes(tmp_path: Path) -> None:
    """``--mode shareable`` (VirtualBox's shareable, qemu's share-rw=on):
    two gateways may serve one fixed-size image read-write at once, but a
    plain writer, qemu-io writing, or a reader that forbids writes still
    cannot join them, and the image cannot be resized under them."""
    raw = tmp_path / "shared.img"
    raw.write_bytes(b"\0" * (1 << 20))
    with serving(raw, "--mode", "shareable"), serving(raw, "--mode", "shareable"):
        plain = subprocess.run([TARGET, "serve", str(raw), "--portal",
                                f"127.0.0.1:{free_port()}", "--no-control"],
                               capture_output=True, text=True, timeout=60, env=ENV)
        assert plain.returncode != 0 and "is in use by another process" in plain.stderr
        # qemu-img's writers do not share writing (BDRV_O_NO_SHARE): refused.
        # (qemu-io shares writing by default, as our shareable LUNs do.)
        assert qemu_img("resize", "-f", "raw", str(raw), "2M").returncode != 0
        assert raw.stat().st_size == 1 << 20
    # ...and a shareable LUN cannot join a plain writer either.
    with serving(raw):
        late = subprocess.run([TARGET, "serve", str(raw), "--mode", "shareable", "--portal",
                               f"127.0.0.1:{free_port()}", "--no-control"],
                              capture_output=True, text=True, timeout=60, env=ENV)
        assert late.returncode != 0 and "is in use by another process" in late.stderr


def test_check_locks_vmdk_extents(tmp_path: Path) -> None:
    """Once a served VMDK was written, its descriptor is a new file (renamed
    over the old one) but its extents are the ones being written: ``image
    check`` must find them locked and refuse, not report half-done updates
    as damage."""
    vmdk = tmp_path / "d.vmdk"
    assert qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(vmdk),
                    "4M").returncode == 0
    with open_image(str(vmdk), read_only=False) as img:
        img.write(0, b"\x11" * 512)
        img.flush()
        _one_line_in_use(ours("image", "check", str(vmdk)))
    assert ours("image", "check", str(vmdk)).returncode == 0
