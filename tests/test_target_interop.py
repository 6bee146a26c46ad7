"""Our target with real initiators: libiscsi's command line tools and QEMU's
libiscsi block driver (issue #3 proof)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from target.config import ChapConfig, Limits, LunSpec
from tests.target_fixture import TARGET_NAME, make_config, running_target
from tests.tools import require_tool

pytestmark = pytest.mark.interop

SIZE = 32 << 20


def run(*cmd: str, timeout: float = 120) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace",
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sparse(path: Path, size: int = SIZE) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def random_image(path: Path, size: int = SIZE) -> str:
    """A raw image with random data in some ranges and holes elsewhere."""
    rng = __import__("random").Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(24):
            off = rng.randrange(0, size // 4096) * 4096
            f.seek(off)
            f.write(rng.randbytes(min(rng.choice((4096, 65536, 300000)), size - off)))
    return str(path)


def test_iscsi_ls_inq_readcapacity(tmp_path: Path) -> None:
    ls, inq, rc16 = (require_tool(t) for t in ("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"))
    cfg = make_config([LunSpec(lun=0, path=sparse(tmp_path / "a.img"), backend="raw"),
                       LunSpec(lun=1, path="", backend="memory", size=8 << 20)])
    with running_target(cfg) as t:
        out = run(ls, "-s", f"iscsi://{t.portal()}")
        assert f"Target:{TARGET_NAME} Portal:{t.portal()},1" in out
        assert "Lun:0" in out and "Lun:1" in out
        assert "Size:32M" in out or "Size:31M" in out or "Size:33M" in out
        out = run(inq, t.url())
        assert "Vendor:AIOISCSI" in out and "Product:VIRTUAL-DISK" in out
        out = run(inq, "--evpd=1", "--pagecode=131", t.url())
        assert "NAA" in out or "naa" in out.lower()
        out = run(rc16, t.url(1))
        assert f"Total size:{8 << 20}" in out
        assert "LBPME:1" in out


def _qemu_roundtrip(tmp_path: Path, url_in: str, url_out: str | None = None) -> None:
    qemu_img = require_tool("qemu-img")
    src = random_image(tmp_path / "src.raw")
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, url_in, timeout=300)
    back = tmp_path / "back.raw"
    run(qemu_img, "convert", "-O", "raw", url_out or url_in, str(back), timeout=300)
    assert os.path.getsize(back) == SIZE
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", src, str(back))


def test_qemu_img_convert_roundtrip(tmp_path: Path) -> None:
    cfg = make_config([LunSpec(lun=0, path=sparse(tmp_path / "lun.img"), backend="raw")])
    with running_target(cfg) as t:
        _qemu_roundtrip(tmp_path, t.url())


def test_qemu_img_with_chap(tmp_path: Path) -> None:
    chap = ChapConfig("qemu", "qemu-secret-1234")
    cfg = make_config([LunSpec(lun=0, path=sparse(tmp_path / "lun.img"), backend="raw")],
                      chap=chap)
    with running_target(cfg) as t:
        _qemu_roundtrip(tmp_path, t.url(user="qemu", secret="qemu-secret-1234"))
        # Without credentials the login is refused and qemu-img fails.
        proc = subprocess.run([require_tool("qemu-img"), "info", t.url()],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0


def test_qemu_img_with_crc32c_digests(tmp_path: Path) -> None:
    # The target only accepts HeaderDigest=CRC32C, so it is in force.
    # (libiscsi implements header digests only: it always offers
    # DataDigest=None; data digests are proven with our initiator and tshark.)
    limits = Limits(header_digests=("CRC32C",))
    cfg = make_config([LunSpec(lun=0, path=sparse(tmp_path / "lun.img"), backend="raw")],
                      limits=limits)
    with running_target(cfg) as t:
        opts = (f"driver=iscsi,transport=tcp,portal={t.portal()},target={TARGET_NAME},lun=0,"
                "header-digest=crc32c")
        qemu_img = require_tool("qemu-img")
        src = random_image(tmp_path / "src.raw")
        run(qemu_img, "convert", "-n", "-f", "raw", "--target-image-opts", src, opts,
            timeout=300)
        back = tmp_path / "back.raw"
        run(qemu_img, "convert", "--image-opts", opts, "-O", "raw", str(back), timeout=300)
        run(qemu_img, "compare", "-f", "raw", "-F", "raw", src, str(back))
