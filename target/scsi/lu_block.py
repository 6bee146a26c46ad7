"""SBC-3 block commands of a logical unit: READ and WRITE (the hot path),
VERIFY, WRITE AND VERIFY, ORWRITE, COMPARE AND WRITE, WRITE SAME, UNMAP, GET
LBA STATUS, SYNCHRONIZE CACHE, PRE-FETCH and READ CAPACITY."""

from __future__ import annotations

from iscsi.scsi.rw import _RW_PARSERS, parse_rw
from iscsi.scsi.sbc import (
    ProvisioningStatus,
    ReadCapacity16Data,
    build_lba_status_data,
    build_read_capacity10_data,
    build_read_capacity16_data,
    parse_get_lba_status,
    parse_pre_fetch,
    parse_read_capacity10,
    parse_read_capacity16,
    parse_synchronize_cache,
    parse_unmap,
    parse_unmap_parameter_list,
)
from iscsi.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    LBA_OUT_OF_RANGE,
    PARAMETER_LIST_LENGTH_ERROR,
    data_protect,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    miscompare,
)

from .lu_base import (
    _GOOD,
    HandlerResult,
    UnitBase,
    _alloc,
    _good,
    first_difference,
)
from .types import Buffer, Nexus, ScsiResult


#: Byte offset of the TRANSFER LENGTH field by CDB group (SBC-3 §5): where
#: the field pointer of a transfer beyond the Block Limits maximum points.
_LENGTH_FIELD = {0: 4, 1: 7, 2: 7, 4: 10, 5: 6}


