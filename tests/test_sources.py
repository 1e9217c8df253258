"""The subscriber CSV: formats, every error with its line, strict overlaps, speed, one pass."""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpzoot.sources import subscribers
from xdpzoot.sources.files import SourceError
from xdpzoot.sources.subscribers import (
    FLAGS,
    Subscriber,
    check_network,
    overlaps_v4mapped,
    parse_subscribers,
    parse_subscribers_text,
)

MAPS = Path(__file__).resolve().parents[1] / "maps"
HEADER = "subscriber,address,type,up_kbps,down_kbps,flags"
V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network


def problems_of(text: str, strict: bool = False) -> list[tuple[int | None, str]]:
    """The problems a text produces (the test fails if it parses)."""
    with pytest.raises(SourceError) as info:
        parse_subscribers_text(text, "t.csv", strict=strict)
    assert info.value.path == "t.csv"
    return info.value.problems


# --- SourceError ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problems, expected",
    [
        pytest.param([(3, "bad")], "f.csv:3: bad", id="with-line"),
        pytest.param([(None, "bad")], "f.csv: bad", id="without-line"),
        pytest.param([(None, "a"), (2, "b")], "f.csv: a\nf.csv:2: b", id="mixed"),
        pytest.param(
            [(i, "x") for i in range(1, 21)],
            "\n".join(f"f.csv:{i}: x" for i in range(1, 21)),
            id="20-not-capped",
        ),
        pytest.param(
            [(i, "x") for i in range(1, 22)],
            "\n".join(f"f.csv:{i}: x" for i in range(1, 21)) + "\n... and 1 more problem",
            id="21-capped",
        ),
        pytest.param(
            [(i, "x") for i in range(1, 1001)],
            "\n".join(f"f.csv:{i}: x" for i in range(1, 21)) + "\n... and 980 more problems",
            id="1000-capped",
        ),
    ],
)
def test_source_error_str(problems: list[tuple[int | None, str]], expected: str) -> None:
    e = SourceError("f.csv", problems)
    assert str(e) == expected
    assert e.path == "f.csv"
    assert e.problems == problems


def test_capping_of_a_real_file() -> None:
    text = HEADER + "\n" + "".join(f"{i},10.0.0.{i},fixed,,,\n" for i in range(1, 31))
    with pytest.raises(SourceError) as info:
        parse_subscribers_text(text, "t.csv")
    lines = str(info.value).split("\n")
    assert len(lines) == 21
    assert lines[0] == "t.csv:2: unknown type 'fixed' (must be 'dynamic' or 'static')"
    assert lines[-1] == "... and 10 more problems"
    assert len(info.value.problems) == 30


# --- valid input ------------------------------------------------------------------------------


def sub(line: int, sub_id: int, net: str, type_: str = "dynamic", up: int = 0, down: int = 0,
        flags: tuple[str, ...] = ()) -> Subscriber:
    """A Subscriber in one line."""
    return Subscriber(line, sub_id, ipaddress.ip_network(net), type_, up, down, frozenset(flags))


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(HEADER + "\n", [], id="header-only"),
        pytest.param(
            "subscriber,address,type\n1,192.0.2.1,static\n",
            [sub(2, 1, "192.0.2.1/32", "static")],
            id="required-columns-only",
        ),
        pytest.param(
            "flags,type,address,subscriber,down_kbps\nsuspended,dynamic,2001:db8::1,7,500\n",
            [sub(2, 7, "2001:db8::1/128", down=500, flags=("suspended",))],
            id="any-column-order",
        ),
        pytest.param(
            " subscriber , address ,type\n  4294967295 ,\t100.64.0.0/10 , dynamic \n",
            [sub(2, 4294967295, "100.64.0.0/10")],
            id="whitespace-stripped",
        ),
        pytest.param(
            "# comment\n\nsubscriber,address,type\n# another, with, commas\n\n   \n"
            "1,192.0.2.0/24,dynamic\n",
            [sub(7, 1, "192.0.2.0/24")],
            id="comments-and-blank-lines-count",
        ),
        pytest.param(
            "\ufeffsubscriber,address,type\r\n1,192.0.2.1,static\r\n",
            [sub(2, 1, "192.0.2.1/32", "static")],
            id="bom-and-crlf",
        ),
        pytest.param(
            'subscriber,address,type,flags\n"1","192.0.2.1","static","op25b_exempt;ip53b_exempt"\n',
            [sub(2, 1, "192.0.2.1/32", "static", flags=("op25b_exempt", "ip53b_exempt"))],
            id="quoted-fields",
        ),
        pytest.param(
            HEADER + "\n1,192.0.2.1,dynamic,0,4294967295, suspended ; op25b_exempt ;\n",
            [sub(2, 1, "192.0.2.1/32", down=4294967295, flags=("suspended", "op25b_exempt"))],
            id="rate-bounds-and-flag-spacing",
        ),
        pytest.param(
            HEADER + "\n1,2000::/3,dynamic,,,\n2,0.0.0.0/0,dynamic,,,\n"
            "3,ffff::/16,static,,,\n",
            [sub(2, 1, "2000::/3"), sub(3, 2, "0.0.0.0/0"),
             sub(4, 3, "ffff::/16", "static")],
            id="edge-prefixes",
        ),
        pytest.param(
            HEADER + "\n1,192.0.2.0/24,dynamic,,,\n2,192.0.2.8/29,static,,,\n"
            "3,192.0.2.9,dynamic,,,\n",
            [sub(2, 1, "192.0.2.0/24"), sub(3, 2, "192.0.2.8/29", "static"),
             sub(4, 3, "192.0.2.9/32")],
            id="nesting-is-legal",
        ),
        pytest.param(
            HEADER + "\n5,192.0.2.0/24,dynamic,,,\n5,2001:db8::/64,dynamic,,,\n",
            [sub(2, 5, "192.0.2.0/24"), sub(3, 5, "2001:db8::/64")],
            id="one-id-many-rows",
        ),
    ],
)
def test_valid(text: str, expected: list[Subscriber]) -> None:
    assert parse_subscribers_text(text) == expected


