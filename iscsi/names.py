"""iSCSI names, portals and ``iscsi://`` URLs.

* Names (RFC 7143 §4.2.7, RFC 3721, RFC 3722): ``iqn.yyyy-mm.reversed.domain[:any]``,
  ``eui.`` + 16 hex digits, ``naa.`` + 16 or 32 hex digits. Names compare
  after the RFC 3722 stringprep profile (case folding, NFKC, prohibited
  characters), and are at most 223 bytes of UTF-8 (RFC 7143 §4.2.7.1).
* Portals as in TargetAddress (RFC 7143 §13.8): ``host[:port][,tpgt]`` with
  IPv6 literals in brackets.
* URLs in libiscsi's form:
  ``iscsi://[user[%password]@]host[:port][/target-iqn[/lun]][?target_user=..&target_password=..]``.

Pure functions: nothing here opens sockets. :func:`default_initiator_name`
reads ``/etc/machine-id`` (a one-off at configuration time, not protocol I/O).
"""

from __future__ import annotations

import hashlib
import ipaddress
import platform
import re
import stringprep
import unicodedata
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote, unquote

__all__ = [
    "AIOISCSI_IQN_PREFIX",
    "DEFAULT_PORT",
    "ISCSIURL",
    "MAX_NAME_BYTES",
    "MAX_URL_LUN",
    "InvalidName",
    "NameType",
    "Portal",
    "default_initiator_name",
    "format_portal",
    "format_url",
    "generate_iqn",
    "name_type",
    "names_equal",
    "normalize_name",
    "parse_portal",
    "parse_url",
    "validate_name",
]

# RFC 7143 §4.2.7.1: "iSCSI names ... MUST NOT be larger than 223 bytes".
MAX_NAME_BYTES = 223
# RFC 7143 §13.8 / IANA: the well-known iSCSI port.
DEFAULT_PORT = 3260
# The largest LUN a URL may carry: 14 bits, what SAM-5 flat addressing encodes.
MAX_URL_LUN = 0x3FFF
# Naming authority used for generated names (date is the prefix's "birth").
AIOISCSI_IQN_PREFIX = "iqn.2026-11.org.aioiscsi"


class InvalidName(ValueError):
    """The string is not a valid iSCSI name."""


class NameType(Enum):
    """The three iSCSI name formats (RFC 7143 §4.2.7.2 and RFC 3980 for naa)."""

    IQN = "iqn"
    EUI = "eui"
    NAA = "naa"


# --- RFC 3722 stringprep -----------------------------------------------------

# ASCII allowed after normalisation: RFC 3722 §6 prohibits every other ASCII
# character (0x00-0x2C, 0x2F, 0x3B-0x40, 0x5B-0x60, 0x7B-0x7F).
_ASCII_OK = re.compile(r"[a-z0-9.:\-]*\Z")
_ASCII_ANY_CASE = re.compile(r"[A-Za-z0-9.:\-]*\Z")

_PROHIBITED_TABLES = (
    stringprep.in_table_c11,
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned code points: names are "stored strings"
)


def _stringprep(s: str) -> str:
    """Apply the RFC 3722 profile to a non-ASCII name (slow path, ≤ 223 bytes)."""
    # Mapping: B.1 (map to nothing) then B.2 (case folding for NFKC).
    mapped = "".join(
        stringprep.map_table_b2(c) for c in s if not stringprep.in_table_b1(c)
    )
    # Normalisation: Unicode 3.2 NFKC, as stringprep (RFC 3454) specifies.
    out = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for c in out:
        if c < "\x80":
            if not _ASCII_OK.match(c):
                raise InvalidName(f"character {c!r} is not allowed in an iSCSI name")
        elif c == "\u3002" or any(t(c) for t in _PROHIBITED_TABLES):
            raise InvalidName(
                f"character U+{ord(c):04X} is prohibited in an iSCSI name (RFC 3722 §6)"
            )
    # Bidi rules, RFC 3454 §6.
    if any(stringprep.in_table_d1(c) for c in out):
        if any(stringprep.in_table_d2(c) for c in out):
            raise InvalidName("iSCSI name mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise InvalidName(
                "right-to-left iSCSI name must start and end with an RTL character"
            )
    return out


