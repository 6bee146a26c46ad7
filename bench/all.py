#!/usr/bin/env python3
"""Every performance aim of the project in one run, printed as one table.

    .venv/bin/python bench/all.py [--seconds 5] [--size-mib 256] [--json FILE]
                                  [--only NAME ...]

Each row runs our code and the peer people would use instead, on the same
file, one after the other on loopback, and prints both figures, the ratio
ours/peer and, where it applies, each side's CPU time per completed I/O
(utime+stime from /proc over the ops done -- steadier than throughput on a
shared machine; for an initiator row it is the initiator's CPU):

* ``target-*``: our ``iscsi-target serve`` against tgtd, driven by libiscsi's
  ``iscsi-perf`` (reads, 32 in flight), our initiator's ``bench --rw write``
  (4 KiB random writes) and ``qemu-img convert`` (1 MiB sequential writes);
* ``digests-*``: our target with CRC32C header and data digests against the
  same without, our initiator driving both;
* ``format-*``: each image format against raw, served by our target;
* ``sessions``: 16 sessions with 8 in flight each against one session with
  32, our initiator on our target; the row also gives the smallest share
  of a session relative to the largest;
* ``gateways``: two target processes serving one image (as ALUA gateways
  do, ``shareable``) read at once, against one process;
* ``initiator-*``: our initiator against ``iscsi-perf`` on the same tgtd.

Nothing here asserts a speed: the test suite never times anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from initiator.blockdev import BlockDevice  # noqa: E402
from initiator.cli_copy import bench  # noqa: E402
from initiator.options import SessionOptions  # noqa: E402
from target.backends.registry import create_image  # noqa: E402
from tests.initiator_checks import TargetProcess  # noqa: E402
from tests.target_fixture import TARGET_NAME  # noqa: E402
from tests.tgt import TgtConfig, Tgtd, free_port  # noqa: E402

_AVG = re.compile(r"iops average (\d+) \((\d+) MB/s\)")
FORMATS = ("qcow2", "vdi", "vhd", "vmdk", "parallels")


@dataclass
class Row:
    """One comparison: ours against the peer."""

    name: str
    unit: str
    ours: float
    peer: float
    peer_name: str
    ours_cpu_us: float | None = None
    peer_cpu_us: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("nan")


def proc_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def iscsi_perf(url: str, seconds: float, blocks: int, rnd: bool) -> tuple[float, float]:
    """(IOPS, iscsi-perf's CPU µs per I/O), 32 in flight."""
    cmd = ["iscsi-perf", "-m", "32", "-t", str(int(seconds)), "-b", str(blocks)]
    if rnd:
        cmd.append("-r")
    c0 = children_cpu()
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60)
    cpu = children_cpu() - c0
    found = _AVG.findall(out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"iscsi-perf {url}: no result: {(out.stdout + out.stderr)[-400:]}")
    iops = float(found[-1][0])
    return iops, cpu / (iops * seconds) * 1e6 if iops else float("nan")


async def _ours(url: str, *, rw: str, pattern: str, bs: int, depth: int, seconds: float,
                digests: bool = False) -> float:
    opts = SessionOptions(nop_interval=None)
    if digests:
        opts = SessionOptions(nop_interval=None, header_digest="CRC32C", data_digest="CRC32C")
    dev = await BlockDevice.open(url, opts)
    try:
        r = await bench(dev, rw=rw, pattern=pattern, block_size=bs, depth=depth, seconds=seconds)
    finally:
        await dev.close()
    return r.iops


def ours_io(url: str, *, rw: str, pattern: str, bs: int, seconds: float, depth: int = 32,
            digests: bool = False) -> tuple[float, float]:
    """(IOPS, our initiator's CPU µs per I/O) for one workload."""
    c0 = self_cpu()
    iops = asyncio.run(_ours(url, rw=rw, pattern=pattern, bs=bs, depth=depth, seconds=seconds,
                             digests=digests))
    cpu = self_cpu() - c0
    return iops, cpu / (iops * seconds) * 1e6 if iops else float("nan")


def qemu_img_write(url: str, src: Path) -> float:
    """MB/s of ``qemu-img convert`` writing ``src`` onto the LUN."""
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), url],
                   check=True, capture_output=True, timeout=600)
    return src.stat().st_size / (time.perf_counter() - t0) / 1e6


@contextmanager
def our_target(image: Path, work: Path, *extra: str) -> Iterator[tuple[str, int]]:
    """(URL of LUN 0, PID) of ``iscsi-target serve IMAGE``."""
    t = TargetProcess(image, free_port(), TARGET_NAME, workdir=work,
                      extra=("--nop-interval", "0", "--no-control", *extra))
    with t:
        assert t.proc is not None
        yield t.url(0), t.proc.pid


