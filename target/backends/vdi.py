"""VirtualBox VDI images (fixed, dynamic and differencing), read and write.

It builds on :class:`~target.backends.mapped.MappedImage`, the block-mapped
engine every image format shares.

VDI layout (VirtualBox "VDI 1.1", little-endian; the same structure qemu's
docs and block/vdi.c describe):

=========  ====  ==========================================================
offset     size  field
=========  ====  ==========================================================
0x000      64    banner text ("<<< Oracle VM VirtualBox Disk Image >>>\\n")
0x040      4     signature 0xBEDA107F
0x044      4     version (0x00010001 = 1.1)
0x048      4     header size (0x180, or 0x190 with the LCHS geometry)
0x04C      4     image type: 1 dynamic, 2 fixed, 3 undo, 4 differencing
0x050      4     image flags
0x054      256   comment
0x154      4     block map offset
0x158      4     data offset
0x15C      16    legacy geometry (cylinders, heads, sectors, sector size)
0x16C      4     unused
0x170      8     disk size in bytes
0x178      4     block size (1 MiB)
0x17C      4     block extra (bytes of per-block data before each block)
0x180      4     blocks in image
0x184      4     blocks allocated
0x188      16    create UUID      (RTUUID: little-endian GUID layout)
0x198      16    modification UUID (changes on the first write of a session)
0x1A8      16    link UUID         (the parent's create UUID)
0x1B8      16    parent modification UUID (the parent's modification UUID
                 when this child was made)
=========  ====  ==========================================================

The block map has one little-endian u32 per block: the physical block index
(data at ``data offset + index * (block size + extra) + extra``), or
0xFFFFFFFF (never allocated: reads fall through to the parent, or zeroes) or
0xFFFFFFFE (discarded: reads as zeroes, never from the parent).

Finding a differencing image's parent: VirtualBox resolves the link UUID
through its media registry, which we do not have. Our rule, in order:

1. a sidecar file ``<child>.parent`` whose first line is the parent's path
   (relative paths resolve against the child's directory); ``create`` with a
   backing file writes it;
2. otherwise every ``*.vdi`` file in the child's directory whose create UUID
   equals the child's link UUID (exactly one must match).

The parent must be a VDI whose modification UUID still equals the child's
parent modification UUID; otherwise the parent was written after the child
was made, the child's view of the disk is no longer valid, and we refuse.

Discard (what VirtualBox's VDI backend does): a whole discarded block is
marked 0xFFFFFFFE and the physically last block is moved into its place, so
the file shrinks and the allocated blocks stay dense (index < blocks
allocated, which qemu's allocator and ``qemu-img check`` rely on). Partial
blocks are written with zeroes.
"""

from __future__ import annotations

import array
import builtins
import os
import struct
import sys
import uuid
from collections.abc import Iterator
from typing import NamedTuple

from .base import SECTOR, BackendError, Buffer, MediumError
from .mapped import (
    RUN_DATA,
    RUN_PARENT,
    RUN_ZERO,
    MappedImage,
    Run,
    RunWriter,
    pread_exact,
    pwrite_all,
)
from .registry import (
    CreateRequest,
    ImageBackend,
    ImageInfo,
    align_up,
    cluster_pieces,
    create_file,
    image_creator,
    open_backing,
    open_file,
    parent_for_create,
    resolve_backing,
)

__all__ = [
    "BLOCK_FREE",
    "BLOCK_ZERO",
    "DEFAULT_BLOCK",
    "NAME",
    "SIGNATURE",
    "TYPE_DIFF",
    "TYPE_DYNAMIC",
    "TYPE_FIXED",
    "TYPE_UNDO",
    "VERSION_1_1",
    "VdiImage",
    "create",
    "open",
    "probe",
]

NAME = "vdi"

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_FIXED = 2
TYPE_UNDO = 3
TYPE_DIFF = 4
_TYPE_NAMES = {TYPE_DYNAMIC: "dynamic", TYPE_FIXED: "fixed", TYPE_UNDO: "undo", TYPE_DIFF: "differencing"}

BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE
DEFAULT_BLOCK = 1 << 20
_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

_HDR = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s")
assert _HDR.size == 0x1C8
_U32 = struct.Struct("<I")
_OFF_ALLOCATED = 0x184
_OFF_MODIFY_UUID = 0x198
# Big enough that the block map can never need more memory than we would
# agree to allocate (4 bytes per block): 0x3FFFFFFF blocks as qemu allows.
_MAX_BLOCKS = 0x3FFFFFFF


