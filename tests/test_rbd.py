"""Ceph RBD images as LUNs (issue 15), on a throwaway one-node cluster.

Data written through our initiator is read back with the ``rbd`` tool and
the librbd API; UNMAP shows as deallocated extents in librbd's own map;
COMPARE AND WRITE reports a MISCOMPARE with the offset; libiscsi's
conformance suite runs over an RBD LUN; the command line serves
``rbd:POOL/IMAGE``; a second writer is refused by the exclusive lock.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from initiator.blockdev import BlockDevice
from initiator.scsi import LUN, SCSICheckCondition
from initiator.session import Session
from iscsi.scsi.sbc import ProvisioningStatus
from target.backends.base import BackendError
from target.config import ConfigError, LunSpec, config_from_dict
from tests.ceph_cluster import CephCluster
from tests.initiator_checks import LONG, MiB, TargetProcess, opts, random_write_verify
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tgt import free_port
from tests.tools import require_tool

pytestmark = pytest.mark.interop

SIZE = 64 * MiB
_names = itertools.count()


@pytest.fixture
def image(ceph_cluster: CephCluster) -> str:
    """A fresh 64 MiB image in the cluster's ``rbd`` pool."""
    name = f"lun{next(_names)}"
    ceph_cluster.create_image(name, SIZE)
    return name


def _spec(cluster: CephCluster, image: str, **kw: object) -> LunSpec:
    return LunSpec(lun=0, path="", backend="rbd", pool=cluster.pool, image=image,
                   ceph_conf=cluster.conf, **kw)  # type: ignore[arg-type]


@pytest.fixture
def served(ceph_cluster: CephCluster, image: str) -> Iterator[RunningTarget]:
    with running_target(make_config([_spec(ceph_cluster, image)])) as t:
        yield t


def _read_image(cluster: CephCluster, image: str, offset: int, length: int) -> bytes:
    import rbd  # type: ignore[import-not-found,unused-ignore]

    with cluster.rados().open_ioctx(cluster.pool) as io, \
            rbd.Image(io, image, read_only=True) as img:
        return bytes(img.read(offset, length))


def _allocated(cluster: CephCluster, image: str) -> list[tuple[int, int]]:
    """librbd's own map of the image: the extents that hold data."""
    import rbd  # type: ignore[import-not-found,unused-ignore]

    found: list[tuple[int, int]] = []
    with cluster.rados().open_ioctx(cluster.pool) as io, \
            rbd.Image(io, image, read_only=True) as img:
        img.diff_iterate(0, SIZE, None, lambda o, n, e: found.append((o, n)) if e else None)
    return sorted(found)


async def _open(t: RunningTarget) -> tuple[Session, LUN]:
    s = await Session.connect(t.host, t.port, TARGET_NAME, opts())
    return s, await LUN.open(s, 0)


async def test_written_data_reads_back_through_rbd_export(
        ceph_cluster: CephCluster, image: str, served: RunningTarget, tmp_path: Path) -> None:
    s = await Session.connect(served.host, served.port, TARGET_NAME, opts())
    async with s:
        dev = await BlockDevice.from_session(s, 0)
        assert dev.size == SIZE
        model = await random_write_verify(dev, 16 * MiB)
        await dev.flush()
    # The rbd tool reads the image while the target still holds the lock.
    out = tmp_path / "export.raw"
    rbd_tool = require_tool("rbd")
    subprocess.run([rbd_tool, "-c", ceph_cluster.conf, "export", f"{ceph_cluster.pool}/{image}",
                    str(out)], check=True, capture_output=True, timeout=60)
    assert out.read_bytes()[:len(model)] == bytes(model)


