"""A reboot of a real systemd host with DISK-backed environments on its persistent disk.

Runs on the bare host (root, systemd not PID 1): it boots its own test host with a persistent
disk (tests/harness/systemd_host.py, ``persist=True``), installs gestvenv's cleanup timer there
as a user would (``gestvenv ephemeral timer install``), creates environments, and reboots it:

- a power loss (SIGKILL of its systemd): no unit is stopped, no reaper runs, the envs' dirs
  stay on the disk while their state (in /run) and units are gone. After the boot, the timer's
  first run (OnBootSec=) removes them: nobody runs a gestvenv command;
- a clean reboot: systemd stops the env units at shutdown and their stop action (the reaper)
  deletes the files then, before the next boot.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator

import pytest

from gestvenv.runtime.systemd import systemd_booted
from tests.harness.systemd_host import SystemdHost

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


def gestvenv(host: SystemdHost, *args: str) -> str:
    done = host.run([PY, "-m", "gestvenv", *args], timeout=120)
    assert done.returncode == 0, f"gestvenv {' '.join(args)}: {done.stderr}"
    return done.stdout


def env_dirs(host: SystemdHost) -> list[str]:
    done = host.run(["ls", "-A", DISK_ROOT], check=True)
    return sorted(n for n in done.stdout.split() if n != ".gestvenv-root")


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
    before = env_dirs(host)
    assert len(before) == 3, before
    host.reboot(crash=True)  # power loss: nothing stopped, nothing reaped
    booted = time.monotonic()
    # The state (in /run) and the transient units died with the boot; the files did not.
    assert host.run(["ls", "/run/gestvenv/envs"]).returncode != 0
    assert env_dirs(host) == before, "a power loss cannot have cleaned anything"
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


def test_a_clean_reboot_reaps_envs_at_shutdown(host: SystemdHost) -> None:
    gestvenv(host, "ephemeral", "create", "until-shutdown", "--storage", "disk", "--ttl", "3600")
    assert len(env_dirs(host)) == 1
    host.reboot(crash=False)
    # Checked at once, before any timer could have run: the env unit's stop action did it.
    assert env_dirs(host) == []
    assert "gestvenv-until-shutdown" not in host.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend"]).stdout
