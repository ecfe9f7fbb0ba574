"""What bench_cli.py, bench_bigsets.py and bench_many.py share (issue 15): the header (date,
machine, versions, load average), a gestvenv home of the benchmark's own (runtime dir, config
files, storage root, uv cache: nothing of the machine's default configuration is read or
written), the statistics table with ratios, and the check that nothing was left behind.

The helpers of bench_create.py are imported from it, not copied.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from benchmarks.bench_create import (  # noqa: E402
    ROOT_MARK,
    _cgroup_layout,
    _leftover_units,
    _loadavg,
    _systemd_version,
    p90,
    tool_version,
    wait_for_watchdogs,
)
from gestvenv.builder import find_interpreter, find_uv  # noqa: E402
from gestvenv.runtime.systemd import systemd_booted  # noqa: E402

__all__ = ["REPO", "base_python", "clean_environ", "fmt_ms", "header", "home_environ",
           "leftovers", "loadavg", "p90", "peer_environ", "report", "run_quiet", "uv_path"]

# Variables of this machine that would change what gestvenv, uv or pip do: never passed on.
_DROPPED_PREFIXES = ("GESTVENV_", "UV_", "PIP_", "VIRTUALENV_")
_DROPPED = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")


def loadavg() -> str:
    return _loadavg()


def uv_path() -> str:
    uv = find_uv()
    if uv is None:
        raise SystemExit("uv not found (pip install uv)")
    return uv


def base_python() -> str:
    """The interpreter gestvenv builds environments from (the one running this script)."""
    return find_interpreter(None).path


def clean_environ() -> dict[str, str]:
    """os.environ without the machine's gestvenv, uv and pip settings (the CA ones stay)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED}
    env.update({k: os.environ[k] for k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")
                if k in os.environ})
    return env


def home_environ(home: Path, *, cache: Path, runtime: str | None = None,
                 wheelhouse: Path | None = None, offline: bool = True,
                 max_concurrent: int = 200) -> dict[str, str]:
    """The GESTVENV_* variables of a gestvenv home of the benchmark's own, in ``home``.

    ``cache`` is the uv cache (its parent also holds gestvenv's package-set snapshots); homes
    may share one. ``runtime`` None leaves the configuration's ``auto``."""
    env = {
        "GESTVENV_RUNTIME_DIR": str(home / "run"),
        "GESTVENV_SYSTEM_CONFIG": str(home / "no-system-config.toml"),
        "GESTVENV_CONFIG": str(home / "no-user-config.toml"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "GESTVENV_EPHEMERAL_STORAGE_ROOT": str(home / "envs"),
        "GESTVENV_EPHEMERAL_CACHE_DIR": str(cache),
        "GESTVENV_EPHEMERAL_BUILDER": "uv",
        "GESTVENV_EPHEMERAL_MAX_CONCURRENT": str(max_concurrent),
        "GESTVENV_EPHEMERAL_OFFLINE": "1" if offline else "0",
    }
    if wheelhouse is not None:
        env["GESTVENV_EPHEMERAL_FIND_LINKS"] = str(wheelhouse)
    if runtime is not None:
        env["GESTVENV_EPHEMERAL_RUNTIME"] = runtime
    return env


def peer_environ(cache: Path) -> dict[str, str]:
    """The environment of ``uv run``: the same uv cache as gestvenv's, no download of Pythons."""
    return {**clean_environ(), "UV_CACHE_DIR": str(cache), "UV_PYTHON_DOWNLOADS": "never",
            "UV_NO_PROGRESS": "1"}


def header(title: str, runtimes: Iterable[str], note: str | None = None) -> None:
    """Date, machine, versions and the load average at start."""
    uv = find_uv()
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    print(f"== {title}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')} | machine: {platform.node()}, "
          f"nproc {usable}" + (f" (of {cpus})" if cpus != usable else "")
          + f", kernel {platform.release()}, {_os_name()}")
    print(f"python {sys.version.split()[0]} ({base_python()}) | uv "
          f"{tool_version([uv, '--version']).removeprefix('uv ') if uv else 'not found'} | "
          f"gestvenv {gestvenv.__version__}")
    runtimes = list(runtimes)
    print(f"gestvenv runtimes: {', '.join(runtimes)}" + (
        f" | {_systemd_version()} as PID 1, cgroups {_cgroup_layout()}"
        if "systemd" in runtimes else ""))
    if note:
        print(f"note: {note}")
    print(f"load average at start: {loadavg()}", flush=True)


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(results: Mapping[str, list[float]], reference: str, *, width: int = 58,
           unit: str = "ms") -> dict[str, float]:
    """A table: runs, median, p90, min, ratio of medians to ``reference``. Returns medians."""
    scale = 1000.0 if unit == "ms" else 1.0
    ref = statistics.median(results[reference])
    print(f"{'':<{width}}{'runs':>5}{'median ' + unit:>12}{'p90':>9}{'min':>9}  "
          f"vs {reference}")
    medians = {}
    for name, values in results.items():
        med = medians[name] = statistics.median(values)
        ratio = "1 (reference)" if name == reference else f"{med / ref:.2f}x"
        print(f"{name:<{width}}{len(values):>5}{med * scale:>12.1f}{p90(values) * scale:>9.1f}"
              f"{min(values) * scale:>9.1f}  {ratio}")
    return medians


def drain_pool() -> None:
    """End the systemd runtime's waiting pool units of the current home (its environment
    variables set), as `cleanup --all` does: they are no env's, and would otherwise last
    pool_idle after the run (their reapers remove their dirs)."""
    import asyncio

    from gestvenv.runtime import runtime_named
    from gestvenv.runtime.systemd import pool

    if systemd_booted():
        asyncio.run(pool.drain(runtime_named("systemd")))  # type: ignore[arg-type]


def leftovers(root: Path, runtime_dirs: Iterable[Path], storage_roots: Iterable[Path],
              systemd: bool) -> list[str]:
    """Wait for (or end) the watchdogs of our runtime dirs; what gestvenv left behind in our
    dirs (and, under systemd, as gestvenv-* units); then remove ``root``."""
    found: list[str] = []
    if systemd and systemd_booted():
        units = _leftover_units()
        if units:
            found.append(f"systemd units: {units}")
    for run in runtime_dirs:
        found += [f"watchdog pid {pid} still running (sent SIGTERM)"
                  for pid in wait_for_watchdogs(run)]
        for sub in ("envs", "storage"):
            d = run / sub
            left = sorted(n for n in os.listdir(d) if n != ROOT_MARK) if d.is_dir() else []
            if left:
                found.append(f"{d} not empty: {left[:5]}{'...' if len(left) > 5 else ''}")
    for d in storage_roots:
        left = sorted(n for n in os.listdir(d) if n != ROOT_MARK) if d.is_dir() else []
        if left:
            found.append(f"{d} not empty: {left[:5]}{'...' if len(left) > 5 else ''}")
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        found.append(f"{root} could not be removed")
    return found


def run_quiet(argv: list[str], env: Mapping[str, str], what: str,
              timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    """Run, capture, and stop the benchmark with the output if it failed."""
    proc = subprocess.run(argv, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                         f"{proc.stderr or proc.stdout}")
    return proc
