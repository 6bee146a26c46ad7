"""IET's ``ietd.conf`` as a target configuration (``Target`` blocks with
``Lun``, ``IncomingUser``/``OutgoingUser`` and the iSCSI keys it shares with
RFC 7143), for administrators moving from ietd."""

from __future__ import annotations

import os
import re
from typing import Any

from .config import ConfigError, ServerConfig
from .config_load import _resolve, config_from_dict


_IET_BOOL = {"yes": True, "no": False}
_IET_NUM = {
    "MaxRecvDataSegmentLength": "max_recv_data_segment_length",
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "MaxConnections": "max_connections",
    "QueuedCommands": "queue_depth",
}
_IET_IGNORED = {"MaxXmitDataSegmentLength", "DataPDUInOrder", "DataSequenceInOrder",
                "ErrorRecoveryLevel", "Wthreads", "DefaultTime2Wait", "DefaultTime2Retain",
                "NOPInterval", "NOPTimeout", "ScsiId", "ScsiSN", "Type", "IoType"}


def load_ietd(path: str) -> ServerConfig:
    """Load an IET ``ietd.conf``: Target, Lun N Path=...,Type=fileio|blockio,
    IncomingUser, OutgoingUser, Alias and the negotiation keys."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    base = os.path.dirname(os.path.abspath(path))
    targets: list[dict[str, Any]] = []
    discovery: list[tuple[str, str]] = []
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{no}"
        key, _, rest = text.partition(" ")
        rest = rest.strip()
        if key == "Target":
            if not rest:
                raise ConfigError(f"{where}: Target: missing the target name")
            targets.append({"name": rest, "lun": [], "limits": {}, "in": [], "out": []})
            continue
        if not targets:
            if key == "IncomingUser":
                parts = rest.split()
                if len(parts) != 2:
                    raise ConfigError(f"{where}: IncomingUser: expected 'IncomingUser USER SECRET'")
                discovery.append((parts[0], parts[1]))
                continue
            if key in ("OutgoingUser",):
                continue
            raise ConfigError(f"{where}: {key}: not allowed before the first Target line")
        t = targets[-1]
        if key == "Lun":
            m = re.fullmatch(r"(\d+)\s+(.*)", rest)
            if not m:
                raise ConfigError(f"{where}: Lun: expected 'Lun N Path=FILE,Type=fileio|blockio'")
            opts = dict(kv.split("=", 1) for kv in m.group(2).split(",") if "=" in kv)
            typ = opts.get("Type", "fileio")
            if typ not in ("fileio", "blockio", "nullio"):
                raise ConfigError(f"{where}: Lun Type: {typ!r} is not allowed (fileio, blockio, nullio)")
            lun: dict[str, Any] = {"lun": int(m.group(1))}
            if typ == "nullio":
                lun.update(backend="memory", size=opts.get("Sectors", "64M"))
            else:
                if "Path" not in opts:
                    raise ConfigError(f"{where}: Lun: missing Path=")
                lun["path"] = _resolve(base, opts["Path"])
                lun["backend"] = "block" if typ == "blockio" else "auto"
            if "ScsiSN" in opts:
                lun["serial"] = opts["ScsiSN"]
            if opts.get("IOMode") == "ro":
                lun["read_only"] = True
            t["lun"].append(lun)
        elif key in ("IncomingUser", "OutgoingUser"):
            parts = rest.split()
            if len(parts) != 2:
                raise ConfigError(f"{where}: {key}: expected '{key} USER SECRET'")
            t["in" if key == "IncomingUser" else "out"].append(tuple(parts))
        elif key == "Alias":
            t["alias"] = rest
        elif key in ("InitialR2T", "ImmediateData"):
            if rest.lower() not in _IET_BOOL:
                raise ConfigError(f"{where}: {key}: {rest!r} is not allowed (Yes or No)")
            t["limits"]["initial_r2t" if key == "InitialR2T" else "immediate_data"] = _IET_BOOL[rest.lower()]
        elif key in ("HeaderDigest", "DataDigest"):
            vals = [v.strip() for v in rest.split(",")]
            t["limits"]["header_digests" if key == "HeaderDigest" else "data_digests"] = vals
        elif key in _IET_NUM:
            if not rest.isdigit():
                raise ConfigError(f"{where}: {key}: {rest!r} is not allowed (a number)")
            t["limits"][_IET_NUM[key]] = int(rest)
        elif key in _IET_IGNORED:
            continue
        else:
            raise ConfigError(f"{where}: {key}: unknown ietd.conf keyword")
    if not targets:
        raise ConfigError(f"{path}: no Target defined")
    doc: dict[str, Any] = {"target": []}
    for t in targets:
        entry: dict[str, Any] = {"name": t["name"], "lun": t["lun"], "limits": t["limits"]}
        if "alias" in t:
            entry["alias"] = t["alias"]
        if t["in"]:
            user, secret = t["in"][0]
            chap: dict[str, str] = {"user": user, "secret": secret}
            if t["out"]:
                chap["mutual_user"], chap["mutual_secret"] = t["out"][0]
            entry["chap"] = chap
        doc["target"].append(entry)
    if discovery:
        doc["discovery"] = {"chap": {"user": discovery[0][0], "secret": discovery[0][1]}}
    return config_from_dict(doc, path)