class _Header(NamedTuple):
    image_type: int
    flags: int
    comment: bytes
    off_bmap: int
    off_data: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks: int
    allocated: int
    uuid_create: uuid.UUID
    uuid_modify: uuid.UUID
    uuid_link: uuid.UUID
    uuid_parent_modify: uuid.UUID


def probe(head: bytes, path: str) -> bool:
    """True when ``head`` starts with a VDI pre-header (signature at 0x40)."""
    return len(head) >= 0x48 and _U32.unpack_from(head, 0x40)[0] == SIGNATURE


def _parse_header(path: str, raw: bytes, file_size: int) -> _Header:
    if len(raw) < _HDR.size:
        raise BackendError(f"{path}: not a VDI image: file is only {len(raw)} bytes")
    (
        _text, sig, version, hsize, itype, flags, comment, off_bmap, off_data,
        _cyl, _heads, _secs, sector_size, _unused, disk_size, block_size,
        extra, blocks, allocated, u_create, u_modify, u_link, u_pmod,
    ) = _HDR.unpack_from(raw)
    if sig != SIGNATURE:
        raise BackendError(f"{path}: not a VDI image: signature {sig:#010x}, expected {SIGNATURE:#010x}")
    if version >> 16 != 1:
        raise BackendError(
            f"{path}: unsupported VDI version {version >> 16}.{version & 0xFFFF} (only 1.x is supported)"
        )
    if hsize < 0x180:
        raise BackendError(f"{path}: damaged VDI header: header size {hsize:#x} is smaller than 0x180")
    if itype not in (TYPE_DYNAMIC, TYPE_FIXED, TYPE_DIFF):
        what = _TYPE_NAMES.get(itype, f"type {itype}")
        raise BackendError(f"{path}: unsupported VDI image type {what} (dynamic, fixed, differencing only)")
    if sector_size not in (0, SECTOR):
        raise BackendError(f"{path}: unsupported VDI sector size {sector_size} (only 512)")
    if block_size < SECTOR or block_size & (block_size - 1) or block_size > 1 << 30:
        raise BackendError(f"{path}: damaged VDI header: block size {block_size} is not a power of two >= 512")
    if extra % SECTOR or extra > block_size:
        raise BackendError(f"{path}: unsupported VDI block extra {extra} (must be a multiple of 512)")
    if off_bmap % SECTOR or off_data % SECTOR or off_bmap < 0x200:
        raise BackendError(
            f"{path}: damaged VDI header: block map offset {off_bmap:#x} / data offset {off_data:#x} not sector aligned"
        )
    if blocks > _MAX_BLOCKS or disk_size > blocks * block_size:
        raise BackendError(
            f"{path}: damaged VDI header: disk size {disk_size} needs more than {blocks} blocks of {block_size}"
        )
    if off_bmap + 4 * blocks > off_data and blocks:
        raise BackendError(f"{path}: damaged VDI header: block map overlaps the data area")
    if off_bmap + 4 * blocks > file_size:
        raise BackendError(f"{path}: truncated VDI image: block map ends past the end of the file ({file_size})")
    if allocated > blocks:
        raise BackendError(f"{path}: damaged VDI header: {allocated} blocks allocated of {blocks}")
    return _Header(
        itype, flags, comment, off_bmap, off_data, disk_size, block_size, extra, blocks, allocated,
        uuid.UUID(bytes_le=u_create), uuid.UUID(bytes_le=u_modify),
        uuid.UUID(bytes_le=u_link), uuid.UUID(bytes_le=u_pmod),
    )


def _read_header(path: str) -> _Header | None:
    """The header of a candidate parent file, or None when it is no VDI."""
    try:
        with builtins.open(path, "rb") as f:
            raw = f.read(0x200)
            size = os.fstat(f.fileno()).st_size
        return _parse_header(path, raw, size)
    except (OSError, BackendError):
        return None


