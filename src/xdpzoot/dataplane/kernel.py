"""Kernel access through bcc and libbpf: compile, load, pin, maps, BPF_PROG_TEST_RUN.

The only module that talks to bcc. Everything else works on plain Python values
(``bytes`` keys of 16-byte addresses, :class:`Entry` values) and is testable without root.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xdpzoot.dataplane import dirs, schema
from xdpzoot.dataplane.layout import (
    CLASS,
    CONTROL,
    COUNTER,
    FAST_MAC,
    HOSTED,
    IDX_LANE,
    IDX_ROW,
    LPM_KEY,
    MANUAL,
    META,
    NOTED,
    OP25B,
    POOL_BITS_WORD,
    STATE,
    THROTTLE,
    TRACE_STATE,
    U32,
    WORDS,
    ZERO_KEY,
    ClassTable,
    Control,
    Entry,
    Volume,
    _entry,
    joined,
    masked,
    pack_class,
    volume,
)

if TYPE_CHECKING:
    import numpy as np

BPF_FS_MAGIC = 0xCAFE4A11
NOTED_SLOT = schema.C["XZ_OP25B_SLOT"]   # a noted SMTP attempt of a slot, not a pool index
HOSTED_LANE = schema.C["XZ_IDX_HOSTED"]   # a lane that names an entry of xz_sub_hosted
HOSTED_WORDS = HOSTED.size // 8   # struct xz_sub_hosted in 64-bit words:
HOSTED_AT = 4                     # the one of the /24 (low half) and the class (high)
UNIFORM_PAUSE_S = 0.01   # between unhooking a class index and reusing it: > any program run
DEFAULT_PIN_DIR = "/sys/fs/bpf/xdpzoot"
MAPS = ("xz_hosts", "xz_prefixes", "xz_allow", "xz_control", "xz_counters", "xz_csam_h0",
        "xz_csam_h1", "xz_csam_p0", "xz_csam_p1", "xz_csam_meta", "xz_csam_hits")
HOOKS = ("xdp", "tc")


class KernelError(Exception):
    """The kernel refused something, or the BPF state is not what we need."""


# ---- libbpf -------------------------------------------------------------------------------

_libbpf = ct.CDLL("libbpf.so.1", use_errno=True)


class _TestRunOpts(ct.Structure):
    """struct bpf_test_run_opts of libbpf 1.x (size-versioned: sz first)."""

    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


_libbpf.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(_TestRunOpts)]
_libbpf.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_size_t,
                                  ct.c_void_p]
_libbpf.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_libbpf.bpf_obj_get.argtypes = [ct.c_char_p]
_libbpf.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_libbpf.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_char_p, ct.c_void_p]
_libbpf.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_uint64]
_libbpf.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_char_p]
_libbpf.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_libbpf.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                         ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
_libbpf.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p,
                                         ct.POINTER(ct.c_uint32), ct.c_void_p]
_libbpf.bpf_map_delete_batch.argtypes = [ct.c_int, ct.c_char_p, ct.POINTER(ct.c_uint32),
                                         ct.c_void_p]
_libbpf.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                                    ct.c_void_p]
_libbpf.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]


def _hosted(bits: int, slash: int, idx: int) -> bytes:
    """struct xz_sub_hosted: a 256-bit mask (bit b: address b of the /24), the /24, the
    class's index."""
    m = (1 << 64) - 1
    return HOSTED.pack(*(bits >> (64 * k) & m for k in range(4)), slash, idx, 0, 0, 0)


def _unhosted(raw: bytes) -> tuple[int, int, int]:
    """(bits, slash, idx) of a struct xz_sub_hosted (_hosted's inverse)."""
    v = HOSTED.unpack(raw)
    return sum(x << (64 * k) for k, x in enumerate(v[:4])), v[4], v[5]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ct.get_errno() or -rc
        raise KernelError(f"{what}: {os.strerror(err)}")
    return rc


@dataclass(frozen=True)
class TestRun:
    """Result of one BPF_PROG_TEST_RUN: return code, packet out, mean ns per run."""

    retval: int
    data: bytes
    duration_ns: int


