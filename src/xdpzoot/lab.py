"""A lab topology in network namespaces, for people and for tests.

Four namespaces, all named after one short prefix::

    {p}-dyn  eth0 ──── acc-dyn ┐
                               {p}-rtr  core0 ──── eth0  {p}-inet
    {p}-sta  eth0 ──── acc-sta ┘

``{p}-rtr`` is the router xdpzoot runs on: ``acc-*`` are its access interfaces, ``core0`` its
core interface.  ``{p}-dyn`` is a subscriber with a dynamic address, ``{p}-sta`` a static
subscriber with a /29, ``{p}-inet`` stands for the Internet and also hosts the ISP's own mail
relay and support site on its loopback.  Every veth pair is created from inside the router
namespace with its peer moved straight into the other namespace, so nothing ever appears in the
host's own namespace.

IPv6 duplicate address detection is off and every neighbour entry is static, so traffic flows as
soon as :func:`lab_up` returns: no ARP, no ND, nothing to wait for in a test.

Servers (optional): an SMTP sink on ports 25 and 587 and dnsmasq in ``{p}-inet``, dnsmasq in both
subscriber namespaces.  Their pids, the Lab itself and the maildir live under
``/run/xdpzoot-lab/{prefix}/`` so that another process (the CLI) can find and stop the lab.

Run as a module for the server side and for people without the CLI::

    xdpzoot lab up [--prefix P] [--no-servers]
    xdpzoot lab down P
    xdpzoot lab list
    python -m xdpzoot lab smtp --port 25 --port 587 --maildir DIR    (what lab_up starts)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUN_ROOT = Path("/run/xdpzoot-lab")
STATE_FILE = "lab.json"

# What every dnsmasq in the lab answers, so a test can tell an answer from a timeout.
DNS_NAME = "example.test"
DNS_ANSWER4 = "192.0.2.1"
DNS_ANSWER6 = "2001:db8::1"
# A TXT record naming the namespace role ("inet", "dyn", "sta"): tells *which* resolver answered.
DNS_WHOAMI = "whoami.test"

SMTP_PORTS = (25, 587)

# Bounded waits, on events: these are the bounds, not the waits. Interfaces and addresses
# appear within milliseconds; servers within a second or two on a loaded machine, but a
# minute and more under emulation (`make vmtest`: each Python server and each waiter takes
# seconds to start there; 10 s failed every lab on 6.12 under TCG with its servers running).
# A lab whose servers are not up after this is broken.
LINK_TIMEOUT = 5.0
SERVER_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02

# Lowercase letters and digits only: the prefix becomes part of namespace names, file names and
# the dnsmasq command line.  Twelve characters keep "{prefix}-inet" short and readable.
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,11}$")

_ROLES = ("rtr", "dyn", "sta", "inet")

# The addressing plan.  Keys are the names in Lab.addr.
ADDR: dict[str, str] = {
    "dyn4": "100.64.1.10",
    "dyn6": "2001:db8:1::10",
    "sta4": "198.51.100.9",
    "sta4b": "198.51.100.10",
    "sta4c": "198.51.100.11",
    "sta6": "2001:db8:2::9",
    "inet4": "203.0.113.10",
    "inet6": "2001:db8:ff::10",
    "relay4": "192.0.2.25",
    "relay6": "2001:db8:ff::25",
    "support4": "192.0.2.80",
    "support6": "2001:db8:ff::80",
    "other4": "192.0.2.99",
    "rtr_dyn4": "100.64.1.1",
    "rtr_dyn6": "2001:db8:1::1",
    "rtr_sta4": "198.51.100.14",
    "rtr_sta6": "2001:db8:2::1",
    "rtr_core4": "203.0.113.1",
    "rtr_core6": "2001:db8:ff::1",
    # Prefixes, for the subscriber database of a test.
    "dyn_pool4": "100.64.1.0/24",
    "sta_block4": "198.51.100.8/29",
    "sta_block6": "2001:db8:2::/64",
}


@dataclass(frozen=True)
class Lab:
    """A running lab: namespace names, router interface names and the addressing plan."""

    prefix: str
    router: str
    dyn: str
    static: str
    inet: str
    access: tuple[str, ...]
    core: tuple[str, ...]
    addr: dict[str, str]

    @property
    def namespaces(self) -> tuple[str, ...]:
        """All namespaces of the lab, router first."""
        return (self.router, self.dyn, self.static, self.inet)

    @property
    def rundir(self) -> Path:
        """The lab's runtime directory (state file, maildir, pid files, server logs)."""
        return RUN_ROOT / self.prefix

    @property
    def bpffs(self) -> Path:
        """A BPF filesystem mounted in the host's mount namespace, outside /sys, so that pins
        made under ``ip netns exec`` outlive the command: use a pin dir below it."""
        return self.rundir / "bpf"

    @property
    def maildir(self) -> Path:
        """Where the SMTP sink in the inet namespace stores each message it accepts."""
        return self.rundir / "mail"


