"""Login failures explained by their likely cause (what a user of istgt,
tgt or LIO meets), driven in memory: our login driver against the target's
login state machine, or against a target that answers as LIO does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from iscsi.chap import ChapCredentials
from iscsi.constants import LoginStatus
from iscsi.framing import decode_pdu
from iscsi.login import TargetLogin
from iscsi.login_target import SimpleLoginPolicy, TargetAuth, TargetEntry
from iscsi.pdu import PDU, Buffer, LoginRequest, LoginResponse
from initiator.errors import LoginRefused
from initiator.login import LoginDriver, LoginSettings

TGT = "iqn.2024-01.org.example:disk"
SECRET = "hints-secret-12"


def _settings(**kw: object) -> LoginSettings:
    base: dict[str, object] = dict(target_name=TGT, isid=0x400000000001, cid=0, cmdsn=1, itt=1,
                                   portal="127.0.0.1:3260",
                                   initiator_name="iqn.2024-01.org.example:ini")
    base.update(kw)
    return LoginSettings(**base)  # type: ignore[arg-type]


def _drive(settings: LoginSettings, answer: Callable[[LoginRequest], LoginResponse]) -> None:
    replies: asyncio.Queue[PDU | BaseException] = asyncio.Queue()

    def send(buffers: list[Buffer]) -> None:
        req = decode_pdu(b"".join(bytes(b) for b in buffers))
        assert isinstance(req, LoginRequest)
        replies.put_nowait(answer(req))

    async def main() -> None:
        await LoginDriver(settings, send, replies.get).run()

    asyncio.run(main())


def test_no_common_chap_algorithm_points_at_chap_algorithms() -> None:
    # A target that takes SHA-256 only refuses our MD5 offer without
    # CHAP_A=Reject (istgt: 0x0201; tgt answers 0x0200 the same way).
    auth = TargetAuth(ChapCredentials("user", SECRET.encode()), algorithms=(7,))
    tgt = TargetLogin(SimpleLoginPolicy(targets={TGT: TargetEntry(TGT, auth=auth)}), 1)
    with pytest.raises(LoginRefused) as exc:
        _drive(_settings(chap_user="user", chap_secret=SECRET, chap_algorithms=(5,)),
               tgt.receive)
    assert "none of the CHAP algorithms offered (CHAP_A=5)" in str(exc.value)
    assert exc.value.hint is not None and "--chap-algorithms" in exc.value.hint


def test_wrong_secret_keeps_the_credentials_hint() -> None:
    auth = TargetAuth(ChapCredentials("user", SECRET.encode()))
    tgt = TargetLogin(SimpleLoginPolicy(targets={TGT: TargetEntry(TGT, auth=auth)}), 1)
    with pytest.raises(LoginRefused) as exc:
        _drive(_settings(chap_user="user", chap_secret="not-the-secret-1"), tgt.receive)
    assert exc.value.status == LoginStatus.AUTHENTICATION_FAILURE
    assert exc.value.hint is not None and "CHAP user and secret" in exc.value.hint


def test_lio_unknown_target_reads_as_not_found() -> None:
    # LIO answers a TargetName it does not know with 0x0301.
    def lio(req: LoginRequest) -> LoginResponse:
        return LoginResponse(itt=req.itt, isid=req.isid, status_class=3, status_detail=1,
                             statsn=0, expcmdsn=req.cmdsn, maxcmdsn=req.cmdsn)

    with pytest.raises(LoginRefused) as exc:
        _drive(_settings(target_name="iqn.2024-01.org.example:nosuch"), lio)
    assert "not found or unavailable" in str(exc.value)
    assert exc.value.hint is not None and "discover" in exc.value.hint
