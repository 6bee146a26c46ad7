"""The control socket of a running target: line-delimited JSON over a
local unix socket, what ``iscsi-target show|kick|lun|...`` talk to.

One request per line, ``{"op": "lun_add", "target": ..., ...}``; one answer
per line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"one line"}``. The operations are :class:`~target.server.TargetServer`'s
administration methods; this module only decodes arguments and encodes
results.

The socket is the only way in, so it is as private as the target's files:
mode 0600 (bound under umask 0177, so it is never reachable more widely,
even for an instant), in a directory only the owner can enter, and a peer
whose SO_PEERCRED uid is neither ours nor root is refused. A socket file
left by a target that died is replaced; one a live target answers on is
not (:class:`ControlError`, one line).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from target.backends.base import BackendError

from .admin import AdminError
from .farm_admin import FARM_OPS
from .config import ChapConfig, ConfigError, TargetSpec, lun_from_dict, parse_size

if TYPE_CHECKING:
    from .server import TargetServer

log = logging.getLogger("aioiscsi.target")

SOCKET_NAME = "control.sock"
#: The longest request line accepted (a target with many LUNs fits easily).
MAX_LINE = 1 << 20


class ControlError(Exception):
    """The control socket cannot be created or reached (one line)."""


def default_control_path(state_dir: str | None = None) -> str:
    """Where ``serve`` puts its control socket and the admin commands look
    for it: ``STATE_DIR/control.sock`` with a state directory, else
    ``/run/aioiscsi/control.sock`` for root, ``$XDG_RUNTIME_DIR/aioiscsi/
    control.sock`` for other users (``/tmp/aioiscsi-UID/`` without one)."""
    if state_dir:
        return os.path.join(os.path.abspath(state_dir), SOCKET_NAME)
    if os.geteuid() == 0:
        return os.path.join("/run/aioiscsi", SOCKET_NAME)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "aioiscsi", SOCKET_NAME)
    return os.path.join(f"/tmp/aioiscsi-{os.geteuid()}", SOCKET_NAME)


def _private_dir(path: str) -> None:
    """Create the socket's directory 0700, or check that an existing one
    belongs to us (or root) and nobody else may write to it."""
    d = os.path.dirname(path) or "."
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
    except OSError as exc:
        raise ControlError(f"control socket directory {d}: {exc.strerror}") from None
    # A sticky directory (/tmp) is fine: nobody else can replace our socket.
    if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and
                                               not st.st_mode & stat.S_ISVTX):
        raise ControlError(f"control socket directory {d} is writable by other users; "
                           "give --control PATH in a private directory")


def _is_live(path: str) -> bool:
    """True when a process accepts connections on the socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlServer:
    """Serves the control protocol for ``server`` on the socket ``path``."""

    def __init__(self, server: TargetServer, path: str) -> None:
        self.server = server
        self.path = os.path.abspath(path)
        self._srv: asyncio.AbstractServer | None = None
        self._ino: int | None = None

    async def start(self) -> None:
        """Bind and listen (ControlError when the path is taken)."""
        _private_dir(self.path)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"{self.path} exists and is not a socket; give --control "
                                   "another PATH")
            if _is_live(self.path):
                raise ControlError(f"control socket {self.path} is in use by another running "
                                   "target; give --control PATH")
            os.unlink(self.path)  # left by a target that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._ino = os.stat(self.path).st_ino
        sock.listen(16)
        self._srv = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours)."""
        if self._srv is None:
            return
        self._srv.close()
        self._srv = None
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _peer_allowed(writer):
                writer.write(_encode({"ok": False, "error": "permission denied"}))
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_encode({"ok": False, "error": "request line too long"}))
                    return
                if not line:
                    return
                writer.write(_encode(await self.handle(line)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, line: bytes) -> dict[str, Any]:
        """Answer one request line."""
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "request needs an \"op\""}
        op = _OPS.get(req["op"])
        if op is None:
            return {"ok": False, "error": f"unknown operation {req['op']!r} "
                                          f"(known: {', '.join(sorted(_OPS))})"}
        try:
            result = op(self.server, req)
            if asyncio.iscoroutine(result):
                result = await result
        except (AdminError, ConfigError, BackendError, ControlError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the control socket must never take the target down
            log.exception("control request %s failed", req["op"])
            return {"ok": False, "error": f"internal error: {exc} (see the target's log)"}
        return {"ok": True, "result": result}


def _encode(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """Defence in depth beside the 0600 mode: only our uid and root."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return True
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


# ---------------------------------------------------------------- arguments
_REQUIRED = object()


def _arg(req: dict[str, Any], key: str, kind: type | tuple[type, ...],
         default: Any = _REQUIRED) -> Any:
    if key not in req or req[key] is None:
        if default is _REQUIRED:
            raise AdminError(f"{req['op']}: {key} is missing")
        return default
    value = req[key]
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        raise AdminError(f"{req['op']}: {key}: {value!r} is not allowed")
    return value


