"""Scenario (not a test): what many environments and many commands cost, per runtime.

Run as root inside the test host (``tests/harness/systemd_host``), from the checkout::

    python3 -m tests.harness.systemd_host run --name NAME -- \\
        .venv/bin/python -m tests.integration.systemd.scenario_many --runtime both

For each runtime, in one run: ``--envs N`` empty environments (disk) created at once
(``asyncio.gather`` of N ``ephemeral()`` entries), one ``execute(["true"])`` in each at once,
the listing (``gestvenv.listing.environments``, in-process, and ``gestvenv ephemeral list
--json`` as a whole process) with the N alive, then all destroyed at once; then ``--runs R``
sequential ``execute(["true"])`` in one open environment (the per-command cost). Each phase's
wall time is printed with the median of ``--rounds`` rounds. Everything lives in a temporary
directory (gestvenv's runtime dir, storage root, cache and config), removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import inspect
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[3]


def isolate(root: Path) -> None:
    for key in list(os.environ):
        if key.startswith(("GESTVENV_", "UV_")):
            del os.environ[key]
    os.environ.update({
        "GESTVENV_RUNTIME_DIR": str(root / "run"),
        "GESTVENV_SYSTEM_CONFIG": str(root / "no-system-config.toml"),
        "GESTVENV_CONFIG": str(root / "no-user-config.toml"),
        "GESTVENV_EPHEMERAL_STORAGE_ROOT": str(root / "envs"),
        "GESTVENV_EPHEMERAL_CACHE_DIR": str(root / "cache"),
        "GESTVENV_EPHEMERAL_OFFLINE": "1",
        "GESTVENV_EPHEMERAL_MAX_CONCURRENT": "1000",
    })


def _ticks(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 if it is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _dbus_daemon() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "dbus-daemon":
                        return int(entry)
            except OSError:
                continue
    return 0


class Meter:
    """Per phase: wall time, this process's CPU time, systemd's (PID 1) and the bus daemon's,
    and the D-Bus calls this process made (by member)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bus = _dbus_daemon()
        try:
            from gestvenv.runtime.systemd import bus as sdbus

            original = sdbus.SystemdBus._call_once
            meter = self

            async def counted(this: Any, path: str, interface: str, member: str,
                              *args: Any, **kwargs: Any) -> Any:
                meter.calls[member] += 1
                return await original(this, path, interface, member, *args, **kwargs)

            sdbus.SystemdBus._call_once = counted  # type: ignore[method-assign,assignment]
        except ImportError:
            pass

    @contextlib.contextmanager
    def phase(self, out: dict[str, float], name: str) -> Any:
        self.calls.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        s0, b0 = _ticks(1), _ticks(self.bus)
        yield
        out[name] = time.perf_counter() - t0
        out[f"  {name}: our CPU"] = time.process_time() - c0
        out[f"  {name}: systemd CPU"] = _ticks(1) - s0
        out[f"  {name}: dbus-daemon CPU"] = _ticks(self.bus) - b0
        out[f"  {name}: D-Bus calls"] = float(sum(self.calls.values()))


METER: Meter | None = None


async def many(runtime: str, n: int) -> dict[str, float]:
    import gestvenv

    try:
        from gestvenv.listing import environments, merge
    except ImportError:  # (a gestvenv before listing.py: measured the same way)
        from gestvenv.context import environments
        merge = None  # type: ignore[assignment]

    out: dict[str, float] = {}
    contexts = [gestvenv.ephemeral(f"many{i}", storage_backend="disk", runtime=runtime,
                                   ttl=600) for i in range(n)]
    assert METER is not None
    with METER.phase(out, "create"):
        entered = await asyncio.gather(*(c.__aenter__() for c in contexts),
                                       return_exceptions=True)
    envs = [e for e in entered if not isinstance(e, BaseException)]
    try:
        errors = [e for e in entered if isinstance(e, BaseException)]
        if errors:
            raise SystemExit(f"{len(errors)} creates failed, the first: {errors[0]!r}")
        with METER.phase(out, "execute"):
            results = await asyncio.gather(*(e.execute(["true"]) for e in envs))
        if not all(r.ok for r in results):
            raise SystemExit(f"a command failed: {next(r for r in results if not r.ok)}")
        with METER.phase(out, "list (in-process)"):
            listed = await environments()
        if len(listed) != n or any(i["state"] != "ready" for i in listed):
            raise SystemExit(f"listed {len(listed)}: {[i['state'] for i in listed]}")
        from gestvenv import registry
        from gestvenv.runtime.systemd import live_units

        with METER.phase(out, "list, ids known (in-process)"):
            # (The same, the units told apart by the records' ids.)
            if merge is not None and "known" in inspect.signature(live_units).parameters:
                records = await asyncio.to_thread(registry.list_records)
                units = await live_units({r.name: r.id for r in records})
                listed = await asyncio.to_thread(merge, records, units)
            else:
                listed = await environments()
        if len(listed) != n or any(i["state"] != "ready" for i in listed):
            raise SystemExit(f"listed {len(listed)}: {[i['state'] for i in listed]}")
        t0 = time.perf_counter()
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "list", "--json"],
            check=True, stdout=subprocess.DEVNULL)
        out["list (process)"] = time.perf_counter() - t0
    finally:
        with METER.phase(out, "destroy"):
            await asyncio.gather(*(c.__aexit__(None, None, None) for c in contexts
                                   if c._env is not None))
    return out


