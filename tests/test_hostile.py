"""Every command against hostile inputs: files that are not files (a directory, /dev/zero,
/dev/urandom, a FIFO), files that are empty, binary, one huge line, not UTF-8 or unreadable,
and malformed addresses, ports, rates and durations. Each run is bounded by a timeout and
must end with a non-zero exit code, a short message (``xdpzoot: error: ...`` or click's usage
error), no traceback, and the pinned maps of a real instance as they were."""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

from xdpzoot.cli import main
from xdpzoot.dataplane import kernel

XDPZOOT = os.path.join(os.path.dirname(sys.executable), "xdpzoot")
SOURCE_BYTES = 4 << 20   # the test config's limits.source_bytes
SUBS = "subscriber,address,type,up_kbps,down_kbps\n1,198.51.100.8/29,static,,\n" \
       "2,100.64.0.0/24,dynamic,,\n3,100.64.9.9,dynamic,,\n"
LIST = "192.0.2.66\n198.51.100.128/25\n2001:db8:66::/48\n203.0.113.7\n"
# What the instance's state is: the maps that hold subscribers and lists, and the switches.
MAPS = ("xz_hosts", "xz_prefixes", "xz_control", "xz_csam_meta", "xz_csam_h0", "xz_csam_h1",
        "xz_csam_p0", "xz_csam_p1", "xz_allow", "xz_manual")


