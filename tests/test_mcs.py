"""Multiple connections per session over sockets (RFC 7143 §4.2, §6.3.5):
our initiator against our target with 1 and 4 connections, a verified
random-write stream, and the loss of one connection mid-stream (cut by a
relay in tests/relay.py) which the session survives over the others."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from initiator.blockdev import BlockDevice
from initiator.errors import ConnectionLost
from initiator.session import Session
from iscsi.constants import AsyncEvent
from iscsi.pdu import AsyncMessage
from iscsi.serial import sn_lt
from target.config import Limits, LunSpec, PortalGroup, ServerConfig, TargetSpec
from tests.initiator_checks import opts, random_write_verify, until
from tests.relay import Relay
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tgt import Tgtd

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def target() -> Iterator[RunningTarget]:
    with running_target(make_config([LunSpec(lun=0, path="", backend="memory",
                                             size=SIZE)])) as t:
        yield t


def _sessions(t: RunningTarget) -> list[tuple[int, list[int]]]:
    return t.call(lambda: [(s.tsih, sorted(s.connections)) for s in t.server.sessions])


@pytest.mark.parametrize("n", [1, 4])
def test_verified_stream_over_n_connections(target: RunningTarget, n: int) -> None:
    async def main() -> None:
        s = await Session.connect(target.host, target.port, TARGET_NAME, opts(connections=n))
        try:
            assert s.connection_count == n
            assert s.params.max_connections == n
            (tsih, cids), = _sessions(target)
            assert tsih == s.tsih and cids == list(range(n))
            dev = await BlockDevice.from_session(s, 0)
            sent = {cid: 0 for cid in range(n)}
            for cid in range(n):
                pair = s.connection(cid)
                assert pair is not None
            await random_write_verify(dev, 8 * MiB)
            # Every connection carried commands (least-loaded spreading).
            for cid in range(n):
                pair = s.connection(cid)
                assert pair is not None
                sent[cid] = pair[1].seq.cmdsn  # shared: one CmdSN space
            assert len(set(sent.values())) == 1
        finally:
            await s.logout()
        assert _sessions(target) == []
    asyncio.run(main())


def test_target_caps_connections() -> None:
    cfg = make_config([LunSpec(lun=0, path="", backend="memory", size=SIZE)],
                      limits=Limits(max_connections=2))
    with running_target(cfg) as t:
        async def main() -> None:
            s = await Session.connect(t.host, t.port, TARGET_NAME, opts(connections=4))
            try:
                assert s.params.max_connections == 2
                assert s.connection_count == 2
                dev = await BlockDevice.from_session(s, 0)
                await random_write_verify(dev, 2 * MiB, seed=5)
            finally:
                await s.logout()
        asyncio.run(main())


async def _stream_losing_one(s: Session, dev: BlockDevice, relay: Relay, cid: int,
                             seed: int) -> int:
    """Eight writers on disjoint stripes; once 2 MiB went by and the chosen
    connection has commands in flight, it is cut. Every write either
    completes or fails with ConnectionLost (the target had taken it and
    ended it: ErrorRecoveryLevel 0); the device must then hold every
    acknowledged byte. Returns the number of failed writes."""
    size = dev.size
    rng = random.Random(seed)
    model = bytearray(size)
    known = bytearray(b"\1" * size)
    stripes = 8
    stripe = size // stripes
    progress = 0
    failed = 0
    cut = asyncio.Event()

    async def writer(k: int) -> None:
        nonlocal progress, failed
        base = k * stripe
        for _ in range(40):
            n = rng.randint(4096, 256 * 1024)
            off = base + rng.randrange(0, stripe - n)
            buf = rng.randbytes(n)
            try:
                await dev.write(off, buf)
            except ConnectionLost:
                assert cut.is_set()
                failed += 1
                known[off : off + n] = bytes(n)  # may or may not be written
                continue
            model[off : off + n] = buf
            known[off : off + n] = b"\1" * n
            progress += n

    async def killer() -> None:
        while True:
            pair = s.connection(cid)
            if progress >= 2 * MiB and pair is not None and pair[1].tasks:
                break
            await asyncio.sleep(0.001)
        relay.cut(pair[0].transport.get_extra_info("sockname")[1])  # type: ignore[union-attr]
        cut.set()

    kill = asyncio.ensure_future(killer())
    await asyncio.gather(*(writer(k) for k in range(stripes)))
    assert cut.is_set(), "the stream ended before the connection was cut"
    await kill
    data = await dev.read(0, size)
    pos = 0
    while pos < size:
        hole = known.find(0, pos)
        end = size if hole < 0 else hole
        assert data[pos:end] == model[pos:end], f"acknowledged data lost in {pos}..{end}"
        if hole < 0:
            break
        pos = known.find(1, hole)
        if pos < 0:
            break
    return failed


@pytest.mark.parametrize("cid", [2, 0])
def test_losing_one_of_four_connections(target: RunningTarget, cid: int) -> None:
    async def main() -> None:
        relay = await Relay(target.host, target.port).start()
        s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME,
                                  opts(connections=4, command_timeout=20.0))
        try:
            assert s.connection_count == 4
            dev = await BlockDevice.from_session(s, 0)
            await _stream_losing_one(s, dev, relay, cid, seed=11 + cid)
            # No session recovery: the session went on over the others,
            # and the lost connection was replaced under its CID.
            assert s.recoveries == 0
            await until(lambda: s.connection_count == 4, "the lost connection replaced")
            await until(lambda: _sessions(target) == [(s.tsih, [0, 1, 2, 3])],
                        "the target to see four connections again")
            # And the session is whole: a fresh verified stream.
            await dev.write(0, bytes(SIZE))
            await random_write_verify(dev, 2 * MiB, seed=3)
        finally:
            await s.logout()
            await relay.close()
    asyncio.run(main())


@pytest.mark.interop
def test_two_connections_against_tgtd(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What tgt (1.0.x) does with MC/S, recorded: with MaxConnections=2 set
    by tgtadm it agrees to 2, repeats the leading-only MaxConnections in
    the responses of a non-leading login (which we ignore), then answers it
    with a TSIH other than the session's -- tgt keeps the TSIH of a login
    request in wire byte order -- so it never joins the session. Our
    initiator refuses that login, says so, and works on one connection."""
    # An in-process CLI test may have quieted the "initiator" loggers.
    caplog.set_level(logging.WARNING, logger="initiator")
    with Tgtd(tmp_path) as t:
        t.adm("--op", "update", "--mode", "target", "--tid", "1", "--name", "MaxConnections",
              "--value", "2")

        async def main() -> None:
            s = await Session.connect("127.0.0.1", t.port, t.iqn, opts(connections=2))
            try:
                assert s.params.max_connections == 2
                assert s.connection_count == 1
                dev = await BlockDevice.from_session(s, 1)
                data = random.Random(9).randbytes(MiB)
                await dev.write(3 * MiB, data)
                assert await dev.read(3 * MiB, MiB) == data
            finally:
                await s.logout()
        asyncio.run(main())
    assert any("could not add connection CID 1" in r.getMessage() and "TSIH" in r.getMessage()
               for r in caplog.records)


