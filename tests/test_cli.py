"""The CLI as a black box: exit codes, stderr, --json, --help, and the attach lifecycle of
two instances side by side in two network namespaces (no traffic; see test_lab_policy)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

XDPZOOT = str(Path(sys.executable).with_name("xdpzoot"))
# Seconds a command may take: an attach compiles (10-20 s here, minutes under emulation in
# `make vmtest`).
CLI_TIMEOUT = 1200 if os.environ.get("XZ_VMTEST") else 120

def run(*args: str, ns: str | None = None, check: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [XDPZOOT, *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=check,
                          env={**os.environ, **env} if env else None)


def _commands(group=None, path=()) -> Iterator[tuple[str, ...]]:
    """Every command of the CLI, as the words that name it."""
    from xdpzoot.cli import main

    group = group or main
    yield path
    for name, cmd in getattr(group, "commands", {}).items():
        if not cmd.hidden:   # the lab's own helpers, run inside its namespaces
            yield from _commands(cmd, (*path, name))


def test_help_ends_with_examples():
    """Every command's --help (read in this process: one subprocess each would cost a
    minute) ends with examples and fits 80 columns."""
    from click.testing import CliRunner

    from xdpzoot.cli import main

    commands = list(_commands())
    assert len(commands) > 25
    for cmd in commands:
        r = CliRunner().invoke(main, [*cmd, "--help"], terminal_width=80,
                               prog_name="xdpzoot")
        assert r.exit_code == 0, (cmd, r.output)
        tail = r.output.strip().split("Examples:")
        assert len(tail) == 2 and "xdpzoot" in tail[1], (cmd, r.output)
        assert max(len(line) for line in r.output.splitlines()) <= 80, (cmd, r.output)


def test_version_and_what_it_does():
    from xdpzoot import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"xdpzoot {__version__}"
    first = run("--help").stdout.split("\n\n")[1]   # the line under "Usage:"
    for function in ("OP25B", "IP53B", "CSAM", "bandwidth", "suspen", "RADIUS"):
        assert function in first, first


def test_usage_error_exit_2():
    r = run("explain", "--in", "sideways")
    assert r.returncode == 2 and "sideways" in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--reason", "csam"], "never traced"),
    (["--reason", "ok"], "not a drop reason"),
    (["--rate", "0"], "--rate"),
    (["--seconds", "0"], "--seconds"),
])
def test_trace_usage_errors(args, says, bpffs):
    """Refused before anything is opened or switched on: exit 2, naming it (in this
    process, as the --help test)."""
    from click.testing import CliRunner

    from xdpzoot.cli import main

    r = CliRunner().invoke(main, ["--pin-dir", os.path.join(bpffs, "nothing-here"), "trace",
                                  *args], prog_name="xdpzoot")
    assert r.exit_code == 2 and says in r.stderr and not r.stdout, r.output


def test_not_loaded_is_an_operational_error(tmp_path, bpffs):
    r = run("--config", str(tmp_path / "none.toml"), "--pin-dir",
            os.path.join(bpffs, "nothing-here"), "status")
    assert r.returncode == 1
    assert r.stderr.startswith("xdpzoot: error:") and not r.stdout


def test_bad_config_names_the_key(tmp_path, bpffs):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[op25b]\naction = "block"\n')
    r = run("--config", str(cfg), "--pin-dir", os.path.join(bpffs, "x"), "status")
    assert r.returncode == 1 and "op25b.action" in r.stderr


# ---- two instances, each in its own namespace, one host ------------------------------------


@pytest.fixture(scope="module")
def routers(bpffs, tmp_path_factory) -> Iterator[list[dict]]:
    """Two namespaces, each with a veth pair (access a0, core c0) and its own pin dir."""
    out = []
    try:
        for i in range(2):
            ns = f"xzc{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            d = tmp_path_factory.mktemp(f"r{i}")
            cfg = d / "xdpzoot.toml"
            subs = d / "subscribers.csv"
            subs.write_text("subscriber,address,type\n7,100.64.7.0/24,dynamic\n"
                            f"8,198.51.100.{8 * (i + 1)}/29,static\n")
            cfg.write_text(f'[interfaces]\naccess = ["a0"]\ncore = ["c0"]\n'
                           f'[sources]\nsubscribers = "{subs}"\n')
            out.append({"ns": ns, "cfg": str(cfg), "subs": subs,
                        "pin": os.path.join(bpffs, ns)})
            for cmd in (["link", "add", "a0", "type", "veth", "peer", "name", "c0"],
                        ["link", "set", "a0", "up"], ["link", "set", "c0", "up"]):
                subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield out
    finally:
        for r in out:
            run("--config", r["cfg"], "--pin-dir", r["pin"], "detach", ns=r["ns"])
            subprocess.run(["ip", "netns", "del", r["ns"]], check=False)


def xz(r: dict, *args: str) -> dict:
    res = run("--config", r["cfg"], "--pin-dir", r["pin"], *args, "--json", ns=r["ns"])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_two_instances_side_by_side(routers):
    a, b = routers
    ra = xz(a, "attach", "--mode", "generic")
    rb = xz(b, "attach", "--hook", "tc")
    assert {(x["ifname"], x["hook"]) for x in ra["attached"]} == {("a0", "xdp"), ("c0", "xdp")}
    assert ra["subscribers"]["added"] == 2
    assert {(x["ifname"], x["hook"]) for x in rb["attached"]} == {("a0", "tc"), ("c0", "tc")}
    sa, sb = xz(a, "status"), xz(b, "status")
    assert sa["kernel"] == {"release": os.uname().release, "minimum": "6.1", "missing": [],
                            "notes": []}
    assert {i["hook"] for i in sa["interfaces"]} == {"xdp"}
    assert {i["hook"] for i in sb["interfaces"]} == {"tc"}
    assert xz(a, "subscribers", "show", "198.51.100.9")["subscriber"] == 8
    assert xz(b, "subscribers", "show", "198.51.100.9")["match"] is None
    assert xz(b, "subscribers", "show", "198.51.100.17")["match"] == "198.51.100.16/29"


def test_reattach_replaces_and_keeps_maps(routers):
    a = routers[0]
    # After the side-by-side test this is a change of XDP mode (generic -> native: a detach
    # and an attach, the TC program holding the policy in between); alone, an attach.
    native = xz(a, "attach", "--mode", "native")
    assert {(x["hook"], x["mode"]) for x in native["attached"]} == {("xdp", "native")}
    assert {(i["hook"], i["mode"]) for i in xz(a, "status")["interfaces"]} == {
        ("xdp", "native")}
    assert xz(a, "suspend", "100.64.7.9")["suspended"]
    again = xz(a, "attach", "--hook", "tc")   # switch hook: maps and suspension stay
    assert again["subscribers"] == {"added": 0, "changed": 0, "removed": 0}
    assert xz(a, "subscribers", "show", "100.64.7.9")["flags"] == ["suspended"]
    assert {i["hook"] for i in xz(a, "status")["interfaces"]} == {"tc"}
    assert xz(a, "resume", "100.64.7.9")["resumed"]
    assert xz(a, "subscribers", "show", "100.64.7.9")["match"] == "100.64.7.0/24"


def test_subscribers_load_errors_change_nothing(routers):
    a = routers[0]
    xz(a, "attach", "--mode", "generic")
    bad = a["subs"].with_name("bad.csv")
    bad.write_text("subscriber,address,type\n9,100.64.9.0/24,dynamic\n10,300.1.1.1,static\n")
    res = run("--config", a["cfg"], "--pin-dir", a["pin"], "subscribers", "load", str(bad),
              ns=a["ns"])
    assert res.returncode == 1 and f"{bad}:3:" in res.stderr
    assert xz(a, "subscribers", "show", "100.64.9.1")["match"] is None
    assert xz(a, "status")["tables"] == {"hosts": 0, "prefixes": 2, "allow": 0}


def test_a_link_left_out_of_the_config_is_let_go(routers):
    """Among many links (found in one dump of the links and one of the qdiscs, not asked
    one by one: 6.9 s for 2,000 links), attach finds our program on a link the config no
    longer names and takes it off; status lists ours only, not a clsact qdisc of another's."""
    a = routers[0]
    ns, cfg = a["ns"], Path(a["cfg"])
    text = cfg.read_text()
    links = range(100)
    subprocess.run(["ip", "-n", ns, "-batch", "-"], check=True, text=True,
                   input="".join(f"link add x{i} type veth peer name y{i}\n" for i in links))
    try:
        subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "y7", "clsact"], check=True)
        cfg.write_text(text.replace('access = ["a0"]', 'access = ["a0", "x42"]'))
        xz(a, "attach", "--hook", "tc")
        assert {(i["ifname"], i["hook"]) for i in xz(a, "status")["interfaces"]} == {
            ("a0", "tc"), ("x42", "tc"), ("c0", "tc")}
        cfg.write_text(text)
        xz(a, "attach", "--mode", "generic")
        assert {(i["ifname"], i["hook"]) for i in xz(a, "status")["interfaces"]} == {
            ("a0", "xdp"), ("c0", "xdp")}
        tc = subprocess.run(["tc", "-n", ns, "filter", "show", "dev", "x42", "ingress"],
                            capture_output=True, text=True, check=True).stdout
        assert "bpf" not in tc
    finally:
        cfg.write_text(text)
        subprocess.run(["ip", "-n", ns, "-batch", "-"], check=False, text=True,
                       input="".join(f"link del x{i}\n" for i in links))


