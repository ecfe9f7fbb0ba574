"""Full cycle "create env + install packages + python -c 'import PKG' + destroy", per tool.

Compared in the same run, on the same interpreter and the same package source:

* gestvenv: async ``ephemeral(packages=...)`` + ``env.execute``, disk and memory backends, on
  the local runtime and, where systemd runs (PID 1), on the systemd runtime too; and the sync API
  (``ephemeral_sync``) on disk;
* ``uv run --isolated --no-project --with PKG python -c 'import PKG'`` (the peer to beat);
* ``python -m venv`` + ``pip install`` + run + rmtree;
* ``virtualenv`` + ``pip install`` + run + rmtree.

Then, with the systemd runtime, what it adds per environment, measured: create and destroy of an
empty env and one ``execute(["true"])``, local vs systemd; the D-Bus calls each step makes
(counted); and raw round trips to the manager (GetUnit, ListUnitsByPatterns, StartTransientUnit
until its JobRemoved, StopUnit until its JobRemoved). Last, the ``.pyc`` question:
``compile_bytecode`` on vs off, install time and the first and second import in the same
environment.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_create.py                    # offline, tiny wheels built here
    python benchmarks/bench_create.py --online           # real packages from PyPI
    python benchmarks/bench_create.py --wheelhouse DIR --packages attrs
    python -m tests.harness.systemd_host run -- .venv/bin/python benchmarks/bench_create.py
                                                         # local and systemd runtimes (as root)

Everything (uv cache, gestvenv runtime dir and storage root, pip and virtualenv caches, the
wheelhouse) lives in one temporary directory under /var/tmp, removed at the end. The memory
backend's root (/dev/shm/gestvenv for root) is not configurable in gestvenv: environments made
there are destroyed by gestvenv itself and the script checks that none is left behind; with
systemd, it checks that no ``gestvenv-*`` unit is left (``gestvenv.slice``, shared by every
gestvenv user of the manager, stays).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT_MARK = ".gestvenv-root"  # gestvenv.storage.ROOT_MARK: marks a storage root

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from gestvenv.builder import find_interpreter, find_uv  # noqa: E402
from gestvenv.exceptions import GestvenvError  # noqa: E402
from gestvenv.runtime.systemd import SystemdRuntime, systemd_booted  # noqa: E402
from gestvenv.runtime.systemd import bus as sdbus  # noqa: E402
from gestvenv.storage import storage_root  # noqa: E402

_KEPT_PIP_VARS = ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")


# --- small helpers ---

def import_names(packages: list[str]) -> list[str]:
    """'requests>=2', 'PyYAML[x]' -> 'requests', 'pyyaml' (override with --imports)."""
    names = []
    for spec in packages:
        name = re.split(r"[\[<>=!~;@ ]", spec, maxsplit=1)[0]
        names.append(name.lower().replace("-", "_").replace(".", "_"))
    return names


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def run_checked(argv: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                         f"{proc.stderr or proc.stdout}")


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def wait_for_watchdogs(runtime_dir: Path, timeout: float = 6.0) -> list[int]:
    """Let our watchdogs exit by themselves before our temp dir goes (they linger ~2 s once
    no environment exists, and a sweep meanwhile makes the runtime dir again); SIGTERM those
    still there after ``timeout``, and return their pids."""
    deadline = time.monotonic() + timeout
    while watchdog_pids(runtime_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    stuck = watchdog_pids(runtime_dir)
    for pid in stuck:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return stuck


def watchdog_pids(runtime_dir: Path) -> list[int]:
    """gestvenv watchdogs started for *our* runtime dir (by their environment), not others'."""
    needle = f"GESTVENV_RUNTIME_DIR={runtime_dir}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"gestvenv.watchdog" not in cmdline:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


# --- the benchmark ---