class BlockCommands(UnitBase):
    """The SBC-3 handlers; :class:`~target.scsi.lu.LogicalUnit` installs them."""

    # ----- READ / WRITE (hot path) ------------------------------------------

    def _do_read(self, lba: int, n: int, field: int) -> ScsiResult:
        if not self.medium_present or not self.started:
            self._ready()
        if lba + n > self.num_blocks:
            raise illegal_request(LBA_OUT_OF_RANGE)
        if n == 0:
            # SBC-3 §5.8: a TRANSFER LENGTH of zero is not an error
            return ScsiResult(_GOOD, b"", None)
        self._max_transfer(n, field)
        shift = self._shift
        return ScsiResult(_GOOD, b"", self.backend.read(lba << shift, n << shift))

    def _read(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """READ(6/10/12/16), SBC-3 §5.11-§5.14 (READ(6) length 0 is 256
        blocks, which the parser applies)."""
        # One unpacking of the parsed tuple: cheaper than attribute access
        # on the hot path.
        _, op, lba, n, _, _, _, protect, _, _, _, _, rarc, fua_nv = _RW_PARSERS[cdb[0]](cdb)
        if protect or rarc or fua_nv:
            # No protection information, no rebuild assist; FUA_NV has no
            # non-volatile cache to bypass here.
            raise invalid_field_in_cdb(1, 7 if protect else (2 if rarc else 1))
        return self._do_read(lba, n, _LENGTH_FIELD[op >> 5])

    def _store(self, lba: int, n: int, data: Buffer | None, fua: bool = False) -> None:
        """Write n blocks from the Data-Out buffer without copying it.

        When the initiator sent less than the CDB asked for (iSCSI EDTL <
        transfer length), only what arrived is written, as FCP-4/RFC 7143
        §11.4.5.1 describe; a trailing partial block is merged with the
        medium's contents. ``fua`` writes through the backend's own FUA.
        """
        write = self.backend.write_fua if fua else self.backend.write
        shift = self._shift
        need = n << shift
        offset = lba << shift
        got = 0 if data is None else len(data)
        if got >= need:
            assert data is not None
            write(offset, data if got == need else memoryview(data)[:need])
            return
        if got == 0 or data is None:
            return
        mv = memoryview(data)
        whole = (got >> shift) << shift
        if whole:
            write(offset, mv[:whole])
        rest = got - whole
        if rest:
            block = bytearray(self.backend.read(offset + whole, self.block_size))
            block[:rest] = mv[whole:got]
            write(offset + whole, block)

    def _write(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """WRITE(6/10/12/16), SBC-3 §5.46-§5.49: FUA (or write-through
        caching) makes the data durable before GOOD; FUA_NV is ignored."""
        _, op, lba, n, _, fua, _, protect, _, _, _, _, _, _ = _RW_PARSERS[cdb[0]](cdb)
        if protect:  # WRPROTECT without protection information
            raise invalid_field_in_cdb(1, 7)
        if not self.medium_present or not self.started:
            self._ready()
        if self.write_protected:
            raise data_protect()
        if lba + n > self.num_blocks:
            raise illegal_request(LBA_OUT_OF_RANGE)
        if n == 0:
            return ScsiResult(_GOOD, b"", None)
        self._max_transfer(n, _LENGTH_FIELD[op >> 5])
        durable = fua or not self._wce
        if durable and self.backend.native_fua:
            # NBD_CMD_FLAG_FUA: only this write is made durable, no flush
            # of everything else (SBC-3 §5.46 asks no more).
            self._store(lba, n, data, fua=True)
            return ScsiResult(_GOOD, b"", None)
        self._store(lba, n, data)
        if durable:
            return self._flush_then(ScsiResult(_GOOD, b"", None))
        return ScsiResult(_GOOD, b"", None)

    def _write_atomic(self, nexus: Nexus, cdb: bytes, data: Buffer | None,
                      el: int | None) -> HandlerResult:
        """WRITE ATOMIC(16), SBC-4 §5.48 / §4.29: all of the blocks or none.

        The write reaches the backend in one call made while no other
        command of this logical unit runs (commands execute one at a time on
        the event loop), so no other command sees it half done; a transfer
        that arrives short is not written at all. Across a power loss the
        backing store decides (a file system's block writes are not
        atomic), as for any write caching.
        """
        if len(cdb) < 16:
            raise invalid_field_in_cdb(0)
        if cdb[1] & 0xE0:  # WRPROTECT without protection information
            raise invalid_field_in_cdb(1, 7)
        if cdb[10] or cdb[11]:
            # ATOMIC BOUNDARY: the Block Limits page offers none (size 0).
            raise invalid_field_in_cdb(10)
        lba = int.from_bytes(cdb[2:10], "big")
        n = int.from_bytes(cdb[12:14], "big")
        if not self.medium_present or not self.started:
            self._ready()
        if self.write_protected:
            raise data_protect()
        if lba + n > self.num_blocks:
            raise illegal_request(LBA_OUT_OF_RANGE)
        if n == 0:
            return ScsiResult(_GOOD, b"", None)
        # MAXIMUM ATOMIC TRANSFER LENGTH is the transfer limit (vpd.py).
        self._max_transfer(n, 12)
        if data is None or len(data) < n << self._shift:
            # Less data than the CDB's blocks: writing part would break the
            # all-or-nothing promise, so nothing is written.
            raise invalid_field_in_cdb(12)
        self._store(lba, n, data)
        if cdb[1] & 0x08 or not self._wce:
            return self._flush_then(ScsiResult(_GOOD, b"", None))
        return ScsiResult(_GOOD, b"", None)

    # ----- VERIFY / WRITE AND VERIFY / ORWRITE / COMPARE AND WRITE ----------

    def _verify(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """VERIFY(10/12/16), SBC-3 §5.30: BYTCHK 0 checks the medium only,
        1 compares n blocks, 3 compares one block against each of n."""
        cmd = parse_rw(cdb)
        if cmd.protect:
            raise invalid_field_in_cdb(1, 7)
        lba, n, bytchk = cmd.lba, cmd.blocks, cmd.bytchk
        self._ready()
        self._range(lba, n)
        if n == 0 or bytchk == 0:
            return _good()
        self._max_transfer(n, _LENGTH_FIELD[cmd.opcode >> 5])
        shift = self._shift
        medium = self.backend.read(lba << shift, n << shift)
        if bytchk == 1:
            expect: Buffer = data if data is not None else b""
            if len(expect) > len(medium):
                expect = memoryview(expect)[: len(medium)]
            cmp_len = len(expect)
            diff = first_difference(memoryview(medium)[:cmp_len], expect)
        else:
            pattern = bytes(memoryview(data or b"")[: self.block_size]).ljust(self.block_size, b"\0")
            diff = first_difference(medium, pattern * n)
        if diff >= 0:
            raise miscompare(diff)
        return _good()

    def _write_verify(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """WRITE AND VERIFY(10/12/16), SBC-3 §5.37: written data is forced to
        the medium (like FUA) so the verification means something."""
        cmd = parse_rw(cdb)
        if cmd.protect:
            raise invalid_field_in_cdb(1, 7)
        lba, n = cmd.lba, cmd.blocks
        self._ready()
        self._writable()
        self._range(lba, n)
        if n == 0:
            return _good()
        self._max_transfer(n, _LENGTH_FIELD[cmd.opcode >> 5])
        self._store(lba, n, data)
        return self._flush_then(_good())

    def _orwrite(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """ORWRITE(16), SBC-3 §5.10: medium := medium OR data."""
        cmd = parse_rw(cdb)
        if cmd.protect:
            raise invalid_field_in_cdb(1, 7)
        lba, n = cmd.lba, cmd.blocks
        self._ready()
        self._writable()
        self._range(lba, n)
        if n == 0:
            return _good()
        self._max_transfer(n, 10)
        shift = self._shift
        size = n << shift
        src = bytes(memoryview(data or b"")[:size]).ljust(size, b"\0")
        cur = self.backend.read(lba << shift, size)
        merged = (int.from_bytes(cur, "big") | int.from_bytes(src, "big")).to_bytes(size, "big")
        self.backend.write(lba << shift, merged)
        if cmd.fua or not self._wce:
            return self._flush_then(_good())
        return _good()

    def _compare_and_write(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """COMPARE AND WRITE, SBC-3 §5.2. Compare and write happen with no
        await in between, so the pair is atomic against every other command
        on this event loop; INFORMATION of a MISCOMPARE is the offset of the
        first differing byte."""
        cmd = parse_rw(cdb)
        if cmd.protect:
            raise invalid_field_in_cdb(1, 7)
        if cmd.fua_nv:
            raise invalid_field_in_cdb(1, 1)
        lba, n = cmd.lba, cmd.blocks
        if n > self.config.max_compare_write_blocks:
            raise invalid_field_in_cdb(13)
        shift = self._shift
        size = n << shift
        if el is not None and el != 2 * size:
            # Data-Out must be exactly the verify + write instances (SBC-3
            # §5.2); libiscsi sends 256 blocks, which NLB (one byte) wraps to 0.
            raise invalid_field_in_cdb(13)
        self._ready()
        self._writable()
        self._range(lba, n)
        if n == 0:
            return _good()
        got = 0 if data is None else len(data)
        if got < 2 * size:
            raise invalid_field_in_cdb(13)
        assert data is not None
        mv = memoryview(data)
        current = self.backend.read(lba << shift, size)
        diff = first_difference(current, mv[:size])
        if diff >= 0:
            raise miscompare(diff)
        self.backend.write(lba << shift, mv[size : 2 * size])
        if cmd.fua or not self._wce:
            return self._flush_then(_good())
        return _good()

    # ----- WRITE SAME / UNMAP / GET LBA STATUS ------------------------------

    def _write_same(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """WRITE SAME(10/16), SBC-3 §5.42/§5.43: NUMBER OF LOGICAL BLOCKS 0
        means "to the end of the medium" (WSNZ=0); UNMAP with a zero block
        (or NDOB) deallocates on a thin unit."""
        cmd = parse_rw(cdb)
        lba, n, ndob, unmap = cmd.lba, cmd.blocks, cmd.ndob, cmd.unmap
        field = _LENGTH_FIELD[cmd.opcode >> 5]
        if cmd.protect:
            raise invalid_field_in_cdb(1, 7)
        if cmd.anchor:  # ANC_SUP is 0 (VPD B2h)
            raise invalid_field_in_cdb(1, 4)
        if unmap and not self.thin:
            # A fully provisioned unit reports LBPWS/LBPWS10 = 0, so the
            # UNMAP bit is refused rather than silently ignored (SBC-3
            # §5.43; libiscsi checks the VPD B2h bits agree).
            raise invalid_field_in_cdb(1, 3)
        self._ready()
        self._writable()
        if lba > self.num_blocks:
            raise illegal_request(LBA_OUT_OF_RANGE)
        if n == 0:
            n = self.num_blocks - lba
        self._range(lba, n)
        limit = self.config.max_write_same_blocks
        if limit and n > limit:
            raise invalid_field_in_cdb(field)
        bs = self.block_size
        if ndob:
            block = b""
        else:
            got = 0 if data is None else len(data)
            if got != bs or (el is not None and el != bs):
                raise invalid_field_in_cdb(field)
            assert data is not None
            block = bytes(data)
        if n == 0:
            return _good()
        shift = self._shift
        off, size = lba << shift, n << shift
        if unmap and self.thin:
            # UNMAP=1 on a unit with LBPWS: deallocate whatever the data
            # block holds; with LBPRZ the range then reads as zeroes
            # (SBC-3 §4.7.3.4, §5.43).
            self.backend.discard(off, size)
        elif ndob or block.count(0) == bs:
            self.backend.write_zeroes(off, size)
        else:
            per = max(1, (1 << 20) >> shift)
            chunk = block * min(n, per)
            pos = off
            end = off + size
            while pos < end:
                k = min(len(chunk), end - pos)
                self.backend.write(pos, chunk if k == len(chunk) else memoryview(chunk)[:k])
                pos += k
        if not self._wce:
            return self._flush_then(_good())
        return _good()

    def _unmap(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """UNMAP, SBC-3 §5.28: all descriptors are validated before any
        range is deallocated."""
        if not self.thin:
            raise illegal_request(INVALID_COMMAND_OPERATION_CODE, 0)
        cmd = parse_unmap(cdb)  # a length of 1..7 is PARAMETER LIST LENGTH ERROR
        if cmd.anchor:  # ANC_SUP is 0 (VPD B2h)
            raise invalid_field_in_cdb(1, 0)
        plen = cmd.parameter_list_length
        self._ready()
        self._writable()
        if plen == 0:
            return _good()
        buf = memoryview(data or b"")[:plen]
        if len(buf) < 8:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        descriptors = parse_unmap_parameter_list(buf)
        if len(descriptors) > self.config.max_unmap_descriptors > 0:
            raise invalid_field_in_parameter_list(2)
        ranges: list[tuple[int, int]] = []
        limit = self.config.max_unmap_blocks
        for i, (lba, nblk) in enumerate(descriptors):
            if lba + nblk > self.num_blocks:
                raise illegal_request(LBA_OUT_OF_RANGE)
            if limit and nblk > limit:
                raise invalid_field_in_parameter_list(8 + 16 * i + 8)
            if nblk:
                ranges.append((lba, nblk))
        shift = self._shift
        for lba, nblk in ranges:
            self.backend.discard(lba << shift, nblk << shift)
        return _good()

    def _get_lba_status(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """GET LBA STATUS, SBC-3 §5.7: descriptors from backend.extents,
        the first starting at the requested LBA, as many as fit."""
        cmd = parse_get_lba_status(cdb)
        lba, alloc = cmd.lba, cmd.allocation_length
        self._ready()
        if lba >= self.num_blocks:
            raise illegal_request(LBA_OUT_OF_RANGE)
        if alloc == 0:
            return _good(b"")
        max_desc = max(1, (alloc - 8) // 16)
        shift = self._shift
        bs = self.block_size
        # Look at a bounded window so a huge sparse device stays cheap.
        window = min(self.num_blocks - lba, max(1, self.config.max_unmap_blocks or 0x40000) * 4)
        descs: list[tuple[int, int, bool]] = []
        for ext in self.backend.extents(lba << shift, window << shift):
            start = ext.offset >> shift
            end = (ext.offset + ext.length + bs - 1) >> shift
            start = max(start, lba)
            if end <= start:
                continue
            if descs and descs[-1][2] == ext.mapped and descs[-1][0] + descs[-1][1] == start:
                s, c, m = descs[-1]
                descs[-1] = (s, c + end - start, m)
            elif descs and descs[-1][0] + descs[-1][1] > start:
                # partially mapped block: already reported as the earlier run
                s, c, m = descs[-1]
                if end > s + c:
                    descs.append((s + c, end - s - c, ext.mapped))
            else:
                if len(descs) == max_desc:
                    break
                descs.append((start, end - start, ext.mapped))
        out = build_lba_status_data([
            (s, c, ProvisioningStatus.MAPPED if m else ProvisioningStatus.DEALLOCATED)
            for s, c, m in descs[:max_desc]
        ])
        return _good(_alloc(out, alloc))

    # ----- cache / prefetch ------------------------------------------------

    def _sync_cache(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """SYNCHRONIZE CACHE(10/16), SBC-3 §5.24: fsync in a thread."""
        cmd = parse_synchronize_cache(cdb)
        self._ready()
        self._range(cmd.lba, cmd.blocks)
        return self._flush_then(_good())

    def _prefetch(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """PRE-FETCH(10/16), SBC-3 §5.9. We keep no cache of our own, which
        is the "not enough cache" case: GOOD rather than CONDITION MET
        (libiscsi's conformance suite expects GOOD too)."""
        cmd = parse_pre_fetch(cdb)
        self._ready()
        self._range(cmd.lba, cmd.blocks)
        return _good()

    # ----- capacity ----------------------------------------------------------

    def _read_capacity10(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """READ CAPACITY(10), SBC-3 §5.15: a capacity too large for 32
        bits reports FFFFFFFFh (the initiator then asks READ CAPACITY(16))."""
        parse_read_capacity10(cdb)
        self._ready()
        return _good(build_read_capacity10_data(self.num_blocks - 1, self.block_size))

    def _read_capacity16(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """READ CAPACITY(16), SBC-3 §5.16: no protection information; LBPME
        and LBPRZ from thin provisioning (§4.7.3)."""
        cmd = parse_read_capacity16(cdb)
        self._ready()
        thin = self.thin
        out = build_read_capacity16_data(ReadCapacity16Data(
            last_lba=self.num_blocks - 1,
            block_length=self.block_size,
            lbppbe=self.config.physical_block_exponent & 0x0F,
            lbpme=thin,
            lbprz=thin and self.backend.zero_after_discard,
        ))
        return _good(_alloc(out, cmd.allocation_length))