_IQN = re.compile(
    r"iqn\.([0-9]{4})-([0-9]{2})\.([^.:]+(?:\.[^.:]+)*)(?::(.*))?\Z", re.DOTALL
)
_EUI = re.compile(r"eui\.[0-9a-f]{16}\Z")
_NAA = re.compile(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})\Z")


def _check_format(n: str) -> NameType:
    if len(n.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidName(
            f"iSCSI name is {len(n.encode('utf-8'))} bytes long, more than {MAX_NAME_BYTES}"
        )
    if n.startswith("iqn."):
        m = _IQN.match(n)
        if m is None:
            raise InvalidName(
                f"{n!r} is not of the form iqn.yyyy-mm.reversed.domain[:string]"
            )
        year, month = int(m.group(1)), int(m.group(2))
        if not 1 <= month <= 12:
            raise InvalidName(f"{n!r}: month {m.group(2)} is not 01..12")
        if year == 0:
            raise InvalidName(f"{n!r}: year 0000 is not a date")
        return NameType.IQN
    if n.startswith("eui."):
        if _EUI.match(n) is None:
            raise InvalidName(f"{n!r}: an eui. name has exactly 16 hex digits")
        return NameType.EUI
    if n.startswith("naa."):
        if _NAA.match(n) is None:
            raise InvalidName(f"{n!r}: a naa. name has exactly 16 or 32 hex digits")
        return NameType.NAA
    raise InvalidName(f"{n!r} does not start with iqn., eui. or naa.")


def normalize_name(name: str) -> str:
    """Return the normalised form of iSCSI name ``name`` or raise :class:`InvalidName`.

    Normalisation is the RFC 3722 stringprep profile (so ASCII names are
    simply lower-cased); the result is then checked against the iqn/eui/naa
    formats and the 223-byte limit.
    """
    if not isinstance(name, str):
        raise InvalidName(f"iSCSI name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidName("iSCSI name is empty")
    if name.isascii():
        # Fast path: for ASCII the profile reduces to lower-casing plus the
        # prohibited-character check.
        if _ASCII_ANY_CASE.match(name) is None:
            bad = next(c for c in name if _ASCII_ANY_CASE.match(c) is None)
            raise InvalidName(f"character {bad!r} is not allowed in an iSCSI name")
        n = name.lower()
    else:
        n = _stringprep(name)
    if not n:
        raise InvalidName("iSCSI name is empty after normalisation")
    _check_format(n)
    return n


def name_type(name: str) -> NameType:
    """Return the format of ``name`` (validating it)."""
    return _check_format(normalize_name(name))


def validate_name(name: str, *, require_normalized: bool = False) -> None:
    """Raise :class:`InvalidName` unless ``name`` is a valid iSCSI name.

    With ``require_normalized`` the name must already be in normal form (as
    it must be when sent in InitiatorName/TargetName, RFC 7143 §4.2.7.1).
    """
    n = normalize_name(name)
    if require_normalized and n != name:
        raise InvalidName(f"iSCSI name {name!r} is not normalised (expected {n!r})")


def names_equal(a: str, b: str) -> bool:
    """Compare two iSCSI names after normalisation (RFC 3722 §1)."""
    return normalize_name(a) == normalize_name(b)


_LABEL_BAD = re.compile(r"[^a-z0-9.\-]+")


def _sanitize(part: str) -> str:
    out = _LABEL_BAD.sub("-", part.lower()).strip(".-")
    return out or "host"


def generate_iqn(
    label: str | None = None,
    *,
    hostname: str | None = None,
    prefix: str = AIOISCSI_IQN_PREFIX,
) -> str:
    """Make a target name ``<prefix>:<hostname>[.<label>]``.

    Characters not allowed in a name are replaced by ``-``. ``hostname``
    defaults to this machine's node name. Raises :class:`InvalidName` if the
    result is invalid (e.g. longer than 223 bytes).
    """
    host = _sanitize(hostname if hostname is not None else platform.node())
    unique = host if label is None else f"{host}.{_sanitize(label)}"
    return normalize_name(f"{prefix}:{unique}")


#: Where open-iscsi keeps this host's initiator name.
OPEN_ISCSI_NAME_FILE = "/etc/iscsi/initiatorname.iscsi"


def open_iscsi_initiator_name(path: str = OPEN_ISCSI_NAME_FILE) -> str | None:
    """The ``InitiatorName=`` of open-iscsi's file, when it exists and
    holds a valid name (RFC 3720 §3.2.6); None otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "InitiatorName":
            try:
                return normalize_name(value.strip())
            except ValueError:
                return None
    return None


def default_initiator_name(
    *,
    machine_id_path: str = "/etc/machine-id",
    hostname: str | None = None,
    prefix: str = AIOISCSI_IQN_PREFIX,
    open_iscsi_path: str | None = OPEN_ISCSI_NAME_FILE,
) -> str:
    """This host's initiator name: open-iscsi's (so ACLs written for
    ``iscsiadm`` match), else a stable ``<prefix>:01:<12 hex digits>``.

    Like open-iscsi's generated ``initiatorname.iscsi`` it carries an opaque
    per-host suffix; here it is derived (not random) so that it survives
    reinstalls of this package: a keyed SHA-256 of ``/etc/machine-id``
    (machine-id(5) asks applications not to expose the raw ID) or, when that
    file is unreadable, of the host name.
    """
    if open_iscsi_path is not None:
        known = open_iscsi_initiator_name(open_iscsi_path)
        if known is not None:
            return known
    seed: str | None = None
    try:
        with open(machine_id_path, encoding="ascii") as f:
            seed = f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        seed = None
    if seed is None:
        seed = "host:" + (hostname if hostname is not None else platform.node())
    digest = hashlib.sha256(
        b"aioiscsi-initiator-name\0" + seed.encode("utf-8")
    ).hexdigest()
    return normalize_name(f"{prefix}:01:{digest[:12]}")


# --- portals -------------------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_.])?\Z")


def _check_port(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{what}: port {text!r} is not a decimal number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port} outside 1..65535")
    return port


def _check_host(host: str, what: str) -> str:
    if not host:
        raise ValueError(f"{what}: empty host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not a valid IPv6 address") from None
        return host
    if _HOSTNAME.match(host) is None:
        raise ValueError(f"{what}: {host!r} is not a valid host name or IPv4 address")
    return host


def _split_hostport(
    text: str, what: str, default_port: int, *, bare_v6: bool = True
) -> tuple[str, int]:
    """Split ``host[:port]`` / ``[v6][:port]``; zone IDs arrive already decoded."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{what}: missing ']' after IPv6 address")
        host = text[1:end]
        rest = text[end + 1 :]
        if ":" not in host:
            raise ValueError(f"{what}: [{host}] is not an IPv6 address")
        if rest == "":
            return _check_host(host, what), default_port
        if not rest.startswith(":"):
            raise ValueError(f"{what}: unexpected {rest!r} after ']'")
        return _check_host(host, what), _check_port(rest[1:], what)
    if text.count(":") > 1:
        # RFC 7143 §13.8 wants IPv6 in brackets; a portal may be a bare
        # address without port, which is unambiguous. URLs (RFC 3986 §3.2.2)
        # always need the brackets.
        try:
            if not bare_v6:
                raise ValueError
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"{what}: IPv6 addresses must be written in brackets, e.g. [::1]:3260"
            ) from None
        return text, default_port
    host, sep, port = text.partition(":")
    return _check_host(host, what), (_check_port(port, what) if sep else default_port)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class Portal:
    """A network portal (RFC 7143 §13.8 TargetAddress): host, port, and the
    target portal group tag when the text carried one."""

    host: str
    port: int = DEFAULT_PORT
    tpgt: int | None = None

    def __str__(self) -> str:
        return format_portal(self.host, self.port, self.tpgt)


