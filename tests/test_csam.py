"""The CSAM list in the control plane: parsing and validation, the raw layouts csam.py packs
by hand, the generation switch against real pinned maps, and the CLI as a black box.

The list is confidential: every error, warning and report is checked for the absence of the
entries it is about. List data lives in documentation ranges (and 198.18.0.0/15) only.
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import ipaddress
import json
import os
import re
import secrets
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from xdpzoot import config, tables
from xdpzoot.dataplane import blocklist, dirs, kernel, layout, schema
from xdpzoot.sources import csam, files
from xdpzoot.sources.files import MAX_SHOWN, SourceError

C = schema.C
PATH = "lists/csam.txt"   # how errors name the file in the parser tests

# ---- helpers -------------------------------------------------------------------------------


def want(*nets: str) -> tuple[set[bytes], set[tables.Key]]:
    """(hosts, prefixes) a list of these networks must parse to: /32 and /128 are hosts."""
    hosts, prefixes = set(), set()
    for n in map(ipaddress.ip_network, nets):
        if tables.is_host(n):
            hosts.add(tables.addr16(n.network_address))
        else:
            prefixes.add(tables.key_of(n))
    return hosts, prefixes


def counts_of(hosts: set[bytes], prefixes: set[tables.Key]) -> dict[str, int]:
    v4 = csam.V4MAPPED
    h4 = sum(1 for a in hosts if a[:12] == v4)
    p4 = sum(1 for _, a in prefixes if a[:12] == v4)
    return {"hosts4": h4, "hosts6": len(hosts) - h4, "prefixes4": p4,
            "prefixes6": len(prefixes) - p4}


def kind_of(hosts: set[bytes], prefixes: set[tables.Key], a: bytes) -> str | None:
    """Pure-Python answer of blocklist.check: an exact entry first, else a covering prefix."""
    if a in hosts:
        return "exact"
    if any(tables.covers(k, a) for k in prefixes):
        return "prefix"
    return None


def parse_err(data: bytes, path: str = PATH) -> SourceError:
    with pytest.raises(SourceError) as ei:
        csam.parse_csam_bytes(data, path)
    return ei.value


# ---- 1. parser: valid lists ------------------------------------------------------------------

# (id, file bytes, the networks it holds)
VALID = [
    ("v4-host", b"192.0.2.1\n", ["192.0.2.1/32"]),
    ("v6-host", b"2001:db8::1\n", ["2001:db8::1/128"]),
    ("v4-prefix", b"198.51.100.0/24\n", ["198.51.100.0/24"]),
    ("v6-prefix", b"2001:db8:1::/48\n", ["2001:db8:1::/48"]),
    ("v4-slash32-is-a-host", b"192.0.2.7/32\n", ["192.0.2.7/32"]),
    ("v6-slash128-is-a-host", b"2001:db8::7/128\n", ["2001:db8::7/128"]),
    ("v4-slash31", b"203.0.113.6/31\n", ["203.0.113.6/31"]),
    ("v4-benchmark-range", b"198.18.0.0/15\n", ["198.18.0.0/15"]),
    ("v4-len-zero-padded", b"198.51.100.0/024\n192.0.2.9/032\n",
     ["198.51.100.0/24", "192.0.2.9/32"]),
    ("v4-everything", b"0.0.0.0/0\n", ["0.0.0.0/0"]),
    ("v6-slash32", b"2001:db8::/32\n", ["2001:db8::/32"]),
    ("full-line-comments", b"# CSAM list, 2024-06-01\n#no space\n192.0.2.1\n", ["192.0.2.1/32"]),
    ("trailing-comments", b"192.0.2.1 # why\n2001:db8:5::/48# tight\n198.51.100.9#x\n",
     ["192.0.2.1/32", "2001:db8:5::/48", "198.51.100.9/32"]),
    ("indented-comment", b"   # indented\n\t# tab\n", []),
    ("blank-lines", b"\n\n192.0.2.1\n\n   \n\t\n", ["192.0.2.1/32"]),
    ("surrounding-whitespace", b"  \t192.0.2.1 \t\n\t198.51.100.0/24   \n 2001:db8::5\t\n",
     ["192.0.2.1/32", "198.51.100.0/24", "2001:db8::5/128"]),
    ("crlf", b"192.0.2.1\r\n198.51.100.0/24\r\n# c\r\n\r\n2001:db8::1 # d\r\n",
     ["192.0.2.1/32", "198.51.100.0/24", "2001:db8::1/128"]),
    ("no-final-newline", b"192.0.2.1\n203.0.113.0/25", ["192.0.2.1/32", "203.0.113.0/25"]),
    ("duplicates", b"192.0.2.1\n192.0.2.1/32\n192.0.2.1\n198.51.100.0/24\n198.51.100.0/24\n",
     ["192.0.2.1/32", "198.51.100.0/24"]),
    ("v6-spellings", b"2001:DB8:0:0:0:0:0:1\n2001:0db8::1\n2001:db8::1/128\n",
     ["2001:db8::1/128"]),
    ("host-inside-listed-prefix", b"198.51.100.0/24\n198.51.100.7\n",
     ["198.51.100.0/24", "198.51.100.7/32"]),
    ("empty-file", b"", []),
    ("only-comments", b"# a\n#b\n\n", []),
    ("non-ascii-comments", "# 児童ポルノ掲載アドレスリスト\n192.0.2.1 # 削除済み\n".encode(),
     ["192.0.2.1/32"]),
]


@pytest.mark.parametrize(("data", "nets"), [pytest.param(d, n, id=i) for i, d, n in VALID])
def test_valid(data: bytes, nets: list[str]):
    lst = csam.parse_csam_bytes(data, PATH)
    hosts, prefixes = want(*nets)
    assert set(lst.hosts) == hosts
    assert set(lst.prefixes) == prefixes
    assert lst.counts() == counts_of(hosts, prefixes)
    assert lst.sha256 == hashlib.sha256(data).digest()


def test_crlf_is_the_same_list_with_another_digest():
    lf = b"# x\n192.0.2.1\n198.51.100.0/24 # y\n2001:db8::/48\n"
    a, b = csam.parse_csam_bytes(lf), csam.parse_csam_bytes(lf.replace(b"\n", b"\r\n"))
    assert (a.hosts, a.prefixes, a.counts()) == (b.hosts, b.prefixes, b.counts())
    assert a.sha256 != b.sha256   # the digest is of the file's bytes


# ---- 1. parser: every error class, with its line, without its entry ---------------------------

NOT_ADDR = "not an IPv4 or IPv6 address or prefix"
BAD_LEN = "bad prefix length"
HOST_BITS = "host bits set in the prefix"

# (id, the bad line, the problem); each entry is long enough not to be found in an error
# message by accident.
BAD = [
    ("name", "csam-host.example", NOT_ADDR),
    ("v4-octet-256", "192.0.2.256", NOT_ADDR),
    ("v4-three-octets", "198.51.100", NOT_ADDR),
    ("v4-leading-zero", "192.0.2.017", NOT_ADDR),
    ("v4-hex", "0xc0000201", NOT_ADDR),
    ("v6-two-double-colons", "2001:db8::1::2", NOT_ADDR),
    ("v6-scope", "2001:db8::77%eth0", NOT_ADDR),
    ("two-addresses", "192.0.2.55 198.51.100.55", NOT_ADDR),
    ("address-and-word", "192.0.2.56 blocked", NOT_ADDR),
    ("range", "192.0.2.10-192.0.2.20", NOT_ADDR),
    ("v4-len-33", "192.0.2.0/33", BAD_LEN),
    ("v6-len-129", "2001:db8:77::/129", BAD_LEN),
    ("v6-len-200", "2001:db8:78::/200", BAD_LEN),
    ("len-non-numeric", "198.51.100.0/abc", BAD_LEN),
    ("len-mixed", "198.51.100.0/2x", BAD_LEN),
    ("len-empty", "203.0.113.0/", BAD_LEN),
    ("len-four-digits", "203.0.113.0/0024", BAD_LEN),
    ("v4-prefix-leading-zero", "198.051.100.0/24", NOT_ADDR),
    ("len-negative", "203.0.113.0/-8", BAD_LEN),
    ("len-plus", "203.0.113.0/+24", BAD_LEN),
    ("len-netmask", "203.0.113.0/255.255.255.0", BAD_LEN),
    ("two-slashes", "198.51.100.0/24/8", BAD_LEN),
    ("len-then-word", "198.51.100.0/24 and more", BAD_LEN),
    ("len-fullwidth-digits", "198.51.100.0/２４", BAD_LEN),
    ("v4-host-bits", "192.0.2.77/24", HOST_BITS),
    ("v4-host-bits-15", "198.19.0.0/15", HOST_BITS),
    ("v6-host-bits", "2001:db8:79::1/64", HOST_BITS),
    ("v6-host-bits-32", "2001:db8:7a::/32", HOST_BITS),
    ("garbage-punctuation", "!!!###", NOT_ADDR),   # '#': the rest is a comment
    ("garbage-pem", "-----BEGIN PGP MESSAGE-----", NOT_ADDR),
    ("garbage-semicolon", "192.0.2.57;", NOT_ADDR),
    ("garbage-control", "\x7f\x01\x02garbage", NOT_ADDR),
    ("non-ascii-fullwidth", "１９２.０.２.58", NOT_ADDR),
    ("non-ascii-nbsp", "192.0.2.59\u00a0", NOT_ADDR),
    ("non-ascii-idn", "児童.example", NOT_ADDR),
    ("non-ascii-latin1", "192.0.2.60\xe9", NOT_ADDR),
]
# "!!!###" is "!!!" before its comment.
SHOWN = {"garbage-punctuation": "!!!"}


def _bad_file(line: str) -> bytes:
    """The bad line as line 3 of an otherwise good file."""
    enc = line.encode("latin-1") if line.endswith("\xe9") else line.encode()
    return b"# header\n192.0.2.1\n" + enc + b"\n198.51.100.0/24\n2001:db8::1\n"


@pytest.mark.parametrize(("line", "problem"), [pytest.param(b, p, id=i) for i, b, p in BAD])
def test_error(line: str, problem: str):
    err = parse_err(_bad_file(line))
    assert err.problems == [(3, problem)]
    msg = str(err)
    assert msg == f"{PATH}:3: {problem}"
    assert line.strip() not in msg and line.split("/")[0].strip() not in msg
    for good in ("192.0.2.1", "198.51.100.0", "2001:db8::1"):
        assert good not in msg




@pytest.mark.parametrize("line", ["192.0.2.61\x00", "2001:db8::61\x00", "192.0.2.0\x00/24"],
                         ids=["v4", "v6", "before-slash"])
def test_error_nul_byte(line: str):
    err = parse_err(_bad_file(line))
    assert err.problems == [(3, NOT_ADDR)]




@pytest.mark.parametrize("ws", ["\x1c", "\x1d", "\x1e", "\x1f"], ids=lambda w: hex(ord(w)))
def test_line_verdict_does_not_depend_on_other_lines(ws: str):
    line = f"192.0.2.62{ws}".encode()
    try:
        csam.parse_csam_bytes(line + b"\n")
        alone_ok = True
    except SourceError:
        alone_ok = False
    err = parse_err(line + b"\nnot-an-address.example\n")
    assert [n for n, _ in err.problems] == ([2] if alone_ok else [1, 2])


def test_every_problem_is_reported():
    data = b"192.0.2.1\n192.0.2.0/33\nbad-entry.example\n\n192.0.2.5/24\n2001:db8::1\n"
    err = parse_err(data)
    assert err.problems == [(2, BAD_LEN), (3, NOT_ADDR), (5, HOST_BITS)]
    assert str(err).splitlines() == [f"{PATH}:2: {BAD_LEN}", f"{PATH}:3: {NOT_ADDR}",
                                     f"{PATH}:5: {HOST_BITS}"]


def test_error_cap():
    bad = [f"bad-entry-{i:02d}.invalid" for i in range(30)]
    lines = []
    for b in bad:   # a good line between the bad ones: the numbers are the file's
        lines += ["198.51.100.1", b]
    err = parse_err("\n".join(lines).encode())
    assert len(err.problems) == 30
    out = str(err).splitlines()
    assert MAX_SHOWN == 20 and len(out) == 21
    assert out[:20] == [f"{PATH}:{2 * i + 2}: {NOT_ADDR}" for i in range(20)]
    assert out[20] == "... and 10 more problems"
    for b in bad:
        assert b not in str(err) and b.split(".")[0] not in str(err)


def test_error_cap_singular():
    err = parse_err(b"".join(b"bad-entry-%02d.invalid\n" % i for i in range(21)))
    assert str(err).splitlines()[-1] == "... and 1 more problem"


# ---- 1. parser: generated lists (hypothesis) -------------------------------------------------

RANGES4 = [ipaddress.ip_network(n) for n in
           ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15")]
RANGE6 = ipaddress.ip_network("2001:db8::/32")


@st.composite
def networks(draw) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A host or prefix inside the documentation ranges; hosts half of the time."""
    base = draw(st.sampled_from([*RANGES4, RANGE6, RANGE6]))
    top = base.max_prefixlen
    plen = top if draw(st.booleans()) else draw(st.integers(base.prefixlen, top))
    offset = draw(st.integers(0, base.num_addresses - 1))
    return ipaddress.ip_network((base.network_address + offset, plen), strict=False)


