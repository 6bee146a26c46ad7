"""qcow2 on-disk structures (qemu docs/interop/qcow2.txt): header layouts,
extension types, feature bits, L1/L2/refcount entry flags, qemu's limits,
and the refcount block of any refcount width."""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import ClassVar

from .base import Buffer, MediumError

NAME = "qcow2"
MAGIC = b"QFI\xfb"

# Header fields up to snapshots_offset (72 bytes, all a v2 header has).
HDR2 = struct.Struct(">4sIQIIQIIQQIIQ")
# v3 additions at byte 72: incompatible, compatible, autoclear features,
# refcount_order, header_length.
HDR3 = struct.Struct(">QQQII")
EXT_HEADER = struct.Struct(">II")
U64 = struct.Struct(">Q")
REFTABLE_HDR = struct.Struct(">QI")  # refcount_table_offset + _clusters at 48

# Header extension types.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_NAMES = {
    0: "dirty",
    1: "corrupt",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
COMPAT_LAZY_REFCOUNTS = 1 << 0

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1 and standard L2 entries, bits 9-55
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

MAX_CLUSTER_BITS = 21  # qemu's limit, 2 MiB
MAX_L1_BYTES = 32 << 20  # qemu's limit on the L1 table
MAX_REFTABLE_BYTES = 8 << 20
L2_CACHE_BYTES = 32 << 20

# Cluster kinds.
UNALLOC, ZERO, NORMAL, COMPRESSED = range(4)

_LITTLE = sys.byteorder == "little"
REF_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def be_array(typecode: str, raw: Buffer) -> array[int]:
    a: array[int] = array(typecode)
    a.frombytes(raw)
    if _LITTLE and a.itemsize > 1:
        a.byteswap()
    return a


def be_bytes(a: array[int], lo: int = 0, hi: int | None = None) -> bytes:
    part = a[lo:hi]
    if _LITTLE and part.itemsize > 1:
        part.byteswap()
    return part.tobytes()


class RefBlock:
    """One refcount block (a cluster of refcount_bits-wide entries)."""

    __slots__ = ("arr", "bits", "offset", "raw")

    # For sub-byte widths: 1 where a byte holds at least one zero entry.
    _HAS_ZERO: ClassVar[dict[int, bytes]] = {}

    def __init__(self, offset: int, bits: int, raw: Buffer) -> None:
        self.offset = offset
        self.bits = bits
        if bits >= 8:
            self.arr: array[int] | None = be_array(REF_TYPECODES[bits], raw)
            self.raw = bytearray()
        else:
            self.arr = None
            self.raw = bytearray(raw)

    def get(self, i: int) -> int:
        if self.arr is not None:
            return self.arr[i]
        # Sub-byte entries: entry 0 is the least significant bits of byte 0.
        bit = i * self.bits
        return (self.raw[bit >> 3] >> (bit & 7)) & ((1 << self.bits) - 1)

    def set(self, i: int, value: int) -> tuple[int, bytes]:
        """Set entry ``i``; return (byte offset in block, bytes to write)."""
        if value < 0 or value >= 1 << self.bits:
            raise MediumError(f"refcount {value} does not fit in {self.bits} bits")
        if self.arr is not None:
            self.arr[i] = value
            size = self.bits >> 3
            return i * size, value.to_bytes(size, "big")
        bit = i * self.bits
        byte, shift = bit >> 3, bit & 7
        mask = ((1 << self.bits) - 1) << shift
        self.raw[byte] = (self.raw[byte] & ~mask) | (value << shift)
        return byte, bytes(self.raw[byte : byte + 1])

    def find_zero(self, start: int) -> int:
        """Index of the first zero entry at or after ``start``, or -1."""
        arr = self.arr
        if arr is not None:
            try:
                return arr.index(0, start)
            except ValueError:
                return -1
        per_byte = 8 // self.bits
        n = len(self.raw) * per_byte
        # Finish the partial first byte entry by entry (< 8 steps).
        i = start
        while i < n and i % per_byte:
            if self.get(i) == 0:
                return i
            i += 1
        table = self._HAS_ZERO.get(self.bits)
        if table is None:
            table = bytes(
                int(any(((b >> s) & ((1 << self.bits) - 1)) == 0 for s in range(0, 8, self.bits)))
                for b in range(256)
            )
            self._HAS_ZERO[self.bits] = table
        byte = self.raw.translate(table).find(1, i // per_byte)
        if byte < 0:
            return -1
        for j in range(byte * per_byte, byte * per_byte + per_byte):
            if self.get(j) == 0:
                return j
        return -1  # pragma: no cover - the table said there was one

    def to_bytes(self) -> bytes:
        return be_bytes(self.arr) if self.arr is not None else bytes(self.raw)


@dataclass
class Extensions:
    """What the header extensions told us."""

    backing_format: str | None = None
    feature_names: dict[int, str] = field(default_factory=dict)
