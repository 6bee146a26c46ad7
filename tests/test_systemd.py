"""systemd integration: ``serve`` speaks sd_notify (READY=1 once it
listens, STOPPING=1 on SIGTERM) and the example units' command lines are
ones our commands accept."""

from __future__ import annotations

import configparser
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tgt import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _recv(sock: socket.socket, want: str, seconds: float) -> str:
    sock.settimeout(seconds)
    got = ""
    while want not in got:
        got += sock.recv(4096).decode() + "\n"
    return got


@pytest.mark.parametrize("abstract", [False, True])
def test_serve_notifies_ready_and_stopping(tmp_path: Path, abstract: bool) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"aioiscsi-test-{tmp_path.name}"
        listener.bind("\0" + name)
        env_path = "@" + name
    else:
        env_path = str(tmp_path / "notify.sock")
        listener.bind(env_path)
    port = free_port()
    proc = subprocess.Popen([str(BIN / "iscsi-target"), "serve", str(img), "--portal",
                             f"127.0.0.1:{port}", "--no-control"],
                            env={"NOTIFY_SOCKET": env_path, "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = _recv(listener, "READY=1", 30)
        assert "STATUS=serving 1 target(s)" in ready
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # READY came once it listens
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _recv(listener, "STOPPING=1", 30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()


def _unit_commands(path: Path) -> list[list[str]]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    out = []
    for key in ("ExecStart", "ExecStop"):
        if parser.has_option("Service", key):
            out.append(shlex.split(parser.get("Service", key)))
    return out


@pytest.mark.parametrize("unit", ["iscsi-target.service", "iscsi-attach@.service"])
def test_unit_command_lines_are_accepted(unit: str) -> None:
    """The flags the units use exist: parse them with our argparse (the
    executables' paths and ${VARIABLES} are the installer's)."""
    from initiator.cli import build_parser as initiator_parser
    from target.cli import build_parser as target_parser

    for argv in _unit_commands(ROOT / "examples" / "systemd" / unit):
        prog = Path(argv[0]).name
        args = [a.replace("${URL}", "iscsi://127.0.0.1/iqn.2024-01.org.example:d/0")
                 .replace("${NBD}", "unix:/run/x.sock").replace("%i", "x") for a in argv[1:]]
        parser = target_parser() if prog == "iscsi-target" else initiator_parser()
        parser.parse_args(args)
