#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""The kernel matrix: boot a Debian kernel in a VM with virtme-ng and run the kernel-sensitive
tests (tests/kernel_matrix.txt) inside it, against this checkout.

    make vmtest KERNEL=6.1        # Debian 12's kernel (the newest 6.1.0-N-amd64)
    make vmtest KERNEL=6.12       # bookworm-backports' 6.12 (the kernel of Debian 13 too)
    make vmtest KERNEL=running    # the matrix on the running kernel, without a VM
    make vmtest KERNEL=6.1.0-57-amd64 VMTEST_ARGS="--tests tests/test_bpf.py"

As root. On first use it installs what it needs and keeps it under the cache directory
(XZ_VMTEST_CACHE, default /var/cache/xdpzoot-vmtest): qemu-system-x86, kmod and
busybox-static from Debian; virtme-ng from the package index in a venv of its own; the
kernel's image and headers packages (`apt-get download`, with apt lists of its own for
bookworm, bookworm-backports, trixie and bookworm-security: the host's apt sources are not
changed), unpacked with `dpkg -x`. The guest sees the host's files read-only (9p), this
checkout as an overlay (its writes stay in the VM), the unpacked kernel's modules at
/lib/modules/<version> with `build` and `source` pointing at its headers (what bcc compiles
against), and the run's output directory read-write. KVM when /dev/kvm boots a guest, TCG
otherwise (slow: see the README's kernel matrix). `make setup` needs none of this.

The same file runs inside the guest (`guest`): it runs pytest and writes the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "tests" / "kernel_matrix.txt"
CACHE = Path(os.environ.get("XZ_VMTEST_CACHE", "/var/cache/xdpzoot-vmtest"))
VIRTME_NG = "virtme-ng==1.42"
# Debian packages the host needs: qemu; depmod for virtme-ng; its initramfs wants a static
# busybox; `file` reads the kernel's version.
HOST_PKGS = ("qemu-system-x86", "kmod", "busybox-static", "file")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = (("debian", "bookworm"), ("debian", "bookworm-backports"), ("debian", "trixie"),
          ("debian-security", "bookworm-security"))
# KERNEL=<alias>: the newest image package whose name matches.
ALIASES = {
    "6.1": r"linux-image-(6\.1\.0-\d+-amd64)",             # Debian 12
    "6.12": r"linux-image-(6\.12\.\d+\+deb12-amd64)",       # bookworm-backports
    "6.12-trixie": r"linux-image-(6\.12\.\d+\+deb13-amd64)",  # Debian 13
}
MEMORY = "4G"
CPUS = 2


def log(msg: str) -> None:
    print(f"vmtest: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def fmt_s(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ---- the selection ---------------------------------------------------------------------------


def read_matrix(path: Path = MATRIX) -> dict[str, list[str]]:
    """Part name -> its lines (files or file::test), in order."""
    parts: dict[str, list[str]] = {}
    cur = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            cur = parts.setdefault(m.group(1), [])
        elif cur is None:
            raise ValueError(f"{path}: {line}: before the first [part]")
        else:
            cur.append(line)
    return parts


def part_of(nodeid: str, parts: dict[str, list[str]]) -> str | None:
    """Which part a test (its node id, parameters included) belongs to."""
    base = nodeid.split("[", 1)[0]
    for name, lines in parts.items():
        for line in lines:
            if base == line or ("::" not in line and base.startswith(line + "::")):
                return name
    return None


# ---- host: what the VM needs -----------------------------------------------------------------


def _installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                       text=True)
    return "install ok installed" in r.stdout


def ensure_host_tools() -> Path:
    """The Debian packages and virtme-ng's venv; returns the venv's bin directory."""
    missing = [p for p in HOST_PKGS if not _installed(p)]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
            stdout=subprocess.DEVNULL)
    venv = CACHE / "venv"
    vng = venv / "bin" / "vng"
    if not vng.exists():
        log(f"installing {VIRTME_NG} into {venv}")
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
             VIRTME_NG])
    return vng.parent


