"""A pytest plugin (loaded by conftest.py): SIGTERM, as `timeout` or a stopped job sends it,
interrupts the run like Ctrl-C, so that fixtures tear down what they made (namespaces, bpffs
mounts, pins). Python's default for SIGTERM ends the process with no `finally` run, which
left lab namespaces and mounts behind. SIGKILL still cannot be answered."""

from __future__ import annotations

import signal


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}: tearing down")


def pytest_configure(config) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
