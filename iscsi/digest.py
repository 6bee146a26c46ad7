"""CRC32C header and data digests (RFC 7143 §13.1, Appendix B).

The ``crc32c`` package computes over any buffer without copying (27 GB/s on
this machine, DESIGN.md). The digest travels least-significant byte first,
which is how Linux, libiscsi and Wireshark read it.
"""

from __future__ import annotations

import struct

from crc32c import crc32c as _crc32c

_U32LE = struct.Struct("<I")

Buffer = bytes | bytearray | memoryview


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value`` (0 to start)."""
    return int(_crc32c(data, value))


def digest_bytes(*parts: Buffer) -> bytes:
    """The 4 wire bytes of the CRC32C over ``parts`` in order."""
    value = 0
    for part in parts:
        value = _crc32c(part, value)
    return _U32LE.pack(value)


def digest_value(raw: Buffer) -> int:
    """Decode 4 wire digest bytes into the CRC value."""
    return int(_U32LE.unpack(raw)[0])
