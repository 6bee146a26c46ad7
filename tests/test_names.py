"""iSCSI names (RFC 3721/3722), portals (RFC 7143 §13.9) and iscsi:// URLs."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi.names import (
    ISCSIURL,
    MAX_NAME_BYTES,
    InvalidName,
    NameType,
    Portal,
    default_initiator_name,
    open_iscsi_initiator_name,
    format_portal,
    format_url,
    generate_iqn,
    name_type,
    names_equal,
    normalize_name,
    parse_portal,
    parse_url,
    validate_name,
)

# --- names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected, kind",
    [
        ("iqn.2001-04.com.example", "iqn.2001-04.com.example", NameType.IQN),
        (
            "iqn.2001-04.com.Example:Storage:Diskarrays-sn-a8675309",
            "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
            NameType.IQN,
        ),
        (
            "iqn.1991-05.com.microsoft:host.dom.local",
            "iqn.1991-05.com.microsoft:host.dom.local",
            NameType.IQN,
        ),
        ("eui.02004567A425678D", "eui.02004567a425678d", NameType.EUI),
        ("naa.52004567BA64678D", "naa.52004567ba64678d", NameType.NAA),
        (
            "naa.62004567BA64678D0123456789ABCDEF",
            "naa.62004567ba64678d0123456789abcdef",
            NameType.NAA,
        ),
        ("IQN.2001-04.COM.EXAMPLE", "iqn.2001-04.com.example", NameType.IQN),
        # Non-ASCII: case folding + NFKC (fullwidth 'Ａ' -> 'a').
        (
            "iqn.2001-04.com.example:\uff21bc",
            "iqn.2001-04.com.example:abc",
            NameType.IQN,
        ),
        (
            "iqn.2001-04.com.example:stra\u00dfe",
            "iqn.2001-04.com.example:strasse",
            NameType.IQN,
        ),
        (
            "iqn.2001-04.com.example:caf\u00c9",
            "iqn.2001-04.com.example:caf\u00e9",
            NameType.IQN,
        ),
        # B.1: soft hyphen maps to nothing.
        (
            "iqn.2001-04.com.example:a\u00adb",
            "iqn.2001-04.com.example:ab",
            NameType.IQN,
        ),
    ],
)
def test_valid_names(name: str, expected: str, kind: NameType) -> None:
    assert normalize_name(name) == expected
    assert name_type(name) is kind
    validate_name(name)
    validate_name(expected, require_normalized=True)


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "empty"),
        ("iqn.2001-13.com.example", "month 13"),
        ("iqn.2001-00.com.example", "month 00"),
        ("iqn.0000-01.com.example", "year"),
        ("iqn.201-04.com.example", "form"),
        ("iqn.2001-04", "form"),
        ("iqn.2001-04.", "form"),
        ("iqn.2001-04.com..example", "form"),
        ("iqn.2001-04.com.example_x", "'_'"),
        ("iqn.2001-04.com.example:a b", "' '"),
        ("iqn.2001-04.com.example:a/b", "'/'"),
        ("iqn.2001-04.com.example:a@b", "'@'"),
        ("iqn.2001-04.com.example:a\u3002b", "U\\+3002"),
        ("iqn.2001-04.com.example:a\u200eb", "prohibited"),  # C.8 LRM
        ("iqn.2001-04.com.example:\ue000", "prohibited"),  # C.3 private use
        ("iqn.2001-04.com.example:\u05d0a", "right-to-left"),  # bidi mix
        ("eui.02004567a425678", "16 hex"),
        ("eui.02004567a425678dd", "16 hex"),
        ("eui.02004567a425678g", "16 hex"),
        ("naa.0123456789abcdef01", "16 or 32"),
        ("foo.bar", "does not start"),
        ("iqn", "does not start"),
    ],
)
def test_invalid_names(name: str, message: str) -> None:
    with pytest.raises(InvalidName, match=message):
        normalize_name(name)


def test_name_length_limit() -> None:
    base = "iqn.2001-04.com.example:"
    ok = base + "a" * (MAX_NAME_BYTES - len(base))
    assert normalize_name(ok) == ok
    with pytest.raises(InvalidName, match="more than 223"):
        normalize_name(ok + "a")
    # The limit is in UTF-8 bytes, not characters: 'é' is two bytes.
    with pytest.raises(InvalidName, match="bytes long"):
        normalize_name(base + "\u00e9" * ((MAX_NAME_BYTES - len(base)) // 2 + 1))


def test_require_normalized_and_equal() -> None:
    with pytest.raises(InvalidName, match="not normalised"):
        validate_name("iqn.2001-04.com.Example", require_normalized=True)
    assert names_equal("iqn.2001-04.com.Example:X", "IQN.2001-04.com.example:x")
    assert not names_equal("iqn.2001-04.com.example:x", "iqn.2001-04.com.example:y")
    with pytest.raises(InvalidName):
        normalize_name(b"iqn.2001-04.com.example")  # type: ignore[arg-type]


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.:ABCXYZ", max_size=150))
def test_normalize_idempotent(suffix: str) -> None:
    name = "iqn.2020-02.org.test:" + suffix
    n = normalize_name(name)
    assert normalize_name(n) == n
    assert n == name.lower()


@given(st.text(max_size=40))
def test_normalize_never_leaks(s: str) -> None:
    try:
        n = normalize_name("iqn.2020-02.org.test:" + s)
    except InvalidName:
        return
    assert normalize_name(n) == n
    assert len(n.encode()) <= MAX_NAME_BYTES


def test_generate_iqn() -> None:
    assert generate_iqn("disk0", hostname="Server_1.Example.COM") == (
        "iqn.2026-11.org.aioiscsi:server-1.example.com.disk0"
    )
    assert generate_iqn(hostname="h") == "iqn.2026-11.org.aioiscsi:h"
    assert (
        generate_iqn("my disk/1", hostname="h")
        == "iqn.2026-11.org.aioiscsi:h.my-disk-1"
    )
    validate_name(generate_iqn("x"), require_normalized=True)
    with pytest.raises(InvalidName, match="more than"):
        generate_iqn("x" * 300, hostname="h")


def test_default_initiator_name(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    a = default_initiator_name(machine_id_path=str(mid), open_iscsi_path=None)
    assert a == default_initiator_name(machine_id_path=str(mid), open_iscsi_path=None)
    assert a.startswith("iqn.2026-11.org.aioiscsi:01:")
    assert len(a.rsplit(":", 1)[1]) == 12
    assert "0123456789ab" not in a  # the raw machine id is not exposed
    validate_name(a, require_normalized=True)
    mid.write_text("fedcba9876543210fedcba9876543210\n")
    assert default_initiator_name(machine_id_path=str(mid), open_iscsi_path=None) != a
    missing = str(tmp_path / "absent")
    h1 = default_initiator_name(machine_id_path=missing, hostname="alpha", open_iscsi_path=None)
    assert h1 == default_initiator_name(machine_id_path=missing, hostname="alpha", open_iscsi_path=None)
    assert h1 != default_initiator_name(machine_id_path=missing, hostname="beta", open_iscsi_path=None)
    validate_name(default_initiator_name())


def test_default_initiator_name_follows_open_iscsi(tmp_path: Path) -> None:
    """ACLs written for iscsiadm keep matching: open-iscsi's name wins."""
    f = tmp_path / "initiatorname.iscsi"
    f.write_text("## DO NOT EDIT\n# comment\nInitiatorName=iqn.2004-10.com.Ubuntu:01:abc123\n")
    assert open_iscsi_initiator_name(str(f)) == "iqn.2004-10.com.ubuntu:01:abc123"
    assert default_initiator_name(open_iscsi_path=str(f)) == "iqn.2004-10.com.ubuntu:01:abc123"
    f.write_text("InitiatorName=not a name\n")
    assert open_iscsi_initiator_name(str(f)) is None
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    assert default_initiator_name(machine_id_path=str(mid), open_iscsi_path=str(f)) == \
        default_initiator_name(machine_id_path=str(mid), open_iscsi_path=None)
    assert open_iscsi_initiator_name(str(tmp_path / "missing")) is None


