"""Discovery through an iSNS server (RFC 4171): which targets exist and on
which portals, as an alternative to SendTargets on a known portal.

One DevAttrQry (RFC 4171 §5.6.5.2) keyed on iSCSI Node Type = Target asks
for every target the server lets this initiator see (its Discovery
Domains), with their aliases, portals and portal groups.
"""

from __future__ import annotations

import asyncio

from iscsi.discovery import DiscoveredTarget
from iscsi.isns import IsnsError, dev_attr_qry, parse_query_response
from iscsi.names import Portal, default_initiator_name
from target.isns import IsnsRefused, exchange, next_xid, parse_isns_address

from .errors import InitiatorError, PortalUnreachable

__all__ = ["discover_isns"]


async def discover_isns(server: str, initiator_name: str | None = None, *,
                        timeout: float = 10.0) -> list[DiscoveredTarget]:
    """The targets an iSNS server (``HOST[:PORT]``, port 3205 by default)
    lists for ``initiator_name`` (the Source of the query), sorted by
    name, with their portals and portal group tags."""
    host, port = parse_isns_address(server)
    source = initiator_name or default_initiator_name()
    try:
        rsp = await exchange(host, port, lambda _: dev_attr_qry(next_xid(), source), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        why = "no answer" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or exc)
        raise PortalUnreachable(f"iSNS server {server}: {why}",
                                hint="is isnsd running there (port 3205)?") from None
    except (IsnsError, IsnsRefused) as exc:
        raise InitiatorError(str(exc)) from None
    found = parse_query_response(rsp)
    return [DiscoveredTarget(n.name, tuple(Portal(h, p, t) for h, p, t in n.portals))
            for n in sorted(found, key=lambda n: n.name)]