def test_networks_are_real_ipaddress_objects() -> None:
    rows = parse_subscribers_text(
        HEADER + "\n1,192.0.2.1,dynamic,,,\n2,192.0.2.128/25,dynamic,,,\n3,2001:db8::1,static,,,\n"
        "4,2001:db8:1::/127,static,,,\n5,192.0.2.2/31,static,,,\n"
    )
    for row in rows:
        real = ipaddress.ip_network(str(row.network))
        assert type(row.network) is type(real)
        assert row.network == real and hash(row.network) == hash(real)
        assert list(row.network.hosts()) == list(real.hosts())
        assert row.network.broadcast_address == real.broadcast_address
        assert row.network.supernet() == real.supernet()


def test_subscriber_is_frozen() -> None:
    row = sub(2, 1, "192.0.2.1/32")
    with pytest.raises(AttributeError):
        row.sub_id = 2  # type: ignore[misc]
    assert replace(row, sub_id=2).sub_id == 2


def test_flags_constant() -> None:
    assert FLAGS == ("suspended", "op25b_exempt", "ip53b_exempt")


# --- every error, with its line ---------------------------------------------------------------

ROW_ERRORS = [
    # (id, row, problems on that row)
    ("sub-id-zero", "0,192.0.2.1,static,,,", ["bad subscriber id '0' (must be 1..4294967295)"]),
    ("sub-id-too-big", "4294967296,192.0.2.1,static,,,",
     ["bad subscriber id '4294967296' (must be 1..4294967295)"]),
    ("sub-id-negative", "-1,192.0.2.1,static,,,",
     ["bad subscriber id '-1' (must be 1..4294967295)"]),
    ("sub-id-plus", "+1,192.0.2.1,static,,,", ["bad subscriber id '+1' (must be 1..4294967295)"]),
    ("sub-id-underscore", "1_0,192.0.2.1,static,,,",
     ["bad subscriber id '1_0' (must be 1..4294967295)"]),
    ("sub-id-arabic-digits", "\u0663,192.0.2.1,static,,,",
     ["bad subscriber id '\u0663' (must be 1..4294967295)"]),
    ("sub-id-empty", ",192.0.2.1,static,,,", ["bad subscriber id '' (must be 1..4294967295)"]),
    ("address-garbage", "1,example.com,static,,,", ["bad address 'example.com'"]),
    ("address-octet", "1,192.0.2.256,static,,,", ["bad address '192.0.2.256'"]),
    ("address-leading-zero", "1,192.0.2.01,static,,,", ["bad address '192.0.2.01'"]),
    ("address-short", "1,192.0.2,static,,,", ["bad address '192.0.2'"]),
    ("address-prefix-too-long", "1,192.0.2.0/33,static,,,", ["bad address '192.0.2.0/33'"]),
    ("address-v6-prefix-too-long", "1,2001:db8::/129,static,,,",
     ["bad address '2001:db8::/129'"]),
    ("address-empty-prefix", "1,192.0.2.0/,static,,,", ["bad address '192.0.2.0/'"]),
    ("address-empty", "1,,static,,,", ["empty address"]),
    ("address-scoped", "1,fe80::1%eth0,static,,,",
     ["bad address 'fe80::1%eth0' (scoped addresses are not allowed)"]),
    ("host-bits-v4", "1,198.51.100.9/29,static,,,", ["host bits set in 198.51.100.9/29"]),
    ("host-bits-v6", "1,2001:db8::1/64,static,,,", ["host bits set in 2001:db8::1/64"]),
    ("host-bits-netmask", "1,198.51.100.9/255.255.255.248,static,,,",
     ["host bits set in 198.51.100.9/255.255.255.248"]),
    ("type-unknown", "1,192.0.2.1,fixed,,,",
     ["unknown type 'fixed' (must be 'dynamic' or 'static')"]),
    ("type-case", "1,192.0.2.1,Static,,,",
     ["unknown type 'Static' (must be 'dynamic' or 'static')"]),
    ("type-empty", "1,192.0.2.1,,,,", ["unknown type '' (must be 'dynamic' or 'static')"]),
    ("rate-unit", "1,192.0.2.1,static,10M,,",
     ["bad rate in up_kbps: '10M' (kbit/s 0..4294967295; 0 or empty = unlimited)"]),
    ("rate-negative", "1,192.0.2.1,static,,-5,",
     ["bad rate in down_kbps: '-5' (kbit/s 0..4294967295; 0 or empty = unlimited)"]),
    ("rate-too-big", "1,192.0.2.1,static,,4294967296,",
     ["bad rate in down_kbps: '4294967296' (kbit/s 0..4294967295; 0 or empty = unlimited)"]),
    ("rate-float", "1,192.0.2.1,static,1.5,,",
     ["bad rate in up_kbps: '1.5' (kbit/s 0..4294967295; 0 or empty = unlimited)"]),
    ("flag-unknown", "1,192.0.2.1,static,,,vip",
     ["unknown flag 'vip' (known: suspended, op25b_exempt, ip53b_exempt)"]),
    ("flags-unknown-two", "1,192.0.2.1,static,,,vip;suspended;gold",
     ["unknown flags 'vip', 'gold' (known: suspended, op25b_exempt, ip53b_exempt)"]),
    ("flags-comma-separated-is-field-count", "1,192.0.2.1,static,,,suspended,op25b_exempt",
     ["expected 6 fields, got 7"]),
    ("too-few-fields", "1,192.0.2.1,static", ["expected 6 fields, got 3"]),
    ("too-many-fields", "1,192.0.2.1,static,,,,", ["expected 6 fields, got 7"]),
    ("indented-comment-is-a-row", "  # not a comment", ["expected 6 fields, got 1"]),
    ("broken-quote", '1,"192.0.2.1,static,,,',
     ["bad CSV quoting: unexpected end of data"]),
    ("every-field-bad", "0,192.0.2.1/24,fixed,x,y,vip", [
        "bad subscriber id '0' (must be 1..4294967295)",
        "host bits set in 192.0.2.1/24",
        "unknown type 'fixed' (must be 'dynamic' or 'static')",
        "bad rate in up_kbps: 'x' (kbit/s 0..4294967295; 0 or empty = unlimited)",
        "bad rate in down_kbps: 'y' (kbit/s 0..4294967295; 0 or empty = unlimited)",
        "unknown flag 'vip' (known: suspended, op25b_exempt, ip53b_exempt)",
    ]),
]


