"""Subscriber loads in bulk: the column-at-a-time parser against the row-by-row one, the
plan on ClassTables against the plain dict model it replaced, and loads into real maps
read back (layouts checked against bcc's types)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import secrets
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_csam import ctype_fields, fields_of

from xdpzoot import sync, tables
from xdpzoot.dataplane import kernel, layout, schema
from xdpzoot.dataplane.kernel import KernelError, Maps
from xdpzoot.dataplane.layout import CLASS, LPM_KEY, ClassTable, Entry
from xdpzoot.sources import files, subscribers
from xdpzoot.sources.files import SourceError

SUSPENDED = schema.C["XZ_F_SUSPENDED"]
DYNAMIC, STATIC = schema.TYPES["dynamic"], schema.TYPES["static"]


def rows_of(columns: tuple) -> tuple[list, list]:
    """The host and prefix columns as sorted rows, to compare regardless of row order."""
    return tuple(sorted(zip(*c, strict=True), key=lambda r: r[0]) for c in columns[:2])


# ---- 1. the bulk parser agrees with the row-by-row one -----------------------------------------

IDS = ["1", "7", "42", "4294967295", "007", "0", "4294967296", "00000000001", "+1", "", "1_0",
       "x"]
ADDRESSES = [
    "192.0.2.1", "192.0.2.2", "198.51.100.7", "192.0.2.0/24", "192.0.2.8/29", "192.0.2.9/29",
    "192.0.2.1/32", "10.0.0.0/8", "0.0.0.0/0", "192.0.2.01", "192.0.2.0/33", "192.0.2.0/",
    "192.0.2.0/255.255.255.0", "192.0.2", "2001:db8::1", "2001:DB8:0::1", "2001:db8::/56",
    "2001:db8::1/128", "2001:db8::1/64", "::ffff:192.0.2.1", "::/0", "fe80::1%eth0",
    "example.com", "",
]
TYPE_TEXT = ["dynamic", "static", "Static", ""]
RATES = ["", "0", "100", "4294967295", "4294967296", "1.5", "x"]
FLAG_TEXT = ["", "suspended", "op25b_exempt;suspended", "ip53b_exempt", ";", "vip"]
PLANS = ["", "gold", "a/b", "x:y", "#1"]
USERS = ["", "", "a@x", "b@x", "abc12345@zoot.example", "\u00e9t\u00e9@x", '"c,d@x"',
         "u" * 254, "\u200bzw@x", "e\x7f@x", "u" * 253]
# In a file of consistent users, the user of each good id (7 and 007 are one subscriber).
USER_OF = {1: "a@x", 7: "b@x", 42: "abc12345@zoot.example", 4294967295: "u" * 253}
OPTIONAL = ["up_kbps", "down_kbps", "flags", "plan", "user"]
FIELDS = {"subscriber": IDS, "address": ADDRESSES, "type": TYPE_TEXT, "up_kbps": RATES,
          "down_kbps": RATES, "flags": FLAG_TEXT, "plan": PLANS, "user": USERS}
# Mostly valid values, now and then one of the others.
GOOD = {"subscriber": IDS[:5], "address": ADDRESSES[:9] + ADDRESSES[14:19] + [""],
        "type": TYPE_TEXT[:2], "up_kbps": RATES[:4], "down_kbps": RATES[:4],
        "flags": FLAG_TEXT[:4], "plan": PLANS, "user": USERS[:5]}


@st.composite
def csv_texts(draw) -> str:
    """Subscriber files near the plain ones the bulk parser takes: mostly valid rows, with
    comments, blank lines, CRLF, odd fields, wrong field counts, blanks and quotes. Half
    of the files with a user column are mostly well formed: each row of a good id has
    an address of its own (or none, if the id has a user), the id's user and no pool;
    now and then a row breaks one rule of the users (another user, a bad one, an empty
    address without a user, a pool of a user or of a user's id)."""
    columns = ["subscriber", "address", "type"] + draw(st.lists(
        st.sampled_from(OPTIONAL), unique=True))
    columns = draw(st.permutations(columns))
    consistent = "user" in columns and draw(st.booleans())
    with_user = draw(st.sets(st.sampled_from(sorted(USER_OF)))) if consistent else set()
    odds = 39 if consistent else 9   # one field in odds + 1 is drawn from all values
    lines = draw(st.lists(st.sampled_from(["# a comment, with commas", ""]), max_size=2))
    lines.append(",".join(columns))
    for i in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["row"] * 8 + ["comment", "blank", "odd"]))
        if kind == "comment":
            lines.append("# " + draw(st.sampled_from(ADDRESSES)))
        elif kind == "blank":
            lines.append(draw(st.sampled_from(["", " ", "\t"])))
        else:
            fields = [draw(st.sampled_from(GOOD[c] if draw(st.integers(0, odds)) else FIELDS[c]))
                      for c in columns]
            row = dict(zip(columns, fields, strict=True))
            if consistent and row["subscriber"] in GOOD["subscriber"] and draw(
                    st.integers(0, odds)):
                sub = int(row["subscriber"])
                row["user"] = USER_OF[sub] if sub in with_user else ""
                row["address"] = draw(st.sampled_from(
                    [f"198.51.{i}.1", f"198.51.{i}.0/24", f"2001:db8:{i:x}::1",
                     f"2001:db8:{i:x}::/48"] + [""] * (sub in with_user)))
                if sub in with_user and "/" in row["address"]:
                    row["type"] = "static"
                twist = draw(st.sampled_from(["user", "address", "type"] + [""] * 12))
                if twist == "user":
                    row["user"] = draw(st.sampled_from(USERS + list(USER_OF.values())))
                elif twist == "address":
                    row["address"] = draw(st.sampled_from(["", f"10.{i}.0.0/16"]))
                elif twist == "type":
                    row["type"] = "dynamic"
                fields = [row[c] for c in columns]
            if kind == "odd":
                fields = draw(st.sampled_from([fields[:-1], fields + [""], [f" {fields[0]}",
                                                                          *fields[1:]],
                                               [f'"{fields[0]}"', *fields[1:]]]))
            lines.append(",".join(fields))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


