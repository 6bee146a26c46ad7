"""The ``iscsi-target`` command as a user runs it: serve, demo, config
files (TOML and ietd.conf), one-line errors, clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from target.config import ConfigError, load_config
from tests.tools import require_tool

EXE = [sys.executable, "-m", "target.cli"]


class Served:
    """A running ``iscsi-target`` subprocess and what it printed."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(EXE + args, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        # Read the attach help up to its last line (bounded: the process
        # prints it once listening, or exits).
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                break
        self.text = "\n".join(self.lines)

    def url(self) -> str:
        m = re.search(r"iscsi-inq (iscsi://\S+)", self.text)
        assert m, self.text + (self.proc.stderr.read() if self.proc.stderr else "")
        return m.group(1)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def test_serve_prints_attach_help_and_stops_cleanly(tmp_path: Path) -> None:
    inq = require_tool("iscsi-inq")
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 8 << 20)
    s = Served(["serve", str(img), "--portal", "127.0.0.1:0", "--name",
                "iqn.2026-11.org.example:cli"], tmp_path)
    try:
        assert "Target iqn.2026-11.org.example:cli" in s.text
        assert "LUN 0:" in s.text and "8 MiB" in s.text
        assert "iscsiadm -m discovery -t sendtargets -p 127.0.0.1:" in s.text
        assert "VBoxManage storageattach" in s.text and "--medium iscsi" in s.text
        out = subprocess.run([inq, s.url()], capture_output=True, text=True, errors="replace",
                             timeout=30)
        assert out.returncode == 0 and "Vendor:AIOISCSI" in out.stdout
    finally:
        code, err = s.stop()
    assert code == 0, err
    assert "login: iqn." in err  # who logged in, from where, with what
    assert "target stopped" in err


def test_demo_creates_and_serves_an_image(tmp_path: Path) -> None:
    s = Served(["demo", "--portal", "127.0.0.1:0", "--dir", str(tmp_path / "demo")], tmp_path)
    try:
        assert (tmp_path / "demo" / "demo.img").stat().st_size == 64 << 20
        assert "created" in s.text and "iscsi://127.0.0.1:" in s.text
        with open(tmp_path / "demo" / "demo.img", "rb") as f:
            assert f.read(512)[510:] == b"\x55\xaa"  # a partitioned disk
    finally:
        code, err = s.stop()
    assert code == 0, err


