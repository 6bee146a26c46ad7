"""Consistency checks of image files (``iscsi-target image check``).

An independent reader: it parses the on-disk structures itself (from the
format specifications: qemu's docs/interop/qcow2.txt and parallels.txt, the
VDI 1.1 header, Microsoft's VHD specification, VMware's Virtual Disk
Format 1.1) rather than trusting the backends it is meant to check. For
every format it walks the block maps and verifies that

* every pointer is aligned and lies inside the file,
* no two map entries share a host block (which would make two virtual
  ranges alias), and
* (qcow2) every cluster's stored refcount equals the number of references
  found, and the COPIED flags agree with the refcounts.

Problems that lose or alias data are *errors*; space the file holds that
nothing references (what a crash between "write the data" and "point the
map at it" leaves) is a *leak*, harmless and reported separately.
"""

from __future__ import annotations

import itertools
import os
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from target.backends.base import BackendError
from target.backends.locking import lock_image
from target.backends.registry import detect

__all__ = ["CheckResult", "Progress", "check_image"]

#: Called with (done, total) units of work.
Progress = Callable[[int, int], None]


@dataclass
class CheckResult:
    """What a check found."""

    path: str
    format: str
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    #: Host blocks/clusters referenced by the maps, and their size.
    allocated: int = 0
    block_size: int = 0
    #: Virtual blocks the map covers (for the "x/y allocated" line).
    total: int = 0
    #: False when the format has nothing we can check (raw).
    checked: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no errors were found (leaks are not errors)."""
        return not self.errors


class _Limit:
    """Stop listing after the first few problems of one kind."""

    MAX = 50


def _add(lst: list[str], msg: str) -> None:
    if len(lst) < _Limit.MAX:
        lst.append(msg)
    elif len(lst) == _Limit.MAX:
        lst.append("... (more not shown)")


def _pread(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise BackendError(f"read of {n} bytes at {at} ends past the end of the file")
    return data


def _array(code: str, raw: bytes, big_endian: bool) -> array[int]:
    a = array(code)
    a.frombytes(raw)
    if big_endian != (sys.byteorder == "big"):
        a.byteswap()
    return a


def check_image(path: str, fmt: str | None = None, progress: Progress | None = None) -> CheckResult:
    """Check the image at ``path`` (format detected unless given). Raises
    BackendError when the file cannot be read or its header is unusable."""
    if fmt is None:
        fmt = detect(path)
    checker = _CHECKERS.get(fmt)
    res = CheckResult(path, fmt)
    if checker is None:
        res.checked = False
        res.notes.append(f"{fmt} images have no metadata to check")
        return res
    # A writer elsewhere would make the check report its half-done updates
    # as damage: take the reader's lock as qemu-img check does.
    lock = lock_image(path, write=False)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if lock is not None:
            lock.release()
        raise BackendError(f"{path}: cannot open: {e.strerror}") from None
    try:
        checker(path, fd, res, progress or (lambda done, total: None))
    except struct.error as e:
        raise BackendError(f"{path}: damaged {fmt} metadata ({e})") from None
    except OSError as e:
        raise BackendError(f"{path}: read failed: {e.strerror}") from None
    finally:
        os.close(fd)
        if lock is not None:
            lock.release()
    return res


# ---------------------------------------------------------------------------
# qcow2 (docs/interop/qcow2.txt)

_Q_HDR = struct.Struct(">IIQIIQIIQQIIQ")
_Q_HDR3 = struct.Struct(">QQQII")
_Q_SNAP = struct.Struct(">QIHHIIQII")
_OFF_MASK = 0x00FFFFFFFFFFFE00
_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_INCOMPAT_EXTERNAL = 1 << 2
_INCOMPAT_EXTL2 = 1 << 4


def _check_qcow2(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    file_size = os.fstat(fd).st_size
    head = _pread(fd, 104 if file_size >= 104 else 72, 0)
    (magic, version, backing_off, backing_len, cb, size, _crypt, l1_size, l1_off, rt_off,
     rt_clusters, nb_snap, snap_off) = _Q_HDR.unpack_from(head)
    if magic != 0x514649FB:
        raise BackendError(f"{path}: not a qcow2 image")
    if version not in (2, 3) or not 9 <= cb <= 21:
        raise BackendError(f"{path}: unsupported qcow2 version {version} / cluster bits {cb}")
    cs = 1 << cb
    incompat, refbits_order, hdr_len = 0, 4, 72
    if version == 3:
        incompat, _compat, _autoclear, refbits_order, hdr_len = _Q_HDR3.unpack_from(head, 72)
    if incompat & _INCOMPAT_EXTERNAL:
        res.notes.append("external data file: data clusters not checked")
    if incompat & 1:
        res.notes.append("image is marked dirty (lazy refcounts): leaks are expected")
    if incompat & 2:
        _add(res.errors, "image is marked corrupt")
    l2_entry = 16 if incompat & _INCOMPAT_EXTL2 else 8
    refbits = 1 << refbits_order
    res.block_size = cs
    res.total = -(-size // cs)
    refs: Counter[int] = Counter()

    def ref_range(start: int, length: int, what: str) -> None:
        if length <= 0:
            return
        if start % cs:
            _add(res.errors, f"{what} at {start:#x} is not cluster aligned")
        if start + length > file_size:
            _add(res.errors, f"{what} at {start:#x}+{length} ends past the end of the file ({file_size})")
        for c in range(start // cs, (start + length - 1) // cs + 1):
            refs[c] += 1

    # Header cluster(s): the header, its extensions and the backing name.
    head_end = max(hdr_len, backing_off + backing_len if backing_off else 0, 1)
    ref_range(0, head_end, "header")
    ref_range(l1_off, l1_size * 8, "L1 table")
    ref_range(rt_off, rt_clusters * cs, "refcount table")

    # Refcount table -> refcount blocks -> stored refcounts.
    rt = _array("Q", _pread(fd, rt_clusters * cs, rt_off), True) if rt_clusters else array("Q")
    per_block = cs * 8 // refbits
    stored: dict[int, int] = {}
    for i, e in enumerate(rt):
        if not e:
            continue
        boff = e & ~0x1FF
        if e & 0x1FF:
            _add(res.errors, f"refcount table entry {i} has reserved bits set ({e:#x})")
        if boff % cs or boff + cs > file_size:
            _add(res.errors, f"refcount block {i} at {boff:#x} is misaligned or past the end of the file")
            continue
        refs[boff // cs] += 1
        raw = _pread(fd, cs, boff)
        base = i * per_block
        if refbits >= 8:
            code = {8: "B", 16: "H", 32: "I", 64: "Q"}[refbits]
            counts = _array(code, raw, True)
            for j, v in enumerate(counts):
                if v:
                    stored[base + j] = v
        else:
            whole = int.from_bytes(raw, "big")
            mask = (1 << refbits) - 1
            n = per_block
            for j in range(n):
                v = (whole >> ((n - 1 - j) * refbits)) & mask
                if v:
                    stored[base + j] = v

    # Snapshot table and the snapshots' L1 tables.
    l1_tables: list[tuple[int, int, str]] = [(l1_off, l1_size, "active")]
    if nb_snap:
        pos = snap_off
        for k in range(nb_snap):
            raw = _pread(fd, _Q_SNAP.size, pos)
            s_l1, s_l1n, id_len, name_len, _ds, _dn, _vm, _vs, extra = _Q_SNAP.unpack_from(raw)
            ref_range(s_l1, s_l1n * 8, f"snapshot {k} L1 table")
            l1_tables.append((s_l1, s_l1n, f"snapshot {k}"))
            entry = _Q_SNAP.size + extra + id_len + name_len
            pos += (entry + 7) & ~7
        ref_range(snap_off, pos - snap_off, "snapshot table")

    # L1 -> L2 -> data. Each distinct L2 table is walked once: its entries
    # are one reference each however many L1 tables point at it.
    l2_seen: set[int] = set()
    l2_list: list[tuple[int, str]] = []
    active_l1: list[tuple[int, int]] = []
    for t_off, t_n, label in l1_tables:
        if not t_n or t_off % cs or t_off + t_n * 8 > file_size:
            continue
        l1 = _array("Q", _pread(fd, t_n * 8, t_off), True)
        for i, e in enumerate(l1):
            l2 = e & _OFF_MASK
            if e & 0x7E000000000001FF:
                _add(res.errors, f"{label} L1 entry {i} has reserved bits set ({e:#x})")
            if not l2:
                continue
            refs[l2 // cs] += 1
            if l2 % cs or l2 + cs > file_size:
                _add(res.errors, f"{label} L1 entry {i}: L2 table at {l2:#x} is misaligned or past the end of the file")
                continue
            if label == "active":
                active_l1.append((i, e))
            if l2 not in l2_seen:
                l2_seen.add(l2)
                l2_list.append((l2, label))
    x = 62 - (cb - 8)
    data_entries: list[tuple[int, int, int]] = []  # (l2 offset, index, entry) normal clusters
    for n, (l2, label) in enumerate(l2_list):
        progress(n, len(l2_list))
        tab = _array("Q", _pread(fd, cs, l2), True)
        if l2_entry == 16:
            tab = tab[::2]
        for j, e in enumerate(tab):
            if not e:
                continue
            if e & _COMPRESSED:
                off = e & ((1 << x) - 1)
                nsec = ((e & ~_COPIED) >> x) & ((1 << (62 - x)) - 1)
                end = (off & ~0x1FF) + (nsec + 1) * 512
                if off >= file_size:
                    _add(res.errors, f"L2 at {l2:#x} entry {j}: compressed cluster at {off:#x} past the end of the file")
                    continue
                for c in range(off // cs, (min(end, file_size) - 1) // cs + 1):
                    refs[c] += 1
                if e & _COPIED:
                    _add(res.errors, f"L2 at {l2:#x} entry {j}: compressed cluster has the COPIED flag")
                continue
            host = e & _OFF_MASK
            if e & 0x3F000000000001FE:
                _add(res.errors, f"L2 at {l2:#x} entry {j} has reserved bits set ({e:#x})")
            if not host:
                continue
            if incompat & _INCOMPAT_EXTERNAL:
                continue
            if host % cs:
                _add(res.errors, f"L2 at {l2:#x} entry {j}: data cluster {host:#x} is not cluster aligned")
                continue
            if host + cs > file_size and not e & 1:
                _add(res.errors, f"L2 at {l2:#x} entry {j}: data cluster {host:#x} is past the end of the file")
            refs[host // cs] += 1
            data_entries.append((l2, j, e))
    progress(len(l2_list), len(l2_list))

    res.allocated = sum(1 for _ in data_entries)
    # Stored refcounts against the references found.
    for c in sorted(set(refs) | set(stored)):
        want, have = refs.get(c, 0), stored.get(c, 0)
        if want == have:
            continue
        if have < want:
            _add(res.errors, f"cluster {c} (at {c * cs:#x}): refcount={have} but {want} reference(s)")
        elif want == 0:
            _add(res.leaks, f"cluster {c} (at {c * cs:#x}): refcount={have}, not referenced")
        else:
            _add(res.leaks, f"cluster {c} (at {c * cs:#x}): refcount={have} but only {want} reference(s)")
    # COPIED flags: set exactly when the refcount is 1 (qcow2.txt "L1/L2 entry" bit 63).
    for i, e in active_l1:
        rc = stored.get((e & _OFF_MASK) // cs, 0)
        if bool(e & _COPIED) != (rc == 1):
            _add(res.errors, f"L1 entry {i}: COPIED flag is {int(bool(e & _COPIED))} but the L2 refcount is {rc}")
    if nb_snap == 0:
        for l2, j, e in data_entries:
            rc = stored.get((e & _OFF_MASK) // cs, 0)
            if bool(e & _COPIED) != (rc == 1):
                _add(res.errors, f"L2 at {l2:#x} entry {j}: COPIED flag is {int(bool(e & _COPIED))} "
                                 f"but the refcount is {rc}")


# ---------------------------------------------------------------------------
# VDI (VirtualBox VDI 1.1 header)

_VDI_FREE = 0xFFFFFFFF
_VDI_ZERO = 0xFFFFFFFE


def _check_vdi(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    file_size = os.fstat(fd).st_size
    head = _pread(fd, 0x1C8, 0)
    (sig,) = struct.unpack_from("<I", head, 0x40)
    if sig != 0xBEDA107F:
        raise BackendError(f"{path}: not a VDI image")
    (itype,) = struct.unpack_from("<I", head, 0x4C)
    off_bmap, off_data = struct.unpack_from("<II", head, 0x154)
    disk_size, bs, extra, blocks, allocated = struct.unpack_from("<QIIII", head, 0x170)
    if bs == 0 or bs & (bs - 1):
        raise BackendError(f"{path}: VDI block size {bs} is not a power of two")
    if disk_size > blocks * bs:
        _add(res.errors, f"disk size {disk_size} needs more than the {blocks} blocks of the map")
    if off_bmap + 4 * blocks > file_size:
        raise BackendError(f"{path}: VDI block map ends past the end of the file")
    stride = bs + extra
    res.block_size = bs
    res.total = blocks
    bmap = _array("I", _pread(fd, 4 * blocks, off_bmap), False)
    owner: dict[int, int] = {}
    for blk, e in enumerate(bmap):
        if e >= _VDI_ZERO:
            continue
        if e >= allocated:
            _add(res.errors, f"block {blk}: physical index {e} is not below the {allocated} allocated blocks")
        if off_data + (e + 1) * stride > file_size:
            _add(res.errors, f"block {blk}: physical block {e} ends past the end of the file ({file_size})")
        prev = owner.get(e)
        if prev is not None:
            _add(res.errors, f"blocks {prev} and {blk} both map physical block {e}")
            continue
        owner[e] = blk
    progress(1, 1)
    res.allocated = len(owner)
    if itype == 2 and res.allocated != blocks:
        _add(res.errors, f"fixed image maps only {res.allocated} of {blocks} blocks")
    unused = allocated - len([e for e in owner if e < allocated])
    if unused > 0:
        # qemu-img check counts this as corruption ("allocated blocks
        # mismatch"); it is in fact a block written but never mapped.
        _add(res.leaks, f"{unused} of the {allocated} allocated physical blocks are not mapped")


# ---------------------------------------------------------------------------
# VHD (Microsoft Virtual Hard Disk Image Format Specification)


def _vhd_checksum(buf: bytes, at: int) -> int:
    return ~(sum(buf[:at]) + sum(buf[at + 4 :])) & 0xFFFFFFFF


def _check_vhd(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    file_size = os.fstat(fd).st_size
    if file_size < 512:
        raise BackendError(f"{path}: too small for a VHD footer")
    footer = _pread(fd, 512, file_size - 512)
    if footer[:8] != b"conectix":
        # qemu writes 511-byte footers on old images; accept a footer copy at 0.
        footer = _pread(fd, 512, 0)
        if footer[:8] != b"conectix":
            raise BackendError(f"{path}: no VHD footer")
        _add(res.errors, "footer at the end of the file is missing (only the copy at offset 0 is valid)")
    (data_off,) = struct.unpack_from(">Q", footer, 16)
    cur_size, = struct.unpack_from(">Q", footer, 48)
    dtype, csum = struct.unpack_from(">II", footer, 60)
    if _vhd_checksum(footer, 64) != csum:
        _add(res.errors, f"footer checksum {csum:#x} is wrong (computed {_vhd_checksum(footer, 64):#x})")
    if dtype == 2:
        res.block_size = 512
        res.total = cur_size // 512
        res.allocated = res.total
        if file_size < cur_size + 512:
            _add(res.errors, f"fixed VHD of {cur_size} bytes but the file has only {file_size}")
        progress(1, 1)
        return
    if dtype not in (3, 4):
        raise BackendError(f"{path}: unknown VHD disk type {dtype}")
    dyn = _pread(fd, 1024, data_off)
    if dyn[:8] != b"cxsparse":
        raise BackendError(f"{path}: no VHD dynamic header at {data_off}")
    (bat_off,) = struct.unpack_from(">Q", dyn, 16)
    _ver, entries, bs, dcsum = struct.unpack_from(">IIII", dyn, 24)
    if _vhd_checksum(dyn, 36) != dcsum:
        _add(res.errors, f"dynamic header checksum {dcsum:#x} is wrong")
    if bs < 512 or bs & (bs - 1):
        raise BackendError(f"{path}: VHD block size {bs} is not a power of two")
    if bat_off + 4 * entries > file_size:
        raise BackendError(f"{path}: VHD block allocation table ends past the end of the file")
    bitmap = ((bs // 512 // 8) + 511) & ~511
    res.block_size = bs
    res.total = entries
    bat = _array("I", _pread(fd, 4 * entries, bat_off), True)
    meta_end = max(data_off + 1024, bat_off + ((4 * entries + 511) & ~511))
    body_end = file_size - 512
    spans: list[tuple[int, int, int]] = []
    for blk, e in enumerate(bat):
        if e == 0xFFFFFFFF:
            continue
        start = e * 512
        end = start + bitmap + bs
        if start < meta_end:
            _add(res.errors, f"block {blk} at {start:#x} overlaps the headers or the table")
        if end > body_end:
            _add(res.errors, f"block {blk} at {start:#x} ends past the footer ({body_end})")
        spans.append((start, end, blk))
    spans.sort()
    for (s0, e0, b0), (s1, _e1, b1) in itertools.pairwise(spans):
        if s1 < e0:
            _add(res.errors, f"blocks {b0} and {b1} overlap in the file (at {s0:#x} and {s1:#x})")
    res.allocated = len(spans)
    if spans:
        used = sum(e - s for s, e, _ in spans)
        gap = body_end - meta_end - used
        if gap > 0 and spans[-1][1] < body_end:
            _add(res.leaks, f"{body_end - spans[-1][1]} bytes after the last block are not used")
    progress(1, 1)


# ---------------------------------------------------------------------------
# Parallels HDD v2 (qemu docs/interop/parallels.txt)

_P_HDR = struct.Struct("<16sIIIIIQIIIQ")


def _check_parallels(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    file_size = os.fstat(fd).st_size
    (magic, version, _h, _c, tracks, nb_bat, nb_sectors, in_use, data_off, _flags,
     _ext) = _P_HDR.unpack(_pread(fd, _P_HDR.size, 0))
    if magic not in (b"WithoutFreeSpace", b"WithouFreSpacExt") or version != 2:
        raise BackendError(f"{path}: not a Parallels v2 image")
    if tracks == 0:
        raise BackendError(f"{path}: Parallels cluster size is 0")
    cs = tracks * 512
    mult = 1 if magic == b"WithoutFreeSpace" else tracks
    res.block_size = cs
    res.total = nb_bat
    if in_use == 0x746F6E59:
        res.notes.append("image is marked in use (not closed cleanly)")
    bat = _array("I", _pread(fd, 4 * nb_bat, 64), False)
    data_start = data_off * 512 if data_off else 64 + 4 * nb_bat
    if nb_sectors > nb_bat * tracks:
        _add(res.errors, f"{nb_sectors} sectors need more than the {nb_bat} BAT entries")
    owner: dict[int, int] = {}
    last_end = data_start
    for i, e in enumerate(bat):
        if not e:
            continue
        at = e * mult * 512
        if at < data_start:
            _add(res.errors, f"cluster {i} at {at:#x} lies in the header or BAT")
        if at + cs > file_size:
            _add(res.errors, f"cluster {i} at {at:#x} ends past the end of the file ({file_size})")
        prev = owner.get(at)
        if prev is not None:
            _add(res.errors, f"clusters {prev} and {i} share host offset {at:#x}")
            continue
        owner[at] = i
        last_end = max(last_end, at + cs)
    res.allocated = len(owner)
    if file_size > last_end and file_size - last_end >= cs:
        _add(res.leaks, f"{file_size - last_end} bytes after the last cluster are not used")
    progress(1, 1)


_CHECKERS: dict[str, Callable[[str, int, CheckResult, Progress], None]] = {
    "qcow2": _check_qcow2,
    "vdi": _check_vdi,
    "vhd": _check_vhd,
    "parallels": _check_parallels,
}


def _check_vhdx(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    # In its own module (this one is at its size limit); imported here, not
    # at the top, because it refers back to CheckResult.
    from target.image_check_vhdx import check_vhdx

    check_vhdx(path, fd, res, progress, _add)


_CHECKERS["vhdx"] = _check_vhdx


def _check_vmdk(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    # In its own module too; it uses this one's helpers.
    from target.image_check_vmdk import check_vmdk

    check_vmdk(path, fd, res, progress)


_CHECKERS["vmdk"] = _check_vmdk