def test_losing_every_connection_recovers_the_session(target: RunningTarget) -> None:
    async def main() -> None:
        relay = await Relay(target.host, target.port).start()
        s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME,
                                  opts(connections=3, command_timeout=20.0))
        try:
            dev = await BlockDevice.from_session(s, 0)
            await dev.write(0, bytes(SIZE))
            pairs = [s.connection(cid) for cid in range(3)]
            ports = [p[0].transport.get_extra_info("sockname")[1] for p in pairs if p]
            assert len(ports) == 3
            writes = [asyncio.ensure_future(dev.write(k * MiB, bytes([k + 1]) * MiB))
                      for k in range(8)]
            await asyncio.sleep(0)
            for port in ports:
                relay.cut(port)
            # ERL 0 session recovery (§7.1.4.3): every write is reissued.
            await asyncio.gather(*writes)
            assert s.recoveries == 1
            for k in range(8):
                assert await dev.read(k * MiB, MiB) == bytes([k + 1]) * MiB
            await until(lambda: s.connection_count == 3, "the connections added again")
            await until(lambda: _sessions(target) == [(s.tsih, [0, 1, 2])],
                        "the target to see the new session's three connections")
        finally:
            await s.logout()
            await relay.close()
    asyncio.run(main())


def test_async_messages_address_one_connection(target: RunningTarget) -> None:
    async def main() -> None:
        s = await Session.connect(target.host, target.port, TARGET_NAME, opts(connections=3))
        try:
            dev = await BlockDevice.from_session(s, 0)
            await dev.write(0, bytes(SIZE))
            # Event 1 (§11.9.1) on connection 1: that connection logs out
            # and is replaced; the session is not reinstated.
            def ask() -> None:
                sess, = target.server.sessions
                sess.connections[1].request_logout(0)  # type: ignore[attr-defined]
            old1 = s.connection(1)
            target.call(ask)
            await until(lambda: s.connection(1) not in (None, old1),
                        "connection 1 logged out and replaced")
            # Event 2 on connection 0 naming CID 2: CID 2 is the one dropped.
            old2 = s.connection(2)
            conn0 = s.connection(0)
            assert old2 is not None and conn0 is not None
            e = conn0[1]
            s.deliver(conn0[0], [AsyncMessage(
                statsn=e.exp_statsn, expcmdsn=e.window.exp_cmdsn, maxcmdsn=e.window.max_cmdsn,
                async_event=AsyncEvent.CONNECTION_DROP, parameter1=2, parameter2=0,
                parameter3=0)])
            assert old2[0].closed and s.connection(0) == conn0
            await until(lambda: s.connection(2) not in (None, old2),
                        "connection 2 dropped and replaced")
            await until(lambda: _sessions(target) == [(s.tsih, [0, 1, 2])],
                        "the target to see three connections")
            assert s.recoveries == 0
            await random_write_verify(dev, 2 * MiB, seed=13)
        finally:
            await s.logout()
    asyncio.run(main())


