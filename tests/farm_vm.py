"""A golden boot disk for the boot farm proof (issue 13), built from the
installed Debian packages with tests/linux_vm.py's pieces (kernel lookup,
module closure, ``newc`` cpio writer): an MBR disk whose one FAT partition
holds SYSLINUX, the Debian kernel and a small initramfs. Nothing binary is
kept in the repository; the image is cached under ``.cache/farm-vm/``.

A machine SAN-boots it with iPXE (``sanboot``: iPXE's INT 13h drive reads
SYSLINUX, the kernel and the initramfs through our target), and Linux then
logs in again from the iBFT iPXE left (``iscsistart -b``), as a diskless
machine does. ``/init`` then prints::

    FARM-IBFT target=<iBFT target-name> initiator=<iBFT initiator-name>
    FARM-BEFORE <text found in the marker sector, "-" for none>
    FARM-AFTER <the marker it wrote, read back>
    FARM-DONE

and powers off. The marker sector is 1 MiB before the end of the disk,
outside the partition, so the golden image's files are never touched.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.linux_vm import (
    CACHE_DIR as _VM_CACHE,
    _tool,
    find_kernel,
    guest_cpio,
    module_closure,
)

CACHE_DIR = _VM_CACHE.parent / "farm-vm"
#: Debian packages the golden disk is made from (besides linux_vm's).
DEBIAN_PACKAGES = ("syslinux", "syslinux-common", "mtools", "dosfstools", "ipxe",
                   "qemu-system-x86", "linux-image-amd64", "busybox-static", "open-iscsi")
#: crc32c_generic: iscsi_tcp asks the crypto API for "crc32c" when it sets up a
#: connection (a run-time request, not in modules.dep; see linux_vm.ROOT_MODULES).
ROOT_MODULES = ("crc32c_generic", "e1000", "iscsi_tcp", "sd_mod", "iscsi_ibft")
DISK_SIZE = 48 << 20
PART_START = 1 << 20
#: Unpartitioned tail: the marker lives here.
TAIL = 1 << 20
MARKER_OFFSET = DISK_SIZE - TAIL
_BUILD_VERSION = "2"

_INIT = r"""#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run/lock/iscsi /var/lock /etc/iscsi
done_() { echo "FARM-DONE"; sync; poweroff -f; }
for m in $(cat /etc/aio/modules); do insmod "$m" || echo "FARM-WARN insmod $m"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ib=/sys/firmware/ibft
ini=$(cat $ib/initiator/initiator-name 2>/dev/null)
echo "FARM-IBFT target=$(cat $ib/target0/target-name 2>/dev/null) initiator=$ini"
if ! timeout 60 iscsistart -b > /tmp/login.log 2>&1; then
    echo "FARM-FAIL login $(tail -n 3 /tmp/login.log | tr '\n' '|')"; done_
fi
dev=""; i=0
while [ -z "$dev" ] && [ $i -lt 300 ]; do
    dev=$(ls /sys/block | grep '^sd' | head -n 1); [ -z "$dev" ] && usleep 100000; i=$((i+1))
