"""An NBD export as a LUN (issue 15, "More backends"): qemu-nbd and nbdkit
serve images; our target serves them over iSCSI; libiscsi and our
initiator check the result, and qemu-img looks at the image underneath."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from initiator.scsi import LUN, SCSICheckCondition
from initiator.session import Session
from iscsi.scsi.sbc import ProvisioningStatus
from target.backends.base import BackendError, BackendUnavailable, Extent
from target.backends.nbd import NbdBackend, parse_nbd_uri
from target.cli import build_parser, config_from_args
from target.config import ConfigError, LunSpec, load_config
from target.config_toml import dump_config
from tests.initiator_checks import opts
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tgt import free_port
from tests.tools import require_tool

SIZE = 64 << 20


class NbdServer:
    """An NBD server process (stopped by PID), ready when its socket accepts."""

    def __init__(self, argv: list[str], uri: str, *, port: int = 0, sock: str = "") -> None:
        self.argv, self.uri, self.port, self.sock = argv, uri, port, sock
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NbdServer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + 20
        while True:
            # A bounded wait for the listening socket, not a sleep-to-sync.
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.proc.stderr!r}")
            try:
                if self.sock:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.sock)
                else:
                    socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _qemu_nbd(img: Path, *extra: str, port: int | None = None) -> NbdServer:
    tool = require_tool("qemu-nbd")
    port = port or free_port()
    # --persistent: the target reconnects after a drop; --discard=unmap:
    # TRIM really punches holes in the raw file; -e 4: several clients.
    argv = [tool, "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port), "-e", "4",
            "--persistent", "--discard=unmap", *extra, str(img)]
    return NbdServer(argv, f"nbd://127.0.0.1:{port}/disk", port=port)


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    return img


@pytest.fixture
def qnbd(tmp_path: Path) -> Iterator[NbdServer]:
    srv = _qemu_nbd(_image(tmp_path)).start()
    try:
        yield srv
    finally:
        srv.kill()


def _target(uri: str) -> RunningTarget:
    return RunningTarget(make_config([LunSpec(lun=0, path=uri, backend="nbd")])).start()


async def _open(t: RunningTarget) -> tuple[Session, LUN]:
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts())
    return s, await LUN.open(s, 0)


def _holes(img: Path) -> list[tuple[int, int]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", str(img)],
                         capture_output=True, text=True, check=True).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


def _covered(runs: list[tuple[int, int]], start: int, length: int) -> bool:
    return any(s <= start and start + length <= s + n for s, n in runs)


# ---------------------------------------------------------------- unit level


def test_uri_parsing() -> None:
    a = parse_nbd_uri("nbd://127.0.0.1:10900/disk%201")
    assert (a.host, a.port, a.export, a.socket) == ("127.0.0.1", 10900, "disk 1", "")
    assert parse_nbd_uri("nbd://[::1]/x").host == "::1"
    assert parse_nbd_uri("nbd://h").port == 10809
    u = parse_nbd_uri("nbd+unix:///exp?socket=/run/nbd.sock")
    assert (u.export, u.socket) == ("exp", "/run/nbd.sock")
    for bad, why in (("nbds://h/x", "TLS"), ("nbd+unix:///x", "socket"),
                     ("nbd://h:99999/x", "port"), ("http://h/x", "not an NBD URI")):
        with pytest.raises(BackendError, match=why):
            parse_nbd_uri(bad)


def test_command_line_and_toml_name_nbd_luns(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "nbd://127.0.0.1:10900/disk", "-p", "127.0.0.1:0"])
    lun = config_from_args(args).targets[0].luns[0]
    assert (lun.backend, lun.path) == ("nbd", "nbd://127.0.0.1:10900/disk")
    assert config_from_args(args).targets[0].name.endswith(".disk")
    cfg = tmp_path / "t.toml"
    cfg.write_text('[[target]]\nname = "iqn.2026-12.org.test:n"\n[[target.lun]]\n'
                   'backend = "nbd"\nuri = "nbd+unix:///d?socket=/tmp/s"\n')
    lun = load_config(str(cfg)).targets[0].luns[0]
    assert (lun.backend, lun.path) == ("nbd", "nbd+unix:///d?socket=/tmp/s")
    # saveconfig writes it back as a uri the loader reads
    saved = load_config(str(cfg))
    cfg.write_text(dump_config(saved))
    assert load_config(str(cfg)).targets[0].luns[0].path == "nbd+unix:///d?socket=/tmp/s"
    cfg.write_text('[[target]]\nname = "iqn.2026-12.org.test:n"\n[[target.lun]]\n'
                   'backend = "nbd"\n')
    with pytest.raises(ConfigError, match="uri"):
        load_config(str(cfg))


def test_unreachable_server_is_one_clear_line() -> None:
    with pytest.raises(BackendError, match=r"nbd://127.0.0.1:\d+/x: cannot use the NBD export"):
        NbdBackend(f"nbd://127.0.0.1:{free_port()}/x")


def test_not_an_nbd_server_is_one_clear_line() -> None:
    """A peer that is not NBD (here: one that greets with junk) is refused
    at open with one line, never a hang or a traceback."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]

        def serve() -> None:
            conn, _ = lsock.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(16))
                conn.recv(100)

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        with pytest.raises(BackendError, match="not an NBD newstyle server"):
            NbdBackend(f"nbd://127.0.0.1:{port}/x")
        th.join(10)


