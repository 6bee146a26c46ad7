"""Typed SCSI commands on one logical unit of a :class:`Session`.

CDBs are built and returned data parsed by the :mod:`iscsi.scsi` codec; this module
adds the transport (``Session.execute``), turns CHECK CONDITION into
:class:`SCSICheckCondition` (sense key, ASC/ASCQ and their names), retries
what SAM-5 says is safe to retry (UNIT ATTENTION: the command was not
executed, §5.3.1; BUSY and TASK SET FULL), and remembers the block size.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from iscsi.pdu import Buffer
from iscsi.scsi.constants import PRInAction, PROutAction, SenseKey, Status, VPDPage
from iscsi.scsi.lun import parse_report_luns_data
from iscsi.scsi.modes import DPOFUA, parse_mode_header
from iscsi.scsi.pr import (
    build_persistent_reserve_in,
    build_persistent_reserve_out,
    build_pr_out_parameters,
)
from iscsi.scsi.rw import (
    build_compare_and_write,
    build_read,
    build_write,
    build_write_same,
)
from iscsi.scsi.sbc import (
    LbaStatusDescriptor,
    build_get_lba_status,
    build_read_capacity10,
    build_read_capacity16,
    build_synchronize_cache,
    build_unmap,
    build_unmap_parameter_list,
    parse_lba_status_data,
    parse_read_capacity10_data,
    parse_read_capacity16_data,
)
from iscsi.scsi.sense import SenseData, SenseDecodeError, asc_name
from iscsi.scsi.spc import (
    build_inquiry,
    build_mode_sense,
    build_report_luns,
    build_test_unit_ready,
)
from iscsi.scsi.vpd import (
    BlockLimits,
    Designator,
    StandardInquiry,
    parse_standard_inquiry,
    parse_vpd_block_limits,
    parse_vpd_device_identification,
    parse_vpd_page,
    parse_vpd_supported_pages,
    parse_vpd_unit_serial,
)

from .errors import InitiatorError, LUNNotFound, TargetProtocolError
from .session import ScsiResult, Session

#: INQUIRY/VPD allocation length used by default (SPC-4 allows 65535).
_ALLOC = 4096
_UA_RETRIES = 8
_BUSY_RETRIES = 10
T = TypeVar("T")


class SCSIStatusError(InitiatorError):
    """A command ended with a status other than GOOD (and other than CHECK
    CONDITION, which is :class:`SCSICheckCondition`)."""

    def __init__(self, status: int, what: str) -> None:
        try:
            name = Status(status).name.replace("_", " ")
        except ValueError:
            name = f"status 0x{status:02x}"
        self.status = status
        super().__init__(f"{what}: {name}")


class SCSICheckCondition(SCSIStatusError):
    """CHECK CONDITION with its decoded sense data (SPC-4 §4.5).

    Attributes: ``sense`` (SenseData or None if undecodable), ``raw_sense``,
    ``key``, ``asc``, ``ascq`` and the names ``key_name`` / ``asc_name``.
    """

    def __init__(self, raw_sense: bytes, what: str) -> None:
        self.raw_sense = raw_sense
        try:
            self.sense: SenseData | None = SenseData.decode(raw_sense)
        except SenseDecodeError:
            self.sense = None
        s = self.sense
        self.key = s.key if s is not None else 0
        self.asc = s.asc if s is not None else 0
        self.ascq = s.ascq if s is not None else 0
        try:
            self.key_name = SenseKey(self.key).name.replace("_", " ")
        except ValueError:
            self.key_name = f"sense key 0x{self.key:x}"
        self.asc_name = asc_name(self.asc, self.ascq)
        super().__init__(Status.CHECK_CONDITION, what)
        detail = (f"{self.key_name}, {self.asc_name} (ASC 0x{self.asc:02x} ASCQ 0x{self.ascq:02x})"
                  if s is not None else f"undecodable sense data {raw_sense[:18].hex()}")
        self.args = (f"{what}: CHECK CONDITION: {detail}",)


def check(result: ScsiResult, what: str) -> ScsiResult:
    """Raise the typed exception for a non-GOOD result; return it otherwise."""
    if result.good:
        return result
    if result.status == Status.CHECK_CONDITION:
        raise SCSICheckCondition(result.sense, what)
    raise SCSIStatusError(result.status, what)


def _is_unit_attention(result: ScsiResult) -> bool:
    s = result.sense
    # Fixed format: key in byte 2; descriptor format: byte 1 (SPC-4 §4.5).
    if result.status != Status.CHECK_CONDITION or len(s) < 3:
        return False
    key = s[2] if (s[0] & 0x7F) in (0x70, 0x71) else s[1]
    return key & 0x0F == SenseKey.UNIT_ATTENTION


@dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY data in one place (SBC-3 §5.15, §5.16)."""

    blocks: int
    block_size: int
    physical_block_size: int
    lbpme: bool = False  # thin provisioning enabled
    lbprz: bool = False  # unmapped blocks read as zero

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.blocks * self.block_size


