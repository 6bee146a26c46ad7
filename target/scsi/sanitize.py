"""SANITIZE (SBC-3 §5.30, §4.11): OVERWRITE, BLOCK ERASE, CRYPTO ERASE and
EXIT FAILURE MODE for a logical unit.

A sanitize operation belongs to the logical unit, not to the command that
started it: it runs as its own asyncio task, so neither an ABORT TASK, a
LUN or target reset nor the end of the session stops it (§4.11.1), and
while it runs every command but INQUIRY, REPORT LUNS and REQUEST SENSE gets
NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (04h/1Bh) with the
progress indication (REQUEST SENSE returns it as data). With IMMED the
status comes once the CDB and parameter list are checked; without it, when
the operation ends.

OVERWRITE writes the initialization pattern (repeated to fill each block,
inverted between passes when INVERT is set) over every block, in chunks
written from a worker thread; ``LUConfig.sanitize_rate`` bounds its speed
(bytes per second, 0 for none) so a sanitize does not starve the host's
other disks -- a real drive takes minutes to hours too. BLOCK ERASE and
CRYPTO ERASE deallocate every block (reads return zeroes, LBPRZ) and are
offered only on thin-provisioned units. On a file none of them removes
data from the host's storage (copy-on-write file systems and SSDs keep old
blocks): they make the logical unit read as erased, which is what an
initiator can observe.
"""

from __future__ import annotations

import asyncio
import logging
import time

from iscsi.scsi.constants import SenseKey
from iscsi.scsi.sense import (
    CheckCondition,
    data_protect,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)

from .lu_base import HandlerResult, UnitBase, _good
from .types import Buffer, Nexus, ScsiResult

log = logging.getLogger("aioiscsi.target")

OPCODE = 0x48
OVERWRITE = 0x01
BLOCK_ERASE = 0x02
CRYPTO_ERASE = 0x03
EXIT_FAILURE_MODE = 0x1F

#: LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (SPC-4 Annex D).
SANITIZE_IN_PROGRESS = (0x04, 0x1B)
#: Commands an ABORT TASK (or a reset) need not wait for: SANITIZE's
#: operation belongs to the logical unit and goes on (SBC-3 §4.11.1), so
#: the aborted command has nothing left to finish.
DETACHED_ON_ABORT = frozenset({OPCODE})
#: What a logical unit still answers while a sanitize runs (SBC-3 §4.11.2).
ALLOWED_WHILE_SANITIZING = frozenset({0x12, 0xA0, 0x03})  # INQUIRY, REPORT LUNS, REQUEST SENSE

_CHUNK = 1 << 20