def parse_portal(text: str, *, default_port: int = DEFAULT_PORT, bare_v6: bool = True) -> Portal:
    """Parse ``host[:port][,tpgt]`` (IPv6 as ``[addr]``) into a :class:`Portal`.
    ``bare_v6=False`` refuses an unbracketed IPv6 address, where ``::1:3260``
    could be an address or an address and a port."""
    what = f"portal {text!r}"
    text = text.strip()
    addr, sep, tag = text.rpartition(",") if "," in text else (text, "", "")
    tpgt: int | None = None
    if sep:
        if not tag.isdigit() or not tag.isascii():
            raise ValueError(
                f"{what}: portal group tag {tag!r} is not a decimal number"
            )
        tpgt = int(tag)
        if tpgt > 0xFFFF:
            raise ValueError(f"{what}: portal group tag {tpgt} outside 0..65535")
    host, port = _split_hostport(addr, what, default_port, bare_v6=bare_v6)
    return Portal(host, port, tpgt)


def format_portal(host: str, port: int = DEFAULT_PORT, tpgt: int | None = None) -> str:
    """Format ``host:port[,tpgt]`` as sent in TargetAddress (IPv6 bracketed)."""
    what = f"portal host {host!r}"
    _check_host(host, what)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port} outside 1..65535")
    out = f"{_format_host(host)}:{port}"
    if tpgt is not None:
        if not 0 <= tpgt <= 0xFFFF:
            raise ValueError(f"{what}: portal group tag {tpgt} outside 0..65535")
        out += f",{tpgt}"
    return out