async def sequential(runtime: str, runs: int) -> list[float]:
    import gestvenv

    times = []
    async with gestvenv.ephemeral(storage_backend="disk", runtime=runtime) as env:
        await env.execute(["true"])  # warm-up
        if METER is not None:
            METER.calls.clear()
        for _ in range(runs):
            t0 = time.perf_counter()
            result = await env.execute(["true"])
            times.append(time.perf_counter() - t0)
            assert result.ok, result
        if METER is not None and runtime == "systemd":
            CALLS.append(sum(METER.calls.values()) / runs)
    return times


CALLS: list[float] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runtime", choices=["local", "systemd", "both"], default="both")
    parser.add_argument("--envs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the many-envs phases")
    args = parser.parse_args()
    runtimes = ["local", "systemd"] if args.runtime == "both" else [args.runtime]
    print(f"{os.cpu_count()} CPUs, load average at start: {os.getloadavg()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gestvenv-many-", dir="/var/tmp"))
    try:
        isolate(root)
        global METER
        METER = Meter()
        results: dict[str, dict[str, list[float]]] = {rt: {} for rt in runtimes}
        seq: dict[str, list[float]] = {rt: [] for rt in runtimes}
        for rt in runtimes:  # warm-up (imports, the bus connection, gestvenv.slice)
            asyncio.run(sequential(rt, 1))
        profiler: Any = None
        if args.profile:
            import cProfile
            profiler = cProfile.Profile()
        for i in range(args.rounds):
            for rt in runtimes if i % 2 == 0 else runtimes[::-1]:
                if profiler is not None:
                    profiler.enable()
                phases = asyncio.run(many(rt, args.envs))
                if profiler is not None:
                    profiler.disable()
                for phase, seconds in phases.items():
                    results[rt].setdefault(phase, []).append(seconds)
                seq[rt] += asyncio.run(sequential(rt, args.runs // args.rounds or 1))
        if profiler is not None:
            profiler.dump_stats(args.profile)
        print(f"\n{args.envs} environments at once, medians of {args.rounds} rounds (s):")
        names = list(next(iter(results.values())))
        print(f"{'phase':<32}" + "".join(f"{rt:>12}" for rt in runtimes))
        for phase in names:
            print(f"{phase:<32}" + "".join(
                f"{statistics.median(results[rt][phase]):>12.3f}" for rt in runtimes))
        print(f"\nexecute(['true']) in one open env, {len(seq[runtimes[0]])} runs (ms):")
        print(f"{'runtime':<10}{'median':>9}{'p90':>9}{'min':>9}")
        for rt in runtimes:
            values = sorted(seq[rt])
            print(f"{rt:<10}{statistics.median(values) * 1000:>9.1f}"
                  f"{values[int(len(values) * 0.9)] * 1000:>9.1f}{values[0] * 1000:>9.1f}")
        if CALLS:
            print(f"systemd: {statistics.median(CALLS):.1f} D-Bus calls per execute")
        if len(runtimes) == 2:
            added = statistics.median(seq["systemd"]) - statistics.median(seq["local"])
            print(f"systemd adds {added * 1000:+.1f} ms per execute")
        print(f"load average at end: {os.getloadavg()}")
    finally:
        with contextlib.suppress(Exception):
            # (gestvenv's own watchdog of the local runtime exits once nothing is left.)
            subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "cleanup", "--all"],
                           check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
