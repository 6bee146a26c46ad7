"""Bandwidth groups from the configuration, and changing a limit while
serving (VirtualBox's ``bandwidthctl set``: here SIGHUP re-reads the file)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from target.backends.bandwidth import ThrottledBackend
from target.config import load_config
from tests.target_fixture import running_target
from tests.tools import require_tool

TOML = """
[server]
portals = ["127.0.0.1:0"]
nop_interval = 0

[[bandwidth_group]]
name = "slow"
limit = "{limit}"

[[target]]
name = "iqn.2026-11.org.aioiscsi.test:bw"
[[target.lun]]
path = "a.img"
bandwidth_group = "slow"
[[target.lun]]
path = "b.img"
bandwidth_group = "slow"
"""


def test_group_limit_changes_on_reload(tmp_path: Path) -> None:
    for name in ("a.img", "b.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(4 << 20)
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(TOML.format(limit="10M"))
    with running_target(load_config(str(cfg_path))) as t:
        rt = t.server.targets["iqn.2026-11.org.aioiscsi.test:bw"]
        assert all(isinstance(b, ThrottledBackend) for b in rt.backends.values())
        group = t.server.bandwidth.get("slow")
        assert group.limit == 10_000_000  # VBoxManage units are decimal
        # Both LUNs share the one group: a transfer on either charges it.
        assert rt.backends[0].group is rt.backends[1].group is group
        cfg_path.write_text(TOML.format(limit="20M"))
        t.call(t.server.reload)
        assert group.limit == 20_000_000
        # A broken file is refused and the running limit stays.
        cfg_path.write_text("[[bandwidth_group]]\nname = 'slow'\nlimit = 'fast'\n")
        t.call(t.server.reload)
        assert group.limit == 20_000_000
        # Data still flows through a throttled LUN.
        out = subprocess.run([require_tool("iscsi-inq"), t.url()], capture_output=True,
                             timeout=30)
        assert out.returncode == 0