def _fake_nbd_server(lsock: socket.socket, answer: str) -> None:
    """A minimal NBD server that negotiates correctly, then misbehaves:
    ``answer`` is "zero-extent" (a BLOCK_STATUS run of length 0) or
    "bad-cookie" (a READ reply for a request never sent)."""
    import struct

    import iscsi.nbdproto as P

    conn, _ = lsock.accept()
    with conn:
        f = conn.makefile("rwb")
        f.write(P.HELLO.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        f.flush()
        f.read(4)
        while True:
            _, opt, n = P.OPT_HDR.unpack(f.read(P.OPT_HDR.size))
            f.read(n)

            def reply(rtype: int, data: bytes = b"") -> None:
                f.write(P.OPT_REPLY.pack(P.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)
            if opt == P.OPT_SET_META_CONTEXT:
                reply(P.REP_META_CONTEXT, struct.pack(">I", 7) + b"base:allocation")
            if opt == P.OPT_GO:
                reply(P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, 1 << 20,
                                              P.TF_HAS_FLAGS | P.TF_SEND_FLUSH))
            reply(P.REP_ACK)
            f.flush()
            if opt == P.OPT_GO:
                break
        while True:
            head = f.read(P.REQUEST.size)
            if len(head) < P.REQUEST.size:
                return
            _, _, cmd, cookie, _, length = P.REQUEST.unpack(head)
            if answer == "zero-extent" and cmd == P.CMD_BLOCK_STATUS:
                body = struct.pack(">III", 7, 0, 0)
                f.write(P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                     P.REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body)
            elif answer == "bad-cookie" and cmd == P.CMD_READ:
                f.write(P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                     P.REPLY_TYPE_NONE, cookie + 99, 0))
            f.flush()


@pytest.mark.parametrize("answer", ["zero-extent", "bad-cookie"])
def test_misbehaving_nbd_server_never_hangs(answer: str) -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        th = threading.Thread(target=_fake_nbd_server, args=(lsock, answer), daemon=True)
        th.start()
        b = NbdBackend(f"nbd://127.0.0.1:{lsock.getsockname()[1]}/x")
        try:
            if answer == "zero-extent":
                # A useless answer ends as "mapped" (always safe), not a loop.
                assert list(b.extents(0, 1 << 20)) == [Extent(0, 1 << 20, True)]
            else:
                with pytest.raises(BackendUnavailable, match="unknown cookie"):
                    b.read(0, 4096)
        finally:
            b.close()
        th.join(10)


# ------------------------------------------------------------ over iSCSI