class Sanitizing:
    """One running sanitize operation: its task and how far it got."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def progress(self) -> int:
        """SPC-4 §4.5.2.4.4 PROGRESS INDICATION: done/total in 65536ths."""
        return min(self.done * 65536 // self.total, 65535)

    def not_ready(self) -> CheckCondition:
        """The NOT READY a command gets while this runs."""
        return CheckCondition(SenseKey.NOT_READY, *SANITIZE_IN_PROGRESS, progress=self.progress)


class SanitizeCommands(UnitBase):
    """The SANITIZE handler; :class:`~target.scsi.lu.LogicalUnit` installs it."""

    sanitizing: Sanitizing | None = None

    def sanitize_actions(self) -> tuple[int, ...]:
        """The service actions this unit offers (REPORT SUPPORTED OPCODES)."""
        if self.thin:
            return (OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE)
        return (OVERWRITE, EXIT_FAILURE_MODE)

    def _sanitize(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """SANITIZE, SBC-3 §5.30."""
        if len(cdb) < 10:
            raise invalid_field_in_cdb(0)
        immed, sa = bool(cdb[1] & 0x80), cdb[1] & 0x1F
        plen = int.from_bytes(cdb[7:9], "big")
        if cdb[1] & 0x40:
            # ZNR (SBC-4) is for zoned devices; reserved in SBC-3.
            raise invalid_field_in_cdb(1, 6)
        for i in range(2, 7):
            if cdb[i]:  # reserved bytes
                raise invalid_field_in_cdb(i)
        if sa not in self.sanitize_actions():
            raise invalid_field_in_cdb(1, 4)
        if sa != OVERWRITE:
            if plen:  # BLOCK ERASE, CRYPTO ERASE, EXIT FAILURE MODE take none
                raise invalid_field_in_cdb(7)
            if sa == EXIT_FAILURE_MODE:
                return _good()  # no sanitize here ever ends in failure mode
            pattern, passes, invert = b"", 0, False
        else:
            pattern, passes, invert = self._overwrite_parameters(plen, data)
        self._ready()
        if self.write_protected:
            raise data_protect()
        job = Sanitizing(self.num_blocks)
        self.sanitizing = job
        job.task = asyncio.get_running_loop().create_task(
            self._run_sanitize(job, sa, pattern, passes, invert))
        if immed:
            return _good()
        return self._await_sanitize(job)

    def _overwrite_parameters(self, plen: int, data: Buffer | None) -> tuple[bytes, int, bool]:
        """(pattern, passes, invert) from an OVERWRITE parameter list
        (SBC-3 §5.30.3): a 4-byte header, then the initialization pattern
        of 1..block-length bytes; the list must be exactly that long."""
        if plen < 5:
            raise invalid_field_in_cdb(7)
        raw = bytes(data or b"")
        if len(raw) < plen:
            raise invalid_field_in_cdb(7)
        head = raw[:4]
        passes, test, invert = head[0] & 0x1F, (head[0] >> 5) & 3, bool(head[0] & 0x80)
        length = int.from_bytes(head[2:4], "big")
        if passes == 0:
            raise invalid_field_in_parameter_list(0, 4)
        if test:
            raise invalid_field_in_parameter_list(0, 6)
        if length == 0 or length > self.block_size:
            raise invalid_field_in_parameter_list(2)
        if plen != length + 4:
            raise invalid_field_in_cdb(7)
        return raw[4 : 4 + length], passes, invert

    async def _await_sanitize(self, job: Sanitizing) -> ScsiResult:
        assert job.task is not None
        # Shielded: aborting this command must not stop the operation.
        await asyncio.shield(job.task)
        return ScsiResult(0, b"", None)

    async def _run_sanitize(self, job: Sanitizing, sa: int, pattern: bytes, passes: int,
                            invert: bool) -> None:
        started = time.monotonic()
        size = self.num_blocks * self.block_size
        try:
            if sa == OVERWRITE:
                await self._overwrite(job, size, pattern, passes, invert)
            else:
                await asyncio.to_thread(self.backend.discard, 0, size)
                job.done = job.total
            await asyncio.to_thread(self.backend.flush)
            log.info("LUN sanitize (service action %#x) finished in %.1f s", sa,
                     time.monotonic() - started)
        except Exception:  # noqa: BLE001 - logged; the unit becomes usable again
            log.exception("LUN sanitize (service action %#x) failed", sa)
        finally:
            self.sanitizing = None

    async def _overwrite(self, job: Sanitizing, size: int, pattern: bytes, passes: int,
                         invert: bool) -> None:
        block = (pattern * (self.block_size // len(pattern) + 1))[: self.block_size]
        rate = self.config.sanitize_rate
        chunk = min(_CHUNK, size)
        begin = time.monotonic()
        written = 0
        job.total = max(passes * (size // self.block_size), 1)
        for n in range(passes):
            fill = bytes(b ^ 0xFF for b in block) if invert and n % 2 else block
            buf = fill * (chunk // self.block_size)
            pos = 0
            while pos < size:
                piece = buf if pos + chunk <= size else buf[: size - pos]
                await asyncio.to_thread(self.backend.write, pos, piece)
                pos += len(piece)
                written += len(piece)
                job.done = written // self.block_size
                if rate:
                    # Pace to the configured rate (production pacing, not
                    # synchronisation): sleep until the bytes are "due".
                    ahead = written / rate - (time.monotonic() - begin)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