@settings(max_examples=1000, deadline=None)
@given(csv_texts(), st.booleans())
def test_bulk_parser_agrees_with_row_by_row(text: str, strict: bool) -> None:
    """Whatever the bulk parser accepts, the row-by-row parser gives the same rows for; what
    that one refuses, the bulk parser never accepts; parse_columns answers as it does."""
    try:
        want = subscribers.columns_of(subscribers.parse_subscribers_text(text, "t.csv", strict))
    except SourceError as e:
        assert subscribers._bulk(text, strict) is None
        with pytest.raises(SourceError) as got:
            subscribers.parse_columns(text, "t.csv", strict)
        assert (got.value.path, got.value.problems) == (e.path, e.problems)
        return
    bulk = subscribers._bulk(text, strict)
    if bulk is not None:
        assert rows_of(bulk) == rows_of(want) and bulk.contracts == want.contracts
    got = subscribers.parse_columns(text, "t.csv", strict)
    assert rows_of(got) == rows_of(want) and got.contracts == want.contracts


def test_plain_files_take_the_bulk_path() -> None:
    """Every kind of valid row of a plain file: hosts of both families, prefixes, a /32 and
    a /128 written as prefixes, optional columns, comments, CRLF."""
    text = ("# subscribers\r\nsubscriber,address,type,up_kbps,down_kbps,flags,plan\r\n"
            "1,192.0.2.1,dynamic,,,,\r\n2,192.0.2.2/32,static,1000,2000,suspended,gold\r\n"
            "3,2001:db8::1,static,0,,op25b_exempt;ip53b_exempt,\r\n"
            "3,2001:db8:1::1/128,static,,,,\r\n\r\n# pools\r\n"
            "4,100.64.0.0/10,dynamic,,,,\r\n5,2001:db8:100::/56,static,5,5,,a/b\r\n")
    bulk = subscribers._bulk(text, False)
    assert bulk is not None
    rows = subscribers.parse_subscribers_text(text)
    assert rows_of(bulk) == rows_of(subscribers.columns_of(rows))
    hosts, prefixes, contracts = bulk
    assert len(hosts.keys) == 4 and len(prefixes.keys) == 2 and not contracts.keys
    assert subscribers._bulk(text, True) == bulk   # --strict: nothing overlaps
    inside = text + "6,100.64.1.1,static,,,,\r\n"
    assert subscribers._bulk(inside, False) is not None and subscribers._bulk(inside, True) is None


