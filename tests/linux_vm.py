"""Boot the Debian kernel in QEMU with a tiny initramfs that drives Linux's own
iSCSI initiator (open-iscsi's ``iscsistart`` + the kernel's ``iscsi_tcp``)
against a target on the host, for the issue #3 proof.

The initramfs is built from the installed Debian packages (``linux-image-amd64``,
``busybox-static``, ``open-iscsi``, ``e2fsprogs``) -- nothing binary is kept in
the repository -- and cached under ``<repo>/.cache/linux-vm/`` keyed by the
inputs it was built from.  It is a ``newc`` cpio archive (the format the
kernel's initramfs unpacker reads) written here, so no ``cpio`` tool is needed.

One initramfs serves every case: each run's scenarios (portal, target name,
CHAP, digests) travel on the kernel command line as ``aio.KEY=VALUE`` words and
``/init`` reads them back from ``/proc/cmdline``.  Words with a dot are taken by
the kernel as module parameters of an unknown module and ignored, so they never
reach init's argv/envp and never warn.

Per scenario the guest logs in with ``iscsistart``, waits for the new ``sd``
disk, hashes its first MiB (data the host wrote: the read path), makes an ext4
filesystem, writes a known payload, unmounts, drops caches, remounts read-only
and hashes the payload again, then prints one line::

    AIOISCSI-RESULT <name> ok dev=sda size=<sectors> hd=<0|1> dd=<0|1> raw=<sha256> file=<sha256>
    AIOISCSI-RESULT <name> fail <reason>

QEMU user networking (slirp) makes the host's 127.0.0.1 reachable from the
guest as 10.0.2.2, so a target bound to loopback is enough.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "linux-vm"

#: Debian packages the builder and runner take their files from.
DEBIAN_PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static", "open-iscsi",
                   "e2fsprogs")

#: The host's loopback as seen from a slirp guest (QEMU's default user network).
HOST_FROM_GUEST = "10.0.2.2"
GUEST_ADDRESS = "10.0.2.15/24"
DEFAULT_INITIATOR = "iqn.2026-11.org.aioiscsi.test:linux-vm"

#: Kernel modules to load, roots of the dependency closure (modules.dep adds
#: the rest: libiscsi, libiscsi_tcp, scsi_transport_iscsi, scsi_mod, jbd2, ...).
#: crc32c_generic is needed by both CRC32C digests (iscsi_tcp asks the crypto
#: API for "crc32c") and ext4 metadata checksums; it is named explicitly because
#: that is a run-time request_module(), not a link-time dependency, and there
#: is no modprobe in the guest to satisfy it.
ROOT_MODULES = ("crc32c_generic", "e1000", "iscsi_tcp", "sd_mod", "ext4")

#: The payload written through the filesystem: deterministic pseudo-random
#: bytes of an odd length, so the last block is partial.
PAYLOAD_SIZE = (3 << 20) + 123
#: How much of the disk the guest hashes raw before making the filesystem.
RAW_PREFIX = 1 << 20

#: Bump when the initramfs layout or /init changes, to invalidate caches.
_BUILD_VERSION = "7"
_SAFE = re.compile(r"[A-Za-z0-9._:,@+/-]+\Z")
_RESULT = re.compile(r"^AIOISCSI-RESULT (\S+) (ok|fail)\b ?(.*)$")
#: What a :attr:`Scenario.resize` guest prints when the host should grow its LUN.
RESIZE_MARK = "AIOISCSI-RESIZE "
#: x86 COMMAND_LINE_SIZE is 2048; keep a margin for the fixed words.
_CMDLINE_MAX = 2000


def payload() -> bytes:
    """The file content the guest writes through ext4 (shipped in the initramfs)."""
    return random.Random(0xA10).randbytes(PAYLOAD_SIZE)


def raw_pattern(size: int = RAW_PREFIX) -> bytes:
    """Bytes a test writes at the start of a LUN; the guest reports their SHA-256."""
    return random.Random(0x5CA1AB1E).randbytes(size)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# cpio (newc) writer
# --------------------------------------------------------------------------

class Cpio:
    """A minimal ``newc`` cpio writer (the format of
    ``Documentation/driver-api/early-userspace/buffer-format.rst``).

    Entries are kept in memory and written sorted, so identical inputs give an
    identical archive; parent directories are added implicitly.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int]] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._entries:
                self._entries[d] = (stat.S_IFDIR | 0o755, b"", 0)

    def directory(self, path: str, mode: int = 0o755) -> None:
        """Add directory ``path`` (relative, no leading slash)."""
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (stat.S_IFDIR | mode, b"", 0)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add regular file ``path`` with ``data``."""
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (stat.S_IFREG | mode, data, 0)

    def symlink(self, path: str, target: str) -> None:
        """Add symbolic link ``path`` -> ``target``."""
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (stat.S_IFLNK | 0o777, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (``/dev/console`` must exist before
        init runs, or init starts without stdin/stdout)."""
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (stat.S_IFCHR | mode, b"", os.makedev(major, minor))

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._entries

    def write(self, out: Path) -> None:
        """Write the archive (with its TRAILER!!! entry) to ``out``."""
        with open(out, "wb") as f:
            ino = 1
            for name in sorted(self._entries):
                mode, data, rdev = self._entries[name]
                self._record(f, name, mode, data, ino, rdev)
                ino += 1
            self._record(f, "TRAILER!!!", 0, b"", 0, 0)

    @staticmethod
    def _record(f: BinaryIO, name: str, mode: int, data: bytes, ino: int, rdev: int) -> None:
        bname = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  os.major(rdev), os.minor(rdev), len(bname), 0)
        header = b"070701" + "".join(f"{v:08X}" for v in fields).encode()
        f.write(header)
        f.write(bname)
        f.write(b"\0" * (-(len(header) + len(bname)) % 4))
        f.write(data)
        f.write(b"\0" * (-len(data) % 4))