@pytest.mark.parametrize("row, messages", [pytest.param(r, m, id=i) for i, r, m in ROW_ERRORS])
def test_row_error(row: str, messages: list[str]) -> None:
    good = "9,203.0.113.9,static,,,"
    text = f"{HEADER}\n{good}\n# comment\n\n{row}\n{good.replace('9', '8')}\n"
    assert problems_of(text) == [(5, m) for m in messages]


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(
            "subscriber,address,type,colour\n1,192.0.2.1,static,red\n",
            [(1, "unknown column 'colour' (known: subscriber, address, type, up_kbps, "
                 "down_kbps, flags, plan, user)")],
            id="unknown-column",
        ),
        pytest.param(
            "subscriber,address,type,type\n1,192.0.2.1,static,static\n",
            [(1, "duplicate column 'type'")],
            id="duplicate-column",
        ),
        pytest.param(
            "subscriber,address\n1,192.0.2.1\n", [(1, "missing column 'type'")],
            id="missing-column",
        ),
        pytest.param(
            "Subscriber,address,type\n1,192.0.2.1,static\n",
            [(1, "unknown column 'Subscriber' (known: subscriber, address, type, up_kbps, "
                 "down_kbps, flags, plan, user)"), (1, "missing column 'subscriber'")],
            id="column-names-are-case-sensitive",
        ),
        pytest.param(
            "# first a comment\n\nsubscriber,address\n", [(3, "missing column 'type'")],
            id="header-after-comments",
        ),
        pytest.param("", [(None, "no header row (columns: subscriber,address,type)")], id="empty"),
        pytest.param(
            "# only\n\n# comments\n", [(None, "no header row (columns: subscriber,address,type)")],
            id="only-comments",
        ),
        pytest.param(
            '"subscriber,address,type\n',
            [(1, "bad CSV quoting in header: unexpected end of data")],
            id="header-broken-quote",
        ),
        pytest.param(
            "address,type\n192.0.2.1/24,static\n0.0.0.1,fixed\n",
            [(1, "missing column 'subscriber'"), (2, "host bits set in 192.0.2.1/24"),
             (3, "unknown type 'fixed' (must be 'dynamic' or 'static')")],
            id="rows-still-checked-without-a-column",
        ),
        pytest.param(
            HEADER + "\n1,192.0.2.1,static,,,\n2,192.0.2.0/24,dynamic,,,\n"
            "3,192.0.2.1/32,dynamic,,,\n4,192.0.2.0/24,static,,,\n",
            [(4, "duplicate of line 2"), (5, "duplicate of line 3")],
            id="duplicates",
        ),
        pytest.param(
            HEADER + "\n1,2001:db8::1,static,,,\n2,2001:DB8:0::1,static,,,\n"
            "3,2001:db8::1/128,dynamic,,,\n",
            [(3, "duplicate of line 2"), (4, "duplicate of line 2")],
            id="duplicates-spelled-differently",
        ),
        pytest.param(
            HEADER + "\n1,192.0.2.1,fixed,,,\n2,192.0.2.1,static,,,\n",
            [(2, "unknown type 'fixed' (must be 'dynamic' or 'static')"),
             (3, "duplicate of line 2")],
            id="duplicate-of-a-bad-row",
        ),
        pytest.param(
            HEADER + "\n1,0.0.0.1,static,,,\n1,::1,static,,,\n",
            [], id="v4-and-v6-same-int-are-not-duplicates",
        ),
    ],
)
def test_file_error(text: str, expected: list[tuple[int | None, str]]) -> None:
    if expected:
        assert problems_of(text) == expected
    else:
        assert len(parse_subscribers_text(text)) == 2


