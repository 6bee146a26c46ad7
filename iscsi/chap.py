"""CHAP authentication for iSCSI login (RFC 1994, RFC 7143 §12.1.3).

Exchange, in the security stage::

    I->T  CHAP_A=<A1,A2,...>                 algorithms, initiator's preference
    T->I  CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>   first of the list the target supports
    I->T  CHAP_N=<N> CHAP_R=<R> [CHAP_I=<I> CHAP_C=<C>]   (+ mutual challenge)
    T->I  [CHAP_N=<N> CHAP_R=<R>]            (mutual only)

R = H(I as one byte || secret || C).  CHAP_A numbers are the IANA PPP
authentication algorithm values: 5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256.
CHAP_C and CHAP_R are large-binary values, hex (``0x``) or base64 (``0b``)
encoded (RFC 7143 §6.1); both are accepted.

Sans-I/O: the objects below take received keys and return keys to send.
Randomness comes from :mod:`secrets` but can be injected for tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from .errors import AuthenticationError

Pair = tuple[str, str]
RandomBytes = Callable[[int], bytes]

#: RFC 7143 §12.1.3: CHAP secrets should be at least 96 bits.
MIN_SECRET_LENGTH = 12
#: Received challenges shorter than this are refused as too weak.
MIN_CHALLENGE_LENGTH = 8
#: RFC 7143 §12.1.3 bounds a CHAP challenge at 1024 bytes.
MAX_CHALLENGE_LENGTH = 1024


class ChapAlgorithm(IntEnum):
    """CHAP_A values (IANA "PPP Authentication Algorithms")."""

    MD5 = 5
    SHA1 = 6
    SHA256 = 7
    SHA3_256 = 8

    @property
    def hash_name(self) -> str:
        """The :mod:`hashlib` name of the digest."""
        return _HASHES[self]

    @property
    def digest_size(self) -> int:
        """Length in bytes of a response."""
        return hashlib.new(self.hash_name).digest_size


_HASHES = {
    ChapAlgorithm.MD5: "md5",
    ChapAlgorithm.SHA1: "sha1",
    ChapAlgorithm.SHA256: "sha256",
    ChapAlgorithm.SHA3_256: "sha3_256",
}

#: Strongest first: what we offer as initiator and accept as target.
DEFAULT_ALGORITHMS: tuple[ChapAlgorithm, ...] = (
    ChapAlgorithm.SHA3_256,
    ChapAlgorithm.SHA256,
    ChapAlgorithm.SHA1,
    ChapAlgorithm.MD5,
)


def chap_response(alg: ChapAlgorithm, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: H(Identifier || secret || Challenge)."""
    h = hashlib.new(alg.hash_name)
    h.update(bytes((identifier,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def encode_binary(data: bytes, encoding: str = "hex") -> str:
    """Encode a large-binary value: ``"hex"`` -> ``0x...``, ``"base64"`` -> ``0b...``."""
    if encoding == "hex":
        return "0x" + data.hex()
    if encoding == "base64":
        return "0b" + base64.b64encode(data).decode("ascii")
    raise ValueError(f"unknown binary encoding {encoding!r}")


def decode_binary(text: str, what: str = "value") -> bytes:
    """Decode a hex (``0x``) or base64 (``0b``) binary value (§6.1).

    Raises :class:`AuthenticationError` for anything else, because these
    values only travel in the authentication exchange.
    """
    prefix, body = text[:2], text[2:]
    try:
        if prefix in ("0x", "0X"):
            if len(body) % 2:
                body = "0" + body  # an odd digit count has an implied leading 0
            if not body:
                raise ValueError("empty")
            return bytes.fromhex(body)
        if prefix in ("0b", "0B"):
            if not body:
                raise ValueError("empty")
            return base64.b64decode(body.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise AuthenticationError(f"CHAP {what} is not valid {prefix} binary") from None
    raise AuthenticationError(f"CHAP {what} lacks a 0x or 0b prefix")


_SMALL_DEC = re.compile(r"[0-9]{1,3}\Z")
_SMALL_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,2}\Z")


def _small_int(text: str) -> int | None:
    # Regexes, not str.isdigit(): that accepts e.g. superscript digits
    # which int() then refuses.
    if _SMALL_DEC.match(text):
        return int(text)
    if _SMALL_HEX.match(text):
        return int(text, 16)
    return None


def _parse_identifier(text: str) -> int:
    n = _small_int(text)
    if n is None or n > 255:
        raise AuthenticationError(f"CHAP_I={text[:20]!r} is not a number 0..255")
    return n


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and secret.

    With ``refuse_short_secrets`` (default) a secret shorter than 12 bytes
    (96 bits, RFC 7143 §12.1.3) is refused at configuration time.
    """

    user: str
    secret: bytes | str
    refuse_short_secrets: bool = True

    def __post_init__(self) -> None:
        if not self.user:
            raise ValueError("CHAP user name is empty")
        if not isinstance(self.secret, (bytes, str)):
            raise TypeError("CHAP secret must be bytes or str")
        if not self.secret:
            raise ValueError("CHAP secret is empty")
        if self.refuse_short_secrets and len(self.key) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"CHAP secret is {len(self.key)} bytes; RFC 7143 §12.1.3 wants "
                f"at least {MIN_SECRET_LENGTH} (96 bits)"
            )

    @property
    def key(self) -> bytes:
        """The secret as bytes (a str secret is taken as UTF-8)."""
        return self.secret.encode("utf-8") if isinstance(self.secret, str) else self.secret

    def __repr__(self) -> str:
        # Never print the secret into logs.
        return f"ChapCredentials(user={self.user!r}, secret=<{len(self.key)} bytes>)"


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _challenge(rng: RandomBytes, alg: ChapAlgorithm, length: int | None) -> tuple[int, bytes]:
    n = length if length is not None else max(16, alg.digest_size)
    raw = rng(n + 1)
    return raw[0], raw[1:]


def _one(keys: Mapping[str, str], name: str) -> str:
    value = keys.get(name)
    if value is None:
        raise AuthenticationError(f"{name} missing from the CHAP exchange")
    return value


def _check_challenge(challenge: bytes) -> None:
    if not MIN_CHALLENGE_LENGTH <= len(challenge) <= MAX_CHALLENGE_LENGTH:
        raise AuthenticationError(
            f"CHAP challenge of {len(challenge)} bytes is outside "
            f"{MIN_CHALLENGE_LENGTH}..{MAX_CHALLENGE_LENGTH}"
        )


class ChapTarget:
    """The target's side of CHAP.

    Args:
        incoming: the name and secret the initiator must prove.
        outgoing: the target's own name and secret, for mutual CHAP; when
            None, an initiator asking for mutual CHAP fails.
        algorithms: the CHAP_A values we accept (the initiator's order wins).
        require_mutual: fail unless the initiator also challenges us.
        encoding: "hex" or "base64" for the values we send.
        rng: ``n -> n random bytes`` (default :func:`secrets.token_bytes`).
        challenge_length: bytes of challenge (default max(16, digest size)).
    """

    def __init__(self, incoming: ChapCredentials, outgoing: ChapCredentials | None = None, *,
                 algorithms: Sequence[int] = DEFAULT_ALGORITHMS, require_mutual: bool = False,
                 encoding: str = "hex", rng: RandomBytes = secrets.token_bytes,
                 challenge_length: int | None = None) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        self.algorithms = tuple(ChapAlgorithm(a) for a in algorithms)
        self.require_mutual = require_mutual
        self.encoding = encoding
        self._rng = rng
        self._challenge_length = challenge_length
        self.algorithm: ChapAlgorithm | None = None
        self._identifier = 0
        self._challenge = b""
        self.authenticated = False
        self.mutual = False

    @property
    def complete(self) -> bool:
        """True once the initiator proved its identity (and we ours, if asked)."""
        return self.authenticated

    @property
    def progress(self) -> str:
        """How far the exchange got, for a log line about an abandoned login."""
        if self.authenticated:
            return ("CHAP done, mutual CHAP response sent" if self.mutual
                    else "CHAP done")
        if self.algorithm is not None:
            return "CHAP challenge sent, no response yet"
        return "CHAP not started"

    def receive(self, keys: Mapping[str, str]) -> list[Pair]:
        """Handle the CHAP keys of one initiator request; return ours.

        Raises :class:`AuthenticationError` (status 0x0201) on any failure.
        """
        if self.authenticated:
            if keys:
                raise AuthenticationError("CHAP keys after authentication completed")
            return []
        if self.algorithm is None:
            return self._select(keys)
        return self._verify(keys)

    def _select(self, keys: Mapping[str, str]) -> list[Pair]:
        if set(keys) - {"CHAP_A"}:
            raise AuthenticationError(f"unexpected keys before CHAP_A: {sorted(keys)}")
        offered = _one(keys, "CHAP_A").split(",")
        for item in offered:
            # The first algorithm of the initiator's list that we support.
            n = _small_int(item)
            if n is not None and n in self.algorithms:
                self.algorithm = ChapAlgorithm(n)
                break
        else:
            raise AuthenticationError(f"no supported CHAP algorithm in CHAP_A={keys['CHAP_A']}")
        self._identifier, self._challenge = _challenge(self._rng, self.algorithm,
                                                       self._challenge_length)
        return [
            ("CHAP_A", str(int(self.algorithm))),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", encode_binary(self._challenge, self.encoding)),
        ]

    def _verify(self, keys: Mapping[str, str]) -> list[Pair]:
        alg = self.algorithm
        assert alg is not None
        extra = set(keys) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if extra:
            raise AuthenticationError(f"unexpected CHAP keys {sorted(extra)}")
        name = _one(keys, "CHAP_N")
        response = decode_binary(_one(keys, "CHAP_R"), "CHAP_R")
        if len(response) != alg.digest_size:
            raise AuthenticationError(
                f"CHAP_R is {len(response)} bytes, {alg.name} gives {alg.digest_size}"
            )
        expected = chap_response(alg, self._identifier, self.incoming.key, self._challenge)
        # Compare both name and response in constant time and only then decide,
        # so a wrong name is not distinguishable by timing.
        name_ok = _equal(name.encode("utf-8"), self.incoming.user.encode("utf-8"))
        resp_ok = _equal(response, expected)
        if not (name_ok and resp_ok):
            raise AuthenticationError("CHAP authentication of the initiator failed")
        wants_mutual = "CHAP_I" in keys or "CHAP_C" in keys
        if not wants_mutual:
            if self.require_mutual:
                raise AuthenticationError("mutual CHAP required but the initiator sent no challenge")
            self.authenticated = True
            return []
        if self.outgoing is None:
            raise AuthenticationError("initiator asked for mutual CHAP; no target secret configured")
        ident = _parse_identifier(_one(keys, "CHAP_I"))
        challenge = decode_binary(_one(keys, "CHAP_C"), "CHAP_C")
        _check_challenge(challenge)
        # §12.1.3: an originator MUST NOT reuse the responder's challenge for
        # the other direction; the responder MUST check (reflection attack).
        if _equal(challenge, self._challenge):
            raise AuthenticationError("initiator reflected the target's CHAP challenge")
        self.authenticated = True
        self.mutual = True
        answer = chap_response(alg, ident, self.outgoing.key, challenge)
        return [("CHAP_N", self.outgoing.user), ("CHAP_R", encode_binary(answer, self.encoding))]


class ChapInitiator:
    """The initiator's side of CHAP.

    Args:
        credentials: our name and secret.
        target: the name and secret the target must prove (mutual CHAP), or
            None for one-way CHAP.
        algorithms: CHAP_A values offered, in preference order.
        encoding, rng, challenge_length: as for :class:`ChapTarget`.
    """

    def __init__(self, credentials: ChapCredentials, target: ChapCredentials | None = None, *,
                 algorithms: Iterable[int] = DEFAULT_ALGORITHMS, encoding: str = "hex",
                 rng: RandomBytes = secrets.token_bytes,
                 challenge_length: int | None = None) -> None:
        self.credentials = credentials
        self.target = target
        self.algorithms = tuple(ChapAlgorithm(a) for a in algorithms)
        if not self.algorithms:
            raise ValueError("no CHAP algorithm to offer")
        self.encoding = encoding
        self._rng = rng
        self._challenge_length = challenge_length
        self.algorithm: ChapAlgorithm | None = None
        self._identifier = 0
        self._challenge = b""
        self._state = "start"

    @property
    def complete(self) -> bool:
        """True when we sent our response (one-way) or verified the target's."""
        return self._state == "done"

    @property
    def awaiting_challenge(self) -> bool:
        """True after our CHAP_A offer, before the target's challenge: a
        refusal now means it accepts none of the algorithms offered."""
        return self._state == "offered"

    @property
    def awaiting_target_proof(self) -> bool:
        """True between sending our mutual challenge and checking the answer."""
        return self._state == "mutual"

    def start(self) -> list[Pair]:
        """The first CHAP keys: our algorithm list."""
        self._state = "offered"
        return [("CHAP_A", ",".join(str(int(a)) for a in self.algorithms))]

    def receive(self, keys: Mapping[str, str]) -> list[Pair]:
        """Handle the target's CHAP keys; return ours.

        Raises :class:`AuthenticationError` when the target picks an
        algorithm we did not offer, sends malformed values, or fails to prove
        itself in mutual CHAP.
        """
        if self._state == "offered":
            return self._respond(keys)
        if self._state == "mutual":
            self._check_target(keys)
            return []
        if keys:
            raise AuthenticationError(f"unexpected CHAP keys {sorted(keys)} in state {self._state}")
        return []

    def _respond(self, keys: Mapping[str, str]) -> list[Pair]:
        raw_alg = _one(keys, "CHAP_A")
        n = _small_int(raw_alg)
        if n is None or n not in self.algorithms:
            raise AuthenticationError(f"target chose CHAP_A={raw_alg[:20]} which we did not offer")
        alg = self.algorithm = ChapAlgorithm(n)
        ident = _parse_identifier(_one(keys, "CHAP_I"))
        challenge = decode_binary(_one(keys, "CHAP_C"), "CHAP_C")
        _check_challenge(challenge)
        answer = chap_response(alg, ident, self.credentials.key, challenge)
        out: list[Pair] = [
            ("CHAP_N", self.credentials.user),
            ("CHAP_R", encode_binary(answer, self.encoding)),
        ]
        if self.target is None:
            self._state = "done"
            return out
        for _ in range(4):
            self._identifier, self._challenge = _challenge(self._rng, alg, self._challenge_length)
            # Never send the target its own challenge back (§12.1.3).
            if self._challenge != challenge:
                break
        else:
            raise AuthenticationError("cannot make a challenge different from the target's")
        out.append(("CHAP_I", str(self._identifier)))
        out.append(("CHAP_C", encode_binary(self._challenge, self.encoding)))
        self._state = "mutual"
        return out

    def _check_target(self, keys: Mapping[str, str]) -> None:
        target = self.target
        alg = self.algorithm
        assert target is not None and alg is not None
        name = _one(keys, "CHAP_N")
        response = decode_binary(_one(keys, "CHAP_R"), "CHAP_R")
        expected = chap_response(alg, self._identifier, target.key, self._challenge)
        name_ok = _equal(name.encode("utf-8"), target.user.encode("utf-8"))
        resp_ok = len(response) == alg.digest_size and _equal(response, expected)
        if not (name_ok and resp_ok):
            raise AuthenticationError("mutual CHAP: the target failed to authenticate")
        self._state = "done"
