"""Shared helpers for disk-image tests (qcow2, Parallels, VDI, VHD, VMDK...).

qemu-img / qemu-io are the reference implementation: the helpers here build
images with them, and check images we wrote with them. Every helper that
runs a tool calls ``tests.tools.require_tool`` so a missing qemu-utils skips
(or, under AIOISCSI_REQUIRE_TOOLS=1, fails) the calling test.

API (all paths are ``str | os.PathLike``):

``qemu_img(*args) -> str``
    Run ``qemu-img ARGS``; return stdout; AssertionError with stderr on failure.
``qemu_img_json(*args) -> Any``
    Same with ``--output=json`` appended, parsed.
``qemu_io(path, fmt, *cmds) -> str``
    Run ``qemu-io -f FMT -c CMD ... PATH`` (e.g. ``"write -P 0xab 0 64k"``).
``qemu_check(path, fmt) -> dict``
    ``qemu-img check``; assert no corruptions and no leaks; return the report.
``qemu_compare(a, fmt_a, b, fmt_b="raw")``
    ``qemu-img compare -s``-free compare; assert the guest contents are equal.
``qemu_info(path, fmt=None) -> dict``
    ``qemu-img info --output=json`` (``--backing-chain`` off).
``random_bytes(size, seed) -> bytes``
    Deterministic random data.
``random_raw(path, size, seed, holes=True) -> bytes``
    Write a raw file of ``size`` random bytes where (if ``holes``) every
    third 64 KiB run is left a zero hole; return its contents.
``random_ops(size, seed, count, *, align=512, max_len=256 KiB) -> list[(off, bytes)]``
    Random aligned writes (offset and length multiples of ``align``) inside
    ``size``; use with ``apply_ops``.
``apply_ops(ops, *targets)``
    Apply the writes to each target: a Backend (``.write``), a bytearray
    model, or a path of a raw file.
``read_all(backend, chunk=1 MiB) -> bytes``
    The whole virtual disk through ``backend.read`` (copies into bytes).
``compare_with_raw(backend, raw_path)`` / ``assert_same(backend, expected)``
    Assert the backend's contents equal a raw file's / a bytes object,
    naming the first differing offset on failure.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterable
from typing import Any, Protocol

from tests.tools import require_tool

KiB = 1024
MiB = 1024 * 1024

StrPath = str | os.PathLike[str]


class _Readable(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...


class _Writable(Protocol):
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


def _run(tool: str, args: list[str]) -> str:
    exe = require_tool(tool)
    proc = subprocess.run([exe, *args], check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)} failed with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def qemu_img(*args: StrPath) -> str:
    """Run qemu-img with ``args``; return its stdout."""
    return _run("qemu-img", [os.fspath(a) for a in args])


def qemu_img_json(*args: StrPath) -> Any:
    """Run qemu-img with ``args`` + ``--output=json``; return the parsed JSON."""
    return json.loads(qemu_img(*args, "--output=json"))


def qemu_io(path: StrPath, fmt: str, *cmds: str) -> str:
    """Run qemu-io commands (each one ``-c`` argument) on an image."""
    args: list[str] = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(os.fspath(path))
    out = _run("qemu-io", args)
    # qemu-io reports command errors on stdout and still exits 0.
    low = out.lower()
    if "error" in low or "failed" in low:
        raise AssertionError(f"qemu-io {args} reported an error:\n{out}")
    return out


def qemu_info(path: StrPath, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info`` as a dict."""
    args: list[StrPath] = ["info"]
    if fmt is not None:
        args += ["-f", fmt]
    args.append(path)
    result: dict[str, Any] = qemu_img_json(*args)
    return result


