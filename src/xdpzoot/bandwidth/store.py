"""What the accounting keeps on disk: the msgpack snapshot (written whole or not at all: a
temporary file, fsync, rename, fsync of the directory) and the audit log of policy actions."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime, tzinfo

from xdpzoot.bandwidth.accounting import Action
from xdpzoot.bandwidth.rules import local_zone
from xdpzoot.sources.files import SOURCE_BYTES, SourceError, read_file

# --- files ----------------------------------------------------------------------------------


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync dir.

    The temp file has a fixed name (``.NAME.tmp``), so a writer killed before the rename
    leaves at most one, which the next write replaces. It is created readable by its owner
    only (it holds subscriber data); on an error (a full disk) it is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, "." + os.path.basename(path) + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def save_snapshot(path: str, data: bytes) -> None:
    """Write a snapshot atomically: a crash leaves either the old or the new file, whole."""
    _atomic_write(path, data)


def load_snapshot(path: str, limit: int = SOURCE_BYTES) -> bytes | None:
    """The snapshot bytes at ``path``, or None if there is no such file; one that is not a
    regular file or is larger than ``limit`` is a SourceError (files.read_file)."""
    try:
        return read_file(path, limit)[0]
    except SourceError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


class AuditLog:
    """The audit trail of policy actions: one JSON line per action, kept for ``retention_s``.

    A line holds the time (ISO-8601 with zone), subscriber, rule, action, rate and values;
    nothing about flows or destinations. One writer: call :meth:`write` and :meth:`purge`
    from the same thread (purge replaces the file).
    """

    def __init__(
        self, path: str, retention_s: float, tz: tzinfo | None = None, fsync: bool = True
    ) -> None:
        """``tz`` is the zone the times are written in (default: local); ``fsync`` each write."""
        if retention_s <= 0:
            raise ValueError("retention_s must be positive")
        self.path = path
        self.retention_s = float(retention_s)
        self.tz = tz if tz is not None else local_zone()
        self.fsync = fsync

    def line(self, action: Action) -> str:
        """One action as its JSON line (without the newline)."""
        record = {
            "time": datetime.fromtimestamp(action.time, self.tz).isoformat(),
            "subscriber": action.subscriber,
            "rule": action.rule,
            "action": action.action,
            "rate_kbps": action.rate_kbps,
            "values": action.values,
        }
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    def write(self, actions: Iterable[Action]) -> int:
        """Append one line per action; returns how many were written. All or none: a write
        that fails (a full disk) is cut back to where the file ended, so that no torn
        record is left, and the OSError raised."""
        data = "".join(self.line(a) + "\n" for a in actions).encode("utf-8")
        if not data:
            return 0
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            end = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
        return data.count(b"\n")

    def purge(self, now: float) -> int:
        """Drop records older than the retention (time < now - retention); returns how many.

        The file is rewritten atomically, and only when something is dropped. Lines that are
        not records (e.g. torn by a crash) are kept: purge only ever removes old records.
        """
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return 0
        cutoff = now - self.retention_s
        kept: list[str] = []
        for text in lines:
            try:
                when = datetime.fromisoformat(json.loads(text)["time"]).timestamp()
            except (ValueError, KeyError, TypeError):
                when = None
            if when is None or when >= cutoff:
                kept.append(text if text.endswith("\n") else text + "\n")
        dropped = len(lines) - len(kept)
        if dropped:
            _atomic_write(self.path, "".join(kept).encode("utf-8", errors="surrogateescape"))
        return dropped