def _size(req: dict[str, Any]) -> int | None:
    raw = _arg(req, "size", (int, str), None)
    if raw is None or isinstance(raw, int):
        return raw
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise AdminError(f"size: {exc}") from None


def _lun_table(req: dict[str, Any], rt_luns: set[int]) -> Any:
    table = dict(_arg(req, "lun", dict))
    free = next(n for n in range(16384) if n not in rt_luns)
    return lun_from_dict(table, f"{req['op']}", free)


def _lun_add(s: TargetServer, req: dict[str, Any]) -> Any:
    name = _arg(req, "target", str)
    luns = set(s.targets[name].scsi.luns) if name in s.targets else set()
    return s.add_lun(name, _lun_table(req, luns))


def _target_add(s: TargetServer, req: dict[str, Any]) -> Any:
    luns = []
    for i, t in enumerate(_arg(req, "luns", list, [])):
        if not isinstance(t, dict):
            raise AdminError("target_add: luns must be tables")
        luns.append(lun_from_dict(t, "target add", i))
    groups = _arg(req, "portal_groups", list, None)
    spec = TargetSpec(name=_arg(req, "name", str), luns=tuple(luns),
                      alias=_arg(req, "alias", str, None),
                      allow=tuple(_arg(req, "allow", list, [])),
                      portal_groups=tuple(groups) if groups else
                      tuple(g.tag for g in s.config.portal_groups))
    s.add_target(spec)
    return {"name": spec.name}


def _chap_set(s: TargetServer, req: dict[str, Any]) -> Any:
    target = _arg(req, "target", str, None)
    if _arg(req, "clear", bool, False):
        s.set_chap(target, None)
        return None
    s.set_chap(target, ChapConfig(_arg(req, "user", str), _arg(req, "secret", str),
                                  _arg(req, "mutual_user", str, None),
                                  _arg(req, "mutual_secret", str, None)))
    return None


def _saveconfig(s: TargetServer, req: dict[str, Any]) -> Any:
    path = _arg(req, "path", str, None)
    text = s.save_config(path)
    return {"path": path, "toml": text}


_OPS: dict[str, Callable[[TargetServer, dict[str, Any]], Any]] = {
    "show": lambda s, r: s.show(),
    "sessions": lambda s, r: s.session_info(),
    "kick": lambda s, r: s.kick(tsih=_arg(r, "tsih", int, None),
                                initiator=_arg(r, "initiator", str, None),
                                target=_arg(r, "target", str, None)),
    "lun_add": _lun_add,
    "lun_remove": lambda s, r: s.remove_lun(_arg(r, "target", str), _arg(r, "lun", int)),
    "target_add": _target_add,
    "target_remove": lambda s, r: s.remove_target(_arg(r, "name", str)),
    "acl_add": lambda s, r: s.add_acl(_arg(r, "target", str), _arg(r, "initiator", str)),
    "acl_remove": lambda s, r: s.remove_acl(_arg(r, "target", str), _arg(r, "initiator", str)),
    "chap_set": _chap_set,
    "resize": lambda s, r: s.resize_lun(_arg(r, "target", str), _arg(r, "lun", int), _size(r)),
    "media": lambda s, r: s.set_medium(_arg(r, "target", str), _arg(r, "lun", int),
                                       _arg(r, "path", str, None)),
    "alua": lambda s, r: s.set_alua_state(_arg(r, "portal_group", int), _arg(r, "state", str),
                                          _arg(r, "target", str, None)),
    "reload": lambda s, r: s.reload().as_dict(),
    "saveconfig": _saveconfig,
}
_OPS.update(FARM_OPS)


# ------------------------------------------------------------------- client
class RemoteError(Exception):
    """The target refused a request (its one-line reason)."""


def request(path: str, op: str, args: dict[str, Any] | None = None,
            timeout: float = 120.0) -> Any:
    """Send one request (operation ``op`` with ``args``) to the target
    listening on ``path`` and return its result (blocking; for the CLI).
    ControlError when no target answers there, RemoteError when it
    refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no target is running with control socket {path} (start one "
                               "with iscsi-target serve, or give --control PATH)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run as the user the target runs "
                               "as, or root)") from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise ControlError(f"{path} is not a control socket") from None
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
        sock.sendall(_encode({**(args or {}), "op": op}))
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ControlError(f"the target closed {path} without answering")
            buf += chunk
    except TimeoutError:
        raise ControlError(f"the target did not answer on {path} within {timeout:g} s") from None
    finally:
        sock.close()
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise RemoteError(str(answer.get("error", "refused")))
    return answer.get("result")
