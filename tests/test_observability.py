"""What an administrator observes of a running target: one INFO line per
login and logout with the key parameters (every negotiated value at DEBUG),
a reason on every session end, the same as JSON fields, and Prometheus
metrics scraped over HTTP whose values follow real I/O and real login
failures.

The target runs in-process (tests/target_fixture.py); the initiators are
ours (initiator.session) and the PDU-level RawClient.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import PurePosixPath
from typing import Any

import pytest

from iscsi.errors import LoginError
from iscsi.login import ChapAuth, InitiatorLogin
from initiator.scsi import LUN
from initiator.session import Session
from target.config import ChapConfig, LunSpec
from target.logsetup import JsonFormatter
from tests.initiator_checks import opts, until
from tests.rawclient import INITIATOR, RawClient
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.test_target_hardening import until as until_sync

OURS = "iqn.2026-11.org.aioiscsi.test:observer"
MEM = LunSpec(lun=0, path="", backend="memory", size=4 << 20)


@pytest.fixture
def target() -> Iterator[RunningTarget]:
    with running_target(make_config([MEM])) as t:
        yield t


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def _ended(caplog: pytest.LogCaptureFixture, cause: str) -> Callable[[], bool]:
    return lambda: any(r.cause == cause for r in _events(caplog, "session_end"))


# ------------------------------------------------------------------ logs


async def test_login_logout_and_end_lines(target: RunningTarget,
                                          caplog: pytest.LogCaptureFixture) -> None:
    t = target
    caplog.set_level(logging.DEBUG, logger="aioiscsi.target")
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OURS))
    try:
        lun = await LUN.open(s, 0)
        for i in range(4):
            await lun.write(i * 8, bytes([i]) * 4096)
    finally:
        await s.close()  # logs out
    await until(_ended(caplog, "logout"), "session end line")

    (login,) = [r for r in _events(caplog, "login") if r.initiator == OURS]
    msg = login.getMessage()
    assert login.levelno == logging.INFO
    assert msg.startswith(f"login: {OURS} from 127.0.0.1:")
    assert f"to {TARGET_NAME} (Normal session, TSIH {s.tsih}, ISID 0x{s.isid:012x}, CID 0)" in msg
    assert "HeaderDigest=None DataDigest=None MaxRecvDataSegmentLength=262144" in msg
    assert "MaxBurstLength=" in msg and "FirstBurstLength=" in msg
    assert len(msg) < 400  # concise: the full set is at DEBUG
    assert (login.tsih, login.isid, login.cid, login.session_type, login.target) == \
        (s.tsih, f"0x{s.isid:012x}", 0, "Normal", TARGET_NAME)
    assert login.address.startswith("127.0.0.1:") and login.header_digest == "None"
    (params,) = [r for r in _events(caplog, "login_parameters") if r.tsih == s.tsih]
    assert params.levelno == logging.DEBUG
    assert params.parameters["initiator_name"] == OURS
    assert "error_recovery_level=0" in params.getMessage()

    (logout,) = [r for r in _events(caplog, "logout") if r.initiator == OURS]
    assert logout.getMessage().startswith(f"logout: {OURS} from 127.0.0.1:")
    assert logout.getMessage().endswith("close the session") and logout.tsih == s.tsih
    (end,) = [r for r in _events(caplog, "session_end") if r.tsih == s.tsih]
    assert end.levelno == logging.INFO and end.cause == "logout"
    assert end.getMessage().startswith(f"session ended: logged out; {OURS} from 127.0.0.1:")
    assert end.commands >= 4 and end.written_bytes == 4 * 4096


def _raw_session(t: RunningTarget, isid: int = 0x400000000001) -> RawClient:
    c = RawClient(t.host, t.port)
    c.login(TARGET_NAME, isid=isid)
    return c


def test_session_end_reasons(target: RunningTarget, caplog: pytest.LogCaptureFixture) -> None:
    """Reinstated, connection lost, protocol error: each session end says
    which, in words and as ``cause``."""
    t = target
    caplog.set_level(logging.INFO, logger="aioiscsi.target")
    # Reinstated: a new leading login with the same ISID (RFC 7143 §6.3.5).
    with _raw_session(t, isid=0x400000000002), _raw_session(t, isid=0x400000000002):
        assert until_sync(_ended(caplog, "reinstated"))
        (r,) = _events(caplog, "session_end")[-1:]
        assert "reinstated (new login from 127.0.0.1:" in r.getMessage()
    assert until_sync(_ended(caplog, "connection_lost"))  # those two went away
    # A framing error at ERL 0: DataSegmentLength over our limit (§7.2).
    with _raw_session(t, isid=0x400000000003) as c:
        bhs = bytearray(48)
        bhs[0], bhs[1] = 0x40, 0x80  # immediate NOP-Out, Final
        bhs[5:8] = (0xFFFFFF).to_bytes(3, "big")
        bhs[16:24] = b"\x00\x00\x00\x07\xff\xff\xff\xff"
        c.send_raw(bytes(bhs))
        assert c.closed_by_peer()
    assert until_sync(_ended(caplog, "protocol_error"))
    (pe,) = [r for r in _events(caplog, "session_end") if r.cause == "protocol_error"]
    assert pe.getMessage().startswith("session ended: protocol error: ")


def test_kick_and_shutdown_reasons(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aioiscsi.target")
    with running_target(make_config([MEM])) as t:
        with _raw_session(t) as c:
            tsih = t.server.sessions.values()[0].tsih
            assert t.call(partial(t.server.kick, tsih=tsih)) == [tsih]
            assert c.closed_by_peer()
        assert until_sync(_ended(caplog, "kicked"))
        (k,) = _events(caplog, "session_end")
        assert k.getMessage().startswith("session ended: ended by the administrator; ")
        kept = _raw_session(t, isid=0x400000000009)
    try:
        # running_target stopped the server with the session logged in: the
        # client never answered the Async Message asking it to log out.
        assert _ended(caplog, "shutdown")()
    finally:
        kept.close()


def test_nop_timeout_reason(caplog: pytest.LogCaptureFixture) -> None:
    """An initiator that stops answering NOP-Ins (RFC 7143 §11.18): the
    session ends for a NOP timeout. The client reads nothing, so the wait
    is bounded by the target's timers, not by the test's."""
    import dataclasses

    caplog.set_level(logging.INFO, logger="aioiscsi.target")
    cfg = dataclasses.replace(make_config([MEM]), nop_interval=0.2, nop_timeout=0.2)
    with running_target(cfg) as t, _raw_session(t):
        assert until_sync(_ended(caplog, "nop_timeout"))
    (r,) = [r for r in _events(caplog, "session_end") if r.cause == "nop_timeout"]
    assert r.getMessage().startswith("session ended: NOP timeout: no NOP-Out answer within")


def test_json_formatter_keeps_fields_structured() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("aioiscsi.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a %s line", "plain", extra={"event": "x", "tsih": 5,
                                                     "parameters": {"a": [1, 2]},
                                                     "path": PurePosixPath("/srv/d.img")})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "a plain line" and first["level"] == "warning"
    assert first["logger"] == "aioiscsi.test.json" and first["time"].endswith("+00:00")
    assert first["tsih"] == 5 and first["parameters"] == {"a": [1, 2]}
    assert first["path"] == "/srv/d.img"  # no JSON type: written as text
    assert second["message"] == "failed" and "ValueError: boom" in second["exception"]


# --------------------------------------------------------------- metrics


def _scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, parsed with prometheus_client's own
    parser from what Prometheus would fetch."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for sample in fam.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in metrics.items()
             if n == name and set(labels.items()) <= set(ls)]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


@pytest.fixture
def metrics_target() -> Iterator[tuple[RunningTarget, str]]:
    pytest.importorskip("prometheus_client")
    from target.metrics import serve_metrics

    cfg = make_config([MEM], chap=None, login_timeout=0.5)
    with running_target(cfg) as t:
        endpoint = t.call(serve_metrics, t.server, "127.0.0.1:0")
        try:
            yield t, endpoint.address
        finally:
            endpoint.stop()


async def test_metrics_follow_io_and_failures(metrics_target: tuple[RunningTarget, str]) -> None:
    t, address = metrics_target
    before = _scrape(address)
    fail = "aioiscsi_login_failures_total"

    def failures(m: dict[Any, float], reason: str) -> float:
        return _value(m, fail, reason=reason) or 0.0

    s = await Session.connect(t.host, t.port, TARGET_NAME, opts(initiator_name=OURS))
    try:
        lun = await LUN.open(s, 0)
        for i in range(8):
            await lun.write(i * 8, bytes([i + 1]) * 4096)
        for i in range(8):
            assert await lun.read(i * 8, 8) == bytes([i + 1]) * 4096
        m = _scrape(address)
    finally:
        await s.close()
    who = {"target": TARGET_NAME, "lun": "0", "initiator": OURS, "tsih": str(s.tsih),
           "isid": f"0x{s.isid:012x}"}
    assert _value(m, "aioiscsi_session_written_bytes_total", **who) == 8 * 4096
    assert _value(m, "aioiscsi_session_read_bytes_total", **who) >= 8 * 4096  # type: ignore[operator]
    cmds = _value(m, "aioiscsi_session_commands_total", **who)
    assert cmds is not None and cmds >= 16
    assert _value(m, "aioiscsi_session_latency_seconds_count", **who) == cmds
    assert (_value(m, "aioiscsi_session_latency_seconds_sum", **who) or 0) > 0
    # A histogram: cumulative buckets ending in +Inf, which counts every command.
    assert _value(m, "aioiscsi_session_latency_seconds_bucket", le="+Inf", **who) == cmds
    fast = _value(m, "aioiscsi_session_latency_seconds_bucket", le="0.025", **who)
    slow = _value(m, "aioiscsi_session_latency_seconds_bucket", le="2.5e-05", **who)
    assert slow is not None and fast is not None and slow <= fast <= cmds
    lun0 = {"target": TARGET_NAME, "lun": "0"}
    assert _value(m, "aioiscsi_lun_written_bytes_total", **lun0) == 8 * 4096
    assert _value(m, "aioiscsi_lun_size_bytes", **lun0) == 4 << 20
    assert _value(m, "aioiscsi_sessions", target=TARGET_NAME) == 1
    assert _value(m, "aioiscsi_connections", target=TARGET_NAME) == 1

    # Login failures, each for its reason: a target that does not exist,
    # a connection that never logs in.
    with RawClient(t.host, t.port) as c:
        with pytest.raises(LoginError):
            c.login("iqn.2026-11.org.aioiscsi.test:nosuch")
    with RawClient(t.host, t.port) as c:
        assert c.closed_by_peer()  # login_timeout (0.5 s) ends it
    await until(lambda: failures(_scrape(address), "login timeout") >
                failures(before, "login timeout"), "login timeout counted")
    after = _scrape(address)
    for reason in ("target not found", "login timeout"):
        assert failures(after, reason) == failures(before, reason) + 1, reason
    # The session's series went with it; the LUN keeps its counts.
    assert _value(after, "aioiscsi_session_commands_total", **who) is None
    assert _value(after, "aioiscsi_lun_written_bytes_total", **lun0) == 8 * 4096
    assert _value(after, "aioiscsi_sessions", target=TARGET_NAME) == 0


def test_metrics_http_answers(metrics_target: tuple[RunningTarget, str]) -> None:
    _, address = metrics_target
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        body = r.read().decode()
    # What Prometheus needs to type each family.
    assert "# TYPE aioiscsi_lun_latency_seconds histogram" in body
    assert "# TYPE aioiscsi_lun_commands_total counter" in body or \
        "# TYPE aioiscsi_lun_commands counter" in body


def test_chap_failures_are_counted_by_reason() -> None:
    """A wrong CHAP secret, and an initiator that walks away in the middle
    of CHAP (as one does after refusing our mutual-CHAP answer)."""
    pytest.importorskip("prometheus_client")
    from target.metrics import serve_metrics

    fail = "aioiscsi_login_failures_total"
    cfg = make_config([MEM], chap=ChapConfig(user="user", secret="right-secret-1"))
    with running_target(cfg) as t:
        endpoint = t.call(serve_metrics, t.server, "127.0.0.1:0")
        try:
            before = _scrape(endpoint.address)
            with RawClient(t.host, t.port) as c, pytest.raises(LoginError):
                c.login(TARGET_NAME, chap=ChapAuth("user", b"wrong-secret-1"))
            login = InitiatorLogin(INITIATOR, TARGET_NAME, 0x400000000005,
                                   auth=ChapAuth("user", b"right-secret-1"))
            with RawClient(t.host, t.port) as c:
                c.send(login.start())
                c.recv()  # security negotiation goes on; the initiator leaves
            assert until_sync(lambda: (_value(_scrape(endpoint.address), fail,
                                              reason="abandoned") or 0) >
                              (_value(before, fail, reason="abandoned") or 0))
            after = _scrape(endpoint.address)
            for reason in ("authentication failed", "abandoned"):
                assert (_value(after, fail, reason=reason) or 0) == \
                    (_value(before, fail, reason=reason) or 0) + 1, reason
        finally:
            endpoint.stop()