@st.composite
def entry_lines(draw, net) -> str:
    """One way of writing ``net`` on a line: spelling, /32 or not, whitespace, comment."""
    if tables.is_host(net):
        addr = net.network_address
        text = draw(st.sampled_from([str(addr), f"{addr}/{net.max_prefixlen}",
                                     addr.exploded if addr.version == 6 else str(addr)]))
    else:
        text = draw(st.sampled_from([str(net), net.exploded]))
    before = draw(st.sampled_from(["", "", " ", "\t", "  \t"]))
    after = draw(st.sampled_from(["", "", " ", "\t", " # note", "# tight", "\t# tab"]))
    return before + text + after


FILLER = st.sampled_from(["", "   ", "\t", "# a comment", "#", "  # indented comment",
                          "# 192.0.2.200 (commented out)"])


@st.composite
def list_files(draw, max_entries: int = 30) -> tuple[bytes, list]:
    """(file bytes, the networks in it): entries and filler lines in any order."""
    nets = draw(st.lists(networks(), max_size=max_entries))
    lines = [draw(entry_lines(n)) for n in nets]
    lines += draw(st.lists(FILLER, max_size=8))
    lines = draw(st.permutations(lines))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(lines) + draw(st.sampled_from([eol, ""]))
    return text.encode(), nets


def expected(nets) -> tuple[set[bytes], set[tables.Key]]:
    return want(*(str(n) for n in nets))


@settings(max_examples=150, deadline=None)
@given(list_files())
def test_generated_list_parses(case):
    data, nets = case
    hosts, prefixes = expected(nets)
    lst = csam.parse_csam_bytes(data, PATH)
    assert (set(lst.hosts), set(lst.prefixes)) == (hosts, prefixes)
    assert lst.counts() == counts_of(hosts, prefixes)
    # The bulk parser and the line-by-line one must agree on every valid file.
    assert csam._parse_careful(data, PATH) == lst


@pytest.fixture
def in_halves(monkeypatch):
    """Every list parsed in two processes (_parse_halves): as for a large list in a
    process of one thread (pytest's workers have more)."""
    monkeypatch.setattr(csam, "HALVES_BYTES", 1)
    monkeypatch.setattr(files, "may_fork", lambda: True)


HALVES = b"".join(f"192.0.{i}.{i}\n2001:db8::{i:x}\n198.51.{i}.0/24\n".encode()
                  for i in range(64)) + b"203.0.113.0/32\n2001:db8:5::/48\n"


def test_a_list_in_halves_is_the_list(in_halves):
    whole = csam._parse_careful(HALVES, PATH)
    with mock.patch.object(csam, "_parse_fast", side_effect=AssertionError):
        lst = csam.parse_csam_bytes(HALVES, PATH)   # the halves' parse, and no other
    assert lst == whole
    assert lst.counts() == {"hosts4": 65, "hosts6": 64, "prefixes4": 64, "prefixes6": 1}


@pytest.mark.parametrize("again", ["192.0.1.1", "192.0.40.40/32", "2001:db8::3",
                                   "198.51.2.0/24", "2001:db8:5::/48"])
def test_an_entry_in_both_halves_is_counted_as_the_whole_parse_counts_it(in_halves, again):
    data = f"{again}\n".encode() + HALVES   # once in the first half, once in the second
    assert csam._parse_halves(data) is None
    lst = csam.parse_csam_bytes(data, PATH)
    assert lst == csam._parse_careful(data, PATH)
    assert list(lst.dups.values()) == [2]


def test_a_bad_line_in_the_second_half_is_named(in_halves):
    lines = HALVES.splitlines()
    lines[-3] = b"192.0.2.256"
    err = parse_err(b"\n".join(lines) + b"\n")
    assert err.problems == [(len(lines) - 2, NOT_ADDR)]


BAD_FOR_HYPOTHESIS = [(b, p) for i, b, p in BAD if i not in SHOWN and "\xe9" not in b]


@settings(max_examples=150, deadline=None)
@given(list_files(max_entries=15), st.sampled_from(BAD_FOR_HYPOTHESIS), st.data())
def test_one_bad_line_is_named(case, bad, data):
    text, nets = case
    line, problem = bad
    lines = text.decode().split("\n")
    at = data.draw(st.integers(0, len(lines)))
    lines.insert(at, line)
    err = parse_err("\n".join(lines).encode())
    assert err.problems == [(at + 1, problem)]
    assert str(err) == f"{PATH}:{at + 1}: {problem}"
    assert line not in str(err)


# ---- 1. reading the file: permissions ---------------------------------------------------------


def write_list(path: Path, text: str | bytes, mode: int = 0o600) -> str:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)
    return str(path)


