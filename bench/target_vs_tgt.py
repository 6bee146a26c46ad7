#!/usr/bin/env python3
"""Our target against tgtd (Debian ``tgt``) serving the same file, measured
in the same run with libiscsi's ``iscsi-perf`` (4 KiB random reads and 1 MiB
sequential reads, 32 in flight) and ``qemu-img convert`` writes.

    .venv/bin/python bench/target_vs_tgt.py [--seconds 10] [--size-mib 1024]

Prints MB/s and IOPS for both and the ratio ours/tgt, and each target's
CPU time per completed I/O (utime+stime of the target process from
/proc/PID/stat over the ops iscsi-perf completed) -- far steadier than
throughput on a shared machine. Both targets run as separate processes on
loopback; ours is the real ``iscsi-target`` command (uvloop when installed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tgt import Tgtd, TgtConfig, free_port  # noqa: E402

IQN = "iqn.2026-11.org.aioiscsi.bench:disk"


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (and its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iscsi_perf(url: str, seconds: int, blocks: int, random: bool,
               pid: int) -> tuple[float, float, float]:
    """(IOPS, MB/s, target CPU microseconds per I/O) averaged over the run."""
    cmd = ["iscsi-perf", "-m", "32", "-t", str(seconds), "-b", str(blocks)]
    if random:
        cmd.append("-r")
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    out = proc.stdout + proc.stderr
    m = re.findall(r"iops average (\d+) \((\d+) MB/s\)", out)
    if not m:
        raise RuntimeError(f"iscsi-perf {url} gave no result:\n{out[-800:]}")
    iops, mbs = m[-1]
    # iscsi-perf reports the average over its run; the ops it completed are
    # that average over the time it ran (login included, a fraction of 1 %).
    ops = float(iops) * min(elapsed, float(seconds))
    return float(iops), float(mbs), cpu / ops * 1e6 if ops else float("nan")


def qemu_write(url: str, src: str) -> float:
    """MB/s of ``qemu-img convert`` writing ``src`` onto the LUN."""
    size = os.path.getsize(src)
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", src, url],
                   check=True, capture_output=True, timeout=600)
    return size / (time.perf_counter() - t0) / 1e6


def measure(url: str, seconds: int, src: str, pid: int) -> dict[str, float]:
    r4k = iscsi_perf(url, seconds, 8, True, pid)
    s1m = iscsi_perf(url, seconds, 2048, False, pid)
    w = qemu_write(url, src)
    return {"4k_rand_read_iops": r4k[0], "4k_rand_read_mbs": r4k[1],
            "4k_rand_read_cpu_us_per_io": r4k[2],
            "1m_seq_read_mbs": s1m[1], "1m_seq_read_cpu_us_per_io": s1m[2],
            "qemu_img_write_mbs": w}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    for tool in ("iscsi-perf", "qemu-img", "tgtd", "tgtadm"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"bench: {tool} is not installed (run scripts/test as root once)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="aioiscsi-bench-"))
    disk = work / "disk.img"
    src = work / "src.raw"
    size = args.size_mib << 20
    # Fully allocated, non-zero data, so neither target reads holes.
    with open(disk, "wb") as f, open(src, "wb") as g:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size_mib):
            f.write(chunk)
        g.write(os.urandom(min(size, 256 << 20)))
    results: dict[str, dict[str, float]] = {}

    port = free_port()
    exe = Path(sys.executable).with_name("iscsi-target")
    proc = subprocess.Popen([str(exe), "serve", str(disk), "--name", IQN,
                             "--portal", f"127.0.0.1:{port}", "--nop-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        results["aioiscsi"] = measure(f"iscsi://127.0.0.1:{port}/{IQN}/0", args.seconds,
                                      str(src), proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)

    tgt = Tgtd(work, TgtConfig(size=size), backing=disk)
    tgt.start()
    try:
        assert tgt.proc is not None
        results["tgt"] = measure(tgt.url(), args.seconds, str(src), tgt.proc.pid)
    finally:
        tgt.stop()

    print(f"{'metric':28} {'aioiscsi':>12} {'tgt':>12} {'ratio':>8}")
    for key in results["tgt"]:
        ours, theirs = results["aioiscsi"][key], results["tgt"][key]
        print(f"{key:28} {ours:12.1f} {theirs:12.1f} {ours / theirs:8.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
