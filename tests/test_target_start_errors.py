"""Why ``iscsi-target serve`` could not start, in one line that says what
works instead (no "unknown error -2", no "another target running?" for a
state directory that cannot be written)."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from target.cli import start_failure
from target.config import PortalGroup, ServerConfig

TARGET = str(Path(sys.executable).with_name("iscsi-target"))


def _cfg(host: str = "0.0.0.0", port: int = 3260, state_dir: str | None = None) -> ServerConfig:
    return ServerConfig(targets=(), portal_groups=(PortalGroup(1, ((host, port),)),),
                        state_dir=state_dir)


@pytest.mark.parametrize("exc, cfg, words", [
    (OSError(errno.EADDRINUSE, "Address already in use"), _cfg(port=3260),
     ["port 3260 is already in use", "--portal 0.0.0.0:3261"]),
    (PermissionError(errno.EACCES, "Permission denied"), _cfg(port=860),
     ["ports below 1024 need root", "CAP_NET_BIND_SERVICE"]),
    (PermissionError(errno.EACCES, "Permission denied", "/var/lib/x/pr-lun0.json"),
     _cfg(state_dir="/var/lib/x"), ["state directory /var/lib/x/pr-lun0.json", "--state-dir"]),
    (socket.gaierror(-2, "Name or service not known"), _cfg(host="nosuch.invalid"),
     ["cannot resolve the portal address nosuch.invalid"]),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), _cfg(host="192.0.2.7"),
     ["no such address on this host"]),
])
def test_start_failure_lines(exc: OSError, cfg: ServerConfig, words: list[str]) -> None:
    line = start_failure(exc, cfg)
    assert "\n" not in line and "another target running" not in line
    for w in words:
        assert w in line, line


def test_ipv6_portal_needs_brackets(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    r = subprocess.run([TARGET, "serve", str(img), "--portal", "::1:3260", "--no-control"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "[::1]:3260" in r.stderr


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TARGET, "serve", *args, "--no-control"], capture_output=True,
                          text=True, timeout=60)


def test_mutual_chap_secret_must_differ(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    r = _serve(str(img), "--chap", "alice:secretsecret12", "--mutual-chap", "bob:secretsecret12")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "must differ" in r.stderr


def test_config_with_image_flags_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("[[target]]\n")
    r = _serve("--config", str(cfg), "--name", "iqn.2024-01.org.example:x", "--read-only")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "--name, --read-only" in r.stderr and "set them in the file" in r.stderr


def test_open_access_is_announced() -> None:
    from target.cli import open_access_warnings
    from target.config import ChapConfig, LunSpec, TargetSpec

    lun = LunSpec(lun=0, path="/x.img")
    open_t = TargetSpec(name="iqn.2024-01.org.example:open", luns=(lun,))
    acl_t = TargetSpec(name="iqn.2024-01.org.example:acl", luns=(lun,),
                       allow=("iqn.2024-01.org.example:ini",))
    chap_t = TargetSpec(name="iqn.2024-01.org.example:chap", luns=(lun,),
                        chap=ChapConfig("u", "secretsecret12"))
    lines = open_access_warnings(ServerConfig(targets=(open_t, acl_t, chap_t)))
    assert len(lines) == 1 and "iqn.2024-01.org.example:open" in lines[0]
    assert "any initiator that reaches the portal can read and write it" in lines[0]
