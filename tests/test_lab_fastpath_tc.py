"""The fast path at TC under real traffic: test_lab_fastpath.py's tests again, with the
router attached at TC (clsact ingress), where a passed packet leaves by bpf_redirect_neigh.
The hosts' ends of the links need no XDP program here (TC redirects an skb)."""

from __future__ import annotations

import pytest
from test_lab_fastpath import (  # noqa: F401 (the tests, collected here again)
    Router,
    prepare_lab,
    test_csam_still_applies,
    test_for_the_router_itself_goes_to_the_kernel,
    test_op25b_still_applies,
    test_over_the_egress_mtu_is_answered,
    test_status_shows_the_fast_path,
    test_switched_off_the_kernel_forwards,
    test_tcp_transfer_is_forwarded_by_the_fast_path,
    test_ttl_1_is_answered_by_the_router,
    test_unresolved_neighbour_first_packet_delivered,
)

pytestmark = pytest.mark.lab

LAB_TAG = "xzg"
ROUTER = {"hook": "tc", "mode": "auto"}


def test_attached_at_tc_with_the_fast_path(router):
    """The module's router: TC on every interface, the fast path on."""
    out = router.attached
    assert {a["hook"] for a in out["attached"]} == {"tc"}
    assert out["fast_path"] == {"enabled": True,
                                "egress": sorted(["acc-dyn", "acc-sta", "core0"])}