def test_users_take_the_bulk_path() -> None:
    """Users on rows with an address and without, a user on several rows, rows without a
    user: the contract of each user is its row without an address, else its first row."""
    text = ("subscriber,address,type,up_kbps,down_kbps,flags,user\n"
            "1,192.0.2.1,static,100,,,a@x\n"
            "1,2001:db8::/56,static,200,,,a@x\n"
            "2,192.0.2.2,static,300,,,b@x\n"
            "2,,dynamic,400,,suspended,b@x\n"
            "3,,dynamic,500,,,c@x\n"
            "4,192.0.2.3,static,,,,\n"
            "5,100.64.0.0/10,dynamic,,,,\n")
    bulk = subscribers._bulk(text, True)
    assert bulk is not None
    want = subscribers.columns_of(subscribers.parse_subscribers_text(text))
    assert rows_of(bulk) == rows_of(want) and bulk.contracts == want.contracts
    contracts = tables.contract_entries(bulk.contracts)
    assert {u: (e.sub_id, e.up_kbps, e.flags) for u, e in contracts.items()} == {
        "a@x": (1, 100, 0), "b@x": (2, 400, SUSPENDED), "c@x": (3, 500, 0)}


USERS_TEXT = ("subscriber,address,type,user\n1,192.0.2.1,static,a@x\n"
              "1,2001:db8::/56,static,a@x\n2,,dynamic,b@x\n3,100.64.0.0/10,dynamic,\n"
              "4,192.0.2.4,static,\n")


@pytest.mark.parametrize("row", [
    "5,192.0.2.5,static,a@x",              # a user on two ids
    "1,192.0.2.5,static,b@x",              # an id of two users (as many users as ids)
    "2,,static,b@x",                       # two rows without an address for one user
    "5,,static," + "u" * 254,              # a user too long
    "5,,static,e\x7f@x",                   # not printable
    '5,,static,"e,f@x"',                   # a comma
    "5,,static,",                          # an empty address without a user
    "6,100.65.0.0/16,dynamic,f@x",         # a pool's user
    "3,,static,f@x",                       # a user of a pool's id
], ids=["two ids", "two users", "two without address", "long", "unprintable", "comma",
        "no address, no user", "pool's user", "pool's id"])
def test_user_problems_leave_the_bulk_path(row: str) -> None:
    """A plain file with users broken by one row: the bulk parser gives up, and the
    answer is the row-by-row parser's, every problem with its line."""
    assert subscribers._bulk(USERS_TEXT, False) is not None
    text = USERS_TEXT + row + "\n"
    assert subscribers._bulk(text, False) is None
    with pytest.raises(SourceError) as want:
        subscribers.parse_subscribers_text(text, "u.csv")
    with pytest.raises(SourceError) as got:
        subscribers.parse_columns(text, "u.csv")
    assert got.value.problems == want.value.problems and want.value.problems[-1][0] == 7


@pytest.mark.parametrize("row", ["", "6,100.65.0.0/16,dynamic,f@x", "3,,static,f@x",
                                 "5,192.0.2.5,static,a@x", "2,,static,b@x"],
                         ids=["good", "pool's user", "user of a pool's id", "a user on two ids",
                              "two without address"])
def test_a_file_in_parts_at_once_is_the_same_file(monkeypatch, row: str) -> None:
    """A large file's chunks are parsed in two parts at once (files.both, a child process
    for the second): every row, in file order, and the rules that bind rows of both parts
    (a pool's id and a user, a user's rows) hold across them."""
    text = USERS_TEXT + "".join(f"{10 + i},192.0.3.{i},static,\n" for i in range(40)) + (
        row + "\n" if row else "")
    whole = subscribers._bulk(text, False)
    monkeypatch.setattr(subscribers, "_CHUNK", 16)   # a chunk every row or two
    monkeypatch.setattr(files, "may_fork", lambda: True)
    parts = subscribers._bulk(text, False)
    assert (whole is None) == (row not in ("",))
    if whole is None:
        assert parts is None
    else:
        assert rows_of(parts) == rows_of(whole) and parts.contracts == whole.contracts


