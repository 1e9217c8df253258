"""Names and numbers from bpf/xdpzoot.h, the one truth shared with the BPF programs.

The verdict and reason lists and every numeric ``#define XZ_*`` are read from the
header at import, so C, the CLI, ``explain`` and the metrics cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
HEADER = BPF_DIR / "xdpzoot.h"


def _xmacro(text: str, name: str) -> tuple[str, ...]:
    """Labels of an X-macro list such as ``#define XZ_REASONS(X) X(OK, "ok") ...``."""
    m = re.search(rf"#define {name}\(X\)((?:\\\n|.)*?)\n(?!\t)", text)
    if not m:
        raise RuntimeError(f"{HEADER}: {name} not found")
    return tuple(re.findall(r'X\(\w+,\s*"([a-z0-9_]+)"\)', m.group(1)))


def _defines(text: str) -> dict[str, int]:
    """Numeric ``#define XZ_NAME value`` constants (value: ints, 123U, <<, |, names)."""
    out: dict[str, int] = {}
    for name, expr in re.findall(r"^#define (XZ_\w+) ([^\n/]+?)\s*(?:/\*.*)?$", text, re.M):
        expr = re.sub(r"\b(XZ_\w+)\b", lambda m: str(out.get(m.group(1), "None")), expr)
        expr = re.sub(r"\b(0x[\da-fA-F]+|\d+)U?L{0,2}\b", r"\1", expr)   # 123U, 0x..ULL
        if re.fullmatch(r"[\da-fA-F\s()<|+*x]+", expr):
            out[name] = int(eval(expr, {"__builtins__": {}}))  # digits and operators only
    return out


_TEXT = HEADER.read_text()
VERDICTS: tuple[str, ...] = _xmacro(_TEXT, "XZ_VERDICTS")
REASONS: tuple[str, ...] = _xmacro(_TEXT, "XZ_REASONS")
FAST_REASONS: tuple[str, ...] = _xmacro(_TEXT, "XZ_FAST_REASONS")
C: dict[str, int] = _defines(_TEXT)

ROLES = ("access", "core")
HOOKS = tuple(sorted(("xdp", "tc"), key=lambda h: C["XZ_HOOK_" + h.upper()]))   # by XZ_HOOK_*
TYPES = {"dynamic": C["XZ_TYPE_DYNAMIC"], "static": C["XZ_TYPE_STATIC"]}
FLAGS = {
    "suspended": C["XZ_F_SUSPENDED"],
    "op25b_exempt": C["XZ_F_OP25B_EXEMPT"],
    "ip53b_exempt": C["XZ_F_IP53B_EXEMPT"],
}
REASON_SLOTS = C["XZ_NR_REASON_SLOTS"]


def counter_index(role: str, verdict: str, reason: str) -> int:
    """Slot of the per-CPU counter array, as XZ_COUNTER() computes it in C."""
    r, v, x = ROLES.index(role), VERDICTS.index(verdict), REASONS.index(reason)
    return (r * len(VERDICTS) + v) * REASON_SLOTS + x


# Reasons that only ever pass a packet; every other one but csam can be traced (a reason
# appended to the header is traceable unless it is added here).
PASS_REASONS = ("ok", "unknown", "unparsed", "bypass", "fragment", "allowlist", "exempt")
TRACE_REASONS = tuple(r for r in REASONS if r not in PASS_REASONS and r != "csam")


def flag_names(bits: int) -> list[str]:
    """Subscriber flag names set in ``bits``."""
    return [n for n, b in FLAGS.items() if bits & b]
