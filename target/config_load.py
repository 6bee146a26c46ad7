"""The TOML configuration (stdlib ``tomllib``): ``[server]``,
``[[portal_group]]``, ``[discovery]``, ``[[bandwidth_group]]`` and
``[[target]]`` with its LUNs, limits, CHAP and boot farm, into the
dataclasses of :mod:`target.config`. Every error is one line naming the
file, the key and what is allowed."""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

from iscsi.names import InvalidName, normalize_name, parse_portal

from .config import (
    _BACKENDS,
    _MODES,
    _RBD_KEYS,
    ALUA_STATES,
    RBD_MODES,
    ChapConfig,
    ConfigError,
    Limits,
    LunSpec,
    PortalGroup,
    ServerConfig,
    TargetSpec,
    _chap_problem,
    parse_listen,
    parse_metrics_address,
    parse_size,
    physical_block_exponent,
)


class _Reader:
    """Typed access to a TOML table with one-line errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def get(self, table: dict[str, Any], key: str, where: str, kind: type, default: Any,
            allowed: str = "") -> Any:
        if key not in table:
            return default
        value = table[key]
        if kind is int and isinstance(value, bool):
            raise self.fail(f"{where}{key}", f"{value!r} is not allowed ({allowed or 'an integer'})")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind):
            raise self.fail(f"{where}{key}",
                            f"{value!r} is not allowed ({allowed or 'a ' + kind.__name__})")
        return value

    def int_in(self, table: dict[str, Any], key: str, where: str, default: int, lo: int,
               hi: int) -> int:
        value: int = self.get(table, key, where, int, default, f"an integer {lo}..{hi}")
        if not lo <= value <= hi:
            raise self.fail(f"{where}{key}", f"{value} is not allowed (an integer {lo}..{hi})")
        return value

    def check_keys(self, table: dict[str, Any], known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                raise self.fail(f"{where}{key}",
                                f"unknown key (allowed: {', '.join(sorted(known))})")


def _chap(r: _Reader, table: Any, where: str) -> ChapConfig | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise r.fail(where, "must be a table {user, secret[, mutual_user, mutual_secret]}")
    r.check_keys(table, {"user", "secret", "mutual_user", "mutual_secret"}, where + ".")
    user = r.get(table, "user", where + ".", str, None)
    secret = r.get(table, "secret", where + ".", str, None)
    if not user or not secret:
        raise r.fail(where, "needs both user and secret")
    mu = r.get(table, "mutual_user", where + ".", str, None)
    ms = r.get(table, "mutual_secret", where + ".", str, None)
    chap = ChapConfig(user, secret, mu, ms)
    problem = _chap_problem(chap)
    if problem is not None:
        key, message = problem
        raise r.fail(f"{where}.{key}" if key else where, message)
    return chap


def _limits(r: _Reader, table: dict[str, Any], where: str) -> Limits:
    known = {"max_recv_data_segment_length", "max_burst_length", "first_burst_length",
             "initial_r2t", "immediate_data", "max_outstanding_r2t", "max_connections",
             "digests", "header_digests", "data_digests", "queue_depth",
             "error_recovery_level"}
    r.check_keys(table, known, where)
    mrdsl = r.int_in(table, "max_recv_data_segment_length", where, 262144, 512, (1 << 24) - 1)
    mbl = r.int_in(table, "max_burst_length", where, 1048576, 512, (1 << 24) - 1)
    fbl = r.int_in(table, "first_burst_length", where, min(65536, mbl), 512, (1 << 24) - 1)
    if fbl > mbl:
        raise r.fail(f"{where}first_burst_length",
                     f"{fbl} is not allowed (at most max_burst_length {mbl}, RFC 7143 §13.14)")
    digests = r.get(table, "digests", where, list, None, 'a list of "None"/"CRC32C"')
    hd = r.get(table, "header_digests", where, list, digests or ["None", "CRC32C"], "")
    dd = r.get(table, "data_digests", where, list, digests or ["None", "CRC32C"], "")
    for key, lst in (("header_digests", hd), ("data_digests", dd)):
        if not lst or any(x not in ("None", "CRC32C") for x in lst):
            raise r.fail(f"{where}{key}", f"{lst!r} is not allowed (a list of \"None\"/\"CRC32C\")")
    return Limits(
        max_recv_data_segment_length=mrdsl, max_burst_length=mbl, first_burst_length=fbl,
        initial_r2t=r.get(table, "initial_r2t", where, bool, False),
        immediate_data=r.get(table, "immediate_data", where, bool, True),
        max_outstanding_r2t=r.int_in(table, "max_outstanding_r2t", where, 1, 1, 65535),
        max_connections=r.int_in(table, "max_connections", where, 8, 1, 65535),
        header_digests=tuple(hd), data_digests=tuple(dd),
        queue_depth=r.int_in(table, "queue_depth", where, 128, 1, 4096),
        error_recovery_level=r.int_in(table, "error_recovery_level", where, 0, 0, 2),
    )


def _limit(r: _Reader, value: Any, where: str) -> int:
    """A bandwidth limit: a number of MB/s, or "20M", "500K", "100m" (bits),
    as VBoxManage bandwidthctl takes it."""
    from target.backends.bandwidth import parse_limit
    from target.backends.base import BackendError

    try:
        return parse_limit(str(value))
    except BackendError:
        raise r.fail(where, f"{value!r} is not allowed (e.g. 20M, 500K, 100m; a plain number "
                     "is MB/s)") from None


def _resolve(base: str, path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _nbd_uri(r: _Reader, table: Any, w: str) -> str:
    """An NBD LUN's ``uri`` (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)."""
    from target.backends.base import BackendError
    from target.backends.nbd import parse_nbd_uri

    uri: str = r.get(table, "uri", w, str, "")
    if not uri:
        raise r.fail(f"{w}uri", "missing (an NBD LUN needs uri = \"nbd://HOST[:PORT]/EXPORT\")")
    try:
        parse_nbd_uri(uri)
    except BackendError as exc:
        raise r.fail(f"{w}uri", str(exc)) from None
    return uri


