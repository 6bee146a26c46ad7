"""Our initiator against libiscsi's ``iscsi-perf`` on the same target, same run.

    .venv/bin/python bench/initiator_vs_libiscsi.py [--seconds 5] [--size-mib 256]
        [--target tgt|ours|both]

Starts a private target on a backing file filled with random data -- tgtd
(tests/tgt.py, the default), our own target as a subprocess (``iscsi-target
serve``, i.e. ``python -m target.cli serve``), or each in turn -- then
measures 4 KiB random reads and 1 MiB sequential reads with 32 commands in
flight, first with ``iscsi-perf`` and then with ours (uvloop when
importable), and prints IOPS, MB/s and our/libiscsi ratios per target.
Figures, not a test: nothing here has a threshold.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from initiator.blockdev import BlockDevice  # noqa: E402
from initiator.cli_copy import bench  # noqa: E402
from initiator.session import SessionOptions, run  # noqa: E402
from tests.initiator_checks import TargetProcess  # noqa: E402
from tests.target_fixture import TARGET_NAME  # noqa: E402
from tests.tgt import TgtConfig, Tgtd, free_port  # noqa: E402

_AVG = re.compile(r"iops average (\d+) \((\d+) MB/s\)")


def libiscsi(url: str, *, blocks: int, random: bool, seconds: float, depth: int) -> float:
    """IOPS reported by iscsi-perf (its final average)."""
    cmd = ["iscsi-perf", "-m", str(depth), "-b", str(blocks), "-t", str(int(seconds))]
    if random:
        cmd.append("-r")
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60,
                         check=True).stdout
    found = _AVG.findall(out)
    if not found:
        raise RuntimeError(f"cannot parse iscsi-perf output: {out[-300:]}")
    return float(found[-1][0])


async def ours(url: str, *, bs: int, pattern: str, seconds: float, depth: int) -> float:
    """IOPS of our initiator for the same workload."""
    dev = await BlockDevice.open(url, SessionOptions(nop_interval=None))
    try:
        result = await bench(dev, rw="read", pattern=pattern, block_size=bs, depth=depth,
                             seconds=seconds)
    finally:
        await dev.close()
    return result.iops


Row = tuple[str, int, float, float]
WORKLOADS = (("4 KiB random read", 4096, "rand"), ("1 MiB sequential read", 1 << 20, "seq"))


def measure(url: str, args: argparse.Namespace) -> list[Row]:
    """Both workloads, libiscsi first, then ours, against ``url``."""
    rows = []
    for name, bs, pattern in WORKLOADS:
        lib = libiscsi(url, blocks=bs // 512, random=pattern == "rand",
                       seconds=args.seconds, depth=args.depth)
        our = run(ours(url, bs=bs, pattern=pattern, seconds=args.seconds, depth=args.depth))
        rows.append((name, bs, lib, our))
    return rows


def report(title: str, rows: list[Row], args: argparse.Namespace) -> None:
    """Print one table of figures and ratios."""
    print(f"{title} on loopback, {args.depth} in flight, {args.seconds:g} s each")
    print(f"{'workload':24} {'libiscsi':>22} {'aioiscsi':>22} {'ratio':>6}")
    for name, bs, lib, our in rows:
        print(f"{name:24} {lib:9,.0f} IOPS {lib * bs / 1e6:6,.0f} MB/s "
              f"{our:9,.0f} IOPS {our * bs / 1e6:6,.0f} MB/s {our / lib:6.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--target", choices=("tgt", "ours", "both"), default="tgt",
                   help="which target serves the LUN (default tgt)")
    args = p.parse_args()
    tables: list[tuple[str, list[Row]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        backing = Path(tmp) / "lun1.img"
        with open(backing, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        if args.target in ("tgt", "both"):
            with Tgtd(Path(tmp), TgtConfig(size=args.size_mib << 20), backing=backing) as t:
                tables.append(("tgtd", measure(t.url(), args)))
        if args.target in ("ours", "both"):
            with TargetProcess(backing, free_port(), TARGET_NAME, workdir=Path(tmp)) as ot:
                tables.append(("our target (iscsi-target serve)", measure(ot.url(0), args)))
    for title, rows in tables:
        report(title, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
