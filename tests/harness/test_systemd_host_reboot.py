"""The test host's reboots on a persistent disk (tests/harness/systemd_host.py, ``persist``).

Boots real test hosts, so: root, on a machine whose PID 1 is not systemd (inside a test host,
where the whole suite runs again, these are skipped), with the host's systemd and dbus.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.systemd_host import CHECKOUT, DEFAULT_BASE, HostError, SystemdHost


def _pid1_is_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


needs_test_host = pytest.mark.skipif(
    os.geteuid() != 0 or _pid1_is_systemd() or not Path("/lib/systemd/systemd").exists()
    or shutil.which("dbus-daemon") is None,
    reason="boots a test host: needs root, systemd and dbus installed, and PID 1 not systemd",
)


def _leftovers(name: str) -> list[str]:
    """Everything of host ``name`` on this machine: mounts, cgroups, processes in its cgroups,
    the disk and the overlay's directories (the state dir's logs and lock are no leftovers)."""
    state = DEFAULT_BASE / name
    left = [f"mount: {line}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if f"gvh-{name} " in line or f"gvh-persist.{name} " in line or f"{state}/" in line]
    cgroups = sorted(Path("/sys/fs/cgroup").glob(f"*/gv-{name}"))
    left += [f"cgroup: {cg}" for cg in cgroups]
    in_its_cgroups = re.compile(rf":/gv-{re.escape(name)}(/|$)", re.M)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if in_its_cgroups.search((proc / "cgroup").read_text()):
                    left.append(f"process: {proc.name}")
            except OSError:
                continue
    left += [f"dir: {state / d}" for d in ("persist", "root", "rw") if (state / d).exists()]
    return left


def _only_the_disk(left: list[str], name: str) -> bool:
    """``left`` (from _leftovers) is the kept persistent disk: its mount and directory."""
    disk = DEFAULT_BASE / name / "persist"
    return (len(left) == 2 and left[0].startswith("mount: ")
            and f" {disk} " in left[0] and f" tmpfs gvh-persist.{name} " in left[0]
            and left[1] == f"dir: {disk}")


def _in(host: SystemdHost, script: str, user: str | None = None) -> str:
    return host.run(["/bin/sh", "-c", script], user=user, check=True, timeout=30).stdout


def _system_state(bus_address: str) -> str:
    """systemd's SystemState, over the system bus from this (host) side."""
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from dbus_next.message import Message
    from dbus_next.signature import Variant

    async def get() -> str:
        bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
        try:
            reply = await bus.call(Message(
                destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                interface="org.freedesktop.DBus.Properties", member="Get",
                signature="ss", body=["org.freedesktop.systemd1.Manager", "SystemState"]))
            assert reply is not None
            value = reply.body[0]
            assert isinstance(value, Variant), reply.body
            return str(value.value)
        finally:
            bus.disconnect()  # type: ignore[no-untyped-call]
    return asyncio.run(get())


def _check_up(host: SystemdHost) -> None:
    """systemd is running, and so is gvtest's user manager (with its bus)."""
    assert _in(host, "systemctl is-system-running || true").strip() in ("running", "degraded")
    assert _in(host, "systemctl is-active user@4242.service").strip() == "active"
    state = _in(host, "systemctl --user is-system-running || true", user="gvtest").strip()
    assert state in ("running", "degraded"), state
    assert _system_state(host.bus_address) in ("running", "degraded")


WRITE = ("echo disk > /var/cache/gv-reboot && echo run > /run/gv-reboot && "
         "echo tmp > /tmp/gv-reboot && echo shm > /dev/shm/gv-reboot && "
         "echo home > /home/gvtest/gv-reboot")
SURVIVORS = ("ls -1d /var/cache/gv-reboot /home/gvtest/gv-reboot /run/gv-reboot /tmp/gv-reboot "
             "/dev/shm/gv-reboot /var/cache/stopped 2>/dev/null || true")
