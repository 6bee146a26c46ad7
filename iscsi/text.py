"""The key=value text format of Login and Text PDUs (RFC 7143 §6.1, §11.10.2).

A text data segment is a sequence of ``key=value`` pairs, each ended by one NUL
byte.  Order and duplicates are preserved on decode, because the negotiator
must see a key that is offered twice (RFC 7143 §6.2: a key negotiated more
than once in a login is an error) and because answers are given in order.

Long texts travel in several PDUs with the C (continue) bit set on all but the
last; :class:`TextAssembler` collects them behind a size cap so a peer cannot
make us buffer without bound, and :func:`split_text` cuts our own text to the
peer's MaxRecvDataSegmentLength.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import TextError

#: RFC 7143 §6.1: key names are at most 63 bytes.
MAX_KEY_LENGTH = 63
#: RFC 7143 §6.1: a simple value is at most 255 bytes unless a key says more.
MAX_VALUE_LENGTH = 255
#: Largest encoded large-binary value we accept: 8192 bytes of binary as
#: ``0x`` + hex digits (the longest of the RFC 7143 §6.1 encodings).
MAX_LARGE_VALUE_LENGTH = 2 + 2 * 8192
#: Keys whose values are large-binary-values (RFC 7143 §12.1-§12.1.3).
LARGE_VALUE_KEYS = frozenset(
    {
        "CHAP_C",
        "CHAP_R",
        "SRP_s",
        "SRP_A",
        "SRP_B",
        "SRP_M",
        "SRP_HM",
        "KRB_AP_REQ",
        "KRB_AP_REP",
    }
)
#: Default cap on one assembled (possibly multi-PDU) text (§6.1 requires at
#: least 8192 bytes be accepted; 64 KiB leaves room for large CHAP values).
DEFAULT_TEXT_CAP = 64 * 1024

# RFC 7143 §6.1 standard-label: letters, digits and . - + @ _ ; we also let
# '#' through for the public extension keys "X#..." (§13.5.4 / RFC 4850).
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9.\-+@_#]{0,62}\Z")

Pair = tuple[str, str]


def _value_limit(key: str) -> int:
    return MAX_LARGE_VALUE_LENGTH if key in LARGE_VALUE_KEYS else MAX_VALUE_LENGTH


def check_key(key: str) -> None:
    """Raise :class:`TextError` unless ``key`` is a legal key name (§6.1)."""
    if not key:
        raise TextError("text key is empty")
    if len(key.encode("utf-8")) > MAX_KEY_LENGTH:
        raise TextError(f"text key longer than {MAX_KEY_LENGTH} bytes: {key[:70]!r}")
    if _KEY_RE.match(key) is None:
        raise TextError(f"text key has illegal characters: {key!r}")


def encode_text(pairs: Iterable[Pair]) -> bytes:
    """Encode ``pairs`` as ``key=value\\0`` records, in order.

    Raises :class:`TextError` for an illegal key, a value containing NUL, or a
    value longer than the key allows.
    """
    out: list[bytes] = []
    for key, value in pairs:
        check_key(key)
        raw = value.encode("utf-8")
        if b"\0" in raw:
            raise TextError(f"value of {key} contains a NUL byte")
        if len(raw) > _value_limit(key):
            raise TextError(f"value of {key} is {len(raw)} bytes, over {_value_limit(key)}")
        out.append(key.encode("ascii") + b"=" + raw + b"\0")
    return b"".join(out)


def decode_text(data: bytes | bytearray | memoryview) -> list[Pair]:
    """Decode a whole text (all continuation segments joined) into pairs.

    An empty text decodes to ``[]``.  Raises :class:`TextError` when the text
    does not end with NUL, a record has no ``=``, a key is empty, too long or
    has illegal characters, a value is too long, or the bytes are not UTF-8.
    """
    raw = bytes(data)
    if not raw:
        return []
    if raw[-1] != 0:
        raise TextError("text does not end with a NUL byte")
    pairs: list[Pair] = []
    # The final split element is the empty string after the last NUL.
    for record in raw[:-1].split(b"\0"):
        eq = record.find(b"=")
        if eq < 0:
            raise TextError(f"text record without '=': {record[:70]!r}")
        try:
            key = record[:eq].decode("ascii")
        except UnicodeDecodeError:
            raise TextError(f"text key is not ASCII: {record[:eq][:70]!r}") from None
        check_key(key)
        raw_value = record[eq + 1 :]
        if len(raw_value) > _value_limit(key):
            raise TextError(
                f"value of {key} is {len(raw_value)} bytes, over {_value_limit(key)}"
            )
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise TextError(f"value of {key} is not UTF-8") from None
        pairs.append((key, value))
    return pairs


class TextAssembler:
    """Joins the data segments of a continued Login/Text exchange (§11.10.2).

    Feed every segment with its C bit; the joined text comes back when a
    segment arrives with C clear.  A key=value pair may span segments, so
    decoding happens only on the whole text.
    """

    def __init__(self, cap: int = DEFAULT_TEXT_CAP) -> None:
        """``cap`` is the largest total text accepted, in bytes."""
        self.cap = cap
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a continued text is incomplete."""
        return bool(self._parts)

    def feed(self, segment: bytes | bytearray | memoryview, cont: bool) -> bytes | None:
        """Add one segment; return the whole text when ``cont`` is False.

        Raises :class:`TextError` (and forgets the partial text) when the
        total would exceed the cap.
        """
        size = self._size + len(segment)
        if size > self.cap:
            self.reset()
            raise TextError(f"continued text exceeds {self.cap} bytes")
        self._parts.append(bytes(segment))
        self._size = size
        if cont:
            return None
        whole = b"".join(self._parts)
        self.reset()
        return whole

    def reset(self) -> None:
        """Forget any partial text."""
        self._parts = []
        self._size = 0


def split_text(data: bytes, max_segment: int) -> list[bytes]:
    """Cut ``data`` into segments of at most ``max_segment`` bytes.

    The peer's MaxRecvDataSegmentLength bounds every data segment we send
    (§13.12).  All but the last segment go out with the C bit set.  An empty
    text is one empty segment.
    """
    if max_segment <= 0:
        raise ValueError("max_segment must be positive")
    if len(data) <= max_segment:
        return [data]
    view = memoryview(data)
    return [bytes(view[i : i + max_segment]) for i in range(0, len(data), max_segment)]
