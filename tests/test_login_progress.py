"""An initiator that walks away from a login leaves one log line saying
who it was and how far it got (what an administrator needs to tell a wrong
secret or a refused mutual-CHAP answer from a network problem)."""

from __future__ import annotations

import logging

import pytest

from iscsi.chap import ChapCredentials
from iscsi.login import ChapAuth, InitiatorLogin, TargetLogin
from iscsi.login_target import SimpleLoginPolicy, TargetAuth, TargetEntry
from iscsi.pdu import LoginResponse
from target.config import ChapConfig, LunSpec
from tests.rawclient import RawClient
from tests.target_fixture import TARGET_NAME, make_config, running_target
from tests.test_login import INI, ISID, TGT, rng_from
from tests.test_target_hardening import until

SECRET = "progress-secret-1"


def test_progress_in_memory() -> None:
    pol = SimpleLoginPolicy(targets={TGT: TargetEntry(
        TGT, auth=TargetAuth(ChapCredentials("user", SECRET.encode())))})
    tgt = TargetLogin(pol, 1, rng=rng_from(0))
    assert tgt.progress == "no Login Request received" and not tgt.started
    ini = InitiatorLogin(INI, TGT, ISID, auth=ChapAuth("user", SECRET.encode()), rng=rng_from(1))
    req = ini.start()
    seen = []
    while req is not None:
        req = ini.receive(tgt.receive(req))
        seen.append(tgt.progress)
    assert "Security negotiation: CHAP challenge sent, no response yet" in seen
    assert tgt.started and tgt.progress == "login complete"


def test_refused_login_progress() -> None:
    pol = SimpleLoginPolicy(targets={TGT: TargetEntry(
        TGT, allowed_initiators=frozenset({"iqn.2000-01.org.example:other"}))})
    tgt = TargetLogin(pol, 1)
    ini = InitiatorLogin(INI, TGT, ISID)
    resp = tgt.receive(ini.start())
    assert resp.status_class != 0
    assert tgt.progress.startswith("login refused (")


def test_abandoned_login_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    lun = LunSpec(lun=0, path="", backend="memory", size=1 << 20)
    cfg = make_config([lun], chap=ChapConfig(user="user", secret=SECRET))
    with running_target(cfg) as t, caplog.at_level(logging.INFO, logger="aioiscsi.target"):
        login = InitiatorLogin(INI, TARGET_NAME, ISID, auth=ChapAuth("user", SECRET.encode()))
        with RawClient(t.host, t.port) as c:
            req = login.start()
            # The security offer, then CHAP_A: the target answers with its challenge.
            for _ in range(2):
                assert req is not None
                c.send(req)
                resp = c.recv()
                assert isinstance(resp, LoginResponse) and resp.status_class == 0
                req = login.receive(resp)
            # ... and the initiator walks away instead of answering it.
        line = (f"login abandoned by {INI} for {TARGET_NAME} at "
                "Security negotiation: CHAP challenge sent, no response yet")
        assert until(lambda: any(line in r.getMessage() for r in caplog.records), 10.0)


def test_session_end_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """A session that ends because its connection went away says so."""
    lun = LunSpec(lun=0, path="", backend="memory", size=1 << 20)
    cfg = make_config([lun])
    with running_target(cfg) as t, caplog.at_level(logging.INFO, logger="aioiscsi.target"):
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
        # ... and the initiator vanished without logging out.
        assert until(lambda: any("ended: connection" in r.getMessage()
                                 for r in caplog.records), 10.0)
