"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil
import pytest

import gestvenv
from gestvenv import storage
from gestvenv.runtime.processes import ENV_MARKER, EXEC_MARKER, marked_pids
from tests.harness.wheels import PACKAGES

# The ``spawn`` fixture (conftest.py): start a script, or a command, in a process group of its own.
Spawn = Callable[..., subprocess.Popen[str]]

CHECKOUT = Path(__file__).resolve().parents[2]
# The checkout's venv (absent in the v2 VM, which collects the test host's tests but runs none of
# those that need gvtest).
SITE = next((CHECKOUT / ".venv" / "lib").glob("python3*/site-packages"), CHECKOUT / ".venv")


def systemctl_show(output: str) -> dict[str, str]:
    """``systemctl show``'s output as a dict; a list (TimersMonotonic) comes as one line per
    item, joined here with newlines."""
    props: dict[str, str] = {}
    for line in output.splitlines():
        key, _, value = line.partition("=")
        props[key] = f"{props[key]}\n{value}" if key in props else value
    return props


def latest(name: str) -> str:
    """The newest version of ``name`` in the test wheelhouse."""
    versions = [v for n, v, _, _ in PACKAGES if n == name]
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def oldest(name: str) -> str:
    versions = [v for n, v, _, _ in PACKAGES if n == name]
    return min(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


async def wait_until(predicate: Callable[[], object], timeout: float, what: str,
                     interval: float = 0.02) -> float:
    """Poll ``predicate`` until it is true; return the seconds it took, or fail after timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def no_watchdog_sweep() -> Iterator[None]:
    """Hold this test's per-user watchdog lock (each test has its own runtime dir): a watchdog
    started meanwhile (by an env's creation) finds it taken and exits without sweeping. For a
    test that ages something by hand and then checks what its own sweep removes: the
    watchdog's first orphan sweep, when its process is slow to start, would otherwise remove
    it first (CI: a stale snapshot pruned before the test's sweep, which then found nothing)."""
    from gestvenv import watch

    fd = watch.try_lock()
    assert fd is not None, "a watchdog already runs for this test's runtime dir"
    try:
        yield
    finally:
        os.close(fd)


def kill_watchdogs(runtime_dir: Path) -> None:
    """SIGKILL the per-user watchdogs of ``runtime_dir`` until none is left. Two may be seen: a
    creator that found the first one not yet holding its lock (slow to start) spawned a second,
    which exits by itself; a second one not yet visible when the first was killed would take
    the lock, and watch."""
    deadline = time.monotonic() + 10
    while found := processes_of(runtime_dir, marked_only=False, cmd="gestvenv.watchdog"):
        assert time.monotonic() < deadline, f"watchdogs still running: {found}"
        for watchdog in found:
            with contextlib.suppress(psutil.NoSuchProcess):
                watchdog.kill()
                watchdog.wait(5)
        time.sleep(0.2)  # (one spawned a moment ago may only now be recognisable)


def env_dirs(root: Path) -> list[Path]:
    """The environment dirs in a storage root (not the root's own mark file)."""
    if not root.is_dir():
        return []
    mark = getattr(storage, "ROOT_MARK", ".gestvenv-root")
    return sorted(p for p in root.iterdir() if p.name != mark)


def env_pids(env_id: str) -> list[int]:
    return marked_pids(ENV_MARKER, env_id)


def pid_dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def env_names() -> set[str]:
    """The environments of this test's registry (state files). Under systemd, listings also
    show ``unit-only`` entries: units of the test host's one manager without a state file,
    which may be another test's still stopping: not this test's."""
    return {str(i["name"]) for i in gestvenv.list_environments() if i["state"] != "unit-only"}


def is_destroyed(path: Path, env_id: str) -> bool:
    return (not path.exists() and not gestvenv.list_environments() and not env_pids(env_id))


def assert_destroyed(path: Path, env_id: str) -> None:
    """Files, state and processes of one environment are all gone."""
    assert not path.exists(), f"{path} still exists"
    assert gestvenv.list_environments() == []
    assert env_pids(env_id) == []


def environ_of(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def processes_of(runtime_dir: Path, *, marked_only: bool, cmd: str = "") -> list[psutil.Process]:
    """Live processes started for the test whose runtime dir is ``runtime_dir``.

    Every command gestvenv runs inherits the test's ``GESTVENV_RUNTIME_DIR`` and carries the
    environment marker; with ``marked_only=False`` helper processes (the watchdog, subprocesses
    of the test) are included; ``cmd`` keeps those whose command line contains it.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        env = environ_of(proc)
        if env.get("GESTVENV_RUNTIME_DIR") != str(runtime_dir):
            continue
        if marked_only and ENV_MARKER not in env:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or cmd not in " ".join(proc.cmdline()):
                continue
        except psutil.Error:
            continue
        found.append(proc)
    return found


# --- leftovers: everything of gestvenv still present for the test (test_guaranteed_cleanup) ---

LEFTOVER_KINDS = ("units", "dirs", "state files", "processes", "mounts", "loops",
                  "containers", "conmon", "container mounts")
# The kinds only a container engine can leave (isolation container); see container_leftovers.
ENGINE_KINDS = ("containers", "conmon", "container mounts")
# gestvenv's own infrastructure, not an environment's: the parent slice, the cleanup timer.
_SHARED_UNITS = ("gestvenv.slice", "gestvenv-cleanup.service", "gestvenv-cleanup.timer")
# The env unit's environment names its state file: its holder and reaper carry it.
_UNIT_STATE_FILE = "GESTVENV_UNIT_STATE_FILE"
# The kernel's name for the file behind a loop device, with this suffix once it was unlinked
# (an env dir deleted while its image was still attached somewhere).
_DELETED = " (deleted)"
# A mount in a shared root whose claim cannot be read (an env's empty tmpfs hides the claim
# under it until its creator writes it again on top, a few ms): looked at again this much later
# before it is counted, so that another run's creator in that window is not taken for ours.
_UNCLAIMED_GRACE = 0.05


def loaded_units(pattern: str = "gestvenv-*") -> list[tuple[str, str, str]]:
    """(unit, active state, sub state) of the loaded units matching ``pattern`` in this user's
    manager (the system manager for root), except gestvenv's shared ones; [] without systemd."""
    import subprocess

    from gestvenv.runtime.systemd import systemd_booted

    if not systemd_booted():
        return []
    scope = ["--user"] if os.geteuid() != 0 else []
    out = subprocess.run(["systemctl", *scope, "list-units", "--all", "--plain", "--no-legend",
                          pattern], capture_output=True, text=True, check=True).stdout
    units = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] not in _SHARED_UNITS:
            units.append((fields[0], fields[2], fields[3]))
    return units


def _claim_of(path: Path) -> Path | None:
    """The state file an env dir's claim names (None: no readable claim)."""
    import json

    try:
        claim = json.loads((path / storage.CLAIM).read_text())
        return Path(str(claim["state_file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _claimed_by(path: Path, state_dir: Path) -> bool:
    """The env dir's claim names a state file of ``state_dir`` (this test's registry)."""
    claim = _claim_of(path)
    return claim is not None and claim.parent == state_dir


def mount_points() -> list[str]:
    """Every mount point of this mount namespace (real paths, unescaped)."""
    from gestvenv.reaper import unescape_mountinfo

    with open("/proc/self/mountinfo") as f:
        return [unescape_mountinfo(line.split()[4]) for line in f]


def loop_devices() -> dict[str, str]:
    """Bound loop devices of the kernel (global: a test host's too) -> the file behind each,
    as the kernel names it (seen from this process's root; ``(deleted)`` once unlinked)."""
    found = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):  # unbound (or gone) in between
            found[f"/dev/{backing.parent.parent.name}"] = backing.read_text().rstrip("\n")
    return found


def _at_or_under(path: str, scopes: Iterable[str]) -> bool:
    return any(path == scope or path.startswith(f"{scope}/") for scope in scopes)


# --- what a container engine can leave (container isolation) ---

# A container's root filesystem and its /dev/shm, where c/storage mounts them in its store: the
# kernel's overlay, or fuse-overlayfs (a process, and a fuse mount) where the store's own
# filesystem cannot be an overlay's upper layer (the systemd test host's root is an overlay).
_MERGED_RE = re.compile(r"(?P<store>/.+)/overlay/(?P<layer>[0-9a-f]{64})/merged")
_SHM_RE = re.compile(r"(?P<store>/.+)/overlay-containers/(?P<id>[0-9a-f]{64})/userdata/shm")
# conmon ends a moment after its container (within ms of `podman rm` here), and a container
# being made has its conmon a moment after podman lists it: a conmon whose container is not
# listed is counted only if it still is not, and the conmon still runs, this much later.
_CONMON_GRACE = 1.0


def podman_containers() -> list[dict[str, object]] | None:
    """Every container podman has (all states; its JSON objects), or None: no podman, or it
    does not answer."""
    from gestvenv.container.engine import json_items

    podman = shutil.which("podman")
    if podman is None:
        return None
    why = ""
    for attempt in range(3):  # (a busy engine may time out on its locks: asked again)
        try:
            done = subprocess.run([podman, "ps", "-a", "--no-trunc", "--format", "json"],
                                  capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            why = str(exc)
        else:
            if done.returncode == 0:
                return json_items(done.stdout)
            why = done.stderr.decode(errors="replace").strip()[-300:]
        time.sleep(0.2 * (attempt + 1))
    # Said, not failed: a host with a podman that does not work for this user runs no
    # container env either.
    warnings.warn(f"podman ps does not answer, containers not checked: {why}", stacklevel=2)
    return None


def labels_of(item: dict[str, object]) -> dict[str, str]:
    """A container's labels, from podman's JSON."""
    labels = item.get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _store_containers(store: str) -> set[str]:
    """The ids of a c/storage store's containers and of their layers, from the store's own
    record (what podman, buildah and every other user of the store made); empty if unreadable."""
    try:
        items = json.loads(Path(store, "overlay-containers", "containers.json").read_text())
    except (OSError, ValueError):
        return set()
    found: set[str] = set()
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            found.update(str(item.get(k)) for k in ("id", "layer") if item.get(k))
    return found


def _engine_processes() -> list[tuple[psutil.Process, str, list[str]]]:
    """(process, name, argv) of the live conmon and fuse-overlayfs processes of this mount
    namespace: those of a systemd test host booted meanwhile (by another run) name paths and
    containers of its own, which mean nothing here."""
    found = []
    mine = os.readlink("/proc/self/ns/mnt")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                comm = f.read().strip()
            if comm not in ("conmon", "fuse-overlayfs") or \
                    os.readlink(f"/proc/{entry.name}/ns/mnt") != mine:
                continue
            proc = psutil.Process(int(entry.name))
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append((proc, comm, proc.cmdline()))
        except (OSError, psutil.Error):
            continue
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _option(argv: list[str], name: str) -> str | None:
    with contextlib.suppress(ValueError, IndexError):
        return argv[argv.index(name) + 1]
    return None


def _store_mounts(points: Iterable[str],
                  processes: Iterable[tuple[psutil.Process, str, list[str]]]
                  ) -> list[tuple[str, str, str]]:
    """(what, store, id) for each container filesystem mounted in a c/storage store: a
    container's root (by its layer), its /dev/shm (by its id), and each fuse-overlayfs process
    serving a root (its mount point is its last argument)."""
    found = []
    for point in points:
        if m := _MERGED_RE.fullmatch(point):
            found.append((f"mount {point}", m["store"], m["layer"]))
        elif m := _SHM_RE.fullmatch(point):
            found.append((f"mount {point}", m["store"], m["id"]))
    for proc, comm, argv in processes:
        if comm == "fuse-overlayfs" and argv and (m := _MERGED_RE.fullmatch(argv[-1])):
            found.append((f"fuse-overlayfs {proc.pid} for {argv[-1]}", m["store"], m["layer"]))
    return found


def container_leftovers(state_dir: Path | None = None,
                        runtime_dir: Path | None = None) -> dict[str, list[str]]:
    """What a container engine (podman) holds of this test, by kind (ENGINE_KINDS); nothing to
    ask, and empty, where no podman is installed:

    - containers: podman's containers (any state) carrying gestvenv's labels whose state file
      label is in this test's state dir;
    - conmon: live conmon processes of gestvenv's containers (``-n gestvenv-...``), in this
      mount namespace, whose container (``-c ID``) podman no longer has, looked at again until
      ``_CONMON_GRACE`` later. Those of another run are left out by the containers.conf
      their environment names (gestvenv's own, in its runtime dir; without one, on hosts that
      need none, every one counts);
    - container mounts: a container's root filesystem (``STORE/overlay/LAYER/merged``: the
      kernel's overlay, or a fuse-overlayfs mount and its process) or its /dev/shm
      (``STORE/overlay-containers/ID/userdata/shm``) whose container the store's own record
      (``overlay-containers/containers.json``) no longer has: nothing but a leak, whoever made
      it (the record is read before and after the mounts, so that a container made or removed
      meanwhile is not taken for one). Rootless podman mounts in a namespace of its own: not
      seen here.
    """
    from gestvenv.container.engine import LABEL_ENV, LABEL_ID, LABEL_STATE

    left: dict[str, list[str]] = {kind: [] for kind in ENGINE_KINDS}
    if shutil.which("podman") is None:
        return left
    state = state_dir or storage.state_dir()
    runtime = runtime_dir or storage.runtime_dir()
    # Which stores hold a container's filesystem now, then their records, the mounts again,
    # the records again.
    stores = {store for _, store, _ in _store_mounts(mount_points(), _engine_processes())}
    known = {store: _store_containers(store) for store in stores}
    containers = podman_containers()
    processes = _engine_processes()
    mounts = _store_mounts(mount_points(), processes)
    for store in stores:
        known[store] |= _store_containers(store)
    left["container mounts"] = [what for what, store, ident in mounts
                                if store in known and ident not in known[store]]
    if containers is None:
        return left
    for item in containers:
        labels = labels_of(item)
        if LABEL_ID in labels and labels.get(LABEL_STATE, "").startswith(f"{state}/"):
            names = item.get("Names") or [""]
            name = names[0] if isinstance(names, list) and names else str(names)
            left["containers"].append(
                f"{name} ({item.get('State')}; env {labels.get(LABEL_ENV)}, "
                f"{str(item.get('Id'))[:12]})")
    ids = {str(item.get("Id")) for item in containers}
    suspects = []
    for proc, comm, argv in processes:
        name, container = _option(argv, "-n"), _option(argv, "-c")
        if comm != "conmon" or not (name or "").startswith("gestvenv-") or container in ids:
            continue
        conf = environ_of(proc).get("CONTAINERS_CONF")
        if conf is None or conf.startswith(f"{runtime}/"):
            suspects.append((proc, name, container))
    deadline = time.monotonic() + _CONMON_GRACE
    while suspects:
        after = podman_containers() or []
        ids = {str(item.get("Id")) for item in after}
        suspects = [(p, n, c) for p, n, c in suspects if c not in ids and _alive(p)]
        if not suspects or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    left["conmon"] = [f"{p.pid} conmon -n {n} -c {str(c)[:12]} (its container is gone)"
                      for p, n, c in suspects]
    return left


def leftovers() -> dict[str, list[str]]:
    """Everything of gestvenv still present for this test, by kind (see LEFTOVER_KINDS).

    - units: loaded ``gestvenv-*`` units (when systemd is PID 1), but the shared slice/timer;
    - dirs: env dirs in every storage root of the test's config (the root's mark aside); in a
      root shared with other users of the machine (/dev/shm) only those claimed by this test's
      registry;
    - state files: every entry of the test's state dir (temporary files included);
    - processes: processes carrying the env marker (or a command's: a container env's ``podman
      exec``) and the test's runtime dir, and those of an env unit of this registry (holder,
      reaper);
    - mounts: mount points at or below the test's own storage roots, and at or below the env
      dirs of shared roots that are this test's (claimed by its registry) or show no claim at
      all (an env's filesystem mounted, its claim not yet written on top: nobody's but a
      creator's for a few ms, so looked at twice);
    - loops: loop devices (max_disk on the disk backend) whose image is (or was: deleted) in
      those places;
    - containers, conmon, container mounts: what a container engine holds of the test's
      container envs, and what it leaked (:func:`container_leftovers`; only where podman is
      installed).
    """
    runtime = storage.runtime_dir()
    state = storage.state_dir()
    left: dict[str, list[str]] = {kind: [] for kind in LEFTOVER_KINDS}
    left["units"] = [f"{u} ({a}/{s})" for u, a, s in loaded_units()]
    scopes: list[str] = []       # mounts and images at or below these are the test's
    unclaimed: list[Path] = []   # env dirs of a shared root without a readable claim
    for root in storage.all_roots(gestvenv.load_config()):
        shared = root.is_relative_to("/dev/shm")
        if not shared:
            scopes.append(os.path.realpath(root))
        for entry in env_dirs(root):
            if not shared or _claimed_by(entry, state):
                left["dirs"].append(str(entry))
                scopes.append(os.path.realpath(entry))
            elif shared and _claim_of(entry) is None:
                unclaimed.append(entry)
    if state.is_dir():
        left["state files"] = sorted(str(p) for p in state.iterdir())
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        env = environ_of(proc)
        # (A container env's command is a `podman exec` client here: it carries the command's
        # marker, and the env's only inside the container.)
        marked = ENV_MARKER in env or EXEC_MARKER in env
        ours = (marked and env.get("GESTVENV_RUNTIME_DIR") == str(runtime)) or \
            env.get(_UNIT_STATE_FILE, "").startswith(f"{state}/")
        if not ours:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env_name = env.get("GESTVENV_ENV_NAME") or env.get(_UNIT_STATE_FILE, "?")
            left["processes"].append(
                f"{proc.pid} {' '.join(proc.cmdline())[:160]} [env {env_name}]")
        except psutil.Error:
            continue
    points = mount_points()
    if unclaimed:
        mounted = [e for e in unclaimed
                   if any(_at_or_under(p, [os.path.realpath(e)]) for p in points)]
        if mounted:
            time.sleep(_UNCLAIMED_GRACE)
            points = mount_points()
            for entry in mounted:
                if entry.is_dir() and _claim_of(entry) is None:
                    left["dirs"].append(f"{entry} (unclaimed)")
                    scopes.append(os.path.realpath(entry))
    left["mounts"] = [p for p in points if _at_or_under(p, scopes)]
    left["loops"] = [f"{device} -> {backing}" for device, backing in loop_devices().items()
                     if _at_or_under(backing.removesuffix(_DELETED), scopes)]
    left.update(container_leftovers(state, runtime))
    return left


def leftover_count(left: dict[str, list[str]]) -> int:
    return sum(len(items) for items in left.values())


def leftover_summary(left: dict[str, list[str]]) -> str:
    """``0 (units 0, dirs 0, state files 0, processes 0, mounts 0, loops 0, containers 0,
    conmon 0, container mounts 0)``"""
    parts = ", ".join(f"{kind} {len(left[kind])}" for kind in LEFTOVER_KINDS)
    return f"{leftover_count(left)} ({parts})"


# --- the test host's user gvtest (a user manager) ---

def gvtest() -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam("gvtest")
    except KeyError:
        pytest.skip("no gvtest user (created by the test host harness)")
    if not os.path.exists(f"/run/user/{user.pw_uid}/bus"):
        pytest.skip("gvtest's user manager is not running")
    return user


def run_as_gvtest(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A command as gvtest, in a login-like environment. The checkout's .venv python lives
    under root's 0700 home, so gvtest runs the system python3 with the checkout and the
    venv's site-packages on PYTHONPATH (which install carries into the unit)."""
    user = pwd.getpwnam("gvtest")
    runtime = f"/run/user/{user.pw_uid}"
    return subprocess.run(
        ["runuser", "-u", "gvtest", "--", "/usr/bin/env", "-i", f"HOME={user.pw_dir}",
         "PATH=/usr/bin:/bin", f"XDG_RUNTIME_DIR={runtime}",
         f"DBUS_SESSION_BUS_ADDRESS=unix:path={runtime}/bus", f"PYTHONPATH={CHECKOUT}:{SITE}",
         *argv], capture_output=True, text=True, timeout=timeout, cwd="/")
