"""Login redirection (RFC 7143 §11.13.5; issue 12): a target configured
with ``redirect`` answers every login with "target moved" (0x0101, or
0x0102 with ``redirect_permanent``) and TargetAddress; our initiator and
libiscsi follow it and reach the LUN on the other server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from initiator.scsi import LUN
from initiator.session import Session
from target.config import ConfigError, LunSpec, PortalGroup, ServerConfig, TargetSpec, load_config
from target.config_toml import dump_config
from tests.initiator_checks import MiB, opts
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tools import require_tool

pytestmark = pytest.mark.interop


def _redirecting(to: RunningTarget, permanent: bool) -> ServerConfig:
    spec = TargetSpec(name=TARGET_NAME, luns=(), redirect=f"{to.portal()},1",
                      redirect_permanent=permanent)
    return ServerConfig(targets=(spec,), portal_groups=(PortalGroup(1, (("127.0.0.1", 0),)),),
                        nop_interval=0)


@pytest.mark.parametrize("permanent", [False, True], ids=["temporary", "permanent"])
async def test_initiators_follow_a_redirect(tmp_path: Path, permanent: bool) -> None:
    img = tmp_path / "lun.img"
    img.write_bytes(b"\x42" * MiB)
    with running_target(make_config([LunSpec(lun=0, path=str(img))])) as real, \
            running_target(_redirecting(real, permanent)) as front:
        s = await Session.connect(front.host, front.port, TARGET_NAME, opts())
        try:
            # The session runs on the server the redirect named.
            assert real.call(lambda: len(real.server.sessions)) == 1
            lun = await LUN.open(s, 0)
            assert bytes(await lun.read(0, 1)) == b"\x42" * 512
        finally:
            await s.logout()
        assert real.call(lambda: len(real.server.sessions)) == 0
        # libiscsi 1.19 follows a temporary redirect; a permanent one it
        # reports (and stops), as its login code chooses.
        inq = subprocess.run([require_tool("iscsi-inq"), front.url()], capture_output=True,
                             text=True, timeout=60)
        if permanent:
            assert inq.returncode != 0 and "moved permanently" in inq.stderr, inq.stderr
        else:
            assert inq.returncode == 0 and "AIOISCSI" in inq.stdout, inq.stderr
        # Nothing ever runs on the redirecting server.
        assert front.call(lambda: len(front.server.sessions)) == 0


def test_redirect_in_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[[target]]\nname = "iqn.2026-12.org.example:moved"\n'
                   'redirect = "192.0.2.10:3260,2"\nredirect_permanent = true\n')
    spec = load_config(str(cfg)).targets[0]
    assert (spec.redirect, spec.redirect_permanent, spec.luns) == ("192.0.2.10:3260,2", True, ())
    (tmp_path / "again.toml").write_text(dump_config(load_config(str(cfg))))
    assert load_config(str(tmp_path / "again.toml")).targets[0] == spec
    cfg.write_text('[[target]]\nname = "iqn.2026-12.org.example:moved"\nredirect = "::1:3260"\n')
    with pytest.raises(ConfigError, match=r"target\[0\]\.redirect"):
        load_config(str(cfg))
