"""The login phase state machine, both roles (RFC 7143 §6.3, §11.12, §11.13).

A login moves through up to three stages, named by CSG/NSG in every Login
PDU::

    SecurityNegotiation (0) -> LoginOperationalNegotiation (1) -> FullFeaturePhase (3)

The initiator asks to leave a stage with the T (transit) bit and NSG; the
target agrees by echoing T in its response (it may pick a lower NSG).  Text
that does not fit in one PDU is continued with the C bit; the other side
answers each partial PDU with an empty one (§11.12.2, §11.13.2).

Both classes are sans-I/O: :class:`InitiatorLogin` produces LoginRequests
and consumes LoginResponses, :class:`TargetLogin` the reverse.  The target
consults a :class:`TargetLoginPolicy` (the server's configuration and
session table) and turns every refusal into the Login status class/detail of
§11.13.5.
"""

from __future__ import annotations

from .login_common import (
    DEFAULT_INITIATOR_OFFERS,
    LOGIN_SEGMENT_LENGTH,
    MAX_LOGIN_ROUNDS,
    TRANSITIONS,
    LoginRedirect,
    LoginRejected,
    join_connection,
)
from .login_initiator import ChapAuth, InitiatorLogin
from .login_target import (
    LoginTarget,
    SimpleLoginPolicy,
    TargetAuth,
    TargetEntry,
    TargetLogin,
    TargetLoginPolicy,
)

__all__ = [
    "DEFAULT_INITIATOR_OFFERS", "LOGIN_SEGMENT_LENGTH", "MAX_LOGIN_ROUNDS", "TRANSITIONS",
    "ChapAuth", "InitiatorLogin", "LoginRedirect", "LoginRejected", "LoginTarget",
    "SimpleLoginPolicy", "TargetAuth", "TargetEntry", "TargetLogin", "TargetLoginPolicy",
    "join_connection",
]
