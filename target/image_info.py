"""``iscsi-target image info``: an image and its backing chain as
``qemu-img info`` shows it, as text or with qemu-img's JSON field names and
types (``--output json``)."""

from __future__ import annotations

from typing import Any, TextIO

from target.backends.base import BackendError
from target.backends.registry import ImageBackend, ImageInfo, resolve_backing


def human_size(n: int) -> str:
    """``n`` bytes as qemu-img writes sizes: "64 MiB", "1.5 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.4g} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover



def info_dict(img: ImageBackend) -> dict[str, Any]:
    """The image and its backing chain as qemu-img's JSON."""
    chain: list[dict[str, Any]] = []
    for node in img.chain():
        if isinstance(node, ImageBackend):
            i = node.info()
            chain.append(_one_info(i))
        else:
            chain.append({"filename": node.path, "virtual-size": node.size})
    top = dict(chain[0])
    top["backing-chain"] = chain[1:]
    return top


#: qemu-img's name for the allocation unit of each format (reported as
#: "cluster-size").
_CLUSTER_KEYS = ("cluster_size", "block_size", "grain_size")


def _typed(value: str) -> Any:
    """A format-specific value as qemu-img types it: integers and booleans
    as JSON numbers and booleans."""
    if value.isdigit():
        return int(value)
    if value in ("true", "yes"):
        return True
    if value in ("false", "no"):
        return False
    return value


def _one_info(i: ImageInfo) -> dict[str, Any]:
    """One image as ``qemu-img info --output=json`` names and types its
    fields (``subformat``, ``uuid`` and ``parent-uuid`` are ours besides)."""
    d: dict[str, Any] = {
        "filename": i.path,
        "format": i.format,
        "virtual-size": i.virtual_size,
        "actual-size": i.allocated_size,
    }
    for key in _CLUSTER_KEYS:
        if key in i.extra and i.extra[key].isdigit():
            d["cluster-size"] = int(i.extra[key])
            break
    if i.format == "qcow2":
        d["dirty-flag"] = i.extra.get("dirty") == "true"
    if i.subformat:
        d["subformat"] = i.subformat
    if i.uuid:
        d["uuid"] = i.uuid
    if i.parent_uuid:
        d["parent-uuid"] = i.parent_uuid
    if i.backing:
        d["backing-filename"] = i.backing
        try:
            d["full-backing-filename"] = resolve_backing(i.path, i.backing)
        except BackendError:
            d["full-backing-filename"] = i.backing
    if i.backing_format:
        d["backing-filename-format"] = i.backing_format
    if i.extra:
        d["format-specific"] = {
            "type": i.format,
            "data": {k.replace("_", "-"): _typed(v) for k, v in sorted(i.extra.items())},
        }
    return d


def print_info(d: dict[str, Any], out: TextIO, indent: str = "") -> None:
    """The text form of :func:`info_dict`'s answer (qemu-img's layout)."""
    out.write(f"{indent}image: {d['filename']}\n")
    if "format" in d:
        sub = f" ({d['subformat']})" if "subformat" in d else ""
        out.write(f"{indent}file format: {d['format']}{sub}\n")
    out.write(f"{indent}virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)\n")
    if "actual-size" in d:
        out.write(f"{indent}disk size: {human_size(d['actual-size'])}\n")
    if "uuid" in d:
        out.write(f"{indent}uuid: {d['uuid']}\n")
    if "parent-uuid" in d:
        out.write(f"{indent}parent uuid: {d['parent-uuid']}\n")
    if "backing-filename" in d:
        fmt = f" ({d['backing-filename-format']})" if "backing-filename-format" in d else ""
        out.write(f"{indent}backing file: {d['backing-filename']}{fmt}\n")
    specific = d.get("format-specific", {}).get("data", {})
    out.writelines(f"{indent}    {k}: {v}\n" for k, v in sorted(specific.items()))