def _lun(r: _Reader, table: Any, where: str, index: int, base: str) -> LunSpec:
    if not isinstance(table, dict):
        raise r.fail(where, "must be a table")
    known = {"lun", "path", "backend", "size", "read_only", "block_size", "serial", "wwn",
             "vendor", "product", "revision", "write_cache", "device_type", "mode", "max_overlays",
             "bandwidth_group", "removable", "physical_block_size", "sanitize_rate", "uri",
             *_RBD_KEYS}
    r.check_keys(table, known, where + ".")
    w = where + "."
    backend = r.get(table, "backend", w, str, "auto")
    if backend not in _BACKENDS:
        raise r.fail(f"{w}backend", f"{backend!r} is not allowed ({', '.join(_BACKENDS)})")
    path = r.get(table, "path", w, str, "")
    if backend == "nbd":
        path = _nbd_uri(r, table, w)
    size: int | None = None
    if "size" in table:
        raw = table["size"]
        try:
            size = raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(str(raw))
        except ValueError as exc:
            raise r.fail(f"{w}size", str(exc)) from None
    rbd = {k: r.get(table, k, w, str, "") for k in _RBD_KEYS}
    if backend != "rbd" and any(rbd.values()):
        raise r.fail(f"{w}{next(k for k in _RBD_KEYS if rbd[k])}", 'only for backend = "rbd"')
    if backend == "memory":
        if size is None:
            raise r.fail(f"{w}size", "a memory LUN needs a size (e.g. size = \"64M\")")
    elif backend == "rbd":
        for key in ("pool", "image"):
            if not rbd[key]:
                raise r.fail(f"{w}{key}", "missing (the RBD image is pool/[namespace/]image)")
        if path:
            raise r.fail(f"{w}path", "not used by an RBD LUN (give pool and image)")
        for key in ("ceph_conf", "keyring"):
            if rbd[key]:
                rbd[key] = _resolve(base, rbd[key])
    elif not path:
        raise r.fail(f"{w}path", "missing (the image file or block device to serve)")
    bs = r.get(table, "block_size", w, int, 512, "512 or 4096")
    if bs not in (512, 4096):
        raise r.fail(f"{w}block_size", f"{bs} is not allowed (512 or 4096)")
    wwn = r.get(table, "wwn", w, str, None)
    if wwn is not None and not re.fullmatch(r"(naa\.)?6[0-9a-fA-F]{31}", wwn):
        raise r.fail(f"{w}wwn", f"{wwn!r} is not allowed (naa.6 followed by 31 hex digits)")
    vendor = r.get(table, "vendor", w, str, "AIOISCSI")
    product = r.get(table, "product", w, str, "VIRTUAL-DISK")
    revision = r.get(table, "revision", w, str, "0001")
    for key, value, n in (("vendor", vendor, 8), ("product", product, 16), ("revision", revision, 4)):
        if len(value) > n or not value.isascii() or not value.isprintable():
            raise r.fail(f"{w}{key}", f"{value!r} is not allowed (up to {n} printable ASCII characters)")
    device_type = r.get(table, "device_type", w, str, "auto")
    if device_type not in ("auto", "disk", "cdrom"):
        raise r.fail(f"{w}device_type", f"{device_type!r} is not allowed (auto, disk, cdrom)")
    mode = r.get(table, "mode", w, str, "normal")
    if mode.replace("-", "").lower() not in _MODES:
        raise r.fail(f"{w}mode", f"{mode!r} is not allowed ({', '.join(_MODES)})")
    pbs = r.get(table, "physical_block_size", w, int, None, "a power of two from block_size up")
    if pbs is not None:
        try:
            physical_block_exponent(bs, pbs)
        except ValueError as exc:
            raise r.fail(f"{w}physical_block_size", str(exc)) from None
    sanitize_rate = 0
    if "sanitize_rate" in table:
        try:
            sanitize_rate = parse_size(str(table["sanitize_rate"]))
        except ValueError as exc:
            raise r.fail(f"{w}sanitize_rate", f"{exc} (bytes per second, e.g. \"64M\")") from None
    if backend == "rbd" and mode.replace("-", "").lower() not in RBD_MODES:
        raise r.fail(f"{w}mode", f"{mode!r} is not allowed for an RBD image "
                     f"({', '.join(RBD_MODES)})")
    return LunSpec(
        **rbd,
        removable=r.get(table, "removable", w, bool, False), physical_block_size=pbs,
        sanitize_rate=sanitize_rate,
        mode=mode, bandwidth_group=r.get(table, "bandwidth_group", w, str, None),
        max_overlays=r.int_in(table, "max_overlays", w, 64, 1, 100000),
        lun=r.int_in(table, "lun", w, index, 0, 16383),
        path=path if backend == "nbd" else _resolve(base, path) if path else "",
        backend=backend, size=size,
        read_only=r.get(table, "read_only", w, bool, False), block_size=bs,
        serial=r.get(table, "serial", w, str, None),
        wwn=wwn.lower().removeprefix("naa.") if wwn else None,
        vendor=vendor, product=product, revision=revision,
        write_cache=r.get(table, "write_cache", w, bool, True), device_type=device_type,
    )