def test_every_error_class_in_one_pass() -> None:
    """One file with one of each problem: a single SourceError names all of them, in order."""
    # Each row gets an address of its own, or they would all be duplicates of each other.
    rows = [r.replace("192.0.2.1,", f"192.0.2.{i + 10},") for i, (_, r, _) in enumerate(ROW_ERRORS)]
    text = "\n".join([HEADER, "1,203.0.113.0/24,dynamic,,,", *rows, "2,203.0.113.0/24,static,,,"])
    problems = problems_of(text)
    expected = [(i + 3, m) for i, (_, _, ms) in enumerate(ROW_ERRORS) for m in ms]
    expected.append((len(rows) + 3, "duplicate of line 2"))
    assert problems == expected


# --- files ------------------------------------------------------------------------------------


def test_example_file() -> None:
    rows = parse_subscribers(str(MAPS / "subscribers.csv"))
    by_net = {str(r.network): r for r in rows}
    assert by_net["100.64.1.0/24"].type == "dynamic"
    assert by_net["2001:db8:1::/64"].type == "dynamic"
    static = [r for r in rows if r.type == "static"]
    assert {str(r.network) for r in static} == {"198.51.100.8/29", "2001:db8:2::/64"}
    assert len({r.sub_id for r in static}) == 1
    assert all(r.up_kbps and r.down_kbps for r in static)
    assert any(r.type == "dynamic" and "op25b_exempt" in r.flags for r in rows)
    assert any(r.type == "dynamic" and "suspended" in r.flags for r in rows)
    documentation = [V4("100.64.0.0/10"), V4("192.0.2.0/24"), V4("198.51.100.0/24"),
                     V4("203.0.113.0/24"), V6("2001:db8::/32")]
    for r in rows:
        assert any(r.network.version == d.version and r.network.subnet_of(d)  # type: ignore
                   for d in documentation)
    # Host rows nest inside the pool, so the strict mode names them.
    with pytest.raises(SourceError) as info:
        parse_subscribers(str(MAPS / "subscribers.csv"), strict=True)
    assert {m for _, m in info.value.problems} == {
        f"overlaps line {by_net['100.64.1.0/24'].line} (100.64.1.0/24)"}


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(None, "cannot read: No such file or directory", id="missing"),
        pytest.param(b"subscriber,address,type\n1,192.0.2.1,st\xe4tic\n",
                     "not UTF-8 text: invalid continuation byte", id="not-utf8"),
    ],
)
def test_unreadable_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "s.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SourceError) as info:
        parse_subscribers(str(path))
    assert info.value.problems == [(None if content is None else 2, message)]
    assert info.value.path == str(path)


