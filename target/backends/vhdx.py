"""Microsoft VHDX images (fixed, dynamic, differencing), read and write.

Layout per [MS-VHDX] (structures in vhdx_format.py, the log in vhdx_log.py):
headers and region tables in the first megabyte, then the log, BAT and
metadata regions, then payload blocks (``block_size``, 1 MiB aligned) and,
for differencing disks, 1 MiB sector bitmap blocks. The BAT interleaves one
sector bitmap entry after every ``chunk_ratio`` payload entries.

Reading, per BAT state of the payload block (MS-VHDX 2.5.1.1):
fully present - the file; partially present (differencing only) - per
logical sector, the sector bitmap picks the file (bit set) or the parent;
not present / undefined - the parent (zeroes without one); zero / unmapped -
zeroes.

Writing and crash consistency (MS-VHDX 2.3): every metadata change (BAT
entries, sector bitmap pages) goes through the log. A write that needs a new
block puts its data in a fresh 1 MiB-aligned block at the end of the file
(or in one freed by discard), then commits: ``fdatasync`` (the data, and the
previous commit's in-place pages, are durable), one log entry with the
changed 4 KiB pages at the start of the log, ``fdatasync``, then the same
pages in place. A crash at any point leaves either the old mapping (the new
block is an unreferenced leak) or a valid log entry that replay applies.
The first write of a session gives the headers fresh FileWrite/DataWrite/Log
GUIDs; a clean close sets the log GUID back to zero (an empty log).

On open, a non-empty log is replayed: in place when opened read-write, in
memory when read-only (refused if the log rewrites payload data, which a
read-only open cannot overlay).

Differencing disks: the parent is found from the parent locator
(``relative_path``, then the file names of ``volume_path`` and
``absolute_win32_path`` next to the child) and opened through the registry,
so it may be of any format. ``parent_linkage`` must equal the parent's
DataWriteGuid (a VHDX parent) or its UUID (other formats that have one).
"""

from __future__ import annotations

import array
import os
import sys
import uuid
from collections.abc import Iterator

from .base import BackendError, Buffer, MediumError
from .mapped import RUN_DATA, RUN_PARENT, RUN_ZERO, MappedImage, Run, RunWriter, pread_exact, pwrite_all
from .raw import punch_hole
from .registry import ImageBackend, ImageInfo, align_up, cluster_pieces, open_backing, open_file
from .vhdx_create import create
from .vhdx_format import (
    BAT_GUID, HEADER_OFFSETS, LOG_SECTOR, METADATA_GUID, MiB, NAME, PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, REGION_OFFSETS,
    REGION_SIZE, SB_PRESENT, SIGNATURE, STATE_MASK, ZERO_GUID, Header, Meta, Region, bat_index,
    bitmap_index, current_header, locator_paths, parse_metadata, parse_regions, probe,
)
from .vhdx_log import build_entry, find_active

#: The registry's format interface (target/backends/registry.py).
__all__ = ["NAME", "VhdxImage", "create", "open", "probe"]

_BIG_ENDIAN = sys.byteorder == "big"
_PARENT_STATES = (PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED)