@pytest.mark.interop
async def test_write_read_unmap_lba_status_through_qemu_nbd(qnbd: NbdServer,
                                                             tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    t = _target(qnbd.uri)
    try:
        s, lun = await _open(t)
        try:
            assert lun.capacity.blocks * 512 == SIZE
            payload = os.urandom(256 << 10)
            await lun.write(2048, payload)
            await lun.write(8192, b"\x5a" * 4096, fua=True)  # NBD_CMD_FLAG_FUA
            assert bytes(await lun.read(2048, len(payload) // 512)) == payload
            await lun.synchronize_cache()
            # What went through iSCSI is in the file qemu-nbd serves.
            with open(img, "rb") as f:
                f.seek(2048 * 512)
                assert f.read(len(payload)) == payload
                f.seek(8192 * 512)
                assert f.read(4096) == b"\x5a" * 4096
            status = await lun.get_lba_status(2048)
            assert status[0].lba == 2048 and status[0].status == ProvisioningStatus.MAPPED
            # UNMAP becomes NBD_CMD_TRIM: a hole in the raw file.
            await lun.unmap([(2048, 256)])
            assert _covered(_holes(img), 2048 * 512, 256 * 512)
            status = await lun.get_lba_status(2048)
            assert status[0].status == ProvisioningStatus.DEALLOCATED
            assert status[0].blocks >= 256
            # WRITE SAME of zeroes without UNMAP: WRITE_ZEROES with NO_HOLE.
            await lun.write(4096, b"\x11" * 4096)
            await lun.write_same(4096, 8)
            assert bytes(await lun.read(4096, 8)) == bytes(4096)
            # The same export added live through the admin API as LUN 1
            # (qemu-nbd -e 4 takes several clients).
            t.call(t.server.add_lun, TARGET_NAME, LunSpec(lun=1, path=qnbd.uri, backend="nbd"))
            lun1 = await LUN.open(s, 1)
            assert bytes(await lun1.read(8192, 8)) == b"\x5a" * 4096
        finally:
            await s.logout()
    finally:
        t.stop()


@pytest.mark.interop
@pytest.mark.slow
def test_iscsi_test_cu_over_nbd(qnbd: NbdServer) -> None:
    tool = require_tool("iscsi-test-cu")
    # A few families (ALL takes minutes at NBD's round trip per command):
    # the data path, GET LBA STATUS from block status, COMPARE AND WRITE's
    # atomicity through the worker thread, flush. UNMAP and WRITE SAME are
    # checked against the image itself in the test above.
    families = ("SCSI.Read10,SCSI.Write16,SCSI.GetLBAStatus,SCSI.CompareAndWrite,"
                "SCSI.SynchronizeCache10,SCSI.ReadCapacity16,SCSI.ExtendedCopy")
    t = _target(qnbd.uri)
    try:
        proc = subprocess.run([tool, "-d", "-n", f"--test={families}", t.url()],
                              capture_output=True, text=True, timeout=300)
    finally:
        t.stop()
    out = proc.stdout + proc.stderr
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert m, out[-3000:]
    ran, failed = int(m.group(2)), int(m.group(4))
    print(f"\niscsi-test-cu over NBD: {ran} run, {failed} failed")
    assert failed == 0, re.findall(r"Suite (.*), Test (.*) had failures", out)
    assert ran >= 20


@pytest.mark.interop
async def test_nbd_unix_uri_through_nbdkit(tmp_path: Path) -> None:
    tool = require_tool("nbdkit")
    sock = str(tmp_path / "nbd.sock")
    srv = NbdServer([tool, "-f", "-U", sock, "memory", str(SIZE)],
                    f"nbd+unix:///?socket={sock}", sock=sock).start()
    try:
        t = _target(srv.uri)
        try:
            s, lun = await _open(t)
            try:
                data = os.urandom(64 << 10)
                await lun.write(100, data)
                assert bytes(await lun.read(100, len(data) // 512)) == data
                await lun.compare_and_write(100, data[:512], b"\x77" * 512)
                assert bytes(await lun.read(100, 1)) == b"\x77" * 512
            finally:
                await s.logout()
        finally:
            t.stop()
    finally:
        srv.kill()


@pytest.mark.interop
async def test_export_flags_decide_what_the_lun_offers(tmp_path: Path) -> None:
    """A read-only export is a write-protected LUN; an export without
    SEND_TRIM gets no thin provisioning (LBPME=0, UNMAP refused)."""
    tool = require_tool("nbdkit")
    ro = _qemu_nbd(_image(tmp_path), "-r").start()
    port = free_port()
    # nbdkit's eval plugin offers only what it is given: no trim method.
    notrim = NbdServer([tool, "-f", "-i", "127.0.0.1", "-p", str(port), "eval",
                        f"get_size=echo {SIZE}", "pread=dd if=/dev/zero bs=$3 count=1 "
                        "iflag=count_bytes status=none", "pwrite=cat >/dev/null"],
                       f"nbd://127.0.0.1:{port}/", port=port).start()
    try:
        t = _target(ro.uri)
        try:
            s, lun = await _open(t)
            try:
                with pytest.raises(SCSICheckCondition) as exc:
                    await lun.write(0, bytes(512))
                assert exc.value.key == 0x7  # DATA PROTECT
            finally:
                await s.logout()
        finally:
            t.stop()
        t = _target(notrim.uri)
        try:
            s, lun = await _open(t)
            try:
                assert not (await lun.read_capacity()).lbpme
                with pytest.raises(SCSICheckCondition) as exc:
                    await lun.unmap([(0, 8)])
                assert exc.value.key == 0x5  # ILLEGAL REQUEST: no UNMAP
                await lun.write(0, b"\x01" * 512)  # writes still work
            finally:
                await s.logout()
        finally:
            t.stop()
    finally:
        ro.kill()
        notrim.kill()


@pytest.mark.interop
async def test_server_killed_gives_not_ready_then_recovers(tmp_path: Path) -> None:
    img = _image(tmp_path)
    srv = _qemu_nbd(img).start()
    t = _target(srv.uri)
    try:
        s, lun = await _open(t)
        try:
            await lun.write(0, b"\x42" * 4096)
            srv.kill()
            start = time.monotonic()
            for _ in range(3):
                with pytest.raises(SCSICheckCondition) as exc:
                    await lun.read(0, 8)
                # NOT READY, LOGICAL UNIT COMMUNICATION FAILURE; at once, no hang.
                assert (exc.value.key, exc.value.asc, exc.value.ascq) == (0x2, 0x08, 0x00)
            assert time.monotonic() - start < 10
            # The server comes back on the same port: the LUN reconnects.
            srv2 = _qemu_nbd(img, port=srv.port).start()
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        assert bytes(await lun.read(0, 8)) == b"\x42" * 4096
                        break
                    except SCSICheckCondition:
                        # retries are at least a second apart (RETRY_INTERVAL)
                        assert time.monotonic() < deadline
                        await _pause()
            finally:
                srv2.kill()
        finally:
            await s.logout()
    finally:
        t.stop()


async def _pause() -> None:
    # Polling a recovering LUN (bounded by the deadline above).
    await asyncio.sleep(0.2)
