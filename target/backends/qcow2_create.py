"""Creating qcow2 images (versions 2 and 3, any power-of-two cluster size
and refcount width, optional backing file) as ``qemu-img create -f qcow2``
lays them out (qemu docs/interop/qcow2.txt)."""

from __future__ import annotations

import os
from array import array

from .base import BackendError
from .raw import pwrite_all
from .registry import CreateRequest, create_file, image_creator, parse_size
from .qcow2_format import (
    EXT_BACKING_FORMAT, EXT_END, EXT_HEADER, HDR2, HDR3, MAGIC, MAX_CLUSTER_BITS, RefBlock,
    be_bytes,
)


def _parse_options(path: str, options: dict[str, str] | None) -> tuple[int, int, int]:
    opts = dict(options or {})
    compat = opts.pop("compat", "1.1")
    version = {"0.10": 2, "v2": 2, "2": 2, "1.1": 3, "v3": 3, "3": 3}.get(compat)
    if version is None:
        raise BackendError(f"{path}: qcow2 compat={compat!r}: expected 0.10 or 1.1")
    try:
        cs = parse_size(opts.pop("cluster_size", "65536"), "cluster_size")
        refbits = parse_size(opts.pop("refcount_bits", "16"), "refcount_bits")
    except BackendError as e:
        raise BackendError(f"{path}: qcow2: {e}") from None
    if cs < 512 or cs > 1 << MAX_CLUSTER_BITS or cs & (cs - 1):
        raise BackendError(f"{path}: qcow2 cluster_size {cs} must be a power of two in 512..2M")
    if refbits < 1 or refbits > 64 or refbits & (refbits - 1):
        raise BackendError(f"{path}: qcow2 refcount_bits {refbits} must be a power of two in 1..64")
    if version == 2 and refbits != 16:
        raise BackendError(f"{path}: qcow2 compat=0.10 requires refcount_bits=16")
    for key, allowed in (("lazy_refcounts", "off"), ("preallocation", "off"), ("extended_l2", "off"),
                         ("compression_type", "zlib"), ("encryption", "off")):
        value = opts.pop(key, allowed)
        if value != allowed:
            raise BackendError(f"{path}: qcow2 {key}={value} is not supported")
    if opts:
        raise BackendError(f"{path}: unknown qcow2 option(s): {', '.join(sorted(opts))}")
    return version, cs, refbits


@image_creator
def create(req: CreateRequest) -> None:
    """Create an empty qcow2 image. Options: ``compat`` (1.1 = v3, the
    default, or 0.10 = v2), ``cluster_size`` (default 64 KiB),
    ``refcount_bits`` (default 16)."""
    path, size = req.path, req.size
    version, cs, refbits = _parse_options(path, req.options)
    backing = req.backing
    backing_format = req.backing_format
    if size < 0:
        raise BackendError(f"{path}: negative size")
    cb = cs.bit_length() - 1
    l2n = cs // 8
    l1_size = -(-size // (cs * l2n))
    l1_clusters = -(-l1_size * 8 // cs)
    rb_entries = cs * 8 // refbits
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + l1_clusters + rb_count
        rb_new = -(-total // rb_entries)
        rt_new = -(-rb_new * 8 // cs)
        if (rb_new, rt_new) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = rb_new, rt_new
    rt_off = cs
    l1_off = rt_off + rt_clusters * cs
    rb_off = l1_off + l1_clusters * cs
    total = 1 + rt_clusters + l1_clusters + rb_count

    # Header cluster: fixed header, extensions, end marker, backing name.
    header_length = 72 if version == 2 else 104
    exts = bytearray()
    if backing is not None and backing_format:
        fmt = backing_format.encode("ascii")
        exts += EXT_HEADER.pack(EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    exts += EXT_HEADER.pack(EXT_END, 0)
    backing_off = backing_len = 0
    name = b""
    if backing is not None:
        name = os.fsencode(backing)
        if not 0 < len(name) <= 1023:
            raise BackendError(f"{path}: backing file name must be 1..1023 bytes")
        backing_off = header_length + len(exts)
        backing_len = len(name)
    if header_length + len(exts) + len(name) > cs:
        raise BackendError(f"{path}: header and backing file name do not fit in a {cs}-byte cluster")
    head = bytearray(cs)
    HDR2.pack_into(head, 0, MAGIC, version, backing_off, backing_len, cb, size, 0,
                    l1_size, l1_off, rt_off, rt_clusters, 0, 0)
    if version == 3:
        HDR3.pack_into(head, 72, 0, 0, 0, refbits.bit_length() - 1, header_length)
    head[header_length : header_length + len(exts)] = exts
    head[backing_off : backing_off + len(name)] = name

    reftable: array[int] = array("Q", bytes(rt_clusters * cs))
    blocks = bytearray()
    for i in range(rb_count):
        reftable[i] = rb_off + i * cs
        block = RefBlock(rb_off + i * cs, refbits, bytes(cs))
        for c in range(i * rb_entries, min(total, (i + 1) * rb_entries)):
            block.set(c - i * rb_entries, 1)
        blocks += block.to_bytes()
    fd = create_file(path)
    try:
        os.ftruncate(fd, total * cs)
        pwrite_all(fd, head, 0)
        pwrite_all(fd, be_bytes(reftable), rt_off)
        pwrite_all(fd, blocks, rb_off)
        os.fsync(fd)
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror or e}") from None
    finally:
        os.close(fd)
