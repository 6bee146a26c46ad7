"""``iscsi-target image check`` for VMDK (VMware Virtual Disk Format 1.1):
a monolithic sparse file, or a descriptor and its extents (flat, sparse,
zero), each extent locked as a reader while it is checked."""

from __future__ import annotations

import os
import re
import struct

from target.backends.base import BackendError
from target.backends.locking import LockSet, lock_image
from target.image_check import CheckResult, Progress, _add, _array, _pread


_VMDK_HDR = struct.Struct("<IIIQQQQIQQQ?cccc")
_EXTENT_RE = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?', re.MULTILINE)


def check_vmdk(path: str, fd: int, res: CheckResult, progress: Progress) -> None:
    """Check a VMDK: a sparse extent file, or a descriptor and its extents."""
    head = os.pread(fd, 512, 0)
    if head[:4] == b"KDMV":
        _check_sparse_extent(path, fd, res, 0)
        return
    text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
    extents = _EXTENT_RE.findall(text)
    if not extents:
        raise BackendError(f"{path}: VMDK descriptor lists no extents")
    base = os.path.dirname(os.path.abspath(path))
    # The extents are what a writer changes, and they keep their inode when
    # the descriptor is replaced by a rename: lock them as readers too, so a
    # check never reports a writer's half-done update as damage.
    locks = LockSet([])
    try:
        for name in dict.fromkeys(e[3] for e in extents):
            lock = lock_image(os.path.join(base, name), write=False)
            if lock is not None:
                locks.add(lock)
        _check_vmdk_extents(base, extents, res, progress)
    finally:
        locks.release()


def _check_vmdk_extents(base: str, extents: list[tuple[str, ...]], res: CheckResult,
                        progress: Progress) -> None:
    vbase = 0
    for n, (_acc, sectors, kind, name, off) in enumerate(extents):
        progress(n, len(extents))
        epath = os.path.join(base, name)
        nsec = int(sectors)
        if not os.path.exists(epath):
            _add(res.errors, f"extent {name}: file not found")
        elif kind.upper() in ("FLAT", "VMFS"):
            need = (int(off or 0) + nsec) * 512
            have = os.path.getsize(epath)
            if have < need:
                _add(res.errors, f"extent {name}: {have} bytes, the descriptor needs {need}")
            res.allocated += nsec
            res.block_size = 512
            res.total += nsec
        elif kind.upper() == "SPARSE":
            efd = os.open(epath, os.O_RDONLY)
            try:
                _check_sparse_extent(epath, efd, res, vbase)
            finally:
                os.close(efd)
        elif kind.upper() != "ZERO":
            _add(res.errors, f"extent {name}: unknown extent type {kind}")
        vbase += nsec
    progress(len(extents), len(extents))


def _check_sparse_extent(path: str, fd: int, res: CheckResult, vbase: int) -> None:
    file_size = os.fstat(fd).st_size
    raw = _pread(fd, _VMDK_HDR.size, 0)
    (_magic, _ver, flags, capacity, grain, _doff, _dsize, gtes, rgd, gd, _over, _unclean,
     *_rest) = _VMDK_HDR.unpack(raw)
    name = os.path.basename(path)
    if grain == 0 or gtes == 0:
        raise BackendError(f"{path}: VMDK grain size {grain} / {gtes} GTEs per GT is invalid")
    if gd == 0xFFFFFFFFFFFFFFFF:
        res.notes.append(f"{name}: streamOptimized (grain directory at the end) not checked")
        return
    gsize = grain * 512
    res.block_size = gsize
    grains = -(-capacity // grain)
    res.total += grains
    ngt = -(-grains // gtes)
    seen: dict[int, int] = {}
    gt_spans: list[tuple[int, int]] = []
    for which, gd_sector in (("grain directory", gd), ("redundant grain directory", rgd)):
        if which.startswith("redundant") and not flags & 2:
            continue
        if not gd_sector:
            continue
        if gd_sector * 512 + 4 * ngt > file_size:
            _add(res.errors, f"{name}: {which} at sector {gd_sector} ends past the end of the file")
            continue
        gdir = _array("I", _pread(fd, 4 * ngt, gd_sector * 512), False)
        for t, g in enumerate(gdir):
            if not g:
                continue
            at = g * 512
            if at + 4 * gtes > file_size:
                _add(res.errors, f"{name}: {which} entry {t}: grain table at sector {g} is past the end of the file")
                continue
            gt_spans.append((at, at + 4 * gtes))
            if which != "grain directory":
                continue
            table = _array("I", _pread(fd, 4 * gtes, at), False)
            for k, sec in enumerate(table):
                if sec <= 1:  # 0 unallocated, 1 zero grain (VMDK 1.1 §"Grain tables")
                    continue
                idx = t * gtes + k
                if flags & 0x10000:
                    # Compressed grains have variable length: only check
                    # that they start inside the file.
                    if sec * 512 >= file_size:
                        _add(res.errors, f"{name}: grain {idx} at sector {sec} is past the end of the file")
                    continue
                if sec * 512 + gsize > file_size:
                    _add(res.errors, f"{name}: grain {idx} at sector {sec} ends past the end of the file")
                prev = seen.get(sec)
                if prev is not None:
                    _add(res.errors, f"{name}: grains {prev} and {idx} share sector {sec}")
                    continue
                seen[sec] = idx
    # A grain must not sit on a grain table.
    for sec, idx in seen.items():
        at = sec * 512
        for s, e in gt_spans:
            if at < e and s < at + gsize:
                _add(res.errors, f"{name}: grain {idx} at sector {sec} overlaps a grain table")
                break
    res.allocated += len(seen)
