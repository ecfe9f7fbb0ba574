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
"""

from __future__ import annotations

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


def journal(host: SystemdHost, unit: str) -> str:
    return host.run(["journalctl", "-b", "--no-pager", "-o", "cat", "-u", unit]).stdout


@pytest.fixture
def host() -> Iterator[SystemdHost]:
    name = f"gvreboot-{os.getpid()}"
    with SystemdHost(name=name, persist=True) as booted:
        yield booted


def test_orphans_of_a_power_loss_are_gone_after_boot_without_a_command(host: SystemdHost) -> None:
    print(gestvenv(host, "ephemeral", "timer", "install"))
    for name in ("kept-a", "kept-b", "short"):
        gestvenv(host, "ephemeral", "create", name, "--storage", "disk",
                 "--ttl", "5" if name == "short" else "3600")
    gestvenv(host, "run", "--env", "kept-a", "--", "python", "-c", "print('used')")
    loops = create_capped(host)
    before = env_dirs(host)
    assert len(before) == 4, before  # capped-disk's dir among them
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
    deadline = booted + BOOT_SWEEP + 20
    while env_dirs(host) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = env_dirs(host)
    print(f"orphans gone {time.monotonic() - booted:.1f}s after the boot "
          f"(OnBootSec={BOOT_SWEEP}s); left: {left}")
    assert left == []
    log = journal(host, "gestvenv-cleanup.service")
    for orphan in before:
        assert f"removed orphan {DISK_ROOT}/{orphan}" in log, log
    # The timer goes on after the boot sweep.
    status = gestvenv(host, "ephemeral", "timer", "status")
    assert "active" in status, status
    nothing_capped_left(host, loops)


def test_a_clean_reboot_reaps_envs_at_shutdown(host: SystemdHost) -> None:
    gestvenv(host, "ephemeral", "create", "until-shutdown", "--storage", "disk", "--ttl", "3600")
    loops = create_capped(host)
    assert len(env_dirs(host)) == 2
    host.reboot(crash=False)
    # Checked at once, before any timer could have run: the env unit's stop action did it.
    assert env_dirs(host) == []
    nothing_capped_left(host, loops)
    assert "gestvenv-until-shutdown" not in host.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend"]).stdout
