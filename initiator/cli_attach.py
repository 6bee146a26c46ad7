"""``iscsi-initiator attach`` (a LUN as an NBD export, a /dev/nbdX device or
a FUSE file, until stopped) and ``detach``, with the control socket a
running attach listens on."""

from __future__ import annotations

import argparse
import asyncio
import logging
import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from iscsi.names import parse_url

from .blockdev import BlockDevice
from .multipath import open_device
from .errors import InitiatorError
from .session import SessionOptions

from .cli_common import PROG, session_options, with_creds


#
# An attach serves until Ctrl-C/SIGTERM or until ``iscsi-initiator detach``
# asks it over its control socket: a Unix socket in a private directory,
# named after the export, speaking one line each way ("detach" -> "ok ..." or
# "error ..."). A socket rather than a pid file because detach then learns
# whether the flush and the logout succeeded, and a stale socket cannot
# point at an unrelated process the way a reused pid can.

_CONTROL_TIMEOUT = 2.0


def runtime_dir() -> str:
    """Where attach keeps its control sockets (mode 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "aioiscsi")
    return os.path.join(tempfile.gettempdir(), f"aioiscsi-{os.getuid()}")


def export_key(*, nbd: str | None = None, fuse: str | None = None) -> str:
    """The canonical name of an export (Unix paths made absolute; a TCP
    address as written, so detach must spell it the same way)."""
    if fuse is not None:
        return "fuse:" + os.path.abspath(fuse)
    if nbd is None:
        raise ValueError("an export is an NBD address or a FUSE mountpoint")
    if nbd.startswith("unix:"):
        return "unix:" + os.path.abspath(nbd[5:])
    return "tcp:" + nbd


def control_path(key: str) -> str:
    """The control socket of the attach serving export ``key`` (hashed: a
    Unix socket path must stay under 108 bytes)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"attach-{digest}.sock")


