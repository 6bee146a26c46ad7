"""The target's side of multiple connections per session over sockets,
driven by the raw client of tests/test_target_protocol.py: what a
non-leading login may carry and must prove (RFC 7143 §6.3.5, §13), the
parameters the added connection runs on, and one connection of a session
reinstated or logged out while another carries on (§6.3.4, §11.14.1)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from iscsi.chap import DEFAULT_ALGORITHMS
from iscsi.constants import AsyncEvent, LoginStatus, LogoutReason, LogoutResponseCode, Stage
from iscsi.errors import LoginError
from iscsi.login import ChapAuth, join_connection
from iscsi.pdu import AsyncMessage, LoginRequest, LoginResponse
from iscsi.scsi.constants import Status
from iscsi.serial import sn_add
from iscsi.text import encode_text
from target.config import ChapConfig, Limits
from tests.rawclient import INITIATOR
from tests.target_fixture import TARGET_NAME, make_config, running_target
from tests.test_target_protocol import MEM, R2T_OFFERS, Client, connect, open_write

USER, SECRET = "carol", "carol-secret-12"


def test_non_leading_login_refuses_leading_only_keys() -> None:
    with running_target(make_config([MEM])) as t, \
            connect(t, offers={"MaxConnections": "2"}) as c0:
        with Client(t.host, t.port) as c1:
            # MaxBurstLength is leading-only (LO, §13.13): a connection
            # joining a session may not renegotiate it.
            text = encode_text([("InitiatorName", INITIATOR), ("TargetName", TARGET_NAME),
                                ("MaxBurstLength", "4096")])
            c1.send(LoginRequest(itt=1, transit=True, csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                                 nsg=Stage.FULL_FEATURE_PHASE, isid=0x400000000001,
                                 tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn, data=text))
            rsp = c1.recv()
            assert isinstance(rsp, LoginResponse)
            assert rsp.status_class == 2 and rsp.tsih in (0, c0.tsih)
        c0.ping()
        assert t.call(lambda: [sorted(s.connections) for s in t.server.sessions]) == [[0]]


def test_non_leading_login_authenticates_again() -> None:
    chap = ChapConfig(USER, SECRET)
    auth = ChapAuth(USER, SECRET, algorithms=DEFAULT_ALGORITHMS)
    with running_target(make_config([MEM], chap=chap)) as t, \
            connect(t, chap=auth, offers={"MaxConnections": "2"}) as c0:
        with Client(t.host, t.port) as c1:
            with pytest.raises(LoginError) as err:
                c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            assert err.value.login_status == LoginStatus.AUTHENTICATION_FAILURE
        with Client(t.host, t.port) as c1:
            assert c1.login(TARGET_NAME, chap=auth, tsih=c0.tsih, cid=1,
                            cmdsn=c0.cmdsn).tsih == c0.tsih
            c1.cmdsn = c0.cmdsn
            c1.ping()


def test_added_connection_runs_on_the_sessions_parameters() -> None:
    # The leading login agreed InitialR2T=No and FirstBurstLength 65536;
    # the non-leading one cannot negotiate them (LO) and must not fall back
    # to their defaults (InitialR2T=Yes): unsolicited data is fine on it.
    with running_target(make_config([MEM])) as t, \
            connect(t, offers={"MaxConnections": "2"}) as c0:
        c0.clear_ua()
        assert c0.params is not None and not c0.params.initial_r2t
        with Client(t.host, t.port) as c1:
            c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            assert c1.params is not None
            c1.params = join_connection(c0.params, c1.params)
            c1.cmdsn = c0.cmdsn
            data = bytes(range(256)) * 512  # 128 KiB: unsolicited, then R2Ts
            rsp, r2ts = c1.write(8, data, imm=4096)
            assert rsp.status == Status.GOOD and r2ts
            got, _, _ = c1.read(8, len(data) // 512)
            assert got == data


def test_one_connection_reinstated_while_the_other_carries_on() -> None:
    limits = Limits(max_connections=2, queue_depth=4, initial_r2t=True)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers={"MaxConnections": "2", **R2T_OFFERS}) as c0:
        c0.clear_ua()
        with Client(t.host, t.port) as c1:
            c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            c1.cmdsn = c0.cmdsn
            c1.params = join_connection(c0.params, c1.params)  # type: ignore[arg-type]
            open_write(c1, 4)
            c0.cmdsn = c1.cmdsn
            # A login with CID 1 again: the old connection 1 goes first
            # (§6.3.4), with its task; connection 0 was untouched.
            with Client(t.host, t.port) as again:
                again.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
                assert c1.closed_by_peer()
                again.cmdsn = c0.cmdsn
                nop = again.ping()
                # The old connection's write no longer holds a slot.
                assert nop.maxcmdsn == sn_add(nop.expcmdsn, 4 - 1)
                assert c0.tur().status == Status.GOOD
                again.cmdsn = c0.cmdsn
                assert again.tur().status == Status.GOOD
                c0.cmdsn = again.cmdsn
                assert t.call(lambda: [sorted(s.connections) for s in t.server.sessions]) \
                    == [[0, 1]]


def test_connection_logs_itself_out_while_the_other_carries_on() -> None:
    with running_target(make_config([MEM])) as t, \
            connect(t, offers={"MaxConnections": "2"}) as c0:
        c0.clear_ua()
        with Client(t.host, t.port) as c1:
            c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            c1.cmdsn = c0.cmdsn
            rsp = c1.logout(LogoutReason.CLOSE_CONNECTION, cid=1)
            assert rsp.response == LogoutResponseCode.SUCCESS
            assert c1.closed_by_peer()
        c0.cmdsn = c1.cmdsn
        assert c0.tur().status == Status.GOOD
        assert t.call(lambda: [sorted(s.connections) for s in t.server.sessions]) == [[0]]


def test_dropping_one_connection_is_announced_on_another() -> None:
    with running_target(make_config([MEM])) as t, \
            connect(t, offers={"MaxConnections": "2"}) as c0:
        c0.clear_ua()
        with Client(t.host, t.port) as c1:
            c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            # A header announcing more data than we may receive: the stream
            # cannot be trusted, the target drops connection 1 (§7.1.4)...
            bad = bytearray(48)
            bad[0] = 0x01  # SCSI Command
            bad[5:8] = (1 << 23).to_bytes(3, "big")
            c1.send_raw(bytes(bad))
            assert c1.closed_by_peer()
            # ...and says so on connection 0: Async Message event 2,
            # Parameter1 = CID 1, Parameter2 = Time2Wait (§11.9.1).
            msg = c0.recv()
            assert isinstance(msg, AsyncMessage), msg
            assert msg.async_event == AsyncEvent.CONNECTION_DROP
            assert (msg.parameter1, msg.parameter2, msg.parameter3) == (1, 2, 0)
        c0.cmdsn = c1.cmdsn
        assert c0.tur().status == Status.GOOD


def test_non_leading_login_answers_with_the_sessions_command_window() -> None:
    # The login request's CmdSN may be ahead of what the session received
    # (commands lost with a failed connection): the answer gives the
    # session's ExpCmdSN, which tells the initiator what to send again.
    limits = Limits(queue_depth=8)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers={"MaxConnections": "2"}) as c0:
        c0.clear_ua()
        with Client(t.host, t.port) as c1:
            rsp = c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=sn_add(c0.cmdsn, 5))
            assert rsp.expcmdsn == c0.cmdsn
            assert rsp.maxcmdsn == sn_add(c0.cmdsn, 8 - 1)


ERL2_LIMITS = Limits(max_connections=2, queue_depth=2, initial_r2t=True,
                     error_recovery_level=2)
ERL2_OFFERS = {"MaxConnections": "2", "ErrorRecoveryLevel": "2", "DefaultTime2Retain": "1",
               **R2T_OFFERS}


def _poll(what: str, cond: Callable[[], bool], deadline: float = 10.0) -> None:
    """A bounded wait for a condition (Time2Retain passing on the target)."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_erl2_tasks_of_a_failed_connection_wait_time2retain() -> None:
    with running_target(make_config([MEM], limits=ERL2_LIMITS)) as t, \
            connect(t, offers=ERL2_OFFERS) as c0:
        assert c0.params is not None and c0.params.error_recovery_level == 2
        c0.clear_ua()
        c1 = Client(t.host, t.port)
        c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
        c1.cmdsn = c0.cmdsn
        c1.params = join_connection(c0.params, c1.params)  # type: ignore[arg-type]
        open_write(c1, 6)                 # holds one of the two slots
        c0.cmdsn = c1.cmdsn
        c1.close()                        # the connection fails
        retained = lambda: t.call(lambda: [len(s.retained) for s in t.server.sessions])
        _poll("the write to be retained", lambda: retained() == [1])
        nop = c0.ping()
        assert nop.maxcmdsn == nop.expcmdsn  # its slot is still taken
        # DefaultTime2Retain (1 s) passes without TASK REASSIGN: it ends.
        _poll("Time2Retain to pass", lambda: retained() == [0])
        nop = c0.ping()
        assert nop.maxcmdsn == sn_add(nop.expcmdsn, 1)
        assert c0.tur().status == Status.GOOD


def test_erl2_session_outlives_its_last_connection_for_time2retain() -> None:
    with running_target(make_config([MEM], limits=ERL2_LIMITS)) as t:
        c0 = connect(t, offers=ERL2_OFFERS)
        c0.clear_ua()
        open_write(c0, 2)
        tsih = c0.tsih
        c0.close()
        sessions = lambda: t.call(lambda: [s.tsih for s in t.server.sessions])
        _poll("the connection to fail", lambda: t.call(
            lambda: [len(s.connections) for s in t.server.sessions]) == [0])
        assert sessions() == [tsih]       # kept for connection recovery
        _poll("Time2Retain to pass and the session to end", lambda: sessions() == [])
