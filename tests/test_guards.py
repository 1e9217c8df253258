"""Guards against sources that would silently stop the blocking or exhaust the router, on
real pinned maps: an empty or much shorter CSAM list or subscriber file is refused unless
--force (the daemon never forces), a file the maps cannot hold is refused before any write,
and a path that is not a regular file, or is too large, is never read. Every refusal
changes nothing: the maps are compared before and after."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from xdpzoot.daemon import Daemon
from xdpzoot.dataplane import kernel
from xdpzoot.sources.files import SourceError, check_shrink, read_file, read_source

LIMITS = {"hosts": 16, "prefixes": 8, "subscribers": 12, "csam_hosts": 8, "csam_prefixes": 4}
MAPS = ("xz_hosts", "xz_prefixes", "xz_control", "xz_csam_meta", "xz_csam_h0", "xz_csam_h1",
        "xz_csam_p0", "xz_csam_p1")
HEADER = "subscriber,address,type\n"


def hosts_list(n: int, first: int = 1) -> str:
    return "".join(f"192.0.2.{i}\n" for i in range(first, first + n))


def prefixes_list(n: int) -> str:
    return "".join(f"198.51.100.{16 * i}/28\n" for i in range(n))


def subs_file(hosts: int, prefixes: int = 0, first_id: int = 1) -> str:
    """``hosts`` static subscribers of one address, ``prefixes`` dynamic pools."""
    return HEADER + "".join(f"{first_id + i},203.0.113.{i + 1},static\n" for i in range(hosts)) \
        + "".join(f"{500 + i},100.64.{i}.0/24,dynamic\n" for i in range(prefixes))


class Inst:
    """A pin directory with maps sized by LIMITS, and the CLI run against it."""

    def __init__(self, pin: str, d: Path):
        self.pin, self.dir, self.n = pin, d, 0
        self.cfg = d / "xdpzoot.toml"
        self.csam, self.subs = d / "csam.txt", d / "subs.csv"
        self.write_config()

    def write_config(self, extra: str = "") -> None:
        self.cfg.write_text(
            f'[bandwidth]\nstate = "{self.dir}/state.msgpack"\naudit = "{self.dir}/audit.jsonl"\n'
            f'[sources]\nsubscribers = "{self.subs}"\ncsam = "{self.csam}"\n{extra}'
            "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in LIMITS.items()))

    def file(self, text: str) -> str:
        self.n += 1
        p = self.dir / f"f{self.n}"
        p.write_text(text)
        os.chmod(p, 0o600)
        return str(p)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xdpzoot", "--config", str(self.cfg),
                               "--pin-dir", self.pin, *args], capture_output=True, text=True,
                              timeout=120)

    def ok(self, *args: str) -> None:
        r = self.cli(*args)
        assert r.returncode == 0, r.stderr

    def state(self) -> dict[str, list]:
        out = {}
        for name in MAPS:
            with kernel.PinnedMap(os.path.join(self.pin, name)) as m:
                keys, values = m.items()
                vs = m.value_size
                out[name] = sorted((k, values[i * vs:(i + 1) * vs]) for i, k in enumerate(keys))
        return out

    def refused(self, *args: str, says: tuple[str, ...]) -> str:
        """Run a command that must be refused: exit 1, one line naming what ``says`` holds,
        and the maps exactly as they were."""
        before = self.state()
        r = self.cli(*args)
        assert r.returncode == 1, (r.stdout, r.stderr)
        lines = [x for x in r.stderr.splitlines() if not x.startswith("xdpzoot: warning:")]
        assert len(lines) == 1 and lines[0].startswith("xdpzoot: error: "), r.stderr
        for s in says:
            assert s in lines[0], (s, lines[0])
        assert "Traceback" not in r.stderr
        assert self.state() == before
        return lines[0]

    def listed(self) -> int:
        with kernel.Maps(self.pin) as m:
            _, word = m.word()
            meta = m.read_meta(word & 1)
        return sum(meta[k] for k in ("hosts4", "hosts6", "prefixes4", "prefixes6"))


@pytest.fixture
def inst(bpffs, tmp_path):
    pin = os.path.join(bpffs, f"guards-{secrets.token_hex(4)}")
    i = Inst(pin, tmp_path)
    try:
        yield i
    finally:
        kernel.unpin_all(pin)


# ---- a list or subscriber file that would silently stop the blocking ----------------------


def test_csam_list_that_shrinks_too_much_is_refused_unless_forced(inst):
    inst.ok("blocklist", "load", inst.file(hosts_list(6) + prefixes_list(2)))
    assert inst.listed() == 8
    inst.ok("blocklist", "load", inst.file(hosts_list(4) + prefixes_list(2)))   # 25 % fewer
    assert inst.listed() == 6
    # Through the whole parse (first loads) and through the line diff (later ones): both.
    for _ in range(2):
        line = inst.refused("blocklist", "load", inst.file(hosts_list(2)),
                            says=("2 list entries would replace the 6 in force",
                                  "csam.max_shrink = 0.5", "--force"))
        assert "192.0.2" not in line   # counts, never an entry
    for empty in (inst.file(""), inst.file("# nothing listed today\n")):
        inst.refused("blocklist", "load", empty, says=("no list entries", "(now 6)",
                                                       "--force"))
    inst.refused("blocklist", "load", "/dev/null", says=("not a regular file",))
    inst.ok("blocklist", "load", "--force", inst.file(hosts_list(2)))
    assert inst.listed() == 2
    inst.ok("blocklist", "load", "--force", inst.file(""))
    assert inst.listed() == 0
    inst.write_config("[csam]\nmax_shrink = 1.0\n")   # any shrink, but still not to nothing
    inst.ok("blocklist", "load", inst.file(hosts_list(8)))
    inst.ok("blocklist", "load", inst.file(hosts_list(1)))
    inst.refused("blocklist", "load", inst.file("\n"), says=("no list entries",))


def test_subscriber_file_that_shrinks_too_much_is_refused_unless_forced(inst):
    inst.ok("subscribers", "load", inst.file(subs_file(8, 2)))
    line = inst.refused("subscribers", "load", inst.file(subs_file(3, 1)),
                        says=("4 subscriber entries would replace the 10 in force",
                              "sources.max_shrink = 0.5", "--force"))
    assert "203.0.113" not in line
    inst.refused("subscribers", "load", inst.file(HEADER),
                 says=("no subscriber entries", "(now 10)"))
    inst.refused("subscribers", "load", inst.file(""), says=("no header row",))
    inst.ok("subscribers", "load", inst.file(subs_file(5, 1)))   # half gone: allowed
    inst.ok("subscribers", "load", "--force", inst.file(subs_file(1)))
    with kernel.Maps(inst.pin) as m:
        assert len(list(m.host_items())) == 1 and not list(m.prefix_items())


def test_the_daemon_never_forces(inst, capsys):
    inst.csam.write_text(hosts_list(6))
    inst.subs.write_text(subs_file(6))
    inst.ok("subscribers", "load", str(inst.subs))
    inst.ok("blocklist", "load", str(inst.csam))
    d = Daemon(str(inst.cfg), inst.pin, clock=lambda: 1_790_000_000.0)
    d.start()
    d.tick()                                       # its own first tick moves the scan window
    before = inst.state()
    inst.csam.write_text("")                       # emptied, as by a failed download
    inst.subs.write_text(subs_file(2))             # cut short
    stamp = time.time_ns() + 1_000_000_000
    for p in (inst.csam, inst.subs):
        os.utime(p, ns=(stamp, stamp))
    d.tick()
    err = capsys.readouterr().err
    assert "not applied" in err and "no list entries: it would leave none in force (now 6)" \
        in err and "2 subscriber entries would replace the 6" in err, err
    assert inst.state() == before
    inst.csam.write_text(hosts_list(5))           # a right file is taken at the next change
    os.utime(inst.csam, ns=(stamp + 1, stamp + 1))
    d.tick()
    assert inst.listed() == 5


# ---- maps full -----------------------------------------------------------------------------


def test_a_file_the_maps_cannot_hold_is_refused_before_any_write(inst):
    inst.ok("subscribers", "load", inst.file(subs_file(6, 1)))
    inst.refused("subscribers", "load", inst.file(subs_file(17)),
                 says=("17 host entries, more than the map holds (limits.hosts = 16)",
                       "nothing was changed"))
    inst.refused("subscribers", "load", inst.file(subs_file(2, 9)),
                 says=("9 prefix entries", "(limits.prefixes = 8)"))
    inst.refused("subscribers", "load", inst.file(subs_file(12)),
                 says=("12 subscribers, 11 slots", "limits.subscribers = 12"))
    # Old and new together do not fit: deletes go first, and the load succeeds.
    inst.ok("subscribers", "load", inst.file(subs_file(11)))
    inst.ok("subscribers", "load", inst.file(subs_file(11, first_id=100)))
    with kernel.Maps(inst.pin) as m:
        assert {e.sub_id for _, e in m.host_items()} == set(range(100, 111))

    inst.ok("blocklist", "load", inst.file(hosts_list(6)))
    for text, says in ((hosts_list(9), ("9 addresses", "(limits.csam_hosts = 8)")),
                       (hosts_list(6) + prefixes_list(5),
                        ("5 prefixes", "(limits.csam_prefixes = 4)"))):
        for _ in range(2):   # whole parse, then line diff
            inst.refused("blocklist", "load", inst.file(text), says=says)
    inst.ok("blocklist", "load", inst.file(hosts_list(8, first=50) + prefixes_list(4)))
    assert inst.listed() == 12


# ---- files that are not files -------------------------------------------------------------


def test_sources_that_are_not_regular_files_are_not_read(inst, tmp_path):
    inst.ok("blocklist", "load", inst.file(hosts_list(4)))
    inst.ok("subscribers", "load", inst.file(subs_file(2)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for cmd in (("blocklist", "load"), ("subscribers", "load")):
        for path, kind in (("/dev/zero", "a character device"),
                           ("/dev/urandom", "a character device"),
                           (str(fifo), "a FIFO"), (str(tmp_path), "a directory")):
            if kind == "a directory":   # click says so first (dir_okay=False)
                assert inst.cli(*cmd, path).returncode == 2
                continue
            inst.refused(*cmd, path, says=(f"{path}: not a regular file ({kind})",))
    inst.cfg.write_text(inst.cfg.read_text() + "source_bytes = 100\n")   # in [limits]
    big = inst.file(hosts_list(20))   # 221 bytes
    inst.refused("blocklist", "load", big,
                 says=("larger than limits.source_bytes (100 bytes)",))


def test_read_file_bounds(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert read_file(str(p), 100)[0] == b"x" * 100
    with pytest.raises(SourceError, match="larger than limits.source_bytes"):
        read_file(str(p), 99)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list = []
    t = threading.Thread(target=lambda: got.append(pytest.raises(SourceError, read_source,
                                                                 str(fifo))))
    t.start()
    t.join(10)   # a FIFO without a writer must not block the reader
    assert not t.is_alive() and "not a regular file (a FIFO)" in str(got[0].value)
    with pytest.raises(SourceError, match="cannot read: No such file"):
        read_file(str(tmp_path / "missing"))


@pytest.mark.parametrize("before,after,ok", [
    (10, 5, True), (10, 4, False), (10, 0, False), (0, 0, False), (0, 3, True), (3, 30, True),
    (1, 1, True)])
def test_check_shrink(before, after, ok):
    if ok:
        check_shrink("f", "entries", before, after, 0.5, "k")
    else:
        with pytest.raises(SourceError, match="--force"):
            check_shrink("f", "entries", before, after, 0.5, "k")
