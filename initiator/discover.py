"""SendTargets discovery as one call: log in to a discovery session, ask,
log out (RFC 7143 Appendix C, §13.3)."""

from __future__ import annotations

import dataclasses

from iscsi.constants import LoginStatus
from iscsi.discovery import DiscoveredTarget

from .errors import LoginRefused
from .options import SessionOptions
from .session import Session


async def discover(host: str, port: int = 3260, options: SessionOptions | None = None,
                   which: str = "All", *, chap_optional: bool = False
                   ) -> list[DiscoveredTarget]:
    """SendTargets discovery (with discovery CHAP when ``options`` has
    credentials): log in to a discovery session, ask, log out.

    With credentials we insist on CHAP. ``chap_optional`` relaxes that for
    one-way CHAP: when the portal refuses our CHAP (many targets protect
    only normal sessions, so the credentials in a URL are the target's), try
    once more without. Nothing is lost by it: one-way CHAP proves us to the
    target, never the target to us. Mutual CHAP is never dropped; if both
    attempts fail the first refusal is raised.
    """
    try:
        return await _discover_once(host, port, options, which)
    except LoginRefused as exc:
        o = options
        if (not chap_optional or o is None or o.chap_user is None
                or o.target_chap_user is not None
                or exc.status != LoginStatus.AUTHENTICATION_FAILURE):
            raise
        plain = dataclasses.replace(o, chap_user=None, chap_secret=None)
        try:
            return await _discover_once(host, port, plain, which)
        except LoginRefused:
            raise exc from None


async def _discover_once(host: str, port: int, options: SessionOptions | None,
                         which: str) -> list[DiscoveredTarget]:
    session = await Session.connect_discovery(host, port, options)
    try:
        return await session.send_targets(which)
    finally:
        await session.logout()


__all__ = ["discover"]