done
[ -n "$dev" ] || { echo "FARM-FAIL no-disk"; done_; }
sector=$(( $(cat /sys/block/$dev/size) - 2048 ))
seen() { dd if=/dev/$dev bs=512 skip=$sector count=1 2>/dev/null | tr -d '\000' | head -c 120; }
b=$(seen); echo "FARM-BEFORE ${b:--}"
printf 'MARK:%s:END' "$ini" > /tmp/mark
dd if=/tmp/mark of=/dev/$dev bs=512 seek=$sector conv=notrunc,sync 2>/dev/null
sync; blockdev --flushbufs /dev/$dev; echo 3 > /proc/sys/vm/drop_caches
echo "FARM-AFTER $(seen)"
done_
"""


class FarmVmBuildError(RuntimeError):
    """The golden disk cannot be built from what is installed."""


@dataclass(frozen=True)
class GoldenDisk:
    """A raw golden boot disk."""

    path: Path


def _syslinux_mbr() -> Path:
    for d in ("/usr/lib/syslinux/mbr", "/usr/lib/SYSLINUX"):
        p = Path(d) / "mbr.bin"
        if p.is_file():
            return p
    raise FarmVmBuildError("no SYSLINUX mbr.bin (install the Debian package syslinux-common)")


def _initramfs(version: str, out: Path) -> None:
    busybox = _tool("busybox")
    iscsistart = _tool("iscsistart")
    cpio = guest_cpio(_INIT.encode(), ("dev", "proc", "sys", "tmp", "run", "etc/aio", "etc/iscsi"),
                      ((busybox, "bin/busybox"), (iscsistart, "usr/sbin/iscsistart")),
                      version, module_closure(version, ROOT_MODULES))
    raw = out.with_suffix(".cpio")
    cpio.write(raw)
    # Compressed: iPXE reads it through INT 13h, under TCG every MiB counts.
    with open(raw, "rb") as src, gzip.open(out, "wb", compresslevel=9) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FarmVmBuildError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


def build_golden(cache_dir: Path = CACHE_DIR) -> GoldenDisk:
    """Build (or reuse) the raw golden boot disk."""
    kernel, version = find_kernel()
    for tool in ("syslinux", "mkfs.vfat", "mcopy"):
        _tool(tool)
    key = hashlib.sha256(f"{_BUILD_VERSION}\0{_INIT}\0{kernel}\0{os.stat(kernel).st_mtime_ns}"
                         .encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"golden-{version}-{key}.img"
    if out.is_file():
        return GoldenDisk(out)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp_s:
        tmp = Path(tmp_s)
        _initramfs(version, tmp / "initrd.gz")
        part = tmp / "part.img"
        part_size = DISK_SIZE - PART_START - TAIL
        _run([_tool("mkfs.vfat"), "-C", "-n", "FARM", str(part), str(part_size // 1024)])
        _run([_tool("syslinux"), "--install", str(part)])
        cfg = tmp / "syslinux.cfg"
        cfg.write_text("DEFAULT farm\nTIMEOUT 0\nPROMPT 0\nLABEL farm\n  LINUX /vmlinuz\n"
                       "  INITRD /initrd.gz\n  APPEND console=ttyS0 quiet loglevel=3 panic=-1\n")
        shutil.copyfile(kernel, tmp / "vmlinuz")
        for f in ("vmlinuz", "initrd.gz", "syslinux.cfg"):
            _run([_tool("mcopy"), "-i", str(part), str(tmp / f), f"::/{f}"])
        disk = tmp / "disk.img"
        with open(disk, "wb") as d:
            d.truncate(DISK_SIZE)
            mbr = bytearray(_syslinux_mbr().read_bytes()[:440].ljust(446, b"\0"))
            start, count = PART_START // 512, part_size // 512
            # One active (0x80) FAT32-LBA (0x0c) partition; CHS fields unused.
            mbr += bytes([0x80, 0xFE, 0xFF, 0xFF, 0x0C, 0xFE, 0xFF, 0xFF]) + \
                start.to_bytes(4, "little") + count.to_bytes(4, "little")
            mbr += bytes(16 * 3) + b"\x55\xaa"
            d.write(mbr)
            d.seek(PART_START)
            with open(part, "rb") as p:
                shutil.copyfileobj(p, d)
        os.replace(disk, out)
    for old in cache_dir.glob("golden-*.img"):
        if old != out:
            old.unlink(missing_ok=True)
    return GoldenDisk(out)


def qemu_argv(tftp_dir: Path, uuid: str, *, memory_mb: int = 256) -> list[str]:
    """A TCG guest that network-boots through the e1000 NIC's iPXE ROM:
    QEMU's user network hands iPXE ``boot.ipxe`` from ``tftp_dir`` over its
    built-in TFTP; ``uuid`` (SMBIOS) makes the machine's initiator name."""
    qemu = _tool("qemu-system-x86_64")
    accel = ["-accel", "kvm", "-cpu", "host"] if os.environ.get("AIOISCSI_VM_KVM", "") \
        not in ("", "0") else ["-accel", "tcg"]
    return [qemu, *accel, "-smp", "1", "-m", str(memory_mb), "-uuid", uuid,
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-boot", "n",
            "-netdev", f"user,id=n0,tftp={tftp_dir},bootfile=boot.ipxe",
            "-device", "e1000,netdev=n0"]
