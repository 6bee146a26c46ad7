#!/usr/bin/env python3
"""Throughput of each image format relative to raw, measured in the same run.

    .venv/bin/python bench/formats.py [--size-mib 256] [--seconds 3] [--no-iscsi]

For each format (raw, qcow2, vdi, vhd, vhdx, vmdk, parallels) an image is created
and fully allocated first (sequential 1 MiB writes, not measured), then:

* backend level - the Backend API called in a loop, as the SCSI layer does:
  sequential 1 MiB reads and writes, random 4 KiB reads and writes;
* over iSCSI (unless --no-iscsi, and when the tools are installed) - the
  image served by the real ``iscsi-target serve`` process: libiscsi's
  ``iscsi-perf`` for 1 MiB sequential and 4 KiB random reads (32 in
  flight), ``qemu-img bench -w`` for 1 MiB sequential and scattered 4 KiB
  writes (depth 32).

Prints MB/s per format and the ratio format/raw (the design aims at >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from target.backends.base import Backend
from target.backends.registry import create_image, formats, open_image

MiB = 1 << 20
FORMATS = ("raw", "qcow2", "vdi", "vhd", "vhdx", "vmdk", "parallels")
IQN = "iqn.2026-11.org.aioiscsi.bench:formats"


def allocate(img: Backend) -> None:
    """Write every byte once so later passes measure allocated data."""
    chunk = os.urandom(MiB)
    pos = 0
    size = img.size
    while pos < size:
        n = min(MiB, size - pos)
        img.write(pos, memoryview(chunk)[:n])
        pos += n
    img.flush()


def timed(seconds: float, op: Callable[[int], int]) -> float:
    """Run ``op(i)`` (returns bytes moved) until ``seconds`` pass; MB/s."""
    moved = 0
    i = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(64):
            moved += op(i)
            i += 1
        now = time.perf_counter()
        if now >= end:
            return moved / (now - t0) / 1e6


def backend_figures(img: Backend, seconds: float) -> dict[str, float]:
    size = img.size
    blocks_1m = size // MiB
    blocks_4k = size // 4096
    rng = random.Random(1)
    offs = [rng.randrange(blocks_4k) * 4096 for _ in range(1 << 16)]
    buf_1m = os.urandom(MiB)
    buf_4k = os.urandom(4096)

    def seq_read(i: int) -> int:
        return len(img.read((i % blocks_1m) * MiB, MiB))

    def seq_write(i: int) -> int:
        img.write((i % blocks_1m) * MiB, buf_1m)
        return MiB

    def rnd_read(i: int) -> int:
        return len(img.read(offs[i & 0xFFFF], 4096))

    def rnd_write(i: int) -> int:
        img.write(offs[i & 0xFFFF], buf_4k)
        return 4096

    return {
        "seq 1M read": timed(seconds, seq_read),
        "seq 1M write": timed(seconds, seq_write),
        "rand 4K read": timed(seconds, rnd_read),
        "rand 4K write": timed(seconds, rnd_write),
    }


# ---------------------------------------------------------------- iSCSI


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, deadline: float = 20.0) -> None:
    import socket

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def iscsi_perf(url: str, seconds: int, blocks: int, rnd: bool) -> float:
    cmd = ["iscsi-perf", "-m", "32", "-t", str(seconds), "-b", str(blocks)]
    if rnd:
        cmd.append("-r")
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    m = re.findall(r"iops average (\d+) \((\d+) MB/s\)", proc.stdout + proc.stderr)
    if not m:
        raise RuntimeError(f"iscsi-perf {url}: no result:\n{(proc.stdout + proc.stderr)[-500:]}")
    iops = float(m[-1][0])
    return iops * blocks * 512 / 1e6


def qemu_bench_write(url: str, size: int, buf: int, count: int, step: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-d", "32", "-s", str(buf),
                    "-S", str(step), "-c", str(count), url],
                   check=True, capture_output=True, timeout=600)
    return buf * count / (time.perf_counter() - t0) / 1e6


def iscsi_figures(path: str, seconds: int, size: int) -> dict[str, float]:
    port = free_port()
    exe = Path(sys.executable).with_name("iscsi-target")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "target.cli"]
    proc = subprocess.Popen([*cmd, "serve", path, "--name", IQN, "--portal", f"127.0.0.1:{port}",
                             "--nop-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=str(Path(__file__).resolve().parent.parent))
    url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
    try:
        wait_port(port)
        # qemu-img bench wraps around the image: keep the step inside it.
        step4k = 68 * 1024
        return {
            "seq 1M read": iscsi_perf(url, seconds, 2048, False),
            "seq 1M write": qemu_bench_write(url, size, MiB, max(64, size // MiB), MiB),
            "rand 4K read": iscsi_perf(url, seconds, 8, True),
            "4K write (scattered)": qemu_bench_write(url, size, 4096, min(20000, size // step4k),
                                                     step4k),
        }
    finally:
        proc.terminate()
        proc.wait(30)


# ---------------------------------------------------------------- report


def table(title: str, results: dict[str, dict[str, float]]) -> None:
    names = [f for f in FORMATS if f in results]
    metrics = list(results["raw"])
    print(f"\n{title}: MB/s (ratio to raw)")
    print(f"{'metric':22}" + "".join(f"{n:>18}" for n in names))
    for m in metrics:
        base = results["raw"][m]
        cells = []
        for n in names:
            v = results[n][m]
            cells.append(f"{v:10.0f} ({v / base:4.2f})")
        print(f"{m:22}" + "".join(f"{c:>18}" for c in cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="per backend-level measurement")
    ap.add_argument("--iscsi-seconds", type=int, default=5)
    ap.add_argument("--no-iscsi", action="store_true")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    wanted = [f for f in args.formats.split(",") if f in formats()]
    if "raw" not in wanted:
        wanted.insert(0, "raw")
    do_iscsi = not args.no_iscsi and all(shutil.which(t) for t in ("iscsi-perf", "qemu-img"))
    if not args.no_iscsi and not do_iscsi:
        print("bench: iscsi-perf/qemu-img not installed: backend level only", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="aioiscsi-formats-"))
    size = args.size_mib * MiB
    backend: dict[str, dict[str, float]] = {}
    iscsi: dict[str, dict[str, float]] = {}
    try:
        for fmt in wanted:
            path = str(work / f"disk.{fmt}")
            create_image(path, fmt, size)
            with open_image(path, fmt=fmt) as img:
                allocate(img)
                backend[fmt] = backend_figures(img, args.seconds)
                img.flush()
            print(f"bench: {fmt} backend done", file=sys.stderr)
            if do_iscsi:
                iscsi[fmt] = iscsi_figures(path, args.iscsi_seconds, size)
                print(f"bench: {fmt} iSCSI done", file=sys.stderr)
            os.unlink(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table(f"Backend level ({args.size_mib} MiB images, allocated)", backend)
    if iscsi:
        table("Over iSCSI (iscsi-perf reads, qemu-img bench writes, 32 in flight)", iscsi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
