"""A reboot of a real systemd host with DISK-backed environments on its persistent disk.

Runs on the bare host (root, systemd not PID 1): it boots its own test host with a persistent
disk (tests/harness/systemd_host.py, ``persist=True``), installs gestvenv's cleanup timer there
as a user would (``gestvenv ephemeral timer install``), creates environments, and reboots it:

- a power loss (SIGKILL of its systemd): no unit is stopped, no reaper runs, the envs' dirs
  stay on the disk while their state (in /run) and units are gone. After the boot, the timer's
  first run (OnBootSec=) removes them: nobody runs a gestvenv command;
- a clean reboot: systemd stops the env units at shutdown and their stop action (the reaper)
  deletes the files then, before the next boot.

Either way with environments capped by ``--disk`` on each backend among them (a tmpfs, or a
loop-mounted ext4 image for the disk backend, mounted on the env's dir): their mounts die
with the host's mount namespace, their loop devices (the host kernel's, global) are freed by
autoclear, the disk backend's image is deleted with its dir; nothing of them is left, on the
test host nor on this one.

And, where podman runs, with an environment at container isolation. Podman keeps its
containers in a database on the disk (``/var/lib/containers/storage/libpod/bolt_state.db``,
in the graph root: in the test host, its root overlay's writable layer, the "disk"), and its
runtime state in /run (``/run/containers/storage``, ``/run/libpod``: gone with a boot). After a
power loss the env's container is still in the database ("Created": podman resets the state of
a container whose run state died with the boot; its ``--rm`` never ran, no conmon was left to
run it): only the cleanup timer's boot sweep removes it (its state file, in /run, is gone).
Its conmon, its fuse-overlayfs (podman's storage on the test host's overlay root) and their
mounts died with the host's namespaces. After a clean reboot the env unit's stop action (its
reaper) has removed it at shutdown.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator

import pytest

from gestvenv.runtime.systemd import systemd_booted
from tests.harness.systemd_host import SystemdHost, bound_loops

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a test host needs root"),
    pytest.mark.skipif(systemd_booted(), reason="boots its own test host: not from inside one"),
    pytest.mark.skipif(not (os.access("/lib/systemd/systemd", os.X_OK)
                            and shutil.which("dbus-daemon")), reason="needs systemd and dbus"),
]

PY = sys.executable  # the checkout's venv: the checkout is at the same path inside
DISK_ROOT = "/var/cache/gestvenv/envs"
BOOT_SWEEP = 10  # gestvenv.timer.BOOT_DELAY: the timer's OnBootSec=
# root's storage roots in the host (disk; tmpfs under /run/gestvenv; memory): where an env's
# own filesystem (max_disk) is mounted.
ROOTS = (DISK_ROOT, "/run/gestvenv", "/dev/shm/gestvenv")
CAPPED = {f"capped-{backend}": backend for backend in ("tmpfs", "memory", "disk")}
IMAGE = ".gestvenv-disk.img"  # gestvenv.diskcap.IMAGE
ENV_LABEL = "io.gestvenv.env"  # gestvenv.container.engine.LABEL_ENV
# An env at container isolation, where podman runs (the test host has this machine's podman
# and its images: its root is an overlay of this one's).
PODMAN = shutil.which("podman")


def gestvenv(host: SystemdHost, *args: str) -> str:
    done = host.run([PY, "-m", "gestvenv", *args], timeout=120)
    assert done.returncode == 0, f"gestvenv {' '.join(args)}: {done.stderr}"
    return done.stdout


def env_dirs(host: SystemdHost) -> list[str]:
    done = host.run(["ls", "-A", DISK_ROOT], check=True)
    return sorted(n for n in done.stdout.split() if n != ".gestvenv-root")


def create_capped(host: SystemdHost) -> dict[str, tuple[str, int, int]]:
    """An env with ``--disk`` on each backend; return the loop devices of the host then (the
    disk backend's image), after checking that each env has its filesystem mounted."""
    for name, backend in CAPPED.items():
        gestvenv(host, "ephemeral", "create", name, "--storage", backend, "--disk", "24",
                 "--ttl", "3600")
    assert len(env_mounts(host)) == len(CAPPED), env_mounts(host)
    loops = host.loop_devices()
    # (The image itself is hidden under the mount it backs.)
    [(backing, _, _)] = loops.values()
    assert backing.startswith(f"{DISK_ROOT}/capped-disk-") and backing.endswith(f"/{IMAGE}"), \
        loops
    return loops


def env_mounts(host: SystemdHost) -> list[str]:
    """Mount points at or below gestvenv's storage roots in the host."""
    done = host.run(["cat", "/proc/self/mountinfo"], check=True)
    points = [line.split()[4] for line in done.stdout.splitlines()]
    return [p for p in points if any(p == r or p.startswith(f"{r}/") for r in ROOTS)]


def images(host: SystemdHost) -> list[str]:
    """The disk backend's images on the host's disk (but those hidden under their mount)."""
    done = host.run(["find", "/var/cache/gestvenv", "-name", IMAGE], check=True)
    return sorted(done.stdout.split())


def nothing_capped_left(host: SystemdHost, loops: dict[str, tuple[str, int, int]]) -> None:
    """No mount, image, loop device, dir or unit of the capped envs: in the host, and on this
    machine no loop device of before still bound to the same file (the kernel's are global)."""
    assert env_mounts(host) == []
    assert images(host) == []
    assert host.loop_devices() == {}
    assert still_bound(loops) == []
    dirs = host.run(["sh", "-c", "ls -A /run/gestvenv/storage /dev/shm/gestvenv 2>/dev/null; "
                     f"ls -A {DISK_ROOT}"]).stdout.split()
    assert [d for d in dirs if d.startswith("capped-")] == [], dirs
    units = host.run(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                      "gestvenv-capped*"]).stdout
    assert units.strip() == "", units


