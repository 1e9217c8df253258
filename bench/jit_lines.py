"""Where a loaded BPF program's time goes, by source line: samples of one CPU's
instruction addresses (``perf record``, cpu-clock) placed on the lines of the program's
JITed code by its line info. A sample lands on the instruction after the one that stalls:
a load that misses the cache shows on the line after it (an ``asm volatile`` that uses the
loaded value, say) or on its own line. Run it while traffic flows through the program, e.g.
during ``bench_fwd.py --only xdpzoot-xdp --rates 0,0,0,...``, whose router's NAPI thread is
on CPU 1.

Usage: jit_lines.py [--name xz_xdp_access] [--cpu 1] [--seconds 8] [--top 20] [--json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xdpzoot.dataplane import kernel  # noqa: E402


def samples(cpu: int, seconds: float) -> list[int]:
    """Instruction addresses sampled on ``cpu`` for ``seconds`` (perf, cpu-clock, 10 kHz)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "perf.data")
        subprocess.run(["perf", "record", "-q", "-C", str(cpu), "-e", "cpu-clock", "-F", "9999",
                        "-o", data, "--", "sleep", str(seconds)], check=True,
                       stdout=subprocess.DEVNULL, timeout=seconds + 60)
        out = subprocess.run(["perf", "script", "-i", data, "-F", "ip"], check=True,
                             capture_output=True, text=True, timeout=300).stdout
    return [int(x, 16) for x in out.split()]


def by_line(ips: list[int], start: int, lines: list[tuple[int, str]]) -> tuple[Counter, int]:
    """Samples inside the program (``start`` .. its last line) per source line's text."""
    offs = [o for o, _ in lines]
    end = offs[-1] + 4096 if offs else start
    c: Counter = Counter()
    n = 0
    for ip in ips:
        o = ip - start
        if 0 <= o < end:
            i = bisect.bisect_right(offs, o - 1) - 1   # the stalled instruction's line
            c[lines[max(i, 0)][1]] += 1
            n += 1
    return c, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="xz_xdp_access", help="the program's name")
    p.add_argument("--cpu", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    ids = kernel.prog_ids_named(a.name)
    if len(ids) != 1:
        print(f"jit_lines: {len(ids)} programs named {a.name} loaded, not one", file=sys.stderr)
        return 2
    start, lines = kernel.prog_source_lines(ids[0])
    ips = samples(a.cpu, a.seconds)
    c, n = by_line(ips, start, lines)
    rows = [{"share": k / max(n, 1), "samples": k, "line": t} for t, k in c.most_common(a.top)]
    if a.json:
        print(json.dumps({"program": a.name, "id": ids[0], "cpu": a.cpu, "samples": len(ips),
                          "in_program": n, "lines": rows}, indent=2))
    else:
        print(f"{a.name} (id {ids[0]}): {n:,} of {len(ips):,} samples on CPU {a.cpu}")
        for r in rows:
            print(f"{100 * r['share']:5.1f}%  {r['line'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
