"""Microsoft VHD images (fixed, dynamic, differencing), read and write.

Layout per Microsoft's "Virtual Hard Disk Image Format Specification"
(v1.0, 2006); every field is big-endian.

* Hard disk footer (512 bytes) at the end of the file - and, for dynamic and
  differencing disks, a copy at offset 0: cookie "conectix", features,
  version 1.0, data offset (the dynamic header; all ones for fixed disks),
  time stamp (seconds since 2000-01-01 UTC), creator application/version/
  host OS, original and current size, CHS geometry, disk type (2 fixed,
  3 dynamic, 4 differencing), checksum, unique id, saved state.
* Dynamic disk header (1024 bytes): cookie "cxsparse", table offset, version,
  max table entries, block size (2 MiB), checksum, and for differencing disks
  the parent's unique id, time stamp, UTF-16BE name and eight parent locator
  entries (platform code, data space, data length, data offset).
* Block allocation table (BAT): one u32 per block, the sector of the block's
  sector bitmap (followed by the block data), 0xFFFFFFFF when unallocated.
* A checksum is the one's complement of the byte sum of the structure with
  the checksum field taken as zero.

Choices (documented because the spec leaves them open):

* The size is the footer's current size (rounded down to a sector). qemu by
  default uses the CHS geometry for images of unknown creators, so ``create``
  rounds the size up to a CHS-representable one like qemu and Virtual PC do,
  unless ``force_size=on`` (then qemu needs ``force_size_calc=current_size``).
* Dynamic disks: new blocks are zero-filled with every bitmap bit set (as
  qemu does); the bitmap is only consulted for differencing disks, where a
  clear bit means "read the parent" and a write sets the bits it covers.
* Parent of a differencing disk, first that exists of: locator W2ru
  (relative Windows path, UTF-16LE), W2ku (absolute path, UTF-16LE), MacX
  (file URL, UTF-8), then the parent unicode name in the child's directory.
  Its footer unique id must equal the parent id recorded in the child (else
  refused); a differing parent time stamp is only reported in ``info`` (any
  copy of the file changes it). ``create`` writes W2ru and W2ku locators.
* A new block goes where the footer was; the footer is first written at the
  new end of file, then the block's bitmap and data, then the BAT entry, so
  a crash leaves at worst an unused block, never a footer-less file.
* Discard (dynamic disks only) unmaps whole blocks and moves the physically
  last block into the hole, shrinking the file; partial blocks get zeroes.
"""

from __future__ import annotations

import array
import os
import sys
from collections.abc import Iterator

from .base import SECTOR, BackendError, Buffer, MediumError
from .registry import ImageBackend, ImageInfo, align_up, cluster_pieces, open_backing, open_file
from .mapped import (
    RUN_DATA,
    RUN_PARENT,
    RUN_ZERO,
    MappedImage,
    Run,
    pread_exact,
    pwrite_all,
)
from .vhd_format import (
    BAT_FREE, COOKIE, Dyn, Footer, NAME, TYPE_DIFF, TYPE_DYNAMIC, TYPE_FIXED, TYPE_NAMES, U32,
    VHD_EPOCH, locator_paths, parse_dyn, parse_footer, probe, vhd_time,
)
from .vhd_create import create

#: The registry's format interface (target/backends/registry.py).
__all__ = ["NAME", "VhdImage", "create", "open", "probe"]


