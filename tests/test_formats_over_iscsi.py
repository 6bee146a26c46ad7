"""Disk images served over iSCSI (issue #5 proof), end to end with qemu:

- images made by ``qemu-img convert`` read back over iSCSI bit-exact;
- images we create, written through the target by qemu's iSCSI driver, pass
  ``qemu-img check`` and compare equal with what was written.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from target.backends.registry import create_image
from target.config import LunSpec
from tests.target_fixture import make_config, running_target
from tests.tools import require_tool

pytestmark = pytest.mark.interop

SIZE = 16 << 20

# (our format name, qemu-img's name, qemu-img -o options)
FORMATS = [
    ("qcow2", "qcow2", ""),
    ("qcow2", "qcow2", "compat=0.10"),
    ("vdi", "vdi", ""),
    ("vhd", "vpc", ""),
    ("vhdx", "vhdx", ""),
    ("vhdx", "vhdx", "subformat=fixed"),
    ("vmdk", "vmdk", ""),
    ("vmdk", "vmdk", "subformat=monolithicFlat"),
    ("parallels", "parallels", ""),
]
CHECKABLE = {"qcow2", "vdi", "vhdx", "vmdk", "parallels"}


def qemu(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"qemu-img {args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def random_raw(path: Path, seed: int) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for _ in range(20):
            off = rng.randrange(SIZE // 512) * 512
            f.seek(off)
            f.write(rng.randbytes(min(rng.choice((512, 4096, 70000, 1 << 20)), SIZE - off)))


@pytest.mark.parametrize("ours, qfmt, opts", FORMATS)
def test_qemu_made_image_reads_bit_exact_over_iscsi(tmp_path: Path, ours: str, qfmt: str,
                                                     opts: str) -> None:
    src = tmp_path / "src.raw"
    random_raw(src, 1)
    img = tmp_path / f"img.{qfmt}"
    qemu("convert", "-f", "raw", "-O", qfmt, *(["-o", opts] if opts else []), str(src), str(img))
    with running_target(make_config([LunSpec(lun=0, path=str(img), read_only=True)])) as t:
        out = tmp_path / "out.raw"
        qemu("convert", "-O", "raw", t.url(), str(out))
    qemu("compare", "-f", "raw", "-F", "raw", str(src), str(out))


@pytest.mark.parametrize("fmt, qfmt", [("qcow2", "qcow2"), ("vdi", "vdi"), ("vhd", "vpc"), ("vhdx", "vhdx"),
                                       ("vmdk", "vmdk"), ("parallels", "parallels")])
def test_written_through_target_passes_qemu_check(tmp_path: Path, fmt: str, qfmt: str) -> None:
    src = tmp_path / "src.raw"
    random_raw(src, 2)
    img = tmp_path / f"ours.{fmt}"
    create_image(str(img), fmt, SIZE)
    with running_target(make_config([LunSpec(lun=0, path=str(img))])) as t:
        qemu("convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url())
    if fmt in CHECKABLE:
        qemu("check", "-f", qfmt, str(img))
    qemu("compare", "-f", qfmt, "-F", "raw", str(img), str(src))