# ---- 2. the plan on columns against the dict model it replaced ---------------------------------


def reference_plan(cur_h: dict, cur_p: dict, hosts: dict, prefixes: dict, limit: int):
    """The plan as the dict implementation made it: sticky suspensions, slots kept, new
    slots lowest first by id, then the diff. Prefix keys are (prefixlen, address). One
    change: a slot that its subscriber does not keep is freed (cleared) even when a new
    subscriber gets it in the same load (it kept the old one's counters)."""
    hosts, prefixes = dict(hosts), dict(prefixes)
    for a, e in cur_h.items():
        if not e.flags & SUSPENDED:
            continue
        if a in hosts:
            hosts[a] = hosts[a]._replace(flags=hosts[a].flags | SUSPENDED)
            continue
        pool = tables.Tables(prefixes=prefixes).classify(a)
        if pool and pool.type == DYNAMIC:
            hosts[a] = pool._replace(flags=pool.flags | SUSPENDED)
    for k, e in cur_p.items():
        if e.flags & SUSPENDED and k in prefixes:
            prefixes[k] = prefixes[k]._replace(flags=prefixes[k].flags | SUSPENDED)
    pools = {e.sub_id for e in prefixes.values() if e.type == DYNAMIC}
    held: dict[int, int] = {}
    for e in (*cur_h.values(), *cur_p.values()):
        if e.slot:
            held.setdefault(e.sub_id, e.slot)
    wanted = {e.sub_id for e in (*hosts.values(), *prefixes.values())} - pools
    used = {held[s] for s in wanted if s in held}
    free = (x for x in range(1, limit) if x not in used)
    slot_of: dict[int, int] = {}
    for sid in sorted(wanted):
        slot = held.get(sid) or next(free, None)
        if slot is None:
            raise KernelError("more subscribers than state slots")
        slot_of[sid] = slot
    for d in (hosts, prefixes):
        for k, e in d.items():
            d[k] = e._replace(slot=slot_of.get(e.sub_id, 0))
    return sync.diff(cur_h, hosts), sync.diff(cur_p, prefixes), set(held.values()) - used


class FakeMaps:
    """What plan_subscribers reads of kernel.Maps, from dicts."""

    host_map = SimpleNamespace(name="hosts", max_entries=1 << 20)
    prefix_map = SimpleNamespace(name="prefixes", max_entries=1 << 20)
    pool_map = SimpleNamespace(max_entries=0)   # no pool blocks: the dict model's pools

    def __init__(self, hosts: dict, prefixes: dict, slots: int):
        self.tables = {"hosts": ClassTable.of(hosts.items()),
                       "prefixes": ClassTable.of((LPM_KEY.pack(*k), e)
                                                 for k, e in prefixes.items())}
        self.slots = slots

    def read(self, m: SimpleNamespace) -> ClassTable:
        return self.tables[m.name]

    def read_contracts(self) -> ClassTable:
        return ClassTable()


# A /24 and everything in it, so that hosts, pools and blocks overlap often.
BASE = tables.addr16("192.0.2.0")
addresses = st.integers(0, 255).map(lambda x: BASE[:15] + bytes([x]))
prefix_keys = st.tuples(st.integers(120, 127), st.integers(0, 255)).map(
    lambda t: (t[0], BASE[:15] + bytes([t[1] & ~((1 << (128 - t[0])) - 1) & 0xFF])))
entries = st.builds(Entry, st.integers(1, 8), st.sampled_from((DYNAMIC, STATIC)),
                    st.integers(0, 7), st.integers(0, 3), st.integers(0, 3), st.just(0),
                    pool_bits=st.just(0))
kernel_entries = st.builds(lambda e, slot: e._replace(slot=slot), entries, st.integers(0, 12))


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(addresses, kernel_entries, max_size=12),
       st.dictionaries(prefix_keys, kernel_entries, max_size=5),
       st.dictionaries(addresses, entries, max_size=12),
       st.dictionaries(prefix_keys, entries, max_size=5), st.sampled_from([4, 8, 16]))
