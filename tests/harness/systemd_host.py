"""A real systemd (PID 1, with its system bus) for the test suite, on a host whose PID 1 isn't.

The development and CI machines run no systemd (their PID 1 is something else; cgroups are a
v1/v2 hybrid), but gestvenv's runtime talks to systemd over the system bus. This harness boots
the host's own systemd 252 as PID 1 of its own pid/mount/cgroup/uts/ipc/net namespaces, on an
overlay of ``/`` with a tmpfs upper layer (never on the host root: systemd-tmpfiles would wipe
the host's /tmp), and runs commands inside, where ``/run/dbus/system_bus_socket`` is a real
system bus, exactly as on a booted machine. The shell stages live in ``systemd_host/`` (boot.sh,
init.sh, enter.sh, stop.sh; their comments say why each step is needed).

Inside: the project checkout at its own absolute path, read-write (so ``.venv/bin/python``
works unchanged); a lingering user ``gvtest`` (uid 4242, only in the overlay) whose user manager
and user bus are up; a private network namespace with ``lo`` up; a 4G memory cap for the whole
host; its own /tmp, /dev/shm and /run.

Reboots: with ``persist`` the writable layer of the root filesystem is a "disk" (a tmpfs that
boot.sh mounts at ``/var/tmp/gestvenv-testhost/NAME/persist`` in the host's mount namespace, so
that it outlives the container; see boot.sh for why it cannot be a plain directory). A reboot
stops the host, either as a power loss (``crash``: SIGKILL of its systemd, nothing is stopped
or cleaned) or cleanly (systemd's poweroff: units are stopped, their ExecStop*= run), keeps the
disk and boots again on it: files under /etc, /var, /home... are still there, /run, /tmp and
/dev/shm are empty again, the machine-id stays, as on a real machine.

Command line (root)::

    python -m tests.harness.systemd_host run [--name N] [--keep] -- CMD...   # boot, CMD, stop
    python -m tests.harness.systemd_host boot [--name N] [--persist]         # for debugging
    python -m tests.harness.systemd_host exec NAME [--user gvtest] -- CMD...
    python -m tests.harness.systemd_host reboot NAME [--crash]               # --persist only
    python -m tests.harness.systemd_host stop NAME [--kill] [--purge]

``stop`` keeps the disk of a ``--persist`` host (``boot --persist --name NAME`` boots on it
again) unless ``--purge``; ``stop NAME --kill --purge`` clears anything a crashed run left.

From Python::

    with SystemdHost() as host:
        host.run(["systemctl", "is-system-running"], check=True)
        host.run(["systemctl", "--user", "is-system-running"], user="gvtest")

    with SystemdHost(name="gvreboot", persist=True) as host:   # leaving it purges the disk
        host.run(["touch", "/var/cache/kept", "/run/gone"], check=True)
        host.reboot(crash=True)                    # or crash=False: a clean poweroff
        host.run(["test", "-e", "/var/cache/kept"], check=True)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TypeVar

STAGES = Path(__file__).resolve().with_name("systemd_host")
#: The checkout this file belongs to: bind-mounted at the same path inside.
CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = Path("/var/tmp/gestvenv-testhost")
TEST_USER = "gvtest"
TEST_UID = 4242
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LEAVES = itertools.count()  # leaf cgroup names gvh-run-<our pid>-<n>, unique per process

T = TypeVar("T")


class HostError(RuntimeError):
    """The test host could not be booted, entered or stopped."""


class HostBusy(HostError):
    """Another harness process (or a detached boot) owns a host of that name."""


class HostLeftovers(HostError):
    """stop() found processes, mounts or cgroups of the host still present."""


def default_name(checkout: Path) -> str:
    """A name per checkout: two clones can run at once, a rerun finds its own stale host."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", checkout.name).strip("-_")[:24] or "host"
    return f"{base}-{hashlib.sha1(str(checkout).encode()).hexdigest()[:6]}"


def cgroup_mounts() -> list[Path]:
    """Mount points of the host's cgroup hierarchies (v1 controllers, name=systemd, cgroup2)."""
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] in ("cgroup", "cgroup2") and fields[1].startswith("/sys/fs/cgroup/"):
                found.append(Path(fields[1]))
    return found