def still_bound(loops: dict[str, tuple[str, int, int]]) -> list[str]:
    """Which of ``loops`` (SystemdHost.loop_devices) are still bound to the same file, seen
    from this machine: the kernel's loop devices are global, the host's namespaces are not."""
    now = {device: (dev, ino) for device, _, dev, ino in bound_loops()}
    return [f"{d} ({b})" for d, (b, dev, ino) in loops.items() if now.get(d) == (dev, ino)]


def create_boxed(host: SystemdHost, name: str) -> str | None:
    """An env at container isolation on the disk backend (its dir outlives a power loss);
    its container's name, running. None where podman does not run in the host."""
    if PODMAN is None:
        return None
    gestvenv(host, "ephemeral", "create", name, "--isolation", "container", "--storage",
             "disk", "--ttl", "3600")
    shown = json.loads(gestvenv(host, "ephemeral", "show", name, "--json"))
    assert shown["enforcement"]["isolation_applied"] == "container", shown
    [(container, state)] = containers(host, name)
    assert state == "running", state
    return str(container)


def containers(host: SystemdHost, env: str) -> list[tuple[str, str]]:
    """(name, state) of the containers podman has (any state) for the env named ``env``."""
    done = host.run(["podman", "ps", "-a", "--format", "json", "--filter",
                     f"label={ENV_LABEL}={env}"], check=True)
    return [(item["Names"][0], item["State"]) for item in json.loads(done.stdout or "[]")]


def engine_leftovers(host: SystemdHost) -> list[str]:
    """conmon and fuse-overlayfs processes, and a container's root mounted, in the host
    (none of its envs' containers is left to hold them)."""
    procs = host.run(["sh", "-c", "pgrep -a -x conmon; pgrep -a -x fuse-overlayfs; true"])
    mounts = host.run(["cat", "/proc/self/mountinfo"], check=True)
    return procs.stdout.split("\n")[:-1] + [
        line.split()[4] for line in mounts.stdout.splitlines()
        if "/var/lib/containers/storage/overlay/" in line.split()[4]]


def journal(host: SystemdHost, unit: str) -> str:
    return host.run(["journalctl", "-b", "--no-pager", "-o", "cat", "-u", unit]).stdout


@pytest.fixture
def host() -> Iterator[SystemdHost]:
    name = f"gvreboot-{os.getpid()}"
    with SystemdHost(name=name, persist=True) as booted:
        yield booted