def test_run(fd: int, data: bytes, repeat: int = 1, ctx: bytes = b"") -> TestRun:
    """Run a loaded program on ``data`` in the kernel (BPF_PROG_TEST_RUN); ``ctx``: the
    start of its context (struct xdp_md, struct __sk_buff) as the program should see it."""
    buf_in = ct.create_string_buffer(data, len(data))
    out_size = max(len(data), 64) + 256
    buf_out = ct.create_string_buffer(out_size)
    ctx_in = ct.create_string_buffer(ctx, len(ctx))
    opts = _TestRunOpts(
        sz=ct.sizeof(_TestRunOpts),
        data_in=ct.cast(buf_in, ct.c_void_p),
        data_size_in=len(data),
        data_out=ct.cast(buf_out, ct.c_void_p),
        data_size_out=out_size,
        ctx_in=ct.cast(ctx_in, ct.c_void_p) if ctx else None,
        ctx_size_in=len(ctx),
        repeat=repeat,
    )
    _check(_libbpf.bpf_prog_test_run_opts(fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRun(opts.retval, buf_out.raw[: opts.data_size_out], opts.duration)


def pin(fd: int, path: str) -> None:
    """Pin a program or map at ``path``, replacing an older pin."""
    if os.path.exists(path):
        os.unlink(path)
    _check(_libbpf.bpf_obj_pin(fd, path.encode()), f"pin {path}")


class ProgInfo(ct.Structure):
    """The head of struct bpf_prog_info up to run_cnt (UAPI, append-only)."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64), ("name", ct.c_char * 16),
                ("ifindex", ct.c_uint32), ("gpl_compatible", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
                ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
                ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
                ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32),
                ("func_info", ct.c_uint64), ("nr_func_info", ct.c_uint32),
                ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
                ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
                ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
                ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64)]


def _prog_info(fd: int, info: ProgInfo | None = None) -> ProgInfo:
    """struct bpf_prog_info of the program behind ``fd`` (into ``info``: with pointers set,
    the kernel fills what they point at)."""
    info = info or ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "prog info")
    return info


def prog_id(fd: int) -> int:
    """Kernel id of the program behind ``fd``."""
    return _prog_info(fd).id


def prog_xlated(fd: int) -> bytes:
    """The program behind ``fd`` as the verifier left it (struct bpf_insn each; a map's
    address given back as its id, a helper call's immediate relative to __bpf_call_base)."""
    out = ct.create_string_buffer(_prog_info(fd).xlated_prog_len)
    _prog_info(fd, ProgInfo(xlated_prog_len=len(out.raw), xlated_prog_insns=ct.addressof(out)))
    return out.raw


def map_name_of_id(map_id: int) -> str:
    """The name of the map with kernel id ``map_id``."""
    fd = _check(_libbpf.bpf_map_get_fd_by_id(map_id), f"map id {map_id}")
    try:
        info = _MapInfo()
        size = ct.c_uint32(ct.sizeof(info))
        _check(_libbpf.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
        return info.name.decode()
    finally:
        os.close(fd)


def prog_run_stats(prog_id: int) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of the program with kernel id ``prog_id`` (the kernel counts
    them while kernel.bpf_stats_enabled is on); None when no such program is loaded."""
    fd = _libbpf.bpf_prog_get_fd_by_id(ct.c_uint32(prog_id))
    if fd < 0:
        return None
    try:
        info = _prog_info(fd)
        return info.run_time_ns, info.run_cnt
    finally:
        os.close(fd)


def prog_ids_named(name: str) -> list[int]:
    """Kernel ids of the loaded programs named ``name`` (the kernel keeps 15 characters)."""
    out, pid = [], ct.c_uint32(0)
    while _libbpf.bpf_prog_get_next_id(pid, ct.byref(pid)) == 0:
        fd = _libbpf.bpf_prog_get_fd_by_id(pid)
        if fd < 0:
            continue   # gone meanwhile
        try:
            if _prog_info(fd).name.decode() == name[:15]:
                out.append(pid.value)
        finally:
            os.close(fd)
    return out


_libbpf.btf__load_from_kernel_by_id.restype = ct.c_void_p
_libbpf.btf__load_from_kernel_by_id.argtypes = [ct.c_uint32]
_libbpf.btf__name_by_offset.restype = ct.c_char_p
_libbpf.btf__name_by_offset.argtypes = [ct.c_void_p, ct.c_uint32]
_libbpf.btf__free.argtypes = [ct.c_void_p]


def prog_source_lines(prog_id: int) -> tuple[int, list[tuple[int, str]]]:
    """Where the JITed program with kernel id ``prog_id`` lies (its first address) and, in
    address order, the offset in it at which each of its source lines' code starts, with
    the line's text (its line info and BTF: what a profile's addresses are placed by)."""
    fd = _check(_libbpf.bpf_prog_get_fd_by_id(ct.c_uint32(prog_id)), f"prog id {prog_id}")
    try:
        head = _prog_info(fd)
        n, lsz, jsz = head.nr_line_info, head.line_info_rec_size, head.jited_line_info_rec_size
        lines, addrs = ct.create_string_buffer(n * lsz), ct.create_string_buffer(n * jsz)
        start = (ct.c_uint64 * 1)()
        _prog_info(fd, ProgInfo(nr_line_info=n, line_info_rec_size=lsz,
                                line_info=ct.addressof(lines), nr_jited_line_info=n,
                                jited_line_info_rec_size=jsz, jited_line_info=ct.addressof(addrs),
                                nr_jited_ksyms=1, jited_ksyms=ct.addressof(start)))
    finally:
        os.close(fd)
    btf = _libbpf.btf__load_from_kernel_by_id(head.btf_id)
    if not btf:
        raise KernelError(f"prog id {prog_id}: no BTF (no line info)")
    try:
        out = []
        for k in range(n):
            line_off = struct.unpack_from("=I", lines.raw, k * lsz + 8)[0]   # bpf_line_info
            at = struct.unpack_from("=Q", addrs.raw, k * jsz)[0] - start[0]
            text = _libbpf.btf__name_by_offset(btf, line_off) or b""
            out.append((at, text.decode(errors="replace").strip()))
    finally:
        _libbpf.btf__free(btf)
    return start[0], sorted(out)


def pinned_prog_id(path: str) -> int | None:
    """Id of the program pinned at ``path``, or None when nothing is pinned there."""
    fd = _libbpf.bpf_obj_get(path.encode())
    if fd < 0:
        return None
    try:
        return prog_id(fd)
    finally:
        os.close(fd)


BPF_PROG_TYPE_XDP = 6
# Two instructions: r0 = bpf_jiffies64() (helper 118); exit. (struct bpf_insn: code,
# registers, offset, immediate.)
_JIFFIES_PROG = struct.pack("=BBhi", 0x85, 0, 0, 118) + struct.pack("=BBhi", 0x95, 0, 0, 0)
KNOWN_HZ = (100, 250, 300, 1000)


def tick_ns(window_s: float = 0.1, tries: int = 5) -> int:
    """Nanoseconds per jiffy of the running kernel: timed against the monotonic clock
    between two jiffy edges (neither the kernel's CONFIG_HZ nor, for sure, the headers
    bcc compiles with are known to us) and snapped to the tick of a known HZ; 0 (use
    the fine clock) when no measure is within 5% of one.

    Each edge is known only to within the time between the two test runs that saw the
    jiffy before and after it; a measure whose edges are that uncertain by more than 2% of
    the window (a busy or emulated machine, a preemption) is taken again, with a window
    long enough for the uncertainty seen, up to ``tries`` times."""
    fd = _libbpf.bpf_prog_load(BPF_PROG_TYPE_XDP, b"xz_jiffies", b"GPL", _JIFFIES_PROG, 2,
                               None)
    if fd < 0:
        return 0
    frame = bytes(64)

    def edge(deadline: float) -> tuple[int, int, int]:
        """The first jiffy after now, when it began (the end of the test run that saw
        it), and how long before that the previous test run still saw the one before."""
        j0 = test_run(fd, frame).retval
        before = time.monotonic_ns()
        while time.monotonic() < deadline:
            j = test_run(fd, frame).retval
            now = time.monotonic_ns()
            if j != j0:
                return j, now, now - before
            before = now
        raise TimeoutError

    try:
        for _ in range(tries):
            j1, t1, u1 = edge(time.monotonic() + 1.0)
            time.sleep(window_s)
            j2, t2, u2 = edge(time.monotonic() + 1.0)
            ticks = (j2 - j1) & 0xFFFFFFFF   # retval: the low 32 bits
            if ticks and u1 + u2 <= 0.02 * (t2 - t1):
                measured = (t2 - t1) / ticks
                for hz in KNOWN_HZ:   # 20% apart at least: 5% cannot mistake one for another
                    if abs(measured * hz / 1e9 - 1) < 0.05:
                        return 1_000_000_000 // hz
            window_s = min(2.0, max(window_s, 100 * (u1 + u2) / 1e9))
    except (KernelError, TimeoutError):
        return 0
    finally:
        os.close(fd)
    return 0


# ---- what the kernel can do: probed once per process, before anything is attached ---------

# The oldest kernel the kernel matrix runs (`make vmtest`, README "Kernel matrix"): Debian
# 12's. Each feature below says the version that brought it; a kernel older than this one
# with every feature may work, but nothing says it does.
MIN_KERNEL = "6.1"
BPF_PROG_TYPE_SCHED_CLS = 3
_MAP_TYPES = {"hash": 1, "array": 2, "prog_array": 3, "percpu_array": 6, "lru_hash": 9,
              "lpm_trie": 11, "devmap": 14, "ringbuf": 27}
# Helper ids (enum bpf_func_id) the programs call, per hook.
_HELPERS = {"map_lookup_elem": 1, "map_update_elem": 2, "ktime_get_ns": 5, "tail_call": 12,
            "redirect": 23, "csum_diff": 28, "skb_change_tail": 38, "skb_pull_data": 39,
            "xdp_adjust_head": 44, "redirect_map": 51, "xdp_adjust_tail": 65,
            "fib_lookup": 69, "jiffies64": 118, "ringbuf_reserve": 131,
            "ringbuf_submit": 132, "redirect_neigh": 152, "check_mtu": 163}
_XDP_HELPERS = ("map_lookup_elem", "map_update_elem", "ktime_get_ns", "tail_call",
                "csum_diff", "xdp_adjust_head", "redirect_map", "xdp_adjust_tail",
                "fib_lookup", "jiffies64", "ringbuf_reserve", "ringbuf_submit")
_TC_HELPERS = ("map_lookup_elem", "map_update_elem", "ktime_get_ns", "tail_call", "redirect",
               "csum_diff", "skb_change_tail", "skb_pull_data", "fib_lookup", "jiffies64",
               "ringbuf_reserve", "ringbuf_submit", "redirect_neigh", "check_mtu")
_SINCE = {"map:hash": "3.19", "map:array": "3.19", "map:prog_array": "4.2",
          "map:percpu_array": "4.6", "map:lru_hash": "4.10", "map:lpm_trie": "4.11",
          "map:devmap": "4.14", "map:ringbuf": "5.8", "helper:tail_call": "4.2",
          "helper:redirect": "4.4", "helper:csum_diff": "4.6", "helper:skb_change_tail": "4.9",
          "helper:skb_pull_data": "4.9", "helper:xdp_adjust_head": "4.10",
          "helper:redirect_map": "4.14", "helper:xdp_adjust_tail": "4.18",
          "helper:fib_lookup": "4.18", "helper:jiffies64": "5.5",
          "helper:ringbuf_reserve": "5.8", "helper:ringbuf_submit": "5.8",
          "helper:redirect_neigh": "5.10", "helper:check_mtu": "5.12", "batch:hash": "5.6",
          "batch:array": "5.6", "atomic:cmpxchg": "5.12", "batch:lpm_trie": "5.13"}


@dataclass(frozen=True)
class Feature:
    """Something of the kernel's that xdpzoot uses: required, or (with ``degrade``) used
    where the kernel has it."""

    key: str       # map:TYPE, helper:NAME (at one hook or both), batch:TYPE, atomic:cmpxchg
    what: str
    since: str     # the Linux version that brought it
    degrade: str = ""   # what xdpzoot does without it; empty: it cannot run without it


def _features() -> list[Feature]:
    out = [Feature(f"map:{t}", f"BPF map type {t}", _SINCE[f"map:{t}"]) for t in _MAP_TYPES]
    out += [Feature(f"helper:{h}", f"BPF helper bpf_{h}", _SINCE.get(f"helper:{h}", "4.1"))
            for h in _HELPERS]
    out += [Feature("batch:hash", "batch operations on hash maps", _SINCE["batch:hash"]),
            Feature("batch:array", "batch operations on array maps", _SINCE["batch:array"]),
            Feature("atomic:cmpxchg", "BPF atomic compare-and-exchange",
                    _SINCE["atomic:cmpxchg"]),
            Feature("batch:lpm_trie", "LPM trie batch operations",
                    _SINCE["batch:lpm_trie"],
                    degrade="prefixes written one by one")]
    return out


FEATURES = _features()
# Test hook: these feature keys (comma-separated) are reported missing whatever the kernel
# has, so that the refusal and the degraded paths can be tested on any kernel.
MISSING_ENV = "XZ_TEST_MISSING_FEATURES"


class _MapCreateOpts(ct.Structure):
    """struct bpf_map_create_opts of libbpf 1.x."""

    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32),
                ("btf_vmlinux_value_type_id", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("map_extra", ct.c_uint64),
                ("numa_node", ct.c_uint32), ("map_ifindex", ct.c_uint32)]


_libbpf.libbpf_probe_bpf_map_type.argtypes = [ct.c_int, ct.c_void_p]
_libbpf.libbpf_probe_bpf_helper.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
BPF_F_NO_PREALLOC = 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn."""
    return struct.pack("=BBhi", code, dst | (src << 4), off, imm)


# *(u64 *)(r10 - 8) = 0; r0 = 0; r2 = 1; r0 = cmpxchg(r10 - 8, r0, r2); r0 = XDP_PASS; exit.
_CMPXCHG_PROG = (_insn(0xB7, 1) + _insn(0x7B, 10, 1, -8) + _insn(0xB7, 0) + _insn(0xB7, 2, imm=1)
                 + _insn(0xDB, 10, 2, -8, 0xF1) + _insn(0xB7, 0, imm=2) + _insn(0x95))


def _probe_batch(map_type: int) -> bool:
    """Whether a map of ``map_type`` takes a batch update and a batch lookup."""
    lpm = map_type == _MAP_TYPES["lpm_trie"]
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts),
                          map_flags=BPF_F_NO_PREALLOC if lpm else 0)
    key = struct.pack("=I4s", 32, bytes(4)) if lpm else bytes(4)
    fd = _libbpf.bpf_map_create(map_type, b"xz_probe", len(key), 4, 4, ct.byref(opts))
    if fd < 0:
        return False
    try:
        bopts = _BatchOpts(sz=ct.sizeof(_BatchOpts))
        count = ct.c_uint32(1)
        if _libbpf.bpf_map_update_batch(fd, key, bytes(4), ct.byref(count),
                                        ct.byref(bopts)) != 0:
            return False
        keys, vals = ct.create_string_buffer(len(key) * 4), ct.create_string_buffer(16)
        token = ct.create_string_buffer(len(key))
        count = ct.c_uint32(4)
        rc = _libbpf.bpf_map_lookup_batch(fd, None, token, keys, vals, ct.byref(count),
                                          ct.byref(bopts))
        return rc == 0 or ct.get_errno() == errno.ENOENT   # ENOENT: the last batch
    finally:
        os.close(fd)


def _probe_prog(insns: bytes) -> bool:
    fd = _libbpf.bpf_prog_load(BPF_PROG_TYPE_XDP, b"xz_probe", b"GPL", insns,
                               len(insns) // 8, None)
    if fd < 0:
        return False
    os.close(fd)
    return True


_probed: dict[str, bool] = {}


def probe_features() -> dict[str, bool]:
    """Feature key -> whether this kernel has it, asked of the kernel itself (a map of each
    type created, each helper offered to each hook's verifier, batch calls made, an atomic
    loaded): some thirty system calls, once per process."""
    if not _probed:
        got: dict[str, bool] = {}
        for name, t in _MAP_TYPES.items():
            got[f"map:{name}"] = _libbpf.libbpf_probe_bpf_map_type(t, None) == 1
        for name, hid in _HELPERS.items():
            ok = True
            for ptype, names in ((BPF_PROG_TYPE_XDP, _XDP_HELPERS),
                                 (BPF_PROG_TYPE_SCHED_CLS, _TC_HELPERS)):
                if name in names:
                    ok &= _libbpf.libbpf_probe_bpf_helper(ptype, hid, None) == 1
            got[f"helper:{name}"] = ok
        for name in ("hash", "array", "lpm_trie"):
            got[f"batch:{name}"] = _probe_batch(_MAP_TYPES[name])
        got["atomic:cmpxchg"] = _probe_prog(_CMPXCHG_PROG)
        _probed.update(got)
    out = dict(_probed)
    for key in filter(None, os.environ.get(MISSING_ENV, "").split(",")):
        out[key.strip()] = False
    return out


def missing_features() -> tuple[list[Feature], list[Feature]]:
    """What this kernel lacks: (required, optional)."""
    have = probe_features()
    lacking = [f for f in FEATURES if not have.get(f.key, False)]
    return [f for f in lacking if not f.degrade], [f for f in lacking if f.degrade]


def require_kernel() -> None:
    """Raise, in one line naming what is missing, when this kernel lacks a feature that
    xdpzoot cannot run without: before anything is compiled or attached."""
    required, _ = missing_features()
    if required:
        lacks = ", ".join(f"{f.what} (Linux {f.since})" for f in required)
        raise KernelError(f"kernel {os.uname().release} lacks {lacks}; xdpzoot needs Linux "
                          f"{MIN_KERNEL} or later")


def kernel_report() -> dict:
    """The kernel for `status`: its release, the declared minimum, what it lacks, and a
    note for each feature xdpzoot does without."""
    required, optional = missing_features()
    return {"release": os.uname().release, "minimum": MIN_KERNEL,
            "missing": [f.key for f in required],
            "notes": [f"no {f.what} (Linux {f.since}): {f.degrade}" for f in optional]}


def _batched(map_type: int) -> bool:
    """Whether maps of ``map_type`` are read and written in batches here."""
    if map_type == BPF_MAP_TYPE_LPM_TRIE:
        return probe_features()["batch:lpm_trie"]
    return map_type in BATCH_TYPES


# ---- pinned maps without bcc: raw keys and values, batch operations -----------------------


class _MapInfo(ct.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16), ("rest", ct.c_uint8 * 64)]


class _BatchOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_NOEXIST = 1
# Bytes per entry of a blob map (pin_blob): one syscall per MiB, far below the largest value
# an array may hold (KMALLOC_MAX_SIZE, 4 MiB and more).
BLOB_CHUNK = 1 << 20
BPF_MAP_TYPE_PERCPU_HASH = 5
PERCPU_TYPES = (5, 6, 10)   # percpu hash, percpu array, LRU percpu hash
BPF_MAP_TYPE_LPM_TRIE = 11
# What items() and update_items() read and write in batches (the kernel's generic batch
# operations cover arrays and LPM tries too).
BATCH_TYPES = (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LPM_TRIE)


@functools.cache
def possible_cpus() -> int:
    """How many values a per-CPU map returns: one per possible CPU (fixed at boot: read
    once, not at every lookup of a per-CPU map)."""
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
        return n
BATCH = 65536
WRITERS = 4   # threads writing batches into one map at most (_in_parallel)


class PinnedMap:
    """A pinned map opened by path, keys and values as bytes of the kernel's sizes.

    Every map of an instance is reached this way (:class:`Maps`), never through a bcc
    compile. Layouts are checked against bcc's types in the tests.
    """

    def __init__(self, path: str, fd: int | None = None):
        """Open the pin at ``path``; or, given ``fd`` (a bcc table's), a copy of that."""
        self.path = path
        self.fd = _libbpf.bpf_obj_get(path.encode()) if fd is None else os.dup(fd)
        if self.fd < 0:
            raise KernelError(f"cannot open map {path}: {os.strerror(ct.get_errno())}")
        info = _MapInfo()
        size = ct.c_uint32(ct.sizeof(info))
        _check(_libbpf.bpf_obj_get_info_by_fd(self.fd, ct.byref(info), ct.byref(size)),
               f"map info {path}")
        self.type, self.key_size, self.value_size = info.type, info.key_size, info.value_size
        self.max_entries = info.max_entries
        self.memlock = _memlock(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def view(self, fmt: str) -> memoryview:
        """The values of an array made with BPF_F_MMAPABLE, mapped into this process, as
        ``fmt`` items: read and written without a system call."""
        size = self.max_entries * ((self.value_size + 7) // 8 * 8)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        return memoryview(mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)).cast(fmt)

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lookup(self, key: bytes) -> bytes | None:
        """The value; for a per-CPU map all CPUs' values, each rounded up to 8 bytes."""
        size = self.value_size
        if self.type in PERCPU_TYPES:
            size = (size + 7) // 8 * 8 * possible_cpus()
        val = ct.create_string_buffer(size)
        if _libbpf.bpf_map_lookup_elem(self.fd, key, val) != 0:
            return None
        return val.raw

    def update(self, key: bytes, value: bytes | bytearray) -> None:
        if isinstance(value, bytearray):   # written from where it is, not copied first
            value = (ct.c_char * len(value)).from_buffer(value)
        _check(_libbpf.bpf_map_update_elem(self.fd, key, value, 0), f"update {self.path}")

    def lookup_into(self, key: bytes) -> bytearray | None:
        """The value (not per-CPU) in a new bytearray, read in place: for large values."""
        out = bytearray(self.value_size)
        buf = (ct.c_char * len(out)).from_buffer(out)
        if _libbpf.bpf_map_lookup_elem(self.fd, key, buf) != 0:
            return None
        del buf
        return out

    def keys(self) -> list[bytes]:
        """Every key: batch lookups where the map type has them, else key by key."""
        if self.type in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_PERCPU_HASH):
            return self._keys_batch()
        out: list[bytes] = []
        cur, nxt = ct.create_string_buffer(self.key_size), ct.create_string_buffer(self.key_size)
        rc = _libbpf.bpf_map_get_next_key(self.fd, None, nxt)
        while rc == 0:
            out.append(nxt.raw)
            cur, nxt = nxt, cur   # the key just read is where the next walk starts
            rc = _libbpf.bpf_map_get_next_key(self.fd, cur, nxt)
        return out

    def _keys_batch(self) -> list[bytes]:
        return self._lookup_batch()[0]

    def _lookup_batch(self) -> tuple[list[bytes], bytes]:
        ks, vs = self.key_size, self.value_size
        keys = ct.create_string_buffer(ks * BATCH)
        vals = ct.create_string_buffer(vs * BATCH)
        token_in, token_out = None, ct.create_string_buffer(ks)
        opts = _BatchOpts(sz=ct.sizeof(_BatchOpts))
        out: list[bytes] = []
        values: list[bytes] = []
        while True:
            count = ct.c_uint32(BATCH)
            rc = _libbpf.bpf_map_lookup_batch(self.fd, token_in, token_out, keys, vals,
                                              ct.byref(count), ct.byref(opts))
            raw = keys.raw[: count.value * ks]
            out.extend(raw[i:i + ks] for i in range(0, len(raw), ks))
            values.append(vals.raw[: count.value * vs])
            if rc != 0:
                if ct.get_errno() == errno.ENOENT:
                    return out, b"".join(values)
                _check(rc, f"lookup batch {self.path}")
            token_in = ct.create_string_buffer(token_out.raw, ks)

    def items(self) -> tuple[list[bytes], bytes]:
        """Every key, and the values in the same order joined (``value_size`` bytes each;
        not for per-CPU maps): batch lookups where the map type has them."""
        if _batched(self.type):
            return self._lookup_batch()
        keys = self.keys()
        return keys, b"".join(self.lookup(k) or bytes(self.value_size) for k in keys)

    def values(self) -> bytearray:
        """Every value joined, without the keys, read in batches straight into one buffer
        (a map of BATCH_TYPES or a per-CPU array; an array's come in index order, a per-CPU
        value as every CPU's, each rounded up to 8 bytes, as :meth:`lookup` gives it)."""
        ks, vs = self.key_size, self.value_size
        if self.type in PERCPU_TYPES:
            vs = (vs + 7) // 8 * 8 * possible_cpus()
        out = bytearray(vs * self.max_entries)
        buf = (ct.c_char * len(out)).from_buffer(out)
        keys = ct.create_string_buffer(ks * BATCH)
        token_in, token_out = None, ct.create_string_buffer(ks)
        opts = _BatchOpts(sz=ct.sizeof(_BatchOpts))
        n = 0
        while n < self.max_entries:
            count = ct.c_uint32(min(BATCH, self.max_entries - n))
            rc = _libbpf.bpf_map_lookup_batch(self.fd, token_in, token_out, keys,
                                              ct.byref(buf, n * vs), ct.byref(count),
                                              ct.byref(opts))
            n += count.value
            if rc != 0:
                if ct.get_errno() == errno.ENOENT:
                    break
                _check(rc, f"lookup batch {self.path}")
            token_in = ct.create_string_buffer(token_out.raw, ks)
        del buf
        del out[n * vs:]
        return out

    def update_items(self, keys: list[bytes], values: bytes,
                     progress: Callable[[int], None] | None = None) -> None:
        """Write ``values[i * value_size:(i + 1) * value_size]`` under ``keys[i]``, in
        batches where the map type has them."""
        vs = self.value_size
        what = f"update {self.path}"
        batched = _batched(self.type)

        def write(i: int) -> int:
            chunk = keys[i:i + BATCH]
            vals = values[i * vs:(i + len(chunk)) * vs]
            if batched:
                count = ct.c_uint32(len(chunk))
                opts = ct.byref(_BatchOpts(sz=ct.sizeof(_BatchOpts)))
                _check(_libbpf.bpf_map_update_batch(self.fd, joined(chunk), vals,
                                                    ct.byref(count), opts), what)
            else:
                for j, k in enumerate(chunk):
                    _check(_libbpf.bpf_map_update_elem(self.fd, k, vals[j * vs:(j + 1) * vs],
                                                       0), what)
            return len(chunk)

        _in_parallel(write, range(0, len(keys), BATCH), progress,
                     parallel=self.type in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY))

    def update_many(self, keys: list[bytes] | bytes, value: bytes,
                    progress: Callable[[int], None] | None = None) -> None:
        """Write ``value`` under every key (a list, or the keys joined in one buffer), in
        batches where the map type has them."""
        self._many(keys, value, progress)

    def add_new(self, keys: list[bytes], value: bytes) -> list[bytes]:
        """Write ``value`` under every key the map does not hold yet (BPF_NOEXIST, key by
        key); returns the keys it held already, untouched."""
        held = []
        for k in keys:
            if _libbpf.bpf_map_update_elem(self.fd, k, value, BPF_NOEXIST) != 0:
                if ct.get_errno() != errno.EEXIST:
                    _check(-1, f"update {self.path}")
                held.append(k)
        return held

    def delete_many(self, keys: list[bytes],
                    progress: Callable[[int], None] | None = None) -> None:
        """Delete every key, in batches where the map type has them."""
        self._many(keys, None, progress)

    def discard(self, keys: list[bytes]) -> None:
        """Delete every key, key by key; a key the map does not hold is no error."""
        for k in keys:
            if _libbpf.bpf_map_delete_elem(self.fd, k) != 0 and ct.get_errno() != errno.ENOENT:
                _check(-1, f"delete {self.path}")

    def _many(self, keys: list[bytes] | bytes, value: bytes | None,
              progress: Callable[[int], None] | None) -> None:
        what = f"{'update' if value is not None else 'delete'} {self.path}"
        # An LPM trie takes batches too (one lock for the whole trie: no gain from
        # threads there, but no system call per entry).
        batch = self.type in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_PERCPU_HASH) or (
            self.type == BPF_MAP_TYPE_LPM_TRIE and _batched(self.type))
        ks = self.key_size if isinstance(keys, bytes) else 1   # joined: a key is ks bytes

        def write(i: int) -> int:
            chunk = keys[i * ks:(i + BATCH) * ks]
            n = len(chunk) // ks
            if batch:
                count = ct.c_uint32(n)
                opts = ct.byref(_BatchOpts(sz=ct.sizeof(_BatchOpts)))
                buf = chunk if ks > 1 else joined(chunk)
                rc = (_libbpf.bpf_map_update_batch(self.fd, buf, value * n,
                                                   ct.byref(count), opts)
                      if value is not None else
                      _libbpf.bpf_map_delete_batch(self.fd, buf, ct.byref(count), opts))
                _check(rc, what)
            else:
                for k in (chunk[j:j + ks] for j in range(0, len(chunk), ks)) if ks > 1 else chunk:
                    _check(_libbpf.bpf_map_update_elem(self.fd, k, value, 0)
                           if value is not None else _libbpf.bpf_map_delete_elem(self.fd, k),
                           what)
            return n

        _in_parallel(write, range(0, len(keys) // ks, BATCH), progress,
                     parallel=batch and self.type != BPF_MAP_TYPE_LPM_TRIE)


def _in_parallel(write: Callable[[int], int], starts: range,
                 progress: Callable[[int], None] | None, parallel: bool) -> None:
    """``write(start)`` for every batch, on as many threads as this process has CPUs (at
    most WRITERS) when ``parallel`` and there is more than one batch: a batch is one
    system call that holds no Python lock, and a hash map takes concurrent updates (a
    lock per bucket), so a million entries go in about half the time on two CPUs.
    Progress is counted here, in this thread; the first error is raised once all threads
    have stopped (the batches not written yet are then not started)."""
    n = min(len(os.sched_getaffinity(0)), WRITERS, len(starts)) if parallel else 1
    if n <= 1:
        for i in starts:
            done = write(i)
            if progress:
                progress(done)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(write, i) for i in starts]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = next((f for f in done if f.exception()), None)
            if failed:
                for f in pending:
                    f.cancel()
                raise failed.exception()
            for f in done if progress else ():
                progress(f.result())