def _apt_opts() -> list[str]:
    d = CACHE / "apt"
    return ["-o", f"Dir::Etc::SourceList={d}/sources.list",
            "-o", f"Dir::Etc::SourceParts={d}/empty.d", "-o", f"Dir::State::Lists={d}/lists",
            "-o", f"Dir::Cache::Archives={d}/archives", "-o", f"Dir::Cache={d}/cache",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", f"Dir::Etc::PreferencesParts={d}/empty.d"]


def apt_lists(max_age_s: float = 86400) -> None:
    """apt lists of our own for the suites that carry the kernels, refreshed daily."""
    d = CACHE / "apt"
    for sub in ("lists/partial", "archives/partial", "cache", "empty.d"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "sources.list").write_text("".join(
        f"deb [signed-by={KEYRING}] http://deb.debian.org/{repo} {suite} main\n"
        for repo, suite in SUITES))
    stamp = d / "updated"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < max_age_s:
        return
    log("apt-get update (the kernel suites, in the cache's own lists)")
    run(["apt-get", *_apt_opts(), "update", "-qq"])
    stamp.touch()


def apt_cache(*args: str) -> str:
    return run(["apt-cache", *_apt_opts(), *args], capture_output=True, text=True).stdout


def _version_key(v: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)]


def resolve(kernel: str) -> str:
    """A KERNEL= value -> the kernel's version as `uname -r` says it (6.1.0-57-amd64)."""
    if kernel in ALIASES:
        pat = re.compile(ALIASES[kernel])
        names = apt_cache("pkgnames", "linux-image-6.").split()
        found = sorted((m.group(1) for n in names if (m := pat.fullmatch(n))), key=_version_key)
        if not found:
            raise SystemExit(f"vmtest: no package matches {pat.pattern}")
        return found[-1]
    if not apt_cache("pkgnames", f"linux-image-{kernel}").split():
        raise SystemExit(f"vmtest: no package linux-image-{kernel} (KERNEL=6.1, 6.12, "
                         "6.12-trixie, running, or a version such as 6.1.0-57-amd64)")
    return kernel


def fetch_kernel(kver: str) -> Path:
    """The kernel's image, modules and headers unpacked under the cache; returns its root."""
    root = CACHE / "k" / kver
    done = root / ".xdpzoot-ready"
    if done.exists():
        return root
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    show = apt_cache("show", f"linux-headers-{kver}")
    common = re.search(r"(linux-headers-[^ ,]+-common)\b", show)
    pkgs = [f"linux-image-{kver}", f"linux-headers-{kver}"] + ([common.group(1)] if common
                                                                else [])
    log(f"downloading {' '.join(pkgs)}")
    for f in debs.glob("*.deb"):
        if f.name.startswith(tuple(p + "_" for p in pkgs)):
            f.unlink()   # a partial download of an earlier run
    # apt's sandbox user cannot write to root's cache: download as root, no warning.
    run(["apt-get", *_apt_opts(), "-o", "APT::Sandbox::User=root", "download", "-q", *pkgs],
        cwd=debs, stdout=subprocess.DEVNULL)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for p in pkgs:
        (deb,) = debs.glob(f"{p}_*.deb")
        run(["dpkg", "-x", str(deb), str(root)])
    mods = root / "lib" / "modules" / kver
    src = root / "usr" / "src"
    hdr = src / f"linux-headers-{kver}"
    # The packages point at /usr/src/...: the guest finds them under the cache instead.
    (mods / "build").unlink(missing_ok=True)
    (mods / "build").symlink_to(hdr)
    commons = sorted(src.glob("linux-headers-*-common"))
    if commons:
        (mods / "source").unlink(missing_ok=True)
        (mods / "source").symlink_to(commons[-1])
        mk = hdr / "Makefile"
        mk.write_text(mk.read_text().replace("include /usr/src/", f"include {src}/"))
    run(["depmod", "-a", "-b", str(root), kver])
    done.touch()
    log(f"kernel {kver} unpacked in {root}")
    return root


