"""The data plane's layouts as plain Python values: struct xz_class (Entry, ClassTable), the
LPM key, per-subscriber state and volumes, the control value and the CSAM meta. They mirror
bpf/xdpzoot.h (tests check them against the compiled programs); nothing here touches the
kernel, so pure modules (sync, tables, model) import them without libbpf.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from xdpzoot.dataplane import schema


class Entry(NamedTuple):
    """Value of the subscriber maps (struct xz_class), one at a time (bulk: ClassTable)."""

    sub_id: int
    type: int
    flags: int = 0
    up_kbps: int = 0
    down_kbps: int = 0
    slot: int = 0   # per-subscriber state slot, 0 for a pool (per-address state) ...
    pool_bits: int = 0   # ... or, when set, a pool's first index in xz_pool_addrs


# struct xz_class as bytes: sub_id, type, flags, pool_bits, _pad, up_kbps, down_kbps, slot. In
# bulk it is five native 32-bit words, the second holding type, flags, pool_bits and _pad
# (class_word).
CLASS = struct.Struct("=IBBBBIII")
WORDS = CLASS.size // 4
LPM_KEY = struct.Struct("=I16s")   # struct xz_lpm_key: prefix length over 128 bits, address
ZERO_KEY = bytes(4)
# struct xz_state: up, down (tat, bulk_tat, bytes, packets); op25b; scan (count, registers)
STATE = struct.Struct(f"={10 + schema.C['XZ_SCAN_WORDS']}Q")
SCAN_COUNT = 9   # the field of struct xz_scan.count in STATE.unpack
OP25B = 8        # and of xz_state.op25b
_TYPE_FLAGS = struct.Struct("=BBBx")
if array("I").itemsize != 4:
    raise ImportError("array('I') is not 32 bits wide here")


def class_word(type_: int, flags: int, pool_bits: int = 0) -> int:
    """The second word of struct xz_class (type, flags, pool_bits, _pad), as ClassTable
    holds it."""
    return int.from_bytes(_TYPE_FLAGS.pack(type_, flags, pool_bits), sys.byteorder)


POOL_BITS_WORD = class_word(0, 0, 0xFF)   # the pool_bits byte of class_word


def pool_bits_of(word: int) -> int:
    """pool_bits of a class_word."""
    return (word & POOL_BITS_WORD) // class_word(0, 0, 1)


def pack_class(e: Entry) -> bytes:
    """struct xz_class of ``e``, each field cut to its width as a C assignment would."""
    u32 = 0xFFFF_FFFF
    return CLASS.pack(e.sub_id & u32, e.type & 0xFF, e.flags & 0xFF, e.pool_bits & 0xFF, 0,
                      e.up_kbps & u32, e.down_kbps & u32, e.slot & u32)


def _entry(fields: tuple[int, ...]) -> Entry:
    """An Entry from CLASS.unpack's fields (the padding dropped)."""
    sub_id, type_, flags, pool_bits, _, up, down, slot = fields
    return Entry(sub_id, type_, flags, up, down, slot, pool_bits)


@dataclass
class ClassTable:
    """A subscriber map's contents in columns: ``keys[i]`` (packed as the map keys it) holds
    struct xz_class ``values[WORDS * i:WORDS * (i + 1)]``. A load handles a million entries:
    columns are filled, compared and written in bulk, without an object per entry."""

    keys: list[bytes] = field(default_factory=list)
    values: array = field(default_factory=lambda: array("I"))

    @classmethod
    def of(cls, items: Iterable[tuple[bytes, Entry]]) -> ClassTable:
        t = cls()
        for k, e in items:
            t.append(k, e)
        return t

    def __len__(self) -> int:
        return len(self.keys)

    def entry(self, i: int) -> Entry:
        return _entry(CLASS.unpack_from(self.values, i * CLASS.size))

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        return zip(self.keys, map(_entry, CLASS.iter_unpack(self.values)), strict=True)

    def column(self, word: int) -> list[int]:
        """Word ``word`` of every entry (0: sub_id, 1: class_word, 4: slot)."""
        return self.values[word::WORDS].tolist()

    def copy(self) -> ClassTable:
        return ClassTable(list(self.keys), array("I", self.values))

    def append(self, key: bytes, e: Entry) -> None:
        self.keys.append(key)
        self.values.frombytes(pack_class(e))

    def take(self, rows: list[int]) -> ClassTable:
        """The entries of ``rows`` (indices), in that order."""
        raw = memoryview(self.values).cast("B")
        n = CLASS.size
        return ClassTable([self.keys[i] for i in rows],
                          array("I", b"".join([raw[i * n:(i + 1) * n] for i in rows])))


@dataclass(frozen=True)
class Volume:
    """What the data plane admitted for a subscriber, the SMTP attempts it blocked, and how
    many distinct destinations it opened conversations to in the current scan window."""

    up_bytes: int
    down_bytes: int
    up_packets: int
    down_packets: int
    op25b: int
    scans: int = 0


def scan_estimate(count: int, epoch: int) -> float:
    """The estimate in struct xz_scan.count ``count`` if it counts window ``epoch``
    (xz_control.scan_epoch); 0 for a sketch of another window."""
    if count & 0xFFFF_FFFF != epoch:
        return 0.0
    return (count >> schema.C["XZ_SCAN_EST_SHIFT"]) / (1 << schema.C["XZ_SCAN_FRAC"])


def scans(count: int, epoch: int) -> int:
    """scan_estimate, rounded (half up): what `top` shows and the rules compare."""
    return int(scan_estimate(count, epoch) + 0.5)


