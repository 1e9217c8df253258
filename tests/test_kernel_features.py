"""What the kernel can do: the feature probes against the running kernel, the one-line
refusal on a kernel without something required, and the degraded path of an optional
feature (LPM trie batch operations), made missing through the probe's test hook."""

from __future__ import annotations

import ipaddress
import os

import pytest

from xdpzoot import tables
from xdpzoot.dataplane import kernel, layout
from xdpzoot.dataplane.layout import Entry


def test_this_kernel_has_every_feature():
    """The probes asked of the real kernel (this one is >= the declared minimum)."""
    have = kernel.probe_features()
    assert {f.key for f in kernel.FEATURES} <= set(have)
    assert [k for k, ok in have.items() if not ok] == []
    kernel.require_kernel()   # does not raise
    assert kernel.kernel_report() == {"release": os.uname().release, "minimum": "6.1",
                                      "missing": [], "notes": []}


def test_probes_tell_a_missing_thing_from_a_present_one():
    """The probes can say no: an atomic the kernel does not know, a helper id beyond the
    last, batch calls on a map type without them (a devmap)."""
    bad_atomic = kernel._CMPXCHG_PROG.replace(kernel._insn(0xDB, 10, 2, -8, 0xF1),
                                              kernel._insn(0xDB, 10, 2, -8, 0xF3))
    assert kernel._probe_prog(kernel._CMPXCHG_PROG) and not kernel._probe_prog(bad_atomic)
    assert kernel._libbpf.libbpf_probe_bpf_helper(kernel.BPF_PROG_TYPE_XDP, 100000, None) == 0
    assert kernel._probe_batch(kernel._MAP_TYPES["hash"])
    assert not kernel._probe_batch(kernel._MAP_TYPES["devmap"])


@pytest.mark.parametrize("missing, line", [
    ("atomic:cmpxchg", "lacks BPF atomic compare-and-exchange (Linux 5.12); "
                       "xdpzoot needs Linux 6.1 or later"),
    ("map:lpm_trie,batch:hash", "lacks BPF map type lpm_trie (Linux 4.11), batch operations "
                                "on hash maps (Linux 5.6); xdpzoot needs Linux 6.1 or later"),
    ("helper:jiffies64", "lacks BPF helper bpf_jiffies64 (Linux 5.5);"),
])
def test_a_missing_requirement_is_one_line(monkeypatch, missing, line):
    monkeypatch.setenv(kernel.MISSING_ENV, missing)
    with pytest.raises(kernel.KernelError) as e:
        kernel.require_kernel()
    msg = str(e.value)
    assert msg.startswith(f"kernel {os.uname().release} ") and line in msg
    assert "\n" not in msg


def test_without_lpm_batches_prefixes_go_one_by_one(dp, monkeypatch):
    """The optional feature missing: a note for status, and the tries written and read
    entry by entry, with the same result."""
    monkeypatch.setenv(kernel.MISSING_ENV, "batch:lpm_trie")
    rep = kernel.kernel_report()
    assert rep["missing"] == [] and len(rep["notes"]) == 1
    assert "LPM trie batch operations" in rep["notes"][0]
    assert not kernel._batched(kernel.BPF_MAP_TYPE_LPM_TRIE)
    m = dp.maps.prefix_map
    nets = [ipaddress.ip_network(f"100.64.{i}.0/24") for i in range(5)]
    keys = [layout.LPM_KEY.pack(*tables.key_of(n)) for n in nets]
    e = Entry(7, 1, 0, 0, 0)
    m.update_items(keys, layout.pack_class(e) * len(keys))
    got, vals = m.items()
    assert sorted(got) == sorted(keys) and len(vals) == len(keys) * m.value_size
    m.delete_many(keys)
    assert m.keys() == []
