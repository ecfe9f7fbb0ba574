"""gestvenv-cleanup.timer: systemd runs the sweep (expired, idle, orphans) by itself.

Under the systemd runtime no gestvenv process stays between commands, so what a crash or a power
loss leaves (state files, env dirs) would wait for someone to run a cleanup: this timer is that
someone, every ``cleanup_interval`` seconds and at boot (``OnBootSec=``; a monotonic time already
past when the timer starts elapses at once, so a user manager started at login sweeps too).

One rendering serves the system manager (root's environments) and user managers (a user's own).
A distro package installs the units itself (``/usr/lib/systemd/{system,user}``): ``install`` then
only adds a drop-in when the interval differs. Otherwise it writes both units into the admin dir
(``/etc/systemd/system``, ``$XDG_CONFIG_HOME/systemd/user``), each carrying :data:`MARKER`, and
``uninstall`` removes only files that carry it. Everything goes over D-Bus (no ``systemctl``).

The checked-in ``systemd/`` files are the rendering for a distro install (see
:mod:`gestvenv.distfiles`, which writes them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .exceptions import GestvenvError, RuntimeUnavailableError, SystemdError, ValidationError
from .runtime.systemd import systemd_booted
from .runtime.systemd.bus import (
    MANAGER,
    MANAGER_PATH,
    PROPERTIES,
    SERVICE,
    UNIT,
    NoSuchUnit,
    SystemdBus,
    connection,
)

SERVICE_UNIT = "gestvenv-cleanup.service"
TIMER_UNIT = "gestvenv-cleanup.timer"
DROP_IN = "50-interval.conf"
TIMER = "org.freedesktop.systemd1.Timer"
# --quiet: a sweep with nothing to do writes nothing to the journal, every minute.
CLEANUP_ARGS = ("ephemeral", "cleanup", "--expired", "--idle", "--orphans", "--quiet")
DISTRO_EXEC = ("/usr/bin/gestvenv",)
BOOT_DELAY = 10  # seconds: the first sweep after boot waits for the rest of the boot
# Files install writes carry this line; uninstall removes no file without it.
MARKER = "# gestvenv-managed: written by `gestvenv ephemeral timer install`, " \
         "removed by `gestvenv ephemeral timer uninstall`"
_HEADER = ("# gestvenv's cleanup timer, as a distro package installs it. Generated from "
           "gestvenv/timer.py:\n#   python -m gestvenv.distfiles --write systemd/\n")
# Where a distro package puts units, by manager (user=True: user managers). Debian 12 still
# installs system units under /lib; tests point these elsewhere.
PACKAGE_DIRS: dict[bool, tuple[Path, ...]] = {
    False: (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")),
    True: (Path("/usr/lib/systemd/user"),),
}
SYSTEM_ADMIN_DIR = Path("/etc/systemd/system")
_ROOT_HINT = " (the system manager's units are root's; --user installs your own)"
_USEC_INFINITY = 2**64 - 1  # "never": a timer whose service is running, or stopped
_WATCHDOG = ("the local runtime's watchdog does this job (it sweeps expired, idle and orphaned "
             "environments itself)")


# --- rendering (pure) ------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_@%$+=:,./-]+")


def quote(arg: str) -> str:
    """One ExecStart= word: ``%`` and ``$`` doubled (specifiers, variables), and double quotes
    with C escapes around anything else than plain characters (spaces, quotes, a lone ``;``)."""
    if "\0" in arg:
        raise ValidationError(f"a command argument cannot hold a NUL byte: {arg!r}")
    text = arg.replace("%", "%%").replace("$", "$$")
    if _BARE.fullmatch(arg):
        return text
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = "".join(escapes.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x20 or c == "\x7f" else c)
                  for c in text)
    return f'"{out}"'


def render_service(exec_argv: Sequence[str]) -> str:
    argv = [*exec_argv, *CLEANUP_ARGS]
    if not exec_argv or not os.path.isabs(exec_argv[0]):
        raise ValidationError(f"the command must start with an absolute path, not {argv[0]!r}")
    return (
        "[Unit]\n"
        "Description=gestvenv: remove expired, idle and orphaned ephemeral environments\n"
        "Documentation=man:gestvenv-ephemeral(1)\n"
        "After=local-fs.target\n"
        "# Only where gestvenv was used: its state dir (since boot or login), its disk root\n"
        "# (orphans after a power loss) or a config file (which may name another root). Other\n"
        "# users' managers skip the sweep without starting Python.\n"
        "ConditionPathExists=|%t/gestvenv/envs\n"
        "ConditionPathExists=|%C/gestvenv/envs\n"
        "ConditionPathExists=|%E/gestvenv/config.toml\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={' '.join(quote(a) for a in argv)}\n"
        "# A sweep that hangs (it should not: env dirs are read without blocking) must not stop\n"
        "# every later one: a oneshot has no start timeout by default.\n"
        "TimeoutStartSec=10min\n"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
        "# The journal gets what was removed, and failures; not three lines a minute about\n"
        "# starting and finishing (the manager's own lines about the unit are info).\n"
        "SyslogLevel=notice\n"
        "LogLevelMax=notice\n"
    )


def _check_interval(interval: int) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValidationError(f"the interval must be a whole number of seconds >= 1, "
                              f"not {interval!r}")


def render_timer(interval: int) -> str:
    _check_interval(interval)
    return (
        "[Unit]\n"
        "Description=gestvenv: sweep ephemeral environments periodically and at boot\n"
        "\n"
        "[Timer]\n"
        f"OnBootSec={BOOT_DELAY}s\n"
        f"OnUnitActiveSec={interval}s\n"
        "AccuracySec=1s\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def render_drop_in(interval: int) -> str:
    """The interval over a packaged timer. An empty assignment resets every monotonic timer of
    the unit, OnBootSec= included, so that one is set again."""
    _check_interval(interval)
    return (f"{MARKER}\n[Timer]\nOnUnitActiveSec=\nOnBootSec={BOOT_DELAY}s\n"
            f"OnUnitActiveSec={interval}s\n")


def packaged_units() -> dict[str, str]:
    """The ``systemd/`` files of the source tree: what a distro package installs."""
    interval = Config().cleanup_interval
    return {SERVICE_UNIT: _HEADER + render_service(DISTRO_EXEC),
            TIMER_UNIT: _HEADER + render_timer(interval)}


# --- files -----------------------------------------------------------------------------------

def admin_dir(user: bool) -> Path:
    if not user:
        return SYSTEM_ADMIN_DIR
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def packaged_timer(user: bool) -> Path | None:
    """The timer a distro package installed for this kind of manager, if any."""
    return next((d / TIMER_UNIT for d in PACKAGE_DIRS[user] if (d / TIMER_UNIT).is_file()), None)


def _seconds(value: str) -> int | None:
    """A systemd time span as written in our files ("60s", "60", "2min"); None if fancier."""
    match = re.fullmatch(r"(\d+)\s*(s|sec|m|min|h)?", value.strip())
    if not match:
        return None
    return int(match[1]) * {"m": 60, "min": 60, "h": 3600}.get(match[2] or "s", 1)


def interval_in(path: Path) -> int | None:
    """The last OnUnitActiveSec= of a timer file (None: not set, or not a plain span)."""
    found = None
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "OnUnitActiveSec":
                found = _seconds(value) if value.strip() else None
    return found


def is_ours(path: Path) -> bool:
    """The file carries gestvenv's marker (a symlink never counts: install writes none)."""
    try:
        return not path.is_symlink() and MARKER in path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False


