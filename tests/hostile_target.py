# mypy: disable-error-code="arg-type"
"""A small deliberately misbehaving iSCSI target for the initiator's tests.

It logs in with the real target login state machine
(:class:`iscsi.login.TargetLogin`), answers NOP-Outs, Logout and task
management politely, and answers each SCSI command with whatever the
chosen ``behaviour`` writes -- typically a protocol violation. It counts
logins and the Data-Out bytes it receives, so a test can tell a bounded
retry from a reconnect storm.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from iscsi.constants import RESERVED_TAG, TMResponse
from iscsi.framing import PDUReader
from iscsi.login import SimpleLoginPolicy, TargetEntry, TargetLogin
from iscsi.pdu import (
    PDU,
    DataOut,
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
)

IQN = "iqn.2024-01.test.hostile:disk"


class HostileConnection:
    """One logged-in connection: the behaviour answers through :meth:`send`."""

    def __init__(self, target: HostileTarget, writer: asyncio.StreamWriter, statsn: int) -> None:
        self.target = target
        self.writer = writer
        self.statsn = statsn
        self.expcmdsn = 1

    def window(self) -> dict[str, int]:
        """StatSN (advanced) and a wide-open window for a response."""
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return {"statsn": sn, "expcmdsn": self.expcmdsn, "maxcmdsn": self.expcmdsn + 31}

    def peek(self) -> dict[str, int]:
        """The window without advancing StatSN (R2T, Data-In without status)."""
        return {"statsn": self.statsn, "expcmdsn": self.expcmdsn,
                "maxcmdsn": self.expcmdsn + 31}

    def send(self, *pdus: PDU) -> None:
        for pdu in pdus:
            self.writer.write(b"".join(bytes(b) for b in pdu.encode(False, False)))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


Behaviour = Callable[[HostileConnection, ScsiCommand], Awaitable[None] | None]


class HostileTarget:
    """``behaviour(conn, cmd)`` answers every SCSI command."""

    def __init__(self, behaviour: Behaviour, *, answer_tmf: bool = True,
                 silent: bool = False) -> None:
        self.behaviour = behaviour
        self.answer_tmf = answer_tmf
        #: After the login, answer nothing at all (not even NOP-Outs).
        self.silent = silent
        self.logins = 0
        self.data_out_bytes = 0
        #: READs and WRITEs received (the behaviour's business).
        self.commands = 0
        self.tmfs: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._policy = SimpleLoginPolicy(targets={IQN: TargetEntry(IQN)})
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HostileTarget:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._run(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pdus = PDUReader(max_data_segment_length=1 << 20)
        login = TargetLogin(self._policy, 1, initial_statsn=1)
        conn: HostileConnection | None = None
        while True:
            data = await reader.read(65536)
            if not data:
                return
            got = pdus.feed(data)
            while got:
                for pdu in got:
                    if conn is None:
                        assert isinstance(pdu, LoginRequest)
                        rsp = login.receive(pdu)
                        writer.write(b"".join(bytes(b) for b in rsp.encode(False, False)))
                        if login.failed_status is not None:
                            return
                        if login.complete:
                            self.logins += 1
                            conn = HostileConnection(self, writer, login.next_statsn)
                    else:
                        await self._ffp(conn, pdu)
                got = pdus.parse()
            await writer.drain()

    async def _ffp(self, conn: HostileConnection, pdu: PDU) -> None:
        if self.silent:
            if isinstance(pdu, ScsiCommand) and pdu.cdb[:1] in (b"\x28", b"\x2a"):
                self.commands += 1
            return
        if isinstance(pdu, ScsiCommand):
            if not pdu.immediate:
                conn.expcmdsn = (pdu.cmdsn + 1) & 0xFFFFFFFF
            if pdu.cdb[:1] not in (b"\x28", b"\x2a"):
                # TEST UNIT READY after recovery and the like: GOOD.
                conn.send(ScsiResponse(itt=pdu.itt, status=0, **conn.window()))
                return
            self.commands += 1
            out = self.behaviour(conn, pdu)
            if out is not None:
                await out
        elif isinstance(pdu, DataOut):
            self.data_out_bytes += len(pdu.data)
        elif isinstance(pdu, NopOut):
            if pdu.itt != RESERVED_TAG:
                conn.send(NopIn(itt=pdu.itt, ttt=RESERVED_TAG, data=bytes(pdu.data),
                                **conn.window()))
        elif isinstance(pdu, TaskMgmtRequest):
            self.tmfs.append(pdu.function)
            if self.answer_tmf:
                conn.send(TaskMgmtResponse(itt=pdu.itt, response=TMResponse.FUNCTION_COMPLETE,
                                           **conn.window()))
        elif isinstance(pdu, LogoutRequest):
            conn.send(LogoutResponse(itt=pdu.itt, **conn.window()))
