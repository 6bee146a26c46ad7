"""Multiple connections per session family (RFC 7143 §4.2.2, §6.3.1,
§13.2).

Declared for the catalogue; each negotiates MaxConnections>1 first and
reports not-supported when the target declines. The bodies come later.
"""

from __future__ import annotations

from .context import Context
from .model import Level, NotSupported, conformance_test

MUST = Level.MUST


def require_mcs(ctx: Context) -> None:
    """Log in offering MaxConnections=4; NotSupported when the target
    agrees to 1."""
    w = ctx.session({"MaxConnections": "4"})
    assert w.params is not None
    got = w.params.max_connections
    ctx.logout(w)
    if got < 2:
        raise NotSupported(f"target declined MaxConnections>1 (agreed {got})")
    raise NotSupported(f"target agreed MaxConnections={got}; this check is not implemented "
                       "in the kit yet")


def _declare(test_id: str, section: str, description: str) -> None:
    @conformance_test(test_id, section, MUST, description + " (needs MaxConnections > 1)")
    def test(ctx: Context) -> str:
        require_mcs(ctx)
        return ""


_declare("mcs.connection.add", "6.3.1",
         "a second connection with the session's ISID and TSIH and a new CID logs in")
_declare("mcs.keys.leading_only", "13",
         "a leading-only key (e.g. MaxBurstLength) on a non-leading login: Login reject "
         "(initiator error)")
_declare("mcs.allegiance.status", "5.1",
         "a command's Data-In and status come on the connection it was sent on")
_declare("mcs.cmdsn.cross_connection", "4.2.2.1",
         "commands spread over two connections are ordered by CmdSN session-wide")
_declare("mcs.connection.loss", "7.1.1",
         "losing one connection leaves the session usable on the other")
_declare("mcs.logout.connection", "11.14",
         "Logout reason 1 (close the connection) on one connection keeps the session")