@contextmanager
def tgt_target(image: Path, work: Path, size: int) -> Iterator[tuple[str, int]]:
    with Tgtd(work, TgtConfig(size=size), backing=image) as t:
        assert t.proc is not None
        yield t.url(), t.proc.pid


def measured(pid: int, run: Callable[[], tuple[float, float]], seconds: float
             ) -> tuple[float, float, float]:
    """(IOPS, target CPU µs/IO, client CPU µs/IO) of ``run`` against ``pid``."""
    c0 = proc_cpu(pid)
    iops, client = run()
    cpu = proc_cpu(pid) - c0
    return iops, cpu / (iops * seconds) * 1e6 if iops else float("nan"), client


def target_rows(disk: Path, src: Path, work: Path, seconds: float, size: int) -> list[Row]:
    workloads: list[tuple[str, str, Callable[[str], tuple[float, float]], float]] = [
        ("target-4k-randread", "IOPS", lambda u: iscsi_perf(u, seconds, 8, True), 1),
        ("target-1m-seqread", "MB/s", lambda u: iscsi_perf(u, seconds, 2048, False), 1.048576),
        ("target-4k-randwrite", "IOPS",
         lambda u: ours_io(u, rw="write", pattern="rand", bs=4096, seconds=seconds), 1),
    ]
    got: dict[str, dict[str, tuple[float, float]]] = {"ours": {}, "tgt": {}}
    writes: dict[str, float] = {}
    for side, ctx in (("ours", our_target(disk, work)), ("tgt", tgt_target(disk, work, size))):
        with ctx as (url, pid):
            for name, _, fn, scale in workloads:
                iops, tcpu, _ = measured(pid, lambda: fn(url), seconds)
                got[side][name] = (iops * scale, tcpu)
            writes[side] = qemu_img_write(url, src)
    rows = [Row(name, unit, got["ours"][name][0], got["tgt"][name][0], "tgt",
                got["ours"][name][1], got["tgt"][name][1]) for name, unit, _, _ in workloads]
    rows.append(Row("target-1m-seqwrite (qemu-img convert)", "MB/s", writes["ours"],
                    writes["tgt"], "tgt"))
    return rows


def digest_rows(disk: Path, work: Path, seconds: float) -> list[Row]:
    rows = []
    with our_target(disk, work) as (url, pid):
        for name, bs, pattern, unit, scale in (("digests-4k-randread", 4096, "rand", "IOPS", 1),
                                               ("digests-1m-seqread", 1 << 20, "seq", "MB/s",
                                                1.048576)):
            on, on_cpu, _ = measured(pid, lambda: ours_io(url, rw="read", pattern=pattern, bs=bs,
                                                          seconds=seconds, digests=True), seconds)
            off, off_cpu, _ = measured(pid, lambda: ours_io(url, rw="read", pattern=pattern,
                                                            bs=bs, seconds=seconds), seconds)
            rows.append(Row(name, unit, on * scale, off * scale, "digests off", on_cpu, off_cpu))
    return rows


def format_rows(work: Path, seconds: float, size: int) -> list[Row]:
    results: dict[str, tuple[float, float]] = {}
    for fmt in ("raw", *FORMATS):
        img = work / f"fmt.{fmt}"
        if fmt == "raw":
            with open(img, "wb") as f:
                f.truncate(size)
        else:
            create_image(str(img), fmt, size)
        with our_target(img, work) as (url, _):
            # Fully allocated first (not measured), so reads hit data.
            qemu_img_write(url, work / "src.raw")
            seq, _ = iscsi_perf(url, seconds, 2048, False)
            rnd, _ = iscsi_perf(url, seconds, 8, True)
        results[fmt] = (seq * 1.048576, rnd)
        img.unlink()
    rows = []
    for fmt in FORMATS:
        rows.append(Row(f"format-{fmt}-1m-seqread", "MB/s", results[fmt][0], results["raw"][0],
                        "raw"))
        rows.append(Row(f"format-{fmt}-4k-randread", "IOPS", results[fmt][1], results["raw"][1],
                        "raw"))
    return rows


async def _sessions(url: str, n: int, depth: int, seconds: float) -> list[float]:
    devs = [await BlockDevice.open(url, SessionOptions(nop_interval=None)) for _ in range(n)]
    try:
        results = await asyncio.gather(*(bench(d, rw="read", pattern="rand", block_size=4096,
                                               depth=depth, seconds=seconds) for d in devs))
    finally:
        for d in devs:
            await d.close()
    return [r.iops for r in results]