class VhdxImage(MappedImage):
    """An open VHDX image (see the module docstring)."""

    def __init__(self, path: str, *, read_only: bool, write_through: bool) -> None:
        super().__init__(path, 0, read_only=read_only, write_through=write_through, parent=None)
        self._fd = open_file(path, read_only=read_only, write_through=write_through)
        self._overlay: dict[int, bytes] = {}
        self._sb: dict[int, bytearray] = {}  # sector bitmap blocks by BAT index
        self._bits: dict[int, int] = {}  # per payload block, bit k = sector k
        self._free: list[int] = []  # block offsets freed by discard
        self._session = False
        self._log_seq = 1
        self.parent_path: str | None = None
        self.replayed = 0
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------

    def _bad(self, why: str) -> BackendError:
        return BackendError(f"{self.path}: damaged VHDX: {why}")

    def _read(self, off: int, n: int, what: str) -> bytes:
        """Read metadata, with pages of an in-memory log replay on top."""
        data = pread_exact(self._fd, n, off, self.path, what)
        if not self._overlay:
            return data
        buf = bytearray(data)
        first = off // LOG_SECTOR * LOG_SECTOR
        for page in range(first, off + n, LOG_SECTOR):
            img = self._overlay.get(page)
            if img is not None:
                lo, hi = max(page, off), min(page + LOG_SECTOR, off + n)
                buf[lo - off : hi - off] = img[lo - page : hi - page]
        return bytes(buf)

    def _load(self) -> None:
        fd, path = self._fd, self.path
        file_size = os.fstat(fd).st_size
        if file_size < 1 * MiB or pread_exact(fd, 8, 0, path, "file identifier") != SIGNATURE:
            raise BackendError(f"{path}: not a VHDX image (no 'vhdxfile' signature)")
        raws = (pread_exact(fd, 4096, HEADER_OFFSETS[0], path, "VHDX header 1"),
                pread_exact(fd, 4096, HEADER_OFFSETS[1], path, "VHDX header 2"))
        self._slot, self._hdr = current_header(path, raws)
        self._replay_log(file_size)
        file_size = os.fstat(fd).st_size
        regions: dict[uuid.UUID, Region] | None = None
        for at in REGION_OFFSETS:
            regions = parse_regions(self._read(at, REGION_SIZE, "VHDX region table"))
            if regions is not None:
                break
        if regions is None:
            raise self._bad("both region tables are invalid (bad signature or CRC-32C)")
        for g, r in regions.items():
            if r.required and g not in (BAT_GUID, METADATA_GUID):
                raise BackendError(f"{path}: VHDX has a required region {g} this reader does not know")
        bat_r, meta_r = regions.get(BAT_GUID), regions.get(METADATA_GUID)
        if bat_r is None or meta_r is None:
            raise self._bad("region table lacks the BAT or the metadata region")
        for what, r in (("BAT", bat_r), ("metadata", meta_r)):
            if r.offset < MiB or r.offset % MiB or r.offset + r.length > file_size:
                raise self._bad(f"{what} region at {r.offset} (+{r.length}) lies outside the file")
        meta = parse_metadata(path, self._read(meta_r.offset, meta_r.length, "VHDX metadata"))
        self._meta = meta
        self._size = meta.size
        self._bs = meta.block_size
        self._lss = meta.logical_sector
        self._cr = meta.chunk_ratio
        self._diff = meta.has_parent
        if bat_r.length < meta.bat_entries * 8:
            raise self._bad(f"BAT region has {bat_r.length // 8} entries, the disk needs {meta.bat_entries}")
        self._bat_off = bat_r.offset
        bat: array.array[int] = array.array("Q")
        bat.frombytes(self._read(bat_r.offset, align_up(bat_r.length, LOG_SECTOR), "VHDX BAT"))
        if _BIG_ENDIAN:
            bat.byteswap()
        self._bat = bat
        high = max(align_up(file_size, MiB), 4 * MiB)
        for blk in range(meta.payload_blocks):
            e = bat[bat_index(blk, self._cr)]
            if e & STATE_MASK in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                off = (e >> 20) * MiB
                if off < MiB:
                    raise self._bad(f"BAT entry of block {blk} points into the header area")
                high = max(high, off + self._bs)
                if self._overlay and any(off <= p < off + self._bs for p in self._overlay):
                    raise BackendError(f"{path}: VHDX log rewrites payload data; open it read-write to replay the log")
        self._eof = high
        if self._diff:
            self._open_parent()

    def _replay_log(self, file_size: int) -> None:
        hdr = self._hdr
        if hdr.log_guid == ZERO_GUID or hdr.log_length == 0:
            return
        replay = find_active(lambda o, n: os.pread(self._fd, n, o), hdr.log_offset, hdr.log_length,
                             hdr.log_guid)
        if replay is None:
            return
        if replay.flushed_file_offset > file_size:
            raise self._bad(f"log expects a file of at least {replay.flushed_file_offset} bytes, it has {file_size}")
        self.replayed = replay.entries
        self._log_seq = replay.last_seq + 1
        if self._read_only:
            for w in replay.writes:
                for p in range(w.offset, w.offset + w.length, LOG_SECTOR):
                    self._overlay[p] = w.data if w.data is not None else bytes(LOG_SECTOR)
            return
        for w in replay.writes:
            pwrite_all(self._fd, w.data if w.data is not None else bytes(w.length), w.offset, self.path)
        if file_size < replay.last_file_offset:
            os.ftruncate(self._fd, align_up(replay.last_file_offset, MiB))
        self._sync()
        self._write_header(Header(hdr.seq + 1, hdr.file_write, hdr.data_write, ZERO_GUID,
                                  hdr.log_length, hdr.log_offset))

    def _open_parent(self) -> None:
        loc = self._meta.locator
        candidates = locator_paths(self.path, loc)
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise BackendError(f"{self.path}: VHDX parent not found (tried {', '.join(candidates) or 'no locator paths'})")
        self.parent_path = found
        parent = open_backing(self.path, found, None)
        self.parent = parent
        linkage = loc.get("parent_linkage", "").strip("{}").lower()
        if not linkage or uuid.UUID(linkage) == ZERO_GUID:
            return
        ids: set[str] = set()
        if isinstance(parent, VhdxImage):
            ids.add(str(parent.data_write_guid))
            alt = loc.get("parent_linkage2", "").strip("{}").lower()
            if alt and str(parent.data_write_guid) == alt:
                return
        else:
            pid = parent.info().uuid if isinstance(parent, ImageBackend) else None
            if pid:
                ids.add(pid.lower())
        if ids and linkage not in ids:
            raise BackendError(
                f"{self.path}: parent {found} has changed since the differencing disk was made "
                f"(parent_linkage {{{linkage}}}, parent has {{{', '.join(sorted(ids))}}})"
            )

    # -- properties -----------------------------------------------------------

    @property
    def thin(self) -> bool:
        return not self._meta.leave_allocated

    @property
    def data_write_guid(self) -> uuid.UUID:
        """The DataWriteGuid of the current header (a child's parent_linkage)."""
        return self._hdr.data_write

    @property
    def logical_sector_size(self) -> int:
        """The virtual disk's logical sector size (512 or 4096)."""
        return self._lss

    def info(self) -> ImageInfo:
        m = self._meta
        kind = "differencing" if m.has_parent else "fixed" if m.leave_allocated else "dynamic"
        linkage = m.locator.get("parent_linkage", "").strip("{}").lower() if m.has_parent else None
        pfmt = None
        if isinstance(self.parent, ImageBackend):
            pfmt = self.parent.info().format
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=os.fstat(self._fd).st_blocks * 512 if self._fd >= 0 else 0,
            uuid=str(m.disk_id),
            parent_uuid=linkage or None,
            backing=self._backing_name() if m.has_parent else None,
            backing_format=pfmt,
            subformat=kind,
            extra={
                "block_size": str(self._bs),
                "logical_sector_size": str(self._lss),
                "physical_sector_size": str(m.physical_sector),
                "data_write_guid": str(self._hdr.data_write),
                "log_entries_replayed": str(self.replayed),
            },
        )

    def _backing_name(self) -> str | None:
        """The parent as stored: relative_path in POSIX form (Hyper-V writes
        ``.\\dir\\parent.vhdx``), else the path the parent was found at."""
        rel = self._meta.locator.get("relative_path")
        if rel:
            return os.path.normpath(rel.replace("\\", "/"))
        return self.parent_path

    # -- mapping --------------------------------------------------------------

    def _bitmap_block(self, blk: int) -> bytearray | None:
        """The sector bitmap block covering payload block ``blk`` (None when
        not allocated)."""
        idx = bitmap_index(blk, self._cr)
        sb = self._sb.get(idx)
        if sb is None:
            e = self._bat[idx]
            if e & STATE_MASK != SB_PRESENT:
                return None
            sb = bytearray(self._read((e >> 20) * MiB, MiB, "VHDX sector bitmap"))
            self._sb[idx] = sb
        return sb

    def _block_bits(self, blk: int) -> int:
        bits = self._bits.get(blk)
        if bits is None:
            sb = self._bitmap_block(blk)
            if sb is None:
                bits = 0
            else:
                per = self._bs // self._lss // 8
                at = (blk % self._cr) * per
                bits = int.from_bytes(sb[at : at + per], "little")
            self._bits[blk] = bits
        return bits

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        bs, lss, cr, bat, fd = self._bs, self._lss, self._cr, self._bat, self._fd
        parent_kind = RUN_PARENT if self.parent is not None else RUN_ZERO
        end = offset + length
        pos = offset
        while pos < end:
            blk, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            e = bat[blk + blk // cr]
            state = e & STATE_MASK
            if state == PAYLOAD_FULLY_PRESENT or (state == PAYLOAD_PARTIALLY_PRESENT and not self._diff):
                yield Run(n, RUN_DATA, fd, (e >> 20) * MiB + within)
            elif state == PAYLOAD_PARTIALLY_PRESENT:
                # Each logical sector's bit picks this file or the parent;
                # the run of equal bits is found without a per-sector loop.
                v = self._block_bits(blk) >> (within // lss)
                left = bs // lss - within // lss
                if v & 1:
                    inv = ~v & ((1 << left) - 1)
                    run = (inv & -inv).bit_length() - 1 if inv else left
                    kind = RUN_DATA
                else:
                    run = (v & -v).bit_length() - 1 if v else left
                    kind = parent_kind
                n = min(n, run * lss - within % lss)
                if kind == RUN_DATA:
                    yield Run(n, RUN_DATA, fd, (e >> 20) * MiB + within)
                else:
                    yield Run(n, kind)
            elif state in _PARENT_STATES:
                yield Run(n, parent_kind)
            else:
                yield Run(n, RUN_ZERO)
            pos += n

    # -- writing ----------------------------------------------------------------

    def _sync(self) -> None:
        """fdatasync, an error as a MediumError (SBC-3: WRITE FAULT)."""
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise MediumError(f"{self.path}: flush failed: {e.strerror or e}") from None

    def _write_header(self, hdr: Header) -> None:
        """Write ``hdr`` into the slot that is not current and make it
        current (MS-VHDX 2.2.2.1: the sequence number decides)."""
        slot = 1 - self._slot
        pwrite_all(self._fd, hdr.pack(), HEADER_OFFSETS[slot], self.path)
        self._sync()
        self._slot, self._hdr = slot, hdr

    def _begin_session(self) -> None:
        """Before the first change: fresh FileWrite/DataWrite GUIDs and a
        fresh log GUID (so no stale entry of an earlier session is valid),
        written to both header slots."""
        if self._session:
            return
        if self._hdr.log_length < 2 * LOG_SECTOR:
            raise BackendError(f"{self.path}: VHDX has no log to write metadata through; not writable")
        h = self._hdr
        new = Header(h.seq + 1, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), h.log_length, h.log_offset)
        self._write_header(new)
        self._write_header(Header(new.seq + 1, new.file_write, new.data_write, new.log_guid,
                                  new.log_length, new.log_offset))
        self._session = True

    def _commit(self, pages: dict[int, bytes]) -> None:
        """Make metadata ``pages`` (file offset -> 4 KiB) durable through the
        log, then write them in place (see the module docstring)."""
        self._begin_session()
        hdr = self._hdr
        size = os.fstat(self._fd).st_size
        items = sorted(pages.items())
        per_entry = hdr.log_length // LOG_SECTOR - 2
        self._sync()  # new data, and the last commit's pages in place
        for i in range(0, len(items), per_entry):
            group = items[i : i + per_entry]
            if i:
                self._sync()
            entry = build_entry(self._log_seq, hdr.log_guid, group, tail=0,
                                flushed_file_offset=size, last_file_offset=size)
            self._log_seq += 1
            pwrite_all(self._fd, entry, hdr.log_offset, self.path)
            self._sync()
            for off, page in group:
                pwrite_all(self._fd, page, off, self.path)
        if self._write_through:
            self._sync()

    def _bat_pages(self, idxs: set[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        per = LOG_SECTOR // 8
        for page in {i // per for i in idxs}:
            part = self._bat[page * per : (page + 1) * per]
            if _BIG_ENDIAN:
                part.byteswap()
            out[self._bat_off + page * LOG_SECTOR] = part.tobytes()
        return out

    def _alloc(self, length: int) -> int:
        """A 1 MiB-aligned place for a new block (a freed one if any)."""
        if length == self._bs and self._free:
            return self._free.pop()
        off = self._eof
        self._eof = off + align_up(length, MiB)
        try:
            os.ftruncate(self._fd, self._eof)  # reads of the new block see zeroes
        except OSError as e:
            raise MediumError(f"{self.path}: cannot grow the file: {e.strerror or e}") from None
        return off

    def _set_bits(self, blk: int, within: int, n: int, bat_changes: set[int], pages: dict[int, bytes],
                  *, fresh: bool = False) -> None:
        """Mark the logical sectors [within, within+n) of ``blk`` present;
        ``fresh`` (a block just allocated): every other bit is cleared, so
        stale bits of an earlier life of the block cannot expose it."""
        lss = self._lss
        s0, s1 = within // lss, -(-(within + n) // lss)
        mask = ((1 << (s1 - s0)) - 1) << s0
        bits = 0 if fresh else self._block_bits(blk)
        if bits & mask == mask and not fresh:
            return
        idx = bitmap_index(blk, self._cr)
        sb = self._bitmap_block(blk)
        if sb is None:
            off = self._alloc(MiB)
            self._bat[idx] = SB_PRESENT | (off // MiB) << 20
            bat_changes.add(idx)
            sb = self._sb[idx] = bytearray(MiB)
        bits |= mask
        self._bits[blk] = bits
        per = self._bs // lss // 8
        at = (blk % self._cr) * per
        sb[at : at + per] = bits.to_bytes(per, "little")
        base = (self._bat[idx] >> 20) * MiB
        b0, b1 = (at, at + per - 1) if fresh else (at + s0 // 8, at + (s1 - 1) // 8)
        for p in range(b0 // LOG_SECTOR, b1 // LOG_SECTOR + 1):
            pages[base + p * LOG_SECTOR] = bytes(sb[p * LOG_SECTOR : (p + 1) * LOG_SECTOR])

    def write(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        lss = self._lss
        if self._diff and (offset % lss or len(mv) % lss):
            # The sector bitmap has logical-sector granularity: widen.
            start = offset // lss * lss
            stop = min(align_up(offset + len(mv), lss), self._size)
            buf = bytearray(self.read(start, stop - start))
            buf[offset - start : offset - start + len(mv)] = mv
            offset, mv = start, memoryview(buf)
        bs, cr, fd = self._bs, self._cr, self._fd
        bat_changes: set[int] = set()
        pages: dict[int, bytes] = {}
        runs = RunWriter(lambda pos, at, n: pwrite_all(fd, mv[at : at + n], pos, self.path))
        for blk, within, n, at in cluster_pieces(offset, len(mv), bs):
            idx = blk + blk // cr
            e = self._bat[idx]
            state = e & STATE_MASK
            if state == PAYLOAD_FULLY_PRESENT or (state == PAYLOAD_PARTIALLY_PRESENT and not self._diff):
                runs.add((e >> 20) * MiB + within, at, n)
                continue
            if state == PAYLOAD_PARTIALLY_PRESENT:
                runs.add((e >> 20) * MiB + within, at, n)
                self._set_bits(blk, within, n, bat_changes, pages)
                continue
            runs.flush()
            new = self._alloc(bs)
            pwrite_all(fd, mv[at : at + n], new + within, self.path)
            whole = n == min(bs, self._size - blk * bs)
            if self._diff and state in _PARENT_STATES and self.parent is not None and not whole:
                self._bat[idx] = PAYLOAD_PARTIALLY_PRESENT | (new // MiB) << 20
                self._set_bits(blk, within, n, bat_changes, pages, fresh=True)
            else:
                # The rest of the block reads as zeroes, which is what a
                # not-present block of a dynamic disk and a zero block read.
                self._bat[idx] = PAYLOAD_FULLY_PRESENT | (new // MiB) << 20
            bat_changes.add(idx)
        runs.flush()
        if bat_changes or pages:
            pages.update(self._bat_pages(bat_changes))
            self._commit(pages)
        else:
            self._after_write(fd)

    # -- discard ---------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if self.thin:
            self._zero_range(offset, length)

    def _zero_range(self, offset: int, length: int) -> None:
        """Whole blocks become ZERO (differencing: reads zeroes, not the
        parent) or NOT PRESENT, in one log commit; their space is punched
        and reused. Partial blocks that do not read as zeroes get zeroes."""
        self._check_write(offset, length)
        bs, cr = self._bs, self._cr
        changes: set[int] = set()
        freed: list[int] = []
        for blk, within, n, at in cluster_pieces(offset, length, bs):
            idx = blk + blk // cr
            e = self._bat[idx]
            state = e & STATE_MASK
            if n == min(bs, self._size - blk * bs):
                target = PAYLOAD_ZERO if self._diff else PAYLOAD_NOT_PRESENT
                if state == target:
                    continue
                if state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                    freed.append((e >> 20) * MiB)
                self._bat[idx] = target
                self._bits.pop(blk, None)
                changes.add(idx)
            elif state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT) or (
                    self._diff and state in _PARENT_STATES and self.parent is not None):
                self.write(offset + at, bytes(n))
        if changes:
            self._commit(self._bat_pages(changes))
        for off in freed:
            # Reused only when the hole reads as zeroes: a partial write
            # into a reused block must not expose old data.
            if punch_hole(self._fd, off, bs):
                self._free.append(off)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.thin:
            self._zero_range(offset, length)
        else:
            super().write_zeroes(offset, length)

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        try:
            if self._session and not self._closed and self._fd >= 0:
                # Everything is in place: the log is empty from now on.
                self._sync()
                h = self._hdr
                self._write_header(Header(h.seq + 1, h.file_write, h.data_write, ZERO_GUID,
                                          h.log_length, h.log_offset))
                self._session = False
        finally:
            super().close()


def open(path: str, *, read_only: bool, write_through: bool = False) -> VhdxImage:
    """Open a VHDX image (and the parent chain of a differencing disk)."""
    return VhdxImage(path, read_only=read_only, write_through=write_through)


def _meta_of(img: VhdxImage) -> Meta:
    """The parsed metadata (for tests and ``image check``)."""
    return img._meta
