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
from collections import Counter
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
        return "hardlink" if links > 1 else f"copy (st_nlink={links})"

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


def report(results: dict[str, list[float]]) -> float:
    ref = statistics.median(results[REFERENCE])
    print(f"\n{'tool':<34}{'runs':>5}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}   vs gestvenv")
    for name, values in results.items():
        med = statistics.median(values)
        ratio = "reference" if name == REFERENCE else f"{med / ref:.2f}x"
        print(f"{name:<34}{len(values):>5}{fmt_ms(med):>11}{fmt_ms(p90(values)):>9}"
              f"{fmt_ms(min(values)):>9}   {ratio}")
    print()
    for name, values in results.items():
        if name != REFERENCE:
            print(f"{name}: {statistics.median(values) / ref:.2f}x gestvenv")
    return ref


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
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    slow_runs = args.slow_runs if args.slow_runs is not None else min(args.runs, 5)
    pyc_runs = args.pyc_runs if args.pyc_runs is not None else min(args.runs, 5)

    root = Path(tempfile.mkdtemp(prefix="gestvenv-bench-", dir=args.tmp_base))
    shm_before = _shm_entries()
    saved_environ = dict(os.environ)
    started = time.perf_counter()
    try:
        bench = Bench(args, root)
        _run(bench, args.runs, slow_runs, pyc_runs)
    finally:
        leftovers = _cleanup(root, shm_before)
        os.environ.clear()
        os.environ.update(saved_environ)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; "
          + ("cleanup: nothing left behind (processes, dirs, environments)" if not leftovers
             else "LEFT BEHIND: " + "; ".join(leftovers)))
    return 1 if leftovers else 0


def _run(bench: Bench, runs: int, slow_runs: int, pyc_runs: int) -> None:
    print(f"gestvenv {gestvenv.__version__} | Python {sys.version.split()[0]} "
          f"({bench.base_python}) | {os.cpu_count()} CPUs")
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
        fast: dict[str, Callable[[], object]] = {
            REFERENCE: lambda: runner.run(bench.gv_async("disk")),
            "gestvenv async (memory)": lambda: runner.run(bench.gv_async("memory")),
            PYC_OFF: lambda: runner.run(bench.gv_async("disk", False)),
            "gestvenv sync (disk)": bench.gv_sync,
            "uv run --with": bench.uv_run,
        }
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
        ref = report(results)

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
    _conclude(results, ref, medians)


def _conclude(results: dict[str, list[float]], ref: float,
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
    steady_on = statistics.median(results[REFERENCE])  # the default: compile_bytecode = true
    steady_off = statistics.median(results[PYC_OFF])
    print(f"\nSteady state (package-set snapshot reused, .pyc files cloned with it): "
          f"compile_bytecode=1 {steady_on * 1000:.1f} ms vs =0 {steady_off * 1000:.1f} ms per "
          f"create + install + import + destroy ({steady_off / steady_on:.2f}x).")
    print(f"\nConclusion: gestvenv (async, disk) {ref * 1000:.1f} ms median is {verdict} the "
          f"best peer ({best}, {peers[best] * 1000:.1f} ms, {ratio:.2f}x); {pyc}; "
          f"with snapshots the compile cost is paid once per package set, so the default "
          f"(compile_bytecode = true) {'pays' if steady_on < steady_off else 'does NOT pay'} "
          "here.")


# --- cleanup ---

def _shm_root() -> Path:
    return Path("/dev/shm/gestvenv" if os.geteuid() == 0 else f"/dev/shm/gestvenv-{os.geteuid()}")


def _shm_entries() -> set[str] | None:
    try:
        return set(os.listdir(_shm_root())) - {ROOT_MARK}
    except FileNotFoundError:
        return None


def _cleanup(root: Path, shm_before: set[str] | None) -> list[str]:
    """Wait for (or end) our watchdog, check gestvenv left nothing, remove the temp root."""
    leftovers: list[str] = []
    runtime = root / "run"
    # The watchdog lingers ~2 s once no environment exists, then exits by itself.
    deadline = time.monotonic() + 6
    while watchdog_pids(runtime) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in watchdog_pids(runtime):
        leftovers.append(f"watchdog pid {pid} still running (sent SIGTERM)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
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
