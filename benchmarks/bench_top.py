"""What one refresh of ``gestvenv ephemeral top`` costs with N environments (issue 12).

Creates N environments (no packages) on one runtime, starts a long command in some of them
(processes to find, memory and CPU to read), then times R refreshes of the sampler that ``top``
uses (``gestvenv.monitor.Sampler.sample`` over every env, all read at once): wall time per
refresh (median, p90, max) against the interval, and the CPU time this process spent per
refresh; then the same split into its two halves (the runtime's readings, the disk walks); then
the per-command cost of ``env.execute(["true"])`` (what measuring a command's own peak memory
and CPU time adds under systemd shows here, next to the figures in benchmarks/README.md); last,
``gestvenv ephemeral top --once --json`` end to end, minus its interval.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_top.py                          # local runtime, 50 envs
    python benchmarks/bench_top.py --envs 20 --refreshes 5
    python -m tests.harness.systemd_host run -- .venv/bin/python benchmarks/bench_top.py \\
        --runtime systemd                                   # systemd runtime (as root)

Everything (gestvenv's runtime dir, storage root, uv cache) lives in one temporary directory
under /var/tmp, removed at the end; every environment is destroyed.
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

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from benchmarks.bench_create import wait_for_watchdogs  # noqa: E402
from gestvenv import monitor  # noqa: E402
from gestvenv.runtime.systemd import systemd_booted  # noqa: E402


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (f"median {ms(statistics.median(ordered))}, p90 {ms(p90)}, "
            f"max {ms(ordered[-1])}")


def isolate(root: Path, runtime: str, envs: int) -> None:
    """A gestvenv home of the benchmark's own, in ``root``."""
    for key in list(os.environ):
        if key.startswith(("GESTVENV_", "UV_")):
            del os.environ[key]
    os.environ.update({
        "GESTVENV_RUNTIME_DIR": str(root / "run"),
        "GESTVENV_SYSTEM_CONFIG": str(root / "no-system-config.toml"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "GESTVENV_EPHEMERAL_STORAGE_ROOT": str(root / "envs"),
        "GESTVENV_EPHEMERAL_CACHE_DIR": str(root / "cache"),
        "GESTVENV_EPHEMERAL_OFFLINE": "1",
        "GESTVENV_EPHEMERAL_RUNTIME": runtime,
        "GESTVENV_EPHEMERAL_MAX_CONCURRENT": str(envs + 10),
    })


async def timed_refreshes(sampler: monitor.Sampler, records: list[gestvenv.registry.EnvRecord],
                          refreshes: int, interval: float) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    await sampler.sample(records)  # the first reading (and the bus connection)
    for _ in range(refreshes):
        await asyncio.sleep(interval)
        wall, cpu = time.perf_counter(), time.process_time()
        samples = await sampler.sample(records)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assert len(samples) == len(records)
    return walls, cpus


async def halves(sampler: monitor.Sampler, records: list[gestvenv.registry.EnvRecord],
                 refreshes: int) -> tuple[list[float], list[float]]:
    runtime_walls, disk_walls = [], []
    for _ in range(refreshes):
        started = time.perf_counter()
        await sampler._readings(records)
        runtime_walls.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(gestvenv.storage.disk_usage, Path(r.path))
                               for r in records))
        disk_walls.append(time.perf_counter() - started)
    return runtime_walls, disk_walls


async def per_command(env: gestvenv.Environment, runs: int) -> list[float]:
    for _ in range(3):
        await env.execute(["true"])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await env.execute(["true"])
        times.append(time.perf_counter() - started)
    return times


async def bench(args: argparse.Namespace) -> None:
    print(f"gestvenv {gestvenv.__version__} | Python {sys.version.split()[0]} | "
          f"{os.cpu_count()} CPUs | runtime {args.runtime} | load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    started = time.perf_counter()
    envs: list[gestvenv.Environment] = []
    for first in range(0, args.envs, 10):  # in batches: creation is not what is measured
        envs += await asyncio.gather(*(
            gestvenv.create_environment(f"benchtop-{i}", ttl=900)
            for i in range(first, min(first + 10, args.envs))))
    print(f"created {len(envs)} environments in {time.perf_counter() - started:.1f} s")
    busy = [asyncio.ensure_future(env.execute(
        ["python", "-c", "import time; b = bytearray(8 * 2**20); time.sleep(600)"]))
        for env in envs[:args.busy]]
    try:
        await asyncio.sleep(1.0)  # the commands are up
        records = [r for r in monitor.live_records() if r.name.startswith("benchtop-")]
        sampler = monitor.Sampler()
        walls, cpus = await timed_refreshes(sampler, records, args.refreshes, args.interval)
        busy_seen = sum(1 for s in await sampler.sample(records) if s.processes)
        print(f"\none refresh of {len(records)} envs ({busy_seen} running a command), "
              f"{args.refreshes} refreshes, interval {args.interval:g} s:")
        print(f"  wall: {summary(walls)} "
              f"({'within' if max(walls) < args.interval else 'NOT within'} the interval)")
        print(f"  CPU time of this process: {summary(cpus)} "
              f"(per env: {ms(statistics.median(cpus) / len(records))})")
        runtime_walls, disk_walls = await halves(sampler, records, args.refreshes)
        print(f"  runtime readings alone: {summary(runtime_walls)}")
        print(f"  disk walks alone: {summary(disk_walls)}")
        command_times = await per_command(envs[-1], args.command_runs)
        print(f"\nenv.execute(['true']), {args.command_runs} runs: {summary(command_times)}")
        env_vars = dict(os.environ)
        started = time.perf_counter()
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "top", "--once",
                             "--json", "--interval", str(args.interval)],
            check=True, capture_output=True, env=env_vars)
        total = time.perf_counter() - started
        print(f"`gestvenv ephemeral top --once --json --interval {args.interval:g}`: "
              f"{ms(total)} end to end, {ms(total - args.interval)} besides the interval "
              "(interpreter start, two refreshes)")
    finally:
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        for first in range(0, len(envs), 10):
            await asyncio.gather(*(e.aclose() for e in envs[first:first + 10]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--envs", type=int, default=50, help="environments (50)")
    parser.add_argument("--busy", type=int, default=None,
                        help="of which running a command (default: half)")
    parser.add_argument("--refreshes", type=int, default=10, help="timed refreshes (10)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds (1.0)")
    parser.add_argument("--command-runs", type=int, default=50,
                        help="timed env.execute(['true']) runs (50)")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd"], default="auto",
                        help="auto: systemd when it is PID 1, else local")
    parser.add_argument("--tmp-base", default="/var/tmp")
    args = parser.parse_args(argv)
    if args.busy is None:
        args.busy = args.envs // 2
    if args.runtime == "auto":
        args.runtime = "systemd" if systemd_booted() else "local"
    root = Path(tempfile.mkdtemp(prefix="gestvenv-benchtop-", dir=args.tmp_base))
    saved = dict(os.environ)
    try:
        isolate(root, args.runtime, args.envs)
        asyncio.run(bench(args))
    finally:
        wait_for_watchdogs(root / "run")
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