@pytest.mark.parametrize("erl", [2, 0])
def test_erl2_reassigns_a_lost_connections_tasks(erl: int) -> None:
    """ErrorRecoveryLevel 2 (§7.2.2): the target has taken commands of a
    connection whose answers are then lost and which is cut; the session
    removes it for recovery (logout reason 2) and moves its tasks to another
    connection with TASK REASSIGN: every write completes, none fails. The
    same at ERL 0 fails those writes (the target ended them)."""
    cfg = make_config([LunSpec(lun=0, path="", backend="memory", size=SIZE)],
                      limits=Limits(error_recovery_level=erl))
    with running_target(cfg) as t:
        async def main() -> None:
            relay = await Relay(t.host, t.port).start()
            s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
                connections=2, error_recovery_level=2, command_timeout=20.0))
            try:
                assert s.params.error_recovery_level == erl
                dev = await BlockDevice.from_session(s, 0)
                await dev.write(0, bytes(SIZE))
                pair = s.connection(1)
                assert pair is not None
                conn1, engine1 = pair
                port = conn1.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
                relay.mute(port)
                # Writes until connection 1 carries some the target took.
                writes = []
                for k in range(16):
                    writes.append(asyncio.ensure_future(
                        dev.write(k * MiB, bytes([k + 1]) * MiB)))
                    await asyncio.sleep(0)

                def taken() -> bool:
                    mine = [c.cmdsn for c in engine1.tasks.values()]
                    exp = t.call(lambda: [x.window.expcmdsn for x in t.server.sessions])[0]
                    return bool(mine) and any(sn_lt(sn, exp) for sn in mine)
                await until(taken, "the target to take commands of connection 1")
                relay.cut(port)
                ends = await asyncio.gather(*writes, return_exceptions=True)
                failed = [k for k, e in enumerate(ends) if isinstance(e, BaseException)]
                assert all(isinstance(ends[k], ConnectionLost) for k in failed)
                assert s.recoveries == 0
                assert bool(failed) == (erl == 0)
                for k in range(16):
                    if k not in failed:
                        assert await dev.read(k * MiB, MiB) == bytes([k + 1]) * MiB
                await until(lambda: s.connection_count == 2, "connection 1 replaced")
                assert t.call(lambda: [len(x.retained) for x in t.server.sessions]) == [0]
            finally:
                await s.logout()
                await relay.close()
        asyncio.run(main())