# --------------------------------------------------------------------------
# locating inputs
# --------------------------------------------------------------------------

class VmBuildError(RuntimeError):
    """The initramfs cannot be built from what is installed."""


@dataclass(frozen=True)
class VmImage:
    """A kernel and a matching initramfs ready to boot."""

    kernel: Path
    initrd: Path
    version: str


def find_kernel() -> tuple[Path, str]:
    """The newest ``/boot/vmlinuz-VERSION`` that has ``/lib/modules/VERSION``."""
    found: list[tuple[tuple[int, ...], Path, str]] = []
    for p in Path("/boot").glob("vmlinuz-*"):
        version = p.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / version / "modules.dep").is_file():
            key = tuple(int(x) for x in re.findall(r"\d+", version))
            found.append((key, p, version))
    if not found:
        raise VmBuildError("no /boot/vmlinuz-* with matching /lib/modules "
                           "(install the Debian package linux-image-amd64)")
    found.sort()
    return found[-1][1], found[-1][2]


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    # Module names treat '-' and '_' alike (crc32c-intel is crc32c_intel).
    return base.replace("-", "_")


def module_closure(version: str, roots: Iterable[str]) -> list[str]:
    """Paths (relative to ``/lib/modules/VERSION``) of ``roots`` and everything
    they depend on per ``modules.dep``, dependencies before dependants.

    Built-in modules (``modules.builtin``) are skipped.
    """
    moddir = Path("/lib/modules") / version
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        name = _modname(mod)
        path_of[name] = mod
        deps[name] = [_modname(d) for d in rest.split()]
    builtin: set[str] = set()
    if (moddir / "modules.builtin").is_file():
        builtin = {_modname(x) for x in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            return
        if name not in deps:
            raise VmBuildError(f"kernel module {name} not found in {moddir}/modules.dep")
        for dep in deps[name]:
            visit(dep)
        order.append(path_of[name])

    for root in roots:
        visit(root.replace("-", "_"))
    return order


def _module_bytes(path: Path) -> bytes:
    """The module's ELF image; busybox insmod cannot decompress, so do it here."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        import gzip
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise VmBuildError(f"{path} is zstd-compressed; install the Debian package zstd")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


def shared_libraries(binary: str) -> list[str]:
    """Absolute paths of the shared objects ``binary`` loads (from ``ldd``);
    empty for a static binary."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if proc.returncode != 0:
        # "not a dynamic executable": static, nothing to copy.
        return []
    libs: list[str] = []
    for line in proc.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _tool(name: str) -> str:
    from tests.tools import find_tool
    path = find_tool(name)
    if path is None:
        raise VmBuildError(f"{name} is not installed")
    return path


# --------------------------------------------------------------------------
# /init
# --------------------------------------------------------------------------

# The guest script.  It never trusts a value from the command line to be
# shell-safe: values are written to files and read back with $(cat), and the
# host refuses anything outside [A-Za-z0-9._:,@+/-] anyway.
_INIT = r"""#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run/lock/iscsi /var/lock /mnt /etc/iscsi /tmp/p
set -f   # no globbing of iscsistart's node.conn[0] parameter names

finish() {
    echo "AIOISCSI-DONE"
    sync
    poweroff -f
}

for kv in $(cat /proc/cmdline); do
    case "$kv" in
        aio.*=*) k=${kv%%=*}; echo "${kv#*=}" > "/tmp/p/${k#aio.}" ;;
    esac
done
get() { cat "/tmp/p/$1" 2>/dev/null; }

echo "AIOISCSI-BOOT $(uname -r)"
for m in $(cat /etc/aio/modules); do
    insmod "$m" || echo "AIOISCSI-WARN insmod $m failed"
done

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
ip link set lo up
ip addr add "$(get guest)" dev eth0
ip link set eth0 up

disks() { ls /sys/block | grep '^sd' ; }

result() { echo "AIOISCSI-RESULT $*"; }
# A failure also shows the kernel's last words (quiet hides them otherwise).
fail() {
    result "$1 fail $2"
    dmesg | tail -n 15 | sed 's/^/AIOISCSI-DMESG /'
}

scenario() {
    # local: the caller's loop counter must survive the polling loop below.
    local s name before rc dev i d size sess hdg ddg raw file
    s="s$1"
    name=$(get $s.name)
    before=" $(disks | tr '\n' ' ') "
    set -- -i "$(get initiator)" -t "$(get $s.target)" -g "$(get $s.tpgt)" \
           -a "$(get $s.host)" -p "$(get $s.port)"
    [ -n "$(get $s.user)" ] && set -- "$@" -u "$(get $s.user)" -w "$(get $s.secret)"
    [ -n "$(get $s.muser)" ] && set -- "$@" -U "$(get $s.muser)" -W "$(get $s.msecret)"
    [ -n "$(get $s.hd)" ] && set -- "$@" -P "node.conn[0].iscsi.HeaderDigest=$(get $s.hd)"
    [ -n "$(get $s.dd)" ] && set -- "$@" -P "node.conn[0].iscsi.DataDigest=$(get $s.dd)"
    # If the target dies mid-test, fail the I/O after 20 s instead of the
    # default 120 s of session recovery, well inside the host's hard limit.
    set -- "$@" -P "node.session.timeo.replacement_timeout=20"
    timeout "$(get logintimeout)" iscsistart "$@" > /tmp/$s.log 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        fail "$name" "login rc=$rc $(tail -n 4 /tmp/$s.log | tr '\n' '|')"
        return
    fi
    dev=""
    i=0
    while [ -z "$dev" ] && [ $i -lt 300 ]; do
        for d in $(disks); do
            case "$before" in *" $d "*) ;; *) [ -e /dev/$d ] && dev=$d ;; esac
        done
        [ -z "$dev" ] && usleep 100000
        i=$((i+1))
    done
    if [ -z "$dev" ]; then
        fail "$name" "no-disk"
        return
    fi
    size=$(cat /sys/block/$dev/size)
    sess=$(readlink -f /sys/block/$dev/device | sed -n 's,.*/session\([0-9]*\)/.*,\1,p')
    hdg=$(cat /sys/class/iscsi_connection/connection$sess:0/header_digest 2>/dev/null)
    ddg=$(cat /sys/class/iscsi_connection/connection$sess:0/data_digest 2>/dev/null)
    raw=$(dd if=/dev/$dev bs=65536 count=$(get rawblocks) 2>/dev/null | sha256sum | cut -d' ' -f1)
    # An absolute path: busybox-static's shell prefers its own applets (its
    # mke2fs makes ext2 only) whatever PATH says.
    if ! /usr/sbin/mke2fs -q -F -t ext4 /dev/$dev > /tmp/$s.mkfs 2>&1; then
        fail "$name" "mkfs $(tail -n 3 /tmp/$s.mkfs | tr '\n' '|')"
        return
    fi
    mount -t ext4 /dev/$dev /mnt || { fail "$name" "mount"; return; }
    cp /payload /mnt/payload && sync || { fail "$name" "write"; umount /mnt; return; }
    umount /mnt || { fail "$name" "umount"; return; }
    blockdev --flushbufs /dev/$dev
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 -o ro /dev/$dev /mnt || { fail "$name" "remount"; return; }
    file=$(sha256sum /mnt/payload | cut -d' ' -f1)
    umount /mnt
    grown=""
    [ -n "$(get $s.resize)" ] && grown=$(online_resize "$name" "$dev")
    result "$name ok dev=$dev size=$size hd=$hdg dd=$ddg raw=$raw file=$file$grown"
}

# Online resize (issue 10): tell the host we are ready, then keep reading
# block 0 past the page cache until the kernel reports the unit attention
# CAPACITY DATA HAS CHANGED (2A/09) that the resize queues for this nexus;
# then rescan as udev's rule does on that event (there is no udev here) and
# report what the kernel now sees.
online_resize() {
    local name dev i ua
    name=$1; dev=$2
    echo "AIOISCSI-RESIZE $name" > /dev/console
    i=0; ua=0
    while [ $ua = 0 ] && [ $i -lt 300 ]; do
        echo 3 > /proc/sys/vm/drop_caches
        dd if=/dev/$dev of=/dev/null bs=4096 count=1 2>/dev/null
        dmesg | grep -q "Capacity data has changed" && ua=1
        [ $ua = 0 ] && usleep 200000
        i=$((i+1))
    done
    echo 1 > /sys/block/$dev/device/rescan
    echo " ua=$ua grown=$(cat /sys/block/$dev/size)"
}

n=$(get n)
i=0
while [ $i -lt "${n:-0}" ]; do
    scenario $i
    i=$((i+1))
done
finish
"""


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------

def _cache_key(kernel: Path, version: str, binaries: Sequence[str], modules: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(_BUILD_VERSION.encode())
    h.update(_INIT.encode())
    h.update(str(PAYLOAD_SIZE).encode())
    paths = [str(kernel), *binaries, *(f"/lib/modules/{version}/{m}" for m in modules)]
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def guest_cpio(init: bytes, dirs: Sequence[str], binaries: Sequence[tuple[str, str]],
               version: str, modules: Sequence[str]) -> Cpio:
    """The parts every guest initramfs shares: ``dirs``, the console and null
    devices, ``init`` as /init, busybox (first of ``binaries``, as (source,
    destination) pairs) with a link per applet, the other binaries with the
    libraries ldd names, and the kernel ``modules`` (paths relative to
    /lib/modules/VERSION, in load order) listed in /etc/aio/modules."""
    cpio = Cpio()
    for d in dirs:
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("init", init, 0o755)
    # busybox at /bin/busybox with a link per applet (it dispatches on argv[0]).
    applets = subprocess.run([binaries[0][0], "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin", "bin")
    # Dynamic binaries keep their libraries at the paths ldd names; the loader
    # finds them through LD_LIBRARY_PATH set in /init (there is no ld.so.cache).
    for binary, dest in binaries:
        cpio.file(dest, Path(binary).read_bytes(), 0o755)
        # Debian's busybox-static has none; a dynamic busybox works too.
        for lib in shared_libraries(binary):
            if lib.lstrip("/") not in cpio:
                cpio.file(lib, Path(lib).read_bytes(), 0o755)
    moddir = Path("/lib/modules") / version
    load_paths: list[str] = []
    for rel in modules:
        dest = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", f"lib/modules/{version}/{rel}")
        cpio.file(dest, _module_bytes(moddir / rel))
        load_paths.append("/" + dest)
    cpio.file("etc/aio/modules", ("\n".join(load_paths) + "\n").encode())
    return cpio


def write_cached(cpio: Cpio, out: Path, stale: str) -> None:
    """Write ``cpio`` to ``out`` atomically (a parallel test run sees either
    nothing or the whole file) and drop older builds matching ``stale`` in
    its folder (~20 MB each)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        cpio.write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in out.parent.glob(stale):
        if old != out:
            old.unlink(missing_ok=True)


def build_initramfs(cache_dir: Path = CACHE_DIR) -> VmImage:
    """Build (or reuse from ``cache_dir``) the initramfs for the newest
    installed kernel and return it with the kernel."""
    kernel, version = find_kernel()
    busybox = _tool("busybox")
    iscsistart = _tool("iscsistart")
    mke2fs = _tool("mke2fs")
    modules = module_closure(version, ROOT_MODULES)
    key = _cache_key(kernel, version, (busybox, iscsistart, mke2fs), modules)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"initramfs-{version}-{key}.cpio"
    if out.is_file():
        return VmImage(kernel, out, version)

    cpio = guest_cpio(_INIT.encode(),
                      ("dev", "proc", "sys", "tmp", "run", "mnt", "etc/aio", "etc/iscsi"),
                      ((busybox, "bin/busybox"), (iscsistart, "usr/sbin/iscsistart"),
                       (mke2fs, "usr/sbin/mke2fs")), version, modules)
    if Path("/etc/mke2fs.conf").is_file():
        cpio.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
    cpio.file("payload", payload())
    write_cached(cpio, out, "initramfs-*.cpio")
    return VmImage(kernel, out, version)


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """One login the guest performs, in order, against ``host:port``."""

    name: str
    port: int
    target: str
    host: str = HOST_FROM_GUEST
    tpgt: int = 1
    user: str | None = None
    secret: str | None = None
    mutual_user: str | None = None
    mutual_secret: str | None = None
    header_digest: str | None = None
    data_digest: str | None = None
    #: After the round trip, print ``AIOISCSI-RESIZE <name>`` and wait for the
    #: host to grow the LUN (see :data:`RESIZE_MARK`); the result line then
    #: carries ``ua=1 grown=<sectors after rescan>``.
    resize: bool = False

    def words(self, index: int) -> list[str]:
        """``aio.sN.KEY=VALUE`` kernel command line words for this scenario."""
        values: dict[str, str | int | None] = {
            "name": self.name, "port": self.port, "target": self.target, "host": self.host,
            "tpgt": self.tpgt, "user": self.user, "secret": self.secret,
            "muser": self.mutual_user, "msecret": self.mutual_secret,
            "hd": self.header_digest, "dd": self.data_digest,
            "resize": 1 if self.resize else None,
        }
        return [_word(f"s{index}.{k}", v) for k, v in values.items() if v is not None]


def _word(key: str, value: str | int) -> str:
    text = str(value)
    if not _SAFE.match(text):
        raise ValueError(f"kernel command line value for {key} must match "
                         f"[A-Za-z0-9._:,@+/-]+, got {text!r}")
    return f"aio.{key}={text}"


@dataclass(frozen=True)
class ScenarioResult:
    """What the guest printed for one scenario."""

    name: str
    ok: bool
    detail: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VmRun:
    """A finished (or timed-out) VM run."""

    results: dict[str, ScenarioResult]
    console: str
    returncode: int | None
    timed_out: bool
    done: bool

    def tail(self, lines: int = 60) -> str:
        """The end of the console log, for assertion messages."""
        return "\n".join(self.console.splitlines()[-lines:])


def parse_console(console: str) -> dict[str, ScenarioResult]:
    """The ``AIOISCSI-RESULT`` lines of a console log, by scenario name."""
    results: dict[str, ScenarioResult] = {}
    for raw in console.splitlines():
        m = _RESULT.match(raw.strip("\r"))
        if not m:
            continue
        name, status, detail = m.groups()
        fields = dict(kv.split("=", 1) for kv in detail.split() if "=" in kv) if status == "ok" else {}
        results[name] = ScenarioResult(name, status == "ok", detail, fields)
    return results


def qemu_command(image: VmImage, scenarios: Sequence[Scenario], *,
                 initiator: str = DEFAULT_INITIATOR, login_timeout: int = 60,
                 memory_mb: int = 512, verbose: bool = False) -> list[str]:
    """The qemu-system-x86_64 argv booting ``image`` with ``scenarios``.

    ``verbose`` puts every kernel message (SCSI, iSCSI, ext4) on the console,
    for debugging a target against the kernel; normally only warnings show.
    """
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError(f"scenario names must be unique: {names}")
    words = ["console=ttyS0", "panic=-1", *(["loglevel=7"] if verbose else ["quiet", "loglevel=4"]),
             _word("n", len(scenarios)), _word("initiator", initiator),
             _word("guest", GUEST_ADDRESS), _word("logintimeout", login_timeout),
             _word("rawblocks", RAW_PREFIX // 65536)]
    for i, s in enumerate(scenarios):
        words += s.words(i)
    append = " ".join(words)
    if len(append) > _CMDLINE_MAX:
        raise ValueError(f"kernel command line is {len(append)} bytes (limit {_CMDLINE_MAX}); "
                         "use fewer scenarios per boot")
    qemu = _tool("qemu-system-x86_64")
    # TCG by default: it is what CI has, and the timings are then the same
    # everywhere.  AIOISCSI_VM_KVM=1 opts in to KVM on a developer machine.
    if os.environ.get("AIOISCSI_VM_KVM", "") not in ("", "0"):
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg", "-cpu", "max"]
    return [qemu, *accel, "-smp", "1", "-m", str(memory_mb),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-netdev", "user,id=n0", "-device", "e1000,netdev=n0,romfile="]


def run_vm(image: VmImage, scenarios: Sequence[Scenario], *, timeout: float = 240,
           log_path: Path | None = None, initiator: str = DEFAULT_INITIATOR,
           login_timeout: int = 60, verbose: bool = False,
           on_line: Callable[[str], None] | None = None) -> VmRun:
    """Boot the guest, run ``scenarios`` in order, and collect the results.

    ``timeout`` is a hard limit on the whole boot: QEMU is killed when it
    passes and the partial console is returned with ``timed_out=True``.
    ``on_line`` sees each console line as it arrives, so the host can act
    on what the guest says (e.g. grow a LUN on :data:`RESIZE_MARK`).
    """
    argv = qemu_command(image, scenarios, initiator=initiator, login_timeout=login_timeout,
                        verbose=verbose)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    # The deadline is enforced by killing QEMU, which ends the read loop.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    killer = threading.Timer(timeout, expire)
    killer.start()
    chunks: list[bytes] = []
    try:
        for raw in proc.stdout:
            chunks.append(raw)
            if on_line is not None:
                on_line(raw.decode("utf-8", "replace").strip("\r\n"))
        returncode: int | None = proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    timed_out = expired.is_set()
    if timed_out:
        returncode = None
    console = b"".join(chunks).decode("utf-8", "replace")
    if log_path is not None:
        log_path.write_text(" ".join(argv) + "\n\n" + console)
    return VmRun(parse_console(console), console, returncode, timed_out,
                 "AIOISCSI-DONE" in console)