def test_plan_agrees_with_the_dict_model(cur_h, cur_p, hosts, prefixes, limit) -> None:
    maps = FakeMaps(cur_h, cur_p, limit)
    h_table = ClassTable.of(hosts.items())
    p_table = ClassTable.of((LPM_KEY.pack(*k), e) for k, e in prefixes.items())
    try:
        want = reference_plan(cur_h, cur_p, hosts, prefixes, limit)
    except KernelError:
        with pytest.raises(KernelError, match="more subscribers than state slots"):
            sync.plan_subscribers(maps, h_table, p_table)
        return
    got = sync.plan_subscribers(maps, h_table, p_table)
    (hw, hr, hc), (pw, pr, pc), freed = want
    assert dict(got.hosts.write.items()) == hw
    assert sorted(got.hosts.remove) == sorted(hr)
    assert {LPM_KEY.unpack(k): e for k, e in got.prefixes.write.items()} == pw
    assert sorted(map(LPM_KEY.unpack, got.prefixes.remove)) == sorted(pr)
    assert (got.hosts.change, got.prefixes.change, got.freed) == (hc, pc, freed)
    # the caller's tables are left as they were
    assert dict(h_table.items()) == hosts


def test_class_table_columns() -> None:
    e = Entry(7, STATIC, SUSPENDED, 1000, 2000, 3)
    t = ClassTable.of([(b"a" * 16, e), (b"b" * 16, e._replace(sub_id=8, slot=0))])
    assert t.values.tobytes()[:CLASS.size] == layout.pack_class(e)
    assert t.column(0) == [7, 8] and t.column(4) == [3, 0]
    assert t.column(1)[0] == layout.class_word(STATIC, SUSPENDED)
    assert t.entry(1) == e._replace(sub_id=8, slot=0)
    assert list(t.take([1]).items()) == [(b"b" * 16, e._replace(sub_id=8, slot=0))]


# ---- 3. layouts against bcc's types ------------------------------------------------------------

DEFINES = ["-DXZ_MAX_HOSTS=4096", "-DXZ_MAX_PREFIXES=1024", "-DXZ_MAX_SUBSCRIBERS=64"]


@pytest.fixture(scope="module")
def compiled(bpffs):
    """The maps alone, compiled once for this module: (bcc object, pin dir)."""
    pin = os.path.join(bpffs, f"subs-{secrets.token_hex(3)}")
    bpf = kernel.compile_bpf(pin, DEFINES, maps_only=True)
    try:
        yield bpf, pin
    finally:
        bpf.cleanup()
        kernel.unpin_all(pin)


def test_class_layout(compiled) -> None:
    bpf, pin = compiled
    for name in (b"xz_hosts", b"xz_prefixes"):
        leaf = bpf[name].Leaf
        assert ct.sizeof(leaf) == CLASS.size
        assert ctype_fields(leaf) == fields_of(CLASS)
        assert [n for n, *_ in leaf._fields_] == ["sub_id", "type", "flags", "pool_bits",
                                                  "_pad", "up_kbps", "down_kbps", "slot"]
        v = leaf(sub_id=1, type=2, flags=3, pool_bits=7, up_kbps=4, down_kbps=5, slot=6)
        assert bytes(v) == layout.pack_class(Entry(1, 2, 3, 4, 5, 6, 7))
    key = bpf[b"xz_prefixes"].Key
    assert ctype_fields(key) == fields_of(LPM_KEY)
    assert ct.sizeof(bpf[b"xz_hosts"].Key) == 16
    with Maps(pin) as m:
        assert (m.host_map.key_size, m.host_map.value_size) == (16, CLASS.size)
        assert (m.prefix_map.key_size, m.prefix_map.value_size) == (LPM_KEY.size, CLASS.size)
        assert m.state_map.value_size == layout.STATE.size
        assert m.slots == 64


def test_state_layout(compiled) -> None:
    """layout.STATE against bcc's struct xz_state: what volumes() reads where."""
    bpf, pin = compiled
    leaf = bpf[b"xz_state"].Leaf
    v = leaf()
    v.dir[0].tat, v.dir[0].bulk_tat, v.dir[0].bytes, v.dir[0].packets = 1, 2, 3, 4
    v.dir[1].tat, v.dir[1].bulk_tat, v.dir[1].bytes, v.dir[1].packets = 5, 6, 7, 8
    v.op25b = 9
    v.scan.count = 10
    words = schema.C["XZ_SCAN_WORDS"]
    for i in range(words):
        v.scan.reg[i] = 11 + i
    assert layout.STATE.unpack(bytes(v)) == tuple(range(1, 11 + words))
    assert layout.STATE.unpack(bytes(v))[layout.SCAN_COUNT] == 10
    assert layout.STATE.unpack(bytes(v))[layout.OP25B] == 9