def test_the_fast_path_leaves_out_what_it_cannot_forward_to(routers):
    """limits.ifindexes sizes the fast path's devmap: an interface with an ifindex beyond
    it is left out, with a warning, until the limit is raised (a layout change: detach,
    attach); a link without an Ethernet address (a tun device) always is: XDP would
    redirect an Ethernet frame into it."""
    a = routers[0]
    ns, cfg = a["ns"], Path(a["cfg"])
    text = cfg.read_text()
    fast = text.replace('access = ["a0"]', 'access = ["a0", "h0", "tn0"]').replace(
        'core = ["c0"]\n', 'core = ["c0"]\nvmacs = ["vm9"]\n') + "[dataplane]\nfast_path = true\n"
    subprocess.run(["ip", "-n", ns, "link", "add", "h0", "index", "5000", "type", "veth",
                    "peer", "name", "h1"], check=True)
    subprocess.run(["ip", "-n", ns, "tuntap", "add", "mode", "tun", "name", "tn0"], check=True)

    def attach() -> tuple[set[str], str]:
        res = run("--config", a["cfg"], "--pin-dir", a["pin"], "attach", "--mode", "generic",
                  "--json", ns=ns)
        assert res.returncode == 0, res.stderr
        return set(json.loads(res.stdout)["fast_path"]["egress"]), res.stderr

    try:
        run("--config", a["cfg"], "--pin-dir", a["pin"], "detach", ns=ns)   # if attached
        cfg.write_text(fast)
        egress, err = attach()
        assert egress == {"a0", "c0"}
        assert "fast path: h0: left out" in err and "fast path: tn0: left out" in err
        assert "fast path: vm9 (interfaces.vmacs): its MAC address not taken" in err
        xz(a, "detach")
        cfg.write_text(fast + "[limits]\nifindexes = 8192\n")
        egress, err = attach()
        assert egress == {"a0", "c0", "h0"}
        assert "h0" not in err and "fast path: tn0: left out" in err
        assert set(xz(a, "status")["fast_path"]["egress"]) == egress
    finally:
        run("--config", a["cfg"], "--pin-dir", a["pin"], "detach", ns=ns)
        cfg.write_text(text)
        for link in ("h0", "tn0"):
            subprocess.run(["ip", "-n", ns, "link", "del", link], check=False)


