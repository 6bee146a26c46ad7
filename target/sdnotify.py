"""The systemd readiness protocol (sd_notify(3)): a datagram with
``KEY=VALUE`` lines to the socket ``$NOTIFY_SOCKET`` names, so a
``Type=notify`` unit knows when the target listens, reloads and stops.
A path starting with ``@`` is in the abstract namespace. Without the
variable (not run by systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=..."``); True when a
    service manager was there to receive them."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False  # a service manager that went away must not stop us
    return True