def session_rows(disk: Path, work: Path, seconds: float) -> list[Row]:
    with our_target(disk, work) as (url, pid):
        c0 = proc_cpu(pid)
        many = asyncio.run(_sessions(url, 16, 8, seconds))
        many_cpu = (proc_cpu(pid) - c0) / (sum(many) * seconds) * 1e6
        c0 = proc_cpu(pid)
        one = asyncio.run(_sessions(url, 1, 32, seconds))
        one_cpu = (proc_cpu(pid) - c0) / (sum(one) * seconds) * 1e6
    share = min(many) / max(many) if max(many) else 0.0
    return [Row("sessions-16x8-vs-1x32-4k-randread", "IOPS", sum(many), sum(one), "1 session",
                many_cpu, one_cpu, note=f"smallest/largest session share {share:.2f}")]


def _perf_async(url: str, seconds: float, depth: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["iscsi-perf", "-m", str(depth), "-t", str(int(seconds)), "-b", "8",
                             "-r", url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _perf_result(proc: subprocess.Popen[str], seconds: float) -> float:
    out, _ = proc.communicate(timeout=seconds + 60)
    found = _AVG.findall(out)
    if not found:
        raise RuntimeError(f"iscsi-perf: no result: {out[-400:]}")
    return float(found[-1][0])


def gateway_rows(disk: Path, work: Path, seconds: float) -> list[Row]:
    """Two target processes on one image (shareable, as gateways are) read
    by two iscsi-perf at once, against one process read by one with the
    same total in flight: how far more processes use more cores."""
    with our_target(disk, work, "--mode", "shareable") as (url_a, _), \
            our_target(disk, work, "--mode", "shareable") as (url_b, _):
        procs = [_perf_async(u, seconds, 16) for u in (url_a, url_b)]
        two = sum(_perf_result(p, seconds) for p in procs)
    with our_target(disk, work) as (url, _):
        one = _perf_result(_perf_async(url, seconds, 32), seconds)
    return [Row("gateways-2-vs-1-4k-randread", "IOPS", two, one, "1 process",
                note=f"{os.cpu_count()} CPUs; iscsi-perf runs on them too")]


def initiator_rows(disk: Path, work: Path, seconds: float, size: int) -> list[Row]:
    rows = []
    with tgt_target(disk, work, size) as (url, _):
        for name, bs, pattern, unit, scale in (("initiator-4k-randread", 4096, "rand", "IOPS", 1),
                                               ("initiator-1m-seqread", 1 << 20, "seq", "MB/s",
                                                1.048576)):
            lib, lib_cpu = iscsi_perf(url, seconds, bs // 512, pattern == "rand")
            our, our_cpu = ours_io(url, rw="read", pattern=pattern, bs=bs, seconds=seconds)
            rows.append(Row(name, unit, our * scale, lib * scale, "libiscsi", our_cpu, lib_cpu))
    return rows


SECTIONS = ("target", "digests", "formats", "sessions", "gateways", "initiator")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = ap.parse_args()
    for tool in ("iscsi-perf", "qemu-img", "tgtd", "tgtadm"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"bench: {tool} is not installed (run scripts/test as root once)",
                  file=sys.stderr)
            return 2
    sections = args.only or SECTIONS
    size = args.size_mib << 20
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aioiscsi-bench-") as tmp:
        work = Path(tmp)
        disk, src = work / "disk.img", work / "src.raw"
        with open(disk, "wb") as f, open(src, "wb") as g:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(chunk)
            g.write(os.urandom(min(size, 256 << 20)))
        if "target" in sections:
            rows += target_rows(disk, src, work, args.seconds, size)
        if "digests" in sections:
            rows += digest_rows(disk, work, args.seconds)
        if "formats" in sections:
            rows += format_rows(work, args.seconds, size)
        if "sessions" in sections:
            rows += session_rows(disk, work, args.seconds)
        if "gateways" in sections:
            rows += gateway_rows(disk, work, args.seconds)
        if "initiator" in sections:
            rows += initiator_rows(disk, work, args.seconds, size)
    print(f"{os.uname().nodename}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{args.seconds:g} s per workload, {args.size_mib} MiB LUN")
    print(f"{'row':40} {'ours':>10} {'peer':>10} {'':12} {'ratio':>6} {'CPU µs/IO ours':>15} "
          f"{'peer':>8}")
    for r in rows:
        cpu = (f"{r.ours_cpu_us:15.1f} {r.peer_cpu_us:8.1f}"
               if r.ours_cpu_us is not None and r.peer_cpu_us is not None else "")
        print(f"{r.name:40} {r.ours:10.1f} {r.peer:10.1f} {r.peer_name:12} {r.ratio:6.2f} "
              f"{cpu} {r.note}".rstrip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "ratio": r.ratio} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
