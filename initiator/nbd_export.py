"""What an NBD (or FUSE) export serves: the :class:`ExportDevice` shape and
:class:`BlockDeviceExport`, which adapts an iSCSI
:class:`~initiator.blockdev.BlockDevice` to it (byte offsets, FUA as a
flush, discard/zeroes and allocation status through the SCSI commands).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from .nbd_proto import BytesLike

if TYPE_CHECKING:
    from .blockdev import Device

# ------------------------------------------------------------ device shape


class ExportDevice(Protocol):
    """What an export needs from a device (byte offsets throughout).

    ``read``/``write`` take any byte offset and length inside ``size``;
    ``discard`` is advisory; ``write_zeroes`` must leave the range reading
    as zeros and may deallocate it when ``may_trim``. Two optional members
    are looked up with ``getattr``: ``async block_status(offset, length) ->
    Sequence[(length, mapped)]`` (consecutive extents from ``offset``;
    without it every block is reported allocated) and
    ``unmapped_reads_zero: bool`` (whether unmapped extents read as zeros,
    like SBC-3 LBPRZ; default False).
    """

    @property
    def size(self) -> int:
        """Size in bytes."""

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""

    @property
    def read_only(self) -> bool:
        """True if writes must be refused."""

    async def read(self, offset: int, length: int) -> BytesLike:
        """``length`` bytes at ``offset``."""

    async def write(self, offset: int, data: BytesLike) -> object:
        """Write ``data`` at ``offset``."""

    async def flush(self) -> None:
        """Make completed writes durable."""

    async def discard(self, offset: int, length: int) -> object:
        """Hint that the range is no longer needed."""

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Zero the range (deallocating it is allowed when ``may_trim``)."""


BlockStatusFn = Callable[[int, int], Awaitable[Sequence[tuple[int, bool]]]]


class BlockDeviceExport:
    """Adapts an iSCSI :class:`~initiator.blockdev.BlockDevice` to
    :class:`ExportDevice`: WRITE ZEROES may unmap when the LU is thin
    (LBPME) and the client allows holes; block status comes from GET LBA
    STATUS (SBC-3 §5.4) when the LU is thin."""

    def __init__(self, device: Device, *, read_only: bool = False) -> None:
        self.device = device
        self._read_only = read_only
        self._lba_status = bool(device.capacity.lbpme)

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.device.size

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""
        return self.device.block_size

    @property
    def read_only(self) -> bool:
        """True if this export refuses writes."""
        return self._read_only

    @property
    def unmapped_reads_zero(self) -> bool:
        """SBC-3 LBPRZ: deallocated blocks read as zeros."""
        return bool(self.device.capacity.lbprz)

    async def read(self, offset: int, length: int) -> bytes:
        """Read bytes."""
        return await self.device.read(offset, length)

    async def write(self, offset: int, data: BytesLike) -> object:
        """Write bytes."""
        return await self.device.write(offset, data)

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE."""
        await self.device.flush()

    async def discard(self, offset: int, length: int) -> object:
        """UNMAP the whole blocks of the range."""
        return await self.device.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """WRITE SAME of zeros, with UNMAP only on a thin LU when allowed."""
        await self.device.write_zeroes(offset, length,
                                       unmap=may_trim and self.device.capacity.lbpme)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Allocation from GET LBA STATUS; everything mapped if the LU is
        not thin or refuses the command."""
        if not self._lba_status or length <= 0:
            return [(length, True)]
        from .scsi import SCSICheckCondition  # only the iSCSI path needs it

        bs = self.block_size
        try:
            descriptors = await self.device.lun.get_lba_status(offset // bs)
        except SCSICheckCondition as exc:
            if exc.key == 0x5:  # ILLEGAL REQUEST: the LU lacks GET LBA STATUS
                self._lba_status = False
                return [(length, True)]
            raise
        end = offset + length
        out: list[tuple[int, bool]] = []
        pos = offset
        for d in descriptors:
            start = max(d.lba * bs, pos)
            stop = min((d.lba + d.blocks) * bs, end)
            if start > pos:
                out.append((start - pos, True))  # not described: assume mapped
            if stop > start:
                out.append((stop - start, d.status == 0))  # 0 = mapped (SBC-3 table 51)
                pos = stop
            if pos >= end:
                break
        return out or [(length, True)]