# --- iscsi:// URLs -------------------------------------------------------------

_URL_SCHEME = "iscsi://"
_DIGESTS = ("crc32c", "none")


@dataclass(frozen=True, slots=True)
class ISCSIURL:
    """A parsed ``iscsi://`` URL (libiscsi syntax).

    ``target`` and ``lun`` are None for a portal-only URL (discovery);
    ``user``/``password`` are the initiator's CHAP credentials and
    ``target_user``/``target_password`` the mutual-CHAP ones.
    """

    host: str
    port: int = DEFAULT_PORT
    target: str | None = None
    lun: int | None = None
    user: str | None = None
    password: str | None = None
    target_user: str | None = None
    target_password: str | None = None
    header_digest: str | None = None

    @property
    def portal(self) -> Portal:
        """The host and port as a :class:`Portal`."""
        return Portal(self.host, self.port)

    def __str__(self) -> str:
        return format_url(self)


def parse_url(url: str) -> ISCSIURL:
    """Parse ``iscsi://[user[%password]@]host[:port][/target[/lun]][?query]``.

    As in libiscsi, the user name ends at the first ``%`` (or, when there is
    none, at the first ``:``); the password, target name, query values and
    an IPv6 zone (``[fe80::1%25eth0]``) are percent-decoded. Query keys:
    ``target_user``, ``target_password`` (mutual CHAP) and ``header_digest``
    (``crc32c`` or ``none``). Raises ValueError with a message naming the
    offending part.
    """
    if not url.startswith(_URL_SCHEME):
        raise ValueError(f"iSCSI URL {url!r} must start with {_URL_SCHEME}")
    rest = url[len(_URL_SCHEME) :]
    rest, qsep, query = rest.partition("?")
    authority, psep, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        hostport = authority

    user: str | None = None
    password: str | None = None
    if at:
        sep_at = userinfo.find("%")
        if sep_at < 0:
            sep_at = userinfo.find(":")
        if sep_at >= 0:
            user, password = userinfo[:sep_at], unquote(userinfo[sep_at + 1 :])
        else:
            user = userinfo
        if not user:
            raise ValueError(f"iSCSI URL {url!r}: empty user name before '@'")
        password = password or None

    if hostport.startswith("["):
        end = hostport.find("]")
        # RFC 6874: a zone ID in a URL is written %25zone.
        if end > 0:
            hostport = unquote(hostport[: end + 1]) + hostport[end + 1 :]
    host, port = _split_hostport(
        hostport, f"iSCSI URL {url!r}", DEFAULT_PORT, bare_v6=False
    )

    target: str | None = None
    lun: int | None = None
    if psep and path:
        target_raw, lsep, lun_text = path.partition("/")
        target = unquote(target_raw)
        if not target:
            raise ValueError(f"iSCSI URL {url!r}: empty target name")
        if lsep:
            if not lun_text.isdigit() or not lun_text.isascii():
                raise ValueError(
                    f"iSCSI URL {url!r}: LUN {lun_text!r} is not a decimal number"
                )
            lun = int(lun_text)
            if lun > MAX_URL_LUN:
                raise ValueError(
                    f"iSCSI URL {url!r}: LUN {lun} outside 0..{MAX_URL_LUN}"
                )

    target_user: str | None = None
    target_password: str | None = None
    header_digest: str | None = None
    if qsep and query:
        for item in query.split("&"):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"iSCSI URL {url!r}: query item {item!r} has no '='")
            value = unquote(value)
            if key == "target_user":
                target_user = value or None
            elif key == "target_password":
                target_password = value or None
            elif key == "header_digest":
                if value not in _DIGESTS:
                    raise ValueError(
                        f"iSCSI URL {url!r}: header_digest must be crc32c or none, not {value!r}"
                    )
                header_digest = value
            else:
                raise ValueError(f"iSCSI URL {url!r}: unknown query key {key!r}")
    return ISCSIURL(
        host,
        port,
        target,
        lun,
        user,
        password,
        target_user,
        target_password,
        header_digest,
    )


