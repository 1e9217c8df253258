"""A test run stopped with SIGTERM (`timeout`, a stopped job) still tears down its fixtures:
a module fixture's teardown runs in a pytest child sent SIGTERM in the middle of a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_sigterm_runs_the_teardown(tmp_path):
    started, torn = tmp_path / "started", tmp_path / "torn-down"
    (tmp_path / "test_waits.py").write_text(
        "import pathlib, time, pytest\n\n"
        "@pytest.fixture(scope='module')\n"
        "def made():\n"
        "    yield\n"
        f"    pathlib.Path({str(torn)!r}).write_text('yes')\n\n"
        "def test_waits(made):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(60)\n")
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "termination", "-p", "no:cacheprovider",
         "test_waits.py"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": TESTS})
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), child.communicate(timeout=10)[0]
        child.send_signal(signal.SIGTERM)
        out = child.communicate(timeout=30)[0].decode()
    finally:
        if child.poll() is None:
            child.kill()
    assert torn.read_text() == "yes", out