def default_exec_argv() -> list[str]:
    """This very gestvenv: the interpreter running it (a venv's included) with ``-m``, and the
    PYTHONPATH it was found through, if any (a manager's services do not inherit ours)."""
    argv = [sys.executable, "-m", "gestvenv"]
    entries = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return ["/usr/bin/env", f"PYTHONPATH={':'.join(entries)}", *argv] if entries else argv


@dataclass(frozen=True)
class FilePlan:
    """What install does to the files: ``mode`` is "package" (the distro's units, a drop-in at
    most) or "units" (both units written into the admin dir)."""

    mode: str
    packaged: Path | None
    write: dict[Path, str]                            # files to (re)write: content differs
    unchanged: list[Path] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)  # files of ours no longer wanted


def our_paths(user: bool) -> list[Path]:
    """Every file install may write for this manager."""
    base = admin_dir(user)
    return [base / SERVICE_UNIT, base / TIMER_UNIT, base / f"{TIMER_UNIT}.d" / DROP_IN]


def plan_files(*, user: bool, interval: int,
               exec_argv: Sequence[str] | None = None) -> FilePlan:
    """Decide what install writes and removes; refuse to overwrite a file that is not ours."""
    service, timer, drop_in = our_paths(user)
    packaged = packaged_timer(user)
    wanted: dict[Path, str]
    if packaged is not None:
        # The package's units stay authoritative; a full unit of ours in /etc would shadow them.
        wanted = {} if interval_in(packaged) == interval else {drop_in: render_drop_in(interval)}
    else:
        argv = list(exec_argv) if exec_argv is not None else default_exec_argv()
        wanted = {service: f"{MARKER}\n{render_service(argv)}",
                  timer: f"{MARKER}\n{render_timer(interval)}"}
    write, unchanged, remove = {}, [], []
    for path in (service, timer, drop_in):
        exists = path.exists() or path.is_symlink()
        if path in wanted:
            if exists and not is_ours(path):
                raise GestvenvError(
                    f"{path} exists and was not written by gestvenv; remove it, or keep it and "
                    "do not install gestvenv's")
            if exists and path.read_text() == wanted[path]:
                unchanged.append(path)
            else:
                write[path] = wanted[path]
        elif exists and is_ours(path):
            remove.append(path)
    return FilePlan("package" if packaged else "units", packaged, write, unchanged, remove)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)  # systemd never reads half a file
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise GestvenvError(f"cannot write {path}: {exc.strerror}"
                            f"{_ROOT_HINT if exc.errno in (errno.EACCES, errno.EPERM) else ''}"
                            ) from None