@dataclass(frozen=True, slots=True)
class PRKeys:
    """PERSISTENT RESERVE IN / READ KEYS data (SPC-4 §6.15.2)."""

    generation: int
    keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PRReservation:
    """PERSISTENT RESERVE IN / READ RESERVATION data (SPC-4 §6.15.3);
    ``key`` is None when no persistent reservation is held."""

    generation: int
    key: int | None = None
    scope: int = 0
    pr_type: int = 0


_PR_HEADER = struct.Struct(">II")
_PR_RESERVATION = struct.Struct(">QIBB")


def parse_pr_keys(data: Buffer) -> PRKeys:
    """Decode READ KEYS parameter data; keys beyond the returned bytes (a
    short allocation length) are left out."""
    mv = memoryview(data).cast("B")
    if mv.nbytes < 8:
        raise ValueError(f"READ KEYS data is {mv.nbytes} bytes, under its 8-byte header")
    generation, length = _PR_HEADER.unpack_from(mv)
    body = mv[8 : 8 + min(length, mv.nbytes - 8)]
    n = body.nbytes // 8
    keys = struct.unpack(f">{n}Q", body[: n * 8]) if n else ()
    return PRKeys(generation, tuple(keys))


def parse_pr_reservation(data: Buffer) -> PRReservation:
    """Decode READ RESERVATION parameter data."""
    mv = memoryview(data).cast("B")
    if mv.nbytes < 8:
        raise ValueError(f"READ RESERVATION data is {mv.nbytes} bytes, under its 8-byte header")
    generation, length = _PR_HEADER.unpack_from(mv)
    if length == 0:
        return PRReservation(generation)
    if length < 0x10 or mv.nbytes < 8 + _PR_RESERVATION.size:
        raise ValueError(f"READ RESERVATION descriptor is truncated ({length} bytes)")
    key, _obsolete, _reserved, scope_type = _PR_RESERVATION.unpack_from(mv, 8)
    return PRReservation(generation, key, scope_type >> 4, scope_type & 0x0F)