def state_scans(words, epoch: int):
    """scans() of every row of ``words``, a numpy array of struct xz_state rows (STATE's
    fields as uint64 columns)."""
    import numpy as np

    c = words[:, SCAN_COUNT]
    frac = schema.C["XZ_SCAN_FRAC"]
    est = ((c >> np.uint64(schema.C["XZ_SCAN_EST_SHIFT"])) + np.uint64(1 << frac - 1)) \
        >> np.uint64(frac)
    return np.where(c & np.uint64(0xFFFF_FFFF) == np.uint64(epoch), est, np.uint64(0))


def volume(v: tuple[int, ...], epoch: int) -> Volume:
    """The Volume of an unpacked struct xz_state (STATE) in scan window ``epoch``."""
    return Volume(v[2], v[6], v[3], v[7], v[OP25B], scans(v[SCAN_COUNT], epoch))




def masked(addr: bytes, plen: int) -> bytes:
    """``addr`` with the bits after the first ``plen`` cleared."""
    n = int.from_bytes(addr, "big") >> (128 - plen) << (128 - plen) if plen else 0
    return n.to_bytes(16, "big")


# Raw layouts of bpf/xdpzoot.h (checked against bcc's types in tests/test_csam.py).
META = struct.Struct("=32sQIIIIII")       # struct xz_csam_meta
U32 = struct.Struct("=I")                 # array indexes, allow-list bits, devmap ifindexes
THROTTLE = struct.Struct("=2I")           # struct xz_throttle: kbps up, down
MANUAL = struct.Struct("=IIQ")            # struct xz_manual: kbps, _pad, until
COUNTER = struct.Struct("=QQ")            # struct xz_counter: packets, bytes
IDX_ROW = struct.Struct(f"={schema.C['XZ_IDX_LANES']}H")   # struct xz_sub_idx: lanes
IDX_LANE = struct.Struct("=H")            # one of them
HOSTED = struct.Struct("=4QII3Q")        # struct xz_sub_hosted: bits, slash, idx, _pad
ATTEMPTS = struct.Struct(f"={schema.C['XZ_OP25B_PER']}I")   # struct xz_op25b: SMTP attempts
NOTED = struct.Struct(f"=I{schema.C['XZ_OP25B_BATCH']}II")   # struct xz_op25b_batch: n, idx, _pad
# struct xz_fast_mac: Ethernet addresses, each with the ifindex the kernel routes its frames
# from (via; 0: the interface's own); then the reverse path filter of each (rpf: 2 bits each)
FAST_MAC = struct.Struct("=" + "6sH" * schema.C["XZ_FAST_MACS"] + "Q")


class Control(NamedTuple):
    """struct xz_control, the one entry of xz_control: switches, the CSAM word, parameters."""

    flags: int = 0
    csam: int = 0              # XZ_CSAM_*: generation in force, kinds it holds
    burst_us: int = 0
    bulk_kbps: int = 0
    bulk_ms: int = 0
    bulk_share: int = 0
    bulk_floor_kbps: int = 0
    congestion: int = 0        # XZ_CONGESTION_*, the control plane's own
    tick_ns: int = 0
    trace_until: int = 0       # XZ_C_TRACE's lease: monotonic seconds
    trace_rate: int = 0        # drop events a second at most
    trace_reasons: int = 0     # bit (1 << reason index) of each reason traced
    scan_epoch: int = 0        # the scan window in force: unix time of its start

    def pack(self) -> bytes:
        return CONTROL.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes) -> Control:
        return cls(*CONTROL.unpack_from(raw))


CONTROL = struct.Struct("=" + "I" * len(Control._fields))   # struct xz_control, whole


# struct xz_trace_event: ts, sub_id, reason, verdict, role, hook, family, proto, sport, dport,
# _pad, src, dst (checked against bcc's type of the ring buffer in tests/test_csam.py).
EVENT = struct.Struct("=QIBBBBBBHH2s16s16s")
TRACE_STATE = struct.Struct("=QQ")    # struct xz_trace_state: tat, lost


class Event(NamedTuple):
    """A drop event of the ring buffer (struct xz_trace_event), names from the header."""

    ts: int                    # ns of the monotonic clock (bpf_ktime_get_ns)
    sub_id: int                # 0: no subscriber
    reason: str
    verdict: str
    role: str
    hook: str
    family: int
    proto: int
    sport: int
    dport: int
    src: bytes                 # 16 bytes, IPv4 mapped; zeros unless asked for
    dst: bytes

    @classmethod
    def unpack(cls, raw: bytes) -> Event:
        ts, sub, reason, verdict, role, hook, fam, proto, sport, dport, _, src, dst = \
            EVENT.unpack_from(raw)
        return cls(ts, sub, _name(schema.REASONS, reason), _name(schema.VERDICTS, verdict),
                   _name(schema.ROLES, role), _name(schema.HOOKS, hook), fam, proto, sport,
                   dport, src, dst)


def _name(names: tuple[str, ...], i: int) -> str:
    return names[i] if i < len(names) else str(i)


JOIN_STEP = 4096


def joined(parts: list[bytes]) -> bytes:
    """``b"".join(parts)`` a few thousand at a time: in one go, CPython first gathers an
    80-byte buffer record for every part (80 MB of fresh pages at a million keys), which
    makes it 2-3x slower here (0.063 against 0.018-0.03 s for 900,000 keys)."""
    if len(parts) <= JOIN_STEP:
        return b"".join(parts)
    return b"".join([b"".join(parts[i:i + JOIN_STEP]) for i in range(0, len(parts), JOIN_STEP)])
