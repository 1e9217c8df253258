"""Source files as the control plane reads them: one error type that names the file, the line
and the problem, and the readers every source shares (text, TOML)."""

from __future__ import annotations

import contextlib
import gc
import re
import tomllib
from collections.abc import Iterator

MAX_SHOWN = 20  # problems printed by str(SourceError); the rest are counted


class SourceError(Exception):
    """A source file (config, subscriber CSV) is invalid; nothing was applied."""

    def __init__(self, path: str, problems: list[tuple[int | None, str]]):
        """Keep every problem as ``(line or None, message)``; ``str()`` shows the first 20."""
        self.path = path
        self.problems = list(problems)
        super().__init__(path, self.problems)

    def __str__(self) -> str:
        """One ``PATH:LINE: problem`` line per problem, capped, so logs stay readable."""
        if not self.problems:
            return f"{self.path}: invalid"
        out = [
            f"{self.path}:{line}: {msg}" if line is not None else f"{self.path}: {msg}"
            for line, msg in self.problems[:MAX_SHOWN]
        ]
        rest = len(self.problems) - MAX_SHOWN
        if rest > 0:
            out.append(f"... and {rest} more problem{'s' if rest != 1 else ''}")
        return "\n".join(out)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: a million rows make millions of objects, none in
    a cycle, and the collector would rescan the growing heap again and again (tripling the
    time of a parse)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_source(path: str) -> str:
    """Read a source file as UTF-8 text (a BOM is dropped); any failure is a SourceError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceError(path, [(None, f"cannot read: {e.strerror or e}")]) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SourceError(path, [(line, f"not UTF-8 text: {e.reason}")]) from e


def parse_toml(text: str, path: str) -> dict:
    """A TOML document; a syntax error is a SourceError with the line TOML names."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        raise SourceError(path, [(int(m.group(1)) if m else None, msg)]) from e
