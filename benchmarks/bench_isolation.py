"""What write isolation costs per isolation level, next to ``uv run --isolated --with``.

Full cycle "create env + install PKGS + python -c 'import ...' + destroy", local runtime, disk
backend, for process isolation (installed files are copies or reflinks: the commands run as the
creator, who could write a shared file) and, as root, namespace isolation (the commands run under
the env's own uid: the cache's and snapshots' files stay shared as hardlinks that are root's and
read-only to it). The first cycle installs with uv; the next ones clone the set's snapshot. In the
same run: ``uv run --isolated --no-project --with PKGS python -c 'import ...'`` (it reuses one
cached environment after its first run).

Usage (wheels from a wheelhouse dir, offline)::

    pip download -d WH requests          # or numpy pandas
    python benchmarks/bench_isolation.py --wheelhouse WH --packages requests --runs 5

Everything lives in one temp dir under /var/tmp, removed at the end. Not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_create import wait_for_watchdogs


async def gestvenv_cycle(level: str, packages: list[str], imports: str) -> float:
    import gestvenv

    started = time.perf_counter()
    async with gestvenv.ephemeral(f"bench-{level}", packages=packages,
                                  isolation_level=level, runtime="local") as env:
        done = await env.execute(["python", "-c", f"import {imports}"], cwd=str(env.path))
        if done.returncode != 0:
            raise SystemExit(f"import failed in the {level} env: {done.stderr}")
    return (time.perf_counter() - started) * 1000


def uv_cycle(uv: str, packages: list[str], imports: str, environ: dict[str, str]) -> float:
    argv = [uv, "run", "--isolated", "--no-project", "--no-config", "--offline"]
    for package in packages:
        argv += ["--with", package]
    argv += ["python", "-c", f"import {imports}"]
    started = time.perf_counter()
    subprocess.run(argv, env=environ, check=True, capture_output=True)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", required=True, type=Path)
    parser.add_argument("--packages", nargs="+", required=True)
    parser.add_argument("--imports", nargs="+", default=None)
    parser.add_argument("--runs", type=int, default=5, help="clones timed per level (5)")
    args = parser.parse_args()
    imports = ", ".join(args.imports or [p.replace("-", "_") for p in args.packages])
    base = Path(tempfile.mkdtemp(prefix="gestvenv-bench-iso-", dir="/var/tmp"))
    environ = {
        "GESTVENV_RUNTIME_DIR": str(base / "run"),
        "GESTVENV_SYSTEM_CONFIG": str(base / "none.toml"),
        "XDG_CONFIG_HOME": str(base / "config"),
        "GESTVENV_EPHEMERAL_STORAGE_ROOT": str(base / "envs"),
        "GESTVENV_EPHEMERAL_CACHE_DIR": str(base / "cache"),
        "GESTVENV_EPHEMERAL_FIND_LINKS": str(args.wheelhouse.resolve()),
        "GESTVENV_EPHEMERAL_OFFLINE": "1",
    }
    os.environ.update(environ)
    from gestvenv.builder import find_uv

    uv = find_uv()
    if uv is None:
        raise SystemExit("uv is needed (pip install uv)")
    peer_env = {**os.environ, "UV_CACHE_DIR": str(base / "uv-run-cache"),
                "UV_FIND_LINKS": str(args.wheelhouse.resolve()), "UV_PYTHON": sys.executable}
    levels = ["process"] + (["namespace"] if os.geteuid() == 0 else [])
    print(f"packages: {' '.join(args.packages)} | {os.cpu_count()} CPUs | local runtime, disk "
          f"| load average {os.getloadavg()[0]:.2f} | temp {base}")
    try:
        results: dict[str, tuple[float, float]] = {}
        for level in levels:
            first = asyncio.run(gestvenv_cycle(level, args.packages, imports))
            clones = [asyncio.run(gestvenv_cycle(level, args.packages, imports))
                      for _ in range(args.runs)]
            results[level] = (first, statistics.median(clones))
        uv_cycle(uv, args.packages, imports, peer_env)  # untimed: fills uv run's own env
        peer = statistics.median(uv_cycle(uv, args.packages, imports, peer_env)
                                 for _ in range(args.runs))
        print(f"{'':34s}{'first (uv install) ms':>24s}{'clone ms (median)':>20s}{'vs uv run':>11s}")
        for level, (first, clone) in results.items():
            print(f"gestvenv {level:25s}{first:24.0f}{clone:20.0f}{clone / peer:10.2f}x")
        print(f"{'uv run --isolated --with':34s}{'':24s}{peer:20.0f}{1:10.2f}x")
    finally:
        wait_for_watchdogs(base / "run")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
