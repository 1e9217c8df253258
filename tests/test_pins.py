"""Pins from another build: maps pinned with another layout (headers or limits) are never
reused. The layout's digest is pinned beside the maps (xz_layout); attach and every command
that opens the maps compare it and refuse, changing nothing on any interface or in any map.
Real pins, one namespace with a veth pair, the CLI as an operator runs it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from test_cli import run

from xdpzoot.dataplane import kernel

LIMITS = """[limits]
hosts = {hosts}
prefixes = 256
allow = 64
csam_hosts = 1024
csam_prefixes = 256
subscribers = 1024
flows = 1024
pool_addresses = 1024
"""
MAPS = ("xz_hosts", "xz_prefixes", "xz_allow", "xz_control", "xz_csam_h0", "xz_csam_h1",
        "xz_csam_p0", "xz_csam_p1", "xz_csam_meta", "xz_state", "xz_throttle")


@pytest.fixture(scope="module")
def router(bpffs, tmp_path_factory) -> Iterator[dict]:
    """A namespace with a veth pair (access a0, core c0), a config, a list, a pin dir."""
    ns = f"xzp{secrets.token_hex(3)}"
    d = tmp_path_factory.mktemp("pins")
    r = {"ns": ns, "pin": os.path.join(bpffs, ns), "dir": d}
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subs = d / "subscribers.csv"
        subs.write_text("subscriber,address,type\n7,100.64.7.0/24,dynamic\n"
                        "8,198.51.100.8/29,static\n")
        (d / "list.txt").write_text("192.0.2.1\n203.0.113.0/24\n")
        (d / "list.txt").chmod(0o600)
        r["cfg"] = config(d / "xdpzoot.toml", subs, hosts=1024)
        for cmd in (["link", "add", "a0", "type", "veth", "peer", "name", "c0"],
                    ["link", "set", "a0", "up"], ["link", "set", "c0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield r
    finally:
        run("--config", r["cfg"], "--pin-dir", r["pin"], "detach", ns=ns)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def config(path, subs, hosts: int) -> str:
    path.write_text('[interfaces]\naccess = ["a0"]\ncore = ["c0"]\n'
                    f'[sources]\nsubscribers = "{subs}"\n' + LIMITS.format(hosts=hosts))
    return str(path)


def xz(r: dict, *args: str, cfg: str | None = None) -> subprocess.CompletedProcess:
    return run("--config", cfg or r["cfg"], "--pin-dir", r["pin"], *args, ns=r["ns"])


def ok(r: dict, *args: str) -> dict:
    res = xz(r, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def snapshot(r: dict) -> tuple:
    """What a refused command must leave as it was: the programs on the interfaces and
    every entry of the maps."""
    links = json.loads(subprocess.run(["ip", "-n", r["ns"], "-j", "link", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    progs = {link["ifname"]: link.get("xdp") for link in links}
    entries = {}
    for name in MAPS:
        with kernel.PinnedMap(os.path.join(r["pin"], name)) as m:
            entries[name] = m.items()
    return progs, entries


# Every command that opens the maps, each one way to get there.
COMMANDS = [["attach", "--mode", "generic"], ["attach", "--hook", "tc"],
            ["subscribers", "load", "{subs}"], ["blocklist", "load", "{list}"], ["status"],
            ["suspend", "100.64.7.9"],
            ["subscribers", "show", "100.64.7.9"]]


def refused_all(r: dict, what: str) -> None:
    before = snapshot(r)
    for cmd in COMMANDS:
        res = xz(r, *(a.format(list=r["dir"] / "list.txt", subs=r["dir"] / "subscribers.csv")
                       for a in cmd))
        assert res.returncode == 1, (cmd, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and what in lines[0] and "detach" in lines[0], (cmd, lines)
        assert "Traceback" not in res.stderr
    assert snapshot(r) == before


def test_digest_follows_the_layout_not_the_comments():
    d = ["-DXZ_MAX_HOSTS=1024", "-DXZ_MAX_FLOWS=64"]
    assert kernel.layout_digest(d) == kernel.layout_digest(d[::-1])
    assert kernel.layout_digest(d) != kernel.layout_digest(["-DXZ_MAX_HOSTS=2048", d[1]])
    code = "struct a { int x; /* one */ }; // two\n#define N 3"
    assert kernel._code(code) == kernel._code(code.replace("one", "three").replace("  ", " "))
    assert kernel._code(code) != kernel._code(code.replace("N 3", "N 4"))


def test_same_build_reattaches(router):
    r = router
    ok(r, "attach", "--mode", "generic")
    blob = kernel.read_blob(os.path.join(r["pin"], kernel.LAYOUT_PIN))
    assert blob.startswith(kernel.layout_digest(kernel_defines(r)).encode())
    again = ok(r, "attach", "--mode", "generic")
    assert again["subscribers"] == {"added": 0, "changed": 0, "removed": 0}
    ok(r, "blocklist", "load", str(r["dir"] / "list.txt"))
    assert ok(r, "status")["tables"]["prefixes"] == 2


def kernel_defines(r: dict) -> list[str]:
    from xdpzoot.config import load_config

    return load_config(r["cfg"]).defines()


def test_other_digest_is_refused_and_changes_nothing(router):
    r = router
    ok(r, "attach", "--mode", "generic")
    ok(r, "blocklist", "load", str(r["dir"] / "list.txt"))
    path = os.path.join(r["pin"], kernel.LAYOUT_PIN)
    good = bytes(kernel.read_blob(path)).rstrip(b"\0")
    kernel.pin_blob(path, b"0" * 64 + good[64:])   # another build's headers
    try:
        refused_all(r, "other map layouts")
    finally:
        kernel.pin_blob(path, good)
    assert ok(r, "attach", "--mode", "generic")["subscribers"]["added"] == 0


def test_maps_from_before_digests_count_as_other(router):
    r = router
    ok(r, "attach", "--mode", "generic")
    path = os.path.join(r["pin"], kernel.LAYOUT_PIN)
    good = bytes(kernel.read_blob(path)).rstrip(b"\0")
    os.unlink(path)
    try:
        refused_all(r, "without a layout digest")
    finally:
        kernel.pin_blob(path, good)
    ok(r, "status")


def test_other_limits_are_refused(router):
    r = router
    ok(r, "attach", "--mode", "generic")
    before = snapshot(r)
    bigger = config(r["dir"] / "bigger.toml", r["dir"] / "subscribers.csv", hosts=2048)
    for cmd in (["attach", "--mode", "generic"], ["status"],
                ["subscribers", "load", str(r["dir"] / "subscribers.csv")],
                ["blocklist", "load", str(r["dir"] / "list.txt")]):
        res = xz(r, *cmd, cfg=bigger)
        assert res.returncode == 1, res.stderr
        assert "-DXZ_MAX_HOSTS=1024 -> -DXZ_MAX_HOSTS=2048" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert snapshot(r) == before
    # Detach removes the pins: the maps are made anew with the new limits.
    ok(r, "detach")
    res = xz(r, "attach", "--mode", "generic", "--json", cfg=bigger)
    assert res.returncode == 0, res.stderr
    with kernel.PinnedMap(os.path.join(r["pin"], "xz_hosts")) as m:
        assert m.max_entries == 2048
    assert xz(r, "detach").returncode == 0


def test_scratch_bpffs_is_mounted_and_gone_afterwards():
    """The tests' and benchmarks' own bpffs: a BPF filesystem while in use, unmounted and
    removed at the end, an exception included."""
    with pytest.raises(RuntimeError), kernel.scratch_bpffs("xdpzoot-test-scratch-") as root:
        assert kernel._fs_magic(root) == kernel.BPF_FS_MAGIC
        kernel.pin_blob(os.path.join(root, "x"), b"pinned")
        raise RuntimeError("the user's code failed")
    assert not os.path.exists(root)
    assert root not in open("/proc/self/mounts").read()