def _find_parent(path: str, hdr: _Header) -> str:
    """Apply the parent-finding rule described in the module docstring."""
    sidecar = path + ".parent"
    if os.path.exists(sidecar):
        with builtins.open(sidecar, encoding="utf-8") as f:
            line = f.readline().strip()
        if not line:
            raise BackendError(f"{path}: sidecar {sidecar} is empty (expected the parent's path)")
        return resolve_backing(path, line)
    directory = os.path.dirname(os.path.abspath(path))
    me = os.path.realpath(path)
    found: list[str] = []
    for name in sorted(os.listdir(directory)):
        cand = os.path.join(directory, name)
        if not name.lower().endswith(".vdi") or os.path.realpath(cand) == me:
            continue
        other = _read_header(cand)
        if other is not None and other.uuid_create == hdr.uuid_link:
            found.append(cand)
    if not found:
        raise BackendError(
            f"{path}: differencing VDI needs parent {{{hdr.uuid_link}}}: no {os.path.basename(sidecar)} "
            f"sidecar and no .vdi with that UUID in {directory}"
        )
    if len(found) > 1:
        raise BackendError(
            f"{path}: parent {{{hdr.uuid_link}}} is ambiguous: {', '.join(found)} (write a .parent sidecar)"
        )
    return found[0]


class VdiImage(MappedImage):
    """An open VDI image (see the module docstring for the layout)."""

    def __init__(
        self,
        path: str,
        fd: int,
        hdr: _Header,
        bmap: array.array[int],
        *,
        read_only: bool,
        write_through: bool,
        parent: ImageBackend | None,
        parent_path: str | None,
    ) -> None:
        super().__init__(path, hdr.disk_size, read_only=read_only, write_through=write_through, parent=parent)
        self._fd = fd
        self._hdr = hdr
        self._bmap = bmap
        self._bs = hdr.block_size
        self._stride = hdr.block_size + hdr.block_extra
        self._parent_path = parent_path
        self._modify = hdr.uuid_modify
        self._modified = False
        self._file_size = os.fstat(fd).st_size
        top = max(filter(BLOCK_ZERO.__gt__, bmap), default=-1)
        # The next physical index: never below an index in use, even when
        # the header's count is stale after a crash (no double mapping).
        self._allocated = max(hdr.allocated, top + 1)
        if top >= 0 and hdr.off_data + (top + 1) * self._stride > self._file_size:
            raise BackendError(
                f"{path}: truncated VDI image: block {top} ends at {hdr.off_data + (top + 1) * self._stride}, "
                f"file has {self._file_size} bytes"
            )

    # -- properties ------------------------------------------------------
    @property
    def thin(self) -> bool:
        return self._hdr.image_type != TYPE_FIXED

    def info(self) -> ImageInfo:
        hdr = self._hdr
        diff = hdr.image_type == TYPE_DIFF
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=os.fstat(self._fd).st_blocks * 512,
            uuid=str(hdr.uuid_create),
            parent_uuid=str(hdr.uuid_link) if diff else None,
            backing=self._parent_path,
            backing_format=NAME if diff else None,
            subformat=_TYPE_NAMES[hdr.image_type],
            extra={
                "modify_uuid": str(self._modify),
                "parent_modify_uuid": str(hdr.uuid_parent_modify) if diff else "",
                "block_size": str(self._bs),
                "blocks_allocated": str(self._allocated),
            },
        )

    # -- mapping ---------------------------------------------------------
    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        # The block walk of cluster_pieces, inlined: this is the read path.
        bs = self._bs
        bmap = self._bmap
        base = self._hdr.off_data + self._hdr.block_extra
        stride = self._stride
        free_kind = RUN_PARENT if self.parent is not None else RUN_ZERO
        end = offset + length
        pos = offset
        while pos < end:
            blk, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            e = bmap[blk]
            if e < BLOCK_ZERO:
                yield Run(n, RUN_DATA, self._fd, base + e * stride + within)
            elif e == BLOCK_ZERO:
                yield Run(n, RUN_ZERO)
            else:
                yield Run(n, free_kind)
            pos += n

    def _block_reads_zero(self, blk: int) -> bool:
        e = self._bmap[blk]
        return e == BLOCK_ZERO or (e == BLOCK_FREE and self.parent is None)

    # -- metadata writes -------------------------------------------------
    def _mark_modified(self) -> None:
        """VirtualBox gives an image a new modification UUID the first time
        it is written in a session, so children made earlier notice."""
        if self._modified:
            return
        self._modify = uuid.uuid4()
        pwrite_all(self._fd, self._modify.bytes_le, _OFF_MODIFY_UUID, self.path)
        self._modified = True

    def _set_entry(self, blk: int, value: int) -> None:
        self._bmap[blk] = value
        pwrite_all(self._fd, _U32.pack(value), self._hdr.off_bmap + 4 * blk, self.path)

    def _set_allocated(self, count: int) -> None:
        self._allocated = count
        pwrite_all(self._fd, _U32.pack(count), _OFF_ALLOCATED, self.path)

    # -- writes ----------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        self._mark_modified()
        base = self._hdr.off_data + self._hdr.block_extra
        # In-place pieces contiguous in the file become one pwrite.
        runs = RunWriter(lambda host, at, n: pwrite_all(self._fd, mv[at : at + n], host, self.path))
        for blk, within, n, at in cluster_pieces(offset, len(mv), self._bs):
            e = self._bmap[blk]
            if e < BLOCK_ZERO:
                runs.add(base + e * self._stride + within, at, n)
            else:
                runs.flush()
                self._allocate(blk, within, mv[at : at + n], e)
        runs.flush()
        self._after_write(self._fd)

    def _allocate(self, blk: int, within: int, piece: memoryview, entry: int) -> None:
        """Give virtual block ``blk`` a new physical block at the end of the
        data area: data first, then the allocated count, then the map entry
        (a crash in between leaks a block but never maps one twice)."""
        idx = self._allocated
        start = self._hdr.off_data + idx * self._stride
        data_at = start + self._hdr.block_extra
        vstart = blk * self._bs
        if entry == BLOCK_FREE and self.parent is not None:
            # Differencing: the new block starts as the parent's block.
            buf = bytearray(self._stride)
            base = self._parent_read(vstart, min(self._bs, self._size - vstart))
            ex = self._hdr.block_extra
            if base is not None:
                buf[ex : ex + len(base)] = base
            buf[ex + within : ex + within + len(piece)] = piece
            pwrite_all(self._fd, buf, start, self.path)
        elif start >= self._file_size:
            # Past the end of the file: extending it gives zeroes for free.
            try:
                os.ftruncate(self._fd, start + self._stride)
            except OSError as e:
                raise MediumError(f"{self.path}: cannot grow the image: {e.strerror}") from None
            pwrite_all(self._fd, piece, data_at + within, self.path)
        else:
            buf = bytearray(self._stride)
            ex = self._hdr.block_extra
            buf[ex + within : ex + within + len(piece)] = piece
            pwrite_all(self._fd, buf, start, self.path)
        self._file_size = max(self._file_size, start + self._stride)
        if self._write_through:
            os.fdatasync(self._fd)  # data durable before the map points at it
        self._set_allocated(idx + 1)
        self._set_entry(blk, idx)

    # -- discard / zeroes (MappedImage._zero_range) ----------------------
    def _drop_block(self, blk: int) -> None:
        self._discard_block(blk)

    def _discard_block(self, blk: int) -> None:
        e = self._bmap[blk]
        if e == BLOCK_ZERO or (e == BLOCK_FREE and self.parent is None):
            return
        self._mark_modified()
        self._set_entry(blk, BLOCK_ZERO)  # from now on it reads zeroes
        if e == BLOCK_FREE:
            return
        last = self._allocated - 1
        stride = self._stride
        off_data = self._hdr.off_data
        if e != last:
            try:
                mover = self._bmap.index(last)
            except ValueError:
                mover = -1  # an orphan left by a crash: nothing to move
            if mover >= 0:
                block = pread_exact(self._fd, stride, off_data + last * stride, self.path, "VDI block")
                pwrite_all(self._fd, block, off_data + e * stride, self.path)
                if self._write_through:
                    os.fdatasync(self._fd)
                self._set_entry(mover, e)
        self._set_allocated(last)
        new_end = off_data + last * stride
        if self._file_size == new_end + stride:
            os.ftruncate(self._fd, new_end)
            self._file_size = new_end