class VhdImage(MappedImage):
    """An open VHD image (see the module docstring)."""

    _mmap_reads = True  # never shrinks or moves data while open (mapped.py)

    def __init__(
        self,
        path: str,
        fd: int,
        footer: Footer,
        footer_raw: bytes,
        footer_at: int,
        dyn: Dyn | None,
        bat: array.array[int] | None,
        *,
        read_only: bool,
        write_through: bool,
        parent: ImageBackend | None,
        parent_path: str | None,
        parent_ts_ok: bool,
    ) -> None:
        size = footer.current_size // SECTOR * SECTOR
        super().__init__(path, size, read_only=read_only, write_through=write_through, parent=parent)
        self._fd = fd
        self._footer = footer
        self._footer_raw = footer_raw
        self._footer_at = footer_at
        self._dyn = dyn
        self._bat = bat if bat is not None else array.array("I")
        self._bs = dyn.block_size if dyn else 0
        self._bitmap_size = align_up(self._bs // SECTOR // 8, SECTOR) if dyn else 0
        self._nbits = self._bitmap_size * 8
        self._bitmaps: dict[int, int] = {}
        self._parent_path = parent_path
        self._parent_ts_ok = parent_ts_ok
        self._file_size = os.fstat(fd).st_size

    @property
    def thin(self) -> bool:
        return self._footer.disk_type == TYPE_DYNAMIC

    def info(self) -> ImageInfo:
        f = self._footer
        c, h, s = f.geometry
        extra = {
            "creator": f.creator.decode("latin-1"),
            "geometry": f"{c}/{h}/{s}",
            "timestamp": str(f.timestamp + VHD_EPOCH),
        }
        if self._dyn is not None:
            extra["block_size"] = str(self._bs)
        diff = f.disk_type == TYPE_DIFF and self._dyn is not None
        if diff:
            extra["parent_name"] = self._dyn.parent_name if self._dyn else ""
            extra["parent_timestamp_matches"] = "yes" if self._parent_ts_ok else "no"
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=os.fstat(self._fd).st_blocks * 512,
            uuid=str(f.uuid),
            parent_uuid=str(self._dyn.parent_uuid) if diff and self._dyn else None,
            backing=self._parent_path,
            backing_format=NAME if diff else None,
            subformat=TYPE_NAMES[f.disk_type],
            extra=extra,
        )

    # -- mapping ------------------------------------------------------------
    def _bitmap(self, blk: int, entry: int) -> int:
        bits = self._bitmaps.get(blk)
        if bits is None:
            raw = pread_exact(self._fd, self._bitmap_size, entry * SECTOR, self.path, "VHD sector bitmap")
            bits = int.from_bytes(raw, "big")
            self._bitmaps[blk] = bits
        return bits

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        if self._dyn is None:
            yield Run(length, RUN_DATA, self._fd, offset)
            return
        bs = self._bs
        diff = self._footer.disk_type == TYPE_DIFF
        free_kind = RUN_PARENT if diff and self.parent is not None else RUN_ZERO
        nb = self._nbits
        end = offset + length
        pos = offset
        while pos < end:
            blk, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            e = self._bat[blk]
            if e == BAT_FREE:
                yield Run(n, free_kind)
            elif not diff:
                yield Run(n, RUN_DATA, self._fd, e * SECTOR + self._bitmap_size + within)
            else:
                # Differencing: each sector's bitmap bit picks child or
                # parent; find the run of equal bits with integer arithmetic
                # (no per-sector loop).
                bits = self._bitmap(blk, e)
                s = within // SECTOR
                left = nb - s
                v = bits & ((1 << left) - 1)
                if (v >> (left - 1)) & 1:
                    inv = ~v & ((1 << left) - 1)
                    run = left if inv == 0 else left - inv.bit_length()
                    kind = RUN_DATA
                else:
                    run = left if v == 0 else left - v.bit_length()
                    kind = free_kind
                n = min(n, run * SECTOR - within % SECTOR)
                if kind == RUN_DATA:
                    yield Run(n, RUN_DATA, self._fd, e * SECTOR + self._bitmap_size + within)
                else:
                    yield Run(n, kind)
            pos += n

    # -- writes -------------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        if self._dyn is None:
            pwrite_all(self._fd, mv, offset, self.path)
            self._after_write(self._fd)
            return
        if self._footer.disk_type == TYPE_DIFF and (offset % SECTOR or len(mv) % SECTOR):
            # The bitmap has sector granularity: widen to whole sectors.
            start = offset // SECTOR * SECTOR
            stop = min(align_up(offset + len(mv), SECTOR), self._size)
            buf = bytearray(self.read(start, stop - start))
            buf[offset - start : offset - start + len(mv)] = mv
            offset, mv = start, memoryview(buf)
        for blk, within, n, at in cluster_pieces(offset, len(mv), self._bs):
            piece = mv[at : at + n]
            e = self._bat[blk]
            if e == BAT_FREE:
                self._allocate(blk, within, piece)
            else:
                pwrite_all(self._fd, piece, e * SECTOR + self._bitmap_size + within, self.path)
                if self._footer.disk_type == TYPE_DIFF:
                    self._set_bits(blk, e, within, n)
        self._after_write(self._fd)

    def _bits_for(self, within: int, n: int) -> int:
        s0 = within // SECTOR
        s1 = -(-(within + n) // SECTOR)
        return ((1 << (s1 - s0)) - 1) << (self._nbits - s1)

    def _set_bits(self, blk: int, entry: int, within: int, n: int) -> None:
        mask = self._bits_for(within, n)
        bits = self._bitmap(blk, entry)
        if bits & mask == mask:
            return
        bits |= mask
        if self._write_through:
            os.fdatasync(self._fd)  # the data before the bits that expose it
        pwrite_all(self._fd, bits.to_bytes(self._bitmap_size, "big"), entry * SECTOR, self.path)
        self._bitmaps[blk] = bits

    def _allocate(self, blk: int, within: int, piece: memoryview) -> None:
        assert self._dyn is not None
        new_off = self._footer_at
        total = self._bitmap_size + self._bs
        if (new_off + total) // SECTOR >= BAT_FREE:
            raise MediumError(f"{self.path}: VHD is full: block offset beyond the 32-bit BAT range")
        if self._footer.disk_type == TYPE_DIFF:
            bits = self._bits_for(within, len(piece))
        else:
            bits = (1 << self._nbits) - 1
        bitmap = bits.to_bytes(self._bitmap_size, "big")
        # 1. The footer at the new end of file: the file stays valid.
        pwrite_all(self._fd, self._footer_raw, new_off + total, self.path)
        # 2. Bitmap and data where the footer was. Past the old end of file
        #    the extension reads as zeroes already.
        if new_off + SECTOR >= self._file_size:
            pwrite_all(self._fd, bitmap, new_off, self.path)
            pwrite_all(self._fd, piece, new_off + self._bitmap_size + within, self.path)
        else:
            buf = bytearray(total)
            buf[: self._bitmap_size] = bitmap
            at = self._bitmap_size + within
            buf[at : at + len(piece)] = piece
            pwrite_all(self._fd, buf, new_off, self.path)
        self._file_size = max(self._file_size, new_off + total + SECTOR)
        self._footer_at = new_off + total
        if self._write_through:
            os.fdatasync(self._fd)
        # 3. The BAT entry last.
        self._set_bat(blk, new_off // SECTOR)
        self._bitmaps[blk] = bits

    def _set_bat(self, blk: int, value: int) -> None:
        assert self._dyn is not None
        self._bat[blk] = value
        pwrite_all(self._fd, U32.pack(value), self._dyn.table_offset + 4 * blk, self.path)

    # -- discard / zeroes (MappedImage._zero_range; dynamic disks only) -------
    def _drop_block(self, blk: int) -> None:
        if self._bat[blk] != BAT_FREE:
            self._unmap_block(blk)

    def _block_reads_zero(self, blk: int) -> bool:
        return self._bat[blk] == BAT_FREE

    def _unmap_block(self, blk: int) -> None:
        e = self._bat[blk]
        self._set_bat(blk, BAT_FREE)
        self._bitmaps.pop(blk, None)
        total = self._bitmap_size + self._bs
        last = max(filter(BAT_FREE.__gt__, self._bat), default=-1)
        last = max(last, e)  # the freed block itself was the last one
        if last * SECTOR + total != self._footer_at:
            return  # not our dense layout: leave the hole (space leaks)
        if last != e:
            mover = self._bat.index(last)
            block = pread_exact(self._fd, total, last * SECTOR, self.path, "VHD block")
            pwrite_all(self._fd, block, e * SECTOR, self.path)
            if self._write_through:
                os.fdatasync(self._fd)
            self._set_bat(mover, e)
            self._bitmaps.pop(mover, None)
        new_end = last * SECTOR
        pwrite_all(self._fd, self._footer_raw, new_end, self.path)
        if self._write_through:
            os.fdatasync(self._fd)
        os.ftruncate(self._fd, new_end + SECTOR)
        self._footer_at = new_end
        self._file_size = new_end + SECTOR


def open(path: str, *, read_only: bool, write_through: bool = False) -> VhdImage:
    """Open a VHD image (and the parent chain of a differencing disk)."""
    fd = open_file(path, read_only=read_only)
    parent: ImageBackend | None = None
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 512:
            raise BackendError(f"{path}: not a VHD image: file is only {file_size} bytes")
        footer_at = file_size - 512
        raw = pread_exact(fd, 512, footer_at, path, "VHD footer")
        try:
            footer = parse_footer(path, raw, "at the end of the file")
        except BackendError:
            # The copy at offset 0 of a dynamic disk recovers a lost footer
            # (e.g. the file was truncated); new blocks go after the data.
            head = pread_exact(fd, 512, 0, path, "VHD footer copy")
            if head[:8] != COOKIE:
                raise
            footer = parse_footer(path, head, "at offset 0")
            if footer.disk_type == TYPE_FIXED:
                raise
            raw = head
            footer_at = align_up(file_size, SECTOR)
        if footer.current_size < SECTOR:
            raise BackendError(f"{path}: damaged VHD footer: current size {footer.current_size}")
        dyn: Dyn | None = None
        bat: array.array[int] | None = None
        parent_path: str | None = None
        ts_ok = True
        if footer.disk_type == TYPE_FIXED:
            if footer.current_size > footer_at:
                raise BackendError(
                    f"{path}: truncated fixed VHD: size {footer.current_size} but only {footer_at} data bytes"
                )
        else:
            if footer.data_offset % SECTOR or footer.data_offset + 1024 > file_size:
                raise BackendError(f"{path}: damaged VHD footer: dynamic header offset {footer.data_offset}")
            dyn = parse_dyn(path, fd, footer.data_offset, file_size)
            blocks = -(-footer.current_size // dyn.block_size)
            if dyn.max_entries < blocks:
                raise BackendError(
                    f"{path}: damaged VHD: BAT has {dyn.max_entries} entries, size needs {blocks}"
                )
            bat = array.array("I")
            bat.frombytes(pread_exact(fd, 4 * dyn.max_entries, dyn.table_offset, path, "VHD BAT"))
            if sys.byteorder == "little":
                bat.byteswap()
            top = max(filter(BAT_FREE.__gt__, bat), default=-1)
            bitmap_size = align_up(dyn.block_size // SECTOR // 8, SECTOR)
            if top >= 0 and top * SECTOR + bitmap_size + dyn.block_size > footer_at:
                raise BackendError(
                    f"{path}: truncated VHD: block at sector {top} runs past the footer at {footer_at}"
                )
            if footer.disk_type == TYPE_DIFF:
                candidates = locator_paths(path, dyn)
                found = next((c for c in candidates if os.path.exists(c)), None)
                if found is None:
                    raise BackendError(
                        f"{path}: parent {dyn.parent_name!r} {{{dyn.parent_uuid}}} not found "
                        f"(tried {', '.join(candidates) or 'no locators'})"
                    )
                parent_path = found
                parent = open_backing(path, found, None)
                pinfo = parent.info()
                if pinfo.uuid != str(dyn.parent_uuid):
                    raise BackendError(
                        f"{path}: parent {found} has id {{{pinfo.uuid}}}, expected {{{dyn.parent_uuid}}}"
                    )
                if parent.size != footer.current_size:
                    raise BackendError(
                        f"{path}: parent {found} has size {parent.size}, differencing disk {footer.current_size}"
                    )
                ts_ok = vhd_time(os.stat(found).st_mtime) == dyn.parent_ts
        return VhdImage(
            path, fd, footer, bytes(raw), footer_at, dyn, bat, read_only=read_only,
            write_through=write_through, parent=parent, parent_path=parent_path, parent_ts_ok=ts_ok,
        )
    except BaseException:
        os.close(fd)
        if parent is not None:
            parent.close()
        raise
