"""The kernel matrix's selection and report (scripts/vmtest.py, tests/kernel_matrix.txt), and
the Vagrant lab's provisioning kept in agreement with scripts/setup.sh. No VM here: these
read files."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _vmtest():
    spec = importlib.util.spec_from_file_location("vmtest", ROOT / "scripts" / "vmtest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vmtest = _vmtest()


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name.startswith("test")}


def test_a_kvm_probe_that_hangs_leaves_nothing_running(tmp_path, monkeypatch):
    """The KVM probe's VM that never boots is ended whole at the timeout: vng and what it
    started (here a stand-in vng whose two children sleep, as virtme-run and qemu did).
    It had stayed running, a CPU each, after every `make vmtest` on this machine."""
    pids = tmp_path / "pids"
    vng = tmp_path / "vng"
    vng.write_text(f"#!/bin/sh\nsleep 60 & echo $! >> {pids}\n"
                   f"sh -c 'sleep 60 & echo $! >> {pids}; wait' &\nwait\n")
    vng.chmod(0o755)
    monkeypatch.setattr(vmtest, "vng_cmd", lambda *a, **k: [str(vng)])
    monkeypatch.setattr(vmtest.os, "access", lambda *a: True)
    t0 = time.monotonic()
    assert vmtest.kvm_works(tmp_path, tmp_path, "0", tmp_path, timeout=1) == (
        False, "no guest within 1 s")
    assert time.monotonic() - t0 < 10
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2
    time.sleep(0.2)
    alive = subprocess.run(["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, started))],
                           capture_output=True, text=True).stdout.split("\n")
    assert not [x for x in alive if x.strip() and "Z" not in x.split()[-1]]   # none, or reaped


def test_every_matrix_line_names_a_test():
    parts = vmtest.read_matrix()
    assert list(parts) == ["variants", "test_run", "attach", "lab"]
    for lines in parts.values():
        assert lines
        for line in lines:
            file, _, func = line.partition("::")
            assert (ROOT / file).is_file(), line
            if func:
                assert func in _test_functions(ROOT / file), line


def test_matrix_parts_cover_the_kernel_sensitive_files():
    """The matrix keeps every BPF_PROG_TEST_RUN table and the variants (what a new kernel's
    verifier or helpers could change), and the lab with SMTP and DNS."""
    parts = vmtest.read_matrix()
    assert "tests/test_variants.py" in parts["variants"]
    assert set(parts["test_run"]) == {str(p.relative_to(ROOT)) for p in
                                      (ROOT / "tests").glob("test_*_bpf.py")} | {
        "tests/test_bpf.py", "tests/test_trace.py"}
    assert {"tests/test_lab_policy.py::test_op25b", "tests/test_lab_policy.py::test_ip53b"} <= \
        set(parts["lab"])   # SMTP and DNS through the router


@pytest.mark.parametrize("nodeid, part", [
    ("tests/test_variants.py::test_variant_loads[tiny-tables]", "variants"),
    ("tests/test_bpf.py::test_table[xdp-op25b]", "test_run"),
    ("tests/test_cli.py::test_detach_removes_everything", "attach"),
    ("tests/test_cli.py::test_usage_error_exit_2", None),
    ("tests/test_lab_policy.py::test_ip53b[tc-6]", "lab"),
    ("tests/test_lab_policy.py::test_reject_fails_fast[xdp]", None),
])
def test_part_of(nodeid, part):
    assert vmtest.part_of(nodeid, vmtest.read_matrix()) == part


def test_summary_from_junit(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_bpf" name="test_a[xdp]" time="1.5"/>'
        '<testcase classname="tests.test_bpf" name="test_b" time="0.5"><failure/></testcase>'
        '<testcase classname="tests.test_lab_policy" name="test_op25b[tc-4]" time="2">'
        '<skipped message="no rate"/></testcase>'
        '<testcase classname="tests.test_config" name="test_x" time="0.1"/>'
        '</testsuite></testsuites>')
    s = vmtest.summarize(junit, vmtest.read_matrix())
    assert s["parts"]["test_run"] == {"tests": 2, "passed": 1, "failed": 1, "skipped": 0,
                                      "seconds": 2.0}
    assert s["parts"]["lab"]["skipped"] == 1
    assert s["parts"]["other"]["passed"] == 1
    assert s["totals"] == {"tests": 4, "passed": 2, "failed": 1, "skipped": 1}
    assert s["failed"] == ["tests/test_bpf.py::test_b"]
    assert s["skipped"] == ["tests/test_lab_policy.py::test_op25b[tc-4]: no rate"]


def test_make_vmtest_is_apart_from_setup_and_ci():
    """`make setup` and CI need none of the VM's tools; `make vmtest` runs the script."""
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^vmtest:\n\tpython3 scripts/vmtest\.py", mk, re.M)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for tool in ("qemu", "virtme", "busybox"):
        assert tool not in setup
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith("#") and not line.startswith("set ")
          and not line.startswith("cd ")]
    assert ci == ["make setup", "make test"]


# ---- the Vagrant lab -------------------------------------------------------------------------


def _provisioners(text: str) -> dict[str, str]:
    """Provisioner name -> its inline shell script."""
    return {m.group(1): m.group(2) for m in re.finditer(
        r'config\.vm\.provision "(\w+)", type: "shell"[^\n]*inline: <<-SHELL\n(.*?)\n\s*SHELL',
        text, re.S)}


def test_vagrant_provisions_with_setup_sh():
    """The VM is set up by the same scripts/setup.sh as a host, from the synced checkout,
    and installs nothing of its own; what its test provisioner runs, setup.sh installs."""
    text = (ROOT / "vagrant" / "Vagrantfile").read_text()
    sync = re.search(r'config\.vm\.synced_folder "\.\.", "([^"]+)", type: "rsync",\s*'
                     r'rsync__exclude: \[([^\]]*)\]', text)
    assert sync, "the checkout is synced into the VM"
    dest, excludes = sync.group(1), sync.group(2)
    assert '".venv/"' in excludes   # the VM builds its own .venv
    prov = _provisioners(text)
    assert set(prov) == {"setup", "test"}
    setup_cmds = [line.strip() for line in prov["setup"].splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    assert f"bash {dest}/scripts/setup.sh" in setup_cmds
    for script in prov.values():
        assert "apt-get" not in script and "pip " not in script
    assert re.search(rf"^\s*make -C {re.escape(dest)} test$", prov["test"], re.M)
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    pkgs = re.search(r"PKGS=\(([^)]*)\)", setup_sh).group(1).split()
    assert "make" in pkgs   # the test provisioner's make
    assert 'cd "$(dirname "$0")/.."' in setup_sh   # runs from any directory
    # The xdpzoot link the setup provisioner makes points where setup.sh builds the venv.
    assert f"{dest}/.venv/bin/xdpzoot" in prov["setup"]
    assert ".venv/bin/python" in setup_sh and "-m venv" in setup_sh


def test_vagrant_box_is_the_one_the_readme_names():
    text = (ROOT / "vagrant" / "Vagrantfile").read_text()
    box = re.search(r'config\.vm\.box = "([^"]+)"', text).group(1)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Vagrant lab"):]
    assert f"`{box}`" in section
