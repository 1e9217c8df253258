"""Shared fixtures: a BPF filesystem of the test session's own, the data plane compiled
once per session, and BPF_PROG_TEST_RUN as a verdict."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from xdpzoot.dataplane import kernel, layout, schema

# Return codes: XDP_DROP 1, XDP_PASS 2, XDP_TX 3; TC_ACT_OK 0, TC_ACT_SHOT 2, REDIRECT 7.
XDP_VERDICT = {1: "drop", 2: "pass", 3: "reject"}
TC_VERDICT = {0: "pass", 2: "drop", 7: "reject"}


@pytest.fixture(scope="session")
def bpffs():
    """A bpffs mounted in the host mount namespace (outside /sys, so that
    `ip netns exec` sees it too), unmounted at the end."""
    root = tempfile.mkdtemp(prefix="xdpzoot-test-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "bpf", root], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", root], check=False)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Dataplane:
    """One compiled instance: its maps and the four entry points, loaded."""

    pin_dir: str
    maps: kernel.Maps
    fds: dict[tuple[str, str], int]
    bpf: object = None   # bcc's object: keeps the programs loaded

    def run(self, hook: str, role: str, data: bytes, repeat: int = 1) -> kernel.TestRun:
        return kernel.test_run(self.fds[(hook, role)], data, repeat)

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
        for t in (m.host_map, m.prefix_map, m.allow, m.pool_state, m.manual, *m.csam_hosts,
                  *m.csam_prefixes):
            t.delete_many(t.keys())
        for t in (m.dir_map, *m.csam_dirs):   # zeros: look all up
            t.update(layout.ZERO_KEY, bytes(t.value_size))
        m.control.update(layout.ZERO_KEY, layout.Control().pack())   # every switch off
        m.clear_counters()


def make_dataplane(pin_dir: str, defines: list[str] | None = None) -> Dataplane:
    bpf = kernel.compile_bpf(pin_dir, defines or [])
    fds = {(h, r): kernel.load_program(bpf, h, r) for h in kernel.HOOKS
           for r in ("access", "core")}
    return Dataplane(pin_dir, kernel.Maps(pin_dir), fds, bpf)


class LabRouter:
    """The xdpzoot CLI, run inside a lab's router namespace as an operator would.
    Each lab test module says how it writes its config (``write_config``)."""

    def __init__(self, lab, workdir, pin_dir: str):
        self.lab, self.workdir, self.pin_dir = lab, workdir, pin_dir
        self.config = workdir / "xdpzoot.toml"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        from xdpzoot.lab import netns_run

        xdpzoot = os.path.join(os.path.dirname(sys.executable), "xdpzoot")
        return netns_run(self.lab.router, xdpzoot, "--config", str(self.config), "--pin-dir",
                         self.pin_dir, *args, timeout=60, check=check)

    def json(self, *args: str) -> dict:
        return json.loads(self.cli(*args, "--json").stdout)


@pytest.fixture(scope="module", params=["xdp", "tc"])
def hook(request, router) -> str:
    """Attach the lab module's router (its own ``router`` fixture) with this hook, replacing
    the other one in place, for the tests below."""
    router.write_config()
    out = router.json("attach", "--hook", request.param)
    assert {a["hook"] for a in out["attached"]} == {request.param}
    assert len(out["attached"]) == 3
    return request.param


@contextlib.contextmanager
def xdp_pass_on_peers(lab, bpffs: str):
    """Native XDP_TX on a veth reaches the peer only if the peer runs XDP too: give the
    lab hosts' ends an XDP_PASS program (a real NIC would not need it)."""
    from bcc import BPF

    from xdpzoot.lab import netns_run

    prog = BPF(text=b"int pass(struct xdp_md *c) { return XDP_PASS; }")
    pin = os.path.join(bpffs, "pass-" + lab.prefix)
    kernel.pin(prog.load_func(b"pass", BPF.XDP).fd, pin)
    try:
        for ns in (lab.dyn, lab.static, lab.inet):
            netns_run(ns, "ip", "link", "set", "dev", "eth0", "xdpdrv", "pinned", pin)
        yield
    finally:
        os.unlink(pin)


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
