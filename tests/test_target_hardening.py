"""Hostile load against a live target: what a peer can make us spend, and
commands that used to crash or never be answered. Each test failed on the
target before the full-feature engine and the connection limits."""

from __future__ import annotations

import dataclasses
import gc
import logging
import socket
import struct
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from iscsi.constants import TMFunction
from iscsi.pdu import (
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)
from iscsi.scsi.constants import Status
from iscsi.serial import sn_add
from iscsi.text import encode_text
from target.config import LunSpec, ServerConfig
from tests.rawclient import RawClient
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target

MEM = LunSpec(lun=0, path="", backend="memory", size=16 << 20)


def rss() -> int:
    """Resident bytes of this process (the target runs in one of its threads)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def until(cond: Callable[[], bool], seconds: float = 20.0) -> bool:
    """Poll ``cond`` until it holds or the bound passes (server state seen
    from the test thread; no fixed sleep)."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def started(cfg: ServerConfig) -> Iterator[RunningTarget]:
    with running_target(cfg) as t:
        yield t


@pytest.fixture
def target() -> Iterator[RunningTarget]:
    yield from started(make_config([MEM]))


def write16(lba: int, blocks: int) -> bytes:
    return bytes([0x8A, 0]) + struct.pack(">QI", lba, blocks) + bytes(2)