def open(path: str, *, read_only: bool, write_through: bool = False) -> VdiImage:
    """Open a VDI image (and, for a differencing image, its parent chain)."""
    fd = open_file(path, read_only=read_only)
    parent: ImageBackend | None = None
    try:
        file_size = os.fstat(fd).st_size
        hdr = _parse_header(path, os.pread(fd, 0x200, 0), file_size)
        bmap = array.array("I")
        bmap.frombytes(pread_exact(fd, 4 * hdr.blocks, hdr.off_bmap, path, "VDI block map"))
        if sys.byteorder != "little":
            bmap.byteswap()
        parent_path: str | None = None
        if hdr.image_type == TYPE_DIFF:
            parent_path = _find_parent(path, hdr)
            parent = open_backing(path, parent_path, None)
            pinfo = parent.info()
            if pinfo.format != NAME or pinfo.uuid != str(hdr.uuid_link):
                raise BackendError(
                    f"{path}: parent {parent_path} is {pinfo.format} {{{pinfo.uuid}}}, "
                    f"expected VDI {{{hdr.uuid_link}}}"
                )
            if pinfo.extra.get("modify_uuid") != str(hdr.uuid_parent_modify):
                raise BackendError(
                    f"{path}: parent {parent_path} was modified after this differencing image was made "
                    f"(modification UUID {pinfo.extra.get('modify_uuid')}, expected {hdr.uuid_parent_modify})"
                )
            if parent.size != hdr.disk_size:
                raise BackendError(
                    f"{path}: parent {parent_path} has size {parent.size}, differencing image {hdr.disk_size}"
                )
        elif hdr.image_type == TYPE_FIXED and hdr.allocated != hdr.blocks:
            raise BackendError(
                f"{path}: damaged fixed VDI: {hdr.allocated} of {hdr.blocks} blocks allocated"
            )
        return VdiImage(
            path, fd, hdr, bmap, read_only=read_only, write_through=write_through,
            parent=parent, parent_path=parent_path,
        )
    except BaseException:
        os.close(fd)
        if parent is not None:
            parent.close()
        raise