def test_erl2_recovers_the_only_connection() -> None:
    """ERL 2 with one connection (§7.2.2): it dies after the target took
    writes; a new connection with the same CID joins the same session
    (no reinstatement), the tasks move to it with TASK REASSIGN, none fails."""
    cfg = make_config([LunSpec(lun=0, path="", backend="memory", size=SIZE)],
                      limits=Limits(error_recovery_level=2))
    with running_target(cfg) as t:
        async def main() -> None:
            relay = await Relay(t.host, t.port).start()
            s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
                error_recovery_level=2, command_timeout=20.0,
                keys={"DefaultTime2Wait": "0"}))
            try:
                dev = await BlockDevice.from_session(s, 0)
                await dev.write(0, bytes(SIZE))
                tsih = s.tsih
                pair = s.connection(0)
                assert pair is not None
                conn, engine = pair
                port = conn.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
                relay.mute(port)
                writes = [asyncio.ensure_future(dev.write(k * MiB, bytes([k + 1]) * MiB))
                          for k in range(8)]

                def taken() -> bool:
                    mine = [c.cmdsn for c in engine.tasks.values()]
                    exp = t.call(lambda: [x.window.expcmdsn for x in t.server.sessions])[0]
                    return bool(mine) and any(sn_lt(sn, exp) for sn in mine)
                await until(taken, "the target to take commands")
                relay.cut(port)
                await asyncio.gather(*writes)
                assert s.recoveries == 0 and s.connection_recoveries == 1
                assert s.tsih == tsih and _sessions(t) == [(tsih, [0])]
                for k in range(8):
                    assert await dev.read(k * MiB, MiB) == bytes([k + 1]) * MiB
            finally:
                await s.logout()
                await relay.close()
        asyncio.run(main())


def test_cli_connections(target: RunningTarget, capsys: pytest.CaptureFixture[str],
                         caplog: pytest.LogCaptureFixture) -> None:
    from initiator.cli import main
    url = f"iscsi://{target.host}:{target.port}/{TARGET_NAME}/0"
    caplog.set_level("INFO", logger="initiator.session")
    assert main(["bench", url, "--connections", "3", "--seconds", "0.3", "--qd", "8"]) == 0
    capsys.readouterr()
    assert any("has 3 connection(s)" in r.getMessage() for r in caplog.records)
    with pytest.raises(SystemExit) as exit_:
        main(["ls", url, "--connections", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("'0' is not a number of connections (1..65535)")


def test_erl2_falls_back_to_session_recovery_when_the_session_is_gone() -> None:
    cfg = make_config([LunSpec(lun=0, path="", backend="memory", size=SIZE)],
                      limits=Limits(error_recovery_level=2))
    with running_target(cfg) as t:
        async def main() -> None:
            s = await Session.connect(t.host, t.port, TARGET_NAME, opts(
                error_recovery_level=2, keys={"DefaultTime2Wait": "0"}))
            try:
                dev = await BlockDevice.from_session(s, 0)
                await dev.write(0, b"\x5a" * MiB)

                def kick() -> None:
                    sess, = t.server.sessions
                    t.server.end_session(sess, cause="kicked")
                t.call(kick)
                # The connection cannot join a session that is gone
                # (SESSION_DOES_NOT_EXIST): the session is recovered anew.
                assert await dev.read(0, MiB) == b"\x5a" * MiB
                assert s.recoveries == 1 and s.connection_recoveries == 0
            finally:
                await s.logout()
        asyncio.run(main())


def test_connections_on_every_portal_of_the_group() -> None:
    """A session's connections may use any portal of its portal group
    (§4.4.1), never one of another group."""
    spec = TargetSpec(name=TARGET_NAME, luns=(LunSpec(lun=0, path="", backend="memory",
                                                      size=SIZE),), portal_groups=(1, 2))
    cfg = ServerConfig(targets=(spec,), nop_interval=0.0, portal_groups=(
        PortalGroup(1, (("127.0.0.1", 0), ("127.0.0.1", 0))),
        PortalGroup(2, (("127.0.0.1", 0),))))
    with running_target(cfg) as t:
        (_, h, p1), (_, _, p2), (_, _, p3) = sorted(t.server.bound)

        async def main() -> None:
            s = await Session.connect(h, p1, TARGET_NAME,
                                      opts(connections=3, portals=(f"{h}:{p2}",)))
            try:
                assert s.connection_count == 3
                local = t.call(lambda: sorted(
                    c.transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
                    for x in t.server.sessions for c in x.connections.values()))
                assert local == sorted([p1, p2, p2])
                dev = await BlockDevice.from_session(s, 0)
                await random_write_verify(dev, MiB, seed=21)
            finally:
                await s.logout()
            other = await Session.connect(h, p1, TARGET_NAME,
                                          opts(connections=2, portals=(f"{h}:{p3}",)))
            try:
                # Portal group 2: the session does not exist there.
                assert other.connection_count == 1
            finally:
                await other.logout()
        asyncio.run(main())
