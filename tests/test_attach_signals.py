"""``iscsi-initiator attach`` when the target goes away: it says the
connection was lost and how long it keeps trying, and SIGTERM/Ctrl-C stop
it at once (not after the replacement timeout), saying what that costs."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.tgt import free_port
from tests.test_image_locking import _until_listening

BIN = Path(sys.executable).parent
IQN = "iqn.2026-11.org.aioiscsi.test:signals"


def _read_until(proc: subprocess.Popen[str], needle: str, seconds: float) -> str:
    """stderr of ``proc`` up to the line containing ``needle`` (bounded)."""
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = ""
    deadline = time.monotonic() + seconds
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in: {seen}"
        if sel.select(left):
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    return seen


def test_sigterm_while_reconnecting_stops_at_once(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    port = free_port()
    target = subprocess.Popen([str(BIN / "iscsi-target"), "serve", str(image), "--name", IQN,
                               "--portal", f"127.0.0.1:{port}", "--no-control"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    attach: subprocess.Popen[str] | None = None
    try:
        _until_listening(port, target)
        sock = tmp_path / "nbd.sock"
        attach = subprocess.Popen(
            [str(BIN / "iscsi-initiator"), "attach", f"iscsi://127.0.0.1:{port}/{IQN}/0",
             "--nbd", f"unix:{sock}", "--control", str(tmp_path / "ctl.sock"),
             "--replacement-timeout", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _read_until(attach, "attached", 30)
        target.kill()  # the target dies; the attach keeps trying
        target.wait(10)
        lost = _read_until(attach, "retrying", 60)
        assert "connection to 127.0.0.1" in lost and "s left)" in lost
        started = time.monotonic()
        attach.send_signal(signal.SIGTERM)
        attach.wait(20)
        took = time.monotonic() - started
        rest = attach.stderr.read() if attach.stderr else ""
        assert took < 15, took  # not the 300 s replacement timeout
        # "recovering" or "logging in", depending on where the reconnect
        # loop is when the signal comes; either way it stops at once.
        assert "stopping while the session is " in rest
        assert "writes the target has not acknowledged are lost" in rest
        assert not os.path.exists(sock)
    finally:
        for p in (attach, target):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
