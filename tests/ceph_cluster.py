"""A throwaway one-node Ceph cluster for the RBD tests.

One monitor and one OSD on memstore (nothing on disk but a few small files
in a temporary directory), ``osd pool default size = 1``, cephx on, and
the monitor on a free loopback port only. The daemons run in the
foreground as our children, so they are stopped by PID; nothing is left
behind but the directory, which the caller removes.

Readiness is waited for by asking the monitor (``osd stat``) through
librados and by a first write to the pool, bounded by a deadline and the
client's op timeouts: the daemons give no other signal that they are
ready.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.tools import find_tool

#: Tools the cluster needs (Debian: ceph-mon ceph-osd ceph-common).
TOOLS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph-authtool")

_CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {dir}/keyring
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = memstore
memstore device bytes = 1073741824
osd data = {dir}/osd$id
mon data = {dir}/mon.$id
osd max object name len = 460
osd max object namespace len = 64
osd heartbeat grace = 60
debug ms = 0
crash dir = {dir}/crash

[osd]
keyring = {dir}/osd$id/keyring

[client]
rados osd op timeout = 30
rados mon op timeout = 30
rbd discard granularity bytes = 0
"""


def missing_tools() -> list[str]:
    """The cluster tools that are not installed."""
    return [t for t in TOOLS if find_tool(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class CephCluster:
    """A running throwaway cluster; ``conf`` is its ceph.conf (the admin
    keyring is named in it)."""

    dir: str
    conf: str
    pool: str = "rbd"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _rados: Any = None

    @property
    def env(self) -> dict[str, str]:
        """An environment whose ceph tools and clients find this cluster."""
        return {**os.environ, "CEPH_CONF": self.conf}

    def rados(self) -> Any:
        """A connected librados handle as client.admin (kept open)."""
        if self._rados is None:
            import rados  # type: ignore[import-not-found,unused-ignore]

            r = rados.Rados(conffile=self.conf, rados_id="admin")
            r.connect(timeout=30)
            self._rados = r
        return self._rados

    def mon(self, prefix: str, **args: Any) -> Any:
        """Run a monitor command; returns its JSON output decoded."""
        cmd = json.dumps({"prefix": prefix, "format": "json", **args})
        ret, out, err = self.rados().mon_command(cmd, b"", timeout=30)
        if ret != 0:
            raise RuntimeError(f"ceph {prefix}: {err or ret}")
        return json.loads(out) if out else None

    def wait(self, what: str, ok: Any, timeout: float = 60.0) -> None:
        """Poll the monitor until ``ok()`` holds (the daemons signal
        nothing); fails with ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"ceph cluster in {self.dir}: {what} not reached in {timeout} s "
                                   f"(logs in {self.dir}/log)")
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ceph daemon {p.args!r} exited with {p.returncode} "
                                       f"(logs in {self.dir}/log)")
            time.sleep(0.2)  # polling a remote state, not ordering our own code

    def create_image(self, name: str, size: int, *, pool: str | None = None) -> None:
        """Create an RBD image with exclusive-lock, object-map and fast-diff."""
        import rbd  # type: ignore[import-not-found,unused-ignore]

        features = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                    | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
        with self.rados().open_ioctx(pool or self.pool) as io:
            rbd.RBD().create(io, name, size, old_format=False, features=features)

    def stop(self) -> None:
        """Stop the daemons by PID. SIGKILL: memstore keeps nothing worth
        a clean shutdown, and SIGTERM costs seconds."""
        if self._rados is not None:
            try:
                self._rados.shutdown()
            finally:
                self._rados = None
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs.clear()


def start_cluster(base: str) -> CephCluster:
    """Bootstrap and start a cluster in directory ``base`` with an ``rbd``
    pool ready for images. Raises RuntimeError with the failing step."""
    for sub in ("run", "log", "mon.a", "osd0", "crash"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    fsid = str(uuid.uuid4())
    conf = os.path.join(base, "ceph.conf")
    with open(conf, "w") as f:
        f.write(_CONF.format(fsid=fsid, port=_free_port(), dir=base))
    keyring = os.path.join(base, "keyring")
    tool = {t: find_tool(t) or t for t in TOOLS}
    _run(tool["ceph-authtool"], "--create-keyring", keyring, "--gen-key", "-n", "mon.",
         "--cap", "mon", "allow *")
    _run(tool["ceph-authtool"], keyring, "--gen-key", "-n", "client.admin",
         "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
    monmap = os.path.join(base, "monmap")
    with open(conf) as f:
        port = f.read().split("mon host = v2:127.0.0.1:")[1].split("\n")[0]
    _run(tool["monmaptool"], "--create", "--fsid", fsid, "--addv", "a",
         f"[v2:127.0.0.1:{port}]", monmap)
    _run(tool["ceph-mon"], "-c", conf, "--mkfs", "-i", "a", "--monmap", monmap,
         "--keyring", keyring)
    cluster = CephCluster(dir=base, conf=conf)
    log = open(os.path.join(base, "log", "daemons.out"), "ab")
    try:
        cluster.procs.append(subprocess.Popen(
            [tool["ceph-mon"], "-c", conf, "-i", "a", "-f"], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL))
        osd_uuid = str(uuid.uuid4())
        osd_id = cluster.mon("osd new", uuid=osd_uuid)["osdid"]
        osd_dir = os.path.join(base, f"osd{osd_id}")
        os.makedirs(osd_dir, exist_ok=True)
        _run(tool["ceph-osd"], "-c", conf, "-i", str(osd_id), "--mkfs", "--mkkey",
             "--no-mon-config", "--osd-uuid", osd_uuid)
        osd_key = os.path.join(osd_dir, "keyring")
        with open(osd_key) as f:
            key = f.read().split("key = ")[1].split()[0]
        ret, _, err = cluster.rados().mon_command(json.dumps({
            "prefix": "auth add", "entity": f"osd.{osd_id}",
            "caps": ["mon", "allow profile osd", "osd", "allow *", "mgr", "allow profile osd"],
        }), f"[osd.{osd_id}]\n\tkey = {key}\n".encode(), timeout=30)
        if ret != 0:
            raise RuntimeError(f"ceph auth add osd.{osd_id}: {err}")
        cluster.procs.append(subprocess.Popen(
            [tool["ceph-osd"], "-c", conf, "-i", str(osd_id), "-f"], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL))
        cluster.wait("the OSD up and in", lambda: cluster.mon("osd stat")["num_up_osds"] == 1)
        cluster.mon("osd pool create", pool=cluster.pool, pg_num=8, pgp_num=8)
        cluster.mon("osd pool application enable", pool=cluster.pool, app="rbd")

        # Without a manager the monitor cannot tell PG states ("pg stat"
        # needs ceph-mgr); a write to the pool completes once its PG is
        # active, and the client's op timeout bounds it.
        with cluster.rados().open_ioctx(cluster.pool) as io:
            io.write_full("aioiscsi-probe", b"ready")
    except BaseException:
        cluster.stop()
        raise
    finally:
        log.close()
    return cluster
