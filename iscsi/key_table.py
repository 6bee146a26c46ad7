"""The iSCSI login/text key table (RFC 7143 §13, RFC 7144 §13) as data, and
the value parsing and checks every key shares.

:class:`iscsi.keys.Negotiator` is the one engine that consults this table;
this module holds no negotiation state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .constants import Stage

Pair = tuple[str, str]

#: Answer constants of RFC 7143 §6.2.
REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
SPECIAL_VALUES = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})


class Role(Enum):
    """Which end of the connection a negotiator plays."""

    INITIATOR = "initiator"
    TARGET = "target"


class KeyKind(Enum):
    """Value type of a key, which picks the negotiation rule (§6.2, §13)."""

    LIST = "list"  # list-of-values, responder selects (§6.2.1)
    NUMERIC = "numeric"  # numerical value with a Min/Max result function
    BOOLEAN = "boolean"  # Yes/No with an AND/OR result function
    DECLARATIVE = "declarative"  # stated, never answered (§6.2)
    AUTH = "auth"  # CHAP_* exchange, handled by iscsi.chap (§12.1.3)
    SEND_TARGETS = "send_targets"  # Text request in FFP only (Appendix C)
    OBSOLETE = "obsolete"  # RFC 3720 markers, answered Reject (§13.26)


class Result(Enum):
    """The result function of a negotiated key (§13)."""

    SELECT = "select"
    MIN = "min"
    MAX = "max"
    AND = "and"
    OR = "or"
    NONE = "none"


class Scope(Enum):
    """Scope of a key's value: session-wide (SW) or connection-only (CO)."""

    SESSION = "SW"
    CONNECTION = "CO"


class Sender(Enum):
    """Who may send a key (§13 "Senders")."""

    INITIATOR = "initiator"
    TARGET = "target"
    BOTH = "both"


_SEC = frozenset({Stage.SECURITY_NEGOTIATION})
_OP = frozenset({Stage.LOGIN_OPERATIONAL_NEGOTIATION})
_LOGIN = frozenset({Stage.SECURITY_NEGOTIATION, Stage.LOGIN_OPERATIONAL_NEGOTIATION})
_FFP = frozenset({Stage.FULL_FEATURE_PHASE})
_OP_FFP = _OP | _FFP
_ALL = _LOGIN | _FFP

