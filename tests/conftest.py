"""Shared fixtures: a BPF filesystem of the test session's own, the data plane compiled
once per session, and BPF_PROG_TEST_RUN as a verdict."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from bpfcases import TC_VERDICT, XDP_VERDICT  # noqa: E402
from termination import pytest_configure  # noqa: E402, F401  (SIGTERM tears down)

from xdpzoot.dataplane import dirs, kernel, layout, schema
from xdpzoot.lab import Lab, LabRouter, lab_running, router_running


def pytest_collection_modifyitems(config, items):
    """The lab tests in one xdist group (`make test` runs two workers, --dist loadgroup):
    one worker takes them in turn, module by module, while the other runs the rest; no two
    labs share the machine's second core.

    Under `make vmtest` with XZ_VMTEST_SAMPLE=N (an emulated kernel, where each table row
    costs seconds): of a test function with more than N rows, a deterministic sample of
    about N, taken in adjacent pairs so that a row kept at XDP is kept at TC too (the hook is
    the innermost parameter of the tables). The rest is deselected, and pytest says how
    many; never set outside the VM, so `make test` runs every row."""
    for item in items:
        if item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.xdist_group("lab"))
    n = int(os.environ.get("XZ_VMTEST_SAMPLE") or 0)
    if n <= 0:
        return
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    drop = set()
    for group in groups.values():
        if len(group) > n:
            stride = -(-len(group) // n)   # ceil
            drop.update(id(it) for i, it in enumerate(group) if (i // 2) % stride)
    if drop:
        config.hook.pytest_deselected(items=[it for it in items if id(it) in drop])
        items[:] = [it for it in items if id(it) not in drop]


@pytest.fixture(scope="session")
def bpffs():
    """A bpffs mounted in the host mount namespace (outside /sys, so that
    `ip netns exec` sees it too), unmounted at the end."""
    with kernel.scratch_bpffs("xdpzoot-test-") as root:
        yield root


@dataclass
class Dataplane:
    """One compiled instance: its maps and the four entry points, loaded."""

    pin_dir: str
    maps: kernel.Maps
    fds: dict[tuple[str, str], int]
    bpf: object = None   # bcc's object: keeps the programs loaded

    def run(self, hook: str, role: str, data: bytes, repeat: int = 1, ctx: bytes = b""
            ) -> kernel.TestRun:
        return kernel.test_run(self.fds[(hook, role)], data, repeat, ctx)

    def verdict(self, hook: str, role: str, data: bytes) -> tuple[str, bytes]:
        r = self.run(hook, role, data)
        table = XDP_VERDICT if hook == "xdp" else TC_VERDICT
        return table.get(r.retval, f"retval {r.retval}"), r.data

    def counters(self) -> dict[tuple[str, str, str], int]:
        out = {}
        per_role = len(schema.VERDICTS) * schema.REASON_SLOTS
        for slot, (pk, _) in self.maps.counters_sum().items():
            role, rest = divmod(slot, per_role)
            v, r = divmod(rest, schema.REASON_SLOTS)
            out[(schema.ROLES[role], schema.VERDICTS[v], schema.REASONS[r])] = pk
        return out

    def reset(self) -> None:
        """Empty every map (counters included) and switch everything off."""
        m = self.maps
        m.delete(m.prefix_map, m.prefix_map.keys())   # and the class index's lanes
        for t in (m.host_map, m.prefix6_map, m.allow, m.pool_state, m.manual, *m.csam_hosts,
                  *m.csam_prefixes):
            t.delete_many(t.keys())
        for t in (m.dir_map, m.sub_v6_map, m.v6_lens_map):   # zeros: look all up
            t.update(layout.ZERO_KEY, bytes(t.value_size))
        for g in (0, 1):   # both generations never loaded: the next load is a whole one
            m.meta.update(g.to_bytes(4, sys.byteorder), bytes(layout.META.size))
            m.write_csam_v4(g, bytes(dirs.FILTER4_BYTES))
            m.write_csam_v6(g, bytes(m.csam_filters.value_size))
        m.control.update(layout.ZERO_KEY, layout.Control().pack())   # every switch off
        m.clear_counters()
        m.clear_noted_op25b()


def make_dataplane(pin_dir: str, defines: list[str] | None = None) -> Dataplane:
    bpf = kernel.compile_bpf(pin_dir, defines or [])
    fds = {(h, r): kernel.load_program(bpf, h, r) for h in kernel.HOOKS
           for r in ("access", "core")}
    return Dataplane(pin_dir, kernel.Maps(pin_dir), fds, bpf)


@pytest.fixture(scope="module")
def lab(request) -> Iterator[Lab]:
    """The lab of a lab test module, named after its ``LAB_TAG``; the module's
    ``prepare_lab(lab)``, if it has one, adds what its tests need; ``LAB_SERVERS = False``
    starts none of the lab's servers."""
    with lab_running(getattr(request.module, "LAB_TAG", "xz"),
                     servers=getattr(request.module, "LAB_SERVERS", True)) as lb:
        prepare = getattr(request.module, "prepare_lab", None)
        if prepare:
            prepare(lb)
        yield lb


@pytest.fixture(scope="module")
def router(request, lab, tmp_path_factory) -> Iterator[LabRouter]:
    """The xdpzoot CLI in the module's lab (lab.router_running): the module's ``Router``
    class (LabRouter if it has none), set up as its ``ROUTER`` says (hook, mode,
    xdp_peers), detached at the end of the module."""
    cls = getattr(request.module, "Router", LabRouter)
    opts = getattr(request.module, "ROUTER", {})
    with router_running(cls(lab, tmp_path_factory.mktemp("router")), **opts) as r:
        yield r


@pytest.fixture(scope="module", params=["xdp", "tc"])
def hook(request, router) -> str:
    """Attach the module's router with this hook, replacing the other one in place, for the
    tests below."""
    router.write_config()
    out = router.attach(request.param)
    assert {a["hook"] for a in out["attached"]} == {request.param}
    assert len(out["attached"]) == 3
    return request.param


@pytest.fixture(scope="session")
def dataplane(bpffs) -> Dataplane:
    """The data plane, compiled once per test session with small tables."""
    dp = make_dataplane(os.path.join(bpffs, "unit"),
                        ["-DXZ_MAX_HOSTS=4096", "-DXZ_MAX_PREFIXES=1024",
                         "-DXZ_MAX_SUBSCRIBERS=4096", "-DXZ_MAX_CSAM_HOSTS=4096",
                         "-DXZ_MAX_CSAM_PREFIXES=1024", "-DXZ_MAX_FLOWS=1024"])
    return dp


@pytest.fixture
def dp(dataplane) -> Dataplane:
    """The shared data plane, emptied before each test."""
    dataplane.reset()
    return dataplane
