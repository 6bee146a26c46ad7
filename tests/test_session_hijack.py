"""A non-leading login may only reach the session it names: same initiator
port, same target (whose authentication and ACL it passes again), same
portal group (RFC 7143 §6.3.5, §12). Anything else is refused and the
victim's connection carries on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iscsi.constants import LoginStatus
from iscsi.errors import LoginError
from iscsi.login import ChapAuth
from iscsi.pdu import ScsiCommand, ScsiResponse
from target.config import ChapConfig, LunSpec, TargetSpec
from tests.rawclient import RawClient
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target

OPEN = "iqn.2026-11.org.aioiscsi.test:open"
VICTIM_ISID = 0x400000000042
SECRET = "victim-secret-123"


@pytest.fixture
def two_targets() -> Iterator[RunningTarget]:
    protected = LunSpec(lun=0, path="", backend="memory", size=1 << 20)
    open_spec = TargetSpec(name=OPEN, luns=(LunSpec(lun=0, path="", backend="memory",
                                                    size=1 << 20),))
    cfg = make_config([protected], chap=ChapConfig(user="victim", secret=SECRET),
                      extra_targets=(open_spec,))
    with running_target(cfg) as t:
        yield t


def _tur_works(c: RawClient, itt: int) -> bool:
    c.send(ScsiCommand(itt=itt, cdb=bytes(6), cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
    rsp = c.recv()
    return isinstance(rsp, ScsiResponse) and rsp.itt == itt


@pytest.mark.parametrize("cid", [0, 1])
def test_login_into_another_targets_session_is_refused(two_targets: RunningTarget,
                                                         cid: int) -> None:
    t = two_targets
    with RawClient(t.host, t.port) as victim:
        resp = victim.login(TARGET_NAME, isid=VICTIM_ISID,
                            chap=ChapAuth("victim", SECRET.encode()))
        tsih = resp.tsih
        assert tsih != 0
        with RawClient(t.host, t.port) as attacker:
            # Same InitiatorName, ISID and TSIH as the victim, but the target
            # named is the open one: CHAP never runs.
            with pytest.raises(LoginError) as info:
                attacker.login(OPEN, isid=VICTIM_ISID, tsih=tsih, cid=cid)
            assert info.value.login_status == LoginStatus.SESSION_DOES_NOT_EXIST
        # The victim's connection was not dropped and still works.
        assert _tur_works(victim, 1)
        assert _tur_works(victim, 2)
        sessions = t.call(lambda: [(s.tsih, s.target_name, len(s.connections))
                                   for s in t.server.sessions.values()])
        assert sessions == [(tsih, TARGET_NAME, 1)]


def test_reinstatement_must_authenticate_again(two_targets: RunningTarget) -> None:
    t = two_targets
    with RawClient(t.host, t.port) as victim:
        tsih = victim.login(TARGET_NAME, isid=VICTIM_ISID,
                            chap=ChapAuth("victim", SECRET.encode())).tsih
        with RawClient(t.host, t.port) as attacker:
            with pytest.raises(LoginError) as info:
                attacker.login(TARGET_NAME, isid=VICTIM_ISID, tsih=tsih,
                               chap=ChapAuth("victim", b"wrong-secret-1234"))
            assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE
        assert _tur_works(victim, 1)
        # With the right secret, connection reinstatement is allowed.
        with RawClient(t.host, t.port) as again:
            again.login(TARGET_NAME, isid=VICTIM_ISID, tsih=tsih, cmdsn=victim.cmdsn,
                        chap=ChapAuth("victim", SECRET.encode()))
            assert victim.closed_by_peer()
            assert _tur_works(again, 1)


def test_tsihs_are_not_sequential(two_targets: RunningTarget) -> None:
    t = two_targets
    tsihs = []
    for i in range(6):
        with RawClient(t.host, t.port) as c:
            tsihs.append(c.login(OPEN, isid=0x400000000100 + i).tsih)
    assert all(0 < x <= 0xFFFF for x in tsihs)
    steps = {(b - a) & 0xFFFF for a, b in zip(tsihs, tsihs[1:])}
    # Sequential allocation gives the same step every time; random TSIHs
    # repeat a step with negligible probability.
    assert len(steps) > 1