_MAX_24 = (1 << 24) - 1


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One row of the key table.

    Attributes:
        name: the key as spelled on the wire.
        kind: value type, which selects the negotiation rule.
        result: the result function (SELECT/MIN/MAX/AND/OR, NONE for others).
        default: the RFC default, or None when the key has none.
        low, high: inclusive range of a numerical key.
        values: the values we understand, for list and enumerated keys.
        stages: the stages in which the key may be sent.
        scope: session-wide or connection-only.
        sender: who may send it.
        leading_only: "LO": only on the leading login of a session.
        discovery_irrelevant: answered Irrelevant in a Discovery session.
        section: the RFC section that defines the key, for messages.
    """

    name: str
    kind: KeyKind
    result: Result = Result.NONE
    default: str | None = None
    low: int = 0
    high: int = 0
    values: tuple[str, ...] = ()
    stages: frozenset[Stage] = _OP
    scope: Scope = Scope.SESSION
    sender: Sender = Sender.BOTH
    leading_only: bool = False
    discovery_irrelevant: bool = False
    section: str = ""

    def may_send(self, role: Role) -> bool:
        """True when ``role`` is allowed to send this key."""
        return self.sender is Sender.BOTH or self.sender.value == role.value


def _num(name: str, default: int, low: int, high: int, result: Result, sec: str, *,
         lo: bool = True, disc: bool = True, scope: Scope = Scope.SESSION) -> KeySpec:
    return KeySpec(name, KeyKind.NUMERIC, result, str(default), low, high, (), _OP, scope,
                   Sender.BOTH, lo, disc, sec)


def _bool(name: str, default: bool, result: Result, sec: str) -> KeySpec:
    return KeySpec(name, KeyKind.BOOLEAN, result, "Yes" if default else "No", 0, 0,
                   ("Yes", "No"), _OP, Scope.SESSION, Sender.BOTH, True, True, sec)


def _decl(name: str, sender: Sender, sec: str, *, stages: frozenset[Stage] = _LOGIN,
          default: str | None = None, low: int = 0, high: int = 0,
          values: tuple[str, ...] = (), scope: Scope = Scope.SESSION,
          lo: bool = False) -> KeySpec:
    return KeySpec(name, KeyKind.DECLARATIVE, Result.NONE, default, low, high, values,
                   stages, scope, sender, lo, False, sec)


def _auth(name: str, sender: Sender) -> KeySpec:
    return KeySpec(name, KeyKind.AUTH, stages=_SEC, scope=Scope.CONNECTION, sender=sender,
                   section="12.1.3")


def _obsolete(name: str) -> KeySpec:
    return KeySpec(name, KeyKind.OBSOLETE, stages=_OP, section="13.26")


# The order matters: a Negotiator resolves keys in table order, so the keys
# FirstBurstLength depends on (InitialR2T, ImmediateData, MaxBurstLength)
# come before it (§13.14).
_TABLE: tuple[KeySpec, ...] = (
    KeySpec("HeaderDigest", KeyKind.LIST, Result.SELECT, "None", values=("CRC32C", "None"),
            scope=Scope.CONNECTION, section="13.1"),
    KeySpec("DataDigest", KeyKind.LIST, Result.SELECT, "None", values=("CRC32C", "None"),
            scope=Scope.CONNECTION, section="13.1"),
    _num("MaxConnections", 1, 1, 65535, Result.MIN, "13.2"),
    KeySpec("SendTargets", KeyKind.SEND_TARGETS, stages=_FFP, sender=Sender.INITIATOR,
            section="13.3"),
    _decl("TargetName", Sender.INITIATOR, "13.4"),
    _decl("InitiatorName", Sender.INITIATOR, "13.5"),
    _decl("TargetAlias", Sender.TARGET, "13.6", stages=_ALL),
    _decl("InitiatorAlias", Sender.INITIATOR, "13.7", stages=_ALL),
    _decl("TargetAddress", Sender.TARGET, "13.8", stages=_ALL),
    _decl("TargetPortalGroupTag", Sender.TARGET, "13.9", low=0, high=65535),
    _bool("InitialR2T", True, Result.OR, "13.10"),
    _bool("ImmediateData", True, Result.AND, "13.11"),
    _decl("MaxRecvDataSegmentLength", Sender.BOTH, "13.12", stages=_OP_FFP, default="8192",
          low=512, high=_MAX_24, scope=Scope.CONNECTION),
    _num("MaxBurstLength", 262144, 512, _MAX_24, Result.MIN, "13.13"),
    _num("FirstBurstLength", 65536, 512, _MAX_24, Result.MIN, "13.14"),
    _num("DefaultTime2Wait", 2, 0, 3600, Result.MAX, "13.15", disc=False),
    _num("DefaultTime2Retain", 20, 0, 3600, Result.MIN, "13.16", disc=False),
    _num("MaxOutstandingR2T", 1, 1, 65535, Result.MIN, "13.17"),
    _bool("DataPDUInOrder", True, Result.OR, "13.18"),
    _bool("DataSequenceInOrder", True, Result.OR, "13.19"),
    _num("ErrorRecoveryLevel", 0, 0, 2, Result.MIN, "13.20", disc=False),
    _decl("SessionType", Sender.INITIATOR, "13.21", default="Normal",
          values=("Normal", "Discovery"), lo=True),
    KeySpec("AuthMethod", KeyKind.LIST, Result.SELECT, "None",
            values=("CHAP", "None", "SRP", "KRB5"), stages=_SEC, scope=Scope.CONNECTION,
            section="12.1"),
    _auth("CHAP_A", Sender.BOTH),
    _auth("CHAP_I", Sender.BOTH),
    _auth("CHAP_C", Sender.BOTH),
    _auth("CHAP_N", Sender.BOTH),
    _auth("CHAP_R", Sender.BOTH),
    # RFC 7144 §13.1: level 1 is RFC 7143, level 2 adds RFC 7144 features.
    _num("iSCSIProtocolLevel", 1, 0, 31, Result.MIN, "RFC7144 13.1"),
    KeySpec("TaskReporting", KeyKind.LIST, Result.SELECT, "RFC3720",
            values=("RFC3720", "ResponseFence", "FastAbort"), leading_only=True,
            discovery_irrelevant=True, section="RFC7144 13.2"),
    _obsolete("OFMarker"),
    _obsolete("IFMarker"),
    _obsolete("OFMarkInt"),
    _obsolete("IFMarkInt"),
)

#: The key table, by wire name.
KEYS: Mapping[str, KeySpec] = {spec.name: spec for spec in _TABLE}
_ORDER = {spec.name: i for i, spec in enumerate(_TABLE)}

def _rank(key: str) -> tuple[int, int]:
    # Declarations first (SessionType decides what is Irrelevant), then the
    # table order (FirstBurstLength after what it depends on).
    spec = KEYS.get(key)
    if spec is None:
        return (2, 0)
    return (0 if spec.kind is KeyKind.DECLARATIVE else 1, _ORDER[key])


_DEC_RE = re.compile(r"[0-9]{1,20}\Z")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]{1,16}\Z")


def is_auth_key(name: str) -> bool:
    """True for keys of the authentication exchange (CHAP_*, and the SRP/KRB
    keys of methods we do not implement), which iscsi.chap handles."""
    spec = KEYS.get(name)
    if spec is not None:
        return spec.kind is KeyKind.AUTH
    return name.startswith(("SRP_", "KRB_"))


def parse_number(text: str) -> int | None:
    """Parse a numerical-value (decimal or 0x-hex, §6.1); None if malformed."""
    if _DEC_RE.match(text):
        return int(text)
    if _HEX_RE.match(text):
        return int(text, 16)
    return None


def _split_list(text: str) -> list[str]:
    return text.split(",")


def _validate_local(spec: KeySpec, value: str) -> None:
    """Raise ValueError when a configured value is not admissible for spec."""
    if spec.kind is KeyKind.NUMERIC or (spec.kind is KeyKind.DECLARATIVE and spec.high):
        n = parse_number(value)
        if n is None or not spec.low <= n <= spec.high:
            raise ValueError(f"{spec.name}={value!r}: expected {spec.low}..{spec.high}")
    elif spec.kind is KeyKind.BOOLEAN:
        if value not in ("Yes", "No"):
            raise ValueError(f"{spec.name}={value!r}: expected Yes or No")
    elif spec.kind is KeyKind.LIST:
        items = _split_list(value)
        bad = [v for v in items if v not in spec.values]
        if bad or not items:
            raise ValueError(f"{spec.name}={value!r}: values must be from {spec.values}")
    elif spec.kind is KeyKind.DECLARATIVE and spec.values:
        if value not in spec.values:
            raise ValueError(f"{spec.name}={value!r}: expected one of {spec.values}")
    elif spec.kind in (KeyKind.AUTH, KeyKind.OBSOLETE, KeyKind.SEND_TARGETS):
        raise ValueError(f"{spec.name} is not a negotiable key")


def _acceptable(spec: KeySpec, local: str | None, value: str) -> bool:
    """Whether ``value`` as a result satisfies our own setting ``local``."""
    if local is None:
        return True
    if spec.kind is KeyKind.LIST:
        return value in _split_list(local)
    if spec.kind is KeyKind.NUMERIC:
        ours, theirs = parse_number(local), parse_number(value)
        if ours is None or theirs is None:
            return False
        return theirs <= ours if spec.result is Result.MIN else theirs >= ours
    if spec.kind is KeyKind.BOOLEAN:
        if spec.result is Result.OR:
            return local == "No" or value == "Yes"
        return local == "Yes" or value == "No"
    return True


