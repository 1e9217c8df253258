"""Attach, replace, inspect and detach the data plane of one xdpzoot instance.

An instance is its pin directory: maps and programs are pinned there, and the
kernel itself says which interface carries which of our programs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from xdpzoot import sync, tables
from xdpzoot.dataplane import kernel, schema


@dataclass(frozen=True)
class Attachment:
    """One of our programs on an interface."""

    ifname: str
    role: str
    hook: str
    mode: str   # XDP: native | generic; TC: clsact


def tc_tag(pin_dir: str, role: str) -> str:
    """Name of our TC filter: says role and instance (a digest of the pin directory)."""
    digest = hashlib.sha1(pin_dir.encode()).hexdigest()[:8]
    return f"xdpzoot-{role}-{digest}"


def _prog_pin(pin_dir: str, hook: str, role: str) -> str:
    return os.path.join(pin_dir, f"prog_{hook}_{role}")


def _our_xdp_ids(pin_dir: str) -> dict[int, str]:
    """Program id -> role for the XDP programs pinned by this instance."""
    out = {}
    for role in ("access", "core"):
        pid = kernel.pinned_prog_id(_prog_pin(pin_dir, "xdp", role))
        if pid is not None:
            out[pid] = role
    return out


def attachments(pin_dir: str) -> list[Attachment]:
    """Where this instance's programs are attached, as the kernel tells it."""
    from xdpzoot.dataplane import netlink

    xdp_ids = _our_xdp_ids(pin_dir)
    tags = {tc_tag(pin_dir, r): r for r in ("access", "core")}
    out = []
    for name, st, tag in netlink.programs():
        if st.prog_id in xdp_ids:
            out.append(Attachment(name, xdp_ids[st.prog_id], "xdp", st.mode or "?"))
        if tag in tags:
            out.append(Attachment(name, tags[tag], "tc", "clsact"))
    return out


def interfaces(pin_dir: str, names: list[str]) -> dict[str, tuple[Attachment | None, dict]]:
    """For each of ``names`` that exists: this instance's program on it (None: none of
    ours) and the interface's own counters (netlink.LinkReport.stats). Asks the kernel
    about these interfaces only (the metrics ask at every scrape)."""
    from xdpzoot.dataplane import netlink

    xdp_ids = _our_xdp_ids(pin_dir)
    tags = {tc_tag(pin_dir, r): r for r in ("access", "core")}
    out = {}
    for name, r in netlink.link_reports(names).items():
        att = None
        if r.xdp.prog_id in xdp_ids:
            att = Attachment(name, xdp_ids[r.xdp.prog_id], "xdp", r.xdp.mode or "?")
        elif r.tc_filter in tags:
            att = Attachment(name, tags[r.tc_filter], "tc", "clsact")
        out[name] = (att, r.stats)
    return out


def configure(maps: kernel.Maps, cfg) -> None:
    """Write the config's switches and allow-lists into the maps (under the instance's
    lock: the control value is read, changed and written back)."""
    sync.apply_allow(maps, tables.allow_table(cfg.op25b.allow, cfg.suspend.allow))
    maps.set_control_params(**tables.control_params(cfg),
                            congestion=tables.CONGESTION[cfg.bandwidth.congestion])
    if not maps.control_params()["tick_ns"]:   # once per instance: it takes 0.1 s
        maps.set_control_params(tick_ns=kernel.tick_ns())
    # Kept: the daemon's throttle switch, a running trace's (`xdpzoot trace`).
    keep = schema.C["XZ_C_THROTTLES"] | schema.C["XZ_C_TRACE"] | schema.C["XZ_C_TRACE_ADDRS"]
    flags = tables.control_flags(cfg) | (maps.control_flags() & keep)
    if cfg.bandwidth.congestion == "auto":   # the daemon decides: keep what is in force
        flags |= maps.control_flags() & schema.C["XZ_C_CONGESTION"]
    maps.set_control_flags(flags)


def check_kernel() -> None:
    """Refuse, in one line naming what is missing and the minimum version, a kernel without
    a map type, helper or operation the programs need: before anything is compiled, pinned
    or attached (the CLI asks before it even opens the instance)."""
    kernel.require_kernel()


def attach(cfg, maps: kernel.Maps, access: list[str], core: list[str], hook: str = "xdp",
           mode: str = "auto") -> list[Attachment]:
    """Compile, load and attach; replaces a running instance atomically per interface,
    keeps the pinned maps and their contents, and takes our programs off interfaces
    that are no longer named. The caller holds the instance's lock (Instance.attach)."""
    from xdpzoot.dataplane import netlink

    for name in access + core:
        if name in ("lo",) or name.startswith("ifb"):
            raise kernel.KernelError(f"refusing to attach to {name}")
    overlap = set(access) & set(core)
    if overlap:
        raise kernel.KernelError(f"interface in both roles: {', '.join(sorted(overlap))}")
    check_kernel()   # not a verifier dump on a kernel without what the programs need
    pin_dir = maps.pin_dir
    missing = sorted(set(access + core) - set(netlink.link_table(access + core)))
    if missing:   # before anything changes: the maps stay as they are
        raise kernel.KernelError(f"no such interface: {', '.join(missing)}")
    before = attachments(pin_dir) if kernel.pinned(pin_dir) else []
    bpf = kernel.compile_bpf(pin_dir, cfg.defines())   # creates the maps that are missing
    maps.close()   # opened again from the pins, the new ones included
    configure(maps, cfg)
    # Before the programs: they find their egress at once.
    set_egress(maps, access + core, cfg.interfaces.vmacs)
    wanted = {n: "access" for n in access} | {n: "core" for n in core}
    done: list[Attachment] = []
    for role in ("access", "core"):
        names = [n for n, r in wanted.items() if r == role]
        if not names:
            continue
        fd = kernel.load_program(bpf, hook, role)
        for name in names:
            if hook == "xdp":
                # Switching hook: the new program is in place before the old one goes.
                # Switching XDP mode is a detach, then an attach (one mode per interface
                # at a time): our TC program holds the policy in between (a packet may
                # then be counted twice, never let through).
                bridge = _mode_changes(name, mode)
                if bridge:
                    netlink.attach_tc(name, kernel.load_program(bpf, "tc", role),
                                      tc_tag(pin_dir, role))
                used = netlink.attach_xdp(name, fd, mode)
                if bridge:
                    netlink.detach_tc(name)
                done.append(Attachment(name, role, "xdp", used))
            else:
                netlink.attach_tc(name, fd, tc_tag(pin_dir, role))
                done.append(Attachment(name, role, "tc", "clsact"))
        kernel.pin(fd, _prog_pin(pin_dir, hook, role))
    keep = {(a.ifname, a.hook) for a in done}
    for a in before:
        if (a.ifname, a.hook) not in keep:
            _detach_one(a)
    return done


