"""``iscsi-target serve`` observability as an administrator configures it:
``[server] log_format / log_file / metrics`` in the TOML file (the command
line overriding them), the JSON log file a collector reads, metrics
scraped from the served address, one-line errors for each bad setting,
and the sd_notify messages around a SIGHUP reload."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from target.cli import build_parser, config_from_args, observability
from target.config import ConfigError, load_config
from tests.tools import require_tool

EXE = [sys.executable, "-m", "target.cli"]
ROOT = Path(__file__).resolve().parent.parent
NAME = "iqn.2026-11.org.example:observed"


def _config(tmp_path: Path, server: str) -> Path:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    conf = tmp_path / "target.toml"
    conf.write_text(f'[server]\nportals = ["127.0.0.1:0"]\n{server}\n'
                    f'[[target]]\nname = "{NAME}"\n[[target.lun]]\npath = "disk.img"\n')
    return conf


def _serve(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(EXE + args, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def _wait_ready(proc: subprocess.Popen[str]) -> str:
    """The attach help, read up to its last line (printed once it serves)."""
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("Press Ctrl-C"):
            return "".join(out)
    raise AssertionError("serve exited: " + (proc.stderr.read() if proc.stderr else ""))


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_config_keys_and_command_line_override(tmp_path: Path) -> None:
    conf = _config(tmp_path, 'log_format = "json"\nlog_file = "logs/t.log"\n'
                   'metrics = "127.0.0.1:9117"')
    cfg = load_config(str(conf))
    assert (cfg.log_format, cfg.log_file, cfg.metrics) == \
        ("json", str(tmp_path / "logs" / "t.log"), "127.0.0.1:9117")
    args = build_parser().parse_args(["serve", "--config", str(conf), "--log-format", "text",
                                      "--metrics", "[::1]:9200"])
    got = observability(args, config_from_args(args))
    assert (got.log_format, got.log_file, got.metrics) == \
        ("text", str(tmp_path / "logs" / "t.log"), "[::1]:9200")


def test_metrics_address_without_port_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(1 << 20))
    r = subprocess.run(EXE + ["serve", "d.img", "--metrics", "localhost", "--no-control"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--metrics localhost: 'localhost' has no port (use HOST:PORT" in r.stderr


@pytest.mark.parametrize("line, expect", [
    ('log_format = "xml"', 'server.log_format: \'xml\' is not allowed ("text" or "json")'),
    ("log_format = 1", "server.log_format: 1 is not allowed"),
    ('metrics = "nohost"', "server.metrics: 'nohost' has no port (use HOST:PORT"),
    ('metrics = "::1:9117"', "server.metrics: portal '::1:9117': IPv6 addresses must be "
                            "written in brackets"),
    ("log_file = 3", "server.log_file: 3 is not allowed (a file path)"),
])
def test_config_errors_are_one_line(tmp_path: Path, line: str, expect: str) -> None:
    conf = _config(tmp_path, line)
    with pytest.raises(ConfigError, match="^" + str(conf).replace(".", r"\.") + ": ") as e:
        load_config(str(conf))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_unwritable_log_file_from_config_is_one_line(tmp_path: Path) -> None:
    conf = _config(tmp_path, 'log_file = "no/such/dir/t.log"')
    r = subprocess.run(EXE + ["serve", "--config", str(conf), "--no-control"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"iscsi-target: error: {conf}: server.log_file ")
    assert "No such file or directory" in r.stderr


def _log_docs(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_json_log_file_and_metrics_from_config(tmp_path: Path) -> None:
    """A collector's view: every line of the file is a JSON object; the
    login, logout and session end carry their fields; /metrics is served
    where the log says, and counts the initiator's commands."""
    pytest.importorskip("prometheus_client")
    inq = require_tool("iscsi-inq")
    conf = _config(tmp_path, 'log_format = "json"\nlog_file = "t.log"\n'
                   'metrics = "127.0.0.1:0"')
    log = tmp_path / "t.log"
    proc = _serve(["serve", "--config", str(conf), "--no-control"], tmp_path)
    try:
        help_text = _wait_ready(proc)
        (where,) = [d["address"] for d in _log_docs(log) if d.get("event") == "metrics_listening"]
        portal = help_text.split("Portals: ")[1].split()[0]
        r = subprocess.run([inq, f"iscsi://{portal}/{NAME}/0"], capture_output=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        body = urllib.request.urlopen(f"http://{where}/metrics", timeout=10).read().decode()
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    # The log went to the file (stderr has only the open-access warning
    # printed for the person starting it).
    assert "login: " not in err and not any(x.startswith("{") for x in err.splitlines())
    docs = _log_docs(log)
    assert all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    (login,) = [d for d in docs if d.get("event") == "login"]
    assert login["target"] == NAME and login["session_type"] == "Normal"
    assert str(login["initiator"]).startswith("iqn.2007-10.com.github:sahlberg:libiscsi")
    assert login["cid"] == 0 and isinstance(login["tsih"], int)
    assert login["max_recv_data_segment_length"] == 262144
    (end,) = [d for d in docs if d.get("event") == "session_end"]
    assert end["tsih"] == login["tsih"] and end["cause"] in ("logout", "connection_lost")
    assert isinstance(end["commands"], int) and end["commands"] >= 1
    lun = f'aioiscsi_lun_commands_total{{lun="0",target="{NAME}"}} '
    (line,) = [x for x in body.splitlines() if x.startswith(lun)]
    assert float(line.split()[-1]) >= 1


def _recv_until(sock: socket.socket, want: str, seconds: float = 30.0) -> list[str]:
    """Datagrams up to and including one holding ``want`` (bounded)."""
    got: list[str] = []
    deadline = time.monotonic() + seconds
    while not got or want not in got[-1]:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        got.append(sock.recv(4096).decode())
    return got


def test_reload_is_announced_to_systemd(tmp_path: Path) -> None:
    """SIGHUP: RELOADING=1 with MONOTONIC_USEC (systemd 253+ matches reloads
    by it), then READY=1 once the file's changes are applied."""
    conf = _config(tmp_path, "")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"aioiscsi-reload-{os.getpid()}-{tmp_path.name}"
    listener.bind("\0" + name)
    proc = _serve(["serve", "--config", str(conf), "--no-control"], tmp_path,
                  NOTIFY_SOCKET="@" + name)
    try:
        _wait_ready(proc)
        ready = _recv_until(listener, "READY=1")
        assert "STATUS=serving 1 target(s) on 127.0.0.1:" in ready[-1]
        proc.send_signal(signal.SIGHUP)
        got = _recv_until(listener, "READY=1")
        assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        usec = int(got[0].split("MONOTONIC_USEC=")[1].split("\n")[0])
        assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _recv_until(listener, "STOPPING=1")[-1]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        listener.close()


def test_example_unit_and_config_work_together() -> None:
    """The target unit's command line with the example config file: the
    file loads, and the unit's --state-dir applies over it (a unit names
    its StateDirectory so), as --nop-interval does."""
    import configparser
    import shlex

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "examples" / "systemd" / "iscsi-target.service")
    assert unit.get("Service", "Type") == "notify"
    argv = shlex.split(unit.get("Service", "ExecStart"))
    example = str(ROOT / "examples" / "systemd" / "target.toml")
    args = build_parser().parse_args(
        [example if a == "/etc/aioiscsi/target.toml" else a for a in argv[1:]] +
        ["--nop-interval", "5"])
    cfg = observability(args, config_from_args(args))
    assert cfg.state_dir == "/var/lib/aioiscsi" and cfg.nop_interval == 5.0
    assert cfg.log_format == "text" and cfg.metrics is None
    assert [t.name for t in cfg.targets] == ["iqn.2026-11.org.example:disk1"]
    assert unit.get("Service", "StateDirectory") == "aioiscsi"