# ---- 4. loads into real maps, read back --------------------------------------------------------


@pytest.fixture
def maps(compiled):
    """The compiled maps, emptied, opened as the CLI opens them."""
    bpf, pin = compiled
    bpf[b"xz_hosts"].clear()
    bpf[b"xz_prefixes"].clear()
    with Maps(pin) as m:
        m.clear_state(range(m.slots))
        yield m


def load(maps: Maps, tmp_path, text: str) -> sync.Change:
    path = tmp_path / "subscribers.csv"
    path.write_text(text)
    _, hosts, prefixes, contracts = tables.read_subscribers(str(path))
    return sync.apply_subscribers(maps, hosts, prefixes, contracts=contracts)


def in_kernel(maps: Maps) -> dict[str, Entry]:
    """What the maps hold, by address or prefix as text."""
    out = {str(tables.ip_of(a)): e for a, e in maps.host_items()}
    out.update({str(tables.net_of(k)): e for k, e in maps.prefix_items()})
    return out


def expected(text: str) -> dict[str, Entry]:
    """The source's rows as entries, slots left out (0)."""
    return {str(r.network) if r.network.prefixlen < r.network.max_prefixlen
            else str(r.network.network_address):
            Entry(r.sub_id, schema.TYPES[r.type], sum(schema.FLAGS[f] for f in r.flags),
                  r.up_kbps, r.down_kbps)
            for r in subscribers.parse_subscribers_text(text)}


def without_slots(d: dict[str, Entry]) -> dict[str, Entry]:
    return {k: e._replace(slot=0, pool_bits=0) for k, e in d.items()}


HEADER = "subscriber,address,type,up_kbps,down_kbps,flags\n"
FILE_A = HEADER + "".join([
    "1,192.0.2.1,static,1000,2000,\n", "1,2001:db8::1,static,1000,2000,\n",
    "2,192.0.2.2,dynamic,,,op25b_exempt\n", "3,198.51.100.8/29,static,5000,5000,\n",
    "9,100.64.7.0/24,dynamic,,,\n", "4,2001:db8:4::/56,static,,,suspended\n",
])


def test_load_reads_back_as_the_source(maps, tmp_path) -> None:
    change = load(maps, tmp_path, FILE_A)
    assert change == sync.Change(6, 0, 0)
    got = in_kernel(maps)
    assert without_slots(got) == expected(FILE_A)
    # one slot per subscriber, shared by its addresses; none for the pool
    slots = {e.sub_id: e.slot for e in got.values()}
    assert all(got[k].slot == slots[got[k].sub_id] for k in got)
    assert slots[9] == 0 and sorted(s for i, s in slots.items() if i != 9) == [1, 2, 3, 4]
    assert load(maps, tmp_path, FILE_A) == sync.Change()   # the same file: nothing written


def test_a_small_change_writes_only_the_change(maps, tmp_path) -> None:
    load(maps, tmp_path, FILE_A)
    before = in_kernel(maps)
    edited = FILE_A.replace("2,192.0.2.2,dynamic,,,op25b_exempt\n", "").replace(
        "3,198.51.100.8/29,static,5000,5000,", "3,198.51.100.8/29,static,6000,5000,") \
        + "5,192.0.2.5,static,,,\n"
    assert load(maps, tmp_path, edited) == sync.Change(1, 1, 1)
    after = in_kernel(maps)
    assert without_slots(after) == expected(edited)
    for k in set(before) & set(after) - {"198.51.100.8/29"}:
        assert after[k] == before[k]
    assert after["198.51.100.8/29"].slot == before["198.51.100.8/29"].slot   # kept
    assert after["192.0.2.5"].slot == before["192.0.2.2"].slot   # subscriber 2's, freed