def gv_label(backend: str, runtime: str) -> str:
    return f"gestvenv async ({backend}, {runtime})"


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, runtimes: list[str]) -> None:
        self.args = args
        self.root = root
        # Every gestvenv call names its runtime: the config's "auto" would pick systemd inside
        # the test host and local outside, and the rows must say which one they measured.
        self.runtimes = runtimes
        self.primary = runtimes[0]  # local when it is measured: the reference, .pyc trials
        self.reference = gv_label("disk", self.primary)
        self.pyc_off = f"gestvenv (disk, {self.primary}, compile_bytecode=0)"
        self.packages: list[str] = args.packages
        self.modules: list[str] = args.imports or import_names(self.packages)
        self.import_code = "import " + ", ".join(self.modules)
        self.argv_import = ["python", "-c", self.import_code]
        self.base_python = find_interpreter(None).path
        uv = find_uv()
        if uv is None:
            raise SystemExit("uv not found (pip install uv)")
        self.uv = uv
        self.cache = root / "uv-cache"
        self.runtime = root / "run"
        self.peers = root / "peers"
        self.wheelhouse: Path | None = None
        if args.online:
            self.mode = "online (PyPI)"
        elif args.wheelhouse:
            self.wheelhouse = Path(args.wheelhouse).resolve()
            self.mode = f"offline, wheelhouse {self.wheelhouse}"
        else:
            from tests.harness.wheels import build_wheelhouse

            self.wheelhouse = build_wheelhouse(root / "wheelhouse")
            self.mode = "offline, tiny wheels from tests/harness/wheels.py"
        for d in (self.cache, self.runtime, self.peers):
            d.mkdir(parents=True, exist_ok=True)
        self.peer_env = self._peer_environ()
        self._configure_gestvenv()
        self._counter = 0

    # environment of the peers: no gestvenv/uv/pip settings of this machine leak in
    def _peer_environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GESTVENV_", "UV_", "VIRTUALENV_", "PIP_"))
               and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME",
                             "PYTHONDONTWRITEBYTECODE")}
        env.update({k: os.environ[k] for k in _KEPT_PIP_VARS if k in os.environ})
        env.update({
            "UV_CACHE_DIR": str(self.cache),
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_NO_PROGRESS": "1",
            "PIP_CACHE_DIR": str(self.root / "pip-cache"),
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        })
        return env

    def _configure_gestvenv(self) -> None:
        for key in list(os.environ):
            if key.startswith(("GESTVENV_", "UV_")):
                del os.environ[key]
        # Commands run by gestvenv inherit our environment: a PYTHONDONTWRITEBYTECODE set on
        # this machine would make every import a cold one and falsify the .pyc figures.
        self.dropped_dontwrite = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
        settings = {
            "GESTVENV_RUNTIME_DIR": str(self.runtime),
            "GESTVENV_SYSTEM_CONFIG": str(self.root / "no-system-config.toml"),
            "GESTVENV_CONFIG": str(self.root / "no-user-config.toml"),
            "GESTVENV_EPHEMERAL_STORAGE_ROOT": str(self.root / "envs"),
            "GESTVENV_EPHEMERAL_CACHE_DIR": str(self.cache),
            "GESTVENV_EPHEMERAL_BUILDER": "uv",
        }
        if self.wheelhouse is not None:
            settings["GESTVENV_EPHEMERAL_FIND_LINKS"] = str(self.wheelhouse)
            settings["GESTVENV_EPHEMERAL_OFFLINE"] = "1"
        os.environ.update(settings)
        config = gestvenv.load_config()
        disk = storage_root(gestvenv.StorageBackend.DISK, config).path
        if os.stat(disk).st_dev != os.stat(self.cache).st_dev:
            raise SystemExit(f"{disk} and {self.cache} are on different filesystems")

    def _index_args_uv(self) -> list[str]:
        if self.wheelhouse is None:
            return []
        return ["--find-links", str(self.wheelhouse), "--offline"]

    def _index_args_pip(self) -> list[str]:
        if self.wheelhouse is None:
            return []
        return ["--no-index", "--find-links", str(self.wheelhouse)]

    def _peer_dir(self) -> Path:
        self._counter += 1
        return self.peers / f"env{self._counter}"

    # --- one full cycle per tool ---

    async def gv_async(self, backend: str, runtime: str,
                       compile_bytecode: bool | None = None) -> None:
        if compile_bytecode is not None:
            os.environ["GESTVENV_EPHEMERAL_COMPILE_BYTECODE"] = str(int(compile_bytecode))
        try:
            async with gestvenv.ephemeral(packages=self.packages, storage_backend=backend,
                                          runtime=runtime) as env:
                result = await env.execute(self.argv_import)
        finally:
            os.environ.pop("GESTVENV_EPHEMERAL_COMPILE_BYTECODE", None)
        if not result.ok:
            raise SystemExit(f"gestvenv ({backend}, {runtime}): import failed\n{result.stderr}")

    def gv_sync(self) -> None:
        with gestvenv.ephemeral_sync(packages=self.packages, storage_backend="disk",
                                     runtime=self.primary) as env:
            result = env.execute(self.argv_import)
        if not result.ok:
            raise SystemExit(f"gestvenv sync: import failed\n{result.stderr}")

    def uv_run(self) -> None:
        argv = [self.uv, "run", "--isolated", "--no-project", "--no-config",
                "--python", self.base_python, *self._index_args_uv()]
        for spec in self.packages:
            argv += ["--with", spec]
        argv += ["python", "-c", self.import_code]
        run_checked(argv, self.peer_env, "uv run")

    def venv_pip(self) -> None:
        path = self._peer_dir()
        try:
            run_checked([self.base_python, "-m", "venv", str(path)], self.peer_env,
                        "python -m venv")
            self._pip_install_and_run(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def virtualenv_pip(self) -> None:
        path = self._peer_dir()
        try:
            run_checked([sys.executable, "-m", "virtualenv", "--quiet", "--no-periodic-update",
                         "--app-data", str(self.root / "virtualenv-app-data"),
                         "-p", self.base_python, str(path)], self.peer_env, "virtualenv")
            self._pip_install_and_run(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _pip_install_and_run(self, path: Path) -> None:
        python = str(path / "bin" / "python")
        run_checked([python, "-m", "pip", "install", "--quiet", *self._index_args_pip(),
                     *self.packages], self.peer_env, "pip install")
        run_checked([python, "-c", self.import_code], self.peer_env, "import")

    # --- checks ---

    async def link_mode_check(self, backend: str) -> str:
        async with gestvenv.ephemeral(packages=self.packages[:1], storage_backend=backend,
                                      runtime=self.primary) as env:
            files = list(env.path.glob(f"lib/python*/site-packages/{self.modules[0]}/*.py"))
            if not files:
                return "unknown (no .py file found)"
            links = os.stat(files[0]).st_nlink
        return (f"SHARED inode (hardlink, st_nlink={links})" if links > 1
                else "own inode (reflink or copy, st_nlink=1)")

    # --- the .pyc question ---

    async def pyc_trial(self, compile_bytecode: bool) -> tuple[float, float, float]:
        """(install s, first import s, second import s) in one fresh disk environment.

        The install is timed alone (``env.install`` into an empty env); an import is the wall
        time of the python process itself (``ExecResult.duration``).
        """
        os.environ["GESTVENV_EPHEMERAL_COMPILE_BYTECODE"] = "1" if compile_bytecode else "0"
        try:
            async with gestvenv.ephemeral(storage_backend="disk", runtime=self.primary) as env:
                t0 = time.perf_counter()
                await env.install(self.packages)
                install = time.perf_counter() - t0
                first = await env.execute(self.argv_import)
                second = await env.execute(self.argv_import)
        finally:
            del os.environ["GESTVENV_EPHEMERAL_COMPILE_BYTECODE"]
        for result in (first, second):
            if not result.ok:
                raise SystemExit(f"pyc trial: import failed\n{result.stderr}")
        return install, first.duration, second.duration


# --- what the systemd runtime adds, per environment ---

PROBE_PREFIX = "gestvenv-benchprobe@"  # '@': never taken for an env's unit by gestvenv's sweeps


@dataclass
class Phase:
    """The D-Bus traffic of one step (create, execute, destroy) of one environment."""

    calls: Counter[str] = field(default_factory=Counter)  # method calls, by member
    member_s: defaultdict[str, float] = field(  # awaiting replies, by member
        default_factory=lambda: defaultdict(float))
    reply_s: float = 0.0  # awaiting method replies (the round trips)
    jobs: int = 0
    job_s: float = 0.0    # awaiting a job's JobRemoved, after its call's reply
    wall_s: float = 0.0


class BusMeter:
    """Counts gestvenv's D-Bus method calls and the time spent awaiting replies and jobs.

    It wraps ``SystemdBus.call`` and ``SystemdBus.wait_job`` (every call of the façade goes
    through them) for the duration of ``installed()``, in this process only.
    """

    def __init__(self) -> None:
        self.phases: dict[str, Phase] = {}
        self.phase = "other"

    def _current(self) -> Phase:
        return self.phases.setdefault(self.phase, Phase())

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        cls = sdbus.SystemdBus
        orig_call, orig_wait = cls.call, cls.wait_job
        meter = self

        async def call(bus: Any, path: str, interface: str, member: str, *args: Any,
                       **kwargs: Any) -> list[Any]:
            t0 = time.perf_counter()
            try:
                return await orig_call(bus, path, interface, member, *args, **kwargs)
            finally:
                phase = meter._current()
                elapsed = time.perf_counter() - t0
                phase.calls[member] += 1
                phase.member_s[member] += elapsed
                phase.reply_s += elapsed

        async def wait_job(bus: Any, job: str) -> str:
            t0 = time.perf_counter()
            try:
                return await orig_wait(bus, job)
            finally:
                phase = meter._current()
                phase.jobs += 1
                phase.job_s += time.perf_counter() - t0

        cls.call = call  # type: ignore[method-assign,assignment]
        cls.wait_job = wait_job  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            cls.call = orig_call  # type: ignore[method-assign]
            cls.wait_job = orig_wait  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def empty_envs(runtimes: list[str]) -> AsyncIterator[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        yield {rt: await stack.enter_async_context(
            gestvenv.ephemeral(storage_backend="disk", runtime=rt)) for rt in runtimes}


class SystemdCost:
    """Measures, local vs systemd, what one environment costs beyond the packages."""

    STEPS = ("create", "destroy", "create + destroy", 'execute(["true"])')

    def __init__(self, runtimes: list[str], runs: int) -> None:
        self.runtimes = runtimes
        self.runs = runs
        self.user = SystemdRuntime().user  # root: the system manager, as gestvenv picks it

    async def create_destroy(self, runtime: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        async with gestvenv.ephemeral(storage_backend="disk", runtime=runtime):
            t1 = time.perf_counter()
        return t1 - t0, time.perf_counter() - t1

    async def steps(self) -> dict[str, dict[str, list[float]]]:
        """{step: {runtime: seconds}}; the runtimes alternate, so drift hits both alike."""
        out: dict[str, dict[str, list[float]]] = {s: {rt: [] for rt in self.runtimes}
                                                  for s in self.STEPS}
        for rt in self.runtimes:  # warm-up
            await self.create_destroy(rt)
        for i in range(self.runs):
            for rt in self.runtimes if i % 2 == 0 else self.runtimes[::-1]:
                create, destroy = await self.create_destroy(rt)
                out["create"][rt].append(create)
                out["destroy"][rt].append(destroy)
                out["create + destroy"][rt].append(create + destroy)
        execute = out['execute(["true"])']
        async with empty_envs(self.runtimes) as envs:
            for env in envs.values():  # warm-up
                await self._true(env)
            for i in range(self.runs):
                for rt in self.runtimes if i % 2 == 0 else self.runtimes[::-1]:
                    t0 = time.perf_counter()
                    await self._true(envs[rt])
                    execute[rt].append(time.perf_counter() - t0)
        return out

    @staticmethod
    async def _true(env: Any) -> None:
        result = await env.execute(["true"])
        if not result.ok:
            raise SystemExit(f"execute(['true']) failed: {result}")

    async def counted(self, runtime: str, passes: int) -> list[dict[str, Phase]]:
        """The D-Bus calls of create, one execute and destroy, ``passes`` times."""
        out = []
        for _ in range(passes):
            meter = BusMeter()
            with meter.installed():
                meter.phase = "create"
                t0 = time.perf_counter()
                async with gestvenv.ephemeral(storage_backend="disk", runtime=runtime) as env:
                    t1 = time.perf_counter()
                    meter.phase = "execute"
                    await self._true(env)
                    t2 = time.perf_counter()
                    meter.phase = "destroy"
                t3 = time.perf_counter()
            for name, wall in (("create", t1 - t0), ("execute", t2 - t1), ("destroy", t3 - t2)):
                meter.phases.setdefault(name, Phase()).wall_s = wall
            out.append(meter.phases)
        return out

    async def raw_dbus(self) -> tuple[str, dict[str, list[float]]]:
        """Round trips to the manager, on gestvenv's own connection of this loop."""
        bus = await sdbus.connection(user=self.user)
        cheap = "gestvenv.slice"
        try:
            await bus.get_unit(cheap)
        except sdbus.NoSuchUnit:
            cheap = "-.slice"
        connect_label = "new connection (Hello, AddMatch, Subscribe)"
        get_label = f'GetUnit("{cheap}")'
        list_label = 'ListUnitsByPatterns(["gestvenv-*"])'
        start_label = "StartTransientUnit -> JobRemoved"
        stop_label = "StopUnit -> JobRemoved"
        times: dict[str, list[float]] = {k: [] for k in (
            connect_label, get_label, list_label, start_label, stop_label)}
        for _ in range(min(self.runs, 10)):
            t0 = time.perf_counter()
            fresh = await sdbus.SystemdBus.connect(self.user)
            times[connect_label].append(time.perf_counter() - t0)
            fresh.close()
        for _ in range(5 * self.runs + 1):  # the first one is a warm-up
            t0 = time.perf_counter()
            await bus.get_unit(cheap)
            times[get_label].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await bus.list_units(["gestvenv-*"])
            times[list_label].append(time.perf_counter() - t0)
        del times[get_label][0], times[list_label][0]
        sleep = shutil.which("sleep") or "/bin/sleep"
        for i in range(self.runs + 1):
            name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}.service"
            props: list[sdbus.Property] = [
                ("Description", "s", "gestvenv benchmark probe (bench_create.py)"),
                ("ExecStart", "a(sasb)", [[sleep, [sleep, "600"], False]]),
                ("Type", "s", "exec"),
                ("CollectMode", "s", "inactive-or-failed"),
            ]
            t0 = time.perf_counter()
            try:
                result = await bus.start_transient_unit(name, props)
                t1 = time.perf_counter()
                if result != "done":
                    raise SystemExit(f"probe unit {name}: start job {result}")
            finally:
                t2 = time.perf_counter()
                await bus.stop_unit(name)
                t3 = time.perf_counter()
                await bus.reset_failed(name)
            if i:  # the first one is a warm-up
                times[start_label].append(t1 - t0)
                times[stop_label].append(t3 - t2)
        return f"{'user' if self.user else 'system'} manager", times


def report_systemd(cost: SystemdCost, steps: dict[str, dict[str, list[float]]],
                   results: dict[str, list[float]],
                   counted: dict[str, list[dict[str, Phase]]],
                   raw: tuple[str, dict[str, list[float]]], passes: int) -> None:
    both = "local" in cost.runtimes
    print(f"\nsystemd runtime: what it adds per environment (disk backend, empty env; medians "
          f"of {cost.runs}, runtimes alternated)")
    print(f"{'step':<40}" + ("{:>11}".format("local ms") if both else "")
          + f"{'systemd ms':>12}" + (f"{'added ms':>11}{'ratio':>8}" if both else ""))
    rows = [(step, {rt: statistics.median(v) for rt, v in per_rt.items()})
            for step, per_rt in steps.items()]
    for backend in ("disk", "memory"):
        if gv_label(backend, "systemd") in results:
            rows.append((f"full cycle with packages ({backend}, table)",
                         {rt: statistics.median(results[gv_label(backend, rt)])
                          for rt in cost.runtimes}))
    for step, med in rows:
        line = f"{step:<40}"
        if both:
            line += f"{fmt_ms(med['local']):>11}"
        line += f"{fmt_ms(med['systemd']):>12}"
        if both:
            added = med["systemd"] - med["local"]
            line += f"{added * 1000:>+11.1f}{med['systemd'] / med['local']:>7.1f}x"
        print(line)

    print(f"\nD-Bus calls per step, systemd runtime ({passes} counted passes of create, "
          "execute(['true']), destroy; calls: min-max of the passes, by member: the last "
          "pass; times: medians; StartTransientUnit and StopUnit reply once the job is "
          "queued, its end is the JobRemoved wait):")
    for step in ("create", "execute", "destroy"):
        phases = [c.get(step, Phase()) for c in counted["systemd"]]
        last = phases[-1]
        totals = sorted(sum(p.calls.values()) for p in phases)
        total = str(totals[0]) if totals[0] == totals[-1] else f"{totals[0]}-{totals[-1]}"
        detail = ", ".join(
            f"{m} x{n} {statistics.median(p.member_s[m] for p in phases) * 1000:.1f} ms"
            for m, n in last.calls.most_common())
        reply = statistics.median(p.reply_s for p in phases)
        job = statistics.median(p.job_s for p in phases)
        wall = statistics.median(p.wall_s for p in phases)
        print(f"  {step:<8} {total:>5} calls, {last.jobs} jobs waited: {reply * 1000:6.1f} ms "
              f"awaiting replies + {job * 1000:6.1f} ms awaiting JobRemoved, of "
              f"{wall * 1000:6.1f} ms wall")
        print(f"           ({detail})")
    if "local" in counted:
        n = sum(sum(p.calls.values()) for c in counted["local"] for p in c.values())
        print(f"  local runtime: {n} D-Bus calls in {passes} passes")

    manager, times = raw
    print(f"\nraw D-Bus round trips to the {manager} (gestvenv's own connection; probe unit: "
          "Type=exec sleep, stopped at once)")
    print(f"{'call':<46}{'runs':>5}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}")
    for name, values in times.items():
        print(f"{name:<46}{len(values):>5}{fmt_ms(statistics.median(values)):>11}"
              f"{fmt_ms(p90(values)):>9}{fmt_ms(min(values)):>9}")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_rounds(tools: dict[str, Callable[[], object]], runs: int,
               results: dict[str, list[float]]) -> None:
    """Round-robin, the order rotated each round, so that drift hits every tool alike."""
    names = list(tools)
    for i in range(runs):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            results.setdefault(name, []).append(timed(tools[name]))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def report(results: dict[str, list[float]], reference: str) -> float:
    ref = statistics.median(results[reference])
    print(f"\n{'tool':<46}{'runs':>5}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}   vs reference")
    for name, values in results.items():
        med = statistics.median(values)
        ratio = "reference" if name == reference else f"{med / ref:.2f}x"
        print(f"{name:<46}{len(values):>5}{fmt_ms(med):>11}{fmt_ms(p90(values)):>9}"
              f"{fmt_ms(min(values)):>9}   {ratio}")
    print()
    for name, values in results.items():
        if name != reference:
            print(f"{name}: {statistics.median(values) / ref:.2f}x {reference}")
    for backend in ("disk", "memory"):
        local, systemd = gv_label(backend, "local"), gv_label(backend, "systemd")
        if local in results and systemd in results:
            lo, sd = statistics.median(results[local]), statistics.median(results[systemd])
            print(f"systemd vs local runtime, full cycle ({backend}): {sd * 1000:.1f} vs "
                  f"{lo * 1000:.1f} ms, {(sd - lo) * 1000:+.1f} ms per environment "
                  f"({sd / lo:.2f}x)")
    return ref


def choose_runtimes(choice: str) -> tuple[list[str], str | None]:
    """The gestvenv runtimes to measure, local first; and a note on the choice."""
    if choice == "local":
        return ["local"], None
    if not systemd_booted():
        if choice == "auto":
            return ["local"], ("systemd is not PID 1 here (no /run/systemd/system): local "
                               "runtime only; run the benchmark inside "
                               "`python -m tests.harness.systemd_host run -- ...` for both")
        raise SystemExit(f"--runtime {choice}: systemd is not PID 1 here "
                         "(no /run/systemd/system); try tests.harness.systemd_host")
    try:
        asyncio.run(SystemdRuntime().prepare())
    except GestvenvError as exc:
        if choice == "auto":
            return ["local"], f"systemd runtime not usable ({exc}): local runtime only"
        raise SystemExit(f"--runtime {choice}: {exc}") from None
    return (["systemd"] if choice == "systemd" else ["local", "systemd"]), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per fast tool (15)")
    parser.add_argument("--slow-runs", type=int, default=None,
                        help="timed runs for venv+pip and virtualenv+pip (default: min(runs, 5))")
    parser.add_argument("--pyc-runs", type=int, default=None,
                        help="trials per compile_bytecode setting (default: min(runs, 5))")
    parser.add_argument("--packages", nargs="+", default=["requests", "six"],
                        help="packages to install (default: requests six)")
    parser.add_argument("--imports", nargs="+", default=None,
                        help="modules to import (default: derived from --packages)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheelhouse", metavar="DIR",
                        help="install offline from DIR (default: a wheelhouse of tiny wheels)")
    source.add_argument("--online", action="store_true", help="install real packages from PyPI")
    parser.add_argument("--tmp-base", default="/var/tmp",
                        help="where the temporary directory goes (default /var/tmp)")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd", "both"],
                        default="auto",
                        help="gestvenv runtime(s) to time (default auto: local and systemd when "
                             "systemd is PID 1, else local)")
    parser.add_argument("--write-isolation", action="store_true",
                        help="then the cost of write isolation (issue 11): copies vs the old "
                             "hardlinks, for requests and for numpy + pandas (wheels from PyPI)")
    parser.add_argument("--isolation-runs", type=int, default=5,
                        help="runs per row of --write-isolation (5)")
    parser.add_argument("--breakdown-runs", type=int, default=None,
                        help="runs per step of the systemd breakdown (default: max(2*runs, 20))")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    slow_runs = args.slow_runs if args.slow_runs is not None else min(args.runs, 5)
    pyc_runs = args.pyc_runs if args.pyc_runs is not None else min(args.runs, 5)
    breakdown_runs = (args.breakdown_runs if args.breakdown_runs is not None
                      else max(2 * args.runs, 20))
    runtimes, runtime_note = choose_runtimes(args.runtime)

    root = Path(tempfile.mkdtemp(prefix="gestvenv-bench-", dir=args.tmp_base))
    shm_before = _shm_entries()
    saved_environ = dict(os.environ)
    started = time.perf_counter()
    try:
        bench = Bench(args, root, runtimes)
        _run(bench, args.runs, slow_runs, pyc_runs, breakdown_runs, runtime_note)
        if args.write_isolation:
            run_write_isolation(args, root, runtimes[0])
    finally:
        leftovers = _cleanup(root, shm_before, "systemd" in runtimes)
        os.environ.clear()
        os.environ.update(saved_environ)
    what = "processes, dirs, environments" + (", gestvenv-* units" if "systemd" in runtimes
                                              else "")
    print(f"\nload average at end: {_loadavg()}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          + (f"cleanup: nothing left behind ({what})" if not leftovers
             else "LEFT BEHIND: " + "; ".join(leftovers)))
    return 1 if leftovers else 0


def _run(bench: Bench, runs: int, slow_runs: int, pyc_runs: int, breakdown_runs: int,
         runtime_note: str | None) -> None:
    print(f"gestvenv {gestvenv.__version__} | Python {sys.version.split()[0]} "
          f"({bench.base_python}) | {os.cpu_count()} CPUs")
    print(f"gestvenv runtimes: {', '.join(bench.runtimes)}" + (
        f" | systemd {_systemd_version()}, cgroups {_cgroup_layout()}"
        if "systemd" in bench.runtimes else ""))
    if runtime_note:
        print(f"note: {runtime_note}")
    print(f"load average at start: {_loadavg()} (host-wide; other work on the machine "
          "shows here)")
    print(f"uv: {tool_version([bench.uv, '--version'])} | "
          f"pip: {tool_version([sys.executable, '-m', 'pip', '--version']).split(' from ')[0]} | "
          f"virtualenv: "
          f"{tool_version([sys.executable, '-m', 'virtualenv', '--version']).split(' from ')[0]}")
    print(f"mode: {bench.mode} | packages: {' '.join(bench.packages)} | "
          f"command: python -c '{bench.import_code}'")
    print(f"temp root: {bench.root} (uv cache, envs, runtime dir: same filesystem)")
    if bench.dropped_dontwrite:
        print("note: PYTHONDONTWRITEBYTECODE was set here; unset for this benchmark")

    with asyncio.Runner() as runner:
        def gv_cycle(backend: str, runtime: str) -> Callable[[], object]:
            return lambda: runner.run(bench.gv_async(backend, runtime))

        fast: dict[str, Callable[[], object]] = {}
        for backend in ("disk", "memory"):
            for rt in bench.runtimes:
                fast[gv_label(backend, rt)] = gv_cycle(backend, rt)
        fast[bench.pyc_off] = lambda: runner.run(bench.gv_async("disk", bench.primary, False))
        fast[f"gestvenv sync (disk, {bench.primary})"] = bench.gv_sync
        fast["uv run --with"] = bench.uv_run
        slow: dict[str, Callable[[], object]] = {"python -m venv + pip": bench.venv_pip}
        if importlib.util.find_spec("virtualenv") is not None:
            slow["virtualenv + pip"] = bench.virtualenv_pip
        else:
            print("note: virtualenv is not installed here; skipped (pip install virtualenv)")
        # Warm-up, untimed: fills the shared uv cache (gestvenv, then uv run's own environment),
        # pip's and virtualenv's caches.
        for fn in (*fast.values(), *slow.values()):
            fn()
        links = {b: runner.run(bench.link_mode_check(b)) for b in ("disk", "memory")}
        print("installed files: " + ", ".join(f"{b} backend {m}" for b, m in links.items()))
        print("note: after warm-up, uv run --with reuses its cached --with environment "
              "(no install); gestvenv makes a fresh env every time (a clone of its package-set "
              "snapshot after the first; see template_ttl)")
        print(f"warm-up done; {runs} interleaved runs of the fast tools, then {slow_runs} of "
              f"venv/virtualenv + pip (slow: fewer runs)...", flush=True)
        results: dict[str, list[float]] = {}
        run_rounds(fast, runs, results)
        run_rounds(slow, slow_runs, results)
        ref = report(results, bench.reference)

        if "systemd" in bench.runtimes:
            cost = SystemdCost(bench.runtimes, breakdown_runs)
            print(f"\nsystemd breakdown: {breakdown_runs} runs per step...", flush=True)
            steps = runner.run(cost.steps())
            passes = 5
            counted = {rt: runner.run(cost.counted(rt, passes)) for rt in bench.runtimes}
            raw = runner.run(cost.raw_dbus())
            report_systemd(cost, steps, results, counted, raw, passes)

        print(f"\n.pyc: GESTVENV_EPHEMERAL_COMPILE_BYTECODE=0 vs 1, {pyc_runs} trials each "
              "(disk, install into an empty env, then the same import twice; medians)")
        trials: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        runner.run(bench.pyc_trial(True))  # warm-up
        for i in range(pyc_runs):
            for flag in ((False, True) if i % 2 == 0 else (True, False)):
                trials[flag].append(runner.run(bench.pyc_trial(flag)))
    medians = {flag: [statistics.median(t[k] for t in rows) for k in range(3)]
               for flag, rows in trials.items()}
    print(f"{'compile_bytecode':<18}{'install ms':>12}{'1st import ms':>15}{'2nd import ms':>15}"
          f"{'install+1st ms':>16}")
    for flag in (False, True):
        inst, first, second = medians[flag]
        print(f"{int(flag):<18}{fmt_ms(inst):>12}{fmt_ms(first):>15}{fmt_ms(second):>15}"
              f"{fmt_ms(inst + first):>16}")
    _conclude(bench, results, ref, medians)


def _conclude(bench: Bench, results: dict[str, list[float]], ref: float,
              medians: dict[bool, list[float]]) -> None:
    peers = {n: statistics.median(v) for n, v in results.items() if not n.startswith("gestvenv")}
    best = min(peers, key=lambda n: peers[n])
    ratio = peers[best] / ref
    verdict = "faster than" if ratio > 1 else "slower than"
    off, on = medians[False], medians[True]
    extra_install = on[0] - off[0]
    saved_first = off[1] - on[1]
    net = (on[0] + on[1]) - (off[0] + off[1])
    pyc = (f"compile_bytecode=1 costs {extra_install * 1000:+.1f} ms at install and saves "
           f"{saved_first * 1000:.1f} ms on the first import (net {net * 1000:+.1f} ms for an env "
           f"that imports once; 2nd import {off[2] * 1000:.1f} vs {on[2] * 1000:.1f} ms)")
    steady_on = statistics.median(results[bench.reference])  # default: compile_bytecode=true
    steady_off = statistics.median(results[bench.pyc_off])
    print(f"\nSteady state (package-set snapshot reused, .pyc files cloned with it): "
          f"compile_bytecode=1 {steady_on * 1000:.1f} ms vs =0 {steady_off * 1000:.1f} ms per "
          f"create + install + import + destroy ({steady_off / steady_on:.2f}x).")
    print(f"\nConclusion: {bench.reference} {ref * 1000:.1f} ms median is {verdict} the "
          f"best peer ({best}, {peers[best] * 1000:.1f} ms, {ratio:.2f}x); {pyc}; "
          f"with snapshots the compile cost is paid once per package set, so the default "
          f"(compile_bytecode = true) {'pays' if steady_on < steady_off else 'does NOT pay'} "
          "here.")
    local, systemd = gv_label("disk", "local"), gv_label("disk", "systemd")
    if local in results and systemd in results:
        lo, sd = statistics.median(results[local]), statistics.median(results[systemd])
        print(f"systemd runtime: {sd * 1000:.1f} ms per full cycle (disk), "
              f"{(sd - lo) * 1000:+.1f} ms per environment over the local runtime "
              f"({sd / lo:.2f}x), {sd / peers[best]:.2f}x the best peer's time "
              f"({best}, {peers[best] * 1000:.1f} ms).")


# --- what write isolation costs (issue 11): copies vs the old hardlinks ---

ISOLATION_SETS = {"small": ["requests"], "large": ["numpy", "pandas"]}


@contextlib.contextmanager
def old_hardlinks() -> Iterator[None]:
    """Benchmark only: gestvenv as it was before issue 11, in this process (uv installs with
    --link-mode hardlink, snapshots stored and cloned with os.link)."""
    from gestvenv import builder, templates

    link_mode, copy = builder.UvBuilder.link_mode, templates.Copier.copy
    builder.UvBuilder.link_mode = lambda self, env_path: "hardlink"  # type: ignore[method-assign]
    templates.Copier.copy = lambda self, src, dst: os.link(src, dst)  # type: ignore[method-assign]
    try:
        yield
    finally:
        builder.UvBuilder.link_mode = link_mode  # type: ignore[method-assign]
        templates.Copier.copy = copy  # type: ignore[method-assign]


def own_bytes(root: Path) -> tuple[int, int]:
    """(bytes allocated to files whose inode is the env's alone (st_nlink 1), bytes of files
    whose inode is shared (hardlinks), or seen through a mount in the env (a root creator's
    overlay of a snapshot at process isolation: its upper layer, the env's own, is in the env's
    .gestvenv/overlay and counted there)), directories and symlinks not counted."""
    own = shared = 0
    dev = os.lstat(root).st_dev
    for dirpath, _dirs, files in os.walk(root):
        mounted = os.lstat(dirpath).st_dev != dev
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                if st.st_nlink == 1 and not mounted:
                    own += st.st_blocks * 512
                else:
                    shared += st.st_blocks * 512
    return own, shared


def download_wheels(dest: Path, packages: list[str]) -> None:
    """PyPI wheels of ``packages`` and their dependencies, for this interpreter."""
    dest.mkdir(parents=True, exist_ok=True)
    run_checked([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
                 "--disable-pip-version-check", "--dest", str(dest), *packages],
                {k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                "pip download")


class IsolationCost:
    """create + install + import + destroy on disk (local runtime), copies (now) vs hardlinks
    (before issue 11), with every env installed by uv (``template_ttl = 0``) and with envs
    cloned from the package-set snapshot (the default); next to ``uv run --with``."""

    PATHS = ("uv install", "snapshot clone")
    MODES = ("copies (now)", "hardlinks (old)")

    def __init__(self, bench: Bench, runtime: str) -> None:
        self.bench = bench
        self.runtime = runtime

    async def cycle(self, path: str) -> tuple[float, float, int, int]:
        """(s to create with packages, s for the whole cycle, own bytes, shared bytes)."""
        if path == "uv install":
            os.environ["GESTVENV_EPHEMERAL_TEMPLATE_TTL"] = "0"
        try:
            t0 = time.perf_counter()
            async with gestvenv.ephemeral(packages=self.bench.packages, storage_backend="disk",
                                          runtime=self.runtime) as env:
                t1 = time.perf_counter()
                own, shared = own_bytes(env.path)
                t_own = time.perf_counter() - t1  # not part of the cycle: taken off
                result = await env.execute(self.bench.argv_import)
        finally:
            os.environ.pop("GESTVENV_EPHEMERAL_TEMPLATE_TTL", None)
        total = time.perf_counter() - t0 - t_own
        if not result.ok:
            raise SystemExit(f"isolation cycle ({path}): import failed\n{result.stderr}")
        return t1 - t0, total, own, shared

    def measure(self, runner: asyncio.Runner, runs: int) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def one(mode: str, path: str) -> tuple[float, float, int, int]:
            if mode == self.MODES[1]:
                with old_hardlinks():
                    return runner.run(self.cycle(path))
            return runner.run(self.cycle(path))

        keys = [(m, p) for p in self.PATHS for m in self.MODES]
        for mode, path in keys:  # warm-up: the cache, a snapshot per mode
            one(mode, path)
        self.bench.uv_run()
        rows: dict[tuple[str, str], list[tuple[float, float, int, int]]] = {k: [] for k in keys}
        uv: list[float] = []
        for i in range(runs):
            for mode, path in keys if i % 2 == 0 else keys[::-1]:
                rows[(mode, path)].append(one(mode, path))
            t0 = time.perf_counter()
            self.bench.uv_run()
            uv.append(time.perf_counter() - t0)
        for key, values in rows.items():
            out[" / ".join(key)] = {
                "create": statistics.median(v[0] for v in values),
                "cycle": statistics.median(v[1] for v in values),
                "own": statistics.median(v[2] for v in values),
                "shared": statistics.median(v[3] for v in values),
            }
        out["uv run --with"] = {"cycle": statistics.median(uv)}
        return out


def copy_primitives(src: Path, root: Path, runs: int) -> dict[str, float]:
    """Median seconds to copy the regular files of ``src`` (a site-packages) to a new tree on
    the same filesystem, per primitive."""
    from gestvenv.templates import Copier

    files = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs
             if not os.path.islink(os.path.join(d, f))]
    dirs = sorted({os.path.dirname(f) for f in files})

    def copier(reflink: bool) -> Callable[[str, str], None]:
        c = Copier(reflink=reflink)
        return c.copy

    prims: dict[str, Callable[[], Callable[[str, str], None]]] = {
        "os.link (old)": lambda: os.link,
        "Copier auto (FICLONE, then copy_file_range)": lambda: copier(True),
        "Copier copy (sendfile)": lambda: copier(False),
        "shutil.copy2": lambda: shutil.copy2,  # type: ignore[dict-item,return-value]
    }
    times: dict[str, list[float]] = {k: [] for k in prims}
    for i in range(runs):
        for name in prims if i % 2 == 0 else list(prims)[::-1]:
            dst = root / f"copy-{uuid.uuid4().hex[:8]}"
            for d in dirs:
                os.makedirs(dst / d, exist_ok=True)
            fn = prims[name]()
            t0 = time.perf_counter()
            for f in files:
                fn(str(src / f), str(dst / f))
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(dst)
    return {k: statistics.median(v) for k, v in times.items()}


async def kept_site(packages: list[str], runtime: str, keep: Path) -> Path:
    """A copy of the site-packages of an environment of ``packages``, at ``keep``."""
    async with gestvenv.ephemeral(packages=packages, storage_backend="disk",
                                  runtime=runtime) as env:
        site = next(env.path.glob("lib/python*/site-packages"))
        shutil.copytree(site, keep, symlinks=True)
    return keep


def run_write_isolation(args: argparse.Namespace, root: Path, runtime: str) -> None:
    runs = args.isolation_runs
    print(f"\nwrite isolation (issue 11): copies vs the old hardlinks, disk, {runtime} runtime, "
          f"{runs} interleaved runs per row (medians); wheels from PyPI", flush=True)
    wheels = root / "isolation-wheels"
    for packages in ISOLATION_SETS.values():
        download_wheels(wheels, packages)
    print(f"wheelhouse: {len(os.listdir(wheels))} wheels, "
          f"{sum(f.stat().st_size for f in wheels.iterdir()) / 1e6:.0f} MB")
    for label, packages in ISOLATION_SETS.items():
        ns = argparse.Namespace(**{**vars(args), "packages": packages, "imports": None,
                                   "online": False, "wheelhouse": str(wheels)})
        bench = Bench(ns, root, [runtime])
        with asyncio.Runner() as runner:
            figures = IsolationCost(bench, runtime).measure(runner, runs)
            site = runner.run(kept_site(packages, runtime, root / f"site-{label}"))
        uv = figures.pop("uv run --with")["cycle"]
        print(f"\n{label} set ({' '.join(packages)}; import {bench.import_code[7:]}):")
        print(f"{'':34}{'create+install ms':>18}{'full cycle ms':>15}{'vs uv run':>11}"
              f"{'own MB':>9}{'shared MB':>11}")
        for name, f in figures.items():
            print(f"{name:34}{f['create'] * 1000:>18.1f}{f['cycle'] * 1000:>15.1f}"
                  f"{f['cycle'] / uv:>10.2f}x{f['own'] / 1e6:>9.1f}{f['shared'] / 1e6:>11.1f}")
        print(f"{'uv run --isolated --with':34}{'':>18}{uv * 1000:>15.1f}{1:>10.2f}x")
        for path in IsolationCost.PATHS:
            new = figures[f"{IsolationCost.MODES[0]} / {path}"]
            old = figures[f"{IsolationCost.MODES[1]} / {path}"]
            print(f"cost of isolation, {path}: {(new['cycle'] - old['cycle']) * 1000:+.1f} ms "
                  f"per full cycle ({new['cycle'] / old['cycle']:.2f}x), "
                  f"{(new['own'] - old['own']) / 1e6:+.1f} MB written per environment")
        prims = copy_primitives(site, root, max(3, runs))
        n = sum(len(fs) for _, _, fs in os.walk(site))
        print(f"copying this set's site-packages ({n} files, "
              f"{own_bytes(site)[0] / 1e6:.1f} MB) once: " + ", ".join(
                  f"{name} {t * 1000:.1f} ms" for name, t in prims.items()))
        shutil.rmtree(site)


# --- cleanup ---

def _shm_root() -> Path:
    return Path("/dev/shm/gestvenv" if os.geteuid() == 0 else f"/dev/shm/gestvenv-{os.geteuid()}")


def _shm_entries() -> set[str] | None:
    try:
        return set(os.listdir(_shm_root())) - {ROOT_MARK}
    except FileNotFoundError:
        return None


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _systemd_version() -> str:
    return tool_version(["systemctl", "--version"]).split(" (")[0]


def _cgroup_layout() -> str:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2 (unified)"
    if os.path.isdir("/sys/fs/cgroup/unified"):
        return "hybrid (v1 controllers + v2 for systemd)"
    return "v1 (legacy)"


def _leftover_units() -> list[str]:
    """gestvenv-* units still loaded (any state); gestvenv.slice is shared and stays."""
    argv = ["systemctl", *(["--user"] if os.geteuid() != 0 else []), "list-units", "--all",
            "--no-legend", "--plain", "--no-pager", "gestvenv-*"]
    deadline = time.monotonic() + 5  # command units are collected once inactive
    while True:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            return [f"(systemctl list-units failed: {exc})"]
        if proc.returncode != 0:
            return [f"(systemctl list-units failed: {proc.stderr.strip()})"]
        units = [line.replace("\u25cf", "").split()[0] for line in proc.stdout.splitlines()
                 if line.strip()]
        units = [u for u in units if u != "gestvenv.slice"]
        if not units or time.monotonic() > deadline:
            return units
        time.sleep(0.2)


def _cleanup(root: Path, shm_before: set[str] | None, systemd: bool) -> list[str]:
    """Wait for (or end) our watchdog, check gestvenv left nothing, remove the temp root."""
    leftovers: list[str] = []
    if systemd and systemd_booted():
        from benchmarks import benchlib  # (not at the top: benchlib imports this module)

        benchlib.drain_pool()
        units = _leftover_units()
        if units:
            leftovers.append(f"systemd units: {units}")
    runtime = root / "run"
    leftovers += [f"watchdog pid {pid} still running (sent SIGTERM)"
                  for pid in wait_for_watchdogs(runtime)]
    for sub in ("envs", "run/envs", "run/storage"):
        d = root / sub
        left = sorted(n for n in os.listdir(d) if n != ROOT_MARK) if d.is_dir() else []
        if left:  # the root's own mark is part of the root, not a leftover env
            leftovers.append(f"{d} not empty: {left}")
    shm_after = _shm_entries()
    if shm_after is not None:
        new = shm_after - (shm_before or set())
        if new:
            leftovers.append(f"{_shm_root()}: {sorted(new)}")
        elif shm_before is None and not shm_after:
            with contextlib.suppress(FileNotFoundError):
                (_shm_root() / ROOT_MARK).unlink()
            _shm_root().rmdir()  # created by this run, and empty
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        leftovers.append(f"{root} could not be removed")
    return leftovers


if __name__ == "__main__":
    sys.exit(main())