def logged_in(t: RunningTarget, isid: int) -> RawClient:
    c = RawClient(t.host, t.port)
    c.login(TARGET_NAME, isid=isid)
    # The first command reports the power-on unit attention.
    c.send(ScsiCommand(itt=0x7777, cdb=bytes(6), cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
    assert isinstance(c.recv(), ScsiResponse)
    return c


# ------------------------------------------------------- connections (item 3)
def test_silent_connections_cost_little_and_memory_comes_back(target: RunningTarget) -> None:
    n = 300
    base = rss()
    socks = [socket.create_connection((target.host, target.port), timeout=10) for _ in range(n)]
    assert until(lambda: target.call(lambda: len(target.server.connections)) == n)
    grown = rss() - base
    # A staging buffer of 256 KiB each was 75 MB here; now about 17 KiB.
    assert grown < 30 << 20, f"{n} silent connections grew RSS by {grown >> 20} MiB"
    for s in socks:
        s.close()
    assert until(lambda: target.call(lambda: len(target.server.connections)) == 0)
    assert rss() - base < 30 << 20


def test_closed_connection_is_freed_without_the_garbage_collector(
        target: RunningTarget) -> None:
    gc.collect()
    gc.disable()
    try:
        s = socket.create_connection((target.host, target.port), timeout=10)
        assert until(lambda: target.call(lambda: len(target.server.connections)) == 1)
        ref = target.call(lambda: weakref.ref(next(iter(target.server.connections))))
        s.sendall(bytes([0x43]) + bytes(20))  # half a login header
        s.close()
        assert until(lambda: target.call(lambda: len(target.server.connections)) == 0)
        # No reference cycle keeps it: it is gone by reference counting.
        assert until(lambda: target.call(ref) is None, 5.0)
    finally:
        gc.enable()


def test_connection_limit(caplog: pytest.LogCaptureFixture) -> None:
    cfg = dataclasses.replace(make_config([MEM]), max_connections=3)
    for t in started(cfg):
        socks = [socket.create_connection((t.host, t.port), timeout=10) for _ in range(3)]
        assert until(lambda: t.call(lambda: len(t.server.connections)) == 3)
        with caplog.at_level(logging.WARNING, logger="aioiscsi.target"):
            extra = [socket.create_connection((t.host, t.port), timeout=10) for _ in range(20)]
            for s in extra:  # each is closed at once
                assert s.recv(1) == b""
                s.close()
        refusals = [r for r in caplog.records if "max_connections" in r.getMessage()]
        assert 1 <= len(refusals) <= 2  # one line, not twenty
        for s in socks:
            s.close()
        assert until(lambda: t.call(lambda: len(t.server.connections)) == 0)
        # Room again: a normal login works.
        logged_in(t, 0x400000000001).close()


# ------------------------------------------------- write memory (item 2)
def test_writes_without_data_allocate_nothing(target: RunningTarget) -> None:
    base = rss()
    clients = [logged_in(target, 0x400000000100 + i) for i in range(4)]
    try:
        statuses: list[int] = []
        for c in clients:
            for i in range(5):
                c.send(ScsiCommand(itt=i + 1, cdb=write16(0, (64 << 20) // 512), write=True,
                                   expected_data_transfer_length=64 << 20,
                                   cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
        for c in clients:
            # Each write either gets an R2T (and waits for data that never
            # comes) or, beyond the write budget, TASK SET FULL.
            for _ in range(5):
                pdu = c.recv()
                if isinstance(pdu, ScsiResponse):
                    statuses.append(pdu.status)
        assert rss() - base < 64 << 20
        # 20 x 64 MiB against the default 256 MiB budget: 4 admitted.
        assert statuses.count(Status.TASK_SET_FULL) == 16
        assert target.call(lambda: target.server.write_budget.used) == 256 << 20
    finally:
        for c in clients:
            c.close()
    assert until(lambda: target.call(lambda: target.server.write_budget.used) == 0)


# --------------------------------------------- commands answered (item 4)
def test_w_bit_without_data_answers_good(target: RunningTarget) -> None:
    c = logged_in(target, 0x400000000201)
    with c:
        c.send(ScsiCommand(itt=1, cdb=bytes(6), write=True, expected_data_transfer_length=0,
                           cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
        rsp = c.recv()
        assert isinstance(rsp, ScsiResponse) and rsp.status == Status.GOOD


def test_write_asking_far_beyond_edtl_is_answered(target: RunningTarget) -> None:
    c = logged_in(target, 0x400000000202)
    with c:
        # The CDB asks for 0xFFFFFFFF blocks (2 TiB), the header for 512 bytes.
        c.send(ScsiCommand(itt=1, cdb=write16(0, 0xFFFFFFFF), write=True,
                           expected_data_transfer_length=512, data=bytes(512),
                           cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
        rsp = c.recv()
        assert isinstance(rsp, ScsiResponse) and rsp.itt == 1
        assert rsp.status in (Status.GOOD, Status.CHECK_CONDITION)


# --------------------------------------------------- the window (item 5)
@pytest.mark.parametrize("kind", ["nop", "text", "tmf"])
def test_held_pdus_leave_the_window_whole(target: RunningTarget, kind: str) -> None:
    c = logged_in(target, 0x400000000300)
    with c:
        first = c.cmdsn

        def pdu(i: int) -> NopOut | TextRequest | TaskMgmtRequest:
            sn = sn_add(first, i)
            if kind == "nop":
                return NopOut(itt=100 + i, cmdsn=sn, expstatsn=c.statsn, immediate=False)
            if kind == "text":
                return TextRequest(itt=100 + i, cmdsn=sn, expstatsn=c.statsn,
                                   data=encode_text([("X-test", "1")]))
            return TaskMgmtRequest(itt=100 + i, cmdsn=sn, expstatsn=c.statsn, immediate=False,
                                   function=TMFunction.ABORT_TASK, referenced_task_tag=5,
                                   refcmdsn=first)
        for i in range(1, 121):  # ahead of ExpCmdSN: held
            c.send(pdu(i))
        c.send(pdu(0))  # fills the gap: all 121 run
        answers = 0
        while answers < 121:
            p = c.recv()
            assert isinstance(p, (NopIn, TextResponse, TaskMgmtResponse))
            answers += 1
        c.send(NopOut(itt=999, cmdsn=sn_add(first, 121), expstatsn=c.statsn, immediate=True))
        nop = c.recv()
        assert isinstance(nop, NopIn) and nop.itt == 999
        assert nop.expcmdsn == sn_add(first, 121)
        depth = 128
        assert (nop.maxcmdsn - nop.expcmdsn + 1) & 0xFFFFFFFF == depth
