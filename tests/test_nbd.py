"""The NBD export (initiator/nbd.py) against libnbd's tools, qemu and a raw client.

The server runs in the test's event loop on a :class:`MemoryDevice`, so these
tests do not depend on the iSCSI initiator; the tools run as asyncio
subprocesses so the loop keeps serving while they work. One test at the end
checks the iSCSI adapter (BlockDeviceExport) against tgt.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from initiator.nbd import NBDServer, serve_nbd
from initiator.nbd_proto import nbd_errno
from tests.tools import require_tool

KiB = 1 << 10
MiB = 1 << 20

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = ((1 << 31) + n for n in (1, 3, 6, 9))
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE = 1, 2, 4, 8


# ----------------------------------------------------------- memory device


class MemoryDevice:
    """An ExportDevice in memory with an allocation map (one byte per block,
    scanned with bytes.find) and a log of calls for the tests to inspect."""

    def __init__(self, size: int, block_size: int = 512, *, read_only: bool = False) -> None:
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self.unmapped_reads_zero = True
        self.data = bytearray(size)
        self.mapped = bytearray(size // block_size)  # 1 = allocated
        self.flushes = 0
        self.calls: list[tuple[str, int, int]] = []
        self.fail: OSError | Exception | None = None
        self.gates: dict[int, asyncio.Event] = {}  # read offset -> wait for it

    def _blocks(self, offset: int, length: int, whole: bool) -> tuple[int, int]:
        bs = self.block_size
        if whole:
            return -(-offset // bs), (offset + length) // bs
        return offset // bs, -(-(offset + length) // bs)

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        gate = self.gates.get(offset)
        if gate is not None:
            await gate.wait()
        if self.fail is not None:
            raise self.fail
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        self.calls.append(("write", offset, len(data)))
        if self.fail is not None:
            raise self.fail
        self.data[offset : offset + len(data)] = data
        first, last = self._blocks(offset, len(data), whole=False)
        self.mapped[first:last] = b"\x01" * (last - first)
        return len(data)

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0))
        self.flushes += 1

    async def discard(self, offset: int, length: int) -> int:
        self.calls.append(("discard", offset, length))
        first, last = self._blocks(offset, length, whole=True)
        if last > first:
            bs = self.block_size
            self.data[first * bs : last * bs] = bytes((last - first) * bs)
            self.mapped[first:last] = bytes(last - first)
        return max(0, last - first) * self.block_size

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self.calls.append(("zero-trim" if may_trim else "zero", offset, length))
        self.data[offset : offset + length] = bytes(length)
        if may_trim:
            await self.discard(offset, length)
        else:
            first, last = self._blocks(offset, length, whole=False)
            self.mapped[first:last] = b"\x01" * (last - first)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        bs = self.block_size
        pos, end = offset // bs, -(-(offset + length) // bs)
        out: list[tuple[int, bool]] = []
        while pos < end:
            state = self.mapped[pos]
            nxt = self.mapped.find(b"\x00" if state else b"\x01", pos, end)
            nxt = end if nxt < 0 else nxt
            out.append(((nxt - pos) * bs, bool(state)))
            pos = nxt
        # The first extent starts at the block holding ``offset``.
        if out and offset % bs:
            n, m = out[0]
            out[0] = (n - offset % bs, m)
        return out


def test_memory_device_block_status() -> None:
    dev = MemoryDevice(64 * KiB)
    asyncio.run(dev.write(4096, b"x" * 1000))
    ext = asyncio.run(dev.block_status(0, 64 * KiB))
    assert ext == [(4096, False), (1024, True), (64 * KiB - 5120, False)]


# ------------------------------------------------------------------ helpers




async def _run(*cmd: str, ok: bool = True) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    if ok:
        assert proc.returncode == 0, f"{cmd}: {err.decode()}"
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def mem() -> MemoryDevice:
    return MemoryDevice(8 * MiB)


@pytest.fixture
async def served(mem: MemoryDevice, tmp_path: Path) -> AsyncIterator[tuple[NBDServer, Path]]:
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    sock = tmp_path / "nbd.sock"
    server = await serve_nbd(mem, f"unix:{sock}", description="memory disk")
    try:
        yield server, sock
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        loop.set_exception_handler(None)
    assert not errors, errors
    assert not sock.exists()


class Raw:
    """A hand-written NBD client for protocol-level checks."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    @classmethod
    async def connect(cls, sock: Path, cflags: int = 3) -> Raw:
        r, w = await asyncio.open_unix_connection(str(sock))
        hello = await asyncio.wait_for(r.readexactly(18), 10)
        assert hello[:16] == b"NBDMAGICIHAVEOPT"
        assert struct.unpack(">H", hello[16:])[0] == 3  # FIXED_NEWSTYLE | NO_ZEROES
        w.write(struct.pack(">I", cflags))
        return cls(r, w)

    async def rx(self, n: int) -> bytes:
        """Exactly ``n`` bytes (the timeout only guards against a hung test)."""
        return await asyncio.wait_for(self.r.readexactly(n), 10)

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.w.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, n = struct.unpack(">QIII", await self.rx(20))
            assert (magic, ropt) == (OPT_REPLY_MAGIC, opt)
            replies.append((rtype, await self.rx(n)))
            if rtype not in (REP_INFO, REP_SERVER, REP_META):
                return replies

    async def go(self, *, structured: bool = True, infos: tuple[int, ...] = (3,),
                 meta: bool = False) -> dict[int, bytes]:
        if structured:
            assert await self.option(8) == [(REP_ACK, b"")]
        if meta:
            got = await self.option(10, _meta_data("", ["base:allocation"]))
            assert got == [(REP_META, struct.pack(">I", 1) + b"base:allocation"), (REP_ACK, b"")]
        data = struct.pack(">IH", 0, len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
        replies = await self.option(7, data)
        assert replies[-1] == (REP_ACK, b""), replies
        return {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies if t == REP_INFO}

    def request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"", magic: int = REQUEST_MAGIC) -> None:
        self.w.write(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data)

    async def simple(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack(">IIQ", await self.rx(16))
        assert magic == SIMPLE_MAGIC
        data = await self.rx(read_length) if read_length and not err else b""
        return err, cookie, data

    async def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", await self.rx(20))
        assert magic == STRUCT_MAGIC
        return flags, rtype, cookie, await self.rx(n)

    async def eof(self) -> bool:
        """True once the server has closed (a reset counts: it may close
        with our unread bytes in its buffer)."""
        try:
            return await asyncio.wait_for(self.r.read(), 10) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.w.close()


def _meta_data(name: str, queries: list[str]) -> bytes:
    out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def _error_chunk(chunk: tuple[int, int, int, bytes]) -> tuple[int, int, str]:
    flags, rtype, cookie, body = chunk
    assert flags == 1 and rtype == (1 << 15) + 1
    err, mlen = struct.unpack(">IH", body[:6])
    assert len(body) == 6 + mlen
    return cookie, err, body[6:].decode()


def _fill(dev: MemoryDevice, seed: int) -> bytes:
    """Random data in some places, holes elsewhere; returns the image."""
    rng = random.Random(seed)
    for _ in range(12):
        off = rng.randrange(0, dev.size - 300 * KiB) // 512 * 512
        dev.data[off : off + 200 * KiB] = rng.randbytes(200 * KiB)
        first, last = off // 512, (off + 200 * KiB) // 512
        dev.mapped[first:last] = b"\x01" * (last - first)
    return bytes(dev.data)


# ------------------------------------------------------- libnbd and qemu


@pytest.mark.interop
async def test_nbdinfo_reports_size_block_sizes_and_flags(
        served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    server, _ = served
    _, out, _ = await _run(require_tool("nbdinfo"), "--json", server.uri)
    info = json.loads(out)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    ex = info["exports"][0]
    assert ex["export-size"] == mem.size
    assert ex["description"] == "memory disk"
    assert ex["contexts"] == ["base:allocation"]
    assert (ex["block_size_minimum"], ex["block_size_preferred"],
            ex["block_size_maximum"]) == (512, 4096, 32 * MiB)
    assert ex["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert ex[cap] is True, cap
    assert ex["can_fast_zero"] is False


@pytest.mark.interop
async def test_nbdinfo_map_shows_allocation(served: tuple[NBDServer, Path],
                                            mem: MemoryDevice) -> None:
    server, _ = served
    await mem.write(64 * KiB, b"d" * (100 * KiB))
    _, out, _ = await _run(require_tool("nbdinfo"), "--map", "--json", server.uri)
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    # type: bit 0 = hole, bit 1 = zero (libnbd's rendering of base:allocation)
    assert extents == [(0, 64 * KiB, 3), (64 * KiB, 100 * KiB, 0),
                       (164 * KiB, mem.size - 164 * KiB, 3)]


@pytest.mark.interop
async def test_nbdcopy_in_and_out_bit_exact(served: tuple[NBDServer, Path], mem: MemoryDevice,
                                            tmp_path: Path) -> None:
    server, _ = served
    nbdcopy = require_tool("nbdcopy")
    src = MemoryDevice(mem.size)
    image = _fill(src, 7)
    path = tmp_path / "in.img"
    path.write_bytes(image)
    mem.data[:] = os.urandom(mem.size)  # the copy must overwrite (or zero) everything
    mem.mapped[:] = b"\x01" * len(mem.mapped)
    await _run(nbdcopy, "--flush", str(path), server.uri)
    assert mem.data == image
    assert mem.flushes >= 1
    out = tmp_path / "out.img"
    await _run(nbdcopy, server.uri, str(out))
    assert out.read_bytes() == image


@pytest.mark.interop
async def test_qemu_img_convert_and_compare_over_tcp(mem: MemoryDevice, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    server = await serve_nbd(mem, "127.0.0.1:0")
    try:
        assert server.uri.startswith("nbd://127.0.0.1:") and server.uri.endswith("/")
        src = MemoryDevice(mem.size)
        image = _fill(src, 11)
        path = tmp_path / "src.img"
        path.write_bytes(image)
        await _run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(path), server.uri)
        assert mem.data == image
        await _run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(path), server.uri)
        changed = bytearray(image)
        changed[5 * MiB + 3] ^= 0xFF
        path.write_bytes(changed)
        rc, out, _ = await _run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(path),
                                server.uri, ok=False)
        assert rc == 1 and "Content mismatch at offset 5242880" in out
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.interop
async def test_qemu_io_fua_write_zeroes_and_trim(served: tuple[NBDServer, Path],
                                                  mem: MemoryDevice) -> None:
    server, _ = served
    qemu_io = require_tool("qemu-io")
    mem.data[:] = b"\x5a" * mem.size
    mem.mapped[:] = b"\x01" * len(mem.mapped)
    # Writeback cache: FUA is sent only for "write -f" (qemu-io's default,
    # writethrough, would put FUA on every write).
    await _run(qemu_io, "-t", "writeback", "-f", "raw", server.uri,
               "-c", "write -P 0xab 0 64k",
               "-c", "write -f -P 0xcd 64k 64k",
               "-c", "write -z 128k 64k",
               "-c", "write -z -u 192k 64k",
               "-c", "discard 256k 64k",
               "-c", "read -P 0xcd 64k 64k")
    calls = mem.calls
    assert calls[0] == ("write", 0, 64 * KiB) and calls[1][0] != "flush"
    i = calls.index(("write", 64 * KiB, 64 * KiB))
    assert calls[i + 1] == ("flush", 0, 0)  # FUA: durable before the reply
    assert ("zero", 128 * KiB, 64 * KiB) in calls  # NO_HOLE: stays allocated
    assert ("zero-trim", 192 * KiB, 64 * KiB) in calls  # -u: holes allowed
    assert ("discard", 256 * KiB, 64 * KiB) in calls
    assert mem.data[:64 * KiB] == b"\xab" * (64 * KiB)
    assert mem.data[64 * KiB : 128 * KiB] == b"\xcd" * (64 * KiB)
    assert mem.data[128 * KiB : 256 * KiB] == bytes(128 * KiB)
    assert mem.data[320 * KiB : 321 * KiB] == b"\x5a" * KiB
    assert await mem.block_status(128 * KiB, 192 * KiB) == [
        (64 * KiB, True), (128 * KiB, False)]


@pytest.mark.interop
async def test_read_only_export(mem: MemoryDevice, tmp_path: Path) -> None:
    server = await serve_nbd(mem, f"unix:{tmp_path / 'ro.sock'}", read_only=True)
    try:
        _, out, _ = await _run(require_tool("nbdinfo"), "--json", server.uri)
        ex = json.loads(out)["exports"][0]
        assert ex["is_read_only"] is True
        assert ex["can_trim"] is False and ex["can_zero"] is False and ex["can_fua"] is False
        rc, out, err = await _run(require_tool("qemu-io"), "-f", "raw", server.uri,
                                  "-c", "write 0 4k", ok=False)
        assert "write failed" in out + err or rc != 0
        c = await Raw.connect(tmp_path / "ro.sock")
        await c.go()
        c.request(WRITE, 1, 0, 512, data=b"x" * 512)
        c.request(TRIM, 2, 0, 512)
        c.request(ZEROES, 3, 0, 512)
        for cookie in (1, 2, 3):
            got_cookie, err_no, _ = _error_chunk(await c.chunk())
            assert (got_cookie, err_no) == (cookie, errno.EPERM)
        c.close()
        assert mem.data[:512] == bytes(512)
    finally:
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------ handshake


async def test_options(served: tuple[NBDServer, Path]) -> None:
    _, sock = served
    c = await Raw.connect(sock)
    assert await c.option(3) == [(REP_SERVER, struct.pack(">I", 0) + b"memory disk"),
                                 (REP_ACK, b"")]
    assert (await c.option(3, b"x"))[-1][0] == ERR_INVALID  # LIST takes no data
    assert (await c.option(42))[-1][0] == ERR_UNSUP
    assert (await c.option(5))[-1][0] == ERR_UNSUP  # STARTTLS: no TLS here
    info = struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)
    assert (await c.option(6, info))[-1][0] == ERR_UNKNOWN
    assert (await c.option(6, b"\0\0\0\x09ab"))[-1][0] == ERR_INVALID  # name overruns
    assert (await c.option(6, struct.pack(">IHH", 0, 2, 3)))[-1][0] == ERR_INVALID
    # Metadata contexts need structured replies first.
    meta = _meta_data("", ["base:allocation"])
    assert (await c.option(10, meta))[-1][0] == ERR_INVALID
    assert (await c.option(8, b"x"))[-1][0] == ERR_INVALID
    assert await c.option(8) == [(REP_ACK, b"")]
    ctx = [(REP_META, struct.pack(">I", 0) + b"base:allocation"), (REP_ACK, b"")]
    assert await c.option(9, _meta_data("", [])) == ctx
    assert await c.option(9, _meta_data("", ["base:"])) == ctx
    assert await c.option(9, _meta_data("", ["qemu:dirty-bitmap:x"])) == [(REP_ACK, b"")]
    assert (await c.option(9, _meta_data("", ["nocolon"])))[-1][0] == ERR_INVALID
    assert (await c.option(9, _meta_data("", ["base:"])[:-2]))[-1][0] == ERR_INVALID
    assert (await c.option(10, _meta_data("x", ["base:allocation"])))[-1][0] == ERR_UNKNOWN
    assert await c.option(10, _meta_data("", ["base:"])) == [(REP_ACK, b"")]
    # An option too big to buffer is skipped and refused; haggling goes on.
    assert (await c.option(99, bytes(200 * KiB)))[-1][0] == ERR_TOO_BIG
    infos = await c.go(infos=(3, 1, 2))
    size, flags = struct.unpack(">QH", infos[0])
    assert size == 8 * MiB and flags & 1 and flags & (1 << 8)
    assert struct.unpack(">III", infos[3]) == (512, 4096, 32 * MiB)
    assert infos[1] == b"" and infos[2] == b"memory disk"
    c.request(DISC, 0)
    assert await c.eof()