# ---- host: the VM ----------------------------------------------------------------------------


def vng_cmd(vbin: Path, kroot: Path, kver: str, out: Path, kvm: bool, command: str,
            cpus: int = CPUS) -> list[str]:
    return [str(vbin / "vng"), "--run", str(kroot / "boot" / f"vmlinuz-{kver}"),
            "--force-9p",   # Debian 12's virtiofsd is not the one virtme-ng drives
            *([] if kvm else ["--disable-kvm"]), "--cpus", str(cpus), "--memory", MEMORY,
            "--rodir", str(CACHE),   # the guest's /var/cache is a tmpfs of its own
            "--rwdir", str(out), "--overlay-rwdir", str(ROOT),
            "--cwd", str(ROOT), "--verbose", "--exec", command]


def kvm_works(vbin: Path, kroot: Path, kver: str, out: Path, timeout: float = 90
              ) -> tuple[bool, str]:
    """Whether a KVM guest boots within ``timeout`` seconds (a read-write /dev/kvm is not
    enough: nested setups can refuse the CPU model), and what happened if not."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    ok = out / "kvm-ok"
    ok.unlink(missing_ok=True)
    # A group of its own, ended whole: on a timeout, ending vng alone left virtme-run and
    # a qemu that never booted running on a CPU each, for good.
    proc = subprocess.Popen(vng_cmd(vbin, kroot, kver, out, True, f"touch {ok}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, PATH=f"{vbin}:{os.environ['PATH']}"))
    try:
        _, err = proc.communicate(timeout=timeout)
        why = (err.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        why = f"no guest within {timeout:g} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return ok.exists(), why


def boot(args, kver: str) -> int:
    vbin = ensure_host_tools()
    kroot = fetch_kernel(kver)
    out = Path(args.out or f"/tmp/xdpzoot-vmtest/{kver}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.tcg:
        kvm, why = False, "TCG asked for"
    else:
        kvm, why = kvm_works(vbin, kroot, kver, out)
    accel = "KVM" if kvm else "TCG"
    log(f"{kver}: {accel}" + ("" if kvm else f" ({why})") + f"; output in {out}")
    inner = [sys.executable if args.guest_python is None else args.guest_python,
             str(Path(__file__).resolve()), "guest", "--out", str(out), "--python", args.python,
             "--kmods", str(kroot / "lib" / "modules" / kver), "--accel", accel]
    if args.tests:
        inner += ["--tests", args.tests]
    if args.parts:
        inner += ["--parts", args.parts]
    sample = args.sample if args.sample is not None else (0 if kvm else 40)
    inner += ["--sample", str(sample)]
    # The guest's console carries the kernel's messages; the tests write to out/pytest.log.
    console = open(out / "console.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(vng_cmd(vbin, kroot, kver, out, kvm, shlex.join(inner),
                                    cpus=args.cpus),
                            stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PATH=f"{vbin}:{os.environ['PATH']}"),
                            start_new_session=True)   # vng, virtme-run and qemu: one group
    log(f"VM (vng) under pid {proc.pid}, its process group {proc.pid}; "
        f"the tests' output: {out / 'pytest.log'}")
    pos = 0
    try:
        while True:
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - t0 > args.timeout:
                log(f"timed out after {fmt_s(args.timeout)}: stopping the VM (process group "
                    f"{proc.pid})")
                break
            pos = _follow(out / "pytest.log", pos, args.quiet)
    finally:
        # The group we made for vng: qemu is in it, not only vng (which would leave qemu
        # running). Nothing else is in it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        console.close()
    _follow(out / "pytest.log", pos, args.quiet)
    total = time.monotonic() - t0
    return report(out, kver, accel, total)


def _follow(path: Path, pos: int, quiet: bool) -> int:
    """Print what the guest added to its log since ``pos``."""
    if not path.exists():
        return pos
    with open(path, "rb") as f:
        f.seek(pos)
        data = f.read()
    if data and not quiet:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return pos + len(data)


def report(out: Path, kver: str, accel: str, total: float) -> int:
    """The result line (and out/result.json) from what the guest wrote."""
    res_path = out / "result.json"
    if not res_path.exists():
        log(f"RESULT {kver} ({accel}): no result: the guest did not finish "
            f"({fmt_s(total)}); see {out / 'console.log'}")
        return 1
    res = json.loads(res_path.read_text())
    res.update(kernel_total_s=round(total, 1), accel=accel)
    res_path.write_text(json.dumps(res, indent=1) + "\n")
    parts = "; ".join(
        f"{name} {p['passed']}/{p['tests']}" + (f" ({p['failed']} failed)" if p["failed"] else "")
        + (f" ({p['skipped']} skipped)" if p["skipped"] else "") + f" {fmt_s(p['seconds'])}"
        for name, p in res["parts"].items())
    t = res["totals"]
    todo = f" | NOT RUN: {', '.join(res['todo'])}" if res.get("todo") else ""
    if res.get("sample"):
        todo += f" | table rows sampled: {res['sample']} per test function"
    log(f"RESULT {res['kernel']} ({accel}, {res['cpus']} CPUs): {t['passed']} passed, "
        f"{t['failed']} failed, {t['skipped']} skipped; {fmt_s(total)} in all "
        f"(tests {fmt_s(res['pytest_s'])}) | {parts}{todo}")
    return 0 if res["rc"] == 0 and not res.get("todo") else 1


# ---- guest (or the running kernel): the tests -------------------------------------------------


def guest(args) -> int:
    """Run the matrix, one pytest per part (so that each part has its time, and what is
    done is reported if the VM is stopped later), or the pytest arguments of --tests."""
    out = Path(args.out)
    kver = os.uname().release
    if args.kmods:   # virtme-ng's own link is not always made; this one is
        link = Path("/lib/modules") / kver
        if not link.exists():
            link.symlink_to(args.kmods)
    parts = read_matrix()
    runs = ([("tests", args.tests.split())] if args.tests else
            [(n, sel) for n, sel in parts.items() if not args.parts or n in args.parts])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), XZ_VMTEST=args.accel,
               XZ_VMTEST_SAMPLE=str(args.sample))
    rc, took, junits = 0, {}, []
    for name, selection in runs:
        junit = out / f"junit-{name}.xml"
        junits.append(junit)
        cmd = [args.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
               "--durations=10", f"--junitxml={junit}", *selection]
        t0 = time.monotonic()
        with open(out / "pytest.log", "ab") as logf:
            logf.write(f"\n[{name}] $ {shlex.join(cmd)}\n".encode())
            logf.flush()
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL).returncode
        took[name] = round(time.monotonic() - t0, 1)
        rc = rc or r
        summary = summarize(junits, parts)
        for part, secs in took.items():   # a part's time: its pytest run, start-up included
            if part in summary["parts"]:
                summary["parts"][part]["seconds"] = secs
        summary.update(kernel=kver, rc=rc, pytest_s=round(sum(took.values()), 1),
                       cpus=os.cpu_count(), accel=args.accel, sample=args.sample,
                       done=list(took), todo=[n for n, _ in runs if n not in took])
        (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rc


def summarize(junits: Path | list[Path], parts: dict[str, list[str]]) -> dict:
    """Tests, passes, failures, skips and seconds per part, from pytest's junit XML."""
    if isinstance(junits, Path):
        junits = [junits]
    per = {name: {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0}
           for name in [*parts, "other"]}
    failed: list[str] = []
    skipped: list[str] = []
    for junit in junits:
        if not junit.exists():
            continue
        for tc in ET.parse(junit).getroot().iter("testcase"):
            cls = tc.get("classname", "")
            mod, _, klass = cls.partition(".Test")   # a test class: tests.test_x.TestY
            nodeid = mod.replace(".", "/") + ".py::" + (f"Test{klass}::" if klass else "") \
                + tc.get("name", "")
            p = per[part_of(nodeid, parts) or "other"]
            p["tests"] += 1
            p["seconds"] += float(tc.get("time", 0))
            if tc.find("failure") is not None or tc.find("error") is not None:
                p["failed"] += 1
                failed.append(nodeid)
            elif tc.find("skipped") is not None:
                p["skipped"] += 1
                skipped.append(f"{nodeid}: {tc.find('skipped').get('message', '')}")
            else:
                p["passed"] += 1
    for p in per.values():
        p["seconds"] = round(p["seconds"], 1)
    if not per["other"]["tests"]:
        del per["other"]
    totals = {k: sum(p[k] for p in per.values()) for k in ("tests", "passed", "failed",
                                                          "skipped")}
    return {"parts": per, "totals": totals, "failed": failed, "skipped": skipped}