def qemu_check(path: StrPath, fmt: str) -> dict[str, Any]:
    """Run ``qemu-img check``; assert the image is clean (no corruptions,
    leaks or check errors) and return the JSON report."""
    exe = require_tool("qemu-img")
    proc = subprocess.run(
        [exe, "check", "-f", fmt, "--output=json", os.fspath(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks,
    # 63 format does not support checks.
    if proc.returncode == 63:
        return {}
    assert proc.returncode == 0, f"qemu-img check {path}: rc={proc.returncode}\n{proc.stdout}{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert report.get(key, 0) == 0, f"qemu-img check {path}: {key}={report[key]}: {report}"
    return report


def qemu_compare(a: StrPath, fmt_a: str, b: StrPath, fmt_b: str = "raw") -> None:
    """Assert qemu-img sees the same guest contents in images ``a`` and ``b``."""
    exe = require_tool("qemu-img")
    proc = subprocess.run(
        [exe, "compare", "-f", fmt_a, "-F", fmt_b, os.fspath(a), os.fspath(b)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"qemu-img compare {a} {b}: rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


def random_bytes(size: int, seed: int) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def random_raw(path: StrPath, size: int, seed: int, holes: bool = True) -> bytes:
    """Write a raw image of random data (with zero holes every third 64 KiB
    run when ``holes``) and return its contents."""
    data = bytearray(random_bytes(size, seed))
    if holes:
        run = 64 * KiB
        for off in range(run, size, 3 * run):
            end = min(off + run, size)
            data[off:end] = bytes(end - off)
    with open(path, "wb") as f:
        f.write(data)
    if holes:
        # Punch the zero runs so the raw file is really sparse (convert then
        # leaves them unallocated in the target format).
        subprocess.run(["fallocate", "--dig-holes", os.fspath(path)], check=False, capture_output=True)
    return bytes(data)


def random_ops(
    size: int,
    seed: int,
    count: int,
    *,
    align: int = 512,
    max_len: int = 256 * KiB,
) -> list[tuple[int, bytes]]:
    """``count`` random writes (offset, data) inside a ``size``-byte disk,
    offsets and lengths multiples of ``align``."""
    rng = random.Random(seed)
    ops: list[tuple[int, bytes]] = []
    units = size // align
    max_units = max(1, max_len // align)
    for _ in range(count):
        n = rng.randint(1, min(max_units, units))
        start = rng.randint(0, units - n)
        ops.append((start * align, rng.randbytes(n * align)))
    return ops


def apply_ops(ops: Iterable[tuple[int, bytes]], *targets: _Writable | bytearray | StrPath) -> None:
    """Apply writes to each target: a backend, a bytearray, or a raw file path."""
    ops = list(ops)
    for t in targets:
        if isinstance(t, bytearray):
            for off, data in ops:
                t[off : off + len(data)] = data
        elif isinstance(t, (str, os.PathLike)):
            fd = os.open(t, os.O_RDWR)
            try:
                for off, data in ops:
                    os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        else:
            for off, data in ops:
                t.write(off, data)


def read_all(backend: _Readable, chunk: int = MiB) -> bytes:
    """Read the whole virtual disk through the backend."""
    out = bytearray()
    size = backend.size
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        buf = backend.read(off, n)
        assert len(buf) == n, f"read({off}, {n}) returned {len(buf)} bytes"
        out += buf
    return bytes(out)


def _first_diff(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        n = min(len(a), len(b))
    else:
        n = len(a)
    lo, hi = 0, n
    # Binary search on prefixes keeps this fast without a per-byte loop.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def assert_same(backend: _Readable, expected: bytes | bytearray) -> None:
    """Assert the backend's full contents equal ``expected``."""
    got = read_all(backend)
    assert len(got) == len(expected), f"size {len(got)} != expected {len(expected)}"
    if got != expected:
        off = _first_diff(got, bytes(expected))
        raise AssertionError(
            f"contents differ at offset {off:#x}: got {got[off:off+16].hex()} "
            f"expected {bytes(expected[off:off+16]).hex()}"
        )


def compare_with_raw(backend: _Readable, raw_path: StrPath) -> None:
    """Assert the backend reads exactly the contents of a raw file."""
    with open(raw_path, "rb") as f:
        expected = f.read()
    assert_same(backend, expected)
