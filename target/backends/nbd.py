"""A LUN backed by an NBD export: any NBD server (qemu-nbd,
qemu-storage-daemon, nbdkit and its plugins...) as a disk.

Addresses are the standard NBD URIs (doc/uri.md of the NBD project):
``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default) and
``nbd+unix:///EXPORT?socket=PATH``.

Threads. The NBD connection is an asyncio client
(:mod:`target.backends.nbd_client`) running on one event loop of its own,
in a daemon thread shared by every NBD LUN of the process. The
:class:`~target.backends.base.Backend` API is synchronous; this backend
says ``slow_io``, so the logical unit calls it from its worker thread,
which hands each request to the NBD loop and waits for the reply. The
target's event loop therefore never waits on the network.

What the export announces decides what the LUN advertises (proto.md
§Transmission flags): ``NBD_FLAG_READ_ONLY`` makes a write-protected LUN,
no ``SEND_TRIM`` means no UNMAP (LBPME=0), ``SEND_FUA`` lets a FUA write
carry ``NBD_CMD_FLAG_FUA`` instead of a whole flush, ``SEND_WRITE_ZEROES``
serves WRITE SAME of zeroes with ``NO_HOLE``, and the ``base:allocation``
context answers GET LBA STATUS. TRIM leaves the contents unspecified, so
LBPRZ is 0.

Losing the server. Requests in flight when the connection drops fail;
every later command makes at most one reconnection attempt, and attempts
are at least :data:`RETRY_INTERVAL` apart, so a dead server costs each
command one refused connect at most and nothing waits unboundedly. Until
it is back, commands fail with NOT READY, LOGICAL UNIT COMMUNICATION
FAILURE (:class:`BackendUnavailable`) and the log says so once per
outage. A request that gets no reply within :data:`REQUEST_TIMEOUT`
seconds counts as a lost connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from iscsi.nbdproto import STATE_HOLE, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, \
    TF_SEND_WRITE_ZEROES

from .base import Backend, BackendError, BackendUnavailable, Buffer, Extent, MediumError
from .nbd_client import NbdAddress, NbdClient, NbdError, NbdProtocolError, NbdServerError

__all__ = ["NbdBackend", "is_nbd_uri", "parse_nbd_uri", "REQUEST_TIMEOUT", "RETRY_INTERVAL"]

log = logging.getLogger("target.backends.nbd")

#: Seconds a request may wait for its reply before the connection is
#: declared dead.
REQUEST_TIMEOUT = 30.0
#: Seconds to wait for a (re)connection and negotiation.
CONNECT_TIMEOUT = 10.0
#: Least seconds between two reconnection attempts.
RETRY_INTERVAL = 1.0
#: Largest request we send (proto.md: 32 MiB is what servers accept; the
#: export's maximum block size may lower it). TRIM/WRITE_ZEROES lengths
#: are 32-bit, so those split at 1 GiB.
_MAX_IO = 32 << 20
_MAX_ZERO = 1 << 30

T = TypeVar("T")


def is_nbd_uri(text: str) -> bool:
    """True for ``nbd://...``, ``nbd+unix://...`` (and the TLS schemes,
    which :func:`parse_nbd_uri` refuses with a reason)."""
    return text.split(":", 1)[0].lower() in ("nbd", "nbd+unix", "nbds", "nbds+unix")


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI (doc/uri.md); BackendError in one line when it is
    not one we can use."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise BackendError(f"{uri}: NBD over TLS is not supported; use nbd:// or nbd+unix://")
    if scheme not in ("nbd", "nbd+unix"):
        raise BackendError(f"{uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                           "nbd+unix:///EXPORT?socket=PATH)")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    if scheme == "nbd+unix":
        sock = query.get("socket", [""])[0]
        if not sock or parts.netloc:
            raise BackendError(f"{uri}: an nbd+unix URI has no host and needs ?socket=PATH")
        return NbdAddress(export=export, socket=sock)
    try:
        port = parts.port or 10809
    except ValueError:
        raise BackendError(f"{uri}: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise BackendError(f"{uri}: no host (nbd://HOST[:PORT]/EXPORT)")
    return NbdAddress(export=export, host=parts.hostname, port=port)


class _NbdLoop:
    """The event loop all NBD connections of the process run on, in a
    daemon thread started on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="nbd-client",
                                 daemon=True).start()
                cls._loop = loop
            return cls._loop