# --- portals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, portal",
    [
        ("10.0.0.1", Portal("10.0.0.1", 3260, None)),
        ("10.0.0.1:3261", Portal("10.0.0.1", 3261, None)),
        ("10.0.0.1:3260,1", Portal("10.0.0.1", 3260, 1)),
        ("target.example.com,7", Portal("target.example.com", 3260, 7)),
        ("[2001:db8::1]:3260,2", Portal("2001:db8::1", 3260, 2)),
        ("[2001:db8::1]", Portal("2001:db8::1", 3260, None)),
        ("[fe80::1%eth0]:860", Portal("fe80::1%eth0", 860, None)),
        ("2001:db8::1", Portal("2001:db8::1", 3260, None)),
        (" host:1 ", Portal("host", 1, None)),
    ],
)
def test_parse_portal(text: str, portal: Portal) -> None:
    assert parse_portal(text) == portal


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty host"),
        ("host:0", "outside 1..65535"),
        ("host:65536", "outside 1..65535"),
        ("host:x", "not a decimal"),
        ("host:3260,x", "group tag"),
        ("host:3260,65536", "group tag"),
        ("[2001:db8::1", "missing"),
        ("[2001:db8::1]x", "unexpected"),
        ("[host]:3260", "not an IPv6"),
        ("2001:db8::1:3260:zz", "brackets"),
        ("ho st", "not a valid host"),
        ("[2001:db8::zz]", "not a valid IPv6"),
    ],
)
def test_parse_portal_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_portal(text)