def _lab_for(prefix: str) -> Lab:
    return Lab(
        prefix=prefix,
        router=f"{prefix}-rtr",
        dyn=f"{prefix}-dyn",
        static=f"{prefix}-sta",
        inet=f"{prefix}-inet",
        access=("acc-dyn", "acc-sta"),
        core=("core0",),
        addr=dict(ADDR),
    )


# ----------------------------------------------------------------------------- running commands


class NetnsError(subprocess.CalledProcessError):
    """A command in the lab failed; unlike its base class, its message includes the output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        text = super().__str__()
        if out:
            text += f"\nstdout: {out}"
        if err:
            text += f"\nstderr: {err}"
        return text


def _run(argv: Sequence[str], *, timeout: float = 30, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise NetnsError(res.returncode, list(argv), res.stdout, res.stderr)
    return res


def netns_run(ns: str, *argv: str, timeout: float = 30, check: bool = True,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` and return its captured text output.

    The command is killed after ``timeout`` seconds (:class:`subprocess.TimeoutExpired`).  With
    ``check`` a non-zero exit raises :class:`NetnsError`, whose message carries stdout and stderr.
    """
    return _run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, input=input)


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """This thread in network namespace ``ns`` for the block (for what resolves interfaces
    there: BPF_PROG_TEST_RUN's ingress ifindex, a fib lookup), back where it was after."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return _run(argv, timeout=10)


def _sysctls(ns: str, pairs: Sequence[str]) -> None:
    """Set sysctls (``"key=value"`` strings) inside ``ns``."""
    netns_run(ns, "sysctl", "-q", "-w", *pairs, timeout=10)


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``pred`` until it returns something true, and return that; after ``timeout``
    seconds raise TimeoutError naming ``what``. The bounded wait on an event that tests
    and the lab use instead of a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"lab: timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


# ----------------------------------------------------------------------------- namespaces, links


def _netns_names() -> set[str]:
    out = _run(["ip", "-j", "netns", "list"], timeout=10).stdout.strip()
    return {e["name"] for e in json.loads(out)} if out else set()


def lab_exists(prefix: str) -> bool:
    """True when any namespace of the lab named ``prefix`` exists."""
    names = _netns_names()
    return any(f"{prefix}-{role}" in names for role in _ROLES)


def lab_list() -> list[str]:
    """Prefixes of the labs that have a state file on this host."""
    if not RUN_ROOT.is_dir():
        return []
    return sorted(p.name for p in RUN_ROOT.iterdir() if (p / STATE_FILE).is_file())


def _link_info(ns: str, dev: str) -> dict[str, Any]:
    """`ip -j link show` of one interface: flags, MAC address, state."""
    out = _ip("-j", "link", "show", "dev", dev, ns=ns).stdout
    return json.loads(out)[0]


def _mac(ns: str, dev: str) -> str:
    return str(_link_info(ns, dev)["address"])


def _tentative(ns: str) -> bool:
    """True while any IPv6 address in ``ns`` is tentative (or failed DAD)."""
    out = _ip("-j", "-6", "addr", "show", ns=ns).stdout
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("tentative") or a.get("dadfailed"):
                return True
    return False


# (router interface, peer namespace role, router addresses, peer addresses, peer gateways)
_LINKS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, str]], ...] = (
    ("acc-dyn", "dyn",
     ("100.64.1.1/24", "2001:db8:1::1/64"),
     ("100.64.1.10/24", "2001:db8:1::10/64"),
     ("100.64.1.1", "2001:db8:1::1")),
    ("acc-sta", "sta",
     ("198.51.100.14/29", "2001:db8:2::1/64"),
     ("198.51.100.9/29", "198.51.100.10/29", "198.51.100.11/29", "2001:db8:2::9/64"),
     ("198.51.100.14", "2001:db8:2::1")),
    ("core0", "inet",
     ("203.0.113.1/24", "2001:db8:ff::1/64"),
     ("203.0.113.10/24", "2001:db8:ff::10/64"),
     ("203.0.113.1", "2001:db8:ff::1")),
)

# Addresses on the loopback of the inet namespace: the outside world behind 203.0.113.10.
_INET_LO = ("192.0.2.25/32", "192.0.2.80/32", "192.0.2.99/32",
            "2001:db8:ff::25/128", "2001:db8:ff::80/128")


def _host(cidr: str) -> str:
    return cidr.split("/")[0]


def _add_addr(ns: str, dev: str, cidr: str) -> None:
    if ":" in cidr:
        _ip("-6", "addr", "add", cidr, "dev", dev, "nodad", ns=ns)
    else:
        _ip("addr", "add", cidr, "dev", dev, ns=ns)


def _neigh(ns: str, dev: str, addr: str, mac: str) -> None:
    _ip("neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent", ns=ns)


def _build_network(lab: Lab) -> None:
    """Create the namespaces, links, addresses, routes and static neighbours of ``lab``."""
    ns_of = {"rtr": lab.router, "dyn": lab.dyn, "sta": lab.static, "inet": lab.inet}
    for ns in lab.namespaces:
        _ip("netns", "add", ns)
        # DAD off before any interface exists, so new interfaces inherit it from "default".
        _sysctls(ns, ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                      "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
                      "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
        _ip("link", "set", "lo", "up", ns=ns)
    _sysctls(lab.router, ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])

    for dev, role, _, _, _ in _LINKS:
        # Both ends are born inside namespaces: the host's namespace never sees them.
        _ip("link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns_of[role],
            ns=lab.router)
    for dev, role, _, _, _ in _LINKS:
        _ip("link", "set", dev, "up", ns=lab.router)
        _ip("link", "set", "eth0", "up", ns=ns_of[role])
    for dev, role, _, _, _ in _LINKS:
        peer = ns_of[role]
        wait_for(lambda d=dev: "LOWER_UP" in _link_info(lab.router, d).get("flags", []),
                 LINK_TIMEOUT, f"carrier on {lab.router}/{dev}")
        wait_for(lambda p=peer: "LOWER_UP" in _link_info(p, "eth0").get("flags", []),
                 LINK_TIMEOUT, f"carrier on {peer}/eth0")

    for dev, role, rtr_addrs, peer_addrs, (gw4, gw6) in _LINKS:
        peer = ns_of[role]
        _sysctls(lab.router, [f"net.ipv4.conf.{dev}.rp_filter=0",
                              f"net.ipv6.conf.{dev}.accept_dad=0"])
        _sysctls(peer, ["net.ipv4.conf.eth0.rp_filter=0", "net.ipv6.conf.eth0.accept_dad=0"])
        for cidr in rtr_addrs:
            _add_addr(lab.router, dev, cidr)
        for cidr in peer_addrs:
            _add_addr(peer, "eth0", cidr)
        _ip("route", "replace", "default", "via", gw4, "dev", "eth0", ns=peer)
        _ip("-6", "route", "replace", "default", "via", gw6, "dev", "eth0", ns=peer)

        rtr_mac, peer_mac = _mac(lab.router, dev), _mac(peer, "eth0")
        for cidr in peer_addrs:
            _neigh(lab.router, dev, _host(cidr), peer_mac)
        for cidr in rtr_addrs:
            _neigh(peer, "eth0", _host(cidr), rtr_mac)

    inet_mac = _mac(lab.inet, "eth0")
    for cidr in _INET_LO:
        _add_addr(lab.inet, "lo", cidr)
        if ":" in cidr:
            # The IPv6 ones fall inside core0's on-link /64, and Linux answers ND only for
            # addresses on the asking interface: tell the router where they are.
            _neigh(lab.router, "core0", _host(cidr), inet_mac)
    _ip("route", "replace", "192.0.2.0/24", "via", lab.addr["inet4"], "dev", "core0",
        ns=lab.router)

    for ns in lab.namespaces:
        wait_for(lambda n=ns: not _tentative(n), LINK_TIMEOUT,
                 f"IPv6 addresses in {ns} to leave the tentative state")


# ----------------------------------------------------------------------------- state file


def _state_path(prefix: str) -> Path:
    return RUN_ROOT / prefix / STATE_FILE


def _write_state(lab: Lab, servers: dict[str, dict[str, Any]]) -> None:
    data = asdict(lab)
    data["servers"] = servers
    path = _state_path(lab.prefix)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _read_state(prefix: str) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(prefix).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def lab_state(prefix: str) -> Lab | None:
    """Reread the lab named ``prefix`` from its state file; None when there is none."""
    data = _read_state(prefix)
    if data is None:
        return None
    return Lab(
        prefix=data["prefix"],
        router=data["router"],
        dyn=data["dyn"],
        static=data["static"],
        inet=data["inet"],
        access=tuple(data["access"]),
        core=tuple(data["core"]),
        addr=dict(data["addr"]),
    )


def lab_servers(prefix: str) -> dict[str, dict[str, Any]]:
    """The lab's servers from its state file: name -> {"ns", "pid", "argv", "log"}."""
    data = _read_state(prefix)
    return dict(data.get("servers", {})) if data else {}


