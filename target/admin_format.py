"""Human-readable tables for the administration commands (``--json``
prints the same data as the control socket returned it)."""

from __future__ import annotations

from typing import Any


def human_size(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _counters(c: dict[str, Any]) -> list[str]:
    return [str(c["commands"]), human_size(c["read_bytes"]), human_size(c["written_bytes"]),
            str(c["errors"]), f"{c['latency_us_avg']:.1f}"]


_COUNTER_HEAD = ["CMDS", "READ", "WRITTEN", "ERRORS", "AVG-LAT(us)"]


def render_show(data: dict[str, Any]) -> str:
    """``iscsi-target show``."""
    out: list[str] = []
    for t in data["targets"]:
        out.append(f"Target {t['name']}" + (f" (alias {t['alias']})" if t["alias"] else ""))
        out.append("  Portals: " + (", ".join(t["portals"]) or "none"))
        out.append("  ACL: " + (", ".join(t["acl"]) or "any initiator"))
        chap = t["chap"]
        out.append("  CHAP: " + ("off" if chap is None else f"user {chap['user']}" + (
            f", mutual (target user {chap['mutual_user']})" if chap["mutual_user"] else "")))
        lim = t["limits"]
        out.append(f"  Limits: queue depth {lim['queue_depth']}, MaxRecvDataSegmentLength "
                   f"{lim['max_recv_data_segment_length']}, MaxBurstLength "
                   f"{lim['max_burst_length']}, MaxConnections {lim['max_connections']}")
        if t["luns"]:
            rows = [["LUN", "SIZE", "FORMAT", "MODE", "TYPE", "PATH", *_COUNTER_HEAD]]
            for lun in t["luns"]:
                kind = lun["device_type"] + (", ro" if lun["read_only"] else "")
                if lun["medium"] is False:
                    kind += ", no medium"
                rows.append([str(lun["lun"]), human_size(lun["size"]), str(lun["format"]),
                             lun["mode"], kind, lun["path"] or lun["backend"],
                             *_counters(lun["counters"])])
            out.extend(_table(rows))
        else:
            out.append("  no LUNs")
    out.append("Sessions:" if data["sessions"] else "Sessions: none")
    out.extend(_session_lines(data["sessions"]))
    if data.get("control"):
        out.append(f"Control socket: {data['control']}")
    return "\n".join(out)


def _session_lines(sessions: list[dict[str, Any]]) -> list[str]:
    if not sessions:
        return []
    rows = [["TSIH", "INITIATOR", "TARGET", "ADDRESS", *_COUNTER_HEAD]]
    params: list[str] = []
    for s in sessions:
        addr = ", ".join(c["address"] for c in s["connections"]) or "-"
        rows.append([str(s["tsih"]), s["initiator"], s["target"] or "(discovery)", addr,
                     *_counters(s["counters"])])
    out = _table(rows)
    for s in sessions:
        p = s["params"]
        if not p:
            continue
        params.append(
            f"  TSIH {s['tsih']}: ISID {s['isid']}, HeaderDigest "
            f"{'CRC32C' if p.get('header_digest') else 'None'}, DataDigest "
            f"{'CRC32C' if p.get('data_digest') else 'None'}, MaxRecvDataSegmentLength "
            f"{p.get('max_recv_data_segment_length')}, MaxXmitDataSegmentLength "
            f"{p.get('max_xmit_data_segment_length')}, MaxBurstLength "
            f"{p.get('max_burst_length')}, FirstBurstLength {p.get('first_burst_length')}, "
            f"InitialR2T {_yn(p.get('initial_r2t'))}, ImmediateData "
            f"{_yn(p.get('immediate_data'))}, ErrorRecoveryLevel "
            f"{p.get('error_recovery_level')}")
    return out + params


def _yn(v: Any) -> str:
    return "Yes" if v else "No"


def render(op: str, result: Any) -> str:
    """The human form of ``result`` of control operation ``op``."""
    if op == "show":
        return render_show(result)
    if op == "sessions":
        return "\n".join(_session_lines(result)) or "no sessions"
    if op == "kick":
        return "ended session(s) TSIH " + ", ".join(map(str, result))
    if op == "lun_add":
        return (f"LUN {result['lun']} added: {result['path'] or 'memory'} "
                f"({human_size(result['size'])}, {result['format']})")
    if op == "resize":
        return f"LUN size now {human_size(result)} ({result} bytes)"
    if op == "reload":
        lines = [f"applied: {x}" for x in result["applied"]]
        lines += [f"needs a restart: {x}" for x in result["needs_restart"]]
        lines += [f"failed: {x}" for x in result["failed"]]
        return "\n".join(lines) or "no changes"
    if op == "saveconfig":
        return f"saved to {result['path']}" if result["path"] else result["toml"].rstrip("\n")
    if op in ("acl_add", "acl_remove"):
        return "ACL: " + (", ".join(result) or "empty (any initiator may log in)")
    if op == "media":
        return "medium loaded" if result else "medium ejected"
    return "done"
