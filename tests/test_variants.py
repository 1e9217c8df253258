"""Every build variant compiles (warnings are errors) and loads through the verifier.

Each variant is a set of -D flags: the parsing depths (XZ_MAX_VLAN, XZ_MAX_EXTHDR) and the
map sizes (XZ_MAX_*; [limits] in the config). The fast path (bpf/forward.h) is in every
build (a control bit switches it), so every variant loads it through the verifier too.
Each is compiled into a pin directory of its own, its four entry points (and the reply
programs they tail-call) are loaded, the map sizes are checked, and a few frames that sit
on the variant's limits are run through both hooks, the fast path on.
Compiling and verifying takes several seconds per variant, so the list is short.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import packets
import pytest
from bpfcases import (
    DYN6,
    DYN_SMTP4,
    DYN_SMTP6,
    RELAY4,
    A,
    exthdr_chain,
    flags_of,
    load,
    run_one,
    tcp,
    three_tags,
)
from conftest import make_dataplane

from xdpzoot import config, tables
from xdpzoot.dataplane import kernel, schema
from xdpzoot.dataplane.layout import Entry


def smtp4(vlans: int = 0, pppoe: bool = False) -> bytes:
    return packets.frame(DYN_SMTP4, vlans=vlans, pppoe=pppoe)


def to_relay() -> bytes:
    return packets.frame(tcp(A, DYN_SMTP4.src, RELAY4, 25))


@dataclass(frozen=True)
class Variant:
    id: str
    defines: tuple[str, ...]
    sizes: dict[str, int]      # map name -> max_entries the variant must give it
    probes: tuple             # (description, frame builder, verdict, reason)


_LIM = config.Limits()
DEFAULT_SIZES = {"xz_hosts": _LIM.hosts, "xz_prefixes": _LIM.prefixes, "xz_allow": _LIM.allow}
SMALL_TEST_SIZES = {"xz_hosts": 262144, "xz_prefixes": 65536, "xz_allow": 4096}

VARIANTS = [
    Variant("config-defaults", tuple(config.Config().defines()), DEFAULT_SIZES, (
        ("QinQ + PPPoE, answered", lambda: smtp4(2, True), "reject", "op25b"),
        ("IPv6 behind XZ_MAX_EXTHDR=6 headers", lambda: exthdr_chain(6), "drop", "op25b"),
        ("IPv6 behind 7 headers", lambda: exthdr_chain(7), "pass", "unparsed"),
        ("three tags", lambda: three_tags(False), "pass", "unparsed"),
    )),
    Variant("vlan0-exthdr1", ("-DXZ_MAX_VLAN=0", "-DXZ_MAX_EXTHDR=1"), SMALL_TEST_SIZES, (
        ("untagged, answered", lambda: smtp4(), "reject", "op25b"),
        ("untagged PPPoE, answered", lambda: smtp4(0, True), "reject", "op25b"),
        ("one tag: not walked", lambda: smtp4(1), "pass", "unparsed"),
        ("IPv6 behind 1 header", lambda: exthdr_chain(1), "drop", "op25b"),
        ("IPv6 behind 2 headers", lambda: exthdr_chain(2), "pass", "unparsed"),
    )),
    Variant("vlan1-exthdr8", ("-DXZ_MAX_VLAN=1", "-DXZ_MAX_EXTHDR=8"), SMALL_TEST_SIZES, (
        ("one tag, answered", lambda: smtp4(1), "reject", "op25b"),
        ("one tag + PPPoE, answered", lambda: smtp4(1, True), "reject", "op25b"),
        ("QinQ: second tag not walked", lambda: smtp4(2), "pass", "unparsed"),
        ("IPv6 behind 8 headers", lambda: exthdr_chain(8), "drop", "op25b"),
        ("IPv6 behind 9 headers", lambda: exthdr_chain(9), "pass", "unparsed"),
    )),
    Variant("tiny-tables",
            ("-DXZ_MAX_HOSTS=1", "-DXZ_MAX_PREFIXES=1", "-DXZ_MAX_ALLOW=1",
             "-DXZ_MAX_CSAM_HOSTS=1", "-DXZ_MAX_CSAM_PREFIXES=1", "-DXZ_MAX_IFINDEX=1"),
            {"xz_hosts": 1, "xz_prefixes": 1, "xz_allow": 1, "xz_fast_ifs": 1}, (
        ("IPv4 pool prefix", lambda: smtp4(2, True), "reject", "op25b"),
        ("IPv6 host entry", lambda: packets.frame(DYN_SMTP6), "reject", "op25b"),
        ("relay", to_relay, "pass", "allowlist"),
    )),
    Variant("large-tables",
            ("-DXZ_MAX_HOSTS=1048576", "-DXZ_MAX_PREFIXES=1048576", "-DXZ_MAX_ALLOW=65536"),
            {"xz_hosts": 1048576, "xz_prefixes": 1048576, "xz_allow": 65536}, (
        ("IPv4 pool prefix", lambda: smtp4(2, True), "reject", "op25b"),
        ("IPv6 host entry", lambda: packets.frame(DYN_SMTP6), "reject", "op25b"),
        ("relay", to_relay, "pass", "allowlist"),
    )),
]


def _world() -> tables.Tables:
    """One prefix, one host, one allow-list entry: fits even the tiny tables."""
    dyn = schema.TYPES["dynamic"]
    return tables.Tables(
        hosts={tables.addr16(DYN6): Entry(1, dyn)},
        prefixes={tables.key_of(ipaddress.ip_network("100.64.0.0/24")): Entry(2, dyn)},
        allow=tables.allow_table([ipaddress.ip_network(RELAY4 + "/32")], []))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_variant_loads(bpffs, variant: Variant):
    pin_dir = os.path.join(bpffs, "variant-" + variant.id)
    try:
        dp = make_dataplane(pin_dir, list(variant.defines))   # raises if the verifier refuses
        try:
            assert kernel.pinned(pin_dir)
            for name, size in variant.sizes.items():
                assert dp.maps.map(name).max_entries == size, name
            for desc, build, verdict, reason in variant.probes:
                frame = build()
                for hook in kernel.HOOKS:
                    dp.reset()
                    # The fast path on, and a passed frame handed to the kernel all the
                    # same, so the verdicts stay the pipeline's: at XDP the devmap is empty
                    # ("egress"), at TC test_run gives the frame no ingress interface.
                    load(dp, _world(), flags_of(("op25b", "op25b_v6", "op25b_reject",
                                                 "fast_path")))
                    try:
                        run_one(dp, hook, A, frame, verdict, reason)
                    except AssertionError as e:
                        raise AssertionError(f"{desc} ({hook}): {e}") from e
        finally:
            dp.maps.close()
            dp.bpf.cleanup()
    finally:
        kernel.unpin_all(pin_dir)
    assert not os.path.exists(pin_dir)
