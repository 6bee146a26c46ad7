"""What an administrator coming from iscsiadm expects of iscsi-initiator:
every target listed even when one refuses us, JSON output, --version,
global options after the subcommand, a login that hangs bounded by
--connect-timeout. Against our own target on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from target.config import ChapConfig, LunSpec, TargetSpec
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target

OPEN = "iqn.2026-11.org.aioiscsi.test:open"
SECRET = "admin-cli-secret1"


@pytest.fixture
def two_targets() -> Iterator[RunningTarget]:
    protected = LunSpec(lun=0, path="", backend="memory", size=1 << 20)
    open_spec = TargetSpec(name=OPEN, luns=(LunSpec(lun=0, path="", backend="memory",
                                                    size=2 << 20),))
    cfg = make_config([protected], chap=ChapConfig(user="user", secret=SECRET),
                      extra_targets=(open_spec,))
    with running_target(cfg) as t:
        yield t


def test_ls_lists_every_target_saying_which_need_credentials(
        two_targets: RunningTarget, capsys: pytest.CaptureFixture[str]) -> None:
    from initiator.cli import main

    t = two_targets
    assert main(["ls", f"iscsi://{t.host}:{t.port}"]) == 0
    out = capsys.readouterr().out
    assert TARGET_NAME in out and OPEN in out
    assert "needs CHAP credentials" in out
    assert "2.0 MiB" in out  # the open target's LUN is still listed
    # The same as JSON, with global options given after the subcommand.
    assert main(["ls", f"iscsi://{t.host}:{t.port}", "--json", "--connect-timeout", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {e["target"]: e for e in doc}
    assert by_name[TARGET_NAME]["needs_credentials"] is True
    assert by_name[OPEN]["luns"][0]["size"] == 2 << 20


def test_discover_and_inquiry_json(two_targets: RunningTarget,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from initiator.cli import main

    t = two_targets
    assert main(["discover", "--json", f"{t.host}:{t.port}"]) == 0
    names = {e["name"] for e in json.loads(capsys.readouterr().out)}
    assert names == {TARGET_NAME, OPEN}
    assert main(["inquiry", "--json", f"iscsi://{t.host}:{t.port}/{OPEN}/0"]) == 0
    inq = json.loads(capsys.readouterr().out)
    assert inq["peripheral_type"] == "disk" and inq["capacity"]["size"] == 2 << 20
    assert 0x83 in inq["vpd_pages"] and inq["designators"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from initiator.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("iscsi-initiator ")


def test_silent_portal_is_bounded_by_connect_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A portal that accepts TCP and never answers the login: one line,
    within --connect-timeout, not a hint about credentials."""
    from initiator.cli import main

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        port = srv.getsockname()[1]
        rc = main(["inquiry", f"iscsi://127.0.0.1:{port}/iqn.2024-01.org.example:x/0",
                   "--connect-timeout", "1"])
    finally:
        stop.set()
        th.join(5)
        for s in held:
            s.close()
        srv.close()
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "timed out after 1 s" in err and "credentials" not in err