def lun_table(table: dict[str, Any], source: str, index: int = 0) -> LunSpec:
    """A LUN from a table with the ``[[target.lun]]`` keys (``lun add`` on
    a running target); relative paths are taken from the current
    directory, ``index`` is the LUN number when the table has none."""
    return _lun(_Reader(source), table, "lun", index, os.getcwd())


def _portal(r: _Reader, text: Any, where: str) -> tuple[str, int]:
    if not isinstance(text, str):
        raise r.fail(where, f"{text!r} is not allowed (\"host:port\" or \"[v6]:port\")")
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise r.fail(where, f"{text!r}: {exc}") from None


def load_toml(path: str) -> ServerConfig:
    """Load a TOML configuration file (see README.md for the keys)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(doc, path)


def config_from_dict(doc: dict[str, Any], source: str) -> ServerConfig:
    """Build a ServerConfig from a parsed TOML document."""
    r = _Reader(source)
    base = os.path.dirname(os.path.abspath(source)) if os.path.exists(source) else os.getcwd()
    r.check_keys(doc, {"server", "discovery", "portal_group", "target", "bandwidth_group"}, "")
    server = doc.get("server", {})
    if not isinstance(server, dict):
        raise r.fail("server", "must be a table")
    r.check_keys(server, {"portals", "nop_interval", "nop_timeout", "login_timeout",
                          "state_dir", "write_budget", "max_connections", "log_format",
                          "log_file", "metrics", "isns"}, "server.")
    groups: dict[int, PortalGroup] = {}
    portals = r.get(server, "portals", "server.", list, None, "a list of \"host:port\"")
    if portals is not None:
        groups[1] = PortalGroup(1, tuple(_portal(r, p, f"server.portals[{i}]")
                                         for i, p in enumerate(portals)))
    for i, g in enumerate(r.get(doc, "portal_group", "", list, [], "an array of tables")):
        w = f"portal_group[{i}]."
        if not isinstance(g, dict):
            raise r.fail(w[:-1], "must be a table")
        r.check_keys(g, {"tag", "portals", "alua_state", "preferred"}, w)
        tag = r.int_in(g, "tag", w, i + 1, 1, 65535)
        state = r.get(g, "alua_state", w, str, "active/optimized")
        if state not in ALUA_STATES:
            raise r.fail(f"{w}alua_state", f"{state!r} is not allowed ({', '.join(ALUA_STATES)})")
        plist = r.get(g, "portals", w, list, None, "a list of \"host:port\"")
        if not plist:
            raise r.fail(f"{w}portals", "missing (at least one \"host:port\")")
        if tag in groups:
            raise r.fail(f"{w}tag", f"{tag} is used twice")
        groups[tag] = PortalGroup(tag, tuple(_portal(r, p, f"{w}portals[{j}]")
                                             for j, p in enumerate(plist)),
                                  alua_state=state, preferred=r.get(g, "preferred", w, bool, False))
    if not groups:
        groups[1] = PortalGroup(1, (("0.0.0.0", 3260),))
    discovery = doc.get("discovery", {})
    if not isinstance(discovery, dict):
        raise r.fail("discovery", "must be a table")
    r.check_keys(discovery, {"chap"}, "discovery.")
    targets: list[TargetSpec] = []
    names: set[str] = set()
    tlist = r.get(doc, "target", "", list, [], "an array of [[target]] tables")
    if not tlist:
        raise r.fail("target", "no [[target]] defined (at least one is needed)")
    for i, t in enumerate(tlist):
        w = f"target[{i}]."
        if not isinstance(t, dict):
            raise r.fail(w[:-1], "must be a table")
        r.check_keys(t, {"name", "alias", "portal_groups", "allow", "chap", "limits", "lun",
                         "farm", "redirect", "redirect_permanent"}, w)
        redirect = r.get(t, "redirect", w, str, None, '"host[:port][,tpgt]"')
        if redirect is not None:
            try:
                redirect = str(parse_portal(redirect, bare_v6=False))
            except (InvalidName, ValueError) as exc:
                raise r.fail(f"{w}redirect", f"{exc} (\"host[:port][,tpgt]\")") from None
        name = r.get(t, "name", w, str, None)
        if name is None:
            raise r.fail(f"{w}name", "missing (an iqn./eui./naa. name)")
        try:
            name = normalize_name(name)
        except (InvalidName, ValueError) as exc:
            raise r.fail(f"{w}name", str(exc)) from None
        if name in names:
            raise r.fail(f"{w}name", f"{name} is defined twice")
        names.add(name)
        pgs = tuple(r.get(t, "portal_groups", w, list, sorted(groups), "a list of tags"))
        for tag in pgs:
            if tag not in groups:
                raise r.fail(f"{w}portal_groups", f"{tag!r} is not a defined portal group "
                             f"(defined: {', '.join(map(str, sorted(groups)))})")
        allow = []
        for j, a in enumerate(r.get(t, "allow", w, list, [], "a list of initiator names")):
            try:
                allow.append(normalize_name(str(a)))
            except (InvalidName, ValueError) as exc:
                raise r.fail(f"{w}allow[{j}]", str(exc)) from None
        limits_t = r.get(t, "limits", w, dict, {}, "a table")
        luns_t = r.get(t, "lun", w, list, [], "an array of [[target.lun]] tables")
        farm = None
        if "farm" in t:
            from .farm_admin import farm_from_table

            farm, luns_t = farm_from_table(t["farm"], luns_t, f"{w}farm", r.fail, base)
        if not luns_t and redirect is None:
            raise r.fail(f"{w}lun", "no [[target.lun]] defined (at least one is needed, "
                         "unless the target redirects its logins)")
        luns = tuple(_lun(r, lt, f"{w}lun[{j}]", j, base) for j, lt in enumerate(luns_t))
        seen: set[int] = set()
        for j, lun in enumerate(luns):
            if lun.lun in seen:
                raise r.fail(f"{w}lun[{j}].lun", f"LUN {lun.lun} is used twice")
            seen.add(lun.lun)
        targets.append(TargetSpec(
            name=name, luns=luns, alias=r.get(t, "alias", w, str, None), portal_groups=pgs,
            allow=tuple(allow), chap=_chap(r, t.get("chap"), f"{w}chap"),
            limits=_limits(r, limits_t, f"{w}limits."), farm=farm, redirect=redirect,
            redirect_permanent=r.get(t, "redirect_permanent", w, bool, False),
        ))
    bw: dict[str, int | None] = {}
    for i, g in enumerate(r.get(doc, "bandwidth_group", "", list, [], "an array of tables")):
        w = f"bandwidth_group[{i}]."
        if not isinstance(g, dict):
            raise r.fail(w[:-1], "must be a table {name, limit}")
        r.check_keys(g, {"name", "limit"}, w)
        gname = r.get(g, "name", w, str, None)
        if not gname:
            raise r.fail(f"{w}name", "missing")
        if gname in bw:
            raise r.fail(f"{w}name", f"{gname!r} is defined twice")
        limit = g.get("limit")
        bw[gname] = None if limit is None else _limit(r, limit, f"{w}limit")
    for i, t in enumerate(targets):
        for j, lun in enumerate(t.luns):
            if lun.bandwidth_group is not None and lun.bandwidth_group not in bw:
                raise r.fail(f"target[{i}].lun[{j}].bandwidth_group",
                             f"{lun.bandwidth_group!r} is not a defined [[bandwidth_group]] "
                             f"(defined: {', '.join(bw) or 'none'})")
    state_dir = r.get(server, "state_dir", "server.", str, None)
    log_format = r.get(server, "log_format", "server.", str, "text", '"text" or "json"')
    if log_format not in ("text", "json"):
        raise r.fail("server.log_format", f'{log_format!r} is not allowed ("text" or "json")')
    log_file = r.get(server, "log_file", "server.", str, None, "a file path")
    metrics = r.get(server, "metrics", "server.", str, None, '"host:port"')
    if metrics is not None:
        try:
            parse_metrics_address(metrics)
        except ValueError as exc:
            raise r.fail("server.metrics", str(exc)) from None
    isns = r.get(server, "isns", "server.", str, None, '"host[:port]"')
    if isns is not None:
        from target.isns import parse_isns_address

        try:
            parse_isns_address(isns)
        except ValueError as exc:
            raise r.fail("server.isns", str(exc)) from None
    return ServerConfig(
        isns=isns,
        log_format=log_format, log_file=_resolve(base, log_file) if log_file else None,
        metrics=metrics,
        bandwidth_groups=tuple(bw.items()),
        targets=tuple(targets), portal_groups=tuple(groups[k] for k in sorted(groups)),
        discovery_chap=_chap(r, discovery.get("chap"), "discovery.chap"),
        nop_interval=float(r.get(server, "nop_interval", "server.", float, 30.0)),
        nop_timeout=float(r.get(server, "nop_timeout", "server.", float, 30.0)),
        login_timeout=float(r.get(server, "login_timeout", "server.", float, 15.0)),
        state_dir=_resolve(base, state_dir) if state_dir else None, source=source,
        write_budget=_budget(r, server.get("write_budget", 256 << 20)),
        max_connections=r.int_in(server, "max_connections", "server.", 1024, 1, 1 << 20),
    )


def _budget(r: _Reader, value: object) -> int:
    """``[server] write_budget``: a size ("256M") or a byte count, at
    least one 64 MiB write so the largest command can run."""
    try:
        n = parse_size(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise r.fail("server.write_budget", str(exc)) from None
    if not isinstance(n, int) or isinstance(n, bool) or n < 64 << 20:
        raise r.fail("server.write_budget", f"{value!r} is not allowed (a size of at least 64M)")
    return n


# ---------------------------------------------------------------------------
# ietd.conf (iSCSI Enterprise Target), so people moving from IET keep their file.