def _remove(paths: Sequence[Path]) -> list[Path]:
    removed = []
    for path in paths:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise GestvenvError(f"cannot remove {path}: {exc.strerror}"
                                f"{_ROOT_HINT if exc.errno in (errno.EACCES, errno.EPERM) else ''}"
                                ) from None
        if path.parent.name.endswith(".d"):
            with contextlib.suppress(OSError):  # only when empty: other drop-ins stay
                path.parent.rmdir()
    return removed


def _unique(paths: Sequence[Path]) -> dict[Path, None]:
    """Paths in order, each file once (on merged-/usr hosts /lib/systemd is /usr/lib/systemd)."""
    seen: dict[Path, Path] = {}
    for path in paths:
        seen.setdefault(path.resolve(), path)
    return dict.fromkeys(seen.values())


def remove_our_files(user: bool) -> tuple[list[Path], list[Path]]:
    """Remove what install wrote: (removed, left alone because not gestvenv's)."""
    ours = [p for p in our_paths(user) if is_ours(p)]
    foreign = [p for p in our_paths(user) if (p.exists() or p.is_symlink()) and p not in ours]
    return _remove(ours), foreign


# --- the manager -----------------------------------------------------------------------------

def _which(user: bool) -> str:
    return "your user manager" if user else "the system manager"


async def _manager(user: bool) -> SystemdBus:
    if not systemd_booted():
        raise RuntimeUnavailableError(
            f"systemd is not PID 1 on this host, so no manager can run {TIMER_UNIT}; without "
            f"systemd, {_WATCHDOG}")
    try:
        return await connection(user)
    except RuntimeUnavailableError as exc:
        raise RuntimeUnavailableError(f"{exc}; without a manager, {_WATCHDOG}") from None