def pin_blob(path: str, blob: bytes) -> None:
    """Keep ``blob`` in kernel memory only: a new array map of BLOB_CHUNK-byte values, the
    last one padded with zeros, pinned at ``path`` for root alone (replacing what was pinned
    there). No program uses it."""
    n = max(1, -(-len(blob) // BLOB_CHUNK))
    name = os.path.basename(path)[:15].encode()
    fd = _check(_libbpf.bpf_map_create(BPF_MAP_TYPE_ARRAY, name, 4, BLOB_CHUNK, n, None),
                f"create map {path}")
    try:
        for i in range(n):
            part = blob[i * BLOB_CHUNK:(i + 1) * BLOB_CHUNK]
            part += bytes(BLOB_CHUNK - len(part))
            _check(_libbpf.bpf_map_update_elem(fd, struct.pack("=I", i), part, 0),
                   f"update {path}")
        pin(fd, path)
        os.chmod(path, 0o600)
    finally:
        os.close(fd)


def repin(src: str, dst: str) -> None:
    """Pin what is pinned at ``src`` at ``dst`` too, for root alone (replacing what was
    pinned there): one map under two names."""
    fd = _check(_libbpf.bpf_obj_get(src.encode()), f"open {src}")
    try:
        pin(fd, dst)
        os.chmod(dst, 0o600)
    finally:
        os.close(fd)


def read_blob(path: str) -> bytearray | None:
    """What :func:`pin_blob` keeps at ``path``, padding included; None when nothing, or
    something else, is pinned there."""
    if not os.path.exists(path):
        return None
    with PinnedMap(path) as m:
        if (m.type, m.key_size, m.value_size) != (BPF_MAP_TYPE_ARRAY, 4, BLOB_CHUNK):
            return None
        out = bytearray(m.max_entries * BLOB_CHUNK)
        buf = (ct.c_char * len(out)).from_buffer(out)
        for i in range(m.max_entries):
            _check(_libbpf.bpf_map_lookup_elem(m.fd, struct.pack("=I", i),
                                               ct.byref(buf, i * BLOB_CHUNK)), f"lookup {path}")
        return out


def _memlock(fd: int) -> int:
    """The kernel's own accounting of the map's memory (fdinfo memlock)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- ring buffers ------------------------------------------------------------------------

_RingSample = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_libbpf.ring_buffer__new.restype = ct.c_void_p
_libbpf.ring_buffer__new.argtypes = [ct.c_int, _RingSample, ct.c_void_p, ct.c_void_p]
_libbpf.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
_libbpf.ring_buffer__consume.argtypes = [ct.c_void_p]
_libbpf.ring_buffer__free.argtypes = [ct.c_void_p]


class RingBuffer:
    """The records of a BPF ring buffer map (libbpf's ring_buffer__*: it maps the ring
    into this process and waits on it with epoll), as bytes, oldest first."""

    def __init__(self, m: PinnedMap):
        self._got: list[bytes] = []

        def sample(_ctx, data, size) -> int:
            self._got.append(ct.string_at(data, size))
            return 0

        self._cb = _RingSample(sample)   # kept: libbpf calls it until free
        self._rb = _libbpf.ring_buffer__new(m.fd, self._cb, None, None)
        if not self._rb:
            raise KernelError(f"ring buffer {m.path}: {os.strerror(ct.get_errno())}")

    def poll(self, timeout_ms: int) -> list[bytes]:
        """What arrives within ``timeout_ms`` (whatever is there already: at once)."""
        rc = _libbpf.ring_buffer__poll(self._rb, timeout_ms)
        if rc < 0 and -rc != errno.EINTR:   # a signal: the caller sees it on return
            raise KernelError(f"ring buffer poll: {os.strerror(-rc)}")
        return self._take()

    def drain(self) -> list[bytes]:
        """Whatever is there now, without waiting."""
        _check(_libbpf.ring_buffer__consume(self._rb), "ring buffer consume")
        return self._take()

    def _take(self) -> list[bytes]:
        got, self._got = self._got, []
        return got

    def close(self) -> None:
        if self._rb:
            _libbpf.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- BPF filesystem -----------------------------------------------------------------------


class _StatFs(ct.Structure):
    _fields_ = [("f_type", ct.c_long), ("rest", ct.c_long * 15)]


_libc = ct.CDLL(None, use_errno=True)


def _fs_magic(path: str) -> int | None:
    """statfs f_type of ``path`` via libc, None if it does not exist. (Every lock asks:
    no class or library handle is made per call.)"""
    st = _StatFs()
    if _libc.statfs(path.encode(), ct.byref(st)) != 0:
        return None
    return st.f_type & 0xFFFFFFFF


def ensure_bpffs(pin_dir: str) -> None:
    """Make ``pin_dir`` a directory on a BPF filesystem, mounting one if needed.

    Under /sys/fs/bpf the standard mount point is used; elsewhere (e.g. /run/...)
    the pin directory itself becomes the mount point. A mount made inside
    ``ip netns exec`` vanishes with that command: mount once in the host first.
    """
    if _fs_magic(pin_dir) == BPF_FS_MAGIC:
        return
    parent = os.path.dirname(pin_dir.rstrip("/"))
    if os.path.isdir(parent) and _fs_magic(parent) == BPF_FS_MAGIC:
        os.makedirs(pin_dir, exist_ok=True)
        return
    mnt = "/sys/fs/bpf" if pin_dir.startswith("/sys/fs/bpf/") else pin_dir
    os.makedirs(mnt, exist_ok=True)
    if _libc.mount(b"bpf", mnt.encode(), b"bpf", 0, None) != 0:
        raise KernelError(f"cannot mount bpffs at {mnt}: {os.strerror(ct.get_errno())}")
    os.makedirs(pin_dir, exist_ok=True)
    if mnt.startswith("/sys/") and _in_named_netns():
        sys.stderr.write(
            f"xdpzoot: warning: mounted a BPF filesystem at {mnt} in a private mount "
            "namespace (ip netns exec?): the pins vanish when this command exits. Mount one "
            "in the host's namespace outside /sys and use --pin-dir below it.\n")


MNT_DETACH = 2


@contextlib.contextmanager
def scratch_bpffs(prefix: str) -> Iterator[str]:
    """A BPF filesystem of its own for tests and benchmarks: mounted on a new directory
    under /run (in this mount namespace, outside /sys, so that `ip netns exec` sees it),
    lazily unmounted and removed at the end, whatever happened."""
    root = tempfile.mkdtemp(prefix=prefix, dir="/run")
    try:
        if _libc.mount(b"bpf", root.encode(), b"bpf", 0, None) != 0:
            raise KernelError(f"cannot mount bpffs at {root}: {os.strerror(ct.get_errno())}")
        yield root
    finally:
        _libc.umount2(root.encode(), MNT_DETACH)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def lock(pin_dir: str) -> Iterator[None]:
    """Serialise writers of one instance: an exclusive flock on its pin directory."""
    ensure_bpffs(pin_dir)
    fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _in_named_netns() -> bool:
    """Whether this process runs in a namespace made by `ip netns` (so, most likely, under
    `ip netns exec`, which gives it a private /sys)."""
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        return any(os.stat(os.path.join("/run/netns", n)).st_ino == mine
                   for n in os.listdir("/run/netns"))
    except OSError:
        return False


def pinned(pin_dir: str) -> bool:
    """True when xdpzoot's maps are pinned under ``pin_dir``."""
    return all(os.path.exists(os.path.join(pin_dir, m)) for m in MAPS)


def unpin_all(pin_dir: str) -> None:
    """Remove every pin of ours under ``pin_dir`` and the directory if it is then empty."""
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        if name.startswith(("xz_", "prog_")):
            os.unlink(os.path.join(pin_dir, name))
    try:
        os.rmdir(pin_dir)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            raise


# ---- the layout of the pinned maps --------------------------------------------------------
# bcc's BPF_TABLE_PINNED reuses whatever is pinned under a map's name: a map of another key
# size, value size or max_entries is taken as it is, with no error (bcc's table object then
# even reports the source's max_entries, not the kernel's). So the maps carry the digest of
# the layout they were made with, pinned beside them, and nothing opens them under another.

LAYOUT_PIN = "xz_layout"
LAYOUT_HEADERS = ("xdpzoot.h", "maps.h")   # the structs, the limits and the map definitions


def _code(text: str) -> str:
    """C source without its comments and with its spacing normalised."""
    return " ".join(re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S).split())


@functools.cache
def _layout_code() -> bytes:
    """The headers that define the maps, comments and spacing left out (read once)."""
    return b"".join(_code((schema.BPF_DIR / name).read_text()).encode() + b"\0"
                    for name in LAYOUT_HEADERS)


def layout_digest(defines: Iterable[str]) -> str:
    """SHA-256 of the map layout: the headers that define the maps (comments and spacing
    left out) and the -D limits in force."""
    h = hashlib.sha256(_layout_code())
    for d in sorted(defines):
        h.update(d.encode() + b"\0")
    return h.hexdigest()


def pin_layout(pin_dir: str, defines: Iterable[str]) -> None:
    """Pin the layout the maps under ``pin_dir`` were made with: its digest, and the
    defines in force (so that a command without them can check the headers)."""
    defines = sorted(defines)
    pin_blob(os.path.join(pin_dir, LAYOUT_PIN),
             "\n".join([layout_digest(defines), *defines]).encode())


def check_layout(pin_dir: str, defines: Iterable[str] | None = None) -> bool:
    """Refuse (KernelError, one line) when maps are pinned under ``pin_dir`` with a layout
    other than this build's with ``defines`` (None: with the defines they were made with,
    i.e. the headers alone). Maps without a layout pin are from a build before it: other.
    False when no map is pinned there."""
    if not any(os.path.exists(os.path.join(pin_dir, m)) for m in MAPS):
        return False
    todo = (f"detach (`xdpzoot --pin-dir {pin_dir} detach` removes the pins) and attach "
            "again; the maps are made anew, empty")
    blob = read_blob(os.path.join(pin_dir, LAYOUT_PIN))
    if blob is None:
        raise KernelError(f"{pin_dir}: maps pinned by a build without a layout digest, "
                          f"perhaps of another layout: {todo}")
    digest, *pinned_defs = blob.rstrip(b"\0").decode().split("\n")
    if layout_digest(pinned_defs) != digest:
        raise KernelError(f"{pin_dir}: maps pinned by a build whose headers define other map "
                          f"layouts (bpf/xdpzoot.h, bpf/maps.h): {todo}")
    if defines is not None and layout_digest(defines) != digest:
        old, new = set(pinned_defs), set(defines)
        diff = ", ".join(sorted(old - new)) + " -> " + ", ".join(sorted(new - old))
        raise KernelError(f"{pin_dir}: maps pinned with other limits ({diff}; config "
                          f"[limits]): {todo}, or put the limits back")
    return True


# ---- compile and load ---------------------------------------------------------------------


def _inline(path: Path, seen: set[Path]) -> str:
    """Source with local ``#include "x.h"`` expanded: bcc rewrites map calls in the main
    file only, so the headers must be part of it."""
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r'#include "(.+)"', line)
        if m:
            inc = path.parent / m.group(1)
            if inc not in seen:
                seen.add(inc)
                out.append(_inline(inc, seen))
            continue
        out.append(line)
    return "\n".join(out)