# ----------------------------------------------------------------------------- servers

# Popen objects of servers this process started, so lab_down can reap them (no zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _pkg_env() -> dict[str, str]:
    """Environment for server processes: they must import this package even if not installed."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start(lab: Lab, servers: dict[str, dict[str, Any]], name: str, ns: str,
           argv: list[str]) -> None:
    """Start one server in ``ns``, log to the rundir, and record its pid in the state file."""
    log = lab.rundir / f"{name}.log"
    with open(log, "wb") as out:
        # A new session: the servers outlive a CLI that started them and ignore its ^C.
        # `ip netns exec` execs the command, so the pid is the server's own.
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_pkg_env())
    _CHILDREN[proc.pid] = proc
    servers[name] = {"ns": ns, "pid": proc.pid, "argv": argv, "log": str(log)}
    _write_state(lab, servers)


def _dnsmasq_argv(lab: Lab, role: str, listen: Sequence[str]) -> list[str]:
    argv = [
        shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/dnsmasq",
        "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--no-poll", "--port=53", "--bind-interfaces", "--user=root", "--group=root",
        f"--pid-file={lab.rundir / f'dnsmasq-{role}.pid'}",
        "--log-facility=-", "--cache-size=0",
        f"--address=/{DNS_NAME}/{DNS_ANSWER4}", f"--address=/{DNS_NAME}/{DNS_ANSWER6}",
        f"--txt-record={DNS_WHOAMI},{role}",
    ]
    return argv + [f"--listen-address={a}" for a in listen]


def _server_tail(lab: Lab, servers: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, s in servers.items():
        proc = _CHILDREN.get(s["pid"])
        rc = proc.poll() if proc else None
        state = "running" if rc is None else f"exited with {rc}"
        try:
            tail = Path(s["log"]).read_text(errors="replace").strip().splitlines()[-5:]
        except OSError:
            tail = []
        lines.append(f"  {name} (pid {s['pid']}, {state}): " + " | ".join(tail))
    return "\n".join(lines)


def _start_servers(lab: Lab, servers: dict[str, dict[str, Any]]) -> None:
    """Start SMTP and DNS servers and wait (bounded) until each answers from its namespace."""
    lab.maildir.mkdir(parents=True, exist_ok=True)
    a = lab.addr
    smtp = [sys.executable, "-m", "xdpzoot", "lab", "smtp", "--maildir", str(lab.maildir)]
    for port in SMTP_PORTS:
        smtp += ["--port", str(port)]
    _start(lab, servers, "smtp-inet", lab.inet, smtp)
    dns_listen = {
        "inet": (lab.inet, (a["inet4"], a["inet6"])),
        "dyn": (lab.dyn, (a["dyn4"], a["dyn6"])),
        "sta": (lab.static, (a["sta4"], a["sta4b"], a["sta4c"], a["sta6"])),
    }
    for role, (ns, listen) in dns_listen.items():
        _start(lab, servers, f"dns-{role}", ns, _dnsmasq_argv(lab, role, listen))

    # Probe each server from inside its own namespace; one waiter process per namespace.
    probes: dict[str, list[str]] = {
        lab.inet: [f"--tcp={h}:{p}" for h in (a["inet4"], a["inet6"], a["relay4"])
                   for p in SMTP_PORTS],
    }
    for ns, listen in dns_listen.values():
        probes.setdefault(ns, []).extend(f"--dns={h}" for h in listen)
    waiters = {
        ns: subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "xdpzoot", "lab",
                              "wait", f"--timeout={SERVER_TIMEOUT}", *args],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=_pkg_env())
        for ns, args in probes.items()
    }
    failures = []
    for ns, w in waiters.items():
        try:
            out, _ = w.communicate(timeout=SERVER_TIMEOUT + 30)   # the waiter's own start
        except subprocess.TimeoutExpired:
            w.kill()
            out, _ = w.communicate()
        if w.returncode != 0:
            failures.append(f"  {ns}: {out.decode(errors='replace').strip()}")
    if failures:
        raise RuntimeError("lab: servers did not become ready:\n" + "\n".join(failures)
                           + "\nserver logs:\n" + _server_tail(lab, servers))


# ----------------------------------------------------------------------------- up and down


def lab_up(prefix: str | None = None, servers: bool = True) -> Lab:
    """Build the lab (and start its servers) and return it; tear down and re-raise on failure.

    ``prefix`` defaults to "xz" and four random hex digits.  A lab that already exists under
    ``prefix`` is left alone: FileExistsError.
    """
    if prefix is None:
        existing = _netns_names()
        while True:
            prefix = "xz" + secrets.token_hex(2)
            if not any(f"{prefix}-{r}" in existing for r in _ROLES) and \
                    not (RUN_ROOT / prefix).exists():
                break
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"lab: bad prefix {prefix!r}: want 2-12 of [a-z0-9], starting a-z")
    if lab_exists(prefix) or (RUN_ROOT / prefix).exists():
        raise FileExistsError(f"lab: {prefix} already exists (lab_down({prefix!r}) removes it)")

    lab = _lab_for(prefix)
    lab.rundir.mkdir(parents=True)
    started: dict[str, dict[str, Any]] = {}
    try:
        _write_state(lab, started)
        _write_config(lab)
        lab.bpffs.mkdir()
        _run(["mount", "-t", "bpf", "bpf", str(lab.bpffs)], timeout=10)
        _build_network(lab)
        if servers:
            _start_servers(lab, started)
    except BaseException:
        lab_down(prefix)
        raise
    return lab


LAB_SUBSCRIBERS = """\
subscriber,address,type,up_kbps,down_kbps,flags
100,100.64.1.0/24,dynamic,,,
100,2001:db8:1::/64,dynamic,,,
200,198.51.100.8/29,static,100000,100000,
200,2001:db8:2::/64,static,100000,100000,
"""

LAB_CONFIG = """\
# xdpzoot config for lab {prefix}: written by `xdpzoot lab up`.
[interfaces]
access = ["acc-dyn", "acc-sta"]
core = ["core0"]
[op25b]
action = "{action}"
allow = ["192.0.2.25/32", "2001:db8:ff::25/128"]   # the lab's mail relay
[suspend]
allow = ["192.0.2.80/32", "2001:db8:ff::80/128"]   # the lab's support site
[bandwidth]
state = "{directory}/state.msgpack"
audit = "{directory}/audit.jsonl"
[sources]
subscribers = "{subscribers}"
"""


def lab_config(lab: Lab, directory: Path, action: str = "drop", extra: str = "") -> Path:
    """Write a config and subscriber file that fit the lab into ``directory``; returns the
    config's path. ``extra`` is appended TOML (more sections)."""
    subs = directory / "subscribers.csv"
    subs.write_text(LAB_SUBSCRIBERS)
    cfg = directory / "xdpzoot.toml"
    cfg.write_text(LAB_CONFIG.format(prefix=lab.prefix, subscribers=subs, action=action,
                                     directory=directory) + extra)
    return cfg