@pytest.mark.parametrize("newcomer", ["", "5,192.0.2.5,static,,,\n"])
def test_freed_slots_are_cleared(maps, tmp_path, newcomer) -> None:
    """A subscriber's slot is cleared when it leaves, also when a new subscriber gets it."""
    load(maps, tmp_path, FILE_A)
    slot = maps.get_host(tables.addr16("192.0.2.2")).slot
    key = struct.pack("=I", slot)
    for m in (maps.state_map, maps.throttle_map):
        m.update(key, b"\x01" * m.value_size)
    load(maps, tmp_path, FILE_A.replace("2,192.0.2.2,dynamic,,,op25b_exempt\n", newcomer))
    for m in (maps.state_map, maps.throttle_map):
        assert m.lookup(key) == bytes(m.value_size)
    if newcomer:
        assert maps.get_host(tables.addr16("192.0.2.5")).slot == slot


def test_suspensions_are_sticky(maps, tmp_path) -> None:
    load(maps, tmp_path, FILE_A)
    assert sorted(sync.set_suspended(maps, 1, True)) == ["192.0.2.1", "2001:db8::1"]
    pool_addr = tables.addr16("100.64.7.9")
    assert sync.set_suspended(maps, pool_addr, True) == ["100.64.7.9 (pool 100.64.7.0/24)"]
    assert load(maps, tmp_path, FILE_A) == sync.Change()
    got = in_kernel(maps)
    assert got["192.0.2.1"].flags & SUSPENDED and got["2001:db8::1"].flags & SUSPENDED
    assert got["100.64.7.9"] == got["100.64.7.0/24"]._replace(
        flags=got["100.64.7.0/24"].flags | SUSPENDED)
    # the pool leaves the file: its suspended address goes with it
    assert load(maps, tmp_path, FILE_A.replace("9,100.64.7.0/24,dynamic,,,\n", "")) == \
        sync.Change(0, 0, 2)
    assert "100.64.7.9" not in in_kernel(maps)


def test_suspended_ipv6_pool_64s_are_sticky(maps, tmp_path) -> None:
    """A /64 suspended in an IPv6 pool (suspend ADDRESS) stays through reloads while its
    pool is in the file, and goes with it."""
    text = FILE_A + "10,2001:db8:9::/48,dynamic,,,\n"
    load(maps, tmp_path, text)
    a = tables.addr16("2001:db8:9:5::77")
    assert sync.set_suspended(maps, a, True) == ["2001:db8:9:5::/64 (pool 2001:db8:9::/48)"]
    assert load(maps, tmp_path, text) == sync.Change()
    got = in_kernel(maps)
    assert got["2001:db8:9:5::/64"] == got["2001:db8:9::/48"]._replace(
        flags=got["2001:db8:9::/48"].flags | SUSPENDED)
    assert load(maps, tmp_path, FILE_A) == sync.Change(0, 0, 2)
    assert "2001:db8:9:5::/64" not in in_kernel(maps)


def test_too_many_subscribers_change_nothing(maps, tmp_path) -> None:
    load(maps, tmp_path, FILE_A)
    before = in_kernel(maps)
    many = HEADER + "".join(f"{100 + i},10.1.{i // 256}.{i % 256},static,,,\n"
                            for i in range(maps.slots))
    with pytest.raises(KernelError, match="more subscribers than state slots"):
        load(maps, tmp_path, many)
    assert in_kernel(maps) == before


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2)), max_size=40),
                min_size=1, max_size=4))
def test_loads_read_back_as_their_sources(maps, tmp_path, files) -> None:
    """A sequence of random files, each loaded over the last: the maps always hold the
    latest file, subscribers that stay keep their slots, and slots stay unique."""
    sync.apply_subscribers(maps, ClassTable(), ClassTable())
    held: dict[int, int] = {}
    for rows in files:
        lines = {}
        for n, kind in rows:   # n picks the address, kind the row's shape
            net = (f"192.0.2.{n}" if kind == 0 else f"198.51.{n}.0/24" if kind == 1
                   else f"2001:db8:{n:x}::/56")
            lines[net] = f"{n % 7 + 1},{net},{('dynamic', 'static')[n % 2]},{n},,\n"
        text = HEADER + "".join(lines.values())
        load(maps, tmp_path, text)
        got = in_kernel(maps)
        assert without_slots(got) == expected(text)
        pools = {e.sub_id for k, e in got.items() if "/" in k and e.type == DYNAMIC}
        slots = {e.sub_id: e.slot for e in got.values() if e.sub_id not in pools}
        assert all(e.slot == slots[e.sub_id] and not e.pool_bits
                   for e in got.values() if e.sub_id not in pools)
        # IPv4 pools (/24 here) have a block of pool-address state each, IPv6 ones the LRU
        pool_rows = [(k, e) for k, e in got.items() if "/" in k and e.type == DYNAMIC]
        assert all((e.pool_bits, e.slot % 256) == (8, 0) if ":" not in k else
                   (e.pool_bits, e.slot) == (0, 0) for k, e in pool_rows)
        firsts = [e.slot for _, e in pool_rows if e.pool_bits]
        assert len(set(firsts)) == len(firsts)
        assert len(set(slots.values())) == len(slots) and 0 not in slots.values()
        assert all(held[s] == slot for s, slot in slots.items() if s in held)
        held = slots