class NbdBackend(Backend):
    """An NBD export as a virtual disk (see the module docstring)."""

    def __init__(self, uri: str, *, read_only: bool = False) -> None:
        self.path = uri
        self.address = parse_nbd_uri(uri)
        self._loop = _NbdLoop.get()
        self._lock = threading.Lock()
        self._closed = False
        self._down_since: float | None = None
        self._last_attempt = 0.0
        self._last_error = ""
        try:
            self._client: NbdClient | None = self._run(NbdClient.connect(self.address),
                                                       CONNECT_TIMEOUT)
        except (OSError, NbdError, TimeoutError) as exc:
            raise BackendError(f"{uri}: cannot use the NBD export: {_why(exc)}") from None
        c = self._client
        self._size = c.size - c.size % 512
        self._flags = c.flags
        self._read_only = read_only or bool(c.flags & TF_READ_ONLY)
        self._max_io = max(512, min(_MAX_IO, c.max_block) // 512 * 512)
        self._allocation = c.allocation_context is not None

    # --------------------------------------------------------------- plumbing

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the NBD loop and wait (from a worker thread) for it."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer in {timeout:g} s") from None

    def _connected(self) -> NbdClient:
        """The live client, reconnecting (at most once per RETRY_INTERVAL)."""
        c = self._client
        if c is not None and not c.closed:
            return c
        if self._closed:
            raise BackendUnavailable(f"{self.path}: the LUN is closed")
        now = time.monotonic()
        if now - self._last_attempt < RETRY_INTERVAL:
            raise BackendUnavailable(f"{self.path}: NBD server unreachable ({self._last_error})")
        self._last_attempt = now
        try:
            c = self._run(NbdClient.connect(self.address), CONNECT_TIMEOUT)
        except (OSError, NbdError, TimeoutError) as exc:
            self._last_error = _why(exc)
            raise BackendUnavailable(f"{self.path}: reconnecting failed: {self._last_error}") \
                from None
        if c.size - c.size % 512 != self._size or c.flags != self._flags:
            # The same URI now names another disk: serving it under the old
            # identity could corrupt it. Stay down until an operator looks.
            self._run(c.close(), 5)
            self._last_error = "the export changed size or flags"
            raise BackendUnavailable(f"{self.path}: the export came back with a different size "
                                     "or flags; not using it")
        log.warning("%s: reconnected to the NBD server after %.1f s", self.path,
                    now - (self._down_since or now))
        self._client, self._down_since = c, None
        return c

    def _io(self, what: str, make: Any) -> Any:
        """Issue one request with the live client; map failures to the
        SCSI layer's exceptions."""
        with self._lock:
            client = self._connected()
        try:
            return self._run(make(client), REQUEST_TIMEOUT)
        except NbdServerError as exc:
            raise MediumError(str(exc)) from None
        except (NbdProtocolError, OSError, TimeoutError) as exc:
            with self._lock:
                if self._client is client:
                    self._client = None
                    self._down_since = time.monotonic()
                    self._last_error = _why(exc)
                    # proto.md gives no way to cancel a request: a connection
                    # that does not answer is closed and built anew.
                    asyncio.run_coroutine_threadsafe(client.close(), self._loop)
                    log.error("%s: lost the NBD server during %s: %s; commands fail with NOT "
                              "READY until it is back", self.path, what, self._last_error)
            raise BackendUnavailable(f"{self.path}: {what} failed: {_why(exc)}") from None

    # ------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def thin(self) -> bool:
        return bool(self._flags & TF_SEND_TRIM) and not self._read_only

    @property
    def zero_after_discard(self) -> bool:
        # proto.md §NBD_CMD_TRIM: the contents afterwards are unspecified.
        return False

    @property
    def slow_io(self) -> bool:
        return True

    @property
    def native_fua(self) -> bool:
        return bool(self._flags & TF_SEND_FUA)

    # -------------------------------------------------------------------- I/O

    def read(self, offset: int, length: int) -> Buffer:
        if length <= self._max_io:
            # The client's buffer is ours alone: no copy.
            buf: bytearray = self._io("read", lambda c: c.read(offset, length))
            return buf
        out = bytearray()
        for pos in range(offset, offset + length, self._max_io):
            n = min(self._max_io, offset + length - pos)
            out += self._io("read", lambda c, p=pos, k=n: c.read(p, k))
        return out

    def write(self, offset: int, data: Buffer) -> None:
        self._write(offset, data, False)

    def write_fua(self, offset: int, data: Buffer) -> None:
        self._write(offset, data, self.native_fua)
        if not self.native_fua:
            self.flush()

    def _write(self, offset: int, data: Buffer, fua: bool) -> None:
        if self._read_only:
            raise MediumError(f"{self.path}: the NBD export is read-only")
        mv = memoryview(data).cast("B")
        for rel in range(0, len(mv), self._max_io):
            piece = mv[rel:rel + self._max_io]
            self._io("write", lambda c, p=offset + rel, d=piece: c.write(p, d, fua=fua))

    def flush(self) -> None:
        if self._flags & TF_SEND_FLUSH and not self._read_only:
            self._io("flush", lambda c: c.flush())

    def discard(self, offset: int, length: int) -> None:
        if not self.thin:
            return
        for pos in range(offset, offset + length, _MAX_ZERO):
            n = min(_MAX_ZERO, offset + length - pos)
            self._io("trim", lambda c, p=pos, k=n: c.trim(p, k))

    def write_zeroes(self, offset: int, length: int) -> None:
        if not self._flags & TF_SEND_WRITE_ZEROES:
            super().write_zeroes(offset, length)
            return
        for pos in range(offset, offset + length, _MAX_ZERO):
            n = min(_MAX_ZERO, offset + length - pos)
            # NO_HOLE: WRITE SAME without UNMAP must leave the range mapped
            # (SBC-3 §5.43), the server must not punch a hole for it.
            self._io("write zeroes", lambda c, p=pos, k=n: c.write_zeroes(p, k, no_hole=True))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        if not self._allocation:
            yield Extent(offset, length, True)
            return
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, 0xFFFFFFFF & ~511)
            runs = self._io("block status", lambda c, p=pos, k=n: c.block_status(p, k))
            start = pos
            for run_len, flags in runs:
                run_len = min(run_len, end - pos)
                if run_len <= 0:
                    break
                yield Extent(pos, run_len, not flags & STATE_HOLE)
                pos += run_len
            if pos == start:
                # No usable extent (none for our context, or zero-length
                # ones from a broken server): "mapped" is always safe
                # (proto.md §base:allocation), and the loop must end.
                yield Extent(pos, end - pos, True)
                return

    def close(self) -> None:
        """Say NBD_CMD_DISC and close the connection. Idempotent."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None and not client.closed:
            try:
                self._run(client.close(), 5)
            except (OSError, NbdError, TimeoutError):
                pass


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
