"""``iscsi-target image``: create/info/check/convert/commit/snapshot, with
qemu-img as the reference (info agrees, converted images compare equal,
qemu-img check agrees with our check on damaged images)."""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from target import image_cli
from target.backends.registry import open_image
from target.image_check import check_image
from tests.images import (
    MiB,
    apply_ops,
    assert_same,
    qemu_compare,
    qemu_img,
    qemu_info,
    qemu_io,
    random_ops,
    random_raw,
)
from tests.tools import require_tool

FORMATS = ["qcow2", "vdi", "vhd", "vhdx", "vmdk", "parallels", "raw"]
DYNAMIC = ["qcow2", "vdi", "vhd", "vhdx", "vmdk", "parallels"]
QFMT = {"vhd": "vpc"}  # qemu's name for VHD


def qfmt(fmt: str) -> str:
    return QFMT.get(fmt, fmt)


def run(*argv: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stdout)."""
    out = io.StringIO()
    parser = argparse.ArgumentParser()
    image_cli._fill_parser(parser)
    args = parser.parse_args(list(argv))
    rc = image_cli.run(args, out)
    return rc, out.getvalue()


def info_json(path: str) -> dict[str, Any]:
    rc, out = run("info", "--output", "json", path)
    assert rc == 0
    result: dict[str, Any] = json.loads(out)
    return result


# ---------------------------------------------------------------- create / info


@pytest.mark.parametrize("fmt", FORMATS)
def test_create_and_info(tmp_path: Path, fmt: str) -> None:
    p = str(tmp_path / f"a.{fmt}")
    rc, out = run("create", "-f", fmt, p, "8M")
    assert rc == 0 and "Formatting" in out
    d = info_json(p)
    assert d["format"] == fmt
    # VHD sizes are rounded up to a CHS geometry (VHD spec, "Disk Geometry").
    assert d["virtual-size"] == 8 * MiB or (fmt == "vhd" and 8 * MiB < d["virtual-size"] < 9 * MiB)
    assert d["backing-chain"] == []
    if fmt in ("vdi", "vhd"):
        assert d["uuid"]


def test_create_refuses_existing_file_and_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp_path / "a.vdi")
    assert run("create", "-f", "vdi", p, "1M")[0] == 0
    assert run("create", "-f", "vdi", p, "1M")[0] == 1
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert run("create", "-f", "vdi", str(tmp_path / "b.vdi"), "12x")[0] == 1
    assert run("create", "-f", "qcow2", str(tmp_path / "c.qcow2"))[0] == 1  # no size, no backing
    assert run("create", "-f", "vdi", "-o", "type=nope", str(tmp_path / "d.vdi"), "1M")[0] == 1


def test_info_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("info", str(tmp_path / "nope.vdi"))
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("iscsi-target image: error:") and err.count("\n") == 1


def test_main_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp_path / "m.qcow2")
    assert image_cli.main(["create", "-f", "qcow2", p, "1M"]) == 0
    assert image_cli.main(["check", p]) == 0
    assert "No errors" in capsys.readouterr().out


def test_add_subparser_hooks_into_a_parent_cli(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="iscsi-target")
    sub = parser.add_subparsers(dest="command", required=True)
    image_cli.add_subparser(sub)
    p = str(tmp_path / "h.vhd")
    args = parser.parse_args(["image", "create", "-f", "vhd", p, "2M"])
    assert args.command == "image" and image_cli.run(args, io.StringIO()) == 0
    assert os.path.exists(p)


@pytest.mark.interop
@pytest.mark.parametrize("fmt", DYNAMIC + ["raw"])
def test_info_agrees_with_qemu(tmp_path: Path, fmt: str) -> None:
    p = str(tmp_path / f"a.{fmt}")
    assert run("create", "-f", fmt, p, "10M")[0] == 0
    ours = info_json(p)
    q = qemu_info(p)
    assert q["format"] == qfmt(fmt)
    if fmt == "vhd":
        # VHD sizes go through CHS geometry; qemu reports the footer's size
        # unless it was written by a known tool (force_size), so compare
        # what both read from the footer.
        assert abs(q["virtual-size"] - ours["virtual-size"]) < 64 * 255 * 512
    else:
        assert q["virtual-size"] == ours["virtual-size"]


@pytest.mark.interop
def test_info_shows_chain_made_by_qemu(tmp_path: Path) -> None:
    base = str(tmp_path / "base.raw")
    top = str(tmp_path / "top.qcow2")
    random_raw(base, 4 * MiB, 1)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    d = info_json(top)
    assert d["format"] == "qcow2" and d["backing-filename"] == "base.raw"
    assert [p["format"] for p in d["backing-chain"]] == ["raw"]
    rc, out = run("info", top)
    assert rc == 0 and "parent 1:" in out and "base.raw" in out


# ---------------------------------------------------------------- convert


@pytest.mark.interop
@pytest.mark.parametrize("fmt", DYNAMIC)
def test_convert_qemu_image_to_raw(tmp_path: Path, fmt: str) -> None:
    src = str(tmp_path / f"q.{fmt}")
    qemu_img("create", "-f", qfmt(fmt), src, "6M")
    qemu_io(src, qfmt(fmt), "write -P 0xa5 512k 1M", "write -P 0x3c 5M 64k")
    dst = str(tmp_path / "out.raw")
    assert run("convert", "-O", "raw", src, dst)[0] == 0
    qemu_compare(src, qfmt(fmt), dst, "raw")


@pytest.mark.interop
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_raw_to_format_compares_equal(tmp_path: Path, fmt: str) -> None:
    src = str(tmp_path / "src.raw")
    random_raw(src, 3 * MiB, 7)
    dst = str(tmp_path / f"dst.{fmt}")
    assert run("convert", "-f", "raw", "-O", fmt, src, dst)[0] == 0
    qemu_compare(dst, qfmt(fmt), src, "raw")
    assert run("check", dst)[0] == 0


def test_convert_skips_zero_ranges(tmp_path: Path) -> None:
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"\x01" * 4096)
        f.seek(5 * MiB)
        f.write(bytes(MiB))  # explicit zeroes: allocated in raw, skipped
    dst = str(tmp_path / "dst.vdi")
    assert run("convert", "-O", "vdi", src, dst)[0] == 0
    with open_image(dst, read_only=True) as img:
        assert int(img.info().extra["blocks_allocated"]) == 1
        assert bytes(img.read(3 * MiB, 4096)) == b"\x01" * 4096


def test_convert_flattens_a_chain_and_shows_progress(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vdi")
    assert run("create", "-f", "vdi", base, "4M")[0] == 0
    model = bytearray(4 * MiB)
    with open_image(base, read_only=False) as img:
        apply_ops(random_ops(4 * MiB, 3, 10), img, model)
    rc, child = run("snapshot", base)
    child = child.strip()
    assert rc == 0
    with open_image(child, read_only=False) as img:
        apply_ops(random_ops(4 * MiB, 4, 10), img, model)
    dst = str(tmp_path / "flat.qcow2")
    err = io.StringIO()
    bar = image_cli.ProgressBar(10, enabled=True, stream=err)
    bar.update(5)
    bar.done()
    assert "100" in err.getvalue()
    image_cli.convert(child, dst, "qcow2")
    with open_image(dst, read_only=True) as img:
        assert img.parent is None
        assert_same(img, bytes(model))


def test_convert_refuses_same_file(tmp_path: Path) -> None:
    p = str(tmp_path / "a.qcow2")
    assert run("create", "-f", "qcow2", p, "1M")[0] == 0
    assert run("convert", "-O", "qcow2", p, p)[0] == 1


# ---------------------------------------------------------------- snapshot / commit


@pytest.mark.parametrize("fmt", ["vdi", "vhd", "vhdx", "vmdk", "qcow2", "raw"])
def test_snapshot_then_commit(tmp_path: Path, fmt: str) -> None:
    base = str(tmp_path / f"base.{fmt}")
    size = 4 * MiB
    assert run("create", "-f", fmt, base, str(size))[0] == 0
    with open_image(base, read_only=False) as img:
        size = img.size  # VHD rounds up to a CHS geometry
        model = bytearray(size)
        apply_ops(random_ops(size, 11, 12, max_len=300 * 1024), img, model)
    rc, out = run("snapshot", base)
    child = out.strip()
    assert rc == 0 and os.path.exists(child) and child != base
    d = info_json(child)
    assert d["backing-chain"][0]["filename"].endswith(os.path.basename(base))
    if fmt in ("vdi", "vhd", "vhdx"):
        assert d["uuid"] != d["backing-chain"][0]["uuid"]
    with open_image(child, read_only=False) as img:
        apply_ops(random_ops(size, 12, 12, max_len=300 * 1024), img, model)
        # A zeroed range must hide the parent's data after commit too.
        img.write_zeroes(MiB, 256 * 1024)
        model[MiB : MiB + 256 * 1024] = bytes(256 * 1024)
    rc, out = run("commit", child)
    assert rc == 0 and "committed" in out
    assert os.path.exists(child)  # kept, as qemu-img keeps it
    with open_image(base, read_only=True) as img:
        assert img.parent is None
        assert_same(img, bytes(model))
    assert run("check", base)[0] == 0


def test_commit_without_parent_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp_path / "a.qcow2")
    assert run("create", "-f", "qcow2", p, "1M")[0] == 0
    assert run("commit", p)[0] == 1
    assert "no parent" in capsys.readouterr().err


def test_snapshot_names_do_not_collide(tmp_path: Path) -> None:
    base = str(tmp_path / "b.qcow2")
    assert run("create", "-f", "qcow2", base, "1M")[0] == 0
    one = run("snapshot", base)[1].strip()
    two = run("snapshot", base)[1].strip()
    assert one != two
    named = str(tmp_path / "mine.qcow2")
    assert run("snapshot", "-n", named, one)[1].strip() == named
    assert [p["filename"] for p in info_json(named)["backing-chain"]][-1].endswith("b.qcow2")
    assert run("snapshot", "-n", named, one)[0] == 1


def test_own_ranges_separates_data_zero_and_inherited(tmp_path: Path) -> None:
    base = str(tmp_path / "b.qcow2")
    assert run("create", "-f", "qcow2", base, "2M")[0] == 0
    with open_image(base, read_only=False) as img:
        img.write(0, b"\x07" * (2 * MiB))
    child = run("snapshot", base)[1].strip()
    with open_image(child, read_only=False) as img:
        img.write(64 * 1024, b"\x01" * 65536)
        img.write_zeroes(MiB, 65536)
        ranges = image_cli.own_ranges(img)
        assert img.parent is not None  # restored
    assert (64 * 1024, 128 * 1024, "data") in ranges
    assert (MiB, MiB + 65536, "zero") in ranges
    assert len(ranges) == 2


# ---------------------------------------------------------------- check


def _qcow2_l2_entries(path: str) -> tuple[int, int, list[int]]:
    """(cluster size, L2 table offset, its entries) of a one-L2 qcow2."""
    with open(path, "rb") as f:
        head = f.read(104)
        cb = struct.unpack_from(">I", head, 20)[0]
        l1_off = struct.unpack_from(">Q", head, 40)[0]
        f.seek(l1_off)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entries = list(struct.unpack(f">{(1 << cb) // 8}Q", f.read(1 << cb)))
    return 1 << cb, l2, entries


def test_check_finds_shared_qcow2_cluster(tmp_path: Path) -> None:
    p = str(tmp_path / "bad.qcow2")
    assert run("create", "-f", "qcow2", p, "4M")[0] == 0
    with open_image(p, read_only=False) as img:
        img.write(0, b"\x01" * 65536)
        img.write(65536, b"\x02" * 65536)
    _, l2, entries = _qcow2_l2_entries(p)
    with open(p, "r+b") as f:
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", entries[0]))  # entry 1 now aliases entry 0's cluster
    res = check_image(p)
    assert not res.ok and any("reference" in e for e in res.errors)
    assert run("check", p)[0] == 2


def test_check_reports_qcow2_leak_without_error(tmp_path: Path) -> None:
    p = str(tmp_path / "leak.qcow2")
    assert run("create", "-f", "qcow2", p, "4M")[0] == 0
    with open_image(p, read_only=False) as img:
        img.write(0, b"\x01" * 65536)
    _, l2, _ = _qcow2_l2_entries(p)
    with open(p, "r+b") as f:
        f.seek(l2)
        f.write(bytes(8))  # unmap the cluster: its refcount stays 1
    res = check_image(p)
    assert res.ok and res.leaks
    rc, out = run("check", "--output", "json", p)
    assert rc == 0 and json.loads(out)["leaks"] >= 1


def test_check_finds_vdi_double_mapping(tmp_path: Path) -> None:
    p = str(tmp_path / "bad.vdi")
    assert run("create", "-f", "vdi", p, "4M")[0] == 0
    with open_image(p, read_only=False) as img:
        img.write(0, b"\x01" * 4096)
        img.write(MiB, b"\x02" * 4096)
    with open(p, "r+b") as f:
        f.seek(0x154)
        off_bmap = struct.unpack("<I", f.read(4))[0]
        f.seek(off_bmap + 4)
        f.write(struct.pack("<I", 0))  # block 1 -> physical block 0 (block 0's)
    res = check_image(p)
    assert any("both map" in e for e in res.errors)


def test_check_finds_parallels_cluster_past_eof(tmp_path: Path) -> None:
    p = str(tmp_path / "bad.hds")
    assert run("create", "-f", "parallels", p, "4M")[0] == 0
    with open(p, "r+b") as f:
        f.seek(64)
        f.write(struct.pack("<I", 0xFFFF))
    res = check_image(p)
    assert any("past the end" in e for e in res.errors)
    assert run("check", p)[0] == 2


def test_check_raw_has_nothing_to_check(tmp_path: Path) -> None:
    p = str(tmp_path / "a.raw")
    assert run("create", "-f", "raw", p, "1M")[0] == 0
    rc, out = run("check", p)
    assert rc == 0 and "nothing to check" in out


@pytest.mark.interop
def test_check_agrees_with_qemu_on_damage(tmp_path: Path) -> None:
    import subprocess

    exe = require_tool("qemu-img")
    p = str(tmp_path / "q.qcow2")
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io(p, "qcow2", "write -P 1 0 64k", "write -P 2 64k 64k")
    assert run("check", p)[0] == 0
    _, l2, entries = _qcow2_l2_entries(p)
    with open(p, "r+b") as f:
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", entries[0]))
    q = subprocess.run([exe, "check", p], capture_output=True, text=True, check=False)
    assert q.returncode == 2
    assert run("check", p)[0] == 2


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vmdk", "parallels"])
def test_check_clean_on_qemu_made_images(tmp_path: Path, fmt: str) -> None:
    p = str(tmp_path / f"q.{fmt}")
    qemu_img("create", "-f", fmt, p, "8M")
    qemu_io(p, fmt, "write -P 9 0 3M", "write -P 8 7M 4k", "write -z 1M 64k")
    res = check_image(p)
    assert res.ok, res.errors
    assert not res.leaks, res.leaks


@pytest.mark.interop
def test_info_json_names_and_types_match_qemu(tmp_path: Path) -> None:
    """``image info --output json`` uses qemu-img's field names and JSON
    types, so scripts written for ``qemu-img info --output=json`` work."""
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    assert run("create", "-f", "qcow2", base, "4M")[0] == 0
    assert run("create", "-f", "qcow2", "-b", base, top)[0] == 0
    q = qemu_info(top)
    ours = info_json(top)
    for key in ("filename", "format", "virtual-size", "cluster-size", "dirty-flag",
                "backing-filename", "backing-filename-format"):
        assert type(ours[key]) is type(q[key]) and ours[key] == q[key] or key == "filename", key
    assert ours["format-specific"]["type"] == q["format-specific"]["type"] == "qcow2"
    assert ours["format-specific"]["data"]["refcount-bits"] == q["format-specific"]["data"][
        "refcount-bits"] == 16
    rc, out = run("info", "--output", "json", "--backing-chain", top)
    chain = json.loads(out)
    assert rc == 0 and [c["format"] for c in chain] == ["qcow2", "qcow2"]