ON_DISK = sorted(["/var/cache/gv-reboot", "/home/gvtest/gv-reboot"])
STOP_POST = ["systemd-run", "--quiet", "--unit", "gv-reboot-probe",
             "-p", "ExecStopPost=/bin/touch /var/cache/stopped", "sleep", "infinity"]


@pytest.mark.slow
@needs_test_host
def test_reboot_keeps_the_disk_and_starts_run_tmp_and_units_afresh() -> None:
    name = f"gvreboot-{os.getpid()}"
    host = SystemdHost(name=name, persist=True)
    with host:
        assert host.disk_mounted
        machine_id = _in(host, "cat /etc/machine-id")
        own = Path("/etc/machine-id")
        assert not own.exists() or machine_id != own.read_text()  # a fresh one for a new disk
        bus = host.bus_address
        _check_up(host)
        _in(host, WRITE)
        host.run(STOP_POST, check=True, timeout=30)
        first_pid = host.pid

        # A power loss: nothing is stopped, so the unit's ExecStopPost= never runs.
        host.reboot(crash=True)
        assert host.pid != first_pid
        assert host.reboot_seconds is not None and host.reboot_seconds < 15
        assert sorted(_in(host, SURVIVORS).split()) == ON_DISK
        assert _in(host, "cat /etc/machine-id") == machine_id
        assert host.bus_address == bus
        _check_up(host)

        # A clean reboot: systemd's poweroff stops the unit, its ExecStopPost= runs.
        host.run(STOP_POST, check=True, timeout=30)
        _in(host, WRITE)
        host.reboot(crash=False)
        assert sorted(_in(host, SURVIVORS).split()) == sorted([*ON_DISK, "/var/cache/stopped"])
        assert _in(host, "cat /etc/machine-id") == machine_id
        assert host.bus_address == bus
        _check_up(host)
    # Leaving the block purged the disk: nothing of the host is left.
    assert _leftovers(name) == []
    assert not host.disk_mounted
    shutil.rmtree(host.state_dir)  # its logs and lock


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tests.harness.systemd_host", *args],
                          cwd=CHECKOUT, capture_output=True, text=True, timeout=120,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


@pytest.mark.slow
@needs_test_host
def test_cli_boot_persist_reboot_stop_keeps_the_disk_purge_removes_it() -> None:
    name = f"gvrebootcli-{os.getpid()}"
    try:
        _cli("boot", "--name", name, "--persist")
        _cli("exec", name, "--", "touch", "/var/cache/gv-cli", "/run/gv-cli")
        out = _cli("reboot", name, "--crash").stdout
        assert "rebooted (crash)" in out
        _cli("exec", name, "--", "test", "-e", "/var/cache/gv-cli")
        assert _cli("exec", name, "--", "test", "-e", "/run/gv-cli", check=False).returncode == 1

        # A stop keeps the disk (the one thing left), a boot of that name boots on it.
        assert "kept" in _cli("stop", name).stderr
        assert _only_the_disk(_leftovers(name), name), _leftovers(name)
        assert SystemdHost(name, checkout=None).disk_mounted
        _cli("boot", "--name", name, "--persist")
        _cli("exec", name, "--", "test", "-e", "/var/cache/gv-cli")

        # What a crashed harness run leaves (a running host, its disk) goes with a kill, a purge.
        _cli("stop", name, "--kill")
        assert _only_the_disk(_leftovers(name), name), _leftovers(name)
        _cli("stop", name, "--purge")
        assert _leftovers(name) == []
    finally:
        _cli("stop", name, "--kill", "--purge", check=False)
    assert _leftovers(name) == []
    shutil.rmtree(DEFAULT_BASE / name)


def test_reboot_needs_a_persistent_disk() -> None:
    with pytest.raises(HostError, match="persist"):
        SystemdHost(name="gvreboot-none", checkout=None).reboot()