# --- strict: overlaps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, expected",
    [
        pytest.param(["1,192.0.2.0/24,dynamic", "2,198.51.100.0/24,dynamic"], [], id="disjoint"),
        pytest.param(["1,192.0.2.0/25,dynamic", "2,192.0.2.128/25,dynamic"], [],
                     id="adjacent"),
        pytest.param(["1,100.64.1.0/24,dynamic", "2,100.64.1.8/29,static"],
                     [(3, "overlaps line 2 (100.64.1.0/24)")], id="static-in-pool"),
        pytest.param(["2,100.64.1.8/29,static", "1,100.64.1.0/24,dynamic"],
                     [(2, "overlaps line 3 (100.64.1.0/24)")], id="inner-first-in-file"),
        pytest.param(["1,100.64.1.0/24,dynamic", "2,100.64.1.0/25,static"],
                     [(3, "overlaps line 2 (100.64.1.0/24)")], id="same-start"),
        pytest.param(["1,100.64.1.255,dynamic", "2,100.64.1.0/24,dynamic"],
                     [(2, "overlaps line 3 (100.64.1.0/24)")], id="last-address"),
        pytest.param(
            ["1,10.0.0.0/8,dynamic", "2,10.1.0.0/16,static", "3,10.1.2.3,static",
             "4,10.2.0.0/16,static", "5,11.0.0.1,static"],
            [(3, "overlaps line 2 (10.0.0.0/8)"), (4, "overlaps line 3 (10.1.0.0/16)"),
             (5, "overlaps line 2 (10.0.0.0/8)")],
            id="nearest-enclosing-is-named",
        ),
        pytest.param(["1,2000::/3,dynamic", "2,2001:db8::1,static"],
                     [(3, "overlaps line 2 (2000::/3)")], id="v6"),
        pytest.param(["1,0.0.0.0/0,dynamic", "2,::1,static", "3,2001:db8::a00:1,static"], [],
                     id="v4-never-contains-v6"),
        pytest.param(["1,192.0.2.0/24,dynamic", "1,192.0.2.0/24,static"],
                     [(3, "duplicate of line 2")], id="duplicate-is-not-also-an-overlap"),
    ],
)
def test_strict_overlaps(rows: list[str], expected: list[tuple[int, str]]) -> None:
    text = "subscriber,address,type\n" + "\n".join(rows) + "\n"
    if not expected:
        assert len(parse_subscribers_text(text, strict=True)) == len(rows)
        return
    assert problems_of(text, strict=True) == expected
    if all("overlaps" in m for _, m in expected):
        assert len(parse_subscribers_text(text)) == len(rows)  # legal without strict


def reference_overlaps(nets: list[V4 | V6]) -> dict[int, int]:
    """For each index, the index of the smallest other network containing it (O(n^2))."""
    out = {}
    for i, inner in enumerate(nets):
        outers = [j for j, outer in enumerate(nets)
                  if j != i and inner.version == outer.version and inner != outer
                  and inner.subnet_of(outer)]  # type: ignore[arg-type]
        if outers:
            out[i] = max(outers, key=lambda j: nets[j].prefixlen)
    return out