# ---- pool-address state blocks --------------------------------------------------------------


def pools_table(*rows: tuple[str, int, int]) -> ClassTable:
    """Prefix entries (network, id, type) as a subscriber load has them."""
    return ClassTable.of((LPM_KEY.pack(*tables.key_of(ipaddress.ip_network(n))),
                          Entry(sid, t)) for n, sid, t in rows)


def blocks(t: ClassTable) -> dict[str, tuple[int, int]]:
    return {str(tables.net_of(LPM_KEY.unpack(k))): (e.slot, e.pool_bits)
            for k, e in t.items() if e.pool_bits}


def test_pools_get_disjoint_blocks_and_keep_them() -> None:
    rows = [("100.64.0.0/22", 1, DYNAMIC), ("100.64.8.0/24", 2, DYNAMIC),
            ("100.64.9.0/30", 3, DYNAMIC), ("198.51.100.0/24", 4, STATIC),
            ("100.0.0.0/15", 5, DYNAMIC), ("2001:db8::/56", 6, DYNAMIC)]
    p = pools_table(*rows)
    assert sync.assign_pool_blocks(ClassTable(), ClassTable(), p, 2000) == []
    got = blocks(p)
    # IPv4 dynamic pools of /16 or longer only; largest first
    assert got == {"100.64.0.0/22": (0, 10), "100.64.8.0/24": (1024, 8),
                   "100.64.9.0/30": (1280, 2)}
    # a reload keeps every block; a pool that grew gets a new one, and the block it
    # leaves is cleared before another pool takes it
    p2 = pools_table(("100.64.0.0/22", 1, DYNAMIC), ("100.64.8.0/23", 2, DYNAMIC),
                     ("100.64.9.0/30", 3, DYNAMIC), ("100.64.12.0/24", 7, DYNAMIC))
    clear = sync.assign_pool_blocks(p, ClassTable(), p2, 2000)
    got2 = blocks(p2)
    assert got2["100.64.0.0/22"] == (0, 10) and got2["100.64.9.0/30"] == (1280, 2)
    assert got2["100.64.8.0/23"] == (1284, 9)            # first gap that fits 512
    assert got2["100.64.12.0/24"] == (1024, 8)           # the /24's old block ...
    assert clear == [(1024, 256)]                          # ... cleared first


def test_pools_beyond_the_array_keep_state_in_the_lru() -> None:
    p = pools_table(("100.64.0.0/22", 1, DYNAMIC), ("100.64.8.0/22", 2, DYNAMIC))
    sync.assign_pool_blocks(ClassTable(), ClassTable(), p, 1500)
    assert blocks(p) == {"100.64.0.0/22": (0, 10)}
    assert [e.slot for _, e in p.items()] == [0, 0]


def test_a_pools_own_host_entry_shares_its_block() -> None:
    p = pools_table(("100.64.0.0/22", 1, DYNAMIC))
    h = ClassTable.of([(tables.addr16("100.64.1.7"), Entry(1, DYNAMIC, SUSPENDED)),
                       (tables.addr16("100.64.1.8"), Entry(77, STATIC, 0, 0, 0, 5))])
    sync.assign_pool_blocks(ClassTable(), h, p, 4096)
    assert [(e.slot, e.pool_bits) for _, e in h.items()] == [(0, 10), (5, 0)]
