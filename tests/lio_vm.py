"""LIO, the Linux kernel's iSCSI target, in the QEMU guest the Linux tests
already boot (tests/linux_vm.py): the reference peer where RFC 7143 leaves
room, for the ErrorRecoveryLevel 1/2 and MC/S proof.

The guest's /init loads target_core_mod, target_core_file and
iscsi_target_mod from the Debian kernel and configures LIO through configfs
alone (no targetcli): a fileio backstore on a tmpfs file, one target with
two portal groups -- TPG 1 on port 3260 without authentication, TPG 2 on
port 3261 with CHAP -- each with ErrorRecoveryLevel 2, MaxConnections 4 and
CRC32C offered for both digests, in demo mode (generate_node_acls). QEMU's
user networking forwards two loopback ports of the host to them. The guest
prints ``AIOISCSI-LIO-READY`` and then idles until QEMU is killed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.linux_vm import (
    CACHE_DIR,
    GUEST_ADDRESS,
    VmBuildError,
    _tool,
    find_kernel,
    guest_cpio,
    module_closure,
    write_cached,
)

LIO_IQN = "iqn.2003-01.org.linux-iscsi.aioiscsi:lio"
CHAP_USER, CHAP_SECRET = "lio-user", "lio-secret-1234"
DISK_SIZE = 16 << 20
READY = "AIOISCSI-LIO-READY"
ROOT_MODULES = ("crc32c_generic", "e1000", "target_core_file", "iscsi_target_mod")

_INIT = r"""#!/bin/busybox sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/aio/modules); do
    insmod "$m" || echo "AIOISCSI-WARN insmod $m failed"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
ip link set lo up
ip addr add __GUEST__ dev eth0
ip link set eth0 up

dd if=/dev/zero of=/tmp/disk.img bs=1048576 count=0 seek=__MIB__ 2>/dev/null
C=/sys/kernel/config/target
mkdir -p $C/core/fileio_0/disk
echo "fd_dev_name=/tmp/disk.img,fd_dev_size=__SIZE__" > $C/core/fileio_0/disk/control
echo 1 > $C/core/fileio_0/disk/enable
for tag in 1 2; do
    T=$C/iscsi/__IQN__/tpgt_$tag
    mkdir -p $T/lun/lun_0
    ln -s $C/core/fileio_0/disk $T/lun/lun_0/disk
    mkdir $T/np/0.0.0.0:$((3259 + tag))
    echo 1 > $T/attrib/generate_node_acls
    echo 1 > $T/attrib/cache_dynamic_acls
    echo 0 > $T/attrib/demo_mode_write_protect
    echo 2 > $T/param/ErrorRecoveryLevel
    # LIO takes a session's ErrorRecoveryLevel from the node ACL's
    # default_erl (demo mode: the TPG's), not from the parameter alone.
    echo 2 > $T/attrib/default_erl
    echo 4 > $T/param/MaxConnections
    echo "CRC32C,None" > $T/param/HeaderDigest
    echo "CRC32C,None" > $T/param/DataDigest
done
T=$C/iscsi/__IQN__/tpgt_1
echo 0 > $T/attrib/authentication
T=$C/iscsi/__IQN__/tpgt_2
echo -n __USER__ > $T/auth/userid
echo -n __SECRET__ > $T/auth/password
echo 1 > $T/attrib/authentication
for tag in 1 2; do echo 1 > $C/iscsi/__IQN__/tpgt_$tag/enable; done
echo "__READY__ $(cat $C/iscsi/__IQN__/tpgt_1/attrib/default_erl)"
while true; do sleep 3600; done
"""


def _init_script() -> bytes:
    text = _INIT
    for k, v in {"__GUEST__": GUEST_ADDRESS, "__MIB__": str(DISK_SIZE >> 20),
                 "__SIZE__": str(DISK_SIZE), "__IQN__": LIO_IQN, "__USER__": CHAP_USER,
                 "__SECRET__": CHAP_SECRET, "__READY__": READY}.items():
        text = text.replace(k, v)
    return text.encode()


def build_lio_initramfs(cache_dir: Path = CACHE_DIR) -> tuple[Path, Path]:
    """(kernel, initramfs) for the LIO guest, cached like the open-iscsi one."""
    kernel, version = find_kernel()
    busybox = _tool("busybox")
    modules = module_closure(version, ROOT_MODULES)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(_init_script() + "\n".join(modules).encode()).hexdigest()[:16]
    out = cache_dir / f"lio-{version}-{key}.cpio"
    if out.is_file():
        return kernel, out
    cpio = guest_cpio(_init_script(), ("dev", "proc", "sys", "tmp", "etc/aio"),
                      ((busybox, "bin/busybox"),), version, modules)
    write_cached(cpio, out, "lio-*.cpio")
    return kernel, out


@dataclass
class LioGuest:
    """A running LIO guest: ``port`` reaches TPG 1 (no auth), ``chap_port``
    TPG 2 (CHAP). Stop with :meth:`stop` (QEMU killed by PID)."""

    proc: subprocess.Popen[bytes]
    port: int
    chap_port: int
    console: list[str]

    def stop(self) -> None:
        """Kill QEMU and wait for it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def start_lio(port: int, chap_port: int, *, timeout: float = 180.0) -> LioGuest:
    """Boot the guest and wait (bounded) until LIO is configured."""
    kernel, initrd = build_lio_initramfs()
    qemu = _tool("qemu-system-x86_64")
    accel = (["-accel", "kvm", "-cpu", "host"]
             if os.environ.get("AIOISCSI_VM_KVM", "") not in ("", "0")
             else ["-accel", "tcg", "-cpu", "max"])
    argv = [qemu, *accel, "-smp", "1", "-m", "512", "-nographic", "-no-reboot",
            "-nodefaults", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:3260,"
                       f"hostfwd=tcp:127.0.0.1:{chap_port}-:3261",
            "-device", "e1000,netdev=n0,romfile="]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    guest = LioGuest(proc, port, chap_port, [])
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").strip("\r\n")
            guest.console.append(line)
            if line.startswith(READY):
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    end = time.monotonic() + timeout
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > end:
            guest.stop()
            raise VmBuildError("LIO guest did not come up:\n" + "\n".join(guest.console[-30:]))
    return guest