@image_creator
def create(req: CreateRequest) -> None:
    """Create a VDI: options {"type": "dynamic" (default) | "fixed"}; with
    ``backing`` a differencing image of that VDI (size 0 = the parent's)."""
    path, size = req.path, req.size
    opts = req.checked_options({"type"})
    backing = req.backing
    kind = opts.get("type", "dynamic")
    if kind not in ("dynamic", "fixed"):
        raise BackendError(f"{path}: VDI type must be dynamic or fixed, not {kind!r}")
    link = parent_modify = uuid.UUID(int=0)
    itype = TYPE_FIXED if kind == "fixed" else TYPE_DYNAMIC
    if backing is not None:
        if kind == "fixed":
            raise BackendError(f"{path}: a differencing VDI cannot be fixed")
        pinfo, psize = parent_for_create(path, backing, req.backing_format, NAME, "a differencing VDI")
        if size == 0:
            size = psize
        if size != psize:
            raise BackendError(f"{path}: a differencing VDI has its parent's size {psize}, not {size}")
        assert pinfo.uuid is not None
        link = uuid.UUID(pinfo.uuid)
        parent_modify = uuid.UUID(pinfo.extra["modify_uuid"])
        itype = TYPE_DIFF
    req.check_size(size, "VDI")
    bs = DEFAULT_BLOCK
    blocks = -(-size // bs)
    if blocks > _MAX_BLOCKS:
        raise BackendError(f"{path}: VDI size {size} is too large")
    bmap_bytes = align_up(4 * blocks, SECTOR)
    off_bmap = 0x200
    # Page-aligned data keeps every block page aligned in the host cache.
    off_data = align_up(off_bmap + bmap_bytes, 4096)
    hdr = bytearray(0x200)
    _HDR.pack_into(
        hdr, 0, _TEXT, SIGNATURE, VERSION_1_1, 0x180, itype, 0, b"", off_bmap, off_data,
        0, 0, 0, SECTOR, 0, size, bs, 0, blocks, blocks if itype == TYPE_FIXED else 0,
        uuid.uuid4().bytes_le, uuid.uuid4().bytes_le, link.bytes_le, parent_modify.bytes_le,
    )
    if itype == TYPE_FIXED:
        bmap = array.array("I", range(blocks))
    else:
        bmap = array.array("I", [BLOCK_FREE]) * blocks
    if sys.byteorder != "little":
        bmap.byteswap()
    body = bmap.tobytes()
    fd = create_file(path)
    try:
        pwrite_all(fd, hdr, 0, path)
        pwrite_all(fd, body + bytes(off_data - off_bmap - len(body)), off_bmap, path)
        if itype == TYPE_FIXED:
            end = off_data + blocks * bs
            os.ftruncate(fd, end)
            try:
                os.posix_fallocate(fd, off_data, blocks * bs)
            except OSError:
                pass  # a file system without fallocate: sparse is still correct
        os.fsync(fd)
    finally:
        os.close(fd)
    sidecar = path + ".parent"
    if backing is not None:
        rel = os.path.relpath(resolve_backing(path, backing), os.path.dirname(os.path.abspath(path)))
        with builtins.open(sidecar, "w", encoding="utf-8") as f:
            f.write(rel + "\n")
    elif os.path.exists(sidecar):
        os.unlink(sidecar)  # a stale sidecar would misdirect a later child

