"""Source files as the control plane reads them: one error type that names the file, the line
and the problem, and the readers every source shares (text, TOML)."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import re
import stat
import threading
import tomllib
from collections.abc import Callable, Iterator
from typing import TypeVar

MAX_SHOWN = 20  # problems printed by str(SourceError); the rest are counted
MAX_PROBLEM = 200  # characters of one problem shown: a field of a huge line is not echoed
SOURCE_BYTES = 256 << 20  # limits.source_bytes by default: a 1M-line list with room to spare
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


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
            f"{self.path}:{line}: {_cut(msg)}" if line is not None else f"{self.path}: {_cut(msg)}"
            for line, msg in self.problems[:MAX_SHOWN]
        ]
        rest = len(self.problems) - MAX_SHOWN
        if rest > 0:
            out.append(f"... and {rest} more problem{'s' if rest != 1 else ''}")
        return "\n".join(out)


def _cut(msg: str) -> str:
    """A problem as shown: its start and end when it is long (it may quote a field)."""
    if len(msg) <= MAX_PROBLEM:
        return msg
    return f"{msg[:MAX_PROBLEM - 60]} ...({len(msg) - MAX_PROBLEM + 20} characters)... " \
        f"{msg[-40:]}"


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


T = TypeVar("T")
U = TypeVar("U")


def both(here: Callable[[], T], there: Callable[[], U]) -> tuple[T, U]:
    """``here()`` and ``there()``, at once on two CPUs where it may be: ``there()`` in a child
    process (a fork; its result comes back pickled), ``here()`` in this one. A large file's
    parse takes its halves so (Python runs one thread at a time). In this process alone,
    one after the other, where a fork may not be: one CPU, or other threads in this process
    (a fork copies them in the middle of whatever they hold), or no process to be had; and
    ``there()`` again here if the child gave nothing back (it raised)."""
    if not may_fork():
        return here(), there()
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return here(), there()
    if pid == 0:   # the child: its result down the pipe, then gone
        try:
            os.close(r)
            out = pickle.dumps(there(), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(w, "wb") as f:
                f.write(out)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        try:
            first = here()
        finally:
            sent = f.read()   # (until the child has written it all: it waits on the pipe)
            with contextlib.suppress(ChildProcessError):   # (reaped by someone else's
                os.waitpid(pid, 0)                         # waitpid(-1): gone all the same)
    return first, pickle.loads(sent) if sent else there()


def may_fork() -> bool:
    """Whether :func:`both` forks: a second CPU, and no other thread in this process."""
    return threading.active_count() == 1 and len(os.sched_getaffinity(0)) > 1


def read_file(path: str, limit: int = SOURCE_BYTES) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at ``path`` and its status; anything else is a
    SourceError, read not at all or no further than the limit.

    The type is checked on the open file (a FIFO is opened without waiting for a writer),
    so neither a device, a FIFO nor a path swapped after a check is ever read; at most
    ``limit`` + 1 bytes are read, so a file that grows while it is read cannot pass.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:   # ValueError: a NUL in the path
        raise SourceError(path, [(None, f"cannot read: {_reason(e)}")]) from e
    chunks: list[bytes] = []
    try:
        st = os.fstat(fd)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "of an unknown type")
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(path, [(None, f"not a regular file ({kind})")])
        if st.st_size > limit:
            raise SourceError(path, [(None, _too_large(limit))])
        total, want = 0, min(st.st_size, limit) + 1
        while total <= limit:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = min(1 << 20, limit + 1 - total)
    except OSError as e:
        raise SourceError(path, [(None, f"cannot read: {_reason(e)}")]) from e
    finally:
        os.close(fd)
    if total > limit:
        raise SourceError(path, [(None, _too_large(limit))])
    return b"".join(chunks), st


def _reason(e: Exception) -> str:
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


def _too_large(limit: int) -> str:
    return (f"larger than limits.source_bytes ({limit} bytes): raise limits.source_bytes "
            "if the file is right")


def read_source(path: str, limit: int = SOURCE_BYTES) -> str:
    """Read a source file (:func:`read_file`) as UTF-8 text (a BOM is dropped); any
    failure is a SourceError."""
    data, _ = read_file(path, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SourceError(path, [(line, f"not UTF-8 text: {e.reason}")]) from e


def check_shrink(path: str, what: str, before: int, after: int, max_shrink: float,
                 key: str) -> None:
    """Refuse a source that would leave nothing in force, or take away more than the share
    ``max_shrink`` (config ``key``) of the ``before`` entries in force: a truncated or
    emptied file must not silently stop the blocking. Counts only: never an entry."""
    if after and before - after <= max_shrink * before:
        return
    if not after:
        msg = f"no {what}: it would leave none in force (now {before})"
    else:
        msg = (f"{after} {what} would replace the {before} in force, "
               f"{100 * (before - after) // before} % fewer (more than {key} = {max_shrink:g})")
    raise SourceError(path, [(None, f"{msg}; refused: --force loads it anyway")])


def check_room(path: str, what: str, n: int, room: int, key: str) -> None:
    """Refuse ``n`` entries for a map of ``room`` (its size, config ``key``) before any is
    written, rather than fail half-way with the map full."""
    if n > room:
        raise SourceError(path, [(None, (
            f"{n} {what}, more than the map holds ({key} = {room}): raise {key} (maps get "
            "their size when they are made: detach, attach); nothing was changed"))])


def parse_toml(text: str, path: str) -> dict:
    """A TOML document; a syntax error is a SourceError with the line TOML names."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        raise SourceError(path, [(int(m.group(1)) if m else None, msg)]) from e