def hostile_files(d: Path) -> dict[str, str]:
    """Paths by name: each one a file no command may take (or not a file at all)."""
    rng = random.Random(9)
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    files = {
        "empty": b"",
        "binary": rng.randbytes(64 << 10),
        "huge-line": b"192.0.2." + b"1" * (2 << 20),   # one line of 2 MiB, under the limit
        "over-limit": b"# x\n" * (SOURCE_BYTES // 4 + 1),
        "not-utf8": b"subscriber,address,type\n1,\xff\xfe\x80,static\n[x]\n\xc3\x28 = 1\n",
        "nul-bytes": b"\0" * 1000,
        "unreadable": b"\x01garbage\n",   # root reads it anyway: its content is hostile too
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    os.chmod(d / "unreadable", 0)
    out = {name: str(d / name) for name in files}
    out.update({"missing": str(d / "missing"), "directory": str(d / "dir"),
                "fifo": str(d / "fifo"), "dev-zero": "/dev/zero", "dev-urandom": "/dev/urandom"})
    return out


BAD_ADDRESSES = ["", "x", "999.1.1.1", "192.0.2.1/24", "1:2:3::4::5", "192.0.2.1\n",
                 "a" * 5000, "-1"]
BAD_SUBSCRIBERS = ["", "x", "-1", "99999999999999999999", "1.5", "a" * 5000]
BAD_RATES = ["", "x", "0", "-5", "1e9", "99999999999999999999"]
BAD_DURATIONS = ["", "x", "-1h", "5x", "1e999s", "9" * 40, "h"]
BAD_PORTS = ["-1", "65536", "x", ""]


def cases(files: dict[str, str]) -> dict[tuple[str, ...], list[list[str]]]:
    """Per command (as ``xdpzoot --help`` lists them), the hostile argument lists."""
    f = list(files.values())
    forced = [p for name, p in files.items() if name != "empty"]   # --force: empty is a list
    explain = ["explain", "--in", "access", "--src", "100.64.0.5", "--dst", "192.0.2.1",
               "--proto", "tcp", "--dport", "25"]
    return {
        ("attach",): [["attach", "--hook", "bpf"], ["attach", "--mode", "x"]],
        ("detach",): [["detach", "--json", "x"]],
        ("status",): [["status", "x"]],
        ("stats",): [["stats", x] for x in ("x", "-1", "nan", "1e999")]
        + [["stats", "1", x] for x in ("x", "-1", "1.5")],
        ("explain",): [explain[:i] + [v] + explain[i + 1:] for i, vals in
                       ((4, BAD_ADDRESSES), (6, BAD_ADDRESSES[:4]), (8, ["x", ""]),
                        (10, BAD_PORTS), (2, ["x"])) for v in vals]
        + [explain + ["--sport", p] for p in BAD_PORTS],
        ("subscribers", "load"): [["subscribers", "load", p] for p in f]
        + [["subscribers", "load", "--force", p] for p in forced],
        ("subscribers", "diff"): [["subscribers", "diff", p] for p in f],
        ("subscribers", "show"): [["subscribers", "show", a] for a in BAD_ADDRESSES],
        ("suspend",): [["suspend", s] for s in BAD_SUBSCRIBERS + BAD_ADDRESSES[2:5]],
        ("resume",): [["resume", s] for s in BAD_SUBSCRIBERS + BAD_ADDRESSES[2:5]],
        ("blocklist", "load"): [["blocklist", "load", p] for p in f]
        + [["blocklist", "load", "--force", p] for p in forced],
        ("blocklist", "check"): [["blocklist", "check", a] for a in BAD_ADDRESSES],
        ("blocklist", "status"): [["blocklist", "status", "x"]],
        ("usage",): [["usage", s] for s in BAD_SUBSCRIBERS],
        ("top",): [["top", "--by", "x"], ["top", "-n", "0"], ["top", "-n", "x"]],
        ("throttle",): [["throttle", "1", "--rate", r] for r in BAD_RATES]
        + [["throttle", "1", "--rate", "1000", "--for", d] for d in BAD_DURATIONS]
        + [["throttle", s, "--rate", "1000"] for s in ("x", "-1", "192.0.2.250")],
        ("unthrottle",): [["unthrottle", s] for s in ("x", "99999999999999999999",
                                                      "192.0.2.250")],
        ("congestion",): [["congestion", "x"], ["congestion", ""]],
        ("trace",): [["trace", "--reason", r] for r in ("x", "csam", "")]
        + [["trace", "--count", c] for c in ("0", "-1", "x")]
        + [["trace", "--seconds", t] for t in ("0", "nan", "1e999")]
        + [["trace", "--rate", r] for r in ("0", "100001", "x")] + [["trace", "x"]],
        ("run",): [["run", "x"]],
        ("radius",): [["radius", "x"], ["radius"]],   # the config has no [radius] listen
        ("sessions", "show"): [["sessions", "show"], ["sessions", "show", "a", "b"]],
        ("lab", "up"): [["lab", "up", "--prefix", p] for p in ("", "UP", "../x", "a" * 40)],
        ("lab", "down"): [["lab", "down", p] for p in ("", "UP", "../x", "a" * 40)],
        ("lab", "list"): [["lab", "list", "x"]],
        ("lab", "smtp"): [["lab", "smtp", "--port", "x", "--maildir", files["directory"]]],
        ("lab", "wait"): [["lab", "wait", "--timeout", "x"]],
    }


# Configs: each hostile file as the config, and as each file a valid config names.
CONFIG_COMMANDS = (["status"], ["attach", "--access", "xz-none"], ["run"], ["usage", "1"],
                   ["subscribers", "load", "SUBS"], ["blocklist", "load", "LIST"],
                   ["radius"], ["sessions"])
# A snapshot the daemon cannot read is a fresh start (test_daemon), not a refusal: only
# `usage` refuses it.
REFERENCED = {"bandwidth.rules": ["run"], "bandwidth.state": ["usage"],
              "sources.subscribers": ["attach"], "sources.csam": ["attach"]}


def commands() -> set[tuple[str, ...]]:
    """Every command and subcommand of the CLI."""
    def walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path
    return set(walk(main, ()))


class Instance:
    """A real pinned instance (maps only, attached nowhere) in a namespace of its own."""

    def __init__(self, ns: str, pin: str, d: Path):
        self.ns, self.pin, self.dir = ns, pin, d

    def run(self, args: list[str], config: str) -> subprocess.CompletedProcess | None:
        """The command's result; None when it still runs after 30 s (then it is killed)."""
        try:
            return subprocess.run(["ip", "netns", "exec", self.ns, XDPZOOT, "--config", config,
                                   "--pin-dir", self.pin, *args], capture_output=True,
                                  timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def state(self) -> dict[str, tuple]:
        out = {}
        for name in MAPS:
            with kernel.PinnedMap(os.path.join(self.pin, name)) as m:
                keys, values = m.items()
                out[name] = tuple(sorted(zip(keys, (values[i * m.value_size:(i + 1) *
                                                           m.value_size]
                                                    for i in range(len(keys))), strict=True)))
        return out


def config_text(d: Path, **paths: str) -> str:
    """The test instance's config, with files in ``d`` unless ``paths`` names others."""
    p = {"bandwidth.rules": "", "bandwidth.state": str(d / "state.msgpack"),
         "sources.subscribers": "", "sources.csam": "", **paths}
    return (f'[bandwidth]\nrules = "{p["bandwidth.rules"]}"\nstate = "{p["bandwidth.state"]}"\n'
            f'audit = "{d}/audit.jsonl"\n'
            f'[sources]\nsubscribers = "{p["sources.subscribers"]}"\n'
            f'csam = "{p["sources.csam"]}"\n'
            "[limits]\nhosts = 64\nprefixes = 64\nsubscribers = 64\ncsam_hosts = 64\n"
            f"csam_prefixes = 64\nflows = 64\npool_addresses = 1024\n"
            f"source_bytes = {SOURCE_BYTES}\n")


@pytest.fixture(scope="module")
def inst(bpffs, tmp_path_factory) -> Iterator[Instance]:
    d = tmp_path_factory.mktemp("hostile")
    ns = f"xzhost{secrets.token_hex(3)}"
    pin = os.path.join(bpffs, f"hostile-{secrets.token_hex(4)}")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        i = Instance(ns, pin, d)
        (d / "xdpzoot.toml").write_text(config_text(d))
        (d / "subs.csv").write_text(SUBS)
        (d / "list.txt").write_text(LIST)
        os.chmod(d / "list.txt", 0o600)
        for args in (["subscribers", "load", str(d / "subs.csv")],
                     ["blocklist", "load", str(d / "list.txt")]):
            r = i.run(args, str(d / "xdpzoot.toml"))
            assert r.returncode == 0, r.stderr
        yield i
    finally:
        kernel.unpin_all(pin)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def files(inst) -> dict[str, str]:
    d = inst.dir / "files"
    d.mkdir()
    return hostile_files(d)


def refusal_problem(inst: Instance, args: list[str], config: str) -> str | None:
    """What is wrong with how the command took ``args`` (None: refused as it should)."""
    before = inst.state()
    r = inst.run(args, config)
    what = f"{[a[:40] for a in args]} (config {os.path.basename(config)})"
    if r is None:
        return f"{what}: still running after 30 s"
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    what += f": exit {r.returncode}"
    if "Traceback" in out + err:
        return f"{what}, traceback: {err.strip().splitlines()[-1][:300]}"
    lines = [x for x in err.splitlines() if not x.startswith("xdpzoot: warning: ")]
    if r.returncode == 0:
        return f"{what}: accepted"
    if r.returncode == 2:   # click's usage error: "Usage: ...", "Try ...", "Error: ..."
        if not any(x.startswith("Error: ") for x in lines):
            return f"{what}: no usage error: {err[:300]!r}"
    elif r.returncode != 1 or not lines or not lines[0].startswith("xdpzoot: error: "):
        return f"{what}: no one-line error: {err[:300]!r}"
    elif len(lines) > 21:   # one line per problem: SourceError shows 20 and "... and N more"
        return f"{what}: {len(lines)} lines of error"
    if r.returncode == 1 and max(map(len, lines)) >= 400:   # click echoes a bad argument
        return f"{what}: the message echoes the input ({max(map(len, lines))} characters)"
    if inst.state() != before:
        return f"{what}: the maps changed"
    return None


def refused_all(inst: Instance, runs: list[tuple[list[str], str]]) -> None:
    """Run every case (four at a time: each mostly waits for its interpreter to start; a
    change of the maps is a failure whichever run made it), then report every case that
    was not refused cleanly."""
    with ThreadPoolExecutor(4) as pool:
        found = pool.map(lambda run: refusal_problem(inst, *run), runs)
    problems = [p for p in found if p]
    assert not problems, "\n".join(problems)


def test_every_command_has_hostile_cases(files) -> None:
    assert set(cases(files)) == commands()


def test_commands_refuse_hostile_arguments(inst, files) -> None:
    config = str(inst.dir / "xdpzoot.toml")
    refused_all(inst, [(args, config) for runs in cases(files).values() for args in runs])


def test_hostile_config_files(inst, files) -> None:
    """Each hostile file as the config: every command that reads it refuses."""
    subs, lst = str(inst.dir / "subs.csv"), str(inst.dir / "list.txt")
    refused_all(inst, [([subs if a == "SUBS" else lst if a == "LIST" else a for a in args], path)
                       for name, path in files.items()
                       if name not in ("empty", "over-limit")   # comments only: all defaults
                       for args in CONFIG_COMMANDS])


def test_hostile_files_named_by_the_config(inst, files) -> None:
    """Each hostile file as the rules, the snapshot or a source of a valid config."""
    runs = []
    for key, commands_ in REFERENCED.items():
        for name, path in files.items():
            if name == "empty" and key != "sources.csam" or \
                    name == "missing" and key == "bandwidth.state":
                continue   # no rules, no subscribers, no snapshot yet: valid, by design
            cfg = inst.dir / f"cfg-{key}-{name}.toml"
            cfg.write_text(config_text(inst.dir, **{key: path}))
            runs += [(["attach", "--access", "xz-none"] if cmd == "attach" else
                      ["usage", "1"] if cmd == "usage" else [cmd], str(cfg)) for cmd in commands_]
    refused_all(inst, runs)