def test_format_portal() -> None:
    assert format_portal("10.0.0.1") == "10.0.0.1:3260"
    assert format_portal("2001:db8::1", 3261, 1) == "[2001:db8::1]:3261,1"
    assert str(Portal("h", 1, 0)) == "h:1,0"
    with pytest.raises(ValueError):
        format_portal("h", 0)
    with pytest.raises(ValueError):
        format_portal("h", 1, -1)


# --- URLs --------------------------------------------------------------------


def test_parse_full_url() -> None:
    u = parse_url("iscsi://alice%s3cr%40t@10.1.1.1:3261/iqn.2001-04.com.example:disk/5")
    assert u == ISCSIURL(
        host="10.1.1.1",
        port=3261,
        target="iqn.2001-04.com.example:disk",
        lun=5,
        user="alice",
        password="s3cr@t",
    )


def test_parse_url_forms() -> None:
    assert parse_url("iscsi://host") == ISCSIURL("host")
    assert parse_url("iscsi://host/") == ISCSIURL("host")
    assert parse_url("iscsi://host/iqn.2001-04.com.e:t") == ISCSIURL(
        "host", target="iqn.2001-04.com.e:t"
    )
    u = parse_url("iscsi://[fe80::1%25eth0]:3262/iqn.2001-04.com.e/0")
    assert u.host == "fe80::1%eth0" and u.port == 3262 and u.lun == 0
    u = parse_url("iscsi://[::1]/t/1")
    assert (u.host, u.port) == ("::1", 3260)
    # ':' as the user/password separator when there is no '%'.
    u = parse_url("iscsi://bob:pw@h/t/0")
    assert (u.user, u.password) == ("bob", "pw")
    # libiscsi: '%' takes precedence, so a CHAP name with ':' works.
    u = parse_url("iscsi://iqn.1:x%pw@h/t/0")
    assert (u.user, u.password) == ("iqn.1:x", "pw")
    u = parse_url(
        "iscsi://u%p@h/t/3?target_user=tu&target_password=t%26p&header_digest=crc32c"
    )
    assert (u.target_user, u.target_password, u.header_digest) == (
        "tu",
        "t&p",
        "crc32c",
    )
    assert parse_url("iscsi://h/t%2Fx/1").target == "t/x"
    assert (
        parse_url("iscsi://u@h").user == "u"
        and parse_url("iscsi://u@h").password is None
    )


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://h/t/0", "must start with iscsi://"),
        ("iscsi://", "empty host"),
        ("iscsi:///t/0", "empty host"),
        ("iscsi://h:99999/t/0", "outside 1..65535"),
        ("iscsi://h/t/x", "LUN 'x'"),
        ("iscsi://h/t/-1", "LUN '-1'"),
        ("iscsi://h/t/16384", "LUN 16384"),
        ("iscsi://h/t/", "LUN ''"),
        ("iscsi://h//0", "empty target"),
        ("iscsi://@h/t/0", "empty user"),
        ("iscsi://%pw@h/t/0", "empty user"),
        ("iscsi://h/t/0?foo=1", "unknown query key 'foo'"),
        ("iscsi://h/t/0?target_user", "has no '='"),
        ("iscsi://h/t/0?header_digest=md5", "crc32c or none"),
        ("iscsi://fe80::1/t/0", "brackets"),
        ("iscsi://[fe80::1/t/0", "missing"),
    ],
)
def test_parse_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_format_url() -> None:
    u = ISCSIURL("2001:db8::5", 3260, "iqn.2001-04.com.e:t", 2, "alice", "p%w@/:")
    s = str(u)
    assert s == "iscsi://alice%p%25w%40%2F%3A@[2001:db8::5]/iqn.2001-04.com.e:t/2"
    assert parse_url(s) == u
    assert format_url(ISCSIURL("h", 3261)) == "iscsi://h:3261"
    assert format_url(ISCSIURL("fe80::1%eth0")) == "iscsi://[fe80::1%25eth0]"
    for bad in (
        ISCSIURL("h", user="a%b", password="x"),
        ISCSIURL("h", user="a:b"),
        ISCSIURL("h", password="x"),
        ISCSIURL("h", lun=1),
        ISCSIURL("h", target="t", lun=70000),
        ISCSIURL("h", port=0),
        ISCSIURL("bad host"),
        ISCSIURL("h", header_digest="md5"),
    ):
        with pytest.raises(ValueError):
            format_url(bad)


_hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9\-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,2}", fullmatch=True
)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_secret = st.one_of(st.none(), st.text(min_size=1, max_size=20))
_user = st.one_of(
    st.none(),
    st.from_regex(r"[A-Za-z0-9.\-:_]{1,20}", fullmatch=True),
)


@given(
    host=st.one_of(_hostnames, _ipv4, _ipv6),
    port=st.integers(1, 65535),
    target=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    lun=st.integers(0, 16383),
    user=_user,
    password=_secret,
    target_user=_secret,
    target_password=_secret,
    digest=st.sampled_from([None, "crc32c", "none"]),
)
def test_url_round_trip(
    host: str,
    port: int,
    target: str | None,
    lun: int,
    user: str | None,
    password: str | None,
    target_user: str | None,
    target_password: str | None,
    digest: str | None,
) -> None:
    if user is not None and ":" in user and password is None:
        password = "pw"
    if user is None:
        password = None
    u = ISCSIURL(
        host,
        port,
        target,
        lun if target is not None else None,
        user,
        password,
        target_user,
        target_password,
        digest,
    )
    s = format_url(u)
    assert parse_url(s) == u
    assert str(parse_url(s)) == s
    if ":" in host:
        assert ipaddress.IPv6Address(parse_url(s).host)


@given(
    host=st.one_of(_hostnames, _ipv4, _ipv6),
    port=st.integers(1, 65535),
    tpgt=st.one_of(st.none(), st.integers(0, 65535)),
)
def test_portal_round_trip(host: str, port: int, tpgt: int | None) -> None:
    p = Portal(host, port, tpgt)
    assert parse_portal(str(p)) == p
