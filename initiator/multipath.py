"""Multipath: one LUN through every portal of its target, I/O on the best
path by ALUA state, failover when a path dies and failback when it returns.

:meth:`MultipathDevice.open` finds the target's portals with SendTargets
(RFC 7143 Appendix C), logs in a session through each, checks that every
path reaches the same logical unit (its NAA designator, VPD 83h) and reads
REPORT TARGET PORT GROUPS (SPC-4 §6.37) to learn each path's asymmetric
access state from its TARGET PORT GROUP designator. I/O goes to an
active/optimized path (the preferred one first), else an
active/non-optimized one; standby and unavailable paths stay logged in.

A path's session fails fast (replacement timeout 0): its commands end at
once when the connection drops, and the multipath layer retries them on
another path, waiting for one to come back for at most
``failover_timeout`` seconds. Retrying is safe for what this device sends:
reads, and writes of whole blocks at fixed addresses (rewriting the same
data is idempotent; as with Linux dm-multipath, writes the caller issues
concurrently to the same blocks are unordered anyway). A dead path is
logged in again in the background, with backoff; when it returns, or when
a target reports ASYMMETRIC ACCESS STATE CHANGED (2Ah/06h) or refuses a
command for its ALUA state (04h/0Ah, 0Bh, 0Ch), the states are read again
and the best path is chosen again -- which is also how it fails back.

:class:`MultipathDevice` offers the :class:`~initiator.blockdev.BlockDevice`
interface, so ``attach --nbd/--fuse`` and ``copy`` use it unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from iscsi.names import Portal, parse_portal
from iscsi.pdu import Buffer
from iscsi.scsi import alua
from iscsi.scsi.cdb_common import DesignatorType
from iscsi.scsi.sense import SenseData

from .blockdev import BlockDevice, Device, options_from_url
from .errors import InitiatorError, SessionFailed
from .scsi import LUN, Capacity, SCSICheckCondition
from .discover import discover
from .session import Session, SessionOptions

log = logging.getLogger("initiator.multipath")
T = TypeVar("T")

#: Seconds between login attempts on a dead path: start, cap.
_RETRY_FIRST, _RETRY_MAX = 0.5, 5.0


class NoPath(InitiatorError):
    """No path to the logical unit came back within the failover timeout."""

    hint = "check that at least one of the target's portals is reachable"


class PathInfo:
    """One path: a portal, its session and device, and what ALUA says."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.device: BlockDevice | None = None
        #: TARGET PORT GROUP of this path (VPD 83h designator type 5).
        self.group: int | None = None
        self.state: int | None = None
        self.preferred = False
        self.failures = 0

    @property
    def alive(self) -> bool:
        d = self.device
        return d is not None and d.lun.session.state not in ("closed", "failed")

    def describe(self) -> str:
        state = alua.STATE_NAMES.get(self.state, "?") if self.state is not None else "?"
        return (f"{self.portal.host}:{self.portal.port} (group {self.group}, {state}, "
                f"{'up' if self.alive else 'down'})")


