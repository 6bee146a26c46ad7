"""Checks of the initiator shared by the runs against tgt and against our target.

Each check drives the public initiator API against whatever target the caller
started and asserts what must hold on any correct target: a verified random
write stream, unaligned writes sharing a block, WRITE SAME, the sync file
wrapper, recovery across a target crash, the replacement timeout, and one-line
CLI failures. :class:`TargetProcess` runs our own target as a subprocess
(``python -m target.cli serve``), so a test can SIGKILL it like tgtd.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import pytest

from initiator.blockdev import BlockDevice, LUNFile
from initiator.errors import SessionFailed
from initiator.scsi import LUN
from initiator.session import Session, SessionOptions

MiB = 1 << 20
LONG = os.environ.get("AIOISCSI_LONG", "") not in ("", "0")
ROOT = Path(__file__).resolve().parent.parent
_READY_LINE = "Press Ctrl-C to stop."
_READY_DEADLINE = 30.0


def opts(**kw: object) -> SessionOptions:
    """Test session options: no idle pings, a 30 s replacement timeout."""
    o = SessionOptions(nop_interval=None, replacement_timeout=30.0)
    for k, v in kw.items():
        if not hasattr(o, k):
            raise AttributeError(f"SessionOptions has no field {k}")
        setattr(o, k, v)
    return o


async def until(cond: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    """Poll ``cond`` (a bounded wait for a condition, not a sleep-to-sync)."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------- data checks


