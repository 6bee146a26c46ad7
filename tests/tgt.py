"""A throw-away tgtd (Debian ``tgt``) on a free loopback port, for interop tests.

Each :class:`Tgtd` runs its own ``tgtd -f`` with a private management channel
(``-C N`` selects the control socket ``/var/run/tgtd/socket.N``), so parallel
test runs never talk to each other's daemon.  The target is configured with
``tgtadm`` exactly as an administrator would; :meth:`Tgtd.kill` and
:meth:`Tgtd.start` let a test crash the target and bring it back with the same
configuration, port and backing file.

Readiness is polled with a bounded deadline (the control socket answers, then
the portal accepts TCP connections) -- never a fixed sleep.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.tools import require_tool

IQN = "iqn.2024-01.org.aioiscsi.test:disk"
_READY_DEADLINE = 15.0
_POLL = 0.02
_SOCKET_DIR = "/var/run/tgtd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_control_port() -> int:
    """A tgtd management channel number (1..32767) no running tgtd holds.

    tgtd locks ``/var/run/tgtd/socket.N.lock``; a lock we can take right now
    is free (we drop it at once, fcntl locks are per process).
    """
    os.makedirs(_SOCKET_DIR, exist_ok=True)
    rng = random.SystemRandom()
    for _ in range(200):
        n = rng.randint(1000, 32767)
        try:
            fd = os.open(f"{_SOCKET_DIR}/socket.{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return n
        finally:
            os.close(fd)
    raise RuntimeError("no free tgtd control port")


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class TgtConfig:
    """What the fixture sets up with tgtadm."""

    size: int = 64 * 1024 * 1024
    #: (user, password) the initiator must present (one-way CHAP).
    incoming: tuple[str, str] | None = None
    #: (user, password) the target presents for mutual CHAP.
    outgoing: tuple[str, str] | None = None
    header_digest: bool = False
    data_digest: bool = False
    thin: bool = False
    #: Extra target parameters: (name, value) for ``--op update``.
    params: list[tuple[str, str]] = field(default_factory=list)
    #: Discovery-session CHAP (tid 0 in tgt's model is not supported by
    #: tgtadm; tgt uses the target's accounts for SendTargets when set).
    discovery_incoming: tuple[str, str] | None = None


class Tgtd:
    """One tgtd process with one target (tid 1) and LUN 1 on a backing file."""

    def __init__(self, workdir: Path, config: TgtConfig | None = None,
                 backing: Path | None = None) -> None:
        self.tgtd = require_tool("tgtd")
        self.tgtadm = require_tool("tgtadm")
        self.config = config or TgtConfig()
        self.workdir = workdir
        self.backing = backing or workdir / "lun1.img"
        if not self.backing.exists():
            with open(self.backing, "wb") as f:
                f.truncate(self.config.size)
        self.port = free_port()
        self.control = _free_control_port()
        self.iqn = IQN
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"tgtd-{self.port}.log"

    # -- addresses ----------------------------------------------------------
    @property
    def portal(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def url(self, lun: int = 1, user: str | None = None, password: str | None = None) -> str:
        """The libiscsi-style URL of a LUN."""
        cred = ""
        if user is not None:
            cred = f"{user}%{password}@" if password is not None else f"{user}@"
        return f"iscsi://{cred}{self.portal}/{self.iqn}/{lun}"

    # -- process control ----------------------------------------------------
    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``tgtadm -C N --lld iscsi ARGS``."""
        return subprocess.run([self.tgtadm, "-C", str(self.control), "--lld", "iscsi", *args],
                              capture_output=True, text=True, check=check, timeout=20)

    def start(self) -> None:
        """Start tgtd, wait until it answers, and configure the target."""
        assert self.proc is None or self.proc.poll() is not None, "tgtd already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.tgtd, "-f", "-C", str(self.control), "--iscsi",
             f"portal=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + _READY_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tgtd exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-500:]}")
            if self.adm("--mode", "system", "--op", "show", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("tgtd management channel did not come up")
            time.sleep(_POLL)  # polling a condition with a deadline, not synchronising
        self._configure()
        while not _port_accepts(self.port):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tgtd does not accept connections on {self.portal}")
            time.sleep(_POLL)

    def _configure(self) -> None:
        c = self.config
        self.adm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", self.iqn)
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                 "-b", str(self.backing))
        if c.thin:
            self.adm("--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "1",
                     "--params", "thin_provisioning=1")
        if c.incoming:
            self.adm("--mode", "account", "--op", "new", "--user", c.incoming[0],
                     "--password", c.incoming[1])
            self.adm("--mode", "account", "--op", "bind", "--tid", "1", "--user", c.incoming[0])
        if c.outgoing:
            self.adm("--mode", "account", "--op", "new", "--user", c.outgoing[0],
                     "--password", c.outgoing[1])
            self.adm("--mode", "account", "--op", "bind", "--tid", "1", "--user", c.outgoing[0],
                     "--outgoing")
        if c.header_digest:
            self.adm("--mode", "target", "--op", "update", "--tid", "1", "--name",
                     "HeaderDigest", "--value", "CRC32C,None")
        if c.data_digest:
            self.adm("--mode", "target", "--op", "update", "--tid", "1", "--name",
                     "DataDigest", "--value", "CRC32C,None")
        for name, value in c.params:
            self.adm("--mode", "target", "--op", "update", "--tid", "1", "--name", name,
                     "--value", value)
        self.adm("--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL")

    def kill(self) -> None:
        """SIGKILL tgtd (a crash: no logout, no FIN handshake niceties)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop tgtd and remove its sockets.

        SIGKILL: tgtd ignores SIGTERM and its "system delete" waits for
        sessions to go away; the backing file is all we keep anyway.
        """
        self.kill()
        for suffix in ("", ".lock"):
            try:
                os.unlink(f"{_SOCKET_DIR}/socket.{self.control}{suffix}")
            except OSError:
                pass

    @property
    def running(self) -> bool:
        """True while the tgtd process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Tgtd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
