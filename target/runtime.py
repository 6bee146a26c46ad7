"""A configured target as the server runs it: its LUNs opened, their SCSI
device emulation built, and the one call the transport makes to run a
command (:meth:`TargetRuntime.run_command`).

Write modes, multiattach scope and bandwidth throttles live here, on the
LUN side, so the transport imports nothing from :mod:`target.backends`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from iscsi.ffp.target import Task
from iscsi.pdu import Buffer
from target.backends.bandwidth import BandwidthGroups, ThrottledBackend
from target.backends.base import Backend
from target.backends.modes import CURRENT_INITIATOR
from target.scsi.target import ScsiTarget
from target.scsi.types import Nexus, ScsiResult

if TYPE_CHECKING:
    from target.scsi.alua import TargetPortGroup

from .config import ALUA_STATES, LunSpec, PortalGroup, TargetSpec, physical_block_exponent

if TYPE_CHECKING:
    from target.farm import FarmBackend

log = logging.getLogger("aioiscsi.target")


@dataclass
class TargetRuntime:
    """A configured target with its opened LUNs."""

    spec: TargetSpec
    scsi: ScsiTarget
    backends: dict[int, Backend]
    scsi_luns: frozenset[int] = frozenset()
    #: LUN -> coroutine function to await before each command (bandwidth).
    throttles: dict[int, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def farm(self) -> FarmBackend | None:
        """The boot farm LUN of this target (None: not a farm)."""
        from target.farm import FarmBackend

        b = self.backends.get(0)
        return b if isinstance(b, FarmBackend) else None

    def session_started(self, tsih: int, initiator_name: str, isid: int | None = None
                        ) -> str | None:
        """A leading login of ``initiator_name`` (ISID ``isid``) is about to
        become session ``tsih``: a boot farm makes (or picks) its overlay
        and returns the key the session's commands use (raises FarmRefused
        at a limit)."""
        farm = self.farm
        return None if farm is None else farm.admit(initiator_name, tsih, isid)

    def session_ended(self, tsih: int) -> None:
        """Session ``tsih`` ended (a boot farm drops overlays never written)."""
        farm = self.farm
        if farm is not None:
            farm.release(tsih)

    def run_command_now(self, nexus: Nexus, initiator_name: str, task: Task
                        ) -> CommandResult | Awaitable[CommandResult]:
        """Run one SCSI command on its LUN: the result when it finishes at
        once (the common case, without a coroutine), else an awaitable.
        Bandwidth group first, then the device emulation in the initiator's
        scope (multiattach LUNs pick the initiator's own differencing image
        from :data:`CURRENT_INITIATOR`)."""
        if task.lun in self.throttles:
            return self.run_command(nexus, initiator_name, task)
        data_out, overflow, underflow = self._residuals(task)
        cmd = task.cmd
        token = CURRENT_INITIATOR.set(initiator_name)
        try:
            result = self.scsi.execute_now(nexus, task.lun, cmd.cdb, data_out, cmd.attr,
                                           expected_length=task.edtl)
        finally:
            CURRENT_INITIATOR.reset(token)
        if isinstance(result, ScsiResult):
            return _command_result(result, cmd.write, overflow, underflow)
        return self._finish(result, initiator_name, cmd.write, overflow, underflow)

    async def run_command(self, nexus: Nexus, initiator_name: str, task: Task) -> CommandResult:
        """:meth:`run_command_now` as a coroutine, waiting for the LUN's
        bandwidth group first."""
        throttle = self.throttles.get(task.lun)
        if throttle is not None:
            await throttle()  # the LUN's bandwidth group is over its limit
        data_out, overflow, underflow = self._residuals(task)
        cmd = task.cmd
        token = CURRENT_INITIATOR.set(initiator_name)
        try:
            result = await self.scsi.execute(nexus, task.lun, cmd.cdb, data_out, cmd.attr,
                                             expected_length=task.edtl)
        finally:
            CURRENT_INITIATOR.reset(token)
        return _command_result(result, cmd.write, overflow, underflow)

    @staticmethod
    async def _finish(pending: Awaitable[ScsiResult], initiator_name: str, write: bool,
                      overflow: int, underflow: int) -> CommandResult:
        # The rest of the command (a flush in a thread) runs later, from the
        # event loop: it needs the initiator's scope again.
        token = CURRENT_INITIATOR.set(initiator_name)
        try:
            result = await pending
        finally:
            CURRENT_INITIATOR.reset(token)
        return _command_result(result, write, overflow, underflow)

    def _residuals(self, task: Task) -> tuple[memoryview | None, int, int]:
        """(Data-Out to use, overflow, underflow). Residuals (RFC 7143
        §11.4.5, FCP-4 §9.4.2 as libiscsi tests them): the CDB asks for
        ``want`` bytes, the iSCSI header promised ``have``. With less
        promised the command runs on the bytes that came (the device keeps
        the rest of a partial block) and reports overflow; with more, only
        ``want`` bytes are used. READs carry no Data-Out (SBC-3 §5): the
        common case skips the lookup."""
        cmd = task.cmd
        cdb = cmd.cdb
        want = 0 if cdb and cdb[0] in _READ_OPCODES else self.scsi.data_out_length(task.lun, cdb)
        have = task.edtl if cmd.write else 0
        if want > have:
            return task.data_out(), want - have, 0
        if cmd.write:
            return task.data_out()[:want], 0, have - want
        return None, 0, 0


def _command_result(result: ScsiResult, write: bool, overflow: int, underflow: int
                    ) -> CommandResult:
    if not write:
        return result.status, result.sense, result.data, overflow, 0
    return result.status, result.sense, None, overflow, underflow


#: READ(6), READ(10), READ(12), READ(16).
_READ_OPCODES = frozenset({0x08, 0x28, 0xA8, 0x88})

#: A finished SCSI command as the transport reports it: (status, sense,
#: Data-In or None, residual overflow, residual underflow). A tuple: one is
#: built per command on the hot path.
CommandResult = tuple[int, bytes, Buffer | None, int, int]


def open_lun(spec: LunSpec, state_dir: str | None = None) -> Backend:
    """Open the backend a LUN spec names, in its write mode (raises
    BackendError in one line). ``state_dir`` keeps the differencing images
    of immutable and multiattach LUNs."""
    from target.backends.base import BackendError
    from target.backends.modes import open_with_mode

    if spec.backend == "memory":
        from target.backends.memory import MemoryBackend

        assert spec.size is not None
        return MemoryBackend(spec.size)
    if spec.backend == "nbd":
        from target.backends.nbd import NbdBackend

        if spec.mode not in ("normal", "readonly"):
            raise BackendError(f"{spec.path}: mode {spec.mode!r} is not available for an NBD "
                               "LUN (normal or readonly)")
        return NbdBackend(spec.path, read_only=spec.read_only or spec.mode == "readonly")
    if spec.backend == "rbd":
        from target.backends.rbd import RbdSpec, open_rbd

        return open_rbd(RbdSpec(pool=spec.pool, image=spec.image, namespace=spec.namespace,
                                ceph_conf=spec.ceph_conf, client_id=spec.client_id,
                                keyring=spec.keyring),
                        read_only=spec.read_only or spec.mode.lower() == "readonly")
    if not os.path.exists(spec.path):
        raise BackendError(f"{spec.path}: no such file or device")
    fmt = {"auto": None, "iso": "raw", "file": "raw", "block": "raw"}.get(spec.backend,
                                                                         spec.backend)
    _check_metadata(spec, fmt)
    return open_with_mode(spec.path, spec.mode, state_dir=state_dir, fmt=fmt,
                          read_only=spec.read_only, write_cache=spec.write_cache,
                          max_overlays=spec.max_overlays)


def _check_metadata(spec: LunSpec, fmt: str | None) -> None:
    """The metadata checks of ``image check`` before serving an image: a
    damaged one is refused for writing (writes could spread the damage)
    and served read-only with a warning; leaks are harmless."""
    from target.backends.base import BackendError
    from target.image_check import check_image

    if not os.path.isfile(spec.path):
        return
    res = check_image(spec.path, fmt)
    if res.ok:
        return
    problem = (f"{spec.path}: damaged {res.format} image: {res.errors[0]}"
               + (f" (and {len(res.errors) - 1} more)" if len(res.errors) > 1 else ""))
    if spec.read_only or spec.mode in ("readonly", "immutable", "multiattach"):
        log.warning("%s; serving it read-only as asked", problem)
        return
    raise BackendError(f"{problem}; see 'iscsi-target image check {spec.path}', or serve it "
                       "--read-only to read what is left")


def alua_groups(spec: TargetSpec, groups: Iterable[PortalGroup]) -> list[TargetPortGroup]:
    """The target port groups of ``spec``: one per portal group it is
    served on, relative target port id = group id = the portal group tag
    (the nexus of a session carries its tag, target/session.py)."""
    from target.scsi.alua import AccessState, TargetPortGroup

    return [TargetPortGroup(g.tag, (g.tag,), AccessState(ALUA_STATES[g.alua_state]),
                            preferred=g.preferred)
            for g in groups if g.tag in spec.portal_groups]


def build_target(spec: TargetSpec, state_dir: str | None,
                 bandwidth: BandwidthGroups | None = None,
                 port_groups: Iterable[PortalGroup] = ()) -> TargetRuntime:
    """Open every LUN of ``spec`` and build its SCSI device emulation.
    LUNs in a bandwidth group are wrapped so their transfers share its
    limit (the transport awaits ``throttle`` before each command);
    ``port_groups`` (the server's) give the ALUA target port groups."""
    from iscsi.scsi.constants import PeripheralType
    from target.backends.aio import AsyncBackend
    from target.scsi.lu import LogicalUnit
    from target.scsi.lu_async import AsyncLogicalUnit
    from target.scsi.mmc import CdromUnit
    from target.scsi.target import ScsiTarget
    from target.scsi.types import LUConfig

    luns: dict[int, Any] = {}
    backends: dict[int, Backend] = {}
    throttles: dict[int, Callable[[], Awaitable[None]]] = {}
    try:
        for ls in spec.luns:
            lun_state = os.path.join(state_dir, _safe(spec.name), str(ls.lun)) if state_dir \
                else None
            backend: Backend
            if spec.farm is not None and ls.lun == 0:
                from target.farm import FarmBackend

                backend = FarmBackend(spec.farm.golden, lun_state, mode=spec.farm.mode,
                                      max_overlays=spec.farm.max_overlays,
                                      max_overlay_bytes=spec.farm.max_overlay_bytes)
            else:
                backend = open_lun(ls, lun_state)
            if ls.bandwidth_group is not None and bandwidth is not None:
                backend = ThrottledBackend(backend, bandwidth.get(ls.bandwidth_group))
                throttles[ls.lun] = backend.throttle
            backends[ls.lun] = backend
            cdrom = ls.device_type == "cdrom" or (ls.device_type == "auto" and _is_iso(ls))
            _check_capacity(spec.name, ls, backend, 2048 if cdrom else ls.block_size)
            if not cdrom:
                _check_sector_size(ls, backend)
            # Serial and NAA WWN are derived from target name + LUN unless
            # configured, so they survive restarts (multipath, Windows).
            cfg = LUConfig(
                vendor=ls.vendor, product=ls.product if not cdrom or ls.product != "VIRTUAL-DISK"
                else "VIRTUAL-CDROM", revision=ls.revision, serial=ls.serial,
                naa_wwn=bytes.fromhex(ls.wwn) if ls.wwn else None,
                block_size=2048 if cdrom else ls.block_size,
                read_only=ls.read_only or cdrom or bool(getattr(backend, "read_only", False)),
                # An RBD image has no local write mode layer: writethrough
                # is the unit flushing after every write.
                write_through=not ls.write_cache or (
                    ls.backend == "rbd" and ls.mode.replace("-", "").lower() == "writethrough"),
                device_type=PeripheralType.CDROM if cdrom else PeripheralType.DISK,
                removable=cdrom or ls.removable,
                physical_block_exponent=0 if cdrom else
                physical_block_exponent(ls.block_size, ls.physical_block_size),
                sanitize_rate=ls.sanitize_rate,
                state_dir=lun_state,
            ).resolve(spec.name, ls.lun)
            if cfg.state_dir:
                os.makedirs(cfg.state_dir, exist_ok=True)
            if cdrom:
                luns[ls.lun] = CdromUnit(backend, cfg)
            elif isinstance(backend, AsyncBackend):
                # I/O that completes later (Ceph RBD): awaited, never blocking.
                luns[ls.lun] = AsyncLogicalUnit(backend, cfg)
            else:
                luns[ls.lun] = LogicalUnit(backend, cfg)
    except Exception:
        for b in backends.values():
            b.close()
        raise
    scsi = ScsiTarget(luns, alua_groups(spec, port_groups) or None, name=spec.name)
    return TargetRuntime(spec=spec, scsi=scsi, backends=backends, scsi_luns=frozenset(luns),
                         throttles=throttles)


def _check_capacity(target: str, ls: LunSpec, backend: Backend, block_size: int) -> None:
    """A LUN must hold at least one block (a 0-byte file would be a disk
    no initiator can use); a tail shorter than a block cannot be addressed
    and is left out, with a warning, as tgt and LIO do."""
    from target.backends.base import BackendError

    where = ls.path or f"LUN {ls.lun} of {target}"
    if backend.size < block_size:
        raise BackendError(f"{where}: {backend.size} bytes is smaller than one "
                           f"{block_size}-byte block; nothing to serve")
    tail = backend.size % block_size
    if tail:
        log.warning("%s: %d bytes is not a multiple of the %d-byte block size; the last "
                    "%d bytes are not visible to initiators", where, backend.size, block_size,
                    tail)


def _check_sector_size(ls: LunSpec, backend: Backend) -> None:
    """An image that declares its logical sector size (VHDX: 512 or 4096)
    should be served with that block size: a guest formatted on 4096-byte
    sectors sees a different disk with 512-byte ones. The block size stays
    what the configuration says (SBC-3 READ CAPACITY reports it); a
    mismatch is logged with the setting that fixes it."""
    node: object = backend
    for _ in range(8):  # through mode/bandwidth wrappers to the image
        lss = getattr(node, "logical_sector_size", None)
        if isinstance(lss, int):
            if lss != ls.block_size:
                log.warning("%s: the image has %d-byte logical sectors but the LUN is served "
                            "with %d-byte blocks; set block_size = %d (--block-size %d) to match",
                            ls.path, lss, ls.block_size, lss, lss)
            return
        node = getattr(node, "inner", None) or getattr(node, "parent", None)
        if node is None:
            return


def _is_iso(ls: LunSpec) -> bool:
    """ISO 9660 images carry "CD001" at byte 32769 (ECMA-119 §8.4)."""
    if ls.backend not in ("auto", "iso") or not ls.path:
        return False
    if ls.backend == "iso":
        return True
    try:
        with open(ls.path, "rb") as f:
            f.seek(32769)
            return f.read(5) == b"CD001"
    except OSError:
        return False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
