# xdpzoot: `make setup` once (as root), then `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=25

.PHONY: setup test vmtest fuzz lint bench bench-cold bench-daemon bench-fwd bench-radius lab-up lab-down clean

setup:
	bash scripts/setup.sh

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The kernel matrix in a VM (README "Kernel matrix"), apart from setup and test: boots a
# Debian kernel with virtme-ng and runs tests/kernel_matrix.txt inside. As root.
# KERNEL=6.1 (default) | 6.12 | 6.12-trixie | running | an image version (6.1.0-57-amd64);
# VMTEST_ARGS="--tests 'tests'" runs the whole suite instead (hours under TCG).
KERNEL ?= 6.1
vmtest:
	python3 scripts/vmtest.py --kernel $(KERNEL) $(VMTEST_ARGS)

# The long differential run: 2,000 worlds of 50 packets, BPF verdicts against model.py
# (XZ_FUZZ_WORLDS, XZ_FUZZ_PACKETS change it; `make test` runs 300 packets).
fuzz:
	XZ_FUZZ=1 $(PY) -m pytest -q -s tests/test_differential.py

lint:
	.venv/bin/ruff check src tests bench scripts

bench:
	$(PY) bench/bench.py
	$(PY) bench/bench_cold.py
	$(PY) bench/bench_daemon.py
	$(PY) bench/bench_radius.py

# The daemon's tick with 1M subscribers (BENCH_ARGS="--tree ../before" times another checkout too).
bench-daemon:
	$(PY) bench/bench_daemon.py $(BENCH_ARGS)

# The cold-cache per-packet figures alone (1M subscribers and list entries, ~5 min).
bench-cold:
	$(PY) bench/bench_cold.py

# RADIUS reconnect storm: 100,000 Starts then Stops from 4 NAS, and reply latency at 2,000/s.
bench-radius:
	$(PY) bench/bench_radius.py $(BENCH_ARGS)

# Routers side by side in a lab of namespaces (plain, nft, iptables+ipset, XDP, xdpzoot), in
# turn three times (~15 min; BENCH_ARGS="--quick": one short round).
bench-fwd:
	$(PY) bench/bench_fwd.py $(BENCH_ARGS)

lab-up:
	.venv/bin/xdpzoot lab up

lab-down:
	@echo "usage: .venv/bin/xdpzoot lab down PREFIX"

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis
