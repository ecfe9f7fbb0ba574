"""Reading the kernel's cgroup files where systemd's D-Bus properties fall short.

systemd reports MemoryCurrent and TasksCurrent everywhere, but on a hybrid (v1 + v2) host
CPUUsageNSec stays unset (cpu and cpuacct are separate hierarchies) and an OOM kill inside a
slice is reported as a plain SIGKILL (Result=signal). So: CPU time from cpu.stat / cpuacct.usage,
and OOM kills from the slice's memory.events (v2) or an eventfd on memory.oom_control (v1).
Peak memory too: systemd 252 has no MemoryPeak property, so it is the kernel's high-water mark,
memory.peak (v2) or memory.max_usage_in_bytes (v1).
"""

from __future__ import annotations

import os
from pathlib import Path

from ... import reaper

CGROUP_ROOT = Path("/sys/fs/cgroup")


def is_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def unified_root() -> Path | None:
    """The cgroup2 hierarchy: the root on pure v2, ``unified/`` on a hybrid host."""
    if is_v2():
        return CGROUP_ROOT
    unified = CGROUP_ROOT / "unified"
    return unified if (unified / "cgroup.procs").exists() else None


def _dir(root: Path, cgroup: str) -> Path:
    return root / cgroup.lstrip("/")


def system_controllers() -> frozenset[str]:
    """Controllers the system manager can use: the root's on v2, the mounted v1 hierarchies
    on a hybrid host."""
    if is_v2():
        try:
            return frozenset((CGROUP_ROOT / "cgroup.controllers").read_text().split())
        except OSError:
            return frozenset()
    return frozenset(c for c in ("cpu", "memory", "pids")
                     if (CGROUP_ROOT / c / "cgroup.procs").exists())


def delegated_controllers(cgroup: str) -> frozenset[str]:
    """Controllers delegated to a (user) manager whose root cgroup is ``cgroup``: only the
    unified hierarchy can be delegated, so on a hybrid host that is usually none."""
    root = unified_root()
    if root is None:
        return frozenset()
    try:
        return frozenset((_dir(root, cgroup) / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def swap_active() -> bool:
    try:
        return len(Path("/proc/swaps").read_text().splitlines()) > 1
    except OSError:
        return False


def user_namespaces_allowed() -> bool:
    try:
        if int(Path("/proc/sys/user/max_user_namespaces").read_text()) <= 0:
            return False
    except (OSError, ValueError):
        return False
    try:
        return Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() != "0"
    except OSError:
        return True  # the knob is Debian's; without it the kernel allows them


def cpu_seconds(cgroup: str) -> float | None:
    """CPU time used by everything in ``cgroup`` (the reaper's reading: it says the env's at
    its end, without this package)."""
    return reaper.cgroup_cpu_seconds(cgroup, CGROUP_ROOT)


def memory_current(cgroup: str) -> int | None:
    """Memory charged to ``cgroup`` and below now (None: no memory controller there)."""
    return reaper.cgroup_memory(cgroup, "memory.current", "memory.usage_in_bytes", CGROUP_ROOT)


def memory_peak(cgroup: str) -> int | None:
    """The highest memory charged to ``cgroup`` and below since it was made (None: no memory
    controller there, or a kernel before 5.19 on v2)."""
    return reaper.cgroup_memory(cgroup, "memory.peak", "memory.max_usage_in_bytes",
                                CGROUP_ROOT)


def pids(cgroup: str) -> list[int]:
    """Every process in ``cgroup`` and below."""
    root = unified_root() or CGROUP_ROOT / "systemd"
    base = _dir(root, cgroup)
    found: list[int] = []
    for dirpath, _dirs, files in os.walk(base):
        if "cgroup.procs" in files:
            try:
                found += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
    return found


class OomWatch:
    """Did the kernel OOM-kill anything in a cgroup (and below) since this was opened?"""

    def __init__(self, cgroup: str) -> None:
        self._events: Path | None = None
        self._base = Path("/nonexistent")
        self._baseline = 0
        self._eventfd: int | None = None
        if is_v2():
            self._events = _dir(CGROUP_ROOT, cgroup) / "memory.events"
            self._baseline = self._oom_kills()
            return
        # v1: the OOM counter lives in the victim's own (short-lived) cgroup, but the cgroup
        # whose limit was hit notifies an eventfd registered on its memory.oom_control.
        base = _dir(CGROUP_ROOT / "memory", cgroup)
        self._base = base
        control = None
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            return
        try:
            control = os.open(base / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            with open(base / "cgroup.event_control", "w") as f:
                f.write(f"{efd} {control}")
            self._eventfd = efd
        except OSError:
            os.close(efd)
        finally:
            if control is not None:
                os.close(control)

    def _oom_kills(self) -> int:
        if self._events is None:
            return 0
        try:
            for line in self._events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def fired(self) -> bool:
        if self._events is not None:
            return self._oom_kills() > self._baseline
        if self._eventfd is not None:
            try:
                notified = os.eventfd_read(self._eventfd) > 0
            except OSError:  # (BlockingIOError: not notified)
                return False
            # v1 also notifies when the cgroup is removed: the env ended (its TTL, a stop)
            # while the command's end was being read. That is no OOM kill.
            return notified and self._base.is_dir()
        return False

    def close(self) -> None:
        if self._eventfd is not None:
            os.close(self._eventfd)
            self._eventfd = None


class Meter:
    """Peak memory and CPU time in a cgroup from now to :meth:`end`: one command's figures
    where systemd forgets a finished service's (before 256), read from its env's slice.

    CPU: the slice's counter, before and after. Peak: the kernel's high-water mark, reset
    now: on v2 through a descriptor of our own on memory.peak (Linux 6.12: a write resets the
    peak seen through that descriptor only, nobody else's), on v1 by writing 0 to
    memory.max_usage_in_bytes (which resets the slice's own: on a v1 host the env's peak is
    then "since its last command began"). Either counts all the slice holds while the command
    runs (its tmpfs files, page cache): the runtime reports nothing when another command of
    the env overlapped. Without the files (no memory controller, an older v2 kernel): None.
    """

    def __init__(self, cgroup: str) -> None:
        self._cgroup = cgroup
        self._cpu = cpu_seconds(cgroup)
        self._fd: int | None = None
        self._v1: Path | None = None
        if is_v2():
            try:
                fd = os.open(_dir(CGROUP_ROOT, cgroup) / "memory.peak", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return
            try:
                os.write(fd, b"reset\n")
            except OSError:  # a kernel before 6.12: the peak cannot be reset per reader
                os.close(fd)
                return
            self._fd = fd
            return
        path = _dir(CGROUP_ROOT / "memory", cgroup) / "memory.max_usage_in_bytes"
        try:
            path.write_text("0\n")
        except OSError:
            return
        self._v1 = path

    def end(self) -> tuple[int | None, float | None]:
        """(peak memory bytes, CPU seconds) since this was made; closes it."""
        peak: int | None = None
        try:
            if self._fd is not None:
                peak = int(os.pread(self._fd, 64, 0))
            elif self._v1 is not None:
                peak = int(self._v1.read_text())
        except (OSError, ValueError):
            peak = None
        finally:
            self.close()
        cpu = cpu_seconds(self._cgroup)
        used = cpu - self._cpu if cpu is not None and self._cpu is not None else None
        return peak, used

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