def program_source() -> str:
    """The whole data plane as one compilation unit."""
    return _inline(schema.BPF_DIR / "xdpzoot.c", set())


def maps_source() -> str:
    """Just the map definitions: compiles in a fraction of a second, opens the pins."""
    return "#include <uapi/linux/bpf.h>\n" + _inline(schema.BPF_DIR / "maps.h", set())


# Warnings of the kernel's own headers, not of ours, under the clang of Debian 12's bcc
# (LLVM 14) with 6.12's headers: x86 per-CPU address spaces written twice
# (asm/percpu.h, reached through bcc's helpers.h) and IBT's nocf_check without
# -fcf-protection (asm/ibt.h). bcc includes those headers itself, so no pragma of ours
# can reach them; every other warning stays an error.
KERNEL_HEADER_WARNINGS = ("-Wno-duplicate-decl-specifier", "-Wno-ignored-attributes")


def cflags(pin_dir: str, defines: Iterable[str] = ()) -> list[str]:
    """Compiler flags: warnings are errors (but KERNEL_HEADER_WARNINGS), sizes and the pin
    directory as -D."""
    return ["-Werror", "-Wall", *KERNEL_HEADER_WARNINGS, f'-DXZ_PIN_DIR="{pin_dir}"',
            *defines]


def compile_bpf(pin_dir: str, defines: Iterable[str] = (), maps_only: bool = False):
    """Compile with bcc. Pinned maps that exist are reused (when their layout is this one:
    check_layout), others created and pinned, with the layout's digest."""
    from bcc import BPF  # imported here: only commands that touch the kernel need bcc

    ensure_bpffs(pin_dir)
    defines = list(defines)
    if not check_layout(pin_dir, defines):   # the maps are made now, with this layout
        pin_layout(pin_dir, defines)
    text = maps_source() if maps_only else program_source()
    try:
        bpf = BPF(text=text.encode(), cflags=cflags(pin_dir, defines))
    except Exception as e:  # bcc raises bare Exception
        raise KernelError(f"BPF compile/load failed: {e}") from e
    return bpf


