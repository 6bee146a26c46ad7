"""Target configuration: TOML (stdlib ``tomllib``), IET's ``ietd.conf``, and
the defaults the ``serve IMAGE...`` command line builds.

Every error is a :class:`ConfigError` whose message is one line naming the
file, the key and what is allowed, e.g.::

    site.toml: target[0].lun[1].block_size: 1000 is not allowed (512 or 4096)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from iscsi.names import parse_portal

#: RFC 7143 §12.1.3 asks for CHAP secrets of at least 96 bits.
MIN_CHAP_SECRET = 12


class ConfigError(Exception):
    """A configuration problem, described in one line."""


@dataclass(frozen=True)
class ChapConfig:
    """CHAP credentials: the initiator authenticates with user/secret; with
    mutual_user/mutual_secret set the target authenticates back."""

    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None


@dataclass(frozen=True)
class Limits:
    """Operational limits the target offers/accepts (RFC 7143 §13)."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 65536
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    #: MaxConnections offered (RFC 7143 §13.2): the lower of this and what the
    #: initiator asks wins, so initiators that ask 1 (libiscsi, open-iscsi)
    #: get one connection per session; LIO likewise accepts up to 8.
    max_connections: int = 8
    header_digests: tuple[str, ...] = ("None", "CRC32C")
    data_digests: tuple[str, ...] = ("None", "CRC32C")
    queue_depth: int = 128
    #: The highest ErrorRecoveryLevel accepted (RFC 7143 §13.20: the
    #: session runs at the lower of both sides' values). 0 keeps what every
    #: common initiator asks for; 1 adds SNACK and recovery R2Ts (§7.1.5);
    #: 2 keeps a failed connection's tasks for TASK REASSIGN (§7.2.2).
    error_recovery_level: int = 0


@dataclass(frozen=True)
class LunSpec:
    """One logical unit."""

    lun: int
    path: str
    backend: str = "auto"
    size: int | None = None
    read_only: bool = False
    block_size: int = 512
    serial: str | None = None
    wwn: str | None = None
    vendor: str = "AIOISCSI"
    product: str = "VIRTUAL-DISK"
    revision: str = "0001"
    write_cache: bool = True
    device_type: str = "auto"
    #: VirtualBox write mode: normal, writethrough, immutable, multiattach,
    #: shareable, readonly (target/backends/modes.py).
    mode: str = "normal"
    #: Name of the bandwidth group this LUN's transfers are charged to.
    bandwidth_group: str | None = None
    #: Multiattach: differencing images kept, one per initiator name.
    max_overlays: int = 64
    #: A removable medium (INQUIRY RMB; START STOP UNIT LOEJ ejects and
    #: loads, PREVENT ALLOW MEDIUM REMOVAL locks), like a USB stick.
    removable: bool = False
    #: Bytes per physical block when larger than ``block_size`` (512e disks:
    #: 512-byte logical on 4096-byte physical blocks; READ CAPACITY(16)
    #: LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT). None: the same.
    physical_block_size: int | None = None
    #: SANITIZE OVERWRITE speed limit, bytes per second (0: none).
    sanitize_rate: int = 0

    #: backend "rbd": the Ceph RBD image (pool, optional namespace, image)
    #: and how to reach its cluster ("" = $CEPH_CONF / librados defaults).
    pool: str = ""
    image: str = ""
    namespace: str = ""
    ceph_conf: str = ""
    client_id: str = ""
    keyring: str = ""


@dataclass(frozen=True)
class FarmSpec:
    """A boot farm (target/farm.py): the golden image every initiator boots,
    each through its own copy-on-write overlay."""

    golden: str
    #: "persistent" (overlay kept per initiator name) or "reset" (fresh
    #: at each new session).
    mode: str = "persistent"
    max_overlays: int = 64
    #: Bytes an overlay may hold (None: unbounded).
    max_overlay_bytes: int | None = None


@dataclass(frozen=True)
class PortalGroup:
    """A target portal group: a tag and its listening portals. For SCSI it
    is also a target port group (ALUA, SPC-4 §5.15) of every target served
    on it: ``alua_state`` is its asymmetric access state (one of
    :data:`ALUA_STATES`) and ``preferred`` its PREF bit."""

    tag: int
    portals: tuple[tuple[str, int], ...]
    alua_state: str = "active/optimized"
    preferred: bool = False


#: ALUA state names of the configuration (SPC-4 §6.37 table 283 values).
ALUA_STATES = {"active/optimized": 0x0, "active/non-optimized": 0x1, "standby": 0x2,
               "unavailable": 0x3, "offline": 0xE}


