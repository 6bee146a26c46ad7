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
from target.backends.locking import ImageInUse, force_share, lock_image, reopening
from target.backends.registry import open_image
from tests.tgt import free_port
from tests.tools import require_tool

BIN = Path(sys.executable).parent
TARGET = str(BIN / "iscsi-target")


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
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    return subprocess.run([TARGET, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def qcow(tmp_path: Path) -> Path:
    p = tmp_path / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(p), "16M").returncode == 0
    return p


def test_two_targets_on_one_image(qcow: Path) -> None:
    with serving(qcow):
        second = subprocess.run([TARGET, "serve", str(qcow), "--portal",
                                 f"127.0.0.1:{free_port()}", "--no-control"],
                                capture_output=True, text=True, timeout=60)
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
