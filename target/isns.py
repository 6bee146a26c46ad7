"""Registering the target with an iSNS server (RFC 4171), and the one
request/response exchange both roles use.

The target is one Network Entity (RFC 4171) whose portals are the
addresses it listens on and whose Storage Nodes are its targets, each with
its alias and a Portal Group object per portal it is reachable through
(§6.5). Every registration is a complete DevAttrReg with the Replace flag
(§5.6.5.1), so adding or removing a target through the admin API is one
message that leaves the server holding exactly what is served; stopping
sends DevDereg of the entity (§5.6.5.4).

Failures never stop the target: a server that cannot be reached is logged
once and retried every :data:`RETRY_SECONDS`; when the server sets a
registration period (§6.2.6), the registration is refreshed at half of it
(ESI is not offered, so the period is the server's only liveness check).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
from collections.abc import Callable

from iscsi.isns import (
    DEFAULT_PORT,
    IsnsError,
    Message,
    MessageReader,
    NodeInfo,
    PortalInfo,
    Status,
    Tag,
    dev_attr_reg,
    dev_dereg,
    encode_message,
)
from iscsi.names import parse_portal

__all__ = ["IsnsRegistrar", "IsnsRefused", "exchange", "parse_isns_address"]

log = logging.getLogger("target.isns")

#: Seconds between attempts while the server cannot be reached.
RETRY_SECONDS = 5.0
#: Seconds one request may take (connect, send, answer).
REQUEST_TIMEOUT = 10.0

#: What a registration carries: the bound portals as (tag, host, port), and
#: each target's (name, alias, portal group tags).
Snapshot = tuple[list[tuple[int, str, int]], list[tuple[str, str | None, tuple[int, ...]]]]


class IsnsRefused(Exception):
    """The iSNS server answered with an error status (one line)."""


def parse_isns_address(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` of an iSNS server (port 3205 by default); ValueError
    in one line when malformed."""
    p = parse_portal(text, default_port=DEFAULT_PORT, bare_v6=False)
    if p.tpgt is not None:
        raise ValueError(f"iSNS server {text!r}: a portal group tag makes no sense here")
    return p.host, p.port


_xids = itertools.count(1)


def next_xid() -> int:
    """A Transaction ID (§5.1.5): unique among this process's requests."""
    return next(_xids) % 0xFFFF + 1


async def exchange(host: str, port: int, build: Callable[[str], Message],
                   timeout: float = REQUEST_TIMEOUT) -> Message:
    """Connect, send the message ``build(local_address)`` makes, return the
    response (checked for its status). iSNSP over TCP, one request per
    connection (RFC 4171 allows either over TCP)."""
    async def run() -> Message:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            local = writer.get_extra_info("sockname")[0]
            request = build(str(local))
            writer.writelines(encode_message(request))
            await writer.drain()
            decoder = MessageReader()
            while True:
                data = await reader.read(65536)
                if not data:
                    raise IsnsError(f"iSNS server {host}:{port} closed the connection")
                for msg in decoder.feed(data):
                    if msg.xid == request.xid and msg.function == request.function | 0x8000:
                        if msg.status:
                            try:
                                why = Status(msg.status).name.replace("_", " ").lower()
                            except ValueError:
                                why = f"status {msg.status}"
                            raise IsnsRefused(f"iSNS server {host}:{port} refused "
                                              f"{_fname(request.function)}: {why}")
                        return msg
        finally:
            writer.close()
    return await asyncio.wait_for(run(), timeout)


def _fname(function: int) -> str:
    names = {1: "DevAttrReg", 2: "DevAttrQry", 4: "DevDereg"}
    return names.get(function, f"function {function:#06x}")


class IsnsRegistrar:
    """Keeps one iSNS server's view of this target current."""

    def __init__(self, address: str, snapshot: Callable[[], Snapshot], *,
                 entity: str | None = None) -> None:
        self.host, self.port = parse_isns_address(address)
        self.address = address
        self._snapshot = snapshot
        self.entity = entity or f"aioiscsi:{socket.gethostname()}"
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._source: str | None = None
        self._period: float | None = None
        self._failing = False
        #: Registrations the server has accepted (for tests and `show`).
        self.registrations = 0

    def start(self) -> None:
        """Register now and keep it current (a background task)."""
        if self.entity == f"aioiscsi:{socket.gethostname()}":
            # One entity per listening process: two targets on one host
            # must not replace each other's registration.
            ports = sorted({p for _, _, p in self._snapshot()[0]})
            self.entity += f":{ports[0]}" if ports else ""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def changed(self) -> None:
        """Targets were added, removed or changed: re-register soon."""
        self._changed.set()

    async def stop(self) -> None:
        """Stop refreshing and deregister the entity (DevDereg, §5.6.5.4)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._source is None:
            return
        source, entity = self._source, self.entity
        try:
            await exchange(self.host, self.port,
                           lambda _: dev_dereg(next_xid(), source, entity), 5.0)
            log.info("deregistered %s from the iSNS server %s", entity, self.address)
        except (OSError, IsnsError, IsnsRefused, asyncio.TimeoutError) as exc:
            log.warning("could not deregister from the iSNS server %s: %s", self.address,
                        _why(exc))

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            try:
                await self._register()
                if self._failing:
                    log.info("registered with the iSNS server %s again", self.address)
                self._failing = False
                wait = self._period / 2 if self._period else None
            except (OSError, IsnsError, IsnsRefused, asyncio.TimeoutError) as exc:
                if not self._failing:
                    log.warning("cannot register with the iSNS server %s: %s; retrying every "
                                "%g s", self.address, _why(exc), RETRY_SECONDS)
                self._failing = True
                wait = RETRY_SECONDS
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _register(self) -> None:
        bound, targets = self._snapshot()
        if not targets:
            # Nothing to offer: the entity goes away (a Storage Node is the
            # Source of every message, so an empty entity cannot be kept).
            if self._source is not None:
                source, entity = self._source, self.entity
                await exchange(self.host, self.port,
                               lambda _: dev_dereg(next_xid(), source, entity))
                self._source = None
            self.registrations += 1
            return

        def build(local: str) -> Message:
            portals = [_portal(host, port, tag, local) for tag, host, port in bound]
            nodes = [NodeInfo(name, alias, tuple(p for p in portals if p.tag in groups))
                     for name, alias, groups in targets]
            return dev_attr_reg(next_xid(), targets[0][0], self.entity, portals, nodes,
                                replace=True)

        rsp = await exchange(self.host, self.port, build)
        self._source = targets[0][0]
        period = next((a.as_u32() for a in rsp.attributes if a.tag == Tag.REGISTRATION_PERIOD
                       and len(a.value) == 4), 0)
        self._period = float(period) if period else None
        self.registrations += 1
        log.info("registered %d target(s) with the iSNS server %s as %s", len(targets),
                 self.address, self.entity)


def _portal(host: str, port: int, tag: int, local: str) -> PortalInfo:
    """A bound portal as the server should publish it: a wildcard address
    becomes the address we reach the iSNS server from."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    return PortalInfo(local if wildcard else host, port, tag)


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