@dataclass(frozen=True)
class TargetSpec:
    """One iSCSI target (a TargetName) and its LUNs."""

    name: str
    luns: tuple[LunSpec, ...]
    alias: str | None = None
    portal_groups: tuple[int, ...] = (1,)
    allow: tuple[str, ...] = ()
    chap: ChapConfig | None = None
    limits: Limits = field(default_factory=Limits)
    #: Set when the target is a boot farm (its LUN 0 serves ``farm.golden``).
    farm: FarmSpec | None = None
    #: Login redirection (RFC 7143 §11.13.5, §13.8): every login to this
    #: target is answered "target moved" (0x0101 temporarily, 0x0102 with
    #: ``redirect_permanent``) with TargetAddress=``redirect``
    #: ("host[:port][,tpgt]"), to spread initiators over portals or move a
    #: target to another server.
    redirect: str | None = None
    redirect_permanent: bool = False

    def allows(self, initiator_name: str) -> bool:
        """ACL check: no names listed means every initiator may log in."""
        return not self.allow or initiator_name.lower() in self.allow


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start."""

    targets: tuple[TargetSpec, ...]
    portal_groups: tuple[PortalGroup, ...] = (PortalGroup(1, (("0.0.0.0", 3260),)),)
    discovery_chap: ChapConfig | None = None
    nop_interval: float = 30.0
    nop_timeout: float = 30.0
    login_timeout: float = 15.0
    state_dir: str | None = None
    #: Bytes of write data all sessions together may hold in flight; a
    #: command beyond it gets TASK SET FULL (the initiator retries).
    write_budget: int = 256 << 20
    #: TCP connections open at once (logged in or not); more are refused.
    max_connections: int = 1024
    source: str = "<command line>"
    #: (name, bytes per second or None for unlimited) of each bandwidth group.
    bandwidth_groups: tuple[tuple[str, int | None], ...] = ()
    #: ``serve``'s log lines: "text" or "json" (one object per line).
    log_format: str = "text"
    #: Where ``serve`` logs (None: stderr).
    log_file: str | None = None
    #: "HOST:PORT" of the Prometheus /metrics endpoint (None: none).
    metrics: str | None = None
    #: "HOST[:PORT]" of an iSNS server to register with (RFC 4171; None: none).
    isns: str | None = None
    #: ``serve --fault``: a fault profile (target/faults.py) for testing
    #: initiators; None serves normally.
    fault_profile: str | None = None
    #: ``[server]`` keys the command line set over the file's (``reload``
    #: keeps them and says so).
    cli_overrides: frozenset[str] = frozenset()


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"64M"``, ``"1G"``, ``"4096"``... into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (use e.g. 512M, 10G)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def check_chap(chap: ChapConfig) -> None:
    """Refuse CHAP credentials RFC 7143 §12.1.3 does not allow (short or
    shared secrets) with a one-line ConfigError."""
    problem = _chap_problem(chap)
    if problem is not None:
        key, message = problem
        raise ConfigError(f"{key}: {message}" if key else message)


def _chap_problem(chap: ChapConfig) -> tuple[str, str] | None:
    """(key, what is wrong) for credentials §12.1.3 does not allow."""
    if (chap.mutual_user is None) != (chap.mutual_secret is None):
        return "", "mutual CHAP needs both mutual_user and mutual_secret"
    for key, s in (("secret", chap.secret), ("mutual_secret", chap.mutual_secret)):
        if s is not None and len(s.encode()) < MIN_CHAP_SECRET:
            return key, (f"too short ({len(s.encode())} bytes; RFC 7143 "
                         f"§12.1.3 wants at least {MIN_CHAP_SECRET})")
    if chap.mutual_secret is not None and chap.mutual_secret == chap.secret:
        return "mutual_secret", "must differ from secret (RFC 7143 §12.1.3)"
    return None


_MODES = ("normal", "writethrough", "immutable", "multiattach", "shareable", "readonly")
_BACKENDS = ("auto", "raw", "file", "block", "memory", "qcow2", "vdi", "vmdk", "vhd", "vhdx",
             "parallels", "iso", "nbd", "rbd")

_RBD_KEYS = ("pool", "image", "namespace", "ceph_conf", "client_id", "keyring")
#: Write modes an RBD image can be served in (the others keep differencing
#: images in local files).
RBD_MODES = ("normal", "writethrough", "readonly")


def physical_block_exponent(block_size: int, physical_block_size: int | None) -> int:
    """SBC-3's LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT for these sizes;
    ValueError unless the physical block is a power-of-two multiple (up to
    2^15) of the logical one."""
    if physical_block_size is None:
        return 0
    ratio, rest = divmod(physical_block_size, block_size)
    if rest or ratio < 1 or ratio & (ratio - 1) or ratio > 1 << 15:
        raise ValueError(f"{physical_block_size} is not allowed (a power-of-two multiple of "
                         f"the {block_size}-byte block size, e.g. 4096)")
    return ratio.bit_length() - 1


def parse_listen(text: str) -> tuple[str, int]:
    """A listening address ``host:port`` / ``[v6]:port``; unlike a
    TargetAddress, port 0 is allowed and means "any free port"."""
    if text.endswith(":0"):
        return parse_portal(text[:-2] + ":1", bare_v6=False).host, 0
    # Brackets always: "::1:3260" would otherwise listen on ::0.1.50.96.
    portal = parse_portal(text, bare_v6=False)
    return portal.host, portal.port


def parse_metrics_address(text: str) -> tuple[str, int]:
    """The ``HOST:PORT`` of the metrics endpoint: like :func:`parse_listen`,
    but the port must be given (there is no standard one to default to)."""
    if not re.search(r":\d+$", text):
        raise ValueError(f"{text!r} has no port (use HOST:PORT, e.g. 127.0.0.1:9117)")
    return parse_listen(text)


def lun_from_dict(table: dict[str, Any], source: str, index: int = 0) -> LunSpec:
    """A LUN from a table with the ``[[target.lun]]`` keys (``lun add`` on
    a running target); relative paths are taken from the current
    directory, ``index`` is the LUN number when the table has none."""
    from .config_load import lun_table

    return lun_table(table, source, index)


def config_from_dict(doc: dict[str, Any], source: str) -> ServerConfig:
    """A ServerConfig from an already parsed TOML document."""
    from .config_load import config_from_dict as load

    return load(doc, source)


def load_config(path: str) -> ServerConfig:
    """Load ``path`` as TOML, or as ietd.conf when it does not parse as TOML
    and looks like one (it has a ``Target`` line)."""
    from .config_ietd import load_ietd
    from .config_load import load_toml

    if path.endswith(".toml"):
        return load_toml(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(65536)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if re.search(r"^\s*Target\s+\S", head, re.M):
        return load_ietd(path)
    return load_toml(path)
