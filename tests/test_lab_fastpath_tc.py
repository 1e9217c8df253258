"""The fast path at TC under real traffic: test_lab_fastpath.py's tests again, with the
router attached at TC (clsact ingress), where a passed packet leaves by bpf_redirect_neigh.
The hosts' ends of the links need no XDP program here (TC redirects an skb)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from test_lab_fastpath import (  # noqa: F401 (the tests, collected here again)
    CORE_MTU,
    Router,
    delta,
    iperf_up,
    prepare_lab,
    test_csam_still_applies,
    test_for_the_router_itself_goes_to_the_kernel,
    test_frame_for_another_host_is_not_forwarded,
    test_op25b_still_applies,
    test_over_the_egress_mtu_is_answered,
    test_rates_still_apply,
    test_reverse_path_filter_as_the_kernels,
    test_status_shows_the_fast_path,
    test_switched_off_the_kernel_forwards,
    test_tcp_transfer_is_forwarded_by_the_fast_path,
    test_ttl_1_is_answered_by_the_router,
    test_unresolved_neighbour_first_packet_delivered,
)

from xdpzoot.lab import Lab, netns_run

pytestmark = pytest.mark.lab

LAB_TAG = "xzg"
ROUTER = {"hook": "tc", "mode": "auto"}


def test_attached_at_tc_with_the_fast_path(router):
    """The module's router: TC on every interface, the fast path on."""
    out = router.attached
    assert {a["hook"] for a in out["attached"]} == {"tc"}
    assert out["fast_path"] == {"enabled": True,
                                "egress": sorted(["acc-dyn", "acc-sta", "core0"]),
                                "virtual_macs": {}, "rp_filter": {}}


@contextlib.contextmanager
def gro_on_router(lab: Lab) -> Iterator[None]:
    """GRO on the router's links for a block, as on a NIC: the program at TC then sees
    aggregates of the transfer's segments (off again afterwards, the other tests' setting)."""
    devs = ("acc-dyn", "core0")
    try:
        for dev in devs:
            netns_run(lab.router, "ethtool", "-K", dev, "gro", "on", timeout=10)
        yield
    finally:
        for dev in devs:
            netns_run(lab.router, "ethtool", "-K", dev, "gro", "off", timeout=10, check=False)


def test_gro_aggregates_are_forwarded(lab, router):
    """A TCP transfer in GRO aggregates: forwarded whole by the fast path (its segments fit
    the egress MTU), the kernel forwarding next to nothing."""
    def forwarded_bytes() -> int:
        return router.json("stats")["fast_path"]["forwarded"]["bytes"]

    with gro_on_router(lab):
        fast0, kernel0, bytes0 = router.fast(), router.kernel_forwarded(), forwarded_bytes()
        doc = iperf_up(lab, lab.addr["inet4"])
        fast = delta(fast0, router.fast())
        kernel = router.kernel_forwarded() - kernel0
        size = (forwarded_bytes() - bytes0) / max(1, fast.get("forwarded", 0))
    assert doc["end"]["sum_received"]["bytes"] > 0
    assert fast.get("forwarded", 0) > 1000 and kernel <= 0.02 * fast["forwarded"], (fast, kernel)
    assert "frame" not in fast
    assert size > 1500, "no aggregates: the forwarded packets are no larger than the MTU"


def test_gro_aggregates_over_the_egress_mtu_go_to_the_kernel(lab, router):
    """The same over a smaller egress MTU: the first aggregates' segments do not fit, the
    kernel gets them and answers (fragmentation needed), the sender's segments shrink, and
    the fast path forwards the rest."""
    with gro_on_router(lab):
        netns_run(lab.router, "ip", "link", "set", "dev", "core0", "mtu", str(CORE_MTU))
        try:
            fast0 = router.fast()
            doc = iperf_up(lab, lab.addr["inet4"])
            fast = delta(fast0, router.fast())
        finally:
            netns_run(lab.router, "ip", "link", "set", "dev", "core0", "mtu", "1500")
            netns_run(lab.dyn, "ip", "-4", "route", "flush", "cache", check=False)
    assert doc["end"]["sum_received"]["bytes"] > 0
    assert fast.get("mtu", 0) >= 1 and fast.get("forwarded", 0) > 1000, fast