async def random_write_verify(dev: BlockDevice, total: int, seed: int = 4) -> bytearray:
    """Write ``total`` bytes at random offsets and sizes (8 concurrent writers
    on disjoint stripes so the model is exact), read back at random and whole;
    return the model of the device (it started zeroed)."""
    size = dev.size
    rng = random.Random(seed)
    model = bytearray(size)
    stripes = 8
    stripe = size // stripes
    written = 0

    async def writer(k: int, budget: int) -> None:
        nonlocal written
        base = k * stripe
        done = 0
        while done < budget:
            n = rng.randint(1, min(MiB, stripe - 1))
            off = base + rng.randrange(0, stripe - n)
            buf = rng.randbytes(n)
            await dev.write(off, buf)
            model[off : off + n] = buf
            done += n
        written += done

    await asyncio.gather(*(writer(k, total // stripes) for k in range(stripes)))
    assert written >= total
    for _ in range(64):
        n = rng.randint(1, min(2 * MiB, size))
        off = rng.randrange(0, size - n + 1)
        assert await dev.read(off, n) == model[off : off + n]
    assert await dev.read(0, size) == model
    await dev.flush()
    return model


async def unaligned_writes_sharing_a_block(dev: BlockDevice) -> None:
    """64 concurrent writers each own 8 bytes of the same two blocks; the
    read-modify-write locking must keep every one of them."""
    await asyncio.gather(*(dev.write(300 + 8 * i, bytes([i]) * 8) for i in range(64)))
    got = await dev.read(300, 512)
    assert got == b"".join(bytes([i]) * 8 for i in range(64))


async def write_same_roundtrip(lun: LUN) -> None:
    """WRITE SAME(16) of a pattern block, read back, SYNCHRONIZE CACHE."""
    await lun.write_same(10, 20, b"\xab" * 512)
    assert bytes(await lun.read(10, 20)) == b"\xab" * 512 * 20
    await lun.synchronize_cache()


def lun_file_roundtrip(url: str, size: int, backing: Path) -> None:
    """The synchronous ``io.RawIOBase`` wrapper: seek, write, read, EOF."""
    with LUNFile.open(url, "r+b", opts()) as f:
        assert f.seek(0, os.SEEK_END) == size
        f.seek(1000)
        assert f.write(b"hello, lun") == 10
        f.seek(-10, os.SEEK_CUR)
        assert f.read(10) == b"hello, lun"
        f.seek(size - 3)
        assert f.read(10) == bytes(3)
        assert f.read(10) == b""
    with open(backing, "rb") as raw:
        raw.seek(1000)
        assert raw.read(10) == b"hello, lun"


def fill(url: str, chunks: Sequence[tuple[int, bytes]]) -> None:
    """Write ``chunks`` (offset, data) to a LUN through LUNFile."""
    with LUNFile.open(url, "r+b", opts()) as f:
        for off, data in chunks:
            f.seek(off)
            f.write(data)


# ---------------------------------------------------------------- recovery


async def verified_stream_across_crash(s: Session, dev: BlockDevice, kill: Callable[[], None],
                                       start: Callable[[], None], seed: int = 7) -> bytearray:
    """Eight writers stream random writes; after 8 MiB the target is killed
    with commands in flight and started again. Every write must complete,
    and the whole device must equal the model; return the model."""
    size = dev.size
    rng = random.Random(seed)
    model = bytearray(size)
    stripes = 8
    stripe = size // stripes
    progress = 0
    inflight: list[int] = []
    finished: list[int] = []

    async def writer(k: int) -> None:
        nonlocal progress
        base = k * stripe
        for _ in range(40):
            n = rng.randint(4096, 512 * 1024)
            off = base + rng.randrange(0, stripe - n)
            buf = rng.randbytes(n)
            await dev.write(off, buf)
            model[off : off + n] = buf
            progress += n
        finished.append(k)

    async def killer() -> None:
        # Polls until 8 MiB went by and commands are in flight.
        while progress < 8 * MiB or s.in_flight == 0:
            if len(finished) == stripes:
                raise AssertionError("the write stream ended before the target was killed")
            await asyncio.sleep(0.001)
        inflight.append(s.in_flight)
        # Killed from the loop's thread, blocking it: the commands counted
        # above cannot complete before the target is dead.
        kill()
        await asyncio.to_thread(start)

    await asyncio.gather(killer(), *(writer(k) for k in range(stripes)))
    assert inflight and inflight[0] > 0, "the target must die with commands in flight"
    assert s.recoveries >= 1
    assert await dev.read(0, size) == model
    return model


async def replacement_timeout_fails(lun: LUN, kill: Callable[[], None]) -> None:
    """With the target gone for good, a command fails with SessionFailed
    naming the replacement timeout, and so does every later one."""
    await lun.write(0, b"\1" * 512)
    await asyncio.to_thread(kill)
    start = time.monotonic()
    with pytest.raises(SessionFailed, match="replacement timeout"):
        await lun.write(0, b"\2" * 512)
    assert time.monotonic() - start < 30
    with pytest.raises(SessionFailed):
        await lun.read(0, 1)


# --------------------------------------------------------------------- CLI


def cli_failures_are_one_line(cases: Sequence[tuple[Sequence[str], str]],
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``(argv, words)``: the CLI exits non-zero with exactly one line
    on stderr containing ``words``, and nothing on stdout."""
    from initiator.cli import main

    for argv, words in cases:
        assert main(list(argv)) != 0, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1, (argv, captured.err)
        assert words in lines[0], (argv, lines[0])
        assert captured.out == "", (argv, captured.out)


# ------------------------------------------------------- our target process


class TargetProcess:
    """Our target (``python -m target.cli serve IMAGE``) as a subprocess on a
    fixed loopback port, so it can be killed and started again on the same
    port and file. Readiness is its attach help on stdout (printed once it
    listens), polled with a deadline."""

    def __init__(self, image: Path, port: int, name: str, *, workdir: Path,
                 extra: Sequence[str] = ()) -> None:
        self.image = image
        self.port = port
        self.name = name
        self.workdir = workdir
        self.extra = tuple(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def portal(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def url(self, lun: int = 0, user: str | None = None, secret: str | None = None) -> str:
        """The iscsi:// URL of a LUN."""
        cred = f"{user}%{secret}@" if user else ""
        return f"iscsi://{cred}{self.portal}/{self.name}/{lun}"

    def start(self) -> None:
        """Start the target and wait until it listens."""
        assert self.proc is None or self.proc.poll() is not None, "target already running"
        self._starts += 1
        log_path = self.workdir / f"target-{self.port}-{self._starts}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "target.cli", "serve", str(self.image),
                 "--portal", self.portal, "--name", self.name, *self.extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + _READY_DEADLINE
        while _READY_LINE not in log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"target exited with {self.proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-800:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("our target did not start listening within "
                                   f"{_READY_DEADLINE:g} s")
            time.sleep(0.02)  # polling a condition with a deadline, not synchronising

    def kill(self) -> None:
        """SIGKILL the target (a crash: no logout, no cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (orderly shutdown), SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