small_v4 = st.builds(
    lambda addr, plen: V4((addr, plen), strict=False),
    st.integers(0, 255).map(lambda x: (10 << 24) | (x << 16)), st.integers(8, 24),
)
small_v6 = st.builds(
    lambda addr, plen: V6((addr, plen), strict=False),
    st.integers(0, 255).map(lambda x: (0x20010DB8 << 96) | (x << 88)), st.integers(32, 96),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(small_v4, small_v6), min_size=1, max_size=40, unique=True))
def test_strict_overlaps_match_reference(nets: list[V4 | V6]) -> None:
    text = "subscriber,address,type\n" + "".join(f"1,{n},dynamic\n" for n in nets)
    expected = sorted(
        (i + 2, f"overlaps line {j + 2} ({nets[j]})") for i, j in reference_overlaps(nets).items()
    )
    if expected:
        assert problems_of(text, strict=True) == expected
    else:
        assert len(parse_subscribers_text(text, strict=True)) == len(nets)


# --- addresses: the fast path agrees with ipaddress -------------------------------------------

v4_text = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
v6_text = st.integers(0, (1 << 128) - 1).map(lambda x: str(ipaddress.IPv6Address(x)))
v6_exploded = st.integers(0, (1 << 128) - 1).map(lambda x: ipaddress.IPv6Address(x).exploded)
junk = st.text(alphabet="0123456789abcdef:./%x ", max_size=24)
address_text = st.one_of(
    v4_text, v6_text, v6_exploded, junk,
    st.tuples(st.one_of(v4_text, v6_text), st.integers(0, 130)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(v4_text, v4_text).map(lambda t: f"{t[0]}/{t[1]}"),
)


@settings(max_examples=1000, deadline=None)
@given(address_text)
def test_check_network_agrees_with_ipaddress(text: str) -> None:
    got = check_network(text)
    try:
        want = ipaddress.ip_network(text, strict=True)
    except ValueError:
        assert isinstance(got, str)
        return
    if "%" in text or (want.version == 6 and overlaps_v4mapped(int(want.network_address),
                                                                 want.prefixlen)):
        assert isinstance(got, str)   # scoped, or reaching into ::ffff:0:0/96 (IPv4's place)
        return
    assert not isinstance(got, str)
    assert type(got) is type(want)
    assert (got, hash(got), str(got), repr(got)) == (want, hash(want), str(want), repr(want))
    assert got.broadcast_address == want.broadcast_address


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([4, 6]), st.data())
def test_fast_network_factory_matches_constructor(version: int, data: st.DataObject) -> None:
    bits = 32 if version == 4 else 128
    plen = data.draw(st.integers(0, bits))
    value = data.draw(st.integers(0, (1 << bits) - 1)) & ~((1 << (bits - plen)) - 1)
    cls = V4 if version == 4 else V6
    got, want = subscribers._NET[version](value, plen), cls((value, plen))
    assert vars(got).keys() == vars(want).keys()
    assert (got, hash(got), repr(got)) == (want, hash(want), repr(want))
    if plen >= bits - 1:
        assert list(got.hosts()) == list(want.hosts())
    assert got.supernet(new_prefix=max(plen - 1, 0)) == want.supernet(new_prefix=max(plen - 1, 0))


# --- round trip -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A generated valid row, and how to spell it."""

    sub_id: int
    network: V4 | V6
    type: str
    up: int
    down: int
    flags: frozenset[str]


def any_network() -> st.SearchStrategy[V4 | V6]:
    """Networks of every size, aligned."""
    v4 = st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, 32)).map(
        lambda t: V4(t, strict=False))
    v6 = st.tuples(st.integers(0, (1 << 128) - 1), st.integers(0, 128)).map(
        lambda t: V6(t, strict=False)).filter(
        lambda n: not overlaps_v4mapped(int(n.network_address), n.prefixlen))
    return st.one_of(v4, v6)


rows_strategy = st.lists(
    st.builds(
        Row,
        sub_id=st.integers(1, 0xFFFFFFFF),
        network=any_network(),
        type=st.sampled_from(["dynamic", "static"]),
        up=st.integers(0, 0xFFFFFFFF),
        down=st.integers(0, 0xFFFFFFFF),
        flags=st.frozensets(st.sampled_from(FLAGS)),
    ),
    max_size=30,
    unique_by=lambda r: r.network,
)