def _public_url(url: str) -> str:
    """The URL without its CHAP credentials (for messages and status)."""
    u = parse_url(url)
    host = f"[{u.host}]" if ":" in u.host else u.host
    return f"iscsi://{host}:{u.port}/{u.target}/{u.lun}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _ask(path: str, command: str, timeout: float) -> str:
    """Send one command line to an attach's control socket; its answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path),
                                            _CONTROL_TIMEOUT)
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line.endswith(b"\n"):
        raise InitiatorError("the attach closed its control connection without an answer",
                             hint="it may have crashed; check its output")
    return line.decode(errors="replace").rstrip("\n")


class _Control:
    """The attach side of the control socket."""

    def __init__(self, path: str, describe: Callable[[], str], stop: Callable[[], None]) -> None:
        self.path = path
        self.describe = describe
        self.stop = stop
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen; refuse when another attach already serves this export."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            try:
                await _ask(self.path, "status", _CONTROL_TIMEOUT)
            except (OSError, TimeoutError, InitiatorError):
                os.unlink(self.path)  # stale: its attach is gone
            else:
                raise InitiatorError(f"another attach already uses the control socket "
                                     f"{self.path}", hint="detach it first, or pick another "
                                     "export address or --control")
        self.server = await asyncio.start_unix_server(self._client, self.path)
        os.chmod(self.path, 0o600)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            command = line.decode(errors="replace").strip()
            if command == "status":
                reply = "ok " + self.describe()
            elif command == "detach":
                self.stop()
                reply = await asyncio.shield(self.done)
            else:
                reply = f"error unknown control command {command!r} (detach, status)"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass  # a client that went away gets no answer
        finally:
            writer.close()
            if task is not None:
                self.clients.discard(task)

    async def finish(self, outcome: str) -> None:
        """Answer waiting detach requests with ``outcome``, then close."""
        if not self.done.done():
            self.done.set_result(outcome)
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=5.0)
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def _list_partitions(args: argparse.Namespace) -> int:
    """``attach URL --list``: the partition table --fuse would show."""
    import json

    from .fuse import read_partition_table
    from .nbd_export import BlockDeviceExport

    opts = with_creds(args.url, session_options(args))
    dev = await BlockDevice.open(args.url, opts)
    try:
        table = await read_partition_table(BlockDeviceExport(dev, read_only=True))
    finally:
        await dev.close()
    if args.json:
        print(json.dumps({"url": _public_url(args.url), "size": dev.size,
                          "block-size": dev.block_size,
                          "partition-table": table.as_dict()}, indent=2))
    else:
        print(f"{_public_url(args.url)}: {dev.size} bytes, {dev.block_size}-byte blocks")
        for line in table.describe():
            print(line)
    return 0


async def cmd_attach(args: argparse.Namespace) -> int:
    import signal

    if args.list:
        return await _list_partitions(args)
    if args.json:
        raise ValueError("--json goes with --list")
    where = args.nbd if args.nbd is not None else args.fuse
    if args.fuse is not None:
        # Before logging in: a missing optional extra or an unusable
        # mountpoint is one line, at once.
        from .fuse import check_mountpoint, load_pyfuse3

        load_pyfuse3()
        check_mountpoint(args.fuse)
    path = args.control or control_path(export_key(nbd=args.nbd, fuse=args.fuse))
    opts = with_creds(args.url, session_options(args))
    # An attach stays up for hours: idle NOP-Out pings (RFC 7143 §11.18)
    # notice a dead connection before the next I/O does.
    opts.nop_interval = SessionOptions().nop_interval
    if args.verbose == 0:
        # An attach runs for hours: say when the connection drops and how
        # long we keep trying ("connection lost, retrying (N s left)").
        logging.getLogger("initiator.session").setLevel(logging.WARNING)
    dev = await open_device(args.url, opts, multipath=getattr(args, "multipath", "off"),
                            paths=getattr(args, "path", []))
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    public = _public_url(args.url)

    def _stop() -> None:
        session = dev.lun.session
        if not stop.done():
            stop.set_result(None)
            if session.state == "full feature phase":
                return  # flush and log out, as detach does
        # Reconnecting (or a second Ctrl-C while flushing): waiting for the
        # target could last the whole replacement timeout; stop now and
        # say what that costs.
        if session.state not in ("closed", "failed"):
            print(f"{PROG}: stopping while the session is {session.state}: writes the target "
                  "has not acknowledged are lost (acknowledged ones are safe)",
                  file=sys.stderr, flush=True)
            session.abort()

    control: _Control | None = None
    candidate = _Control(
        path, lambda: f"attached {public} on {where} (session {dev.lun.session.state})", _stop)
    try:
        await candidate.start()
        control = candidate
    except (OSError, InitiatorError) as exc:
        if args.control or isinstance(exc, InitiatorError):
            await dev.close()
            raise
        # Without a usable runtime directory, Ctrl-C/SIGTERM still detach.
        print(f"{PROG}: no control socket ({_one_line(exc)}); detach with Ctrl-C or SIGTERM",
              file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop)

    def ready(uri: str) -> None:
        # The one stdout line a script waits for: the NBD URI (nbdinfo,
        # nbd-client and qemu take it) or the FUSE file's path.
        print(uri, flush=True)
        how = f"{PROG} detach {where}" + (f" --control {path}" if args.control else "")
        print(f"{PROG}: attached {public}; detach with: {how}", file=sys.stderr, flush=True)

    error: BaseException | None = None
    try:
        if args.nbd is not None:
            from .nbd import serve_until

            await serve_until(dev, args.nbd, stop, name=args.name or "",
                              read_only=args.read_only, ready=ready)
        else:
            from .fuse import serve_fuse_until

            # vboximg-mount's names: vhdd for the disk, vol0... per partition.
            await serve_fuse_until(dev, args.fuse, stop, name=args.name or "vhdd",
                                   read_only=args.read_only, ready=ready, partitions=True)
    except BaseException as exc:  # noqa: BLE001 -- reported to detach, then re-raised
        error = exc
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    try:
        await dev.close()  # logs out (RFC 7143 §11.14)
    except InitiatorError as exc:
        error = error or exc
    if control is not None:
        await control.finish(
            f"error {_one_line(error)}" if error is not None else
            f"ok detached {public} from {where}: flushed and logged out")
    if error is not None:
        raise error
    return 0


async def _running_attaches() -> list[tuple[str, str]]:
    """(control socket, status) of every live attach; stale sockets go."""
    out: list[tuple[str, str]] = []
    d = runtime_dir()
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for name in names:
        if not (name.startswith("attach-") and name.endswith(".sock")):
            continue
        path = os.path.join(d, name)
        try:
            answer = await _ask(path, "status", _CONTROL_TIMEOUT)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        except (OSError, TimeoutError, InitiatorError):
            continue
        out.append((path, answer.removeprefix("ok ")))
    return out


async def cmd_detach(args: argparse.Namespace) -> int:
    if args.control:
        path, what = args.control, args.control
    elif args.export:
        key = (export_key(fuse=args.export) if os.path.isdir(args.export)
               else export_key(nbd=args.export))
        path, what = control_path(key), args.export
    else:
        running = await _running_attaches()
        if not running:
            raise InitiatorError("no attach is running",
                                 hint=f"start one with '{PROG} attach URL --nbd ...'")
        if len(running) > 1:
            listed = "; ".join(status for _, status in running)
            raise InitiatorError(f"{len(running)} attaches are running ({listed})",
                                 hint="name the export: detach unix:PATH, HOST:PORT or "
                                 "MOUNTPOINT")
        path, what = running[0][0], running[0][1]
    try:
        answer = await _ask(path, "detach", args.timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        if os.path.exists(path) and not args.control:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise InitiatorError(f"no attach is running for {what}",
                             hint="give the --nbd address or --fuse mountpoint exactly as "
                             "attach was given it") from None
    except TimeoutError:
        raise InitiatorError(f"the attach for {what} did not finish within {args.timeout:g} s",
                             hint="the target may be unreachable; the attach keeps trying "
                             "until its --replacement-timeout") from None
    status, _, text = answer.partition(" ")
    if status != "ok":
        raise InitiatorError(f"detach of {what} failed: {text}",
                             hint="data written since the last flush may not be on the target")
    print(text)
    return 0
