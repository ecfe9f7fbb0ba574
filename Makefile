# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint test-host test-systemd test-vm bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job: an environment with a package, a command in it, then gone.
demo: $(VENV)/.installed
	$(BIN)/gestvenv ephemeral create demo --packages 'six>=1.0' --ttl 300
	$(BIN)/gestvenv run --env demo -- python -c 'import six, sys; print("six", six.__version__, "in", sys.prefix)'
	$(BIN)/gestvenv ephemeral list
	$(BIN)/gestvenv ephemeral cleanup demo

lint: $(VENV)/.installed
	$(BIN)/ruff check gestvenv tests benchmarks
	$(BIN)/mypy

# Every tier, in this order (CI runs exactly this).
test: lint test-host test-systemd test-vm

# This host as it is (systemd is not PID 1 here: the local runtime, and the systemd tests skip).
test-host: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The whole suite again inside a real systemd booted for it (PID 1 of its own namespaces over
# an overlay of /; the checkout at its own path): there "auto" means systemd. Needs root.
test-systemd: $(VENV)/.installed
	@if [ "$$(id -u)" != 0 ]; then echo "test-systemd: skipped, needs root"; exit 0; fi; \
	test -x /lib/systemd/systemd && command -v dbus-daemon >/dev/null || \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd dbus dbus-user-session; \
	$(BIN)/python -m tests.harness.systemd_host run -- \
	    $(BIN)/python -m pytest -q -p no:cacheprovider

# The tests marked v2, as a non-root user of a Debian 13 guest (pure cgroup v2, controllers
# delegated to user managers), under qemu. Needs root (tools, image); ~5 min.
test-vm: $(VENV)/.installed
	@if [ "$$(id -u)" != 0 ]; then echo "test-vm: skipped, needs root"; exit 0; fi; \
	$(BIN)/python -m tests.harness.vm run -- \
	    python -m pytest -q -p no:cacheprovider -m v2 tests/integration/systemd

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_create.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