def test_detach_removes_everything(routers):
    b = routers[1]
    if run("--config", b["cfg"], "--pin-dir", b["pin"], "status", ns=b["ns"]).returncode:
        xz(b, "attach", "--hook", "tc")   # alone; after the side-by-side test it is there
    assert {i["hook"] for i in xz(b, "status")["interfaces"]} == {"tc"}
    gone = xz(b, "detach")["detached"]
    assert {g["ifname"] for g in gone} == {"a0", "c0"}
    assert not os.path.exists(b["pin"])
    tc = subprocess.run(["ip", "netns", "exec", b["ns"], "tc", "filter", "show", "dev", "a0",
                         "ingress"], capture_output=True, text=True).stdout
    assert "bpf" not in tc
    assert run("--config", b["cfg"], "--pin-dir", b["pin"], "status", ns=b["ns"]).returncode == 1


def test_subscribers_diff_writes_nothing(routers):
    a = routers[0]
    xz(a, "attach", "--mode", "generic")
    new = a["subs"].with_name("new.csv")
    new.write_text("subscriber,address,type,flags\n7,100.64.7.0/24,dynamic,\n"
                   "9,100.64.7.5,dynamic,op25b_exempt\n")
    d = xz(a, "subscribers", "diff", str(new))
    assert (d["added"], d["changed"], d["removed"]) == (1, 0, 1)
    assert {c["entry"]: c["change"] for c in d["changes"]} == {
        "100.64.7.5": "add", "198.51.100.8/29": "remove"}
    assert xz(a, "subscribers", "show", "100.64.7.5")["match"] == "100.64.7.0/24"
    assert xz(a, "subscribers", "load", str(new))["added"] == 1
    assert xz(a, "subscribers", "show", "100.64.7.5")["flags"] == ["op25b_exempt"]
    assert xz(a, "subscribers", "diff", str(new))["added"] == 0
    xz(a, "subscribers", "load", str(a["subs"]))


def _kernel_view(ns: str) -> str:
    """What the kernel says of the namespace's interfaces: XDP programs, qdiscs, filters."""
    out = []
    for cmd in (["ip", "-d", "link", "show"], ["tc", "qdisc", "show"],
                ["tc", "filter", "show", "dev", "a0", "ingress"],
                ["tc", "filter", "show", "dev", "c0", "ingress"]):
        out.append(subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True,
                                  text=True).stdout)
    return "\n".join(out)


