#!/usr/bin/env python3
"""What a hostile peer can make our target spend: resident memory of a real
``iscsi-target serve`` process (a 64 MiB memory LUN) at rest, under 1,000
connections that never log in, after they close, under 20 sessions each
sending WRITE(16)s of 64 MiB with no data (5 each), and after they go.

    .venv/bin/python bench/hostile_memory.py [--silent 1000] [--sessions 20]

Prints RSS at each step with the configured budgets (write_budget,
max_connections).
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rawclient import RawClient  # noqa: E402
from tests.tgt import free_port  # noqa: E402

IQN = "iqn.2026-11.org.aioiscsi.bench:hostile"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def connections(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` (from /proc/net/tcp)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                        n += 1
        except FileNotFoundError:
            pass
    return n


def settle(pid: int) -> float:
    """RSS once it stops moving (bounded: at most 3 s)."""
    last = rss_mib(pid)
    for _ in range(30):
        time.sleep(0.1)
        now = rss_mib(pid)
        if abs(now - last) < 0.5:
            return now
        last = now
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--silent", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--write-budget", default="256M")
    ap.add_argument("--max-connections", type=int, default=1024)
    args = ap.parse_args()
    # 1,000 sockets on each side: lift the soft descriptor limit (inherited
    # by the target process).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    work = Path(tempfile.mkdtemp(prefix="aioiscsi-hostile-"))
    port = free_port()
    cfg = work / "t.toml"
    cfg.write_text(f"""
[server]
portals = ["127.0.0.1:{port}"]
nop_interval = 0
login_timeout = 60
write_budget = "{args.write_budget}"
max_connections = {args.max_connections}

[[target]]
name = "{IQN}"
[target.limits]
queue_depth = 128
[[target.lun]]
backend = "memory"
size = "64M"
""")
    exe = Path(sys.executable).with_name("iscsi-target")
    proc = subprocess.Popen([str(exe), "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        pid = proc.pid
        print(f"budgets: write_budget={args.write_budget} max_connections={args.max_connections}")
        print(f"{'step':52} {'RSS MiB':>8}")
        print(f"{'baseline':52} {settle(pid):8.1f}")

        socks = []
        for _ in range(args.silent):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        while connections(pid, port) < min(args.silent, args.max_connections) and \
                time.monotonic() < deadline + 30:
            time.sleep(0.05)
        print(f"{f'{args.silent} silent connections':52} {settle(pid):8.1f}")
        for s in socks:
            s.close()
        print(f"{'after they close':52} {settle(pid):8.1f}")

        clients = []
        task_set_full = 0
        for i in range(args.sessions):
            c = RawClient("127.0.0.1", port, timeout=30)
            c.login(IQN, isid=0x400000002000 + i)
            for itt in range(1, 6):
                cdb = bytes([0x8A, 0]) + struct.pack(">QI", 0, (64 << 20) // 512) + bytes(2)
                c.send_raw(_write16(c, itt, cdb))
            clients.append(c)
        for c in clients:
            for _ in range(5):
                pdu = c.recv()
                if getattr(pdu, "status", None) == 0x28:
                    task_set_full += 1
        label = f"{args.sessions} sessions x 5 WRITE(16) of 64 MiB, no data"
        print(f"{label:52} {settle(pid):8.1f}   ({task_set_full} got TASK SET FULL)")
        for c in clients:
            c.close()
        print(f"{'after they go':52} {settle(pid):8.1f}")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


def _write16(c: RawClient, itt: int, cdb: bytes) -> bytes:
    from iscsi.pdu import ScsiCommand

    return ScsiCommand(itt=itt, cdb=cdb, write=True, expected_data_transfer_length=64 << 20,
                       cmdsn=c.next_cmdsn(), expstatsn=c.statsn).to_bytes(c.hd, c.dd)


if __name__ == "__main__":
    sys.exit(main())