def _write_config(lab: Lab) -> None:
    """The lab's own config, for people trying it by hand."""
    lab_config(lab, lab.rundir)


def _netns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def _pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _pid_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs; reaps it first if it is our child."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return False
        _CHILDREN.pop(pid, None)
        return True
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie of somebody else's: it runs no more.
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _stop_pids(pids: Iterator[int] | Sequence[int]) -> None:
    """SIGTERM, then SIGKILL, each with a bounded wait; raise if a process survives both."""
    pids = [p for p in dict.fromkeys(pids) if p > 1 and p != os.getpid()]
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        alive = [p for p in pids if not _pid_gone(p)]
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda a=alive: all(_pid_gone(p) for p in a), wait, "servers to stop")
    left = [p for p in pids if not _pid_gone(p)]
    if left:
        raise RuntimeError(f"lab: processes {left} survived SIGKILL")


def lab_down(prefix: str) -> None:
    """Stop the lab's servers (by pid) and delete its namespaces and runtime directory.

    Idempotent.  Only the lab's own processes are signalled: the pids from the state file, each
    checked to run inside one of the lab's namespaces or to name the lab's runtime directory on
    its command line (so a reused pid is left alone), and whatever else is still inside those
    namespaces (a test's stray client).
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"lab: bad prefix {prefix!r}")
    names = [f"{prefix}-{r}" for r in _ROLES]
    inodes = {i for i in (_netns_inode(n) for n in names) if i is not None}
    pids: list[int] = []
    for s in lab_servers(prefix).values():
        pid = int(s["pid"])
        # Every server names the runtime directory in its argv (maildir, pid file): that also
        # finds one whose namespace name is already gone or which is still `ip netns exec`.
        if (pid in _CHILDREN or _pid_netns_inode(pid) in inodes
                or str(RUN_ROOT / prefix) + "/" in _pid_cmdline(pid)):
            pids.append(pid)
    existing = _netns_names()
    for ns in names:
        if ns in existing:
            out = _run(["ip", "netns", "pids", ns], timeout=10, check=False).stdout
            pids.extend(int(x) for x in out.split() if x.isdigit())
    _stop_pids(pids)
    for ns in names:
        if ns in existing:
            _run(["ip", "netns", "delete", ns], timeout=10, check=False)
    left = [ns for ns in names if ns in _netns_names()]
    if os.path.ismount(RUN_ROOT / prefix / "bpf"):
        _run(["umount", "-l", str(RUN_ROOT / prefix / "bpf")], timeout=10, check=False)
    shutil.rmtree(RUN_ROOT / prefix, ignore_errors=True)
    if left:
        raise RuntimeError(f"lab: could not delete namespaces {left}")


# ----------------------------------------------------------------------------- maildir



@contextlib.contextmanager
def lab_running(tag: str, servers: bool = True) -> Iterator[Lab]:
    """A lab named ``tag`` + random hex for the block (tests, benchmarks), taken down
    afterwards whatever happens, a half-built one included."""
    prefix = tag + secrets.token_hex(3)
    try:
        yield lab_up(prefix, servers)
    finally:
        lab_down(prefix)


# ----------------------------------------------------------------------------- the router


class LabRouter:
    """The xdpzoot CLI run in a lab's router namespace as an operator runs it: a config in
    ``workdir`` and a pin directory on the lab's BPF filesystem. Subclasses write a config
    of their own (``write_config``); this one writes lab_config's."""

    def __init__(self, lab: Lab, workdir: Path):
        self.lab, self.workdir = lab, workdir
        self.pin_dir = str(lab.bpffs / "xdpzoot")
        self.config = workdir / "xdpzoot.toml"
        self.attached: dict[str, Any] | None = None   # the attach report of router_running

    def write_config(self) -> None:
        lab_config(self.lab, self.workdir)

    def argv(self, *args: str, config: Path | None = None) -> list[str]:
        """The command line for ``args``: this package's CLI (the checkout's, whatever is
        installed)."""
        return ["env", "PYTHONPATH=" + _pkg_env()["PYTHONPATH"], sys.executable, "-m",
                "xdpzoot", "--config", str(config or self.config), "--pin-dir", self.pin_dir,
                *args]

    # Seconds a command may take (an attach compiles: 10-20 s here); ten times that under
    # `make vmtest`, where a bcc compile under emulation takes minutes.
    timeout = 600 if os.environ.get("XZ_VMTEST") else 60

    def cli(self, *args: str, check: bool = True, config: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        return netns_run(self.lab.router, *self.argv(*args, config=config),
                         timeout=self.timeout, check=check)

    def json(self, *args: str, config: Path | None = None) -> Any:
        return json.loads(self.cli(*args, "--json", config=config).stdout)

    def attach(self, hook: str, mode: str | None = None) -> dict[str, Any]:
        """Attach at ``hook`` (replacing what is attached in place); the attach report."""
        return self.json("attach", "--hook", hook, *(("--mode", mode) if mode else ()))


@contextlib.contextmanager
def xdp_pass_on_peers(lab: Lab) -> Iterator[None]:
    """Native XDP_TX on a veth, or a redirect into one, reaches the peer only if the peer
    runs XDP too: give the lab hosts' ends an XDP_PASS program (a real NIC would not need
    it). Gone with the namespaces; the pin is removed at the end."""
    from bcc import BPF

    from xdpzoot.dataplane import kernel

    prog = BPF(text=b"int pass(struct xdp_md *c) { return XDP_PASS; }")
    pin = str(lab.bpffs / "xdp-pass")
    kernel.pin(prog.load_func(b"pass", BPF.XDP).fd, pin)
    try:
        for ns in (lab.dyn, lab.static, lab.inet):
            netns_run(ns, "ip", "link", "set", "dev", "eth0", "xdpdrv", "pinned", pin)
        yield
    finally:
        os.unlink(pin)


@contextlib.contextmanager
def router_running(router: LabRouter, hook: str | None = None, mode: str | None = None,
                   xdp_peers: bool = False) -> Iterator[LabRouter]:
    """``router`` for a block (a test module, a benchmark): its config written, attached at
    ``hook`` (and ``mode``) when given, its attach report in ``router.attached``, the hosts
    running XDP_PASS when ``xdp_peers`` (xdp_pass_on_peers); detached afterwards whatever
    happens."""
    router.write_config()
    with xdp_pass_on_peers(router.lab) if xdp_peers else contextlib.nullcontext():
        try:
            if hook:
                router.attached = router.attach(hook, mode)
            yield router
        finally:
            router.cli("detach", check=False)

def read_maildir(lab: Lab) -> list[dict[str, Any]]:
    """Every message the SMTP sink accepted, oldest first.

    Each entry: ``file``, ``peer`` (client address, IPv4 unmapped), ``port`` (25 or 587),
    ``mail_from``, ``rcpt_tos`` and ``data`` (the message text).
    """
    out = []
    if not lab.maildir.is_dir():
        return out
    for f in sorted(lab.maildir.glob("*.json")):
        entry = json.loads(f.read_text())
        entry["file"] = str(f)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- servers' side


def _unmap(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


def serve_smtp(ports: Sequence[int], maildir: Path) -> None:
    """Run an SMTP sink on ``ports`` (all addresses, IPv4 and IPv6) until SIGTERM.

    Each accepted message becomes one JSON file in ``maildir``, written before the server says
    250, so a client that got 250 finds its file there.
    """
    import asyncio
    import uuid

    from aiosmtpd.smtp import SMTP, Envelope, Session

    maildir.mkdir(parents=True, exist_ok=True)

    class Sink:
        async def handle_DATA(self, server: SMTP, session: Session,
                              envelope: Envelope) -> str:
            sock = server.transport.get_extra_info("sockname") if server.transport else None
            content = envelope.content or b""
            entry = {
                "time": time.time(),
                "peer": _unmap(str(session.peer[0])) if session.peer else None,
                "port": sock[1] if sock else None,
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "data": content.decode("utf-8", "replace") if isinstance(content, bytes)
                else content,
            }
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
            tmp = maildir / f".{name}.tmp"
            tmp.write_text(json.dumps(entry))
            tmp.replace(maildir / f"{name}.json")
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        handler = Sink()
        servers = []
        for port in ports:
            # host=None binds every address of both families (one socket each).
            servers.append(await loop.create_server(
                lambda: SMTP(handler, hostname="inet.lab.test", ident="xdpzoot-lab"),
                host=None, port=port, reuse_address=True))
        print(f"smtp: listening on ports {list(ports)}, maildir {maildir}", flush=True)
        await stop.wait()
        for s in servers:
            s.close()

    asyncio.run(main())


def wait_ready(tcp: Sequence[str], resolvers: Sequence[str], timeout: float) -> list[str]:
    """Wait until each ``host:port`` accepts TCP and each DNS server answers; return failures."""
    import socket

    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    def tcp_ok(target: str) -> bool:
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return True
        except OSError:
            return False

    def dns_ok(server: str) -> bool:
        q = dns.message.make_query(DNS_NAME, dns.rdatatype.A)
        try:
            r = dns.query.udp(q, server, timeout=0.5)
        except (OSError, dns.exception.DNSException):
            return False
        return any(DNS_ANSWER4 in rr.to_text() for rr in r.answer)

    checks = [(f"tcp {t}", lambda t=t: tcp_ok(t)) for t in tcp]
    checks += [(f"dns {s}", lambda s=s: dns_ok(s)) for s in resolvers]
    deadline = time.monotonic() + timeout
    pending = list(checks)
    while pending:
        pending = [(n, c) for n, c in pending if not c()]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return [n for n, _ in pending]
