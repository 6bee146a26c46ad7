"""The copy manager: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS
(SPC-4 §6.3 / §6.4 in their LID1 form, i.e. SPC-3 §6.3 / §6.17), plus the
Third-party Copy VPD page (SPC-4 §7.8.17).

Supported: identification target descriptors (E4h), whose NAA designator
names one of this target's logical units (the caller's ``lookup_lu``
callback maps the designator to a unit), and block-device-to-block-device
segment descriptors (02h). The copy runs through the units' backends in
1 MiB chunks with a yield to the event loop between chunks, so a long copy
does not starve other sessions.

Results are kept per I_T nexus and LIST IDENTIFIER when LIST ID USAGE asks
for it (00b), for RECEIVE COPY RESULTS COPY STATUS / RECEIVE DATA / FAILED
SEGMENT DETAILS; OPERATING PARAMETERS describes the limits below.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from iscsi.scsi.spc import parse_extended_copy, parse_receive_copy_results
from iscsi.scsi.constants import Opcode, SenseKey, Status
from iscsi.scsi.sense import (
    COPY_TARGET_DEVICE_NOT_REACHABLE,
    INSUFFICIENT_RESOURCES,
    PARAMETER_LIST_LENGTH_ERROR,
    THIRD_PARTY_DEVICE_FAILURE,
    TOO_MANY_SEGMENT_DESCRIPTORS,
    TOO_MANY_TARGET_DESCRIPTORS,
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
    WRITE_PROTECTED,
    CheckCondition,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)
from target.backends.base import Backend, BackendError

from .types import Buffer, Nexus

__all__ = [
    "XCopyManager",
    "CopyTarget",
    "third_party_copy_vpd",
    "MAX_TARGET_DESCRIPTORS",
    "MAX_SEGMENT_DESCRIPTORS",
    "MAX_DESCRIPTOR_LIST_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "CHUNK",
]

#: Copy manager limits reported by OPERATING PARAMETERS and VPD 8Fh.
MAX_TARGET_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 32
#: Room for the maximum counts of both descriptor kinds (E4h: 32 bytes,
#: 02h: 28 bytes); a longer list is a PARAMETER LIST LENGTH ERROR.
MAX_DESCRIPTOR_LIST_LENGTH = MAX_TARGET_DESCRIPTORS * 32 + MAX_SEGMENT_DESCRIPTORS * 28
#: 65535 blocks of 4096 bytes fit: a 02h segment never exceeds it.
MAX_SEGMENT_LENGTH = 256 << 20
MAX_INLINE_DATA_LENGTH = 0
TOTAL_CONCURRENT_COPIES = 64
#: Bytes moved per backend read/write before yielding to the event loop.
CHUNK = 1 << 20
#: Results kept for RECEIVE COPY RESULTS (oldest finished ones go first).
MAX_HELD_RESULTS = 64

_TD_IDENTIFICATION = 0xE4
_SD_BLOCK_TO_BLOCK = 0x02
_TD_LEN = 32
_SD_B2B_LEN = 28
_IMPLEMENTED_DESCRIPTORS = (_SD_BLOCK_TO_BLOCK, _TD_IDENTIFICATION)

_HEADER = struct.Struct(">BBH4xII")  # LID1 parameter list header, 16 bytes
_SEG_B2B = struct.Struct(">BBHHH2xHQQ")  # 02h segment descriptor, 28 bytes
_DESIGNATOR_NAA = 3
_ASSOC_LU = 0

# LIST ID USAGE (SPC-4 §6.4.3.2, LID1): hold results / discard / no list id.
_USAGE_HOLD, _USAGE_RESERVED, _USAGE_DISCARD, _USAGE_NONE = 0, 1, 2, 3

#: ILLEGAL REQUEST, OPERATION IN PROGRESS (SPC-4 Annex D 00h/16h): a list
#: identifier still in use by this I_T nexus.
OPERATION_IN_PROGRESS = (0x00, 0x16)

# RECEIVE COPY RESULTS service actions (SPC-3 §6.17 table 104).
_RCR_COPY_STATUS, _RCR_RECEIVE_DATA, _RCR_OPERATING_PARAMETERS, _RCR_FAILED_SEGMENT_DETAILS = 0, 1, 3, 4

# COPY MANAGER STATUS (SPC-3 §6.17.2 table 105).
_IN_PROGRESS, _DONE_OK, _DONE_ERROR = 0x00, 0x01, 0x02


class CopyTarget(Protocol):
    """What the copy manager needs of a logical unit (``LogicalUnit`` fits)."""

    @property
    def backend(self) -> Backend:
        """The disk behind the unit."""

    @property
    def block_size(self) -> int:
        """Logical block length in bytes."""

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""

    @property
    def write_protected(self) -> bool:
        """True when writes must be refused."""


@dataclass(slots=True)
class _Result:
    """What RECEIVE COPY RESULTS reports about one list identifier."""

    status: int = _IN_PROGRESS
    segments: int = 0
    transferred: int = 0  # bytes
    sense: bytes = b""


@dataclass(frozen=True, slots=True)
class _TargetDesc:
    offset: int  # byte of the descriptor in the parameter list
    designator: bytes
    designator_type: int
    association: int
    block_length: int


@dataclass(frozen=True, slots=True)
class _Segment:
    offset: int
    dc: bool
    src: int
    dst: int
    blocks: int
    src_lba: int
    dst_lba: int


def _copy_aborted(
    asc_ascq: tuple[int, int], segment: int | None = None, field_pointer: int | None = None
) -> CheckCondition:
    """COPY ABORTED with the failing segment number in COMMAND-SPECIFIC
    INFORMATION and the segment pointer (SD=0: byte of the parameter list,
    SPC-4 §4.5.2.4.5) in the sense-key-specific bytes."""
    return CheckCondition(
        SenseKey.COPY_ABORTED,
        *asc_ascq,
        command_specific=segment,
        field_pointer=field_pointer,
        cd=False,
    )


def _transfer_count(nbytes: int) -> tuple[int, int]:
    """(TRANSFER COUNT UNITS, TRANSFER COUNT) so the count fits 32 bits
    (SPC-3 §6.17.2 table 106: 00h bytes, F1h KiB ... F6h EiB)."""
    units, count = 0x00, nbytes
    while count > 0xFFFFFFFF:
        units = 0xF1 if units == 0 else units + 1
        count >>= 10
    return units, count


class XCopyManager:
    """The copy manager of one SCSI target device.

    ``lookup_lu`` maps an NAA designator (the bytes of the designator field
    of a VPD 83h designation descriptor) to a logical unit of this target,
    or None when no unit carries it.
    """

    def __init__(self, lookup_lu: Callable[[bytes], CopyTarget | None]) -> None:
        self._lookup = lookup_lu
        self._results: OrderedDict[tuple[str, int], _Result] = OrderedDict()
        self._active: set[tuple[str, int]] = set()
        self._running = 0

    # --- EXTENDED COPY ------------------------------------------------------

    async def extended_copy(self, nexus: Nexus, cdb: bytes, data: Buffer | None) -> None:
        """Run EXTENDED COPY (LID1). Returns when every segment is copied;
        raises CheckCondition (ILLEGAL REQUEST for a bad parameter list,
        COPY ABORTED when a segment fails)."""
        cmd = parse_extended_copy(cdb)
        if cmd.service_action:
            raise invalid_field_in_cdb(1, 4)  # only LID1 (service action 00h)
        plen = cmd.parameter_list_length
        params = memoryview(data if data is not None else b"")
        if len(params) < plen:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        params = params[:plen]
        if plen == 0:
            return  # SPC-4 §6.4.1: no copy, not an error
        if plen < _HEADER.size:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        list_id, flags, tdl, sdl, inline = _HEADER.unpack_from(params)
        usage = (flags >> 3) & 0x03
        if usage == _USAGE_RESERVED:
            raise invalid_field_in_parameter_list(1, 4)
        if usage == _USAGE_NONE and list_id != 0:
            raise invalid_field_in_parameter_list(0)
        if tdl + sdl > MAX_DESCRIPTOR_LIST_LENGTH:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        if _HEADER.size + tdl + sdl + inline > plen:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        targets = self._parse_targets(params, _HEADER.size, tdl)
        segments = self._parse_segments(params, _HEADER.size + tdl, sdl)
        ident = (nexus.key, list_id)
        if usage != _USAGE_NONE and ident in self._active:
            raise illegal_request(OPERATION_IN_PROGRESS)
        if self._running >= TOTAL_CONCURRENT_COPIES:
            raise illegal_request(INSUFFICIENT_RESOURCES)
        result = _Result()
        if usage == _USAGE_HOLD:
            self._hold(ident, result)
        if usage != _USAGE_NONE:
            self._active.add(ident)
        self._running += 1
        try:
            await self._run(targets, segments, result)
        except CheckCondition as exc:
            result.status = _DONE_ERROR
            result.sense = exc.sense.encode_fixed()
            raise
        else:
            result.status = _DONE_OK
        finally:
            self._running -= 1
            self._active.discard(ident)

    def _hold(self, ident: tuple[str, int], result: _Result) -> None:
        self._results.pop(ident, None)
        self._results[ident] = result
        while len(self._results) > MAX_HELD_RESULTS:
            for key, old in self._results.items():
                if old.status != _IN_PROGRESS:
                    del self._results[key]
                    break
            else:
                break

    @staticmethod
    def _parse_targets(params: memoryview, start: int, length: int) -> list[_TargetDesc]:
        """Walk the CSCD (target) descriptor list: only E4h, 32 bytes each."""
        out: list[_TargetDesc] = []
        pos, end = start, start + length
        while pos < end:
            code = params[pos]
            if code != _TD_IDENTIFICATION:
                raise illegal_request(UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, pos, cd=False)
            if pos + _TD_LEN > end:
                raise invalid_field_in_parameter_list(2)  # list length cuts a descriptor
            if len(out) == MAX_TARGET_DESCRIPTORS:
                raise illegal_request(TOO_MANY_TARGET_DESCRIPTORS, 2, cd=False)
            if params[pos + 1] & 0x1F != 0:
                # Only block devices (peripheral device type 00h).
                raise invalid_field_in_parameter_list(pos + 1, 4)
            # The LU ID TYPE and NUL bits are ignored, as SPC-4 asks.
            dlen = params[pos + 7]
            if dlen > 20:
                raise invalid_field_in_parameter_list(pos + 7)
            out.append(
                _TargetDesc(
                    offset=pos,
                    designator=bytes(params[pos + 8 : pos + 8 + dlen]),
                    designator_type=params[pos + 5] & 0x0F,
                    association=(params[pos + 5] >> 4) & 0x03,
                    block_length=int.from_bytes(params[pos + 29 : pos + 32], "big"),
                )
            )
            pos += _TD_LEN
        return out

    @staticmethod
    def _parse_segments(params: memoryview, start: int, length: int) -> list[_Segment]:
        """Walk the segment descriptor list: only 02h (block -> block)."""
        out: list[_Segment] = []
        pos, end = start, start + length
        while pos < end:
            if pos + 4 > end:
                raise invalid_field_in_parameter_list(8)
            code = params[pos]
            if code != _SD_BLOCK_TO_BLOCK:
                raise illegal_request(UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, pos, cd=False)
            dlen = int.from_bytes(params[pos + 2 : pos + 4], "big")
            if dlen != _SD_B2B_LEN - 4:
                raise invalid_field_in_parameter_list(pos + 2)
            if pos + _SD_B2B_LEN > end:
                raise invalid_field_in_parameter_list(8)
            if len(out) == MAX_SEGMENT_DESCRIPTORS:
                raise illegal_request(TOO_MANY_SEGMENT_DESCRIPTORS, 8, cd=False)
            _, b1, _, src, dst, blocks, src_lba, dst_lba = _SEG_B2B.unpack_from(params, pos)
            out.append(_Segment(pos, bool(b1 & 0x02), src, dst, blocks, src_lba, dst_lba))
            pos += _SD_B2B_LEN
        return out

    def _resolve(self, targets: list[_TargetDesc], index: int, seg_no: int, seg: _Segment, field: int) -> CopyTarget:
        """The unit a segment's CSCD index names (COPY ABORTED, COPY TARGET
        DEVICE NOT REACHABLE when it names nothing we can reach)."""
        if index >= len(targets):
            raise _copy_aborted(COPY_TARGET_DEVICE_NOT_REACHABLE, seg_no, seg.offset + field)
        td = targets[index]
        lu = None
        if td.designator_type == _DESIGNATOR_NAA and td.association == _ASSOC_LU:
            lu = self._lookup(td.designator)
        if lu is None:
            raise _copy_aborted(COPY_TARGET_DEVICE_NOT_REACHABLE, seg_no, td.offset + 4)
        if td.block_length != lu.block_size:
            raise invalid_field_in_parameter_list(td.offset + 29)
        return lu

    async def _run(self, targets: list[_TargetDesc], segments: list[_Segment], result: _Result) -> None:
        for seg_no, seg in enumerate(segments):
            src = self._resolve(targets, seg.src, seg_no, seg, 4)
            dst = self._resolve(targets, seg.dst, seg_no, seg, 6)
            # DC=1: BLOCK DEVICE NUMBER OF BLOCKS counts destination blocks.
            unit = dst.block_size if seg.dc else src.block_size
            nbytes = seg.blocks * unit
            if nbytes % src.block_size or nbytes % dst.block_size:
                raise _copy_aborted(COPY_TARGET_DEVICE_NOT_REACHABLE, seg_no, seg.offset + 10)
            if seg.src_lba * src.block_size + nbytes > src.num_blocks * src.block_size:
                raise _copy_aborted(COPY_TARGET_DEVICE_NOT_REACHABLE, seg_no, seg.offset + 12)
            if seg.dst_lba * dst.block_size + nbytes > dst.num_blocks * dst.block_size:
                raise _copy_aborted(COPY_TARGET_DEVICE_NOT_REACHABLE, seg_no, seg.offset + 20)
            if nbytes and dst.write_protected:
                raise _copy_aborted(WRITE_PROTECTED, seg_no, seg.offset + 6)
            try:
                await self._copy(src, seg.src_lba * src.block_size, dst, seg.dst_lba * dst.block_size, nbytes, result)
            except BackendError:
                raise _copy_aborted(THIRD_PARTY_DEVICE_FAILURE, seg_no, seg.offset) from None
            result.segments = seg_no + 1

    @staticmethod
    async def _copy(src: CopyTarget, src_off: int, dst: CopyTarget, dst_off: int, nbytes: int, result: _Result) -> None:
        """Move ``nbytes`` in CHUNK pieces, yielding between chunks."""
        same = src.backend is dst.backend
        # Overlapping ranges on one disk copy back to front when the target
        # lies above the source, so no chunk is overwritten before it is read.
        backward = same and src_off < dst_off < src_off + nbytes
        starts = range(0, nbytes, CHUNK)
        # A backend that waits on the network (NBD) is driven from a thread,
        # so the event loop never blocks on it (target/scsi/lu.py).
        slow = src.backend.slow_io or dst.backend.slow_io
        for rel in reversed(starts) if backward else starts:
            n = min(CHUNK, nbytes - rel)
            if slow:
                chunk = await asyncio.to_thread(src.backend.read, src_off + rel, n)
            else:
                chunk = src.backend.read(src_off + rel, n)
            if same:
                # A read may be a view of the same mmap the write changes.
                chunk = bytes(chunk)
            if slow:
                await asyncio.to_thread(dst.backend.write, dst_off + rel, chunk)
            else:
                dst.backend.write(dst_off + rel, chunk)
            result.transferred += n
            await asyncio.sleep(0)

    # --- RECEIVE COPY RESULTS ------------------------------------------------

    def receive_copy_results(self, nexus: Nexus, cdb: bytes) -> bytes:
        """RECEIVE COPY RESULTS (LID1 service actions 00h, 01h, 03h, 04h);
        the reply is cut to the ALLOCATION LENGTH."""
        cmd = parse_receive_copy_results(cdb)
        sa, list_id, alloc = cmd.service_action, cmd.list_identifier, cmd.allocation_length
        if sa == _RCR_OPERATING_PARAMETERS:
            return operating_parameters()[:alloc]
        if sa not in (_RCR_COPY_STATUS, _RCR_RECEIVE_DATA, _RCR_FAILED_SEGMENT_DETAILS):
            raise invalid_field_in_cdb(1, 4)
        ident = (nexus.key, list_id)
        res = self._results.get(ident)
        if res is None:
            raise invalid_field_in_cdb(2)
        if sa == _RCR_COPY_STATUS:
            units, count = _transfer_count(res.transferred)
            # HDD=0: no held data was discarded (we hold none).
            out = struct.pack(">IBHBI", 8, res.status, min(res.segments, 0xFFFF), units, count)
        elif sa == _RCR_RECEIVE_DATA:
            out = struct.pack(">I", 0)  # no held data (SPC-3 §6.17.3)
        else:
            if res.status == _IN_PROGRESS:
                raise invalid_field_in_cdb(2)
            if not res.sense:
                out = struct.pack(">I", 0)
            else:
                body = bytes(52) + struct.pack(">BxH", Status.CHECK_CONDITION, len(res.sense)) + res.sense
                out = struct.pack(">I", len(body)) + body
            # Details are handed out once (SPC-3 §6.17.5).
            del self._results[ident]
        return out[:alloc]


def operating_parameters() -> bytes:
    """RECEIVE COPY RESULTS / OPERATING PARAMETERS data (SPC-3 §6.17.4
    table 107)."""
    codes = bytes(_IMPLEMENTED_DESCRIPTORS)
    body = struct.pack(
        ">B3xHHIIIII2xHBBBB3xB",
        0x01,  # SNLID: LIST ID USAGE 11b is supported
        MAX_TARGET_DESCRIPTORS,
        MAX_SEGMENT_DESCRIPTORS,
        MAX_DESCRIPTOR_LIST_LENGTH,
        MAX_SEGMENT_LENGTH,
        MAX_INLINE_DATA_LENGTH,
        0,  # HELD DATA LIMIT
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE
        TOTAL_CONCURRENT_COPIES,
        min(TOTAL_CONCURRENT_COPIES, 0xFF),  # MAXIMUM CONCURRENT COPIES
        0,  # DATA SEGMENT GRANULARITY (log2)
        0,  # INLINE DATA GRANULARITY
        0,  # HELD DATA GRANULARITY
        len(codes),
    )
    return struct.pack(">I", len(body) + len(codes)) + body + codes


def _tpc_descriptor(dtype: int, body: bytes) -> bytes:
    """One third-party copy descriptor, padded to a multiple of four."""
    body = body + bytes(-len(body) % 4)
    return struct.pack(">HH", dtype, len(body)) + body


def third_party_copy_vpd(peripheral: int = 0x00) -> bytes:
    """The Third-party Copy VPD page (8Fh, SPC-4 §7.8.17) for a copy manager
    that implements EXTENDED COPY (LID1) and RECEIVE COPY RESULTS.

    ``peripheral``: byte 0 (qualifier and device type) of the page.
    """
    commands = [
        (Opcode.EXTENDED_COPY, bytes([0x00])),
        (
            Opcode.RECEIVE_COPY_RESULTS,
            bytes([_RCR_COPY_STATUS, _RCR_RECEIVE_DATA, _RCR_OPERATING_PARAMETERS, _RCR_FAILED_SEGMENT_DETAILS]),
        ),
    ]
    cmd_list = b"".join(bytes([op, len(sas)]) + sas for op, sas in commands)
    descriptors = [
        # Supported Commands (0001h, §7.8.17.3).
        _tpc_descriptor(0x0001, bytes([len(cmd_list)]) + cmd_list),
        # Parameter Data (0008h, §7.8.17.4).
        _tpc_descriptor(
            0x0008,
            struct.pack(
                ">4xHHII12x",
                MAX_TARGET_DESCRIPTORS,
                MAX_SEGMENT_DESCRIPTORS,
                MAX_DESCRIPTOR_LIST_LENGTH,
                MAX_INLINE_DATA_LENGTH,
            ),
        ),
        # Supported Descriptors (0009h, §7.8.17.5).
        _tpc_descriptor(0x0009, bytes([len(_IMPLEMENTED_DESCRIPTORS)]) + bytes(_IMPLEMENTED_DESCRIPTORS)),
        # General Copy Operations (8001h, §7.8.17.11).
        _tpc_descriptor(
            0x8001,
            struct.pack(">IIIBB14x", TOTAL_CONCURRENT_COPIES, TOTAL_CONCURRENT_COPIES, MAX_SEGMENT_LENGTH, 0, 0),
        ),
    ]
    body = b"".join(descriptors)
    return struct.pack(">BBH", peripheral, 0x8F, len(body)) + body