@pytest.mark.parametrize("attached", [False, True], ids=["fresh", "running"])
def test_attach_refused_by_a_kernel_without_a_feature(routers, attached):
    """A kernel without something the programs need (reported missing through the probe's
    test hook): one line naming it and the minimum version, and nothing touched, neither
    the interfaces nor the pins (a fresh instance), nor a running instance's programs."""
    r = routers[0] if attached else routers[1]   # the first is attached by the tests above
    if attached:
        if run("--config", r["cfg"], "--pin-dir", r["pin"], "status", ns=r["ns"]).returncode:
            xz(r, "attach", "--mode", "generic")
        pin = r["pin"]
    else:
        pin = r["pin"] + "-refused"
    before = _kernel_view(r["ns"])
    res = run("--config", r["cfg"], "--pin-dir", pin, "attach", "--mode", "native", ns=r["ns"],
              env={"XZ_TEST_MISSING_FEATURES": "atomic:cmpxchg"})
    assert res.returncode == 1 and not res.stdout
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith(f"xdpzoot: error: kernel {os.uname().release} lacks BPF "
                                 "atomic compare-and-exchange (Linux 5.12); xdpzoot needs "
                                 "Linux 6.1 or later")
    assert _kernel_view(r["ns"]) == before
    assert os.path.exists(pin) == attached


def test_status_notes_a_degraded_feature(routers):
    """A kernel without an optional feature (LPM trie batches): status says what is done
    without it, and a subscriber load writes the prefixes one by one, the same."""
    a = routers[0]
    if run("--config", a["cfg"], "--pin-dir", a["pin"], "status", ns=a["ns"]).returncode:
        xz(a, "attach", "--mode", "generic")
    env = {"XZ_TEST_MISSING_FEATURES": "batch:lpm_trie"}
    res = run("--config", a["cfg"], "--pin-dir", a["pin"], "status", "--json", ns=a["ns"],
              env=env)
    k = json.loads(res.stdout)["kernel"]
    assert k["missing"] == [] and k["notes"] == [
        "no LPM trie batch operations (Linux 5.13): prefixes written one by one"]
    text = run("--config", a["cfg"], "--pin-dir", a["pin"], "status", ns=a["ns"], env=env)
    assert "  note: no LPM trie batch operations" in text.stdout
    new = a["subs"].with_name("degraded.csv")
    new.write_text("subscriber,address,type\n7,100.64.7.0/24,dynamic\n"
                   "11,100.64.11.0/24,dynamic\n")
    res = run("--config", a["cfg"], "--pin-dir", a["pin"], "subscribers", "load", str(new),
              "--json", ns=a["ns"], env=env)
    assert res.returncode == 0, res.stderr
    assert xz(a, "subscribers", "show", "100.64.11.5")["match"] == "100.64.11.0/24"
    xz(a, "subscribers", "load", str(a["subs"]))


def test_long_loads_show_progress_on_a_terminal(routers, tmp_path):
    """A load that writes 20,000 entries or more draws a bar on stderr when stderr is a
    terminal (`script` gives the command one); the other tests read a pipe: no bar there."""
    a = routers[0]
    if run("--config", a["cfg"], "--pin-dir", a["pin"], "status", ns=a["ns"]).returncode:
        xz(a, "attach", "--mode", "generic")
    subs, listed = tmp_path / "many.csv", tmp_path / "csam.txt"
    subs.write_text("subscriber,address,type\n7,100.64.7.0/24,dynamic\n" + "".join(
        f"{20 + i},100.65.{i >> 8}.{i & 255},static\n" for i in range(20_000)))
    listed.write_text("".join(f"2001:db8:c5a::{i:x}\n" for i in range(20_000)))
    os.chmod(listed, 0o600)
    for args, label in ((["subscribers", "load", str(subs)], "writing subscribers"),
                        (["blocklist", "load", str(listed)], "writing CSAM list")):
        cmd = [XDPZOOT, "--config", a["cfg"], "--pin-dir", a["pin"], *args]
        res = subprocess.run(["ip", "netns", "exec", a["ns"], "script", "-qec",
                              " ".join(cmd), "/dev/null"], capture_output=True, text=True,
                             timeout=CLI_TIMEOUT)
        assert res.returncode == 0 and label in res.stdout, res.stdout[-2000:]
    assert xz(a, "subscribers", "show", "100.65.78.31")["subscriber"] == 20 + 19_999
    assert xz(a, "blocklist", "status")["hosts6"] == 20_000
    xz(a, "subscribers", "load", str(a["subs"]), "--force")