class MultipathDevice:
    """A LUN over several paths, with the BlockDevice interface."""

    def __init__(self, url: str, target: str, lun: int, options: SessionOptions,
                 portals: list[Portal], *, failover_timeout: float) -> None:
        self.url = url
        self.target = target
        self.lun_number = lun
        self.options = options
        self.paths = [PathInfo(p) for p in portals]
        self.failover_timeout = failover_timeout
        self.naa: bytes | None = None
        self._active: PathInfo | None = None
        self._stale = True  # ALUA states must be read (again)
        self._revivers: dict[int, asyncio.Task[None]] = {}
        self._closed = False
        self._changed = asyncio.Event()
        self.failovers = 0

    # ---------------------------------------------------------------- open
    @classmethod
    async def open(cls, url: str, options: SessionOptions | None = None, *,
                   failover_timeout: float = 30.0,
                   extra_portals: Sequence[str] = ()) -> MultipathDevice:
        """Log in through every portal SendTargets lists for the URL's
        target (just the URL's portal when discovery says nothing more),
        and through ``extra_portals`` ("host[:port]": gateways that do not
        know each other, so no one's SendTargets lists them all)."""
        host, port, target, lun, opts = options_from_url(url, options)
        portals = await _portals(host, port, target, opts)
        known = {(p.host, p.port) for p in portals}
        for text in extra_portals:
            extra = parse_portal(text)
            if (extra.host, extra.port) not in known:
                known.add((extra.host, extra.port))
                portals.append(extra)
        path_opts = copy.copy(opts)
        path_opts.replacement_timeout = 0.0  # fail fast; the paths cover
        dev = cls(url, target, lun, path_opts, portals, failover_timeout=failover_timeout)
        await asyncio.gather(*(dev._login(p) for p in dev.paths), return_exceptions=True)
        if not any(p.alive for p in dev.paths):
            await dev.close()
            raise NoPath(f"{url}: no portal of {target} answered "
                         f"({', '.join(str(p.portal) for p in dev.paths)})")
        await dev._refresh()
        return dev

    async def _login(self, path: PathInfo) -> None:
        session = await Session.connect(path.portal.host, path.portal.port, self.target,
                                        self.options)
        try:
            device = await BlockDevice.from_session(session, self.lun_number, owns_session=True)
            ids = await device.lun.device_identification()
        except BaseException:
            await session.logout()
            raise
        naa = next((d.value for d in ids if d.designator_type == DesignatorType.NAA), None)
        group = next((int.from_bytes(d.value, "big") for d in ids
                      if d.designator_type == DesignatorType.TARGET_PORT_GROUP), None)
        if self.naa is None:
            self.naa = naa
        elif naa != self.naa:
            await device.close()
            raise InitiatorError(f"{path.portal}: LUN {self.lun_number} is a different logical "
                                 "unit there (NAA designator differs); path not used")
        device.lun.on_unit_attention = self._unit_attention
        path.device, path.group, path.failures = device, group, 0
        log.info("path %s logged in", path.describe())

    # ------------------------------------------------------------- choice
    def _unit_attention(self, sense: bytes) -> None:
        s = SenseData.decode(sense)
        if (s.asc, s.ascq) == alua.STATE_CHANGED:
            self._stale = True

    async def _refresh(self) -> None:
        """Read the ALUA states and choose the best path. Each path's state
        comes from REPORT TARGET PORT GROUPS sent through that path: with
        gateways that are separate processes, each knows its own group for
        sure. A unit without ALUA counts as active/optimized everywhere."""
        for path in [p for p in self.paths if p.alive]:
            assert path.device is not None
            try:
                r = await path.device.lun.execute(alua.build_report_target_port_groups(),
                                                  data_in_length=1024)
                groups = alua.parse_target_port_groups(r.data or b"")
            except SCSICheckCondition:
                groups = []
            except (InitiatorError, ValueError) as exc:
                log.debug("path %s: REPORT TARGET PORT GROUPS failed: %s", path.portal, exc)
                continue
            own = next((g for g in groups if g.group_id == path.group), None)
            path.state = own.state if own is not None else alua.ACTIVE_OPTIMIZED
            path.preferred = own.preferred if own is not None else False
        self._stale = False
        best = self._best()
        if best is not self._active:
            if self._active is not None and best is not None:
                self.failovers += 1
            log.info("multipath %s: I/O through %s", self.url,
                     best.describe() if best else "no path (waiting)")
        self._active = best

    @property
    def active_path(self) -> PathInfo | None:
        """The path I/O goes through now (None while none is usable)."""
        return self._active

    def _best(self) -> PathInfo | None:
        usable = [p for p in self.paths if p.alive and p.state in
                  (alua.ACTIVE_OPTIMIZED, alua.ACTIVE_NON_OPTIMIZED)]
        usable.sort(key=lambda p: (p.state, not p.preferred))
        return usable[0] if usable else None

    # ------------------------------------------------------------ failover
    def _lost(self, path: PathInfo, exc: BaseException) -> None:
        log.warning("path %s failed: %s", path.describe(), exc)
        if self._active is path:
            self._active = None
            self.failovers += 1
        self._stale = True
        key = id(path)
        if not self._closed and (key not in self._revivers or self._revivers[key].done()):
            self._revivers[key] = asyncio.get_running_loop().create_task(self._revive(path))

    async def _revive(self, path: PathInfo) -> None:
        """Log the path in again, with backoff, until it works or we close."""
        delay = _RETRY_FIRST
        old = path.device
        path.device = None
        if old is not None:
            old.lun.session.abort()
        while not self._closed:
            try:
                await self._login(path)
            except (InitiatorError, OSError) as exc:
                path.failures += 1
                log.debug("path %s: login failed (%s), again in %.1f s", path.portal, exc, delay)
                await asyncio.sleep(delay)  # backoff between logins, not synchronisation
                delay = min(delay * 2, _RETRY_MAX)
                continue
            self._stale = True
            self._changed.set()
            return

    async def _run(self, op: Callable[[BlockDevice], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.failover_timeout
        while True:
            if self._closed:
                raise SessionFailed(f"{self.url}: the device is closed")
            if self._stale or self._active is None or not self._active.alive:
                await self._refresh()
            path = self._active
            if path is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoPath(f"{self.url}: no usable path within {self.failover_timeout:g} s "
                                 f"({'; '.join(p.describe() for p in self.paths)})")
                self._changed.clear()
                try:
                    # Woken by a path coming back; states are polled too, as
                    # a standby group may become active without a UA to us.
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                except TimeoutError:
                    self._stale = True
                continue
            assert path.device is not None
            try:
                return await op(path.device)
            except SCSICheckCondition as exc:
                if exc.asc == 0x04 and exc.ascq in alua.NOT_ACCESSIBLE_ASCQS:
                    self._stale = True  # this port's state changed under us
                    continue
                raise
            except (SessionFailed, OSError) as exc:
                self._lost(path, exc)
            except InitiatorError as exc:
                if path.alive:
                    raise
                self._lost(path, exc)

    # -------------------------------------------------- BlockDevice interface
    @property
    def active(self) -> BlockDevice:
        """The device of the path in use (or of any live path)."""
        path = self._active if self._active is not None and self._active.alive else \
            next((p for p in self.paths if p.alive), None)
        if path is None or path.device is None:
            raise NoPath(f"{self.url}: no live path")
        return path.device

    @property
    def lun(self) -> LUN:
        """The LUN object of the path in use."""
        return self.active.lun

    @property
    def capacity(self) -> Capacity:
        return self.active.capacity

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.active.size

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""
        return self.active.block_size

    @property
    def read_only(self) -> bool:
        return bool(getattr(self.active, "read_only", False))

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` through the best path."""
        return await self._run(lambda d: d.read(offset, length))

    async def readinto(self, offset: int, buffer: Buffer) -> int:
        """Read into ``buffer`` (retried whole on another path if one dies)."""
        return await self._run(lambda d: d.readinto(offset, buffer))

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> int:
        """Write ``data`` at ``offset`` through the best path."""
        return await self._run(lambda d: d.write(offset, data, fua=fua))

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE through the best path (the cache is the LU's,
        shared by every path)."""
        await self._run(lambda d: d.flush())

    async def discard(self, offset: int, length: int) -> int:
        """UNMAP the whole blocks of a byte range."""
        return await self._run(lambda d: d.discard(offset, length))

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """WRITE SAME of zeroes over a byte range."""
        await self._run(lambda d: d.write_zeroes(offset, length, unmap=unmap))

    async def close(self) -> None:
        """Log every path out."""
        self._closed = True
        for task in self._revivers.values():
            task.cancel()
        for p in self.paths:
            if p.device is not None:
                try:
                    await p.device.close()
                except (InitiatorError, OSError):
                    pass
                p.device = None

    async def __aenter__(self) -> MultipathDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _portals(host: str, port: int, target: str, opts: SessionOptions) -> list[Portal]:
    """The portals SendTargets gives for ``target``, the URL's first."""
    first = Portal(host, port)
    try:
        found = await discover(host, port, opts, target, chap_optional=True)
    except (InitiatorError, OSError) as exc:
        log.info("multipath: discovery at %s failed (%s); one path only", first, exc)
        return [first]
    out = [first]
    seen = {(host, port)}
    for t in found:
        if t.name != target:
            continue
        for p in t.portals:
            if (p.host, p.port) == (host, port):
                out[0] = Portal(host, port, p.tpgt)  # the URL's, with its tag
            elif (p.host, p.port) not in seen:
                seen.add((p.host, p.port))
                out.append(Portal(p.host, p.port, p.tpgt))
    return out


async def open_device(url: str, options: SessionOptions, *, multipath: str = "auto",
                      paths: Sequence[str] = (), failover_timeout: float | None = None
                      ) -> Device:
    """The device behind ``url``: one :class:`BlockDevice`, or a
    :class:`MultipathDevice` when ``multipath`` is "on", when ``paths``
    names more portals, or ("auto") when SendTargets lists portals of more
    than one portal group. The failover timeout defaults to the session options'
    replacement timeout, the time a single-path device would wait too."""
    timeout = options.replacement_timeout if failover_timeout is None else failover_timeout
    if multipath == "off" and not paths:
        return await BlockDevice.open(url, options)
    if multipath == "auto" and not paths:
        # Several portal groups are several target ports (ALUA paths);
        # several addresses of one group are left to "on".
        host, port, target, _, opts = options_from_url(url, copy.copy(options))
        portals = await _portals(host, port, target, opts)
        if len({p.tpgt for p in portals if p.tpgt is not None}) < 2:
            return await BlockDevice.open(url, options)
    return await MultipathDevice.open(url, options, failover_timeout=timeout,
                                      extra_portals=paths)
