"""The VM test tier: a pure cgroup v2 host (Debian 13, systemd 257) under qemu.

Why: the CI machine has hybrid cgroups and its PID 1 is not systemd, so a user's systemd manager
gets no controllers there. Most users' hosts are pure cgroup v2, where a non-root user's manager
has cpu, memory and pids delegated and ``systemd-run --user`` limits are enforced. This tier
boots such a host (TCG: KVM is not usable on the CI machine) and runs a command in it as the
lingering user ``tester`` (uid 1000), with the project installed from wheels into
``/home/tester/venv`` and a copy of ``tests/`` + ``pyproject.toml`` as the working directory::

    python -m tests.harness.vm run -- python -m pytest tests/systemd -m v2
    python -m tests.harness.vm build          # host tools + cached image only
    python -m tests.harness.vm clean [--all]  # leftovers of killed runs (--all: also the cache)

Everything lives under /var/tmp/gestvenv-vm/ (image cache keyed by a hash of build-image.sh,
one run-* dir per run, removed at the end). See __main__.py for the mechanics.
"""
