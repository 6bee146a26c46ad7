"""Mutated PDUs against a live target (fixed seed, bounded): after every
batch a well-behaved initiator still logs in and reads back what it wrote,
nothing was logged at ERROR (no traceback, no "exception never retrieved"),
and the process's resident size stays bounded."""

from __future__ import annotations

import logging
import random
import socket
import struct
from collections.abc import Iterator

import pytest

from iscsi.constants import TMFunction
from iscsi.pdu import (
    DataOut,
    LogoutRequest,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TextRequest,
)
from iscsi.text import encode_text
from target.config import LunSpec
from tests.rawclient import RawClient
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.test_target_hardening import rss, until

SEED = 20261202
BATCHES = 80
PER_BATCH = 60
BLOCK = 512
PATTERN = bytes((i * 37 + 11) & 0xFF for i in range(64 * BLOCK))


class Errors(logging.Handler):
    """Collects every ERROR (and worse) record."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[Errors]:
    h = Errors()
    loggers = [logging.getLogger("aioiscsi"), logging.getLogger("asyncio")]
    for lg in loggers:
        lg.addHandler(h)
    try:
        yield h
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return bytes([op, 0]) + struct.pack(">IBHB", lba, 0, blocks, 0)


def seeds(c: RawClient, rng: random.Random) -> list[bytes]:
    """Valid PDUs of every kind the initiator sends, as wire bytes."""
    sn = c.cmdsn
    hd, dd = c.hd, c.dd
    pdus = [
        ScsiCommand(itt=1, cdb=rw10(0x28, 0, 8), read=True, expected_data_transfer_length=4096,
                    cmdsn=sn, expstatsn=c.statsn),
        ScsiCommand(itt=2, cdb=rw10(0x2A, 100, 8), write=True, final=False,
                    expected_data_transfer_length=4096, data=bytes(1024), cmdsn=sn + 1),
        DataOut(itt=2, buffer_offset=1024, datasn=0, data=bytes(1024)),
        NopOut(itt=3, cmdsn=sn + 2, data=b"fuzz"),
        TextRequest(itt=4, cmdsn=sn + 2, data=encode_text([("SendTargets", "All")])),
        TaskMgmtRequest(itt=5, cmdsn=sn + 2, function=TMFunction.ABORT_TASK,
                        referenced_task_tag=1),
        LogoutRequest(itt=6, cmdsn=sn + 2),
        ScsiCommand(itt=7, cdb=bytes([0x12, 0, 0, 0, 255, 0]), read=True,
                    expected_data_transfer_length=255, cmdsn=sn + 3),
    ]
    rng.shuffle(pdus)
    return [p.to_bytes(hd, dd) for p in pdus]


def mutate(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a header field replaced by an extreme value
        off = rng.choice([4, 8, 16, 20, 24, 28, 32, 36, 40, 44])
        b[off:off + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                     b"\x7f\xff\xff\xff", b"\x00\x00\x10\x00"])
    elif kind == 2:  # another opcode
        b[0] = (b[0] & 0xC0) | rng.randrange(64)
    elif kind == 3:  # truncated
        del b[rng.randrange(1, len(b)):]
    elif kind == 4:  # DataSegmentLength / TotalAHSLength lies
        b[4] = rng.randrange(256)
        b[5:8] = rng.randrange(1 << 24).to_bytes(3, "big")
    else:  # flags byte
        b[1] = rng.randrange(256)
    return bytes(b)


def well_behaved(t: RunningTarget, isid: int) -> None:
    """Log in, read back the pattern written at the start."""
    with RawClient(t.host, t.port) as c:
        c.login(TARGET_NAME, isid=isid)
        for attempt in range(2):  # the first may report a unit attention
            c.send(ScsiCommand(itt=100 + attempt, cdb=rw10(0x28, 0, 64), read=True,
                               expected_data_transfer_length=len(PATTERN),
                               cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
            got = bytearray()
            while True:
                pdu = c.recv()
                if hasattr(pdu, "buffer_offset") and pdu.itt == 100 + attempt:
                    got += bytes(pdu.data)
                    if getattr(pdu, "status_present", False):
                        status = pdu.status  # type: ignore[attr-defined]
                        break
                elif isinstance(pdu, ScsiResponse):
                    status = pdu.status
                    break
            if status == 0:
                assert bytes(got) == PATTERN
                return
        raise AssertionError("the well-behaved read failed twice")


@pytest.mark.slow
def test_mutated_pdus(errors: Errors) -> None:
    lun = LunSpec(lun=0, path="", backend="memory", size=8 << 20)
    with running_target(make_config([lun], login_timeout=5.0)) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME, isid=0x400000000777)
            for attempt in range(2):
                c.send(ScsiCommand(itt=50 + attempt, cdb=rw10(0x2A, 0, 64), write=True,
                                   expected_data_transfer_length=len(PATTERN),
                                   data=PATTERN[:8192], final=True, cmdsn=c.next_cmdsn(),
                                   expstatsn=c.statsn))
                while True:
                    pdu = c.recv()
                    if isinstance(pdu, ScsiResponse):
                        break
                    off = pdu.buffer_offset  # type: ignore[attr-defined]
                    n = pdu.desired_data_transfer_length  # type: ignore[attr-defined]
                    for i, pos in enumerate(range(off, off + n, 8192)):
                        c.send(DataOut(itt=50 + attempt, ttt=pdu.ttt,  # type: ignore[attr-defined]
                                       buffer_offset=pos, datasn=i, final=pos + 8192 >= off + n,
                                       data=PATTERN[pos:pos + 8192]))
                if pdu.status == 0:
                    break
        well_behaved(t, 0x400000000778)
        base = rss()
        rng = random.Random(SEED)
        sent = 0
        for batch in range(BATCHES):
            digests = batch % 2 == 1
            offers = {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"} if digests else None
            with RawClient(t.host, t.port, timeout=20) as c:
                c.login(TARGET_NAME, isid=0x400000001000 + batch, offers=offers)
                pool = seeds(c, rng)
                burst = b"".join(mutate(rng.choice(pool), rng) if rng.random() < 0.7
                                 else rng.choice(pool) for _ in range(PER_BATCH))
                sent += PER_BATCH
                try:
                    c.sock.sendall(burst)
                    c.sock.shutdown(socket.SHUT_WR)
                    # Read until the target closes: EOF makes it drop the
                    # connection, whatever state the stream is in.
                    while c.sock.recv(65536):
                        pass
                except OSError:
                    pass  # reset by the target: also an answer
            well_behaved(t, 0x400000000779)
            assert not errors.records, [r.getMessage() for r in errors.records]
            assert rss() - base < 128 << 20
        assert sent == BATCHES * PER_BATCH
        # Nothing leaked: every connection gone, every write reservation back.
        assert until(lambda: t.call(lambda: len(t.server.connections)) == 0)
        assert t.call(lambda: t.server.write_budget.used) == 0