def _one_line_error(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(EXE + args, cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_image_is_one_line(tmp_path: Path) -> None:
    line = _one_line_error(["serve", str(tmp_path / "nope.img")], tmp_path)
    assert "nope.img: no such file" in line


def test_config_error_names_file_key_and_allowed(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[[target]]\nname = "iqn.2026-11.com.example:a"\n'
                   '[[target.lun]]\npath = "a.img"\nblock_size = 1000\n')
    line = _one_line_error(["serve", "--config", str(cfg)], tmp_path)
    assert "site.toml: target[0].lun[0].block_size: 1000 is not allowed (512 or 4096)" in line


@pytest.mark.parametrize("body, expect", [
    ('[server]\nportals = ["127.0.0.1:99999"]\n', "server.portals[0]"),
    ('[[target]]\nname = "not-an-iqn"\n', "target[0].name"),
    ('[[target]]\nname = "iqn.2026-11.com.example:a"\nchap = {user="u", secret="short"}\n'
     '[[target.lun]]\nbackend="memory"\nsize="1M"\n', "target[0].chap.secret"),
    ('[[target]]\nname = "iqn.2026-11.com.example:a"\n[[target.lun]]\nbackend="memory"\n',
     "target[0].lun[0].size"),
    ('[[target]]\nname = "iqn.2026-11.com.example:a"\nbogus = 1\n', "target[0].bogus"),
    ('[[target]]\nname = "iqn.2026-11.com.example:a"\n[target.limits]\nfirst_burst_length = '
     '2000000\n[[target.lun]]\nbackend="memory"\nsize="1M"\n', "first_burst_length"),
    ("not toml at all [", "not valid TOML"),
])
def test_config_errors(tmp_path: Path, body: str, expect: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg))
    msg = str(err.value)
    assert msg.startswith(str(cfg)) and expect in msg and "\n" not in msg


def test_ietd_conf_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    conf = tmp_path / "ietd.conf"
    conf.write_text(
        "IncomingUser disco discoverysecret\n"
        "Target iqn.2001-04.org.gentoo:iSCSI.test.disk1\n"
        "  IncomingUser joe joesecret1234\n"
        "  OutgoingUser jim jimsecret12345\n"
        "  Lun 0 Path=disk.img,Type=fileio\n"
        "  Alias Test\n"
        "  MaxConnections 1\n"
        "  InitialR2T Yes\n"
        "  ImmediateData No\n"
        "  MaxRecvDataSegmentLength 8192\n"
        "  #MaxXmitDataSegmentLength 8192\n"
        "  MaxBurstLength 262144\n"
        "  FirstBurstLength 65536\n"
        "  HeaderDigest CRC32C\n"
        "  DataDigest CRC32C,None\n"
        "  Wthreads 8\n")
    cfg = load_config(str(conf))
    (t,) = cfg.targets
    assert t.name == "iqn.2001-04.org.gentoo:iscsi.test.disk1"  # normalised (RFC 3722)
    assert t.alias == "Test"
    assert t.luns[0].path == str(tmp_path / "disk.img")
    assert t.chap is not None and (t.chap.user, t.chap.mutual_user) == ("joe", "jim")
    assert t.limits.initial_r2t and not t.limits.immediate_data
    assert t.limits.max_recv_data_segment_length == 8192
    assert t.limits.header_digests == ("CRC32C",)
    assert t.limits.data_digests == ("CRC32C", "None")
    assert cfg.discovery_chap is not None and cfg.discovery_chap.user == "disco"


def test_ietd_conf_error_names_line(tmp_path: Path) -> None:
    conf = tmp_path / "ietd.conf"
    conf.write_text("Target iqn.2001-04.org.gentoo:x\n  Lun 0 Path=/x,Type=floppy\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(conf))
    assert str(err.value).startswith(f"{conf}:2: Lun Type")


def test_attach_help_shows_the_chap_form(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    s = Served(["serve", str(img), "--portal", "127.0.0.1:0", "--name",
                "iqn.2026-11.org.example:chapcli", "--chap", "alice:secretsecret12"], tmp_path)
    try:
        assert "CHAP user alice" in s.text
        assert "iscsi://alice%SECRET@127.0.0.1:" in s.text
        assert "-n node.session.auth.username -v alice" in s.text
        assert "--username alice --password SECRET" in s.text
        assert "secretsecret12" not in s.text  # the secret is never printed
    finally:
        code, err = s.stop()
    assert code == 0, err


def test_portal_applies_to_an_ietd_conf(tmp_path: Path) -> None:
    """ietd takes its portals on the command line: so does serve --config."""
    from target.cli import build_parser, config_from_args

    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    conf = tmp_path / "ietd.conf"
    conf.write_text("Target iqn.2001-04.org.example:disk1\n  Lun 0 Path=disk.img,Type=fileio\n")
    args = build_parser().parse_args(["serve", "--config", str(conf), "--portal",
                                      "127.0.0.1:3261", "--portal", "[::1]:3262"])
    cfg = config_from_args(args)
    assert [g.portals for g in cfg.portal_groups] == [(("127.0.0.1", 3261), ("::1", 3262))]
    s = Served(["serve", "--config", str(conf), "--portal", "127.0.0.1:0"], tmp_path)
    try:
        assert "Target iqn.2001-04.org.example:disk1" in s.text and "127.0.0.1:" in s.text
    finally:
        code, err = s.stop()
    assert code == 0, err


def test_json_log_to_a_file(tmp_path: Path) -> None:
    """--log-format json --log-file: one JSON object per line, the login
    line among them (for log collectors)."""
    import json

    inq = require_tool("iscsi-inq")
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    log = tmp_path / "target.log"
    s = Served(["serve", str(img), "--portal", "127.0.0.1:0", "--name",
                "iqn.2026-11.org.example:jsonlog", "--log-format", "json", "--log-file",
                str(log)], tmp_path)
    try:
        assert subprocess.run([inq, s.url()], capture_output=True, timeout=30).returncode == 0
    finally:
        code, err = s.stop()
    assert code == 0, err
    docs = [json.loads(line) for line in log.read_text().splitlines()]
    assert docs and all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    assert any("login: iqn." in d["message"] for d in docs)
    bad = subprocess.run([str(Path(sys.executable).with_name("iscsi-target")), "serve", str(img),
                          "--log-file", str(tmp_path / "no" / "dir" / "x.log"), "--no-control"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--log-file" in bad.stderr


def test_metrics_scraped_over_http(tmp_path: Path) -> None:
    """serve --metrics: counters that moved with real I/O, sessions, login
    refusals by reason, scraped over HTTP as Prometheus does."""
    import urllib.request

    from tests.tgt import free_port

    inq = require_tool("iscsi-inq")
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mport = free_port()
    s = Served(["serve", str(img), "--portal", "127.0.0.1:0", "--name",
                "iqn.2026-11.org.example:metrics", "--metrics", f"127.0.0.1:{mport}"], tmp_path)
    try:
        assert subprocess.run([inq, s.url()], capture_output=True, timeout=30).returncode == 0
        wrong = s.url().replace("metrics/0", "nosuch/0")
        subprocess.run([inq, wrong], capture_output=True, timeout=30)  # refused: not found
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        text = body.decode()
    finally:
        code, err = s.stop()
    assert code == 0, err
    lun = 'lun="0",target="iqn.2026-11.org.example:metrics"'
    assert f"aioiscsi_lun_commands_total{{{lun}}}" in text, text
    assert f"aioiscsi_lun_size_bytes{{{lun}}} 1.048576e+06" in text
    cmds = [line for line in text.splitlines() if line.startswith("aioiscsi_lun_commands_total{")]
    assert cmds and float(cmds[0].split()[-1]) >= 1  # INQUIRY et al. were counted
    assert 'aioiscsi_login_failures_total{reason="target not found"}' in text
    assert "aioiscsi_sessions{" in text


def test_metrics_without_prometheus_client_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    code = ("import sys; sys.modules['prometheus_client'] = None; from target.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "serve", str(img), "--metrics",
                        "127.0.0.1:9", "--no-control"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "pip install 'aioiscsi[metrics]'" in r.stderr


def test_physical_block_size_and_removable(tmp_path: Path) -> None:
    """512e and removable LUNs from the command line and from TOML; a
    physical block that is not a power-of-two multiple is one line."""
    from target.config import load_config

    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    line = _one_line_error(["serve", "a.img", "--physical-block-size", "1000"], tmp_path)
    assert "--physical-block-size 1000 is not allowed" in line
    cfg = tmp_path / "site.toml"
    cfg.write_text('[[target]]\nname = "iqn.2026-11.com.example:a"\n[[target.lun]]\npath = "a.img"\n'
                   'physical_block_size = 4096\nremovable = true\nsanitize_rate = "16M"\n')
    lun = load_config(str(cfg)).targets[0].luns[0]
    assert (lun.physical_block_size, lun.removable, lun.sanitize_rate) == (4096, True, 16 << 20)
    cfg.write_text('[[target]]\nname = "iqn.2026-11.com.example:a"\n[[target.lun]]\npath = "a.img"\n'
                   'block_size = 4096\nphysical_block_size = 512\n')
    line = _one_line_error(["serve", "--config", str(cfg)], tmp_path)
    assert "physical_block_size" in line and "512 is not allowed" in line