_USER_FORBIDDEN = re.compile(r"[%@/?#\[\]\s\x00-\x1f\x7f]")


def format_url(u: ISCSIURL) -> str:
    """Format an :class:`ISCSIURL`; :func:`parse_url` gives it back.

    The user name is written literally (libiscsi does not decode it), so it
    may not contain ``% @ / ? # [ ]`` or white space, nor ``:`` when there is
    no password; everything else is percent-encoded.
    """
    out = [_URL_SCHEME]
    if u.user is not None:
        if not u.user or _USER_FORBIDDEN.search(u.user):
            raise ValueError(f"user name {u.user!r} cannot be written in an iSCSI URL")
        out.append(u.user)
        if u.password:
            out.append("%" + quote(u.password, safe=""))
        elif ":" in u.user:
            raise ValueError(
                f"user name {u.user!r} with ':' needs a password in an iSCSI URL"
            )
        out.append("@")
    elif u.password:
        raise ValueError("a password needs a user name")
    _check_host(u.host, f"URL host {u.host!r}")
    host = _format_host(u.host).replace("%", "%25")
    out.append(host)
    if u.port != DEFAULT_PORT:
        if not 1 <= u.port <= 65535:
            raise ValueError(f"port {u.port} outside 1..65535")
        out.append(f":{u.port}")
    if u.target is not None:
        if not u.target:
            raise ValueError("empty target name")
        out.append("/" + quote(u.target, safe=":"))
        if u.lun is not None:
            if not 0 <= u.lun <= MAX_URL_LUN:
                raise ValueError(f"LUN {u.lun} outside 0..{MAX_URL_LUN}")
            out.append(f"/{u.lun}")
    elif u.lun is not None:
        raise ValueError("a LUN needs a target name")
    query = []
    if u.target_user:
        query.append("target_user=" + quote(u.target_user, safe=""))
    if u.target_password:
        query.append("target_password=" + quote(u.target_password, safe=""))
    if u.header_digest is not None:
        if u.header_digest not in _DIGESTS:
            raise ValueError(
                f"header_digest must be crc32c or none, not {u.header_digest!r}"
            )
        query.append("header_digest=" + u.header_digest)
    if query:
        out.append("?" + "&".join(query))
    return "".join(out)
