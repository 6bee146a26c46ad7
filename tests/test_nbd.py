"""The NBD export of a tgt LUN, checked with libnbd's nbdinfo/nbdcopy and qemu-img.

The NBD server runs in the test's event loop; the tools run as asyncio
subprocesses so the loop keeps serving while they work.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from initiator.blockdev import BlockDevice
from initiator.nbd import NBDServer
from initiator.session import Session, SessionOptions
from tests.tgt import TgtConfig, Tgtd
from tests.tools import require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture
def tgt(tmp_path: Path) -> Iterator[Tgtd]:
    with Tgtd(tmp_path, TgtConfig(size=16 * MiB, thin=True)) as t:
        yield t


@pytest.fixture
async def export(tgt: Tgtd, tmp_path: Path) -> AsyncIterator[tuple[str, BlockDevice]]:
    s = await Session.connect("127.0.0.1", tgt.port, tgt.iqn, SessionOptions(nop_interval=None))
    dev = await BlockDevice.from_session(s, 1)
    server = NBDServer(dev, description="tgt lun 1")
    uri = await server.start(f"unix:{tmp_path / 'nbd.sock'}")
    try:
        yield uri, dev
    finally:
        await server.close()
        await s.logout()


async def _run(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{cmd}: {err.decode()}"
    return out.decode()


async def test_nbdinfo_sees_size_and_flags(export: tuple[str, BlockDevice]) -> None:
    uri, dev = export
    info = json.loads(await _run(require_tool("nbdinfo"), "--json", uri))
    ex = info["exports"][0]
    assert ex["export-size"] == dev.size
    assert ex["is_read_only"] is False
    assert ex["can_flush"] is True and ex["can_fua"] is True
    assert ex["can_trim"] is True and ex["can_zero"] is True
    assert info["protocol"] == "newstyle-fixed"
    assert ex["block_size_minimum"] == 1
    assert ex["description"] == "tgt lun 1"


async def test_nbdcopy_in_and_out(export: tuple[str, BlockDevice], tgt: Tgtd,
                                  tmp_path: Path) -> None:
    uri, dev = export
    nbdcopy = require_tool("nbdcopy")
    src = tmp_path / "src.img"
    rng = random.Random(5)
    data = bytearray(dev.size)
    for _ in range(10):
        off = rng.randrange(0, dev.size - MiB)
        data[off : off + 300_000] = rng.randbytes(300_000)
    src.write_bytes(data)
    await _run(nbdcopy, str(src), uri)
    assert await dev.read(0, dev.size) == data
    assert tgt.backing.read_bytes() == data  # nbdcopy flushed through to tgt
    out = tmp_path / "out.img"
    await _run(nbdcopy, uri, str(out))
    assert out.read_bytes() == data


async def test_qemu_img_compare_and_zero(export: tuple[str, BlockDevice],
                                         tmp_path: Path) -> None:
    uri, dev = export
    qemu_img = require_tool("qemu-img")
    await dev.write(12345, b"qemu" * 1000)
    ref = tmp_path / "ref.img"
    ref.write_bytes(await dev.read(0, dev.size))
    await _run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(ref), uri)
    # qemu-img convert of an all-zero image issues NBD WRITE_ZEROES/TRIM.
    zero = tmp_path / "zero.img"
    with open(zero, "wb") as f:
        f.truncate(dev.size)
    await _run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(zero), uri)
    assert await dev.read(0, dev.size) == bytes(dev.size)


def test_cli_attach_serves_until_interrupted(tgt: Tgtd, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    sock = tmp_path / "a.sock"
    proc = subprocess.Popen([sys.executable, "-m", "initiator.cli", "attach", tgt.url(),
                             "--nbd", f"unix:{sock}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()  # printed once the export listens
        assert uri == f"nbd+unix:///?socket={sock}"
        out = subprocess.run([require_tool("nbdinfo"), "--size", uri], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert int(out) == tgt.config.size
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


async def test_raw_handshake_structured_replies_and_errors(export: tuple[str, BlockDevice],
                                                            tmp_path: Path) -> None:
    import struct

    uri, dev = export
    await dev.write(0, b"ABCD" * 128)
    r, w = await asyncio.open_unix_connection(str(tmp_path / "nbd.sock"))
    hello = await r.readexactly(18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT" and struct.unpack(">H", hello[16:])[0] == 3
    w.write(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES

    async def option(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        w.write(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, n = struct.unpack(">QIII", await r.readexactly(20))
            assert (magic, ropt) == (0x3E889045565A9, opt)
            replies.append((rtype, await r.readexactly(n)))
            if rtype != 3:  # anything but NBD_REP_INFO ends the reply
                return replies

    assert await option(8) == [(1, b"")]  # STRUCTURED_REPLY -> ACK
    bad = await option(7, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert bad[-1][0] == (1 << 31) + 6  # NBD_REP_ERR_UNKNOWN
    go = await option(7, struct.pack(">I", 0) + struct.pack(">H", 0))
    assert go[-1] == (1, b"")
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in go if t == 3}
    assert struct.unpack(">QH", infos[0])[0] == dev.size
    assert struct.unpack(">III", infos[3]) == (1, 4096, 32 << 20)

    def request(cmd: int, cookie: int, offset: int, length: int) -> None:
        w.write(struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, offset, length))

    request(0, 7, 2, 6)  # READ 6 bytes at 2
    magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", await r.readexactly(20))
    assert (magic, flags, rtype, cookie) == (0x668E33EF, 1, 1, 7)
    body = await r.readexactly(n)
    assert struct.unpack(">Q", body[:8])[0] == 2 and body[8:] == b"CDABCD"
    request(0, 8, dev.size, 512)  # beyond the end -> structured error EINVAL
    magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", await r.readexactly(20))
    assert (flags, rtype, cookie) == (1, (1 << 15) + 1, 8)
    err, mlen = struct.unpack(">IH", (await r.readexactly(n))[:6])
    assert err == 22 and mlen > 0
    request(2, 9, 0, 0)  # DISC
    assert await r.read() == b""
    w.close()