def test_orphans_of_a_power_loss_are_gone_after_boot_without_a_command(host: SystemdHost) -> None:
    print(gestvenv(host, "ephemeral", "timer", "install"))
    for name in ("kept-a", "kept-b"):
        gestvenv(host, "ephemeral", "create", name, "--storage", "disk", "--ttl", "3600")
    gestvenv(host, "run", "--env", "kept-a", "--", "python", "-c", "print('used')")
    loops = create_capped(host)
    boxed = create_boxed(host, "boxed")
    # Created last, so that its short TTL (which would end during the downtime) cannot end
    # before the power loss: a slow container build once outlasted a TTL of 5 s.
    gestvenv(host, "ephemeral", "create", "short", "--storage", "disk", "--ttl", "60")
    before = env_dirs(host)
    assert len(before) == 4 + (boxed is not None), before  # capped-disk's dir among them
    # Power loss: nothing stopped, nothing reaped. The harness checks on its way that the
    # host left nothing on this machine: no process, mount, cgroup, nor loop device.
    host.reboot(crash=True)
    booted = time.monotonic()
    # The state (in /run) and the transient units died with the boot; the files did not.
    assert host.run(["ls", "/run/gestvenv/envs"]).returncode != 0
    assert env_dirs(host) == before, "a power loss cannot have cleaned anything"
    # The capped envs' filesystems died with the mount namespace: the tmpfs ones with their
    # contents (/run and /dev/shm start empty); the disk one's loop device with its mount
    # (autoclear), its image is a plain file in its orphaned dir now.
    assert env_mounts(host) == []
    assert len(images(host)) == 1, images(host)
    assert still_bound(loops) == []
    if boxed is not None:
        # Podman's database is on the disk: the container is still there, stopped (its
        # processes and mounts died with the boot), and nothing but a sweep removes it.
        after_boot = containers(host, "boxed")
        print(f"after the power loss, podman still has {after_boot}")
        assert [c for c, _ in after_boot] == [boxed], after_boot
        assert engine_leftovers(host) == []
    deadline = booted + BOOT_SWEEP + 20
    while env_dirs(host) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = env_dirs(host)
    print(f"orphans gone {time.monotonic() - booted:.1f}s after the boot "
          f"(OnBootSec={BOOT_SWEEP}s); left: {left}")
    assert left == []
    # What the sweep did is logged when it is over (containers are swept after the dirs).
    expected = [f"removed orphan {DISK_ROOT}/{orphan}" for orphan in before]
    if boxed is not None:
        expected.append(f"removed orphan container {boxed} (its environment is gone)")
    log = journal(host, "gestvenv-cleanup.service")
    while not all(line in log for line in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
        log = journal(host, "gestvenv-cleanup.service")
    print(f"the boot sweep was over (logged) {time.monotonic() - booted:.1f}s after the boot")
    for orphan in before:
        assert f"removed orphan {DISK_ROOT}/{orphan}" in log, log
    if boxed is not None:
        assert f"removed orphan container {boxed} (its environment is gone)" in log, log
        assert containers(host, "boxed") == []
        assert engine_leftovers(host) == []
    # The timer goes on after the boot sweep.
    status = gestvenv(host, "ephemeral", "timer", "status")
    assert "active" in status, status
    nothing_capped_left(host, loops)


def test_a_clean_reboot_reaps_envs_at_shutdown(host: SystemdHost) -> None:
    gestvenv(host, "ephemeral", "create", "until-shutdown", "--storage", "disk", "--ttl", "3600")
    loops = create_capped(host)
    boxed = create_boxed(host, "boxed-shutdown")
    assert len(env_dirs(host)) == 2 + (boxed is not None)
    host.reboot(crash=False)
    # Checked at once, before any timer could have run: the env unit's stop action did it.
    assert env_dirs(host) == []
    nothing_capped_left(host, loops)
    if boxed is not None:
        assert containers(host, "boxed-shutdown") == []
        assert engine_leftovers(host) == []
    assert "gestvenv-until-shutdown" not in host.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend"]).stdout