def _starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat; with the PID it identifies a process (PIDs get reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None = None) -> bool:
    """The process exists, is not a zombie (kill -0 succeeds on zombies) and, if given, the
    same process (same start time)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if re.search(r"^State:\s*Z", status, re.M):
        return False
    return start is None or _starttime(pid) == start


def _read_pid(path: Path) -> tuple[int, str] | None:
    try:
        pid, start = path.read_text().split()
        return int(pid), start
    except (OSError, ValueError):
        return None


def _ns_members(links: Sequence[str]) -> list[int]:
    """Host PIDs of the processes in any of the namespaces ("pid:[4026...]", "mnt:[...]")."""
    wanted = set(links)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == "1":
            continue
        for ns in ("pid", "mnt"):
            try:
                if os.readlink(f"/proc/{entry.name}/ns/{ns}") in wanted:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def _kill(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class SystemdHost:
    """A booted systemd in its own namespaces; a context manager (boot on enter, stop on exit).

    ``pid`` is the host PID of its systemd (PID 1 inside), ``name`` its name (hostname inside,
    cgroups ``/sys/fs/cgroup/*/gv-NAME``, state in ``/var/tmp/gestvenv-testhost/NAME``).

    ``persist=True``: the root filesystem's writable layer is a "disk" (``persist_dir``, a
    tmpfs in the host's mount namespace, see boot.sh) that survives :meth:`reboot` and
    :meth:`stop`; a boot of a name whose disk exists boots on it. Leaving the ``with`` block
    purges it (``stop(purge=True)``).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        checkout: str | os.PathLike[str] | None = CHECKOUT,
        base: str | os.PathLike[str] = DEFAULT_BASE,
        net: str = "private",
        memory_limit: str = "4G",
        boot_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        persist: bool = False,
        tmpfs_size: str = "4G",
    ) -> None:
        self.checkout = Path(checkout).resolve() if checkout is not None else None
        self.name = name or default_name(self.checkout or CHECKOUT)
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"bad host name {self.name!r}")
        if net not in ("private", "host"):
            raise ValueError("net must be 'private' or 'host'")
        self.base = Path(base)
        self.state_dir = self.base / self.name
        self.net = net
        self.memory_limit = memory_limit
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.persist = persist
        self.tmpfs_size = tmpfs_size  # the writable layer's tmpfs (a new disk's size), /tmp's
        #: The persistent disk's mount point (``persist=True``), kept across reboots.
        self.persist_dir = self.state_dir / "persist"
        self.pid: int | None = None
        self.boot_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.reboot_seconds: float | None = None
        self._pid_start: str | None = None
        self._lock_fd: int | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._watch_fd: int | None = None
        self._ns_pins: dict[str, int] = {}  # "pid:[...]" -> open fd keeping that namespace

    # -- public API -----------------------------------------------------------------------

    @property
    def bus_address(self) -> str:
        """The system bus, reachable from the host (EXTERNAL auth as uid 0 works).

        With ``persist``, the same address across reboots: ``STATE_DIR/system_bus_socket``, a
        symlink to ``/proc/PID/root/run/dbus/system_bus_socket`` that every boot re-points."""
        self._require_running()
        if self.persist:
            return f"unix:path={self.state_dir}/system_bus_socket"
        return f"unix:path=/proc/{self.pid}/root/run/dbus/system_bus_socket"

    @property
    def disk_mounted(self) -> bool:
        """The persistent disk of this name exists (mounted on the host), booted or not."""
        with open("/proc/self/mountinfo") as mountinfo:
            return any(_is_disk_mount(line, self.name, self.persist_dir) for line in mountinfo)

    @classmethod
    def attach(cls, name: str, *, base: str | os.PathLike[str] = DEFAULT_BASE) -> SystemdHost:
        """A handle on a running host booted elsewhere (``boot`` subcommand, ``run --keep``),
        with the settings it was booted with (checkout, net, memory, persist)."""
        host = cls(name, checkout=None, base=base)
        recorded = _read_pid(host.state_dir / "pid")
        if recorded is None or not _alive(*recorded):
            hint = (f" (its disk {host.persist_dir} is kept: boot --persist --name {name} "
                    f"boots on it, stop {name} --purge removes it)" if host.disk_mounted else "")
            raise HostError(f"host {name} is not running{hint}")
        host.pid, host._pid_start = recorded
        with contextlib.suppress(OSError):
            for line in (host.state_dir / "env").read_text().splitlines():
                key, _, value = line.partition("=")
                if key == "GVH_CHECKOUT" and value:
                    host.checkout = Path(value)
                elif key == "GVH_NET" and value in ("private", "host"):
                    host.net = value
                elif key == "GVH_MEMORY_LIMIT" and value:
                    host.memory_limit = value
                elif key == "GVH_TMPFS_SIZE" and value:
                    host.tmpfs_size = value
                elif key == "GVH_PERSIST":
                    host.persist = value == "1"
        return host

    def boot(self) -> None:
        """Boot (about 1 s); a stale host of the same name left by a killed run is removed first.

        With ``persist``, on the persistent disk of that name if it exists (neither stop()
        without ``purge`` nor the removal of a stale host removes it), else on a new one,
        which is removed again if this boot fails."""
        if self.pid is not None:
            raise HostError(f"host {self.name} already booted")
        self._lock()
        try:
            self._clean_stale()
        except BaseException:
            self._unlock()
            raise
        self._start()

    def reboot(self, *, crash: bool = False) -> None:
        """Reboot on the persistent disk (``persist=True`` only).

        ``crash``: a power loss, SIGKILL of its systemd (no unit is stopped, nothing cleaned
        up); otherwise a clean ``poweroff`` (units stopped, their ExecStop*= run). Either way,
        then verify that nothing but the disk is left (HostLeftovers otherwise) and boot again:
        same name, state dir and ``bus_address``, a new ``pid``. What was written to the root
        filesystem (/etc, /var, /home...) is still there; /run, /tmp and /dev/shm start empty.
        ``reboot_seconds``: stop + boot. A detached host stays detached."""
        if not self.persist:
            raise HostError(f"host {self.name} has no persistent disk (persist=True) to reboot on")
        self._require_running()
        detached = (self.state_dir / "detached").exists()
        if self._lock_fd is None:
            self._lock()  # an attached handle: HostBusy if another harness process owns it
        t0 = time.monotonic()
        try:
            self._disarm_watcher()
            if not self._ns_pins:
                self._pin_namespaces()
            self._teardown(kill=crash)
        except BaseException:
            self._unpin_namespaces()
            self.pid = None
            self._unlock()
            raise
        self._unpin_namespaces()
        self.pid = None
        self._start()
        self.reboot_seconds = time.monotonic() - t0
        if detached:
            self.detach()

    def _start(self) -> None:
        """boot.sh, under the name's lock held by the caller; a failure tears the half-booted
        host down (and removes a disk created for it) and releases the lock."""
        new_disk = self.persist and not self.disk_mounted
        try:
            env = {
                "PATH": _PATH,
                "GVH_BASE": str(self.base),
                "GVH_CHECKOUT": str(self.checkout or ""),
                "GVH_NET": self.net,
                "GVH_MEMORY_LIMIT": self.memory_limit,
                "GVH_TMPFS_SIZE": self.tmpfs_size,
                "GVH_PERSIST": "1" if self.persist else "0",
                "GVH_USER": TEST_USER,
                "GVH_UID": str(TEST_UID),
                "GVH_BOOT_TIMEOUT": str(int(self.boot_timeout)),
            }
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [str(STAGES / "boot.sh"), self.name], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            try:
                out, err = proc.communicate(timeout=self.boot_timeout + 30)
            except BaseException:
                proc.terminate()  # boot.sh traps TERM and tears the half-booted host down
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=30)
                raise
            if proc.returncode != 0:
                raise HostError(f"boot of {self.name} failed:\n{out}{err}".rstrip())
            recorded = _read_pid(self.state_dir / "pid")
            if recorded is None:
                raise HostError(f"boot of {self.name}: no pid recorded")
            self.pid, self._pid_start = recorded
            self._pin_namespaces()
            self._arm_watcher()
            self.boot_seconds = time.monotonic() - t0
        except BaseException:
            self._disarm_watcher()
            with contextlib.suppress(HostError):
                self._teardown(kill=True, purge=new_disk)
            self._unpin_namespaces()
            self.pid = None
            self._unlock()
            raise

    def run(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
        timeout: float | None = None,
        cwd: str | None = None,
        capture_output: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside (all namespaces, the container's root and cgroups).

        The environment is clean: PATH, HOME, USER, LANG=C.UTF-8, TERM, plus ``env``. With
        ``user`` (e.g. ``"gvtest"``) the command runs as that user, with XDG_RUNTIME_DIR and
        DBUS_SESSION_BUS_ADDRESS of its user manager. ``cwd`` defaults to the checkout. Output
        is captured as text unless ``capture_output=False`` (then it goes straight to this
        process's stdout/stderr, and stdin is inherited). On timeout or interruption, and when
        the command returns, every process it left in its leaf cgroup is killed.
        """
        self._require_running()
        if not argv:
            raise ValueError("empty argv")
        leaf = f"gvh-run-{os.getpid()}-{next(_LEAVES)}"
        cmd = [str(STAGES / "enter.sh"), self.name, "-l", leaf,
               "-C", cwd or str(self.checkout or "/")]
        if user is not None:
            cmd += ["-u", user]
        for key, value in (env or {}).items():
            if not _ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"bad environment variable name {key!r}")
            cmd += ["-e", f"{key}={value}"]
        cmd += ["--", *argv]
        outer_env = {"PATH": _PATH, "GVH_BASE": str(self.base),
                     "TERM": os.environ.get("TERM", "dumb")}
        if input is not None:
            stdin: int | None = subprocess.PIPE
        else:
            stdin = subprocess.DEVNULL if capture_output else None
        pipe = subprocess.PIPE if capture_output else None
        proc = subprocess.Popen(cmd, env=outer_env, stdin=stdin, stdout=pipe, stderr=pipe,
                                text=True)
        # Pipes are drained by threads and not waited for EOF before the command itself has
        # ended: a background process holding them would block communicate() forever; it is
        # killed with the leaf instead.
        out: list[str] = []
        err: list[str] = []
        threads = [threading.Thread(target=_drain, args=(s, sink), daemon=True)
                   for s, sink in ((proc.stdout, out), (proc.stderr, err)) if s is not None]
        if proc.stdin is not None:
            threads.append(threading.Thread(target=_feed, args=(proc.stdin, input or ""),
                                            daemon=True))
        for thread in threads:
            thread.start()
        try:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._end(proc, leaf, grace=0.0, sig=signal.SIGKILL)
                self._join(threads)
                raise subprocess.TimeoutExpired(list(argv), timeout or 0.0, "".join(out),
                                                "".join(err)) from None
            except KeyboardInterrupt:
                # From a terminal, the command got the SIGINT too: let it finish (pytest prints
                # its summary), then make sure.
                self._end(proc, leaf, grace=5.0, sig=None)
                raise
            except BaseException:
                self._end(proc, leaf, grace=5.0, sig=signal.SIGTERM)
                raise
        finally:
            self._kill_leaf(leaf)
            self._remove_leaf(leaf)
        self._join(threads)
        result = subprocess.CompletedProcess(list(argv), proc.returncode,
                                             "".join(out) if capture_output else None,
                                             "".join(err) if capture_output else None)
        if check:
            result.check_returncode()
        return result

    def stop(self, *, kill: bool = False, force: bool = False, purge: bool = False) -> None:
        """Stop (graceful poweroff, SIGKILL after ``stop_timeout``; ``kill``: SIGKILL at once),
        remove the cgroups and verify that no process, mount or cgroup is left (HostLeftovers
        otherwise). ``force``: even if another live harness process owns the host.

        The persistent disk of this name, if any, is kept (a later boot with ``persist`` boots
        on it) unless ``purge``: then it is unmounted and removed too, and nothing of the host
        may be left at all. Also works on a host that is not running (stale state)."""
        if self._lock_fd is None:
            try:
                self._lock()
            except HostBusy:
                if not force:
                    raise
        try:
            self._disarm_watcher()
            if self.pid is not None and not self._ns_pins:
                self._pin_namespaces()
            self._teardown(kill=kill, purge=purge)
        finally:
            self._unpin_namespaces()
            self.pid = None
            self._unlock()

    def detach(self) -> None:
        """Leave the host running after this process exits (stop it with ``stop NAME``)."""
        self._require_running()
        (self.state_dir / "detached").write_text(f"{os.getpid()}\n")
        self._disarm_watcher()
        self._unpin_namespaces()
        self._unlock()

    def __enter__(self) -> SystemdHost:
        self.boot()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(purge=self.persist)

    # -- internals ------------------------------------------------------------------------

    def _require_running(self) -> None:
        if self.pid is None or not _alive(self.pid, self._pid_start):
            raise HostError(f"host {self.name} is not running")

    def _lock(self) -> None:
        """One owner per name: a flock held for the owner's lifetime (not inherited by the
        container: Python fds are close-on-exec), so a killed owner releases it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HostBusy(f"host {self.name} is in use by another harness process") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_stale(self) -> None:
        d = self.state_dir
        recorded = _read_pid(d / "pid")
        running = recorded is not None and _alive(*recorded)
        if running and (d / "detached").exists():
            raise HostBusy(f"host {self.name} was booted detached and is running: "
                           f"stop it first (python -m tests.harness.systemd_host stop "
                           f"{self.name})")
        if any((d / f).exists() for f in ("pid", "unshare.pid", "script.pid", "cgroups")):
            print(f"systemd-host: removing stale host {self.name}", file=sys.stderr)
            self._teardown(kill=True)
        foreign = [str(mp / f"gv-{self.name}") for mp in cgroup_mounts()
                   if (mp / f"gv-{self.name}").exists()]
        if foreign:
            raise HostError(f"cgroups not created by this harness exist: {' '.join(foreign)}")

    def _arm_watcher(self) -> None:
        """If this process dies without stop() (SIGKILL, OOM kill), a watcher in its own
        session tears the host down: it waits for EOF on a pipe only we hold, then runs
        ``stop.sh --kill`` under the name's lock (``flock -n``: if a new owner has the lock,
        it is that owner's job to clean a stale host). With ``persist`` also ``--purge``: the
        disk of a crashed harness run is nobody's to boot again (a detached host, whose disk
        is kept on purpose, has no watcher)."""
        read_fd, self._watch_fd = os.pipe()
        log_fd = os.open(self.state_dir / "watch.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o644)
        try:
            self._watcher = subprocess.Popen(
                ["/bin/sh", "-c", 'read -r _; exec flock -n "$@"',
                 "gvh-watch", str(self.state_dir / "lock"), str(STAGES / "stop.sh"),
                 self.name, "--kill", *(["--purge"] if self.persist else [])],
                stdin=read_fd, stdout=log_fd, stderr=subprocess.STDOUT,
                start_new_session=True, env={"PATH": _PATH, "GVH_BASE": str(self.base)},
            )
        finally:
            os.close(read_fd)
            os.close(log_fd)

    def _disarm_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.kill()  # before closing the pipe, which would set it off
            self._watcher.wait()
            self._watcher = None
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None

    def _pin_namespaces(self) -> None:
        """Keep the container's pid and mount namespaces open while a recorded process is
        provably in them: namespace inode numbers are reused once freed, so "every process
        in its namespaces" is only meaningful with a pin."""
        if self.pid is None:
            return
        for ns in ("pid", "mnt"):
            try:
                fd = os.open(f"/proc/{self.pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            if _alive(self.pid, self._pid_start):
                self._ns_pins[os.readlink(f"/proc/self/fd/{fd}")] = fd
            else:
                os.close(fd)

    def _unpin_namespaces(self) -> None:
        for fd in self._ns_pins.values():
            os.close(fd)
        self._ns_pins.clear()

    def loop_devices(self) -> dict[str, tuple[str, int, int]]:
        """The loop devices backed by files of this running host (an env's disk image):
        device -> (the file, as named inside; its st_dev, st_ino). Compare two of these to
        know whether a device is still bound to the same file (by st_dev and st_ino: the
        name changes once the host's mount namespace is gone)."""
        self._require_running()
        return self._loops(self._devices())

    def _devices(self) -> set[int]:
        """The st_dev of the filesystems only this host has (while it runs): those mounted in
        its mount namespace and not in ours (its overlay, /run, /tmp, /dev/shm...), plus its
        overlay's upper layer, which regular files opened through the overlay report, and
        which no mountinfo of the container lists (the persistent disk is ours but its)."""
        if self.pid is None or not _alive(self.pid, self._pid_start):
            return set()
        ours = set()
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                if not _is_disk_mount(line, self.name, self.persist_dir):
                    ours.add(_mountinfo_dev(line))
        devices = set()
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/mountinfo") as mountinfo:
            devices = {_mountinfo_dev(line) for line in mountinfo}
        for copied_up in ("etc/passwd", "etc/machine-id"):  # written by every boot (init.sh)
            with contextlib.suppress(OSError):
                devices.add(os.stat(f"/proc/{self.pid}/root/{copied_up}").st_dev)
        return devices - ours

    def _loops(self, devices: set[int]) -> dict[str, tuple[str, int, int]]:
        """The kernel's loop devices (global: a container gets no loop devices of its own)
        backed by a file of this host: on one of ``devices`` (see :meth:`_devices`), or below
        its state dir on our side. Device -> (backing file as the kernel names it, st_dev,
        st_ino). An env's disk image inside the host shows under the host's own path (e.g.
        /var/cache/gestvenv/envs/...), which names nothing here: hence the device."""
        found = {}
        for device, backing, dev, ino in bound_loops():
            path = backing.removesuffix(" (deleted)")
            if dev in devices or path.startswith(f"{self.state_dir}/"):
                found[device] = (backing, dev, ino)
        return found

    def _loops_left(self, before: dict[str, tuple[str, int, int]]) -> list[str]:
        """Which of ``before`` (this host's loop devices when its teardown began) are still
        bound to the same file (same st_dev and st_ino), once the host is gone. Autoclear
        frees a device when its mount's last reference goes, the mount namespace's end
        included, but the final release may come a moment after the last process (deferred
        fput, the loop's rundown work): a short wait for those devices only."""
        deadline = time.monotonic() + 3.0
        while True:
            # The same file by (st_dev, st_ino), not by name: the kernel names it from the
            # mount it is on, which changes as the host's mount namespace goes.
            now = {device: (dev, ino) for device, _, dev, ino in bound_loops()}
            left = sorted(d for d, what in before.items() if now.get(d) == what[1:])
            if not left or time.monotonic() > deadline:
                return [f"loop device {d} (backed by {before[d][0]} of the host, "
                        f"dev {os.major(before[d][1])}:{os.minor(before[d][1])})" for d in left]
            time.sleep(0.05)

    def _teardown(self, *, kill: bool, purge: bool = False) -> None:
        """stop.sh, then an independent check; raises HostLeftovers. The persistent disk is
        kept (and is no leftover) unless ``purge``."""
        recorded = [r for r in (_read_pid(self.state_dir / f)
                                for f in ("pid", "unshare.pid", "script.pid")) if r]
        # Loop devices are the host kernel's, not the container's: one still bound after the
        # host is gone (an env's disk image) would outlive it, and hold its files.
        loops = self._loops(self._devices())
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [str(STAGES / "stop.sh"), self.name, *(["--kill"] if kill else []),
                 *(["--purge"] if purge else [])],
                env={"PATH": _PATH, "GVH_BASE": str(self.base),
                     "GVH_STOP_TIMEOUT": str(int(self.stop_timeout))},
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=self.stop_timeout + 60, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HostLeftovers(f"stop.sh {self.name} hung: {exc}") from None
        self.stop_seconds = time.monotonic() - t0
        left = [f"process {pid}" for pid, start in recorded if _alive(pid, start)]
        if self._ns_pins:
            members = _ns_members(list(self._ns_pins))
            left += [f"process {pid} in its namespaces" for pid in members]
        # Our pins are the last references to its namespaces now: drop them, or its mount
        # namespace (and every mount in it, an env's loop-mounted image too) lives on.
        self._unpin_namespaces()
        left += [f"cgroup {mp}/gv-{self.name}" for mp in cgroup_mounts()
                 if (mp / f"gv-{self.name}").exists()]
        with open("/proc/self/mountinfo") as mountinfo:
            mounts = [line for line in mountinfo
                      if f"gvh-{self.name} " in line or f"{self.state_dir}/" in line]
        disk = [line for line in mounts if _is_disk_mount(line, self.name, self.persist_dir)]
        if disk and not purge:  # the one disk mount is kept
            mounts.remove(disk[0])
        left += [f"mount {line.split()[4]}" for line in mounts]
        if purge and self.persist_dir.exists():
            left.append(f"directory {self.persist_dir}")
        left += self._loops_left({**loops, **self._loops(set())})
        if proc.returncode != 0 or left:
            raise HostLeftovers(f"stop of {self.name} left: {', '.join(left) or '?'}\n"
                                f"{proc.stdout}{proc.stderr}".rstrip())

    def _leaf_dirs(self, leaf: str) -> list[Path]:
        return [mp / f"gv-{self.name}" / leaf for mp in cgroup_mounts()]

    def _leaf_pids(self, leaf: str) -> set[int]:
        pids: set[int] = set()
        for top in self._leaf_dirs(leaf):
            # (os.walk: a subgroup removed meanwhile is skipped, not a FileNotFoundError)
            for root, _, files in os.walk(top, onerror=lambda _: None):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError):
                        text = Path(root, "cgroup.procs").read_text()
                        pids.update(int(p) for p in text.split())
        return pids

    def _kill_leaf(self, leaf: str, sig: int = signal.SIGKILL, wait: float = 5.0) -> None:
        deadline = time.monotonic() + wait
        while (pids := self._leaf_pids(leaf)) and time.monotonic() < deadline:
            _kill(sorted(pids), sig)
            time.sleep(0.02)

    def _remove_leaf(self, leaf: str) -> None:
        for top in self._leaf_dirs(leaf):
            if not top.is_dir():
                continue
            # Bottom-up, and a subgroup that its owner removes meanwhile is no error (os.walk
            # ignores it; rglob raised FileNotFoundError mid-listing).
            for root, _, _ in os.walk(top, topdown=False, onerror=lambda _: None):
                with contextlib.suppress(OSError):
                    os.rmdir(root)

    def _end(self, proc: subprocess.Popen[str], leaf: str, *, grace: float,
             sig: signal.Signals | None) -> None:
        """Make a command end: ``sig`` to it (also the not-yet-moved child of nsenter), wait up
        to ``grace`` s, then SIGKILL everything in its leaf and the nsenter process."""
        if sig is not None:
            _kill(sorted(self._leaf_pids(leaf) | _children(proc.pid)), sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        _kill(sorted(_children(proc.pid)), signal.SIGKILL)
        self._kill_leaf(leaf)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    @staticmethod
    def _join(threads: Sequence[threading.Thread]) -> None:
        for thread in threads:
            thread.join(timeout=10)


def _is_disk_mount(line: str, name: str, persist_dir: Path) -> bool:
    """The mountinfo line is the persistent disk of host ``name`` (boot.sh: a tmpfs named
    ``gvh-persist.NAME`` at ``persist_dir``)."""
    fields = line.split()
    if "-" not in fields[6:]:
        return False
    sep = fields.index("-", 6)
    return fields[4] == str(persist_dir) and fields[sep + 1:sep + 3] == [
        "tmpfs", f"gvh-persist.{name}"]


def _mountinfo_dev(line: str) -> int:
    """The st_dev of a mountinfo line's filesystem (its third field, MAJOR:MINOR)."""
    major, minor = line.split()[2].split(":")
    return os.makedev(int(major), int(minor))


_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"  # struct loop_info64 (<linux/loop.h>)


def bound_loops() -> list[tuple[str, str, int, int]]:
    """(device, backing file, its st_dev, its st_ino) of every bound loop device. The file is
    named by sysfs (from our root: a file of another mount namespace shows under that
    namespace's path), identified by LOOP_GET_STATUS64 (lo_device, lo_inode)."""
    import struct

    found = []
    for backing_file in Path("/sys/block").glob("loop*/loop/backing_file"):
        device = f"/dev/{backing_file.parent.parent.name}"
        try:
            backing = backing_file.read_text().rstrip("\n")
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # unbound (or removed) in between
        try:
            info = bytearray(struct.calcsize(_LOOP_INFO64))
            fcntl.ioctl(fd, _LOOP_GET_STATUS64, info)
        except OSError:
            continue
        finally:
            os.close(fd)
        dev, ino = struct.unpack_from("=QQ", info)
        found.append((device, backing, dev, ino))
    return found


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _drain(stream: IO[str], sink: list[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        sink.append(stream.read())
    stream.close()


def _feed(stream: IO[str], data: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.write(data)
    with contextlib.suppress(OSError, ValueError):
        stream.close()


# -- command line -------------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM (or SIGHUP) arrived: unwind and tear down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # once: a second signal must not interrupt the teardown that the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise _Terminated(signum)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """No SIGINT/SIGTERM/SIGHUP while tearing down (they are handled afterwards, if at all)."""
    saved = {s: signal.signal(s, signal.SIG_IGN)
             for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-e wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _say(msg: str) -> None:
    print(f"systemd-host: {msg}", file=sys.stderr, flush=True)


def _guarded(step: Callable[[], T]) -> T | int:
    """``step()``, or the exit status of its failure: 125 for the harness, 128+N for signal N."""
    try:
        return step()
    except HostError as exc:
        _say(str(exc))
        return 125
    except _Terminated as exc:
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130


def _boot(args: argparse.Namespace) -> SystemdHost | int:
    """Boot for the run/boot subcommands: the host, or the exit status of a failed boot."""
    host = SystemdHost(args.name, net=args.net, memory_limit=args.memory,
                       tmpfs_size=args.tmpfs_size, persist=getattr(args, "persist", False))

    def boot() -> SystemdHost:
        host.boot()
        return host
    return _guarded(boot)


def _cmd_run(args: argparse.Namespace) -> int:
    host = _boot(args)
    if isinstance(host, int):
        return host
    _say(f"host {host.name} booted in {host.boot_seconds:.2f} s (pid {host.pid})")
    rc = 125
    try:
        result = host.run(args.cmd, user=args.user, env=_env_pairs(args.env), cwd=args.cwd,
                          capture_output=False)
        rc = _exit_code(result.returncode)
    except _Terminated as exc:
        _say(f"{exc}: stopping")
        rc = 128 + exc.signum
    except KeyboardInterrupt:
        _say("interrupted: stopping")
        rc = 130
    except HostError as exc:
        _say(str(exc))
    finally:
        with _shielded():
            if args.keep and host.pid is not None and _alive(host.pid):
                host.detach()
                _say(f"host {host.name} kept: python -m tests.harness.systemd_host "
                     f"exec {host.name} -- CMD...; ... stop {host.name}")
            else:
                try:
                    host.stop()
                    _say(f"host {host.name} stopped in {host.stop_seconds:.2f} s, clean")
                except HostError as exc:
                    _say(str(exc))
                    rc = rc or 125
    return rc


def _cmd_boot(args: argparse.Namespace) -> int:
    host = _boot(args)
    if isinstance(host, int):
        return host
    host.detach()
    disk = (f"  disk:   {host.persist_dir} (kept by stop and reboot)\n"
            f"  reboot: python -m tests.harness.systemd_host reboot {host.name} [--crash]\n"
            if host.persist else "")
    purge = " [--purge]" if host.persist else ""
    print(f"host {host.name} booted in {host.boot_seconds:.2f} s (pid {host.pid})\n"
          f"  inside: python -m tests.harness.systemd_host exec {host.name} -- CMD...\n"
          f"{disk}"
          f"  stop:   python -m tests.harness.systemd_host stop {host.name}{purge}")
    return 0


def _cmd_reboot(args: argparse.Namespace) -> int:
    def reboot() -> SystemdHost:
        host = SystemdHost.attach(args.name)
        host.reboot(crash=args.crash)
        return host
    host = _guarded(reboot)
    if isinstance(host, int):
        return host
    print(f"host {host.name} rebooted ({'crash' if args.crash else 'clean'}) in "
          f"{host.reboot_seconds or 0:.2f} s: stop {host.stop_seconds or 0:.2f} s, boot "
          f"{host.boot_seconds or 0:.2f} s (pid {host.pid})")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    def run() -> subprocess.CompletedProcess[str]:
        return SystemdHost.attach(args.name).run(args.cmd, user=args.user,
                                                  env=_env_pairs(args.env), cwd=args.cwd,
                                                  capture_output=False)
    result = _guarded(run)
    return result if isinstance(result, int) else _exit_code(result.returncode)


def _cmd_stop(args: argparse.Namespace) -> int:
    try:
        host = SystemdHost.attach(args.name)
    except HostError:  # not running: still clean up whatever a killed run left
        host = SystemdHost(args.name, checkout=None)
    try:
        with _shielded():
            host.stop(kill=args.kill, force=args.force, purge=args.purge)
    except HostBusy as exc:
        _say(f"{exc} (--force stops it anyway)")
        return 1
    except HostError as exc:
        _say(str(exc))
        return 1
    kept = (f"; disk {host.persist_dir} kept (boot --persist --name {host.name} boots on it, "
            f"stop {host.name} --purge removes it)" if host.disk_mounted else "")
    _say(f"host {host.name} stopped in {host.stop_seconds or 0:.2f} s, clean{kept}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.systemd_host",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    def inside_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--user", "-u", help=f"run as this user (e.g. {TEST_USER})")
        p.add_argument("--cwd", "-C", help="directory inside (default: the checkout)")
        p.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("cmd", nargs="*", metavar="-- CMD")

    def boot_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", "-n", help="default: derived from the checkout path")
        p.add_argument("--net", choices=["private", "host"], default="private")
        p.add_argument("--memory", default="4G", help="memory cap of the whole host")
        p.add_argument("--tmpfs-size", default="4G",
                       help="size of the writable layer (a new disk's) and of /tmp")

    p_run = sub.add_parser("run", help="boot, run CMD inside, stop; exit with CMD's status")
    boot_opts(p_run)
    p_run.add_argument("--keep", action="store_true", help="leave the host running")
    inside_opts(p_run)
    p_boot = sub.add_parser("boot", help="boot a host and leave it running")
    boot_opts(p_boot)
    p_boot.add_argument("--persist", action="store_true",
                        help="writable layer on a disk that survives reboot and stop "
                             "(a disk of that name is booted on)")
    p_exec = sub.add_parser("exec", help="run CMD in a running host")
    p_exec.add_argument("name")
    inside_opts(p_exec)
    p_stop = sub.add_parser("stop", help="stop a host, verify nothing is left")
    p_stop.add_argument("name")
    p_stop.add_argument("--kill", action="store_true", help="SIGKILL, no graceful poweroff")
    p_stop.add_argument("--force", action="store_true",
                        help="even if a live harness process owns it")
    p_stop.add_argument("--purge", action="store_true",
                        help="also remove its persistent disk (kept otherwise)")
    p_reboot = sub.add_parser("reboot", help="reboot a host booted with --persist on its disk")
    p_reboot.add_argument("name")
    p_reboot.add_argument("--crash", action="store_true",
                          help="a power loss (SIGKILL of its systemd), not a clean poweroff")
    # CMD is everything after the first "--", verbatim: argparse would also drop a later "--"
    # (as in `... -- runuser -u gvtest -- cmd`).
    words = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, cmd = words[:cut], words[cut + 1:]
    args = parser.parse_args(words)
    if cmd is not None:
        if getattr(args, "cmd", None):
            parser.error("give CMD after --, not before")
        args.cmd = cmd
    if args.command in ("run", "exec") and not args.cmd:
        parser.error("no command: ... -- CMD [ARG...]")
    if os.geteuid() != 0:
        parser.error("must run as root")
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGHUP, _raise_terminated)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _cmd_run, "boot": _cmd_boot, "exec": _cmd_exec, "stop": _cmd_stop,
        "reboot": _cmd_reboot,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