def spell(row: Row, columns: list[str], rnd: random.Random) -> str:
    """One CSV line for ``row``, in the given column order, with harmless variations."""
    net = row.network
    address = str(net)
    if net.prefixlen == net.max_prefixlen and rnd.random() < 0.5:
        address = str(net.network_address)  # a bare address is a /32 or /128
    elif net.version == 6 and rnd.random() < 0.3:
        address = f"{net.network_address.exploded}/{net.prefixlen}"
    fields = {
        "subscriber": str(row.sub_id),
        "address": address,
        "type": row.type,
        "up_kbps": "" if row.up == 0 and rnd.random() < 0.5 else str(row.up),
        "down_kbps": "" if row.down == 0 and rnd.random() < 0.5 else str(row.down),
        "flags": ";".join(rnd.sample(sorted(row.flags), len(row.flags))),
    }
    out = []
    for c in columns:
        value = fields[c]
        if rnd.random() < 0.1:
            value = f"  {value}\t"
        if rnd.random() < 0.1:
            value = f'"{value}"'
        out.append(value)
    return ",".join(out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, st.permutations(["up_kbps", "down_kbps", "flags"]), st.integers(0, 3),
       st.permutations(["subscriber", "address", "type"]), st.randoms(use_true_random=False))
def test_round_trip(rows: list[Row], optional: list[str], n_optional: int,
                    required: list[str], rnd: random.Random) -> None:
    """A valid table written as CSV parses back to the same rows, on the right lines."""
    columns = required + optional[:n_optional]
    rnd.shuffle(columns)
    lines = [",".join(columns)]
    expected = []
    for row in rows:
        while rnd.random() < 0.2:
            lines.append(rnd.choice(["", "# a comment, with commas", "   "]))
        lines.append(spell(row, columns, rnd))
        keep = set(columns)
        expected.append(Subscriber(
            len(lines), row.sub_id, row.network, row.type,
            row.up if "up_kbps" in keep else 0,
            row.down if "down_kbps" in keep else 0,
            row.flags if "flags" in keep else frozenset(),
        ))
    newline = rnd.choice(["\n", "\r\n"])
    text = newline.join(lines) + rnd.choice(["", newline])
    assert parse_subscribers_text(text) == expected


# --- one pass ---------------------------------------------------------------------------------

# Ways to break one field of a valid row, each with the problem it must produce.
BREAKERS = {
    "subscriber": ("0", "bad subscriber id '0' (must be 1..4294967295)"),
    "type": ("fixed", "unknown type 'fixed' (must be 'dynamic' or 'static')"),
    "up_kbps": ("fast", "bad rate in up_kbps: 'fast' (kbit/s 0..4294967295; 0 or empty = "
                        "unlimited)"),
    "down_kbps": ("-1", "bad rate in down_kbps: '-1' (kbit/s 0..4294967295; 0 or empty = "
                        "unlimited)"),
    "flags": ("gold", "unknown flag 'gold' (known: suspended, op25b_exempt, ip53b_exempt)"),
    "address": ("192.0.2.1/24", "host bits set in 192.0.2.1/24"),
}
COLUMNS = HEADER.split(",")


@settings(max_examples=200, deadline=None)
@given(rows_strategy.filter(lambda rows: len(rows) >= 2), st.data())
def test_errors_need_one_pass(rows: list[Row], data: st.DataObject) -> None:
    """Every problem is reported on the first run: restoring exactly the reported rows and
    deleting the reported duplicates gives a file that loads; nothing is missed or doubled.

    A row may have several broken fields; broken rows keep their address (unless it is the
    broken field) and still count for duplicates.
    """
    n = len(rows)
    broken = data.draw(st.dictionaries(
        st.integers(0, n - 1), st.sets(st.sampled_from(sorted(BREAKERS)), min_size=1),
        max_size=n))
    # Later rows repeating an earlier row's address (one whose address is not broken: the
    # parser cannot know what a broken address was meant to be).
    dups = data.draw(st.lists(
        st.sampled_from([i for i in range(n) if "address" not in broken.get(i, ())] or [-1]),
        max_size=3).filter(lambda d: -1 not in d))

    def line_of(row: Row, broken_fields: set[str]) -> str:
        fields = {
            "subscriber": str(row.sub_id), "address": str(row.network), "type": row.type,
            "up_kbps": str(row.up), "down_kbps": str(row.down), "flags": ";".join(row.flags),
        }
        for f in broken_fields:
            fields[f] = BREAKERS[f][0]
        return ",".join(fields[c] for c in COLUMNS)

    lines = [HEADER] + [line_of(r, broken.get(i, set())) for i, r in enumerate(rows)]
    expected = [(i + 2, BREAKERS[f][1]) for i in sorted(broken) for f in COLUMNS
                if f in broken[i]]
    for i in dups:
        lines.append(line_of(replace(rows[i], sub_id=rows[i].sub_id % 7 + 1), set()))
        expected.append((len(lines), f"duplicate of line {i + 2}"))
    if not expected:
        assert len(parse_subscribers_text("\n".join(lines))) == n
        return
    assert problems_of("\n".join(lines)) == expected

    fixed = [HEADER] + [line_of(r, set()) for r in rows]
    assert len(parse_subscribers_text("\n".join(fixed))) == n