def running(args) -> int:
    """The matrix on the running kernel, in this machine (no VM)."""
    kver = os.uname().release
    out = Path(args.out or f"/tmp/xdpzoot-vmtest/{kver}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"{kver}: the running kernel, no VM; output in {out}")
    t0 = time.monotonic()
    gargs = argparse.Namespace(out=str(out), python=args.python, kmods=None, accel="",
                               tests=args.tests, sample=args.sample or 0,
                               parts=args.parts.split(",") if args.parts else None)
    proc_rc = {}

    import threading

    def go():
        proc_rc["rc"] = guest(gargs)

    th = threading.Thread(target=go)
    th.start()
    pos = 0
    while th.is_alive():
        th.join(timeout=5)
        pos = _follow(out / "pytest.log", pos, args.quiet)
    _follow(out / "pytest.log", pos, args.quiet)
    return report(out, kver, "no VM", time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("guest", help="inside the VM: run the tests")
    g.add_argument("--out", required=True)
    g.add_argument("--python", required=True)
    g.add_argument("--kmods")
    g.add_argument("--accel", default="")
    g.add_argument("--tests")
    g.add_argument("--parts", type=lambda v: v.split(","))
    g.add_argument("--sample", type=int, default=0)
    ap.add_argument("--kernel", default="6.1",
                    help="6.1, 6.12, 6.12-trixie, running, or an image version (6.1.0-57-amd64)")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="the project's Python, as the guest runs it (default: .venv's)")
    ap.add_argument("--guest-python", help=argparse.SUPPRESS)
    ap.add_argument("--tests", help="pytest arguments instead of tests/kernel_matrix.txt "
                    "(e.g. 'tests' for the whole suite)")
    ap.add_argument("--parts", help="matrix parts to run, comma-separated (default: all)")
    ap.add_argument("--sample", type=int, help="table rows kept per test function "
                    "(XZ_VMTEST_SAMPLE; default 40 under TCG, every row with KVM or no VM)")
    ap.add_argument("--out", help="output directory (default /tmp/xdpzoot-vmtest/KVER-TIME)")
    ap.add_argument("--tcg", action="store_true", help="do not try KVM")
    ap.add_argument("--cpus", type=int, default=CPUS)
    ap.add_argument("--timeout", type=float, default=4 * 3600,
                    help="seconds before the VM is stopped (default 4 h)")
    ap.add_argument("--quiet", action="store_true", help="only the result line")
    args = ap.parse_args()
    if args.cmd == "guest":
        return guest(args)
    if os.geteuid() != 0:
        raise SystemExit("vmtest: run as root (make vmtest)")
    if not os.path.exists(args.python):
        raise SystemExit(f"vmtest: {args.python} missing: run `make setup` first")
    if args.kernel == "running":
        return running(args)
    ensure_host_tools()
    apt_lists()
    return boot(args, resolve(args.kernel))


if __name__ == "__main__":
    sys.exit(main())