def program_name(hook: str, role: str) -> str:
    """Function name of the entry point for a hook and interface role."""
    return f"xz_{hook}_{role}"


def load_program(bpf, hook: str, role: str) -> int:
    """Load one entry point through the verifier; returns its fd."""
    from bcc import BPF

    kind = BPF.XDP if hook == "xdp" else BPF.SCHED_CLS
    try:
        # The entry points tail-call the reply program (rejected packets) and the fast path
        # (passed ones, while it is on).
        tail = bpf[f"xz_tail_{hook}".encode()]
        for slot, part in ((schema.C["XZ_TAIL_REPLY"], "reply"),
                           (schema.C["XZ_TAIL_FAST"], "fast")):
            tail[ct.c_int(slot)] = ct.c_int(bpf.load_func(f"xz_{hook}_{part}".encode(), kind).fd)
        return bpf.load_func(program_name(hook, role).encode(), kind).fd
    except Exception as e:
        raise KernelError(f"loading {program_name(hook, role)}: {e}") from e


def load_named(bpf, name: str, hook: str = "xdp") -> int:
    """Load any function of the program (tests and benchmarks: xz_xdp_empty)."""
    from bcc import BPF

    return bpf.load_func(name.encode(), BPF.XDP if hook == "xdp" else BPF.SCHED_CLS).fd


NOT_LOADED = "xdpzoot is not loaded (no maps pinned under {})"
CONTROL_KEY = ZERO_KEY