def _mode_changes(name: str, mode: str) -> bool:
    """True when attaching XDP in ``mode`` to ``name`` takes its XDP program off first."""
    from xdpzoot.dataplane import netlink

    current = netlink.xdp_state(name).mode
    return current is not None and mode != "auto" and current != mode


def set_egress(maps: kernel.Maps, names: list[str], vmacs: list[str] | tuple = ()
               ) -> list[str]:
    """Make the fast path's devmap hold the router's interfaces ``names`` (and no other),
    with their MAC addresses (what a frame it forwards is addressed to), and those of the
    interfaces of ``vmacs`` that are up (VRRP virtual MACs: macvlans) as their lower
    interface's (XZ_FAST_MACS - 1 of them at most an interface; a macvlan's frames are
    routed as from it, so one whose ifindex does not fit the table's two bytes is left out);
    returns the names left out (Maps.set_fast_ifs: an ifindex beyond the devmap,
    limits.ifindexes, or no Ethernet address): what is routed out of them goes through the
    kernel (counted as ``egress``), as does what comes in by them (``other_host``)."""
    from xdpzoot.dataplane import netlink

    def rpf(link: netlink.Link) -> int:
        """Its reverse path filter for the fast path: the kernel's, but a member of a VRF
        (any link under a master) with one on is left to the kernel (its own routes)."""
        return schema.C["XZ_RPF_KERNEL"] if link.rpf and link.master else link.rpf

    found = netlink.link_table(names + [v for v in vmacs if v not in names])
    macs = {found[n].index: [(found[n].mac, 0, rpf(found[n]))] for n in names if n in found}
    for v in vmacs:
        link = found.get(v)
        if (link and link.kind == "macvlan" and link.up and link.mac and link.lower in macs
                and link.index <= 0xFFFF
                and link.mac not in (m for m, _, _ in macs[link.lower])):
            macs[link.lower].append((link.mac, link.index, rpf(link)))
    by_index = {found[n].index: n for n in names if n in found}
    return [by_index[i] for i in maps.set_fast_ifs(macs)]


RPF_LABELS = {schema.C["XZ_RPF_STRICT"]: "strict", schema.C["XZ_RPF_LOOSE"]: "loose",
              schema.C["XZ_RPF_KERNEL"]: "kernel"}


def fast_path(maps: kernel.Maps) -> dict:
    """The fast path for `status` and `stats`: its switch, its egress interfaces (names, as
    this namespace has them), the VRRP virtual MACs it takes on them, the reverse path
    filter of the interfaces its frames come in by (those with one: strict or loose,
    checked by the fast path; kernel, left to the kernel), and its counters by reason."""
    from xdpzoot.dataplane import netlink

    ifs, macs = maps.fast_ifs(), maps.fast_macs()
    rpf = {v or i: r for i in ifs for _, v, r in macs[i] if r}
    names = netlink.link_names(sorted(set(ifs) | set(rpf)))

    def name(i: int) -> str:
        return names.get(i, f"ifindex {i}")

    return {"enabled": bool(maps.control_flags() & schema.C["XZ_C_FAST_PATH"]),
            "egress": [name(i) for i in ifs],
            "virtual_macs": {name(i): [m.hex(":") for m, _, _ in macs[i][1:]]
                             for i in ifs if macs[i][1:]},
            "rp_filter": {name(i): RPF_LABELS[r] for i, r in sorted(rpf.items())},
            "counters": {r: {"packets": p, "bytes": b}
                         for r, (p, b) in maps.fast_counters().items()}}


def vmacs_left_out(fast: dict, vmacs: list[str] | tuple) -> list[str]:
    """Those of ``vmacs`` ([interfaces] vmacs) whose MAC address the fast path does not take
    (``fast``: as fast_path read it): absent, down, not a macvlan on one of its interfaces,
    past the XZ_FAST_MACS - 1 an interface holds, or an ifindex above 65535."""
    from xdpzoot.dataplane import netlink

    taken = {m for macs in fast["virtual_macs"].values() for m in macs}
    found = netlink.link_table(list(vmacs))
    return [v for v in vmacs if v not in found or found[v].mac.hex(":") not in taken]


def _detach_one(a: Attachment) -> None:
    from xdpzoot.dataplane import netlink

    if a.hook == "xdp":
        netlink.detach_xdp(a.ifname)
    else:
        netlink.detach_tc(a.ifname)


def detach(pin_dir: str) -> list[Attachment]:
    """Take every program of this instance off its interfaces and remove the pins."""
    gone = attachments(pin_dir)
    for a in gone:
        _detach_one(a)
    kernel.unpin_all(pin_dir)
    return gone
