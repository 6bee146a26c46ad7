"""The iSCSI key table and the one negotiation engine it drives.

RFC 7143 §13 (and RFC 7144 §13 for iSCSIProtocolLevel/TaskReporting) defines
every login/text key by a handful of properties: when it may be used (Use:
LO/IO/ALL/FFPO), who may send it, its scope, its value type and its
"result function".  Those properties are data in :data:`KEYS`; there is one
:class:`Negotiator` that plays either role and consults the table, never one
function per key (DESIGN.md).

Negotiation outline (RFC 7143 §6.2):

* the originator offers ``key=value``; the responder answers ``key=result``
  or one of the constants ``Reject``, ``Irrelevant``, ``NotUnderstood``;
* list keys: the responder picks the first offered value it supports, in the
  originator's order;
* numerical keys: result is the minimum (or maximum) of offer and the
  responder's own value;
* boolean keys: result is the AND (or OR) of both;
* declarative keys (names, aliases, MaxRecvDataSegmentLength, ...) are not
  answered: each side states its own value;
* a key may be offered only once per negotiation (§6.2), keys have a stage
  (security vs operational) and leading-only keys may appear only on the
  leading login of a session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .constants import LoginStatus, Stage
from .errors import NegotiationError
from .key_table import (
    IRRELEVANT,
    KEYS,
    NOT_UNDERSTOOD,
    REJECT,
    SPECIAL_VALUES,
    KeyKind,
    KeySpec,
    Pair,
    Result,
    Role,
    Scope,
    Sender,
    _TABLE,
    _acceptable,
    _rank,
    _split_list,
    _validate_local,
    is_auth_key,
    parse_number,
)

@dataclass(frozen=True, slots=True)
class NegotiatedParams:
    """The operational parameters in force after login (RFC 7143 §13).

    ``max_recv_data_segment_length`` is the limit we declared for what we
    receive; ``max_xmit_data_segment_length`` is the peer's declared limit,
    which bounds every data segment we send (§13.12).
    """

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192
    max_xmit_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    max_connections: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    session_type: str = "Normal"
    target_name: str | None = None
    initiator_name: str | None = None
    target_alias: str | None = None
    initiator_alias: str | None = None
    target_portal_group_tag: int | None = None
    iscsi_protocol_level: int = 1
    task_reporting: str = "RFC3720"

    @property
    def discovery(self) -> bool:
        """True for a Discovery session."""
        return self.session_type == "Discovery"

    def __str__(self) -> str:
        """One log line: ``name=value`` for every field."""
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


# Which NegotiatedParams field each negotiated/declared key feeds, and how.
_BOOL_FIELDS = {
    "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data",
    "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
}
_INT_FIELDS = {
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "MaxConnections": "max_connections",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "ErrorRecoveryLevel": "error_recovery_level",
    "TargetPortalGroupTag": "target_portal_group_tag",
    "iSCSIProtocolLevel": "iscsi_protocol_level",
}
_STR_FIELDS = {
    "SessionType": "session_type",
    "TargetName": "target_name",
    "InitiatorName": "initiator_name",
    "TargetAlias": "target_alias",
    "InitiatorAlias": "initiator_alias",
    "TaskReporting": "task_reporting",
}


class Negotiator:
    """Key negotiation for one connection's login (or one FFP text exchange).

    Args:
        role: which end we are.
        local: our settings, ``{key: value}`` in wire syntax.  For list keys,
            the acceptable values in preference order (``"CRC32C,None"``);
            for numerical keys our limit (what min/max combines with); for
            booleans our preference; for declarative keys what we declare.
            A key absent from ``local`` accepts whatever the peer offers.
        leading: True on the leading login of a session (TSIH 0), which is
            the only place leading-only keys may appear.

    The initiator offers every negotiable key of ``local`` (:meth:`offers`);
    the target offers only declarations, plus, when asked with
    :meth:`unresolved_offers`, keys whose RFC default it cannot live with and
    that the initiator did not bring up.  :meth:`respond` handles what the
    peer sent: answers to our offers and the peer's own offers, returning our
    answers.  Errors raise :class:`NegotiationError` with the login status
    the target should answer with (for an initiator: drop the connection).
    """

    def __init__(self, role: Role, local: Mapping[str, str] | None = None, *,
                 leading: bool = True) -> None:
        self.role = role
        self.leading = leading
        self.local: dict[str, str] = {}
        for key, value in (local or {}).items():
            spec = KEYS.get(key)
            if spec is None:
                raise ValueError(f"unknown iSCSI key {key!r}")
            _validate_local(spec, value)
            self.local[key] = value
        self._values: dict[str, str] = {}  # agreed results and declarations
        self._peer_mrdsl: int | None = None
        self._pending: dict[str, str] = {}  # our offers awaiting an answer
        self._sent: set[str] = set()  # keys we offered or declared
        self._received: set[str] = set()  # keys the peer offered or declared
        self.not_understood: list[str] = []  # peer keys we answered NotUnderstood

    # ------------------------------------------------------------------ state

    @property
    def session_type(self) -> str:
        """"Normal" or "Discovery", as declared so far."""
        return self._values.get("SessionType", self.local.get("SessionType", "Normal"))

    @property
    def discovery(self) -> bool:
        """True once the session is known to be a Discovery session."""
        return self.session_type == "Discovery"

    @property
    def pending(self) -> frozenset[str]:
        """Keys we offered that the peer has not answered yet."""
        return frozenset(self._pending)

    def value(self, key: str) -> str | None:
        """The agreed (or declared) value of ``key`` so far, if any."""
        return self._values.get(key)

    def new_exchange(self) -> None:
        """Start a new FFP text negotiation: keys may be offered afresh."""
        self._sent.clear()
        self._received.clear()
        self._pending.clear()

    # ------------------------------------------------------------ offering

    def _offerable(self, spec: KeySpec, stage: Stage) -> bool:
        if stage not in spec.stages or not spec.may_send(self.role):
            return False
        if spec.leading_only and not self.leading:
            return False
        if self.discovery and spec.discovery_irrelevant:
            return False
        if spec.name == "FirstBurstLength" and self._first_burst_irrelevant():
            return False
        if spec.kind is KeyKind.DECLARATIVE:
            # Each side declares its own value (e.g. MaxRecvDataSegmentLength
            # per direction, §13.12), whatever the peer declared.
            return spec.name not in self._sent
        return spec.name not in self._sent and spec.name not in self._received

    def offers(self, stage: Stage) -> list[Pair]:
        """Our offers and declarations for ``stage`` not yet sent.

        Initiator: every key of ``local`` allowed in the stage.  Target: its
        declarations only (negotiable keys are answered, not offered).
        """
        out: list[Pair] = []
        for spec in _TABLE:
            value = self.local.get(spec.name)
            if value is None or not self._offerable(spec, stage):
                continue
            if spec.kind is KeyKind.DECLARATIVE:
                self._declare(spec, value)
            elif self.role is Role.INITIATOR:
                self._pending[spec.name] = value
            else:
                continue
            self._sent.add(spec.name)
            out.append((spec.name, value))
        return out

    def unresolved_offers(self, stage: Stage, *, dry_run: bool = False) -> list[Pair]:
        """Offers for keys nobody raised whose RFC default we cannot accept.

        A target calls this before it agrees to leave the operational stage:
        e.g. a target that demands ``HeaderDigest=CRC32C`` must offer it if
        the initiator never did, or the default None would silently apply.
        With ``dry_run`` nothing is recorded as offered.
        """
        out: list[Pair] = []
        for spec in _TABLE:
            value = self.local.get(spec.name)
            if value is None or spec.kind not in (KeyKind.LIST, KeyKind.NUMERIC, KeyKind.BOOLEAN):
                continue
            if not self._offerable(spec, stage) or spec.default is None:
                continue
            if _acceptable(spec, value, spec.default) or spec.name in self._values:
                continue
            out.append((spec.name, value))
            if dry_run:
                continue
            self._pending[spec.name] = value
            self._sent.add(spec.name)
        return out

    def _declare(self, spec: KeySpec, value: str) -> None:
        if spec.name != "MaxRecvDataSegmentLength":
            self._values[spec.name] = value

    # ---------------------------------------------------------- responding

    def respond(self, pairs: Iterable[Pair], stage: Stage) -> list[Pair]:
        """Handle the keys the peer sent in ``stage``; return our answers.

        Answers keep the order in which the keys arrived; keys are resolved in
        table order so that FirstBurstLength sees the InitialR2T,
        ImmediateData and MaxBurstLength of the same PDU (§13.14).
        """
        items = [(k, v) for k, v in pairs if not self._repeated_declaration(k, v)]
        seen: set[str] = set()
        for key, _ in items:
            if key in seen or key in self._received:
                raise NegotiationError(f"key {key} sent twice in one negotiation (RFC 7143 §6.2)")
            seen.add(key)
        order = sorted(range(len(items)), key=lambda i: _rank(items[i][0]))
        answers: dict[int, Pair] = {}
        for i in order:
            key, value = items[i]
            answer = self._handle(key, value, stage)
            if answer is not None:
                answers[i] = (key, answer)
        return [answers[i] for i in sorted(answers)]

    def _repeated_declaration(self, key: str, value: str) -> bool:
        """True for a declaration repeated with the value already declared.

        Interoperability: libiscsi re-sends InitiatorName, TargetName and
        SessionType in every operational-stage PDU after the security stage.
        Repeating the same declaration changes nothing, so it is ignored;
        a *different* value is still the §6.2 error.
        """
        spec = KEYS.get(key)
        if spec is None or spec.kind is not KeyKind.DECLARATIVE or key not in self._received:
            return False
        if key == "MaxRecvDataSegmentLength":
            return parse_number(value) == self._peer_mrdsl
        return self._values.get(key) == value

    def _handle(self, key: str, value: str, stage: Stage) -> str | None:
        spec = KEYS.get(key)
        if key in self._pending:
            assert spec is not None  # we only ever offer table keys
            self._take_answer(spec, value)
            return None
        if value in SPECIAL_VALUES:
            # An answer to nothing we asked (e.g. to a declaration): §6.2
            # forbids answering an answer, so note it and move on.
            return None
        if spec is not None and spec.leading_only and not self.leading \
                and self.role is Role.INITIATOR:
            # A target sending a leading-only key on a connection joining
            # the session (tgt repeats MaxConnections in every response of
            # such a login): the session's value stands; the key is ignored
            # rather than failing the login (a target receiving one still
            # refuses it, §13).
            return None
        self._received.add(key)
        if spec is None:
            # §6.2 / §13.5.x: unknown keys, including X- and X# extension
            # keys we do not implement, are answered NotUnderstood.
            self.not_understood.append(key)
            return NOT_UNDERSTOOD
        self._check_allowed(spec, stage)
        if spec.kind is KeyKind.OBSOLETE:
            # §13.26: OF/IFMarker SHOULD and OF/IFMarkInt MUST get Reject.
            return REJECT
        if spec.kind is KeyKind.DECLARATIVE:
            return self._take_declaration(spec, value)
        if self.discovery and spec.discovery_irrelevant:
            return IRRELEVANT
        if spec.name == "FirstBurstLength" and self._first_burst_irrelevant():
            return IRRELEVANT
        return self._answer(spec, value)

    def _check_allowed(self, spec: KeySpec, stage: Stage) -> None:
        peer = Role.TARGET if self.role is Role.INITIATOR else Role.INITIATOR
        if not spec.may_send(peer):
            raise NegotiationError(f"{spec.name} may not be sent by the {peer.value}")
        if stage not in spec.stages:
            where = {Stage.SECURITY_NEGOTIATION: "security stage",
                     Stage.LOGIN_OPERATIONAL_NEGOTIATION: "operational stage",
                     Stage.FULL_FEATURE_PHASE: "full feature phase"}[stage]
            raise NegotiationError(
                f"{spec.name} is not allowed in the {where} (RFC 7143 §{spec.section})",
                LoginStatus.INITIATOR_ERROR,
            )
        if spec.leading_only and not self.leading:
            raise NegotiationError(
                f"{spec.name} is leading-only and this is not a leading login (§13)"
            )

    def _take_declaration(self, spec: KeySpec, value: str) -> str | None:
        if spec.high:
            n = parse_number(value)
            if n is None or not spec.low <= n <= spec.high:
                return REJECT
            if spec.name == "MaxRecvDataSegmentLength":
                self._peer_mrdsl = n
                return None
        if spec.values and value not in spec.values:
            if spec.name == "SessionType":
                raise NegotiationError(
                    f"SessionType={value!r} is not supported",
                    LoginStatus.SESSION_TYPE_NOT_SUPPORTED,
                )
            return REJECT
        if not value and spec.name in ("InitiatorName", "TargetName"):
            raise NegotiationError(f"{spec.name} is empty", LoginStatus.MISSING_PARAMETER)
        self._values[spec.name] = value
        return None

    def _answer(self, spec: KeySpec, offer: str) -> str:
        """Compute the responder's result for a peer offer (§6.2).

        Answering Reject leaves the RFC default in force; when our own
        setting cannot accept that default the negotiation has failed.
        """
        answer = self._compute(spec, offer)
        local = self.local.get(spec.name)
        if answer == REJECT and spec.default is not None and not _acceptable(
            spec, local, spec.default
        ):
            status = (LoginStatus.AUTHENTICATION_FAILURE if spec.name == "AuthMethod"
                      else LoginStatus.INITIATOR_ERROR)
            raise NegotiationError(
                f"cannot agree on {spec.name}: offered {offer!r}, we accept {local!r}", status
            )
        return answer

    def _compute(self, spec: KeySpec, offer: str) -> str:
        local = self.local.get(spec.name)
        if spec.kind is KeyKind.LIST:
            acceptable = _split_list(local) if local is not None else list(spec.values)
            for candidate in _split_list(offer):
                # First in the *offerer's* order that we support (§6.2.1).
                if candidate in acceptable and candidate in spec.values:
                    self._values[spec.name] = candidate
                    return candidate
            return REJECT
        if spec.kind is KeyKind.NUMERIC:
            n = parse_number(offer)
            if n is None or not spec.low <= n <= spec.high:
                return REJECT
            ours = parse_number(local) if local is not None else None
            if ours is not None:
                n = min(n, ours) if spec.result is Result.MIN else max(n, ours)
            if spec.name == "FirstBurstLength":
                # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
                n = min(n, self._int("MaxBurstLength"))
            self._values[spec.name] = str(n)
            return str(n)
        if spec.kind is KeyKind.BOOLEAN:
            if offer not in ("Yes", "No"):
                return REJECT
            if local is None:
                result = offer
            elif spec.result is Result.OR:
                result = "Yes" if "Yes" in (offer, local) else "No"
            else:
                result = "Yes" if offer == local == "Yes" else "No"
            self._values[spec.name] = result
            return result
        if spec.kind is KeyKind.AUTH:
            raise NegotiationError(f"{spec.name} outside the authentication exchange")
        # SEND_TARGETS never reaches here during login (stage check); in FFP
        # the session layer answers it.
        return REJECT

    def _take_answer(self, spec: KeySpec, answer: str) -> None:
        """Check the peer's answer to our offer and record the result."""
        offer = self._pending.pop(spec.name)
        local = self.local.get(spec.name)
        if answer in (REJECT, NOT_UNDERSTOOD, IRRELEVANT):
            # The RFC default stays in force; fail if we cannot live with it.
            default = spec.default
            if (answer != IRRELEVANT and default is not None
                    and not _acceptable(spec, local, default)):
                raise NegotiationError(
                    f"peer answered {spec.name}={answer} and the default {default} "
                    f"is not acceptable"
                )
            return
        ok = False
        if spec.kind is KeyKind.LIST:
            ok = answer in _split_list(offer)
        elif spec.kind is KeyKind.NUMERIC:
            n, o = parse_number(answer), parse_number(offer)
            if n is not None and o is not None and spec.low <= n <= spec.high:
                ok = n <= o if spec.result is Result.MIN else n >= o
        elif spec.kind is KeyKind.BOOLEAN and answer in ("Yes", "No"):
            if spec.result is Result.OR:
                ok = offer == "No" or answer == "Yes"
            else:
                ok = offer == "Yes" or answer == "No"
        if not ok:
            raise NegotiationError(
                f"inadmissible answer {spec.name}={answer!r} to our offer {offer!r} (§6.2)"
            )
        self._values[spec.name] = answer

    def finish(self) -> None:
        """Close the negotiation: settle offers the peer never answered.

        §6.2.1/§6.2.2: a responder may omit the answer to a boolean whose
        result the offer alone decides (OR with Yes, AND with No); for any
        other unanswered offer the default stays, if we can accept it.
        """
        for key, offer in list(self._pending.items()):
            spec = KEYS[key]
            del self._pending[key]
            decided = (spec.result is Result.OR and offer == "Yes") or (
                spec.result is Result.AND and offer == "No"
            )
            if spec.kind is KeyKind.BOOLEAN and decided:
                self._values[key] = offer
            elif spec.default is not None and not _acceptable(spec, self.local.get(key),
                                                              spec.default):
                raise NegotiationError(f"{key} was never answered and its default is unacceptable")

    # ------------------------------------------------------------- results

    def _int(self, key: str) -> int:
        raw = self._values.get(key)
        if raw is None:
            raw = KEYS[key].default
        n = parse_number(raw) if raw is not None else None
        return n if n is not None else 0

    def _first_burst_irrelevant(self) -> bool:
        # §13.14: irrelevant when InitialR2T=Yes and ImmediateData=No.
        r2t = self._values.get("InitialR2T", "Yes")
        imm = self._values.get("ImmediateData", "Yes")
        return r2t == "Yes" and imm == "No"

    def params(self) -> NegotiatedParams:
        """The parameters in force, RFC defaults where nothing was agreed."""
        kw: dict[str, object] = {}
        for key, name in _BOOL_FIELDS.items():
            kw[name] = self._values.get(key, KEYS[key].default) == "Yes"
        for key, name in _INT_FIELDS.items():
            if key in self._values or KEYS[key].default is not None:
                kw[name] = self._int(key)
        for key, name in _STR_FIELDS.items():
            if key in self._values:
                kw[name] = self._values[key]
        kw["header_digest"] = self._values.get("HeaderDigest") == "CRC32C"
        kw["data_digest"] = self._values.get("DataDigest") == "CRC32C"
        own = self.local.get("MaxRecvDataSegmentLength")
        own_n = parse_number(own) if own is not None else None
        kw["max_recv_data_segment_length"] = own_n if own_n is not None else 8192
        kw["max_xmit_data_segment_length"] = self._peer_mrdsl or 8192
        # §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength, even when
        # only one of them was negotiated down from its default.
        kw["first_burst_length"] = min(int(str(kw["first_burst_length"])),
                                       int(str(kw["max_burst_length"])))
        return NegotiatedParams(**kw)  # type: ignore[arg-type]


# The table's names stay importable from here, where callers have always
# found them.
__all__ = [
    "IRRELEVANT",
    "KEYS",
    "NOT_UNDERSTOOD",
    "REJECT",
    "SPECIAL_VALUES",
    "KeyKind",
    "KeySpec",
    "NegotiatedParams",
    "Negotiator",
    "Pair",
    "Result",
    "Role",
    "Scope",
    "Sender",
    "is_auth_key",
    "parse_number",
]