class Maps:
    """Every map of one instance, opened lazily from its pin (never a compile), read and
    written as plain values: the subscriber maps (xz_hosts, 16-byte address, and xz_prefixes,
    struct xz_lpm_key, to struct xz_class, the state slots their entries point at), the
    allow-list, the control value, counters, throttles, the fast path and both CSAM
    generations. Host keys are 16-byte addresses, prefix keys ``(prefixlen, address)`` over
    128 bits, IPv4 mapped into ::ffff:0:0/96.

    No locking here: :class:`xdpzoot.dataplane.instance.Instance` owns one of these and
    holds the pin directory's lock around every write of a value two writers share; it sets
    ``guard``, which those writes call first (it raises when the lock is not held).
    """

    def __init__(self, pin_dir: str, defines: Iterable[str] | None = None):
        self.pin_dir = pin_dir
        self.defines = None if defines is None else list(defines)   # the config's limits
        self.guard: Callable[[], None] | None = None
        self._open: dict[str, PinnedMap] = {}
        self._uniform_off = False   # inside uniform_off: writes leave the class index be

    def map(self, name: str) -> PinnedMap:
        """The map pinned as ``name``, opened on first use."""
        m = self._open.get(name)
        if m is None:
            path = os.path.join(self.pin_dir, name)
            if not os.path.exists(path):
                raise KernelError(NOT_LOADED.format(self.pin_dir))
            if not self._open:   # maps of another build's layout are never used
                check_layout(self.pin_dir, self.defines)
            m = self._open[name] = PinnedMap(path)
        return m

    def close(self) -> None:
        for m in self._open.values():
            m.close()
        self._open.clear()
        self.__dict__.pop("lanes", None)
        self.__dict__.pop("hosted_words", None)
        self.__dict__.pop("sub_v6_words", None)

    def __enter__(self) -> Maps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_writer(self) -> None:
        """Before a write of a value another writer may change too: the owner's guard
        (Instance: is the lock held?)."""
        if self.guard is not None:
            self.guard()

    host_map = property(lambda self: self.map("xz_hosts"))
    prefix_map = property(lambda self: self.map("xz_prefixes"))
    state_map = property(lambda self: self.map("xz_state"))
    throttle_map = property(lambda self: self.map("xz_throttle"))
    dir_map = property(lambda self: self.map("xz_sub_dir"))
    idx_map = property(lambda self: self.map("xz_sub_idx"))
    uniform_map = property(lambda self: self.map("xz_uniform"))
    hosted_map = property(lambda self: self.map("xz_sub_hosted"))
    sub_v6_map = property(lambda self: self.map("xz_sub_v6"))
    prefix6_map = property(lambda self: self.map("xz_prefixes6"))
    v6_lens_map = property(lambda self: self.map("xz_sub_v6_lens"))

    @functools.cached_property
    def lanes(self) -> memoryview:
        """The class index's lanes, mapped: item i is IPv4 /24 number i's."""
        return self.idx_map.view("H")

    @functools.cached_property
    def hosted_words(self) -> memoryview:
        """xz_sub_hosted, mapped: entry n is words n * 8 .. n * 8 + 7 (HOSTED)."""
        return self.hosted_map.view("Q")

    @functools.cached_property
    def sub_v6_words(self) -> memoryview:
        """xz_sub_v6 (struct xz_filter), mapped: its header (dirs.FILTER_HEAD_WORDS words:
        ``on`` in the low half of word 0), then the bits."""
        return self.sub_v6_map.view("Q")

    contract_map = property(lambda self: self.map("xz_contracts"))
    pool_map = property(lambda self: self.map("xz_pool_addrs"))
    pool_op25b = property(lambda self: self.map("xz_pool_op25b"))
    op25b_noted = property(lambda self: self.map("xz_op25b_noted"))
    allow = property(lambda self: self.map("xz_allow"))
    control = property(lambda self: self.map("xz_control"))
    counters = property(lambda self: self.map("xz_counters"))
    manual = property(lambda self: self.map("xz_manual"))
    pool_state = property(lambda self: self.map("xz_pool_state"))
    flows = property(lambda self: self.map("xz_flows"))
    fast = property(lambda self: self.map("xz_fast"))
    devmap = property(lambda self: self.map("xz_fast_ifs"))
    fast_macs_map = property(lambda self: self.map("xz_fast_macs"))   # by ifindex
    meta = property(lambda self: self.map("xz_csam_meta"))
    hits = property(lambda self: self.map("xz_csam_hits"))
    csam_hosts = property(lambda self: (self.map("xz_csam_h0"), self.map("xz_csam_h1")))
    csam_prefixes = property(lambda self: (self.map("xz_csam_p0"), self.map("xz_csam_p1")))
    csam_filters = property(lambda self: self.map("xz_csam_f"))    # IPv6, by generation
    csam_filters4 = property(lambda self: self.map("xz_csam_f4"))  # IPv4, by generation:
    # its header; its bits in xz_csam_b4 (read_csam_v4, write_csam_v4)
    trace_ring = property(lambda self: self.map("xz_trace_ring"))
    trace_state = property(lambda self: self.map("xz_trace_state"))

    @property
    def slots(self) -> int:
        """How many state slots there are (slot 0, per-address state, included)."""
        return self.state_map.max_entries

    # ---- subscriber maps: whole tables --------------------------------------------------
    def read(self, m: PinnedMap) -> ClassTable:
        """Every entry of ``host_map`` or ``prefix_map``."""
        keys, values = m.items()
        return ClassTable(keys, array("I", values))

    def host_table(self) -> ClassTable:
        return self.read(self.host_map)

    def prefix_table(self) -> ClassTable:
        return self.read(self.prefix_map)

    def write(self, m: PinnedMap, t: ClassTable,
              progress: Callable[[int], None] | None = None) -> None:
        self.check_writer()
        self._unshare(m, t.keys)
        m.update_items(t.keys, t.values.tobytes(), progress)
        self._mirror6(m, t.keys, t.values.tobytes())

    def delete(self, m: PinnedMap, keys: list[bytes],
               progress: Callable[[int], None] | None = None) -> None:
        self.check_writer()
        if m is self.prefix_map:
            self._unshare(m, keys)
        m.delete_many(keys, progress)
        self._mirror6(m, keys, None)

    # ---- IPv6 prefixes by exact key (xz_prefixes6, xz_sub_v6_lens) ------------------------
    def _mirror6(self, m: PinnedMap, keys: list[bytes], values: bytes | None) -> None:
        """After a write (``values``: packed classes, one per key) or a delete (None) of
        the prefix trie: the same for its IPv6 keys in xz_prefixes6, and a written key's
        length among those the program probes. A length stays after its last prefix goes
        (a probe that finds nothing) until sync_uniform."""
        if m is not self.prefix_map:
            return
        six = dirs.v6_prefix_keys(keys)
        if not six:
            return
        h = self.prefix6_map
        if values is None:
            h.discard([k for _, k in six])
            return
        n = CLASS.size
        h.update_items([k for _, k in six], b"".join(values[i * n:(i + 1) * n] for i, _ in six))
        raw = self.v6_lens_map.lookup(ZERO_KEY)
        new = dirs.lens_add(raw, {LPM_KEY.unpack(k)[0] for _, k in six})
        if new != raw:
            self.v6_lens_map.update(ZERO_KEY, new)

    def _sync6(self, keys: list[bytes], values: bytes) -> None:
        """xz_prefixes6 and the lengths made exact from the trie's ``keys`` and ``values``
        (all of them): what differs written, the lengths, then what is gone deleted."""
        n, h = CLASS.size, self.prefix6_map
        want = {k: values[i * n:(i + 1) * n] for i, k in dirs.v6_prefix_keys(keys)}
        hk, hv = h.items()
        have = {k: hv[i * n:(i + 1) * n] for i, k in enumerate(hk)}
        write = [k for k, v in want.items() if have.get(k) != v]
        if write:
            h.update_items(write, b"".join(want[k] for k in write))
        lens = dirs.lens_word(LPM_KEY.unpack(k)[0] for k in want)
        if self.v6_lens_map.lookup(ZERO_KEY) != lens:
            self.v6_lens_map.update(ZERO_KEY, lens)
        gone = [k for k in have if k not in want]
        if gone:
            h.delete_many(gone)

    # ---- the class index (dirs.py): IPv4 /24 -> the class of the prefix that covers it --
    def _unshare(self, m: PinnedMap, keys: list[bytes]) -> None:
        """Before ``keys`` (packed) of the host or prefix map are written (or a prefix
        deleted): the class index stops answering for what they change, so that a new
        host entry or longer prefix, or a prefix's new class, is looked up at once. A
        prefix zeroes whole entries of eight /24s (never wrong, only slower until
        sync_uniform); a host entry marks its address (_mark_hosts). Nothing to do inside
        uniform_off."""
        if self._uniform_off:
            return
        if m is self.host_map:
            self._mark_v6(keys)
            self._mark_hosts(keys)
        elif m is self.prefix_map:
            rows = dirs.index_rows(dirs.lpm_columns(keys))
            self._write_rows(dict.fromkeys(rows, bytes(self.idx_map.value_size)))

    def _mark_v6(self, keys: list[bytes]) -> None:
        """Set the IPv6 host filter's bit of each IPv6 key's /64 (xz_sub_v6), before
        it is written. A delete leaves the bit (a /64 whose bit is set without a host entry
        is looked up: slower, not wrong) until a whole load (sync.apply_plan) writes the filter
        exact (write_sub_v6)."""
        q, at = self.sub_v6_words, dirs.FILTER_HEAD_WORDS
        for k in keys:
            if k[:12] != dirs.V4MAPPED:
                h = dirs.sub_v6_bit(k)
                q[at + (h >> 6)] |= 1 << (h & 63)

    def write_sub_v6(self, f: bytes) -> None:
        """The exact IPv6 host filter (dirs.subscribers) of what the host map holds: its
        bits, then its header, which switches it on. Every bit a host entry needs is set in
        the old words (or the filter is off) and in the new ones, so a program reading
        while they are written finds it either way."""
        self.check_writer()
        q, new, at = self.sub_v6_words, memoryview(f).cast("Q"), dirs.FILTER_HEAD_WORDS
        q[at:at + dirs.FILTER_WORDS] = new[at:]
        for i in reversed(range(at)):   # the word with ``on`` last
            q[i] = new[i]

    def _mark_hosts(self, keys: list[bytes]) -> None:
        """Mark the IPv4 ``keys`` as host entries in the class index, before they are
        written. A /24 whose lane names a class gets an entry of xz_sub_hosted with that
        class and the address marked (a number above every one in use: none a program can
        still hold); without room, its lane is zeroed. A mark changes one bit, so a program
        reading the entry as it is written finds it either way, and both answers are right
        until the entry is written. A delete leaves the mark (an address without a host
        entry that is marked is looked up: slower, not wrong) until sync_uniform: where
        sessions come and go, the addresses without one carry little traffic, and a Stop
        then costs no more than before."""
        if not keys:
            return
        lanes, q, hm = self.lanes, self.hosted_words, self.hosted_map
        publish: dict[int, int] = {}   # /24 -> its new lane, written as rows at the end
        top = None
        for k in keys:
            i = dirs.slash24(k)
            if i is None:
                continue
            v = publish.get(i, lanes[i])
            if v & HOSTED_LANE:
                e = (v & ~HOSTED_LANE) * HOSTED_WORDS
                if q[e + HOSTED_AT] & 0xFFFF_FFFF == i:   # the bit, set in place
                    q[e + (k[15] >> 6)] |= 1 << (k[15] & 63)
                    continue
                publish[i] = 0   # not this /24's (never so between syncs): look it up
            elif v:   # a new entry, numbered above every one in use
                top = _unhosted(hm.lookup(ZERO_KEY))[1] if top is None else top
                publish[i] = 0   # no room: look it up
                if top + 1 < hm.max_entries:
                    top += 1
                    hm.update(U32.pack(top), _hosted(1 << k[15], i, v))
                    publish[i] = HOSTED_LANE | top
        if top is not None:
            hm.update(ZERO_KEY, _hosted(0, top, _unhosted(hm.lookup(ZERO_KEY))[2]))
        rows = {i // dirs.LANES for i in publish}
        self._write_rows({r: IDX_ROW.pack(*(publish.get(r * dirs.LANES + j, lanes[
            r * dirs.LANES + j]) for j in range(dirs.LANES))) for r in sorted(rows)})

    @contextlib.contextmanager
    def uniform_off(self, before: list[bytes] | None = None,
                    after: ClassTable | None = None) -> Iterator[None]:
        """Around a whole load: the class index answers for nothing while the maps change
        (so that a million writes need not zero lanes one by one), and is set from the
        maps again at the end (not after an error: it then stays off, which is safe).
        ``before``, ``after``: the prefix map's keys now and its entries at the end, where
        the writer knows them (a load's plan, under the lock): not read from the trie,
        whose walk takes some 0.1 s at 200,000 prefixes."""
        self.check_writer()
        keys = self.prefix_map.keys() if before is None else before
        rows = dirs.index_rows(dirs.lpm_columns(keys))
        self._write_rows(dict.fromkeys(rows, bytes(self.idx_map.value_size)))
        self.uniform_map.update(ZERO_KEY, bytes(CLASS.size))   # its counts: none
        self.sub_v6_words[0] = 0   # the IPv6 host filter off: every address looked up
        self._uniform_off = True
        try:
            yield
        finally:
            self._uniform_off = False
        self.sync_uniform(after)

    def sync_uniform(self, prefixes: ClassTable | None = None) -> None:
        """Bring the class index to what the prefix map (``prefixes``: its entries, where
        the caller knows them), the directory and the host entries say (dirs.uniform), and
        the IPv6 prefixes' hash to the trie (_sync6). Lanes that change are zeroed first,
        then the classes and the entries of /24s with hosts written, then the lanes set: a
        program finds an index only with its own class (after a pause when an index or
        entry changes hands, longer than any program runs)."""
        self.check_writer()
        keys, values = ((prefixes.keys, prefixes.values.tobytes()) if prefixes is not None
                        else self.prefix_map.items())
        self._sync6(keys, values)   # the IPv6 prefixes' hash, exact
        columns = dirs.lpm_columns(keys)
        im, um, hm = self.idx_map, self.uniform_map, self.hosted_map
        slash, lanes, owners, bits = dirs.uniform(columns, self.read_dir(), um.max_entries,
                                                  self.host_map.keys, hm.max_entries)
        rows = dirs.index_rows(columns)   # no lane is set outside these
        have = {r: im.lookup(U32.pack(r)) for r in rows}
        lane_of = dict(zip(slash.tolist(), lanes.tolist(), strict=True))
        # a /24 with hosts keeps its entry of xz_sub_hosted; the others take free ones
        held = {r * dirs.LANES + j: v & ~HOSTED_LANE for r, raw in have.items()
                for j, v in enumerate(IDX_ROW.unpack(raw)) if v & HOSTED_LANE}
        kept = {i: held[i] for i in bits if i in held}
        taken = set(kept.values())
        free = (n for n in range(1, hm.max_entries) if n not in taken)
        number = {i: kept[i] if i in kept else next(free) for i in sorted(bits)}
        want = {r: bytearray(im.value_size) for r in rows}
        for i, v in lane_of.items():
            v = HOSTED_LANE | number[i] if i in number else v
            IDX_LANE.pack_into(want[i // dirs.LANES], i % dirs.LANES * IDX_LANE.size, v)
        vs = CLASS.size   # a class in xz_uniform as in the trie
        new = {i + 1: values[o * vs:(o + 1) * vs] for i, o in enumerate(owners)}
        moved = {i for i, v in new.items() if um.lookup(U32.pack(i)) != v}
        entries = {n: _hosted(bits[i], i, lane_of[i]) for i, n in number.items()}
        was = {n: hm.lookup(U32.pack(n)) for n in set(held.values()) | set(entries)}
        moved_h = {n for n, v in entries.items() if was[n] != v}

        def changing(v: int) -> bool:   # what a program that read lane v finds changes
            if v & HOSTED_LANE:
                n = v & ~HOSTED_LANE
                return n in moved_h or _unhosted(was[n])[2] in moved
            return v in moved
        # 1: zero every lane that changes, or points at a class or entry that does
        stage, pause = {}, False
        for r in rows:
            h = IDX_ROW.unpack(have[r])
            w = IDX_ROW.unpack(want[r])
            keep = [a if a == b and not changing(a) else 0 for a, b in zip(h, w, strict=True)]
            pause |= any(a and not k and changing(a) for a, k in zip(h, keep, strict=True))
            if keep != list(h):
                stage[r] = IDX_ROW.pack(*keep)
        self._write_rows(stage)
        if pause:
            time.sleep(UNIFORM_PAUSE_S)
        # 2: the classes and the entries of /24s with hosts; 3: the lanes
        if moved:
            um.update_items([U32.pack(i) for i in sorted(moved)],
                            b"".join(new[i] for i in sorted(moved)))
        if moved_h:
            hm.update_items([U32.pack(n) for n in sorted(moved_h)],
                            b"".join(entries[n] for n in sorted(moved_h)))
        self._write_rows({r: bytes(w) for r, w in want.items()
                          if bytes(w) != stage.get(r, have[r])})
        # index 0 names no class nor /24: it keeps the counts (classes in sub_id, /24s in
        # slot; entries of /24s with hosts: the highest number in use, and how many)
        um.update(ZERO_KEY, pack_class(Entry(len(owners), 0, slot=len(slash))))
        hm.update(ZERO_KEY, _hosted(0, max(number.values(), default=0), len(number)))

    def uniform_counts(self) -> tuple[int, int]:
        """(classes, /24s) the class index held at its last sync (0, 0 while off)."""
        e = _entry(CLASS.unpack(self.uniform_map.lookup(ZERO_KEY)))
        return e.sub_id, e.slot

    def hosted_in_use(self) -> int:
        """Entries of xz_sub_hosted in use (numbers given out since the last sync
        included: a number is taken again at a sync only)."""
        return _unhosted(self.hosted_map.lookup(ZERO_KEY))[1]

    def _write_rows(self, rows: dict[int, bytes]) -> None:
        if rows:
            self.idx_map.update_items([U32.pack(r) for r in rows], b"".join(rows.values()))

    def read_dir(self) -> bytearray:
        """The IPv4 /24 directory of the subscriber maps (dirs.py)."""
        return self.dir_map.lookup_into(ZERO_KEY)

    def write_dir(self, d: bytes | bytearray) -> None:
        self.check_writer()
        self.dir_map.update(ZERO_KEY, d)

    def _adding(self, hosts: list[bytes], prefixes: list[tuple[int, bytes]]) -> None:
        """Before new entries go in: the directory stops saying they are absent."""
        d = self.read_dir()
        if dirs.subscriber_added(d, hosts, prefixes):
            self.write_dir(d)

    def class_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """Every value of the host map and of the prefix map, one row of WORDS uint32 per
        entry (struct xz_class: sub_id, class_word, up, down, slot), read in batches
        straight into one buffer each: a tick of the daemon reads a million entries."""
        import numpy as np

        return tuple(np.frombuffer(m.values(), dtype=np.uint32).reshape(-1, WORDS)
                     for m in (self.host_map, self.prefix_map))

    def owner_ids(self, columns: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Subscriber id per state slot (0: no owner), from the host and prefix entries (a
        pool's addresses, indexed or not, have no owner; slot 0 is theirs), as
        :meth:`class_columns` has them (read now when not given)."""
        import numpy as np

        out = np.zeros(self.slots, dtype=np.uint32)
        for v in columns or self.class_columns():
            v = v[(v[:, 1] & POOL_BITS_WORD) == 0]
            out[v[:, 4]] = v[:, 0]
        out[0] = 0
        return out

    def owners(self) -> dict[int, int]:
        """State slot -> subscriber id (owner_ids as a dict)."""
        import numpy as np

        ids = self.owner_ids()
        slots = np.flatnonzero(ids)
        return dict(zip(slots.tolist(), ids[slots].tolist(), strict=True))

    def clear_pool_blocks(self, blocks: Iterable[tuple[int, int]]) -> None:
        """Zero the pool-address state and SMTP attempts of ``(first index, count)``
        blocks. The attempts in place (xz_pool_op25b mapped): a value holds the counters of
        XZ_OP25B_PER addresses, and one written whole would undo the adds to its other
        counters that the programs make meanwhile. (Attempts of the block's last addresses
        still noted in a CPU's batch, at most XZ_OP25B_BATCH - 1 a CPU, are added after.)"""
        self.check_writer()
        attempts = self.pool_op25b.view("I")
        for first, n in blocks:
            keys = [struct.pack("=I", i) for i in range(first, first + n)]
            self.pool_map.update_items(keys, bytes(self.pool_map.value_size) * n)
            attempts[first:first + n] = array("I", bytes(4 * n))

    def indexed_pool_volumes(self) -> dict[bytes, Volume]:
        """Address -> volume, for the addresses of indexed pools that sent or received
        anything (xz_pool_addrs read whole)."""
        pools = [(LPM_KEY.unpack(k)[1], e) for k, e in self.read(self.prefix_map).items()
                 if e.pool_bits]
        if not pools:
            return {}
        _, raw = self.pool_map.items()
        smtp = array("I")   # the SMTP attempts, in an array of their own, copied now
        smtp.frombytes(self.pool_op25b.view("B"))
        noted, _ = self.noted_op25b()   # and those not added there yet: read after it
        n, zero, out = STATE.size, bytes(STATE.size), {}
        epoch = self.control_value().scan_epoch
        for addr, e in pools:
            first = int.from_bytes(addr, "big")
            for i in range(1 << e.pool_bits):
                off, attempts = (e.slot + i) * n, smtp[e.slot + i] + noted.get(e.slot + i, 0)
                if raw[off:off + n] != zero or attempts:
                    v = list(STATE.unpack_from(raw, off))
                    v[OP25B] = attempts
                    out[(first + i).to_bytes(16, "big")] = volume(v, epoch)
        return out

    def noted_op25b(self) -> tuple[Counter[int], Counter[int]]:
        """SMTP attempts noted in the CPUs' batches and not yet added to their counters
        (struct xz_op25b_batch): (by pool address index, by slot). Read after the
        counters, a batch added in between is in neither read: a count may lag by what came
        meanwhile, never count twice."""
        raw = self.op25b_noted.lookup(U32.pack(0)) or b""
        pools: Counter[int] = Counter()
        slots: Counter[int] = Counter()
        for off in range(0, len(raw), NOTED.size):   # (a multiple of 8 bytes: no gaps)
            n, *idx, _ = NOTED.unpack_from(raw, off)
            for e in idx[:n % len(idx)]:
                if e & NOTED_SLOT:
                    slots[e & ~NOTED_SLOT] += 1
                else:
                    pools[e] += 1
        return pools, slots

    def volumes(self, slots: Iterable[int]) -> dict[int, Volume]:
        """Slot -> what its subscriber sent and received so far. The state array is read
        whole, in batches (an array's batch comes in index order): a tick of the daemon
        wants every slot."""
        _, values = self.state_map.items()
        _, noted = self.noted_op25b()   # read after the counters
        epoch = self.control_value().scan_epoch
        out = {}
        for s in slots:
            v = list(STATE.unpack_from(values, s * STATE.size))
            v[OP25B] += noted.get(s, 0)
            out[s] = volume(v, epoch)
        return out

    def state_words(self) -> np.ndarray:
        """The state array read whole, in batches: a row of STATE's fields (uint64) per
        slot."""
        import numpy as np

        return np.frombuffer(self.state_map.values(), dtype=np.uint64).reshape(
            -1, STATE.size // 8)

    def byte_counters(self, words: np.ndarray | None = None) -> np.ndarray:
        """Per state slot, the bytes its subscriber sent and received so far (up, down),
        from ``words`` (state_words) or the array read now."""
        words = self.state_words() if words is None else words
        return words[:, [2, 6]]   # up.bytes, down.bytes

    def clear_state(self, slots: Iterable[int]) -> None:
        """Forget slots' counters, buckets and throttles (they are given to someone else).
        (SMTP attempts of theirs still noted in a CPU's batch, at most XZ_OP25B_BATCH - 1 a
        CPU, are added after.)"""
        self.check_writer()
        keys = [U32.pack(s) for s in sorted(slots)]
        for m in (self.state_map, self.throttle_map):
            m.update_items(keys, bytes(m.value_size * len(keys)))

    # ---- RADIUS contracts: subscriber id -> the class of its session entries --------------
    def read_contracts(self) -> ClassTable:
        """Every contract (keys: U32-packed subscriber ids; the directory's count at key 0
        left out)."""
        t = self.read(self.contract_map)
        if ZERO_KEY in t.keys:
            t = t.take([i for i, k in enumerate(t.keys) if k != ZERO_KEY])
        return t

    def get_contract(self, sub_id: int) -> Entry | None:
        if not 0 < sub_id <= 0xFFFF_FFFF:   # no subscriber has that id
            return None
        raw = self.contract_map.lookup(U32.pack(sub_id))
        return _entry(CLASS.unpack(raw)) if raw is not None else None

    def set_contract(self, sub_id: int, e: Entry) -> None:
        self.check_writer()
        self.contract_map.update(U32.pack(sub_id), pack_class(e))

    def dir_writes(self) -> int:
        """How many times the subscriber directory was written whole (exact, which may set
        bits that say "absent"): a writer that keeps a copy of it reads it again when this
        moved."""
        raw = self.contract_map.lookup(ZERO_KEY)
        return CLASS.unpack(raw)[0] if raw is not None else 0

    def get_class(self, m: PinnedMap, key: bytes) -> Entry | None:
        """The entry of ``host_map`` or ``prefix_map`` that a lookup of ``key`` finds (in
        the trie: the longest prefix holding it)."""
        raw = m.lookup(key)
        return _entry(CLASS.unpack(raw)) if raw is not None else None

    def put_class(self, m: PinnedMap, key: bytes, e: Entry) -> None:
        """Write one entry; the caller has seen to the directory (set_host does that)."""
        self.check_writer()
        self._unshare(m, [key])
        m.update(key, pack_class(e))
        self._mirror6(m, [key], pack_class(e))

    def add_new(self, m: PinnedMap, key: bytes, e: Entry) -> bool:
        """Write ``e`` under ``key`` unless the map holds exactly that key (an LPM trie
        too, where a lookup would answer with a shorter prefix); whether it was written."""
        self.check_writer()
        self._unshare(m, [key])
        if m.add_new([key], pack_class(e)):
            return False
        self._mirror6(m, [key], pack_class(e))
        return True

    def delete_if_there(self, m: PinnedMap, key: bytes) -> None:
        """Delete ``key``; a key the map does not hold is no error."""
        self.check_writer()
        if m is self.prefix_map:
            self._unshare(m, [key])
        m.discard([key])
        self._mirror6(m, [key], None)

    def count_dir_write(self) -> None:
        self.check_writer()
        n = (self.dir_writes() + 1) & 0xFFFF_FFFF
        self.contract_map.update(ZERO_KEY, pack_class(Entry(n, 0)))

    # ---- subscriber maps: one entry at a time -------------------------------------------
    def host_items(self) -> Iterator[tuple[bytes, Entry]]:
        return self.read(self.host_map).items()

    def prefix_items(self) -> Iterator[tuple[tuple[int, bytes], Entry]]:
        for k, e in self.read(self.prefix_map).items():
            yield LPM_KEY.unpack(k), e

    def get_host(self, addr: bytes) -> Entry | None:
        raw = self.host_map.lookup(addr)
        return _entry(CLASS.unpack(raw)) if raw is not None else None

    def set_host(self, addr: bytes, e: Entry) -> None:
        self.check_writer()
        self._adding([addr], [])
        self._unshare(self.host_map, [addr])
        self.host_map.update(addr, pack_class(e))

    def del_host(self, addr: bytes) -> None:
        self.check_writer()
        self.host_map.delete_many([addr])

    def set_prefix(self, key: tuple[int, bytes], e: Entry) -> None:
        self.check_writer()
        self._adding([], [key])
        self.put_class(self.prefix_map, LPM_KEY.pack(*key), e)

    def del_prefix(self, key: tuple[int, bytes]) -> None:
        self.delete(self.prefix_map, [LPM_KEY.pack(*key)])

    def match_prefix(self, addr: bytes, longest: int = 128
                     ) -> tuple[tuple[int, bytes], Entry] | None:
        """Longest-prefix match of ``addr`` (among prefixes of ``longest`` bits or fewer)
        with the trie's own lookup, as the data plane does; the matched length is found by
        shortening the key until the answer changes."""
        best = self.prefix_map.lookup(LPM_KEY.pack(longest, masked(addr, longest)))
        if best is None:
            return None
        plen = longest
        while plen > 0 and self.prefix_map.lookup(LPM_KEY.pack(plen - 1, addr)) == best:
            plen -= 1
        return (plen, masked(addr, plen)), _entry(CLASS.unpack(best))

    # ---- allow-list: struct xz_lpm_key -> XZ_ALLOW_* bits -------------------------------
    def allow_items(self) -> dict[tuple[int, bytes], int]:
        keys, values = self.allow.items()
        return {LPM_KEY.unpack(k): v for k, (v,) in zip(keys, U32.iter_unpack(values),
                                                         strict=True)}

    def set_allow(self, key: tuple[int, bytes], bits: int) -> None:
        self.check_writer()
        self.allow.update(LPM_KEY.pack(*key), U32.pack(bits))

    def del_allow(self, key: tuple[int, bytes]) -> None:
        self.check_writer()
        self.allow.delete_many([LPM_KEY.pack(*key)])

    def allow_bits(self, addr: bytes) -> int:
        raw = self.allow.lookup(LPM_KEY.pack(128, addr))
        return U32.unpack(raw)[0] if raw is not None else 0

    # ---- control: struct xz_control, one entry ------------------------------------------
    def control_value(self) -> Control:
        return Control.unpack(self.control.lookup(CONTROL_KEY) or bytes(CONTROL.size))

    def write_control(self, c: Control) -> None:
        """The whole control value, in one write (the data plane sees the old value or
        this one). Every change of it is a read, a change and this write: only under the
        instance's lock."""
        self.check_writer()
        self.control.update(CONTROL_KEY, c.pack())

    def control_flags(self) -> int:
        return self.control_value().flags

    def control_params(self) -> dict[str, int]:
        return self.control_value()._asdict()

    def set_control_params(self, **params: int) -> None:
        """Set fields of the control value (burst_us, bulk_kbps, ...); the others kept."""
        self.write_control(self.control_value()._replace(**params))

    def set_control_flags(self, flags: int) -> None:
        """Set the switches; the CSAM word and the parameters are kept."""
        self.set_control_params(flags=flags)

    def set_switch(self, bit: int, on: bool) -> None:
        """One switch (or several, ``bit`` a mask) on or off; the others kept."""
        flags = self.control_flags()
        want = flags | bit if on else flags & ~bit
        if want != flags:
            self.set_control_flags(want)

    def word(self) -> tuple[int, int]:
        """(flags, csam) of the control value."""
        c = self.control_value()
        return c.flags, c.csam

    def set_word(self, csam: int) -> None:
        """Switch CSAM lists: one write of the control value (every other field kept)."""
        self.set_control_params(csam=csam)

    # ---- throttles ----------------------------------------------------------------------
    def set_throttle(self, slot: int, up_kbps: int, down_kbps: int) -> None:
        """A slot's throttle (0: none). The data plane looks throttles up only while the
        switch XZ_C_THROTTLES is on: it is switched on first (the daemon switches it off
        when none is in force)."""
        self.check_writer()
        if up_kbps or down_kbps:
            self.set_throttles_switch(True)
        self.throttle_map.update(U32.pack(slot), THROTTLE.pack(up_kbps, down_kbps))

    def get_throttle(self, slot: int) -> tuple[int, int]:
        raw = self.throttle_map.lookup(U32.pack(slot))
        return THROTTLE.unpack(raw) if raw is not None else (0, 0)

    def throttle_rates(self) -> np.ndarray:
        """Every slot's throttle (kbps up, down), the array read whole."""
        import numpy as np

        return np.frombuffer(self.throttle_map.values(), dtype=np.uint32).reshape(-1, 2)

    def set_throttles_switch(self, on: bool) -> None:
        self.set_switch(schema.C["XZ_C_THROTTLES"], on)

    def manual_throttles(self) -> dict[int, tuple[int, int]]:
        """Slot -> (kbps, until) of throttles set by hand."""
        keys, values = self.manual.items()
        return {U32.unpack(k)[0]: (kbps, until) for k, (kbps, _, until)
                in zip(keys, MANUAL.iter_unpack(values), strict=True)}

    def set_manual(self, slot: int, kbps: int, until: int) -> None:
        self.check_writer()
        self.manual.update(U32.pack(slot), MANUAL.pack(kbps, 0, until))

    def del_manual(self, slot: int) -> None:
        self.check_writer()
        _libbpf.bpf_map_delete_elem(self.manual.fd, U32.pack(slot))   # ENOENT: not there

    # ---- what the data plane counts -----------------------------------------------------
    def pool_volumes(self) -> dict[bytes, Volume]:
        """Pool address -> volume, for addresses of pools without an owner."""
        keys, values = self.pool_state.items()
        epoch = self.control_value().scan_epoch
        return {k: volume(v, epoch) for k, v in zip(keys, STATE.iter_unpack(values),
                                                    strict=True)} | self.indexed_pool_volumes()

    def _per_cpu_sums(self, m: PinnedMap) -> list[tuple[int, int]]:
        """(packets, bytes) of every index of a per-CPU array of struct xz_counter, the
        array read in one batch (one system call, not one per index: a metrics scrape
        reads it while the daemon's tick runs, and each call gives the other thread the
        interpreter lock)."""
        cpus = possible_cpus()
        per_cpu = list(COUNTER.iter_unpack(m.values()))
        return [(sum(p for p, _ in per_cpu[i:i + cpus]), sum(b for _, b in per_cpu[i:i + cpus]))
                for i in range(0, len(per_cpu), cpus)]

    def _zero_per_cpu(self, m: PinnedMap) -> None:
        zero = bytes((m.value_size + 7) // 8 * 8 * possible_cpus())
        for i in range(m.max_entries):
            m.update(U32.pack(i), zero)

    def counter_slots(self) -> list[tuple[int, int]]:
        """(packets, bytes) of every counter slot (XZ_COUNTER order), summed over CPUs."""
        return self._per_cpu_sums(self.counters)

    def counters_sum(self) -> dict[int, tuple[int, int]]:
        """Counter slot -> (packets, bytes) summed over CPUs, non-zero slots only."""
        return {i: c for i, c in enumerate(self.counter_slots()) if c[0]}

    def clear_counters(self) -> None:
        self._zero_per_cpu(self.counters)

    def clear_noted_op25b(self) -> None:
        """Forget the SMTP attempts noted in the CPUs' batches and not added yet (for tests:
        one test's batch must not end in the next one's counters)."""
        self._zero_per_cpu(self.op25b_noted)

    def fast_counters(self) -> dict[str, tuple[int, int]]:
        """Fast path reason -> (packets, bytes) summed over CPUs, every reason."""
        return dict(zip(schema.FAST_REASONS, self._per_cpu_sums(self.fast), strict=False))

    def clear_fast_counters(self) -> None:
        self._zero_per_cpu(self.fast)

    # ---- fast path egress: the devmap, ifindex -> ifindex -------------------------------
    def fast_macs(self) -> dict[int, list[tuple[bytes, int, int]]]:
        """Ifindex -> its MAC addresses in xz_fast_macs, its own first, each with the
        ifindex its frames are routed from (0: this one's) and that interface's reverse
        path filter (XZ_RPF_*), for every ifindex with one (the table read whole, in
        batches): every interface of the devmap has one (set_fast_ifs)."""
        raw, n = self.fast_macs_map.values(), FAST_MAC.size
        words = memoryview(raw).cast("Q")
        out = {}
        for i in range(len(raw) // n):
            if words[i * n // 8]:
                *e, rpf = FAST_MAC.unpack_from(raw, i * n)
                out[i] = [(m, v, rpf >> 2 * k & 3)
                          for k, (m, v) in enumerate(zip(e[::2], e[1::2], strict=True))
                          if m.strip(b"\0")]
        return out

    def fast_ifs(self) -> list[int]:
        """The ifindexes in the fast path's devmap (egress interfaces): each asked for
        (the kernel takes an interface that goes out itself) among those with an address,
        not every index of the devmap (limits.ifindexes of them)."""
        m = self.devmap
        return [i for i in self.fast_macs() if m.lookup(U32.pack(i)) is not None]

    def set_fast_ifs(self, macs: dict[int, list[tuple[bytes, int, int]]]) -> list[int]:
        """Make the devmap hold exactly the interfaces of ``macs`` (ifindex -> its Ethernet
        address, then its VRRP virtual MACs, XZ_FAST_MACS in all at most, each with the
        ifindex its frames are routed from, 0 for its own, the macvlan's for a virtual
        one, below 2^16, and that interface's reverse path filter, XZ_RPF_*; new ones
        first, then the others go) and xz_fast_macs their
        addresses (a frame the fast path forwards is addressed to one of its ingress
        interface's: written before the interface joins, zeroed after it left); returns
        the ifindexes left out, neither fast-path egress nor ingress: beyond the devmap
        (>= limits.ifindexes), or without an Ethernet address (a tunnel, WireGuard: XDP
        would redirect an Ethernet frame into it, which such a device drops)."""
        self.check_writer()
        m, mac = self.devmap, self.fast_macs_map
        n = schema.C["XZ_FAST_MACS"]
        left = sorted(i for i, a in macs.items()
                      if i >= m.max_entries or not a or not a[0][0].strip(b"\0"))
        keep = set(macs) - set(left)
        for i in sorted(keep):
            entries = (macs[i] + [(b"", 0, 0)] * n)[:n]
            mac.update(U32.pack(i), FAST_MAC.pack(
                *(x for m, v, _ in entries for x in (m, v)),
                sum(r << 2 * k for k, (_, _, r) in enumerate(entries))))
            m.update(U32.pack(i), U32.pack(i))
        # What leaves: every other address written, and its interface in the devmap (the
        # kernel takes an interface that goes out of the devmap itself, not out of
        # xz_fast_macs).
        gone = [U32.pack(i) for i in sorted(set(self.fast_macs()) - keep)]
        m.discard(gone)
        for k in gone:
            mac.update(k, bytes(FAST_MAC.size))
        return left

    # ---- CSAM list: two generations, meta, hits -----------------------------------------
    def _csam_bits4(self, gen: int) -> memoryview:
        """Generation ``gen``'s IPv4 filter bits (its half of xz_csam_b4), mapped, as bytes."""
        n = dirs.FILTER4_BYTES - dirs.FILTER_HEAD.size
        return self.map("xz_csam_b4").view("B")[gen * n:(gen + 1) * n]

    def read_csam_v4(self, gen: int) -> bytearray:
        """Generation ``gen``'s IPv4 /24 filter (dirs.csam, dirs.csam_v4_add): its header
        (struct xz_filter4), then its bits."""
        return bytearray(self.csam_filters4.lookup(U32.pack(gen))) + self._csam_bits4(gen)

    def write_csam_v4(self, gen: int, f: bytes | bytearray) -> None:
        """Its bits first, then the header that turns them on."""
        self._csam_bits4(gen)[:] = memoryview(f)[dirs.FILTER_HEAD.size:]
        self.csam_filters4.update(U32.pack(gen), bytes(f[:dirs.FILTER_HEAD.size]))

    def read_csam_v6(self, gen: int) -> bytearray:
        """Generation ``gen``'s IPv6 filter (dirs.csam, dirs.csam_v6_add)."""
        return self.csam_filters.lookup_into(U32.pack(gen))

    def write_csam_v6(self, gen: int, f: bytes | bytearray) -> None:
        self.csam_filters.update(U32.pack(gen), f)

    def csam_lines(self, gen: int, kind: str = "l") -> np.ndarray:
        """Generation ``gen``'s lines (its half of xz_csam_l, dirs.lines_*; ``kind`` "n":
        its net lines, of xz_csam_n), mapped: row i is line i, read and written in place."""
        import numpy as np

        m = self.map(f"xz_csam_{kind}")
        n = self.csam_line_count(kind) * dirs.LINE_WORDS
        return np.frombuffer(m.view("I"), dtype=np.uint32)[gen * n:(gen + 1) * n
                                                            ].reshape(-1, dirs.LINE_WORDS)

    def csam_line_count(self, kind: str = "l") -> int:
        """How many lines (``kind`` "n": net lines) each generation has."""
        return self.map(f"xz_csam_{kind}").max_entries // 2

    def text_path(self, gen: int) -> str:
        """Where the text of generation ``gen``'s list is pinned."""
        return os.path.join(self.pin_dir, f"xz_csam_t{gen}")

    def read_meta(self, gen: int) -> dict:
        sha, loaded, h4, h6, p4, p6, nets4, _ = META.unpack(self.meta.lookup(U32.pack(gen)))
        return {"sha256": sha.hex() if loaded else None, "loaded": loaded or None,
                "hosts4": h4, "hosts6": h6, "prefixes4": p4, "prefixes6": p6, "nets4": nets4}

    def clear_hits(self) -> None:
        self._zero_per_cpu(self.hits)

    def hit_counts(self) -> dict[str, int]:
        """Hits per generation and family, summed over CPUs (the array read in one
        batch)."""
        raw = self.hits.values()
        cpus = possible_cpus()
        hits = struct.unpack(f"={len(raw) // 8}Q", raw)
        return {f"gen{gen}_{name}": sum(hits[(gen * 2 + fam) * cpus:(gen * 2 + fam + 1) * cpus])
                for gen in (0, 1) for fam, name in ((0, "ipv4"), (1, "ipv6"))}


    # ---- drop events: the ring buffer's state ----------------------------------------------
    def trace_lost(self) -> int:
        """Drop events the ring buffer had no room for, since the maps were made."""
        raw = self.trace_state.lookup(ZERO_KEY)
        return TRACE_STATE.unpack(raw)[1] if raw is not None else 0