class LUN:
    """One logical unit: typed SCSI commands over a session.

    ``block_size`` is learnt from :meth:`read_capacity` (call it, or use
    :meth:`open`, before block I/O).
    """

    def __init__(self, session: Session, lun: int) -> None:
        self.session = session
        self.lun = lun
        self.capacity: Capacity | None = None
        #: DPOFUA from MODE SENSE, learnt on first use (None: not asked yet).
        self._dpofua: bool | None = None
        #: Called with the sense data of each UNIT ATTENTION before the
        #: command is retried (multipath re-reads ALUA states on 2A/06).
        self.on_unit_attention: Callable[[bytes], None] | None = None

    @classmethod
    async def open(cls, session: Session, lun: int) -> LUN:
        """A LUN object with its capacity read; :class:`LUNNotFound` if the
        target has no such LU (INQUIRY peripheral qualifier 011b)."""
        unit = cls(session, lun)
        inq = await unit.inquiry()
        if inq.qualifier == 3:
            raise LUNNotFound(f"LUN {lun} does not exist on {session.target_name}")
        await unit.read_capacity()
        return unit

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""
        if self.capacity is None:
            raise InitiatorError("block size unknown: call read_capacity() first")
        return self.capacity.block_size

    # ------------------------------------------------------------- core

    async def execute(self, cdb: bytes, *, data_out: Buffer | None = None,
                      data_in_length: int = 0, data_in: Buffer | None = None,
                      check_status: bool = True, what: str | None = None) -> ScsiResult:
        """Run any CDB; with ``check_status`` a non-GOOD status raises.

        UNIT ATTENTION is retried (the command was not executed, SAM-5
        §5.3.1) as are BUSY and TASK SET FULL with a short backoff.
        """
        dest: Buffer | int | None = data_in if data_in is not None else (data_in_length or None)
        delay = 0.001
        ua = busy = 0
        while True:
            result = await self.session.execute(self.lun, cdb, data_out=data_out, data_in=dest)
            if _is_unit_attention(result) and ua < _UA_RETRIES:
                ua += 1
                if self.on_unit_attention is not None:
                    self.on_unit_attention(bytes(result.sense))
                continue
            if result.status in (Status.BUSY, Status.TASK_SET_FULL) and busy < _BUSY_RETRIES:
                busy += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            if check_status and not result.good:
                check(result, what or _opname(cdb))  # the name only when it is needed
            return result

    # ------------------------------------------------------- SPC commands

    async def inquiry(self) -> StandardInquiry:
        """Standard INQUIRY data (SPC-4 §6.4.2)."""
        r = await self.execute(build_inquiry(allocation_length=255), data_in_length=255)
        return _parse(parse_standard_inquiry, r)

    async def inquiry_vpd(self, page: int, allocation_length: int = _ALLOC) -> bytes:
        """The raw bytes of VPD ``page`` (SPC-4 §7.8), header included."""
        r = await self.execute(build_inquiry(evpd=True, page_code=page,
                                               allocation_length=allocation_length),
                               data_in_length=allocation_length)
        data = bytes(r.data or b"")
        _parse(lambda d: parse_vpd_page(d, page), r)
        return data

    async def vpd_pages(self) -> tuple[int, ...]:
        """Supported VPD page codes (page 00h)."""
        return parse_vpd_supported_pages(await self.inquiry_vpd(VPDPage.SUPPORTED_PAGES))

    async def unit_serial_number(self) -> str:
        """VPD page 80h."""
        return parse_vpd_unit_serial(await self.inquiry_vpd(VPDPage.UNIT_SERIAL_NUMBER))

    async def device_identification(self) -> tuple[Designator, ...]:
        """VPD page 83h designators."""
        return parse_vpd_device_identification(
            await self.inquiry_vpd(VPDPage.DEVICE_IDENTIFICATION))

    async def block_limits(self) -> BlockLimits | None:
        """VPD page B0h, or None if the LU does not have it."""
        if VPDPage.BLOCK_LIMITS not in await self.vpd_pages():
            return None
        return parse_vpd_block_limits(await self.inquiry_vpd(VPDPage.BLOCK_LIMITS))

    async def test_unit_ready(self) -> None:
        """TEST UNIT READY; raises :class:`SCSICheckCondition` if not ready."""
        await self.execute(build_test_unit_ready())

    async def report_luns(self) -> list[int]:
        """REPORT LUNS (SPC-4 §6.27), growing the allocation if truncated."""
        alloc = 4096
        while True:
            r = await self.execute(build_report_luns(allocation_length=alloc),
                                   data_in_length=alloc)
            data = _parse(parse_report_luns_data, r)
            if not data.truncated or alloc >= 1 << 20:
                return sorted(data.luns)
            alloc = min(data.list_length + 8, 1 << 20)

    async def read_keys(self) -> PRKeys:
        """The registered reservation keys (PERSISTENT RESERVE IN, READ KEYS)."""
        r = await self.execute(build_persistent_reserve_in(
            service_action=PRInAction.READ_KEYS, allocation_length=_ALLOC),
            data_in_length=_ALLOC)
        return _parse(parse_pr_keys, r)

    async def read_reservation(self) -> PRReservation:
        """The persistent reservation held, if any (READ RESERVATION)."""
        r = await self.execute(build_persistent_reserve_in(
            service_action=PRInAction.READ_RESERVATION, allocation_length=_ALLOC),
            data_in_length=_ALLOC)
        return _parse(parse_pr_reservation, r)

    async def persistent_reserve_out(self, action: int = PROutAction.REGISTER, *,
                                     reservation_key: int = 0, service_action_key: int = 0,
                                     pr_type: int = 0, scope: int = 0, aptpl: bool = False,
                                     all_tg_pt: bool = False) -> None:
        """PERSISTENT RESERVE OUT (SPC-4 §6.16) with the basic parameter list."""
        params = build_pr_out_parameters(reservation_key=reservation_key,
                                           service_action_key=service_action_key,
                                           all_tg_pt=all_tg_pt, aptpl=aptpl)
        await self.execute(build_persistent_reserve_out(
            service_action=action, scope=scope, pr_type=pr_type,
            parameter_list_length=len(params)), data_out=params)

    # ------------------------------------------------------- SBC commands

    async def read_capacity(self) -> Capacity:
        """READ CAPACITY(16), falling back to (10) where (16) is unsupported."""
        try:
            r = await self.execute(build_read_capacity16(), data_in_length=32)
            d16 = _parse(parse_read_capacity16_data, r)
            cap = Capacity(d16.blocks, d16.block_length, d16.physical_block_length,
                           d16.lbpme, d16.lbprz)
        except SCSICheckCondition as exc:
            if exc.key != SenseKey.ILLEGAL_REQUEST:
                raise
            r = await self.execute(build_read_capacity10(), data_in_length=8)
            d10 = _parse(parse_read_capacity10_data, r)
            cap = Capacity(d10.blocks, d10.block_length, d10.block_length)
        if cap.block_size <= 0:
            raise TargetProtocolError(f"LUN {self.lun} reports a block size of {cap.block_size}")
        self.capacity = cap
        return cap

    async def fua_supported(self) -> bool:
        """Whether the LU takes the DPO and FUA bits: DPOFUA, bit 4 of the
        device-specific parameter in the mode parameter header (SBC-3
        §6.4.1). Asked once with MODE SENSE(6); a LU that refuses MODE
        SENSE is taken not to support them."""
        if self._dpofua is None:
            try:
                r = await self.execute(build_mode_sense(page_code=0x3F, dbd=True,
                                                          allocation_length=252),
                                       data_in_length=252)
            except SCSIStatusError:
                self._dpofua = False
            else:
                try:
                    header = parse_mode_header(r.data if r.data is not None else b"", ten=False)
                except ValueError:
                    self._dpofua = False
                else:
                    self._dpofua = bool(header.device_specific & DPOFUA)
        return self._dpofua

    async def read(self, lba: int, blocks: int, buffer: Buffer | None = None, *,
                   fua: bool = False) -> memoryview:
        """READ(10/16) ``blocks`` blocks at ``lba``; into ``buffer`` when given
        (Data-In lands there directly). Returns the bytes transferred.
        ``fua`` is sent only where the LU advertises it (DPOFUA)."""
        length = blocks * self.block_size
        if fua:
            fua = await self.fua_supported()
        if buffer is not None and memoryview(buffer).nbytes != length:
            raise ValueError(f"buffer is {memoryview(buffer).nbytes} bytes, the read {length}")
        r = await self.execute(build_read(lba, blocks, fua=fua), data_in=buffer,
                               data_in_length=length)
        if r.data is None:
            return memoryview(b"")
        return r.data

    async def write(self, lba: int, data: Buffer, *, fua: bool = False) -> None:
        """WRITE(10/16) ``data`` (a whole number of blocks) at ``lba``.

        ``fua`` (the data on the medium before GOOD) uses the FUA bit where
        the LU advertises DPOFUA; elsewhere (LIO fileio refuses the bit) the
        write is followed by SYNCHRONIZE CACHE of its range (SBC-3 §5.22),
        which gives the same guarantee."""
        n = memoryview(data).nbytes
        blocks, rest = divmod(n, self.block_size)
        if rest:
            raise ValueError(f"write of {n} bytes is not a multiple of {self.block_size}")
        with_bit = fua and await self.fua_supported()
        await self.execute(build_write(lba, blocks, fua=with_bit), data_out=data)
        if fua and not with_bit and blocks:
            await self.synchronize_cache(lba, blocks)

    async def write_same(self, lba: int, blocks: int, data: Buffer | None = None, *,
                         unmap: bool = False) -> None:
        """WRITE SAME(16) one block of ``data`` (zeros if None) to ``blocks``
        blocks; ``unmap`` lets a thin LU deallocate them (SBC-3 §5.43)."""
        block = data if data is not None else bytes(self.block_size)
        if memoryview(block).nbytes != self.block_size:
            raise ValueError("WRITE SAME takes exactly one block of data")
        await self.execute(build_write_same(lba, blocks, size=16, unmap=unmap), data_out=block)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """UNMAP (SBC-3 §5.28) the (lba, blocks) ranges."""
        params = build_unmap_parameter_list(list(ranges))
        await self.execute(build_unmap(parameter_list_length=len(params)), data_out=params)

    async def synchronize_cache(self, lba: int = 0, blocks: int = 0) -> None:
        """SYNCHRONIZE CACHE(10); blocks 0 means to the end of the LU."""
        size = 16 if lba >= 1 << 32 or blocks >= 1 << 16 else 10
        await self.execute(build_synchronize_cache(lba=lba, blocks=blocks, cdb_size=size))

    async def compare_and_write(self, lba: int, compare: Buffer, write: Buffer) -> None:
        """COMPARE AND WRITE (SBC-3 §5.2): atomically write ``write`` if the
        blocks equal ``compare``; a mismatch raises SCSICheckCondition with
        sense key MISCOMPARE."""
        n = memoryview(compare).nbytes
        if memoryview(write).nbytes != n or n % self.block_size:
            raise ValueError("compare and write buffers must be equal whole blocks")
        await self.execute(build_compare_and_write(lba, n // self.block_size),
                           data_out=bytes(compare) + bytes(write))

    async def get_lba_status(self, lba: int, allocation_length: int = 4096
                             ) -> tuple[LbaStatusDescriptor, ...]:
        """GET LBA STATUS (SBC-3 §5.4): provisioning status from ``lba`` on."""
        r = await self.execute(build_get_lba_status(lba=lba,
                                                      allocation_length=allocation_length),
                               data_in_length=allocation_length)
        return _parse(parse_lba_status_data, r)


def _parse(fn: Callable[[memoryview], T], r: ScsiResult) -> T:
    try:
        return fn(r.data if r.data is not None else memoryview(b""))
    except (ValueError, IndexError) as exc:
        raise TargetProtocolError(f"malformed SCSI data from the target: {exc}") from None


def _opname(cdb: bytes) -> str:
    from iscsi.scsi.constants import Opcode

    try:
        return Opcode(cdb[0]).name.replace("_", " ")
    except (ValueError, IndexError):
        return f"opcode 0x{cdb[0]:02x}" if cdb else "empty CDB"


__all__ = ["LUN", "Capacity", "PRKeys", "PRReservation", "SCSICheckCondition",
           "SCSIStatusError", "check", "parse_pr_keys", "parse_pr_reservation"]