async def test_export_name_with_zero_padding_and_simple_replies(
        served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    _, sock = served
    c = await Raw.connect(sock, cflags=1)  # fixed newstyle, no NO_ZEROES
    c.w.write(struct.pack(">QII", IHAVEOPT, 1, 0))
    size, flags = struct.unpack(">QH", await c.rx(10))
    assert size == mem.size and flags & (1 << 7) == 0  # no DF without structured replies
    assert await c.rx(124) == bytes(124)
    c.request(WRITE, 5, 1000, 6, data=b"simple")
    assert await c.simple() == (0, 5, b"")
    c.request(READ, 6, 998, 10)
    assert await c.simple(10) == (0, 6, b"\0\0simple\0\0")
    c.request(READ, 7, mem.size - 4, 8)  # beyond the end
    assert await c.simple(8) == (errno.EINVAL, 7, b"")
    c.request(BLOCK_STATUS, 8, 0, 512)  # no metadata context without structured replies
    assert await c.simple() == (errno.EINVAL, 8, b"")
    c.request(DISC, 0)
    assert await c.eof()


async def test_unknown_export_name_and_client_flags_drop_the_connection(
        served: tuple[NBDServer, Path]) -> None:
    _, sock = served
    c = await Raw.connect(sock)
    c.w.write(struct.pack(">QII", IHAVEOPT, 1, 3) + b"bad")
    assert await c.eof()
    c = await Raw.connect(sock, cflags=0x80)
    assert await c.eof()
    c = await Raw.connect(sock)
    c.w.write(struct.pack(">QII", 0x1234, 3, 0))  # bad option magic
    assert await c.eof()
    c = await Raw.connect(sock)
    assert await c.option(2) == [(REP_ACK, b"")]  # ABORT is acknowledged, then closed
    assert await c.eof()


# --------------------------------------------------------- transmission


async def test_structured_replies_and_errors(served: tuple[NBDServer, Path],
                                             mem: MemoryDevice) -> None:
    _, sock = served
    c = await Raw.connect(sock)
    await c.go(infos=())  # no NBD_INFO_BLOCK_SIZE: unaligned requests are fine
    c.request(WRITE, 1, 3, 5, data=b"hello")
    assert await c.chunk() == (1, 0, 1, b"")  # NONE + DONE
    c.request(READ, 2, 1, 9)
    assert await c.chunk() == (1, 1, 2, struct.pack(">Q", 1) + b"\0\0hello\0\0")
    c.request(READ, 3, 0, 0)
    assert await c.chunk() == (1, 0, 3, b"")
    c.request(WRITE, 5, mem.size - 2, 4, data=b"abcd")
    cookie, err, msg = _error_chunk(await c.chunk())
    assert (cookie, err) == (5, errno.ENOSPC) and "beyond the end" in msg
    c.request(ZEROES, 6, mem.size, 512)
    assert _error_chunk(await c.chunk())[:2] == (6, errno.ENOSPC)
    c.request(TRIM, 7, mem.size, 512)
    assert _error_chunk(await c.chunk())[:2] == (7, errno.EINVAL)
    c.request(9, 8)  # unknown command
    assert _error_chunk(await c.chunk())[:2] == (8, errno.EINVAL)
    c.request(READ, 9, 0, 512, flags=NO_HOLE)  # flag not valid for READ
    assert _error_chunk(await c.chunk())[:2] == (9, errno.EINVAL)
    c.request(ZEROES, 10, 0, 512, flags=16)  # FAST_ZERO was not advertised
    assert _error_chunk(await c.chunk())[:2] == (10, errno.EINVAL)
    c.request(BLOCK_STATUS, 11, 0, 512)  # no context selected
    assert _error_chunk(await c.chunk())[:2] == (11, errno.EINVAL)
    c.request(CACHE, 13, 0, 4096)
    assert await c.chunk() == (1, 0, 13, b"")
    c.request(READ, 14, 0, 8, flags=DF)
    assert await c.chunk() == (1, 1, 14, struct.pack(">Q", 0) + b"\0\0\0hello")
    assert mem.data[:16] == b"\0\0\0hello" + bytes(8)
    c.request(DISC, 0)
    assert await c.eof()


async def test_oversized_requests(mem: MemoryDevice, tmp_path: Path) -> None:
    sock = tmp_path / "small.sock"
    async with NBDServer(mem, max_payload=64 * KiB) as server:
        await server.start(f"unix:{sock}")
        for structured in (True, False):
            c = await Raw.connect(sock)
            infos = await c.go(structured=structured)
            assert struct.unpack(">III", infos[3]) == (512, 4096, 64 * KiB)
            # A write above the maximum payload is skipped and refused; the
            # connection stays in step.
            c.request(WRITE, 1, 0, 64 * KiB + 512, data=b"\xee" * (64 * KiB + 512))
            c.request(READ, 2, 0, 64 * KiB + 512)
            c.request(WRITE, 3, 0, 512, data=b"\xdd" * 512)
            if structured:
                assert _error_chunk(await c.chunk())[:2] == (1, errno.EINVAL)
                assert _error_chunk(await c.chunk())[:2] == (2, errno.EOVERFLOW)
                assert await c.chunk() == (1, 0, 3, b"")
            else:
                assert await c.simple() == (errno.EINVAL, 1, b"")
                assert await c.simple(1) == (errno.EINVAL, 2, b"")
                assert await c.simple() == (0, 3, b"")
            # Trim and write zeroes carry no payload: any length is fine.
            c.request(ZEROES, 4, 0, 1 * MiB)
            if structured:
                assert await c.chunk() == (1, 0, 4, b"")
            else:
                assert await c.simple() == (0, 4, b"")
            c.close()
    assert mem.data[:1 * MiB] == bytes(1 * MiB)


async def test_alignment_is_enforced_once_agreed(served: tuple[NBDServer, Path]) -> None:
    _, sock = served
    c = await Raw.connect(sock)
    await c.go()  # asked for NBD_INFO_BLOCK_SIZE: bound to 512-byte alignment
    c.request(READ, 1, 100, 512)
    assert _error_chunk(await c.chunk())[:2] == (1, errno.EINVAL)
    c.request(WRITE, 2, 0, 100, data=b"x" * 100)
    assert _error_chunk(await c.chunk())[:2] == (2, errno.EINVAL)
    c.request(READ, 3, 512, 512)
    assert (await c.chunk())[:3] == (1, 1, 3)
    c.close()


async def test_fua_trim_zeroes_and_flush(served: tuple[NBDServer, Path],
                                         mem: MemoryDevice) -> None:
    _, sock = served
    c = await Raw.connect(sock)
    await c.go()
    c.request(WRITE, 1, 4096, 4096, flags=FUA, data=b"\x11" * 4096)
    assert await c.chunk() == (1, 0, 1, b"")
    assert mem.calls[-2:] == [("write", 4096, 4096), ("flush", 0, 0)]
    c.request(ZEROES, 2, 4096, 1024, flags=NO_HOLE | FUA)
    assert await c.chunk() == (1, 0, 2, b"")
    assert mem.calls[-2:] == [("zero", 4096, 1024), ("flush", 0, 0)]
    c.request(ZEROES, 3, 5120, 1024)
    assert await c.chunk() == (1, 0, 3, b"")
    assert mem.calls[-2:] == [("zero-trim", 5120, 1024), ("discard", 5120, 1024)]
    c.request(TRIM, 4, 6144, 2048)
    assert await c.chunk() == (1, 0, 4, b"")
    assert mem.calls[-1] == ("discard", 6144, 2048)
    before = mem.flushes
    c.request(FLUSH, 5)
    assert await c.chunk() == (1, 0, 5, b"")
    assert mem.flushes == before + 1
    assert mem.data[4096:8192] == bytes(4096)
    c.close()


async def test_block_status(served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    _, sock = served
    await mem.write(8192, b"m" * 4096)
    c = await Raw.connect(sock)
    await c.go(meta=True)
    c.request(BLOCK_STATUS, 1, 4096, 16384)
    flags, rtype, cookie, body = await c.chunk()
    assert (flags, rtype, cookie) == (1, 5, 1)
    assert struct.unpack(f">I{len(body) // 4 - 1}I", body) == (
        1, 4096, 3, 4096, 0, 8192, 3)  # hole+zero, data, hole+zero
    c.request(BLOCK_STATUS, 2, 4096, 16384, flags=REQ_ONE)
    assert (await c.chunk())[3] == struct.pack(">III", 1, 4096, 3)
    c.request(BLOCK_STATUS, 3, mem.size - 512, 1024)
    assert _error_chunk(await c.chunk())[:2] == (3, errno.EINVAL)
    c.request(BLOCK_STATUS, 4, 0, 0)
    assert _error_chunk(await c.chunk())[:2] == (4, errno.EINVAL)
    c.close()


async def test_device_errors_map_to_nbd_errors(served: tuple[NBDServer, Path],
                                               mem: MemoryDevice) -> None:
    _, sock = served
    c = await Raw.connect(sock)
    await c.go()
    for cookie, exc, want in ((1, OSError(errno.EIO, "medium error"), errno.EIO),
                              (2, OSError(errno.EDQUOT, "quota"), errno.ENOSPC),
                              (3, PermissionError("write protected"), errno.EPERM),
                              (4, RuntimeError("anything else"), errno.EIO)):
        mem.fail = exc
        c.request(READ, cookie, 0, 512)
        got_cookie, err, msg = _error_chunk(await c.chunk())
        assert (got_cookie, err) == (cookie, want) and msg
    mem.fail = None
    c.request(READ, 5, 0, 512)
    assert (await c.chunk())[:3] == (1, 1, 5)
    c.close()


def test_nbd_errno_of_scsi_sense() -> None:
    class Sense(Exception):
        def __init__(self, key: int, asc: int = 0, ascq: int = 0) -> None:
            self.key, self.asc, self.ascq = key, asc, ascq

    assert nbd_errno(Sense(0x7)) == errno.EPERM  # DATA PROTECT
    assert nbd_errno(Sense(0x7, 0x27, 0x07)) == errno.ENOSPC  # space allocation failed
    assert nbd_errno(Sense(0x5, 0x21)) == errno.EINVAL  # LBA out of range
    assert nbd_errno(Sense(0xD)) == errno.ENOSPC
    assert nbd_errno(Sense(0x3)) == errno.EIO  # MEDIUM ERROR
    assert nbd_errno(ValueError("x")) == errno.EINVAL
    assert nbd_errno(OSError(errno.EROFS, "ro")) == errno.EPERM
    assert nbd_errno(OSError(errno.ECONNRESET, "gone")) == errno.EIO


async def test_replies_out_of_order(served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    _, sock = served
    mem.data[:2] = b"AB"
    gate = mem.gates[0] = asyncio.Event()
    c = await Raw.connect(sock)
    await c.go()
    c.request(READ, 1, 0, 512)  # waits for the gate
    c.request(READ, 2, 512, 512)
    c.request(WRITE, 3, 1024, 512, data=b"w" * 512)
    first = [await c.chunk(), await c.chunk()]
    assert sorted(ch[2] for ch in first) == [2, 3]
    gate.set()
    flags, rtype, cookie, body = await c.chunk()
    assert (flags, rtype, cookie) == (1, 1, 1) and body[8:10] == b"AB"
    c.close()


async def test_many_pipelined_requests(served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    # More requests than the in-flight bound, sent in one go: reading pauses
    # and resumes, and every request gets exactly one reply.
    _, sock = served
    mem.data[:] = os.urandom(mem.size)
    c = await Raw.connect(sock)
    await c.go()
    n = 700
    for i in range(n):
        c.request(READ, i, i * 4096, 4096)
    seen = {}
    for _ in range(n):
        flags, rtype, cookie, body = await c.chunk()
        assert (flags, rtype) == (1, 1)
        seen[cookie] = body
    assert sorted(seen) == list(range(n))
    assert all(seen[i][8:] == mem.data[i * 4096 : (i + 1) * 4096] for i in range(n))
    c.close()


async def test_bad_request_magic_drops_only_that_client(
        served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    _, sock = served
    good = await Raw.connect(sock)
    await good.go()
    bad = await Raw.connect(sock)
    await bad.go()
    bad.request(READ, 1, 0, 512, magic=0xDEADBEEF)
    assert await bad.eof()
    good.request(READ, 2, 0, 512)
    assert (await good.chunk())[:3] == (1, 1, 2)
    good.close()


async def test_disconnect_finishes_in_flight_work_and_flushes(
        served: tuple[NBDServer, Path], mem: MemoryDevice) -> None:
    _, sock = served
    gate = mem.gates[4096] = asyncio.Event()
    c = await Raw.connect(sock)
    await c.go()
    c.request(WRITE, 1, 0, 512, data=b"q" * 512)
    assert await c.chunk() == (1, 0, 1, b"")
    flushes = mem.flushes
    c.request(READ, 2, 4096, 512)
    c.request(DISC, 0)
    await c.w.drain()
    for _ in range(20):
        await asyncio.sleep(0)  # let the server see DISC; the read must hold it open
    assert not c.r.at_eof()
    gate.set()
    assert (await c.chunk())[:3] == (1, 1, 2)
    assert await c.eof()
    assert mem.flushes == flushes + 1  # completed writes made durable at DISC


async def test_close_waits_for_in_flight_requests(mem: MemoryDevice, tmp_path: Path) -> None:
    sock = tmp_path / "close.sock"
    server = await serve_nbd(mem, f"unix:{sock}")
    gate = mem.gates[0] = asyncio.Event()
    c = await Raw.connect(sock)
    await c.go()
    c.request(READ, 1, 0, 512)
    while ("read", 0, 512) not in mem.calls:
        await asyncio.sleep(0)
    idle = await Raw.connect(sock)  # still haggling: simply closed
    server.close()
    assert not sock.exists()
    closed = asyncio.ensure_future(server.wait_closed())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closed.done()
    assert await idle.eof()
    gate.set()
    assert (await c.chunk())[:3] == (1, 1, 1)
    assert await c.eof()
    await asyncio.wait_for(closed, 10)
    assert server.connections == 0


async def test_garbage_never_crashes_the_server(served: tuple[NBDServer, Path],
                                                mem: MemoryDevice) -> None:
    # Random bytes in each phase: the server answers or hangs up, never raises
    # (the fixture fails the test on any exception the loop saw), and keeps
    # serving the next client.
    _, sock = served
    rng = random.Random(1)
    for i in range(60):
        c = await Raw.connect(sock, cflags=3)
        if i % 3:
            await c.go(infos=() if i % 2 else (3,))
        blob = rng.randbytes(rng.randrange(1, 400))
        if i % 3 == 0 and i % 2:
            blob = struct.pack(">Q", IHAVEOPT) + blob  # a plausible option header
        elif i % 3 and i % 2:
            blob = struct.pack(">I", REQUEST_MAGIC) + blob  # a plausible request header
        c.w.write(blob)
        if i % 3:
            c.request(DISC, 0)
        c.w.write_eof()
        await asyncio.wait_for(c.r.read(), 10)  # whatever comes, until EOF
        c.close()
    c = await Raw.connect(sock)
    await c.go()
    c.request(READ, 1, 0, 512)
    assert (await c.chunk())[:3] == (1, 1, 1)
    c.close()


async def test_listen_address_errors(mem: MemoryDevice, tmp_path: Path) -> None:
    for bad in ("unix:", "localhost", "127.0.0.1:http"):
        with pytest.raises(ValueError):
            await serve_nbd(mem, bad)
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(OSError):
        await serve_nbd(mem, f"unix:{regular}")  # never deletes a non-socket
    assert regular.read_text() == "keep me"


@pytest.mark.interop
def test_same_scenarios_under_uvloop(tmp_path: Path) -> None:
    """Production runs on uvloop, whose transports differ from asyncio's:
    repeat the protocol scenarios there."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        for i, scenario in enumerate((
                test_options, test_structured_replies_and_errors, test_fua_trim_zeroes_and_flush,
                test_block_status, test_replies_out_of_order, test_many_pipelined_requests,
                test_bad_request_magic_drops_only_that_client,
                test_disconnect_finishes_in_flight_work_and_flushes,
                test_garbage_never_crashes_the_server, test_nbdcopy_in_and_out_bit_exact)):
            mem = MemoryDevice(8 * MiB)
            sock = tmp_path / f"{i}.sock"
            async with await serve_nbd(mem, f"unix:{sock}", description="memory disk") as srv:
                if scenario is test_options:
                    await test_options((srv, sock))
                elif scenario is test_nbdcopy_in_and_out_bit_exact:
                    await test_nbdcopy_in_and_out_bit_exact((srv, sock), mem, tmp_path)
                else:
                    await scenario((srv, sock), mem)  # type: ignore[operator]
        assert not errors, errors

    uvloop.run(main())


# ------------------------------------------------- the iSCSI adapter (tgt)


@pytest.mark.interop
async def test_block_device_export_against_tgt(tmp_path: Path) -> None:
    from initiator.blockdev import BlockDevice
    from initiator.nbd_export import BlockDeviceExport
    from initiator.session import Session, SessionOptions
    from tests.tgt import TgtConfig, Tgtd

    nbdcopy = require_tool("nbdcopy")
    with Tgtd(tmp_path, TgtConfig(size=8 * MiB, thin=True)) as tgt:
        s = await Session.connect("127.0.0.1", tgt.port, tgt.iqn,
                                  SessionOptions(nop_interval=None))
        try:
            dev = await BlockDevice.from_session(s, 1)
            server = await serve_nbd(BlockDeviceExport(dev), f"unix:{tmp_path / 't.sock'}")
            try:
                image = _fill(MemoryDevice(dev.size), 3)
                src = tmp_path / "src.img"
                src.write_bytes(image)
                await _run(nbdcopy, "--flush", str(src), server.uri)
                assert tgt.backing.read_bytes() == image  # flushed through to tgt
                out = tmp_path / "out.img"
                await _run(nbdcopy, server.uri, str(out))
                assert out.read_bytes() == image
                _, text, _ = await _run(require_tool("nbdinfo"), "--map", "--json", server.uri)
                extents = json.loads(text)
                assert sum(e["length"] for e in extents) == dev.size
                # GET LBA STATUS through tgt: holes where the image is zero.
                holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
                assert sum(n for _, n in holes) >= dev.size // 2
                assert all(image[o : o + n] == bytes(n) for o, n in holes)
            finally:
                server.close()
                await server.wait_closed()
        finally:
            await s.logout()


@pytest.mark.interop
def test_cli_attach_serves_until_interrupted(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.tgt import TgtConfig, Tgtd

    nbdinfo = require_tool("nbdinfo")
    with Tgtd(tmp_path, TgtConfig(size=4 * MiB)) as tgt:
        sock = tmp_path / "a.sock"
        proc = subprocess.Popen([sys.executable, "-m", "initiator.cli", "attach", tgt.url(),
                                 "--nbd", f"unix:{sock}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()  # printed once the export listens
            assert uri == f"nbd+unix:///?socket={sock}"
            out = subprocess.run([nbdinfo, "--size", uri], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            assert int(out) == 4 * MiB
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not sock.exists()


@pytest.mark.interop
async def test_nbdfuse_file_reads_writes_and_flushes(served: tuple[NBDServer, Path],
                                                      mem: MemoryDevice, tmp_path: Path) -> None:
    """libnbd's nbdfuse mounts the export as a file; I/O on it (from a
    thread, as this loop serves the export) reaches the device."""
    server, _ = served
    nbdfuse = require_tool("nbdfuse")
    fusermount = require_tool("fusermount3")
    mem.data[:] = random.Random(4).randbytes(mem.size)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    proc = await asyncio.create_subprocess_exec(
        nbdfuse, "-P", str(pidfile), f"{mnt}/disk", server.uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        # nbdfuse writes its pidfile once the mount serves: poll for it with a
        # deadline (as tests/tgt.py does for tgtd), there is no other signal.
        for _ in range(1000):
            if pidfile.exists() and pidfile.read_text().strip() or proc.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert proc.returncode is None and pidfile.exists(), "nbdfuse did not come up"
        patch = random.Random(5).randbytes(300 * KiB)

        def io() -> bytes:
            fd = os.open(mnt / "disk", os.O_RDWR)
            try:
                assert os.fstat(fd).st_size == mem.size
                os.pwrite(fd, patch, 1 * MiB + 512)
                os.fsync(fd)
                return os.pread(fd, mem.size, 0)
            finally:
                os.close(fd)

        flushes = mem.flushes
        seen = await asyncio.to_thread(io)
        assert mem.data[1 * MiB + 512 : 1 * MiB + 512 + len(patch)] == patch
        assert seen == mem.data
        assert mem.flushes > flushes  # fsync -> NBD_CMD_FLUSH
    finally:
        await _run(fusermount, "-u", str(mnt), ok=False)
        await asyncio.wait_for(proc.communicate(), 30)