def test_world_readable_warns(tmp_path):
    p = write_list(tmp_path / "csam.txt", "192.0.2.1\n", 0o644)
    data, warnings = csam.read_list(p)
    assert data == b"192.0.2.1\n"
    assert len(warnings) == 1 and "readable by everyone" in warnings[0] and p in warnings[0]
    assert "192.0.2.1" not in warnings[0]
    lst, warnings2 = csam.parse_csam(p)
    assert warnings2 == warnings and lst.counts()["hosts4"] == 1


def test_world_readable_strict_refuses(tmp_path):
    p = write_list(tmp_path / "csam.txt", "192.0.2.1\n", 0o644)
    for call in (lambda: csam.read_list(p, strict=True), lambda: csam.parse_csam(p, True)):
        with pytest.raises(SourceError) as ei:
            call()
        assert ei.value.problems == [(None, "readable by everyone (--strict): chmod o-r")]
        assert str(ei.value).startswith(f"{p}: readable by everyone")
        assert "192.0.2.1" not in str(ei.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_not_world_readable_is_quiet(tmp_path, mode):
    p = write_list(tmp_path / "csam.txt", "192.0.2.1\n", mode)
    assert csam.read_list(p) == (b"192.0.2.1\n", [])
    assert csam.read_list(p, strict=True) == (b"192.0.2.1\n", [])


def test_missing_file(tmp_path):
    p = str(tmp_path / "absent.txt")
    with pytest.raises(SourceError) as ei:
        csam.parse_csam(p)
    assert str(ei.value) == f"{p}: cannot read: No such file or directory"


def test_error_names_the_file(tmp_path):
    p = write_list(tmp_path / "csam.txt", "192.0.2.1\n192.0.2.0/40\n")
    with pytest.raises(SourceError) as ei:
        csam.parse_csam(p)
    assert str(ei.value) == f"{p}:2: {BAD_LEN}"


# ---- 2. raw layouts against bcc's types --------------------------------------------------------

SYNC_DEFINES = ["-DXZ_MAX_CSAM_HOSTS=65536", "-DXZ_MAX_CSAM_PREFIXES=8192",
                "-DXZ_MAX_HOSTS=1024"]


@pytest.fixture(scope="module")
def compiled(bpffs):
    """The maps alone, compiled once for this module: (bcc object, pin dir)."""
    pin = os.path.join(bpffs, f"csam-{secrets.token_hex(3)}")
    bpf = kernel.compile_bpf(pin, SYNC_DEFINES, maps_only=True)
    try:
        yield bpf, pin
    finally:
        bpf.cleanup()
        kernel.unpin_all(pin)


def fields_of(s: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each field of a packed ('=') struct format."""
    assert s.format[0] == "="
    out, off = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", s.format[1:]):
        n = int(count or 1)
        if code == "s":
            out.append((off, n))
            off += n
        else:
            size = struct.calcsize("=" + code)
            for _ in range(n):
                out.append((off, size))
                off += size
    assert off == s.size
    return out


def ctype_fields(t) -> list[tuple[int, int]]:
    return [(getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


def test_lpm_key_layout(compiled):
    bpf, _ = compiled
    for name in (b"xz_csam_p0", b"xz_csam_p1"):
        key = bpf[name].Key
        assert ct.sizeof(key) == layout.LPM_KEY.size
        assert ctype_fields(key) == fields_of(layout.LPM_KEY)
        assert [n for n, *_ in key._fields_] == ["prefixlen", "addr"]
        assert ct.sizeof(bpf[name].Leaf) == len(csam.LISTED)


def test_host_key_layout(compiled):
    bpf, _ = compiled
    for name in (b"xz_csam_h0", b"xz_csam_h1"):
        assert ct.sizeof(bpf[name].Key) == 16
        assert ct.sizeof(bpf[name].Leaf) == len(csam.LISTED)


def flat_fields(t, base: int = 0) -> list[tuple[int, int]]:
    """(offset, size) of each scalar of a ctypes struct, nested structs and arrays opened
    (byte arrays stay one field, as struct's 's')."""
    out = []
    for name, typ, *_ in t._fields_:
        out += _flat(typ, base + getattr(t, name).offset)
    return out


def _flat(typ, off: int) -> list[tuple[int, int]]:
    if issubclass(typ, ct.Structure):
        return flat_fields(typ, off)
    if issubclass(typ, ct.Array) and ct.sizeof(typ._type_) > 1:
        n = ct.sizeof(typ._type_)
        return [f for i in range(typ._length_) for f in _flat(typ._type_, off + i * n)]
    return [(off, ct.sizeof(typ))]


def test_control_layout(compiled):
    """layout.Control is struct xz_control, whole: names, offsets, size."""
    bpf, _ = compiled
    leaf = bpf[b"xz_control"].Leaf
    assert [n for n, *_ in leaf._fields_] == list(layout.Control._fields)
    assert flat_fields(leaf) == fields_of(layout.CONTROL)
    assert ct.sizeof(leaf) == layout.CONTROL.size
    n = len(layout.Control._fields)
    v = leaf(*range(1, n + 1))
    assert layout.Control.unpack(bytes(v)) == layout.Control(*range(1, n + 1))
    assert layout.Control(*range(1, n + 1)).pack() == bytes(v)


# Map -> (key layout, value layout) as kernel.Maps packs them; None: a 16-byte address.
MAP_LAYOUTS = {
    "xz_hosts": (None, layout.CLASS), "xz_prefixes": (layout.LPM_KEY, layout.CLASS),
    "xz_allow": (layout.LPM_KEY, layout.U32), "xz_control": (layout.U32, layout.CONTROL),
    "xz_counters": (layout.U32, layout.COUNTER), "xz_fast": (layout.U32, layout.COUNTER),
    "xz_throttle": (layout.U32, layout.THROTTLE), "xz_manual": (layout.U32, layout.MANUAL),
    "xz_state": (layout.U32, layout.STATE), "xz_pool_addrs": (layout.U32, layout.STATE),
    "xz_pool_state": (None, layout.STATE), "xz_csam_meta": (layout.U32, layout.META),
    "xz_trace_state": (layout.U32, layout.TRACE_STATE),
    "xz_sub_idx": (layout.U32, layout.IDX_ROW), "xz_uniform": (layout.U32, layout.CLASS),
    "xz_sub_hosted": (layout.U32, layout.HOSTED),
    "xz_pool_op25b": (layout.U32, layout.ATTEMPTS),
    "xz_op25b_noted": (layout.U32, layout.NOTED),
    "xz_prefixes6": (layout.LPM_KEY, layout.CLASS),
    "xz_sub_v6_lens": (layout.U32, struct.Struct(f"={dirs.V6_LENS}s")),
    "xz_csam_l": (layout.U32, struct.Struct(f"={dirs.LINE_WORDS}I")),
    "xz_csam_n": (layout.U32, struct.Struct(f"={dirs.LINE_WORDS}I")),
    "xz_csam_f": (layout.U32, struct.Struct(f"=IIQ{dirs.FILTER_WORDS}Q")),
    "xz_csam_f4": (layout.U32, dirs.FILTER_HEAD), "xz_csam_b4": (layout.U32, struct.Struct("=Q")),
}


@pytest.mark.parametrize("name", sorted(MAP_LAYOUTS))
def test_map_layouts(compiled, name):
    """Every layout kernel.Maps packs, against bcc's types and the pinned map's sizes."""
    bpf, pin = compiled
    key, value = MAP_LAYOUTS[name]
    t = bpf[name.encode()]
    if key is None:
        assert ct.sizeof(t.Key) == 16
    else:
        assert ct.sizeof(t.Key) == key.size
        assert (flat_fields(t.Key) if issubclass(t.Key, ct.Structure)
                else [(0, ct.sizeof(t.Key))]) == fields_of(key)
    leaf = getattr(t, "sLeaf", t.Leaf)   # a per-CPU map's: one CPU's value
    assert ct.sizeof(leaf) == value.size
    assert (flat_fields(leaf) if issubclass(leaf, ct.Structure)
            else [(0, ct.sizeof(leaf))]) == fields_of(value)
    with kernel.Maps(pin) as m:
        pinned = m.map(name)
        assert (pinned.key_size, pinned.value_size) == (key.size if key else 16, value.size)


@pytest.mark.parametrize("name", ["xz_state", "xz_pool_addrs"])
def test_state_entries_lie_on_whole_lines(compiled, name):
    """The per-address state's arrays are made mappable (BPF_F_MMAPABLE) for where their
    values lie: from the start of a page, entry i at byte 128 i, two whole cache lines. The
    mapping is that memory: an entry written by slot is found at its offset there."""
    bpf, pin = compiled
    assert layout.STATE.size == 128
    with kernel.Maps(pin) as m:
        t = m.map(name)
        mem = t.view("B")   # refused for an array made without the flag
        value = bytes(range(1, 129))
        t.update(struct.pack("=I", 3), value)
        assert bytes(mem[3 * 128:4 * 128]) == value
        t.update(struct.pack("=I", 3), bytes(128))


def test_trace_event_layout(compiled):
    """layout.EVENT and layout.Event are struct xz_trace_event, the ring buffer's records:
    names, offsets, size; the pinned ring is XZ_TRACE_RING_BYTES."""
    bpf, pin = compiled
    leaf = bpf[b"xz_trace_ring"].Leaf
    assert ct.sizeof(leaf) == layout.EVENT.size
    assert flat_fields(leaf) == fields_of(layout.EVENT)
    assert [n for n, *_ in leaf._fields_ if n != "_pad"] == list(layout.Event._fields)
    v = leaf(ts=7, sub_id=9, reason=schema.REASONS.index("op25b"), verdict=1, role=1, hook=1,
             family=6, proto=17, sport=1234, dport=53)
    v.src.addr[15], v.dst.addr[0] = 1, 0x20
    assert layout.Event.unpack(bytes(v)) == layout.Event(
        7, 9, "op25b", "drop", "core", "tc", 6, 17, 1234, 53, bytes(15) + b"\1",
        b"\x20" + bytes(15))
    with kernel.Maps(pin) as m:
        assert m.trace_ring.max_entries == C["XZ_TRACE_RING_BYTES"]


def test_devmap_layout(compiled):
    """The fast path's devmap: ifindex -> ifindex, both u32; its MAC table: ifindex ->
    XZ_FAST_MACS Ethernet addresses, each with the ifindex its frames are routed from, a
    u64, then their reverse path filters, a u64 (struct xz_fast_mac,
    kernel.Maps.set_fast_ifs)."""
    bpf, pin = compiled
    size = 8 * C["XZ_FAST_MACS"] + 8
    assert ct.sizeof(bpf[b"xz_fast_macs"].Leaf) == layout.FAST_MAC.size == size
    with kernel.Maps(pin) as m:
        assert (m.devmap.key_size, m.devmap.value_size) == (layout.U32.size, layout.U32.size)
        assert (m.fast_macs_map.key_size, m.fast_macs_map.value_size) == (layout.U32.size, size)
        assert m.fast_macs_map.max_entries == m.devmap.max_entries


def test_meta_layout(compiled):
    bpf, _ = compiled
    leaf = bpf[b"xz_csam_meta"].Leaf
    assert ct.sizeof(leaf) == layout.META.size
    assert ctype_fields(leaf) == fields_of(layout.META)
    assert [n for n, *_ in leaf._fields_] == ["sha256", "loaded", "hosts4", "hosts6",
                                              "prefixes4", "prefixes6", "nets4", "_pad"]
    assert ct.sizeof(bpf[b"xz_csam_meta"].Key) == 4


def test_pinned_sizes_match(compiled):
    """What PinnedMap sees of the pins is what the packers produce."""
    _, pin = compiled
    with kernel.Maps(pin) as m:
        for t in m.csam_prefixes:
            assert (t.key_size, t.value_size) == (layout.LPM_KEY.size, 1)
        for t in m.csam_hosts:
            assert (t.key_size, t.value_size) == (16, 1)
        assert m.meta.value_size == layout.META.size
        assert m.control.value_size == layout.CONTROL.size
        assert m.hits.max_entries == C["XZ_NR_CSAM_HITS"] and m.hits.value_size == 8


# ---- 3. load against the kernel ----------------------------------------------------------------

NOW = 1_700_000_000


@pytest.fixture
def maps(compiled) -> Iterator[kernel.Maps]:
    with kernel.Maps(compiled[1]) as m:
        yield m


def in_force(m: kernel.Maps) -> tuple[int, int, set[bytes], set[tables.Key]]:
    """(generation, csam word, hosts, prefixes) of the generation in force, read back."""
    _, word = m.word()
    gen = word & C["XZ_CSAM_GEN"]
    hosts = set(m.csam_hosts[gen].keys())
    prefixes = set(map(layout.LPM_KEY.unpack, m.csam_prefixes[gen].keys()))
    return gen, word, hosts, prefixes


def probes(hosts: set[bytes], prefixes: set[tables.Key]) -> set[bytes]:
    """Addresses to ask about: every entry, the ends of every prefix, and neighbours."""
    out = set(hosts)
    for plen, a in prefixes:
        n = int.from_bytes(a, "big")
        last = n | ((1 << (128 - plen)) - 1)
        out |= {a, last.to_bytes(16, "big")}
        for x in (n - 1, last + 1):
            if 0 <= x < 1 << 128:
                out.add(x.to_bytes(16, "big"))
    for a in list(hosts):
        n = int.from_bytes(a, "big")
        out |= {(n + 1).to_bytes(16, "big"), (n - 1).to_bytes(16, "big")}
    out |= {tables.addr16(x) for x in ("192.0.2.250", "203.0.113.250", "2001:db8:ffff::1")}
    return out


def agree(m: kernel.Maps, data: bytes, hosts: set[bytes], prefixes: set[tables.Key],
          extra: set[bytes] = frozenset()) -> None:
    """The generation in force is exactly this list; check() and status() say so."""
    gen, word, h, p = in_force(m)
    assert (h, p) == (hosts, prefixes)
    assert word & C["XZ_CSAM_LINED"] and word & C["XZ_CSAM_NETS"]
    lines, nets = blocklist.word_lines(m, word)
    lines_hold(lines, hosts)
    nets_hold(nets, prefixes)
    assert len(lines) == min(len(m.csam_lines(gen)), 1 << config.csam_line_bits(
        sum(a[:12] == csam.V4MAPPED for a in hosts)))
    words = sum(dirs.net_count(p, a) for p, a in prefixes)   # sized by words, not prefixes
    assert len(nets) == min(len(m.csam_lines(gen, "n")), 1 << config.csam_line_bits(words))
    assert blocklist.status(m)["nets4"] == words
    assert bool(word & C["XZ_CSAM_HOSTS"]) == bool(hosts)
    assert bool(word & C["XZ_CSAM_PREFIXES"]) == bool(prefixes)
    model = tables.Tables(csam_hosts=set(hosts), csam_prefixes=set(prefixes))
    for a in probes(hosts, prefixes) | set(extra):
        k = kind_of(hosts, prefixes, a)
        assert blocklist.check(m, a) == k, tables.ip_of(a)
        assert model.csam(a) == (k is not None)
    st_ = blocklist.status(m)
    assert st_["generation"] == gen
    assert st_["sha256"] == hashlib.sha256(data).hexdigest()
    assert {k: st_[k] for k in ("hosts4", "hosts6", "prefixes4", "prefixes6")} == \
        counts_of(hosts, prefixes)
    assert blocklist.in_force(m, data)


def lines_hold(t, hosts: set[bytes]) -> None:
    """The lines hold the IPv4 ``hosts``: each in a slot of its line or counted in its
    ``more``, and nothing else."""
    words = dirs.v4_words(hosts)
    per_line = Counter(dirs.line_of(words, len(t)).tolist())
    slots = t[:, :dirs.LINE_KEYS]
    assert {int(w) for w in slots[slots != 0]} <= set(words.tolist())
    assert (slots != 0).sum() + t[:, dirs.LINE_KEYS].sum() == len(words)
    for i, n in per_line.items():
        assert (slots[i] != 0).sum() + t[i, dirs.LINE_KEYS] == n


def nets_hold(t, prefixes: set[tables.Key]) -> None:
    """The net lines hold the IPv4 ``prefixes``, a /24 and shorter as a word for each /24
    it covers: each in a slot of its /24's line or counted in its ``more``, nothing else."""
    words = dirs.v4_nets(prefixes)
    assert len(words) == sum(1 << max(0, 24 - (p - 96)) for p, a in prefixes
                             if a[:12] == csam.V4MAPPED)
    per_line = Counter(dirs.line_of(words, len(t), dirs.NET_BY).tolist())
    slots, more = t[:, :dirs.LINE_KEYS], t[:, dirs.LINE_KEYS]
    assert Counter(slots[slots != 0].tolist()) <= Counter(words.tolist())
    assert (slots != 0).sum() + more.sum() == len(words)
    for i, n in per_line.items():
        assert (slots[i] != 0).sum() + more[i] == n


def load(m: kernel.Maps, data: bytes) -> blocklist.LoadResult:
    return blocklist.load(m, data, now=lambda: NOW)


def reset(m: kernel.Maps) -> None:
    """Both generations empty (two distinct empty lists, so that both switch)."""
    for _ in range(2):
        load(m, f"# reset {secrets.token_hex(8)}\n".encode())
    assert all(not t.keys() for t in (*m.csam_hosts, *m.csam_prefixes))


LIST_A = b"""# list A
192.0.2.66
2001:db8::66
198.18.0.0/15
203.0.113.128/25
2001:db8:bad::/48
198.51.100.7/32
"""
LIST_B = b"""# list B
192.0.2.66
192.0.2.67
198.51.100.0/24
2001:db8:bad:1::/64
2001:db8::67/128
"""
NETS_A = ["192.0.2.66/32", "2001:db8::66/128", "198.18.0.0/15", "203.0.113.128/25",
          "2001:db8:bad::/48", "198.51.100.7/32"]
NETS_B = ["192.0.2.66/32", "192.0.2.67/32", "198.51.100.0/24", "2001:db8:bad:1::/64",
          "2001:db8::67/128"]


def test_load_switch_steps(maps):
    reset(maps)
    ha, pa = want(*NETS_A)
    hb, pb = want(*NETS_B)
    former = probes(ha, pa) | probes(hb, pb)
    n_a, n_b = len(ha) + len(pa), len(hb) + len(pb)
    gen0 = maps.word()[1] & C["XZ_CSAM_GEN"]

    r = load(maps, LIST_A)                      # A into the idle, emptied generation
    assert r == blocklist.LoadResult(n_a, 0, 1 - gen0, True)
    agree(maps, LIST_A, ha, pa, former)
    st_a = blocklist.status(maps)
    assert st_a["loaded"] == NOW

    word = maps.word()
    r = load(maps, LIST_A)                      # the same list: nothing written
    assert r == blocklist.LoadResult(0, 0, 1 - gen0, False)
    assert maps.word() == word and blocklist.status(maps) == st_a
    agree(maps, LIST_A, ha, pa, former)

    # B: the idle generation held A too (brought up to date after the switch): it is
    # written the difference between A and B, then switched in; then A's generation gets B.
    r = load(maps, LIST_B)
    assert r == blocklist.LoadResult(len(hb - ha) + len(pb - pa), len(ha - hb) + len(pa - pb),
                                     gen0, True)
    agree(maps, LIST_B, hb, pb, former)
    assert set(maps.csam_hosts[1 - gen0].keys()) == hb   # the idle one holds B as well
    assert blocklist.held(maps, 1 - gen0).text == LIST_B

    r = load(maps, b"# empty\n")                # empty: nothing listed, nothing looked up
    assert r == blocklist.LoadResult(0, n_b, 1 - gen0, True)
    agree(maps, b"# empty\n", set(), set(), former)
    assert maps.word()[1] == (1 - gen0) | C["XZ_CSAM_LINED"] | C["XZ_CSAM_NETS"] | (
        1 << C["XZ_CSAM_LINES_SHIFT"] | 1 << C["XZ_CSAM_NETS_SHIFT"])   # 2 lines of each
    for a in former:
        assert blocklist.check(maps, a) is None

    r = load(maps, LIST_A)                      # A again, after the empty list
    assert r == blocklist.LoadResult(n_a, 0, gen0, True)
    agree(maps, LIST_A, ha, pa, former)


def test_load_keeps_the_control_flags(maps):
    """Switching lists writes the csam word only: the global switches stay."""
    reset(maps)
    raw = bytearray(maps.control.lookup(b"\0\0\0\0"))
    flags = C["XZ_C_LOADED"] | C["XZ_C_OP25B"] | C["XZ_C_CSAM_REJECT"]
    struct.pack_into("=I", raw, 0, flags)
    maps.control.update(b"\0\0\0\0", bytes(raw))
    load(maps, LIST_B)
    assert maps.word()[0] == flags
    after = maps.control.lookup(b"\0\0\0\0")
    assert after[8:] == bytes(raw[8:])   # fields after the csam word, untouched
    struct.pack_into("=I", raw, 0, 0)
    maps.control.update(b"\0\0\0\0", bytes(raw))


def test_hosts_only_and_prefixes_only(maps):
    """The word says which kinds the list has: the data plane skips the others."""
    reset(maps)
    load(maps, b"192.0.2.66\n")
    assert maps.word()[1] & (C["XZ_CSAM_HOSTS"] | C["XZ_CSAM_PREFIXES"]) == C["XZ_CSAM_HOSTS"]
    load(maps, b"198.18.0.0/15\n")
    assert maps.word()[1] & (C["XZ_CSAM_HOSTS"] | C["XZ_CSAM_PREFIXES"]) == \
        C["XZ_CSAM_PREFIXES"]
    agree(maps, b"198.18.0.0/15\n", *want("198.18.0.0/15"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(list_files(max_entries=25), min_size=1, max_size=4))
def test_load_sequence(compiled, files):
    """Random lists loaded in turn: after each, the generation in force is that list."""
    with kernel.Maps(compiled[1]) as m:
        for data, nets in files:
            load(m, data)
            hosts, prefixes = expected(nets)
            agree(m, data, hosts, prefixes)


# ---- 3b. loads from the kept text ---------------------------------------------------------------


def entries_of(lst: csam.CsamList) -> set[bytes]:
    return {csam.entry_key(h, None) for h in lst.hosts} | \
        {csam.entry_key(None, p) for p in lst.prefixes}


def idle_holds(m: kernel.Maps, data: bytes) -> int:
    """Load ``data``: it is in the idle generation (returned) as well, with its text."""
    load(m, data)
    idle = 1 - (m.word()[1] & C["XZ_CSAM_GEN"])
    assert blocklist.held(m, idle).text == data
    return idle


def snapshot(m: kernel.Maps) -> tuple:
    """Everything a load may change: word, meta, kept texts and every entry."""
    return (m.word(), [m.meta.lookup(struct.pack("=I", g)) for g in (0, 1)],
            [kernel.read_blob(m.text_path(g)) for g in (0, 1)],
            [sorted(t.keys()) for t in (*m.csam_hosts, *m.csam_prefixes)])


@st.composite
def edited(draw, case: tuple[bytes, list]) -> bytes:
    """``case``'s file after a few edits: lines taken out, put in (new entries, the same
    entries again or spelt otherwise, copies of lines, comments, blanks), replaced, moved."""
    data, nets = case
    lines = data.decode().split("\n")
    for _ in range(draw(st.integers(1, 8))):
        line = draw(st.one_of(
            networks().flatmap(entry_lines), FILLER,
            *([st.sampled_from(nets).flatmap(entry_lines)] if nets else []),
            *([st.sampled_from(list(lines))] if lines else [])))
        at = draw(st.integers(0, len(lines)))
        op = draw(st.sampled_from(["del", "ins", "rep", "move"]))
        if op == "ins" or at == len(lines):
            lines.insert(at, line)
        elif op == "del":
            del lines[at]
        elif op == "rep":
            lines[at] = line
        else:
            lines.insert(draw(st.integers(0, len(lines) - 1)), lines.pop(at))
    return "\n".join(lines).encode()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(list_files(max_entries=25).flatmap(lambda c: st.tuples(st.just(c), edited(c))))
def test_load_from_the_text_is_a_full_load(compiled, case):
    """A list loaded over the idle generation's text, without parsing the whole file: the
    same entries, counts, result and kept duplicates as a full load."""
    (base, _), new = case
    assume(new != base)   # the list in force again: nothing to load
    before, after = csam.parse_csam_bytes(base), csam.parse_csam_bytes(new)
    # An IPv4 prefix shorter than /24 is a net word for each /24 it covers (a /15: 512): a
    # list with one may take its net lines past a power of two, and that load is a whole one.
    assume(all(dirs.net_count(*k) <= 1 for k in before.prefixes | after.prefixes))
    with kernel.Maps(compiled[1]) as m:
        idle = idle_holds(m, base)
        with mock.patch.object(csam, "parse_csam_bytes", side_effect=AssertionError):
            r = load(m, new)
        assert r == blocklist.LoadResult(len(entries_of(after) - entries_of(before)),
                                    len(entries_of(before) - entries_of(after)), idle, True)
        agree(m, new, set(after.hosts), set(after.prefixes))
        assert blocklist.held(m, idle) == blocklist.Held(new, after.dups,
                                                         blocklist._counts(after))


def test_duplicates_are_counted():
    """An entry goes when its last line goes, whatever the spelling."""
    lst = csam.parse_csam_bytes(b"192.0.2.1\n192.0.2.1/32 # again\n 192.0.2.1\n"
                                b"2001:db8::/32\n2001:0db8::/32\n198.18.0.0/15\n")
    one = csam.entry_key(tables.addr16("192.0.2.1"), None)
    net = csam.entry_key(None, (32, tables.addr16("2001:db8::")))
    assert lst.dups == {one: 3, net: 2}
    assert csam._parse_careful(b"192.0.2.1\n192.0.2.1\n", PATH).dups == {one: 2}
    assert csam.text_delta(b"192.0.2.1\n192.0.2.1/32\n", b"192.0.2.1/32\n") == {one: -1}


def test_load_from_the_text_with_duplicates(maps):
    reset(maps)
    idle_holds(maps, b"192.0.2.1\n192.0.2.1/32\n198.18.0.0/15\n")
    r = load(maps, b"192.0.2.1/32\n198.18.0.0/15\n198.18.0.0/15 # twice\n")
    assert (r.added, r.removed) == (0, 0)
    agree(maps, b"192.0.2.1/32\n198.18.0.0/15\n198.18.0.0/15 # twice\n",
          *want("192.0.2.1/32", "198.18.0.0/15"))


EDIT_OF_A = LIST_A.replace(b"192.0.2.66\n", b"192.0.2.99\n").replace(
    b"2001:db8:bad::/48", b"2001:db8:bad::/64")


@pytest.mark.parametrize("spoil", ["missing", "another text", "not a text", "meta cleared"])
def test_load_without_a_trusted_text(maps, spoil):
    """No kept text, or one that is not what meta says the generation holds: the whole
    file is parsed and the idle generation's keys read back, as before."""
    reset(maps)
    idle = idle_holds(maps, LIST_A)
    path = maps.text_path(idle)
    if spoil == "missing":
        os.unlink(path)
    elif spoil == "another text":
        kernel.pin_blob(path, blocklist.TEXT.pack(len(LIST_B), 0) + LIST_B)
    elif spoil == "not a text":
        kernel.pin_blob(path, b"\xff" * 64)
    else:   # what a killed load leaves: meta cleared, the tables half written
        maps.meta.update(struct.pack("=I", idle), bytes(layout.META.size))
        maps.csam_hosts[idle].update_many([tables.addr16("203.0.113.5")], csam.LISTED)
    with mock.patch.object(csam, "parse_csam_bytes", wraps=csam.parse_csam_bytes) as parse:
        r = load(maps, EDIT_OF_A)
    assert parse.called and r.generation == idle
    agree(maps, EDIT_OF_A, *want(*(n.replace("192.0.2.66", "192.0.2.99").replace(
        "/48", "/64") for n in NETS_A)))
    assert blocklist.held(maps, idle).text == EDIT_OF_A


def test_second_load_takes_the_delta_path(compiled):
    """On a fresh instance, the first load brings both generations to its list: the second
    load (a small change) parses and writes only the lines that differ."""
    pin = compiled[1]
    with kernel.Maps(pin) as m:
        reset(m)
        for g in (0, 1):   # fresh: no text kept, no list held
            m.meta.update(struct.pack("=I", g), bytes(layout.META.size))
            os.unlink(m.text_path(g))
        first = load(m, LIST_A)
        assert first.switched
        for g in (0, 1):
            assert blocklist.held(m, g).text == LIST_A
            assert set(m.csam_hosts[g].keys()) == want(*NETS_A)[0]
        with mock.patch.object(csam, "parse_csam_bytes", side_effect=AssertionError):
            second = load(m, EDIT_OF_A)
        assert (second.added, second.removed, second.switched) == (2, 2, True)
        edited_nets = [n.replace("192.0.2.66", "192.0.2.99").replace("/48", "/64")
                       for n in NETS_A]
        agree(m, EDIT_OF_A, *want(*edited_nets))
        for g in (0, 1):
            assert blocklist.held(m, g).text == EDIT_OF_A
            assert set(m.csam_hosts[g].keys()) == want(*edited_nets)[0]


# The swap calls each twice (hosts, prefixes); the n-th call is one after the switch
# (repin: the list's text, pinned for the other generation too).
@pytest.mark.parametrize("kill,n", [("delete_many", 3), ("add_new", 3), ("add_new", 4),
                                    ("repin", 1)])
def test_a_load_killed_while_the_idle_one_is_brought_up_to_date(maps, kill, n):
    """Killed after the switch, while the generation that was in force is written: the new
    list is in force, whole; the other generation untrusted until the next load."""
    reset(maps)
    idle_holds(maps, LIST_A)
    owner = kernel if kill == "repin" else kernel.PinnedMap
    real = getattr(owner, kill)
    seen = []

    def dying(*a, **k):
        seen.append(1)
        if len(seen) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    with mock.patch.object(owner, kill, autospec=True, side_effect=dying), \
            pytest.raises(KeyboardInterrupt):
        load(maps, EDIT_OF_A)
    edited_nets = [n.replace("192.0.2.66", "192.0.2.99").replace("/48", "/64") for n in NETS_A]
    agree(maps, EDIT_OF_A, *want(*edited_nets))
    gen = maps.word()[1] & C["XZ_CSAM_GEN"]
    assert blocklist.held(maps, 1 - gen) is None
    new = EDIT_OF_A + b"192.0.2.100\n"
    with mock.patch.object(csam, "parse_csam_bytes", wraps=csam.parse_csam_bytes) as parse:
        load(maps, new)
    assert parse.called   # no text to trust: the whole path, and right again
    agree(maps, new, *want(*edited_nets, "192.0.2.100/32"))


@pytest.mark.parametrize("kill", ["delete_many", "add_new", "pin_blob", "set_word"])
def test_a_killed_load_leaves_nothing_to_trust(maps, kill):
    """Killed at any step, a load leaves the list in force as it was and the idle
    generation untrusted: the next load parses the whole file and puts it right."""
    reset(maps)
    idle = idle_holds(maps, LIST_A)
    in_force_before = in_force(maps)
    owner = {"pin_blob": kernel, "set_word": kernel.Maps}.get(kill, kernel.PinnedMap)
    with mock.patch.object(owner, kill, side_effect=KeyboardInterrupt), \
            pytest.raises(KeyboardInterrupt):
        load(maps, EDIT_OF_A)
    assert in_force(maps) == in_force_before
    assert blocklist.held(maps, idle) is None or kill == "set_word"
    load(maps, EDIT_OF_A)
    agree(maps, EDIT_OF_A, *want(*(n.replace("192.0.2.66", "192.0.2.99").replace(
        "/48", "/64") for n in NETS_A)))


def test_bad_line_in_an_edited_file_changes_nothing(maps):
    reset(maps)
    idle_holds(maps, LIST_A)
    before = snapshot(maps)
    lines = EDIT_OF_A.split(b"\n")
    lines[2] = b"198.18.0.0/33"
    lines.insert(5, b"192.0.2.256  # a typo")
    with pytest.raises(SourceError) as e:
        load(maps, b"\n".join(lines))
    assert e.value.problems == [(3, BAD_LEN), (6, NOT_ADDR)]
    assert "198.18.0.0" not in str(e.value) and "192.0.2.256" not in str(e.value)
    assert snapshot(maps) == before


def test_the_text_is_for_root_alone(maps):
    reset(maps)
    for g in (0, 1):
        st_ = os.stat(maps.text_path(g))
        assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == 0
        with kernel.PinnedMap(maps.text_path(g)) as t:
            assert t.type == kernel.BPF_MAP_TYPE_ARRAY


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3000), st.lists(st.tuples(
    st.sampled_from(["del", "ins", "rep"]), st.integers(0, 1 << 16), st.integers(1, 300)),
    max_size=12), st.booleans())
def test_line_diff_gives_the_new_lines(n, edits, end):
    """Taking out and putting in what line_diff says turns the old lines into the new ones
    (as multisets), also with blocks of lines put in or taken out, and repeated lines."""
    lines = [b"10.0.%d.%d" % divmod(i % 2000, 256) for i in range(n)]
    new = list(lines)
    for op, at, k in edits:
        at %= len(new) + 1
        block = [b"10.1.%d.%d" % divmod((at + i) % 9, 256) for i in range(k)]
        if op == "del":
            del new[at:at + k]
        elif op == "ins":
            new[at:at] = block
        else:
            new[at:at + k] = block
    old_text = b"\n".join(lines) + (b"\n" if end and lines else b"")
    new_text = b"\n".join(new) + (b"\n" if not end and new else b"")
    diff = csam.line_diff(old_text, new_text, 1 << 30)
    gone, put = Counter(diff[0]), Counter(diff[1])
    assert not gone - Counter(lines) and Counter(lines) - gone + put == Counter(new)


def test_line_diff_finds_the_lines_that_differ():
    old = b"".join(b"192.0.2.%d\n" % i for i in range(200))
    new = old.replace(b"192.0.2.7\n", b"").replace(b"192.0.2.150\n", b"198.18.0.0/15\n")
    new += b"# the end"
    assert csam.line_diff(old, new, 1 << 20) == (
        [b"192.0.2.7", b"192.0.2.150"], [b"198.18.0.0/15", b"# the end"])
    assert csam.line_diff(old, old[::-1], 100) is None   # too different to pay


# ---- 4. the CLI as a black box -----------------------------------------------------------------

XDPZOOT = str(Path(sys.executable).with_name("xdpzoot"))
LIMITS = """[limits]
hosts = 1024
prefixes = 1024
allow = 64
csam_hosts = 4096
csam_prefixes = 1024
"""
SUBS_CSV = "subscriber,address,type\n7,100.64.7.0/24,dynamic\n8,100.64.8.9/32,static\n"

# Distinctive entries: none of them may ever be printed.
SECRET_NETS = ["198.18.123.45/32", "198.19.201.0/24", "2001:db8:c5a:beef::1234/128",
               "2001:db8:c5a:f00d::/64", "203.0.113.199/32"]
SECRET_LIST = ("# confidential\n198.18.123.45\n198.19.201.0/24 # hosting\n"
               "2001:db8:c5a:beef::1234\n2001:db8:c5a:f00d::/64\n203.0.113.199/32\n")
SECRET_LIST_2 = "# confidential, v2\n198.18.123.45\n2001:db8:c5a:f00d::/64\n"


SECRET = {ipaddress.ip_network(n) for n in SECRET_NETS}
TOKEN = re.compile(r"[0-9A-Fa-f:.]*[:.][0-9A-Fa-f:.]*(?:/\d+)?")


def leaked(text: str, asked: str | None = None) -> list[str]:
    """Listed entries in ``text``: any address or prefix token that is an entry of the
    secret list, or an entry's address; only the address a `check` asked about may be
    echoed."""
    out = []
    allowed = _as_net(asked) if asked else None
    for tok in TOKEN.findall(text):
        net = _as_net(tok) or _as_net(tok.rstrip(".:"))
        if net is None or net == allowed:
            continue
        if net in SECRET or any(net.network_address == s.network_address and
                                net.prefixlen == net.max_prefixlen for s in SECRET):
            out.append(tok)
    return out


def _as_net(tok: str):
    try:
        return ipaddress.ip_network(tok, strict=False)
    except ValueError:
        return None


class Cli:
    """``xdpzoot`` run in a network namespace of our own; every output kept for leak checks."""

    def __init__(self, ns: str, cfg: str):
        self.ns, self.cfg = ns, cfg
        self.outputs: list[tuple[list[str], str, str]] = []
        self.pins: list[str] = []

    def argv(self, pin: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, XDPZOOT, "--config", self.cfg,
                "--pin-dir", pin, *args]

    def run(self, pin: str, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(pin, *args), capture_output=True, text=True, timeout=120)
        self.outputs.append((list(args), r.stdout, r.stderr))
        return r

    def ok(self, pin: str, *args: str) -> dict:
        r = self.run(pin, *args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def popen(self, pin: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(pin, *args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    ns = f"xzcsam{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def cli(netns, tmp_path, bpffs) -> Iterator[Cli]:
    cfg = tmp_path / "xdpzoot.toml"
    cfg.write_text(LIMITS)
    c = Cli(netns, str(cfg))
    try:
        yield c
    finally:
        for pin in c.pins:
            kernel.unpin_all(pin)
        leaks = [(args, leaked(text, _asked(args))) for args, out, err in c.outputs
                 for text in (out, err) if leaked(text, _asked(args))]
        assert not leaks, f"listed entries were printed: {leaks}"


def _asked(args: list[str]) -> str | None:
    """The address a `blocklist check` was asked about may be echoed back, nothing else."""
    return args[2] if args[:2] == ["blocklist", "check"] else None


def new_instance(cli: Cli, bpffs: str, tmp_path: Path, creator: str) -> str:
    """A pin dir whose maps exist: made by `subscribers load` or by `blocklist load`."""
    pin = os.path.join(bpffs, f"cli-{secrets.token_hex(4)}")
    cli.pins.append(pin)
    if creator == "subscribers":
        subs = tmp_path / "subs.csv"
        subs.write_text(SUBS_CSV)
        assert cli.ok(pin, "subscribers", "load", str(subs))["added"] == 2
    else:
        first = write_list(tmp_path / "first.txt", "# first\n192.0.2.1\n")
        assert cli.ok(pin, "blocklist", "load", first)["switched"]
    assert kernel.pinned(pin)
    return pin


def listed_now(pin: str) -> tuple[set[bytes], set[tables.Key]]:
    with kernel.Maps(pin) as m:
        _, _, h, p = in_force(m)
    return h, p


STATUS_KEYS = ("generation", "hosts4", "hosts6", "prefixes4", "prefixes6", "sha256", "loaded")


@pytest.mark.parametrize("creator", ["subscribers", "blocklist"])
def test_cli_load_and_status(cli, bpffs, tmp_path, creator):
    pin = new_instance(cli, bpffs, tmp_path, creator)
    p = write_list(tmp_path / "csam.txt", SECRET_LIST)
    before = time.time()
    r = cli.ok(pin, "blocklist", "load", p)
    data = Path(p).read_bytes()
    assert r["switched"] and r["sha256"] == hashlib.sha256(data).hexdigest()
    assert (r["hosts4"], r["hosts6"], r["prefixes4"], r["prefixes6"]) == (2, 1, 1, 1)
    assert listed_now(pin) == want(*SECRET_NETS)

    st_ = cli.ok(pin, "blocklist", "status")
    assert set(st_) >= {*STATUS_KEYS, "hits"}
    assert st_["sha256"] == r["sha256"] and st_["generation"] == r["generation"]
    assert int(before) - 1 <= st_["loaded"] <= time.time() + 1
    assert (st_["hosts4"], st_["hosts6"], st_["prefixes4"], st_["prefixes6"]) == (2, 1, 1, 1)
    assert st_["hits"] == {"gen0_ipv4": 0, "gen0_ipv6": 0, "gen1_ipv4": 0, "gen1_ipv6": 0}
    # each family's filter is on, a few bits of its 2^20 set (one per /24 or /64 touched)
    assert 0 < st_["filter_fill"]["ipv4"] * 2**20 <= 3
    assert 0 < st_["filter_fill"]["ipv6"] * 2**20 <= 2
    assert st_["filter_bits"] == {"ipv4": 2**20, "ipv6": 2**20}   # a small list: hashed

    again = cli.ok(pin, "blocklist", "load", p)    # the list in force: nothing written
    assert not again["switched"] and (again["added"], again["removed"]) == (0, 0)
    assert cli.ok(pin, "blocklist", "status") == st_

    text = cli.run(pin, "blocklist", "status")
    assert text.returncode == 0 and r["sha256"] in text.stdout
    assert max(map(len, text.stdout.splitlines())) < 80
    assert "filter" in text.stdout and "0.0% set" in text.stdout
    v2 = write_list(tmp_path / "v2.txt", SECRET_LIST_2)
    refused = cli.run(pin, "blocklist", "load", v2)   # 5 entries to 2: more than half gone
    assert refused.returncode == 1 and "2 list entries would replace the 5 in force" in \
        refused.stderr and "csam.max_shrink" in refused.stderr
    assert listed_now(pin) == want(*SECRET_NETS)
    text = cli.run(pin, "blocklist", "load", "--force", v2)
    assert text.returncode == 0
    assert text.stdout.strip().startswith("CSAM list: 1 addresses, 1 prefixes; generation")
    assert listed_now(pin) == want("198.18.123.45/32", "2001:db8:c5a:f00d::/64")


def test_cli_check(cli, bpffs, tmp_path):
    pin = new_instance(cli, bpffs, tmp_path, "blocklist")
    cli.ok(pin, "blocklist", "load", write_list(tmp_path / "csam.txt", SECRET_LIST))
    for addr, entry in [("198.18.123.45", "exact"), ("198.19.201.77", "prefix"),
                        ("2001:db8:c5a:beef::1234", "exact"), ("2001:db8:c5a:f00d::9", "prefix"),
                        ("198.18.123.46", None), ("2001:db8:c5a:beef::1235", None)]:
        got = cli.ok(pin, "blocklist", "check", addr)
        assert got == {"address": addr, "listed": entry is not None, "entry": entry}
    for addr, line in [("203.0.113.199", "203.0.113.199: listed (exact entry)"),
                       ("192.0.2.1", "192.0.2.1: not listed")]:
        text = cli.run(pin, "blocklist", "check", addr)
        assert text.returncode == 0 and text.stdout == line + "\n"
    bad = cli.run(pin, "blocklist", "check", "198.18.999.1")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr

    # The empty list: no former entry is listed any more.
    empty = write_list(tmp_path / "empty.txt", "# nothing\n")
    assert cli.run(pin, "blocklist", "load", empty).returncode == 1
    assert listed_now(pin) == want(*SECRET_NETS)
    cli.ok(pin, "blocklist", "load", "--force", empty)
    assert listed_now(pin) == (set(), set())
    for addr in ("198.18.123.45", "2001:db8:c5a:f00d::"):
        assert cli.ok(pin, "blocklist", "check", addr)["listed"] is False


BAD_LIST = ("# confidential\n198.18.123.45\n198.18.99.0/33\n2001:db8:c5a:beef::1234\n"
            "2001:db8:c5a:dead::1/64\nnot-an-address.example\n")


@pytest.mark.parametrize("creator", ["subscribers", "blocklist"])
def test_cli_bad_file_changes_nothing(cli, bpffs, tmp_path, creator):
    pin = new_instance(cli, bpffs, tmp_path, creator)
    cli.ok(pin, "blocklist", "load", write_list(tmp_path / "good.txt", SECRET_LIST))
    before, listed = cli.ok(pin, "blocklist", "status"), listed_now(pin)
    bad = write_list(tmp_path / "bad.txt", BAD_LIST)
    r = cli.run(pin, "blocklist", "load", bad)
    assert r.returncode == 1 and not r.stdout
    assert r.stderr.splitlines() == [f"xdpzoot: error: {bad}:3: {BAD_LEN}",
                                     f"{bad}:5: {HOST_BITS}", f"{bad}:6: {NOT_ADDR}"]
    for entry in ("198.18.99.0", "2001:db8:c5a:dead::1", "not-an-address.example"):
        assert entry not in r.stderr
    assert cli.ok(pin, "blocklist", "status") == before and listed_now(pin) == listed


def test_cli_bad_file_on_a_fresh_instance(cli, bpffs, tmp_path):
    """Before anything was loaded: exit 1, and no list in force afterwards."""
    pin = os.path.join(bpffs, f"cli-{secrets.token_hex(4)}")
    cli.pins.append(pin)
    bad = write_list(tmp_path / "bad.txt", "198.18.0.1/8\n")
    r = cli.run(pin, "blocklist", "load", bad)
    assert r.returncode == 1 and f"{bad}:1: {HOST_BITS}" in r.stderr
    st_ = cli.ok(pin, "blocklist", "status")
    assert st_["loaded"] is None and st_["sha256"] is None
    assert listed_now(pin) == (set(), set())


def test_cli_nul_byte_is_a_clean_error(cli, bpffs, tmp_path):
    pin = new_instance(cli, bpffs, tmp_path, "subscribers")
    bad = write_list(tmp_path / "nul.txt", b"192.0.2.1\n198.18.123.45\x00\n")
    r = cli.run(pin, "blocklist", "load", bad)
    assert r.returncode == 1
    assert r.stderr == f"xdpzoot: error: {bad}:2: {NOT_ADDR}\n"


def test_cli_world_readable(cli, bpffs, tmp_path):
    pin = new_instance(cli, bpffs, tmp_path, "subscribers")
    p = write_list(tmp_path / "csam.txt", SECRET_LIST, 0o644)
    before = cli.ok(pin, "blocklist", "status")
    r = cli.run(pin, "blocklist", "load", "--strict", p)
    assert r.returncode == 1 and not r.stdout
    assert r.stderr == f"xdpzoot: error: {p}: readable by everyone (--strict): chmod o-r\n"
    assert cli.ok(pin, "blocklist", "status") == before
    assert listed_now(pin) == (set(), set())
    r = cli.run(pin, "blocklist", "load", p, "--json")
    assert r.returncode == 0
    assert r.stderr == f"xdpzoot: warning: {p}: readable by everyone: chmod o-r {p}\n"
    assert json.loads(r.stdout)["switched"]
    assert listed_now(pin) == want(*SECRET_NETS)


# ---- 5. concurrent writers ---------------------------------------------------------------------

SUBS_X = ("subscriber,address,type\n1,100.64.1.0/24,dynamic\n2,100.64.2.7/32,static\n"
          "3,100.64.2.8/32,static\n")
SUBS_Y = ("subscriber,address,type\n4,100.64.4.0/24,dynamic\n5,100.64.5.0/24,dynamic\n"
          "6,100.64.6.0/28,static\n")
TABLES_X = {"hosts": 2, "prefixes": 1, "allow": 0}
TABLES_Y = {"hosts": 0, "prefixes": 3, "allow": 0}
LIST_X = "# X\n192.0.2.10\n192.0.2.11\n198.18.0.0/16\n2001:db8:10::/48\n"
LIST_Y = "# Y\n192.0.2.20\n2001:db8::20\n2001:db8:20::/48\n203.0.113.0/24\n198.19.0.0/16\n"


def both(cli: Cli, pin: str, a: list[str], b: list[str]) -> None:
    """Start both commands before either can finish; both must succeed."""
    procs = [cli.popen(pin, *a), cli.popen(pin, *b)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        cli.outputs.append((a, out, err))
        assert p.returncode == 0, err


@pytest.mark.parametrize("fresh", [False, True], ids=["existing", "fresh"])
def test_concurrent_subscribers_load(cli, bpffs, tmp_path, fresh):
    if fresh:
        pin = os.path.join(bpffs, f"cli-{secrets.token_hex(4)}")
        cli.pins.append(pin)
    else:
        pin = new_instance(cli, bpffs, tmp_path, "subscribers")
    x, y = tmp_path / "x.csv", tmp_path / "y.csv"
    x.write_text(SUBS_X)
    y.write_text(SUBS_Y)
    both(cli, pin, ["subscribers", "load", str(x)], ["subscribers", "load", str(y)])
    assert cli.ok(pin, "status")["tables"] in (TABLES_X, TABLES_Y)


def _lists(tmp_path: Path) -> tuple[str, str, list]:
    """The two list files, and what each must leave in force."""
    x = write_list(tmp_path / "x.txt", LIST_X)
    y = write_list(tmp_path / "y.txt", LIST_Y)
    return x, y, [want(*_nets(LIST_X)), want(*_nets(LIST_Y))]


def _nets(text: str) -> list[str]:
    return [str(ipaddress.ip_network(s.split("#")[0].strip())) for s in text.splitlines()
            if s.split("#")[0].strip()]


def _one_of(cli: Cli, pin: str, x: str, y: str, sets: list) -> None:
    """The list in force is exactly one of the two files, and status has its digest."""
    got = listed_now(pin)
    assert got in sets, "the list in force is a mix of both files"
    path = (x, y)[sets.index(got)]
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert cli.ok(pin, "blocklist", "status")["sha256"] == sha


def test_concurrent_blocklist_load(cli, bpffs, tmp_path):
    pin = new_instance(cli, bpffs, tmp_path, "subscribers")
    x, y, sets = _lists(tmp_path)
    for _ in range(2):
        both(cli, pin, ["blocklist", "load", x], ["blocklist", "load", y])
        _one_of(cli, pin, x, y, sets)


def test_concurrent_blocklist_load_creating_the_maps(cli, bpffs, tmp_path):
    x, y, sets = _lists(tmp_path)
    for _ in range(3):
        pin = os.path.join(bpffs, f"cli-{secrets.token_hex(4)}")
        cli.pins.append(pin)
        both(cli, pin, ["blocklist", "load", x], ["blocklist", "load", y])
        _one_of(cli, pin, x, y, sets)


def test_blocklist_load_waits_for_the_lock(cli, bpffs, tmp_path):
    pin = new_instance(cli, bpffs, tmp_path, "subscribers")
    x, _, sets = _lists(tmp_path)
    held, release = threading.Event(), threading.Event()

    def holder():
        with kernel.lock(pin):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        proc = cli.popen(pin, "blocklist", "load", x)
        time.sleep(1.0)   # the brief's "hold it ~1 s": the writer must still be waiting
        assert proc.poll() is None, "blocklist load did not wait for the lock"
        assert listed_now(pin) == (set(), set())
    finally:
        release.set()
        t.join()
    out, err = proc.communicate(timeout=60)
    cli.outputs.append((["blocklist", "load", x], out, err))
    assert proc.returncode == 0, err
    assert time.monotonic() - start >= 1.0
    assert listed_now(pin) == sets[0]


@pytest.mark.parametrize("entry", ["::ffff:192.0.2.1", "::/0", "::/64", "::ffff:0:0/96",
                                   "::ffff:c000:200/120"])
def test_ipv6_entries_may_not_reach_into_the_ipv4_mapped_range(entry):
    with pytest.raises(SourceError) as e:
        csam.parse_csam_bytes(f"192.0.2.1\n{entry}\n".encode(), "l.txt")
    msg = str(e.value)
    assert msg.startswith("l.txt:2: IPv6 entry overlapping ::ffff:0:0/96")
    assert entry not in msg.replace("::ffff:0:0/96", "")   # the rule names the range only


# ---- batch writes on several threads (kernel._in_parallel) --------------------------------


@pytest.mark.parametrize("joined", [False, True], ids=["listed", "joined"])
@pytest.mark.parametrize("missing", ["", "batch:lpm_trie"], ids=["batches", "no-trie-batches"])
def test_batches_written_on_threads_are_all_there(dp, monkeypatch, joined, missing):
    """A write of many batches runs on threads: every key arrives, progress counts each
    once, and deletes take them all out again; at an LPM trie (batches, one thread) too,
    and key by key where the kernel has no trie batches; the keys given as a list or
    joined in one buffer (a whole load's addresses)."""
    monkeypatch.setattr(kernel, "BATCH", 100)
    monkeypatch.setenv(kernel.MISSING_ENV, missing)
    hosts, prefixes = dp.maps.csam_hosts[0], dp.maps.csam_prefixes[0]
    keys = [secrets.token_bytes(16) for _ in range(3_000)]
    pkeys = list({layout.LPM_KEY.pack(120, secrets.token_bytes(16)) for _ in range(700)})
    for m, ks in ((hosts, keys), (prefixes, pkeys)):
        seen = []
        m.update_many(b"".join(ks) if joined else ks, csam.LISTED, seen.append)
        assert sum(seen) == len(ks) and all(n <= 100 for n in seen)
        assert set(m.keys()) == set(ks)
        m.delete_many(ks)
        assert m.keys() == []


def test_a_batch_that_fails_on_a_thread_is_an_error(dp, monkeypatch):
    """More keys than the map holds: the batch that finds it full fails, and the write
    raises (KernelError naming the map) instead of hanging or passing."""
    monkeypatch.setattr(kernel, "BATCH", 256)
    hosts = dp.maps.csam_hosts[0]
    keys = [secrets.token_bytes(16) for _ in range(hosts.max_entries + 600)]
    with pytest.raises(kernel.KernelError, match="xz_csam_h0"):
        hosts.update_many(keys, csam.LISTED)
    hosts.delete_many(hosts.keys())
