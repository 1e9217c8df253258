"""bench/bench_cold.py at a tiny scale: the generated state and packets, and every packet
taking its class's path through the data plane loaded by the CLI (counters and return
codes), as the benchmark checks before it times anything."""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_cold as bc  # noqa: E402

TINY = 0.001   # 1 pool /22, 100 static hosts, 1 v6 pool, 10 v6 statics, 1,000-entry list
N_PACKETS = 600


def _dst4(frame: bytes) -> int:
    return int.from_bytes(frame[30:34], "big")


def _src4(frame: bytes) -> int:
    return int.from_bytes(frame[26:30], "big")


def test_generated_state_and_packets():
    rng = random.Random(7)
    st = bc.gen_state("tiny", TINY, rng)
    assert st.counts["pools4 /22"] == 1 and st.counts["static v4 hosts"] == 100
    assert len(st.hosts4) + len(st.prefixes4) + len(st.entries6) == 1_000
    cgn = ipaddress.ip_network("100.64.0.0/10")
    assert all(ipaddress.IPv4Address(n) in cgn and n % 1024 == 0 for n in st.pools4)
    pkts = bc.gen_packets(st, N_PACKETS, rng)
    assert len({p.frame for p in pkts}) == len(pkts)   # distinct packets
    by = {c: [p for p in pkts if p.cls == c] for c in bc.CLASSES}
    for c, (_, role, *_rest, share) in bc.CLASSES.items():
        assert len(by[c]) == round(N_PACKETS * share) and all(p.role == role for p in by[c])
    pools = {n >> 10 for n in st.pools4}
    assert all(st.listed4(_dst4(p.frame)) for p in by["csam"])
    assert not any(st.listed4(_dst4(p.frame)) for p in by["up_pass"] + by["op25b"])
    assert all(_src4(p.frame) >> 10 in pools for p in by["op25b"])
    assert all(_dst4(p.frame) >> 10 in pools for p in by["ip53b"])
    # an upstream pass says who sent it (the report splits its median so), no other packet
    statics = set(st.statics4)
    assert all(p.src == ("static" if _src4(p.frame) in statics else "pool") for p in by["up_pass"])
    assert {p.src for p in by["up_pass"]} == {"pool", "static"}
    assert not any(p.src for p in pkts if p.cls != "up_pass")


def test_breakdown_adds_one_feature_a_row():
    """Each row of the breakdown switches on what the row above had plus its own feature
    (the scan sketch once stayed on from the first row: every step priced it again)."""
    C = bc.C
    feats = {"bd_rules": C["XZ_C_OP25B"] | C["XZ_C_IP53B"], "bd_rates": C["XZ_C_RATES"],
             "full_big": C["XZ_C_SCANS"]}
    flags = C["XZ_C_LOADED"] | C["XZ_C_RATES"] | C["XZ_C_SCANS"] | feats["bd_rules"]
    inst = type("Inst", (), {"control": {"flags": flags, "csam": C["XZ_CSAM_HOSTS"]}})()
    rows = bc.breakdown_controls(inst) | {"full_big": (flags, C["XZ_CSAM_HOSTS"])}
    keys = [k for k, *_ in bc.BREAKDOWN if k in rows]
    assert keys == ["bd_class", "bd_rules", "bd_csam", "bd_rates", "full_big"]
    assert rows["bd_class"] == (C["XZ_C_LOADED"], 0)
    for above, row in itertools.pairwise(keys):
        (f0, w0), (f1, w1) = rows[above], rows[row]
        assert f0 & ~f1 == 0 and w0 & ~w1 == 0, (above, row)   # nothing switched off
        assert f1 & ~f0 == feats.get(row, 0), row                # only the row's feature on
    assert rows["bd_csam"][1] != rows["bd_rules"][1]             # ... or the list


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF)")
def test_every_packet_takes_its_path(bpffs, tmp_path):
    rng = random.Random(8)
    st = bc.gen_state("cold-tiny", TINY, rng)
    pkts = bc.gen_packets(st, N_PACKETS, rng)
    inst = bc.build(bpffs, tmp_path, st, bc.CONFIG, with_probes=False)
    bc.check_instance(inst, pkts)   # raises unless each class moved its own counter only
    bc.check_ref(inst, [p for p in pkts if p.cls in bc.REF_CLASSES])
    op25b = [p for p in pkts if p.cls == "op25b"]
    passing = lambda c: ("access", "pass", "ok")  # noqa: E731
    with pytest.raises(RuntimeError, match="op25b"):   # the check does catch a wrong path
        bc.check_instance(inst, op25b, expect=passing)
    # the breakdown's control words do what they say: without the switches TCP :25 passes
    flags, csam_word = bc.breakdown_controls(inst)["bd_class"]
    bc.check_instance(inst, op25b, flags, csam_word, expect=passing)
    # ... and the configured word is back afterwards
    assert inst.maps.control_flags() == inst.control["flags"]
    # one cold round: each packet once, a time for each
    prog = bc.Prog("full", inst, lambda p: inst.fds[p.role], pkts)
    bc.run_cold([prog], 1)
    assert len(prog.times) == len(pkts) and all(t > 0 for t in prog.times)
    sm = bc.summarise(prog)   # an upstream pass's figures by source too, the same packets
    assert sm["up_pass:pool"]["cold"]["n"] + sm["up_pass:static"]["cold"]["n"] == \
        sm["up_pass"]["cold"]["n"]