async def _manager_call(bus: SystemdBus, member: str, signature: str, body: Sequence[Any],
                        what: str) -> list[Any]:
    return await bus.call(MANAGER_PATH, MANAGER, member, signature, body, what=what)


async def _check_search_path(bus: SystemdBus, user: bool) -> None:
    """Files in a dir the manager does not read would do nothing: say so before writing (a
    user manager reads the XDG_CONFIG_HOME it started with, not ours)."""
    unit_path = {Path(p) for p in await bus.manager_property("UnitPath")}
    target = admin_dir(user)
    if target not in unit_path:
        raise GestvenvError(
            f"{_which(user)} does not read unit files from {target} (is XDG_CONFIG_HOME the "
            "one it started with?); nothing was written")


async def _job(bus: SystemdBus, member: str, unit: str) -> None:
    (job,) = await _manager_call(bus, member, "ss", [unit, "replace"], f"{member} {unit}")
    result = await bus.wait_job(job)
    if result != "done":
        raise SystemdError(f"{member} {unit}: the job ended with {result!r}")


async def _settle_service(bus: SystemdBus, timeout: float = 120.0) -> None:
    """Let a running sweep finish instead of stopping it: one killed between the deletion of an
    env dir's claim and of the rest would leave a dir no later sweep recognises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            path = await bus.get_unit(SERVICE_UNIT)
            state = await bus.get(path, UNIT, "ActiveState")
        except NoSuchUnit:
            return
        if state not in ("activating", "deactivating", "reloading"):
            return
        await asyncio.sleep(0.1)
    await bus.stop_unit(SERVICE_UNIT)


@dataclass(frozen=True)
class TimerStatus:
    """The timer as its manager sees it."""

    manager: str                       # "system" or "user"
    unit_file: str | None              # where the timer is loaded (or would be) from
    source: str                        # "gestvenv" (install wrote it), "package", "other", "none"
    drop_ins: list[str]
    enabled: str | None                # UnitFileState: enabled, disabled... (None: no file)
    active: str                        # the timer's ActiveState ("inactive" when not loaded)
    sub_state: str                     # waiting, running (a sweep is on), elapsed, dead
    interval: float | None             # OnUnitActiveSec, seconds, as systemd has it
    next_elapse_in: float | None       # seconds from now to the next sweep
    last_trigger: float | None         # epoch seconds of the last sweep the timer started
    last_result: str | None            # the service's Result for its last run (None: never ran)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InstallReport:
    mode: str                          # "package" (drop-in at most) or "units" (both written)
    written: list[str]
    unchanged: list[str]
    removed: list[str]
    status: TimerStatus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UninstallReport:
    removed: list[str]                 # files gestvenv had written
    kept: list[str]                    # unit files that are not gestvenv's (a package's...)
    disabled: list[str]                # symlinks systemd removed
    status: TimerStatus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source(path: str | None, user: bool) -> str:
    if not path:
        return "none"
    if is_ours(Path(path)):
        return "gestvenv"
    if any(Path(path).parent == d for d in PACKAGE_DIRS[user]):
        return "package"
    return "other"


async def _status(bus: SystemdBus, user: bool) -> TimerStatus:
    try:
        (enabled,) = await _manager_call(bus, "GetUnitFileState", "s", [TIMER_UNIT],
                                         f"reading the state of {TIMER_UNIT}")
    except (NoSuchUnit, SystemdError):  # no unit file anywhere in the search path
        enabled = None
    on_disk = admin_dir(user) / TIMER_UNIT
    unit_file = str(on_disk) if on_disk.is_file() else (
        str(p) if (p := packaged_timer(user)) else None)
    drop_dir = admin_dir(user) / f"{TIMER_UNIT}.d"
    drop_ins = sorted(str(p) for p in drop_dir.glob("*.conf")) if drop_dir.is_dir() else []
    active, sub, interval, next_in, last, result = "inactive", "dead", None, None, None, None
    try:
        path = await bus.get_unit(TIMER_UNIT)
    except NoSuchUnit:
        path = None
    if path is not None:
        (unit,) = await bus.call(path, PROPERTIES, "GetAll", "s", [UNIT],
                                 what=f"reading {TIMER_UNIT}")
        (timer,) = await bus.call(path, PROPERTIES, "GetAll", "s", [TIMER],
                                  what=f"reading {TIMER_UNIT}")
        active, sub = str(unit["ActiveState"].value), str(unit["SubState"].value)
        unit_file = str(unit["FragmentPath"].value) or unit_file
        drop_ins = [str(p) for p in unit["DropInPaths"].value]
        for base, value, _next in timer["TimersMonotonic"].value:
            if base == "OnUnitActiveUSec":
                interval = value / 1e6
        if 0 < (elapse := timer["NextElapseUSecMonotonic"].value) < _USEC_INFINITY:
            next_in = max(0.0, elapse / 1e6 - time.monotonic())
        last = (timer["LastTriggerUSec"].value / 1e6) or None
        with contextlib.suppress(NoSuchUnit):
            service = await bus.get_unit(SERVICE_UNIT)
            if await bus.get(service, UNIT, "InactiveExitTimestamp"):  # it has run
                result = str(await bus.get(service, SERVICE, "Result"))
    return TimerStatus("user" if user else "system", unit_file, _source(unit_file, user),
                       drop_ins, enabled and str(enabled), active, sub, interval, next_in, last,
                       result)


async def status(*, user: bool) -> TimerStatus:
    return await _status(await _manager(user), user)


async def install(*, user: bool, interval: int,
                  exec_argv: Sequence[str] | None = None) -> InstallReport:
    """Install (or update) and enable the timer, and restart it so the interval applies now.

    Idempotent: a second run with the same settings rewrites nothing."""
    _check_interval(interval)
    plan = plan_files(user=user, interval=interval, exec_argv=exec_argv)
    bus = await _manager(user)
    await _check_search_path(bus, user)
    for path, text in plan.write.items():
        _write(path, text)
    removed = _remove(plan.remove)
    # Enable works on the files; the reload after it makes the manager see files and links.
    await _manager_call(bus, "EnableUnitFiles", "asbb", [[TIMER_UNIT], False, True],
                        f"enabling {TIMER_UNIT}")
    await _manager_call(bus, "Reload", "", [], "reloading systemd's units")
    await _job(bus, "RestartUnit", TIMER_UNIT)
    return InstallReport(plan.mode, [str(p) for p in plan.write],
                         [str(p) for p in plan.unchanged], [str(p) for p in removed],
                         await _status(bus, user))


async def uninstall(*, user: bool) -> UninstallReport:
    """Stop and disable the timer and remove the files install wrote (a package's stay)."""
    bus = await _manager(user)
    await bus.stop_unit(TIMER_UNIT)
    await _settle_service(bus)
    try:
        (changes,) = await _manager_call(bus, "DisableUnitFiles", "asb", [[TIMER_UNIT], False],
                                         f"disabling {TIMER_UNIT}")
    except (NoSuchUnit, SystemdError) as exc:
        if isinstance(exc, SystemdError) and not exc.dbus_name.endswith(
                ("NoSuchUnit", "FileNotFound")):
            raise
        changes = []  # no unit file: nothing is enabled
    removed, kept = remove_our_files(user)
    kept += [d / name for d in PACKAGE_DIRS[user] for name in (SERVICE_UNIT, TIMER_UNIT)
             if (d / name).is_file()]
    kept = list(_unique(kept))
    await _manager_call(bus, "Reload", "", [], "reloading systemd's units")
    for unit in (TIMER_UNIT, SERVICE_UNIT):
        await bus.reset_failed(unit)  # a failed unit would stay loaded
    return UninstallReport([str(p) for p in removed], [str(p) for p in kept],
                           [str(c[1]) for c in changes], await _status(bus, user))