async def test_unmap_is_a_discard_librbd_sees(ceph_cluster: CephCluster, image: str,
                                              served: RunningTarget) -> None:
    s, lun = await _open(served)
    async with s:
        dev = await BlockDevice.from_session(s, 0)
        await dev.write(0, b"\x11" * (12 * MiB))
        await dev.flush()
        # One whole 4 MiB RBD object, and 1 KiB inside another.
        assert await dev.discard(4 * MiB, 4 * MiB) == 4 * MiB
        await lun.unmap([(8 * MiB // 512 + 2, 2)])
        assert await dev.read(4 * MiB, 4 * MiB) == bytes(4 * MiB)
        assert await dev.read(8 * MiB, 2048) == b"\x11" * 1024 + bytes(1024)
        status = await lun.get_lba_status(0)
        assert [(d.lba, d.blocks, d.status) for d in status[:2]] == [
            (0, 8192, ProvisioningStatus.MAPPED),
            (8192, 8192, ProvisioningStatus.DEALLOCATED),
        ]
        # WRITE SAME with UNMAP deallocates too; without it, stays mapped.
        await lun.write_same(0, 8192, bytes(512), unmap=True)
        await lun.write_same(3 * 8192, 16, bytes(512))
    assert _read_image(ceph_cluster, image, 8 * MiB, 2048) == b"\x11" * 1024 + bytes(1024)
    extents = _allocated(ceph_cluster, image)
    assert all(o >= 8 * MiB for o, _ in extents), extents
    assert any(o <= 12 * MiB < o + n for o, n in extents), extents


async def test_compare_and_write_and_miscompare(ceph_cluster: CephCluster, image: str,
                                                served: RunningTarget) -> None:
    s, lun = await _open(served)
    async with s:
        await lun.write(10, b"\xab" * 1024)
        await lun.compare_and_write(10, b"\xab" * 512, b"\xcd" * 512)
        cur = b"\xcd" * 512
        with pytest.raises(SCSICheckCondition) as info:
            await lun.compare_and_write(10, cur[:100] + b"\x00" + cur[101:], b"\xef" * 512)
        assert info.value.key_name == "MISCOMPARE"
        assert info.value.sense is not None and info.value.sense.information == 100
        assert bytes(await lun.read(10, 2)) == b"\xcd" * 512 + b"\xab" * 512
    assert _read_image(ceph_cluster, image, 10 * 512, 512) == b"\xcd" * 512


def test_second_writer_is_refused_by_the_exclusive_lock(ceph_cluster: CephCluster, image: str,
                                                        served: RunningTarget) -> None:
    from target.runtime import open_lun

    with pytest.raises(BackendError, match="another client holds the image's exclusive lock"):
        open_lun(_spec(ceph_cluster, image))
    # A read-only LUN needs no lock.
    ro = open_lun(_spec(ceph_cluster, image, read_only=True))
    try:
        assert ro.size == SIZE and ro.read_only
    finally:
        ro.close()


def test_missing_image_and_missing_bindings_are_one_line(
        ceph_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from target.runtime import open_lun

    with pytest.raises(BackendError, match=r"^rbd:rbd/nope: no such pool or image$"):
        open_lun(_spec(ceph_cluster, "nope"))
    monkeypatch.setitem(sys.modules, "rbd", None)  # as when python3-rbd is not installed
    with pytest.raises(BackendError, match=r"^the rbd backend needs python3-rbd and "
                                           r"python3-rados \(Debian\)") as info:
        open_lun(_spec(ceph_cluster, "nope"))
    assert "\n" not in str(info.value)


def test_toml_rbd_lun_keys(tmp_path: Path) -> None:
    doc = {"target": [{"name": "iqn.2026-11.org.example:t", "lun": [
        {"backend": "rbd", "pool": "p", "namespace": "ns", "image": "i",
         "ceph_conf": "ceph.conf", "client_id": "gw", "keyring": "/k"}]}]}
    site = tmp_path / "site.toml"
    site.write_text("")  # relative paths are taken from the file's directory
    lun = config_from_dict(doc, str(site)).targets[0].luns[0]
    assert (lun.pool, lun.namespace, lun.image, lun.client_id, lun.keyring) == (
        "p", "ns", "i", "gw", "/k")
    assert lun.ceph_conf == str(tmp_path / "ceph.conf")
    for bad, msg in ((dict(backend="rbd", pool="p"), "image: missing"),
                     (dict(backend="raw", path="/x", pool="p"), 'only for backend = "rbd"'),
                     (dict(backend="rbd", pool="p", image="i", mode="immutable"),
                      "not allowed for an RBD image")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"target": [{"name": "iqn.2026-11.org.example:t", "lun": [bad]}]},
                             "site.toml")


def test_serve_rbd_on_the_command_line(ceph_cluster: CephCluster, image: str,
                                       tmp_path: Path) -> None:
    port = free_port()
    name = "iqn.2026-11.org.aioiscsi.test:rbd"
    proc = TargetProcess(Path(f"rbd:{ceph_cluster.pool}/{image}"), port, name, workdir=tmp_path,
                         extra=["--ceph-conf", ceph_cluster.conf, "--no-control"])
    with proc:
        inq = require_tool("iscsi-inq")
        out = subprocess.run([inq, proc.url()], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "AIOISCSI" in out.stdout
    log = next(tmp_path.glob("target-*.log")).read_text()
    assert re.search(rf"LUN 0: rbd:{ceph_cluster.pool}/{image} \(64 MiB\)", log), log


#: The families whose commands take the RBD paths (aio reads and writes,
#: discard, zeroes, COMPARE AND WRITE, flushes, the map, residuals), each
#: run on its own (~30 s). Family ALL (230 tests, ~100 s here -- as long as
#: over a raw file: most of it is transport tests that never reach the
#: backend; VERIFY and ORWRITE take the blocking path) runs with
#: AIOISCSI_LONG=1; it passed 230 of 230.
_FAMILIES = ("CompareAndWrite", "GetLBAStatus", "Unmap", "WriteSame16", "Write16", "Read16",
             "ExtendedCopy", "Prefetch16", "ReadCapacity16", "iSCSIResiduals")


def test_iscsi_test_cu_over_rbd(ceph_cluster: CephCluster, image: str) -> None:
    """libiscsi's conformance suite over an RBD LUN: 0 failures."""
    tool = require_tool("iscsi-test-cu")
    families = ("ALL",) if LONG else tuple(f"ALL.{f}" for f in _FAMILIES)
    ran = failed = 0
    failures: list[tuple[str, str]] = []
    with running_target(make_config([_spec(ceph_cluster, image)])) as target:
        url = target.url()
        for family in families:
            proc = subprocess.run([tool, "-d", "-n", f"--test={family}", url, url],
                                  capture_output=True, text=True, timeout=900)
            out = proc.stdout + proc.stderr
            m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
            assert m, f"{family}: no CUnit summary\n{out[-3000:]}"
            ran += int(m.group(2))
            failed += int(m.group(4))
            failures += re.findall(r"Suite (.*), Test (.*) had failures", out)
    print(f"\niscsi-test-cu {'ALL' if LONG else 'I/O families'} on rbd: {ran} run, "
          f"{failed} failed")
    assert failed == 0, f"failing tests: {failures}"
    assert ran >= (200 if LONG else 50)


async def test_reservation_taken_at_one_gateway_holds_at_the_other(
        ceph_cluster: CephCluster, image: str) -> None:
    """Two target processes' worth of gateways on one image (A read-write,
    holding the lock; B read-only): persistent reservations live in RADOS,
    so what an initiator reserves through A is enforced at B at once."""
    from initiator.scsi import SCSIStatusError
    from iscsi.scsi.constants import PROutAction, Status

    host_x = "iqn.2026-11.org.aioiscsi.test:host-x"
    host_y = "iqn.2026-11.org.aioiscsi.test:host-y"
    with running_target(make_config([_spec(ceph_cluster, image)])) as a, \
            running_target(make_config([_spec(ceph_cluster, image, read_only=True)])) as b:
        sx = await Session.connect(a.host, a.port, TARGET_NAME, opts(initiator_name=host_x))
        sy = await Session.connect(b.host, b.port, TARGET_NAME, opts(initiator_name=host_y))
        async with sx, sy:
            x, y = await LUN.open(sx, 0), await LUN.open(sy, 0)
            await x.persistent_reserve_out(PROutAction.REGISTER, service_action_key=0xA1)
            await y.persistent_reserve_out(PROutAction.REGISTER, service_action_key=0xB2)
            keys = await y.read_keys()
            assert sorted(keys.keys) == [0xA1, 0xB2]
            assert (await x.read_keys()).generation == keys.generation
            # Exclusive Access (type 3, SPC-4 §5.9.10): only the holder reads.
            await x.persistent_reserve_out(PROutAction.RESERVE, reservation_key=0xA1, pr_type=3)
            held = await y.read_reservation()
            assert (held.key, held.pr_type) == (0xA1, 3)
            with pytest.raises(SCSIStatusError) as info:
                await y.read(0, 1)
            assert info.value.status == Status.RESERVATION_CONFLICT
            await x.read(0, 1)
            # Released through A: B serves reads again.
            await x.persistent_reserve_out(PROutAction.RELEASE, reservation_key=0xA1, pr_type=3)
            await y.read(0, 1)
            assert (await y.read_reservation()).key is None
