"""Write a :class:`ServerConfig` back out as the TOML :mod:`target.config`
reads (``iscsi-target saveconfig``): the running state, after live changes,
as a file the next start can use.

Only values that differ from the defaults are written, so a saved file
reads like a hand-written one; loading it gives the same configuration
(paths are absolute, sizes in bytes).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from .config import ChapConfig, Limits, LunSpec, ServerConfig, TargetSpec

_DEFAULT_LUN = LunSpec(lun=0, path="")
_DEFAULT_LIMITS = Limits()
_DEFAULT_SERVER = ServerConfig(targets=())


def _value(v: Any) -> str:
    """One TOML value. JSON's string escapes are valid TOML basic strings."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _limit_text(limit: int) -> str:
    """A bandwidth limit in bytes/s as ``parse_limit`` reads it back."""
    for unit, scale in (("G", 1_000_000_000), ("M", 1_000_000), ("K", 1_000), ("k", 125)):
        if limit and limit % scale == 0:
            return f"{limit // scale}{unit}"
    return f"{limit / 1_000_000}"  # plain numbers are MB/s


def _chap(chap: ChapConfig) -> str:
    parts = [f"user = {_value(chap.user)}", f"secret = {_value(chap.secret)}"]
    if chap.mutual_user is not None and chap.mutual_secret is not None:
        parts += [f"mutual_user = {_value(chap.mutual_user)}",
                  f"mutual_secret = {_value(chap.mutual_secret)}"]
    return "{ " + ", ".join(parts) + " }"


def _lun(lun: LunSpec) -> list[str]:
    out = ["", "[[target.lun]]", f"lun = {lun.lun}"]
    for f in fields(LunSpec):
        if f.name == "lun":
            continue
        v = getattr(lun, f.name)
        if v is None or v == getattr(_DEFAULT_LUN, f.name):
            continue
        # An NBD LUN's address is its ``uri`` (the loader's key).
        key = "uri" if f.name == "path" and lun.backend == "nbd" else f.name
        out.append(f"{key} = {_value(v)}")
    return out


def _target(t: TargetSpec, all_groups: tuple[int, ...]) -> list[str]:
    out = ["", "[[target]]", f"name = {_value(t.name)}"]
    if t.alias is not None:
        out.append(f"alias = {_value(t.alias)}")
    if tuple(t.portal_groups) != all_groups:
        out.append(f"portal_groups = {_value(list(t.portal_groups))}")
    if t.allow:
        out.append(f"allow = {_value(list(t.allow))}")
    if t.chap is not None:
        out.append(f"chap = {_chap(t.chap)}")
    limits = [f"{f.name} = {_value(getattr(t.limits, f.name))}" for f in fields(Limits)
              if getattr(t.limits, f.name) != getattr(_DEFAULT_LIMITS, f.name)]
    if limits:
        out.append("limits = { " + ", ".join(limits) + " }")
    if t.redirect is not None:
        out.append(f"redirect = {_value(t.redirect)}")
        if t.redirect_permanent:
            out.append("redirect_permanent = true")
    if t.farm is not None:
        from .farm_admin import farm_toml

        return out + farm_toml(t.farm)
    for lun in sorted(t.luns, key=lambda s: s.lun):
        out.extend(_lun(lun))
    return out


def dump_config(cfg: ServerConfig) -> str:
    """The TOML text of ``cfg`` (CHAP secrets included: keep the file
    private)."""
    out = ["# Written by iscsi-target saveconfig: the running configuration.", "", "[server]"]
    groups = {g.tag: g for g in cfg.portal_groups}
    # One plain group is server.portals; anything else is [[portal_group]].
    plain = set(groups) == {1} and groups[1].alua_state == "active/optimized" \
        and not groups[1].preferred
    if plain:
        out.append("portals = " + _value([_portal(h, p) for h, p in groups[1].portals]))
    for key in ("nop_interval", "nop_timeout", "login_timeout", "state_dir", "write_budget",
                "max_connections", "log_format", "log_file", "metrics", "isns"):
        v = getattr(cfg, key)
        if v is not None and v != getattr(_DEFAULT_SERVER, key):
            out.append(f"{key} = {_value(v)}")
    if not plain:
        for tag in sorted(groups):
            g = groups[tag]
            out += ["", "[[portal_group]]", f"tag = {tag}",
                    "portals = " + _value([_portal(h, p) for h, p in g.portals])]
            if g.alua_state != "active/optimized":
                out.append(f"alua_state = {_value(g.alua_state)}")
            if g.preferred:
                out.append("preferred = true")
    if cfg.discovery_chap is not None:
        out += ["", "[discovery]", f"chap = {_chap(cfg.discovery_chap)}"]
    for name, limit in cfg.bandwidth_groups:
        out += ["", "[[bandwidth_group]]", f"name = {_value(name)}"]
        if limit is not None:
            out.append(f"limit = {_value(_limit_text(limit))}")
    for t in cfg.targets:
        out.extend(_target(t, tuple(sorted(groups))))
    return "\n".join(out) + "\n"


def _portal(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
