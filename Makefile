# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint tools test-host test-systemd test-vm test-package deb bench clean

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
	$(BIN)/ruff check gestvenv tests benchmarks examples
	$(BIN)/mypy

# Every tier, in this order (CI runs exactly this).
test: lint test-host test-systemd test-vm test-package

# This host as it is (systemd is not PID 1 here: the local runtime, and the systemd tests skip).
test-host: $(VENV)/.installed tools
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

# Tools some tests use and skip without (zsh and fish completion, rpmbuild, bubblewrap for the
# local runtime's namespace isolation, podman with runc and catatonit, and docker.io's daemon
# for container isolation; fuse-overlayfs for podman inside the test hosts, whose root is an
# overlay, where the kernel's overlay cannot stack and the store on the host's "/" already says
# "overlay"; podman only recommends it): installed when root (the package lists refreshed once
# if stale).
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
TOOL_PACKAGES = zsh fish rpm bubblewrap podman runc catatonit uidmap fuse-overlayfs docker.io
tools:
	@if [ "$$(id -u)" = 0 ]; then for tool in zsh fish rpmbuild bwrap podman runc fuse-overlayfs dockerd; do \
	    command -v $$tool >/dev/null || { $(APT_INSTALL) $(TOOL_PACKAGES) >/dev/null 2>&1 || \
	        { apt-get update -qq && $(APT_INSTALL) $(TOOL_PACKAGES) >/dev/null; }; break; }; \
	done; fi

# The Debian package, built from a copy of the tree (dpkg-buildpackage writes into the parent
# dir) with the system's python3 (not a venv's or pyenv's, hence PATH), then lintian:
# $(DEB_OUT)/gestvenv_*.deb and $(DEB_OUT)/lintian.txt. Build dependencies are installed
# (apt-get build-dep) when missing, which needs root.
DEB_OUT ?= build/deb
SYSTEM_PATH = /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
deb:
	rm -rf $(DEB_OUT) && mkdir -p $(DEB_OUT)/gestvenv
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(DEB_OUT)/gestvenv
	cd $(DEB_OUT)/gestvenv && { dpkg-checkbuilddeps 2>/dev/null || \
	    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq ./ >/dev/null; }
	command -v lintian >/dev/null || $(APT_INSTALL) lintian >/dev/null
	cd $(DEB_OUT)/gestvenv && PATH=$(SYSTEM_PATH) dpkg-buildpackage -us -uc -b
	PATH=$(SYSTEM_PATH) lintian --info --display-info --pedantic --fail-on error \
	    $(DEB_OUT)/*.changes > $(DEB_OUT)/lintian.txt 2>&1; rc=$$?; \
	    echo "lintian (exit $$rc):"; cat $(DEB_OUT)/lintian.txt; exit $$rc

# The packages: the .deb installed into a test host of its own (not the checkout: timer,
# man pages, completion, create/list/run/cleanup as root and as a user, a purge that leaves
# nothing), the RPM built with rpmbuild, the PKGBUILD's functions. Needs root.
test-package: $(VENV)/.installed
	@if [ "$$(id -u)" != 0 ]; then echo "test-package: skipped, needs root"; exit 0; fi; \
	$(MAKE) --no-print-directory tools deb && \
	GESTVENV_DEB_DIR=$(abspath $(DEB_OUT)) $(BIN)/python -m pytest -q -p no:cacheprovider \
	    tests/package

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_create.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