# --- speed ------------------------------------------------------------------------------------


def big_table(n: int) -> str:
    """``n`` host rows (80% IPv4, 20% IPv6) inside two pools, like a large access network."""
    out = [HEADER, "1,100.64.0.0/10,dynamic,,,", "2,2001:db8::/32,dynamic,,,"]
    for i in range(n):
        if i % 5:
            a = 0x64400000 + i
            out.append(f"{i + 3},{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255},"
                       f"dynamic,1000,10000,")
        else:
            out.append(f"{i + 3},2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::/64,static,,,op25b_exempt")
    return "\n".join(out) + "\n"


def test_large_table_is_fast() -> None:
    """Linear-ish time: 200k rows, every one an overlap in strict mode. O(n^2) would never end.

    The bound is loose (the measured time is about 1 s); 1,000,000 rows take about 4-5 s.
    """
    text = big_table(200_000)
    t0 = time.perf_counter()
    rows = parse_subscribers_text(text)
    t1 = time.perf_counter()
    with pytest.raises(SourceError) as info:
        parse_subscribers_text(text, strict=True)
    t2 = time.perf_counter()
    assert len(rows) == 200_002
    assert len(info.value.problems) == 200_000
    assert t1 - t0 < 20 and t2 - t1 < 30, (t1 - t0, t2 - t1)


@pytest.mark.parametrize("entry", ["::/0", "::ffff:192.0.2.1", "::ffff:0:0/96", "::/80"])
def test_ipv6_rows_may_not_reach_into_the_ipv4_mapped_range(entry: str) -> None:
    """IPv4 lives at ::ffff:0:0/96 in the maps: such a row would classify IPv4 packets."""
    with pytest.raises(SourceError) as e:
        parse_subscribers_text(f"{HEADER}\n1,{entry},dynamic,,,\n")
    assert "IPv6 entry overlapping ::ffff:0:0/96" in str(e.value)


def test_plans_come_from_the_plan_column_only(tmp_path):
    with_plans = tmp_path / "plans.csv"
    with_plans.write_text("# plans\nsubscriber,address,type,plan\n1,192.0.2.1,dynamic,home\n"
                          "2,192.0.2.2,static,\n3,192.0.2.3,static,biz\n")
    assert subscribers.read_plans(str(with_plans)) == {1: "home", 3: "biz"}
    without = tmp_path / "noplans.csv"
    without.write_text("subscriber,address,type\n1,192.0.2.1,dynamic\n")
    assert subscribers.read_plans(str(without)) == {}


# ---- files.both: two parts of a parse at once -------------------------------------------------


def _pid_and(x: int) -> tuple[int, int]:
    import os

    return os.getpid(), x


@pytest.mark.parametrize("fork", [True, False])
def test_both_gives_each_result_and_forks_only_where_it_may(monkeypatch, fork: bool):
    import os

    from xdpzoot.sources import files

    monkeypatch.setattr(files, "may_fork", lambda: fork)
    (here_pid, a), (there_pid, b) = files.both(lambda: _pid_and(1), lambda: _pid_and(2))
    assert (a, b) == (1, 2) and here_pid == os.getpid()
    assert (there_pid != os.getpid()) == fork


def test_both_runs_there_here_when_the_child_gives_nothing(monkeypatch):
    """A child that raised sent nothing: ``there`` runs here, and its error is raised here."""
    import os

    from xdpzoot.sources import files

    monkeypatch.setattr(files, "may_fork", lambda: True)
    me = os.getpid()

    def there() -> int:
        if os.getpid() != me:
            raise RuntimeError("in the child")
        return 7

    assert files.both(lambda: 1, there) == (1, 7)
    with pytest.raises(ZeroDivisionError):
        files.both(lambda: 1, lambda: 1 // 0)
