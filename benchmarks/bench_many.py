"""50 environments at once (issue 15): create, execute, destroy, each timed as a whole.

Per round and runtime: N (50) environments without packages (disk) created at once (an
``asyncio.gather`` of N ``ephemeral()`` entries), ``python -c pass`` run in each at once (a gather
of N ``env.execute``), then all destroyed at once (a gather of the N exits); each of the three
steps is timed as a whole. In the same rounds, the peers that bound them:

* create: N ``uv venv`` (the same base interpreter) at once;
* execute: ``python -c pass`` with each of these venvs' own python, N processes started at once
  and waited for (``asyncio.create_subprocess_exec``): the floor of running N commands here;
* destroy: their N directories removed at once (``shutil.rmtree`` in threads).

Before each row of a round (a runtime's three steps, or the peers') the script waits until no
gestvenv watchdog of its runtime dir is left running (the local runtime's watchdogs linger about
2 s after their env), so that one row's background work does not land in the next row's time.

Runtimes alternate round by round (local first in even rounds), so that drift hits both alike;
the first round is an untimed warm-up. Printed: per step, median / p90 / min over the rounds,
per environment, the ratio to the peer and, with both runtimes, systemd / local; the target
(issue 15): each step <= 2 s under systemd on 2 cores.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_many.py                          # local runtime, 50 envs, 5 rounds
    python benchmarks/bench_many.py --envs 20 --rounds 3
    python -m tests.harness.systemd_host run --name bench -- \\
        .venv/bin/python benchmarks/bench_many.py             # local and systemd runtimes (root)

Everything (gestvenv's runtime dir, config paths, storage root, uv cache, the peers' venvs) lives
in one temporary directory under /var/tmp, removed at the end; the script checks that no
environment (nor, under systemd, ``gestvenv-*`` unit) is left.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from benchmarks import benchlib  # noqa: E402
from benchmarks.bench_create import choose_runtimes, watchdog_pids  # noqa: E402

STEPS = ("create", "execute", "destroy")
T = TypeVar("T")


async def gather_all(aws: list[Awaitable[T]]) -> list[T]:
    """Every awaitable to its end (none left running), then the first error raised."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


async def gv_round(n: int, runtime: str, packages: list[str], tag: str) -> dict[str, float]:
    ctxs = [gestvenv.ephemeral(f"many-{tag}-{i:02d}", packages=packages, storage_backend="disk",
                               runtime=runtime) for i in range(n)]
    entered: list[Any] = []

    async def enter(ctx: Any) -> Any:
        env = await ctx.__aenter__()
        entered.append(ctx)
        return env

    out: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        envs = await gather_all([enter(c) for c in ctxs])
        out["create"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = await gather_all([e.execute(["python", "-c", "pass"]) for e in envs])
        out["execute"] = time.perf_counter() - t0
        bad = [r for r in results if not r.ok]
        if bad:
            raise SystemExit(f"{len(bad)} commands failed, first: {bad[0]}")
    finally:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(c.__aexit__(None, None, None) for c in entered),
                                    return_exceptions=True)
        out["destroy"] = time.perf_counter() - t0
        errors = [d for d in done if isinstance(d, BaseException)]
        if errors:
            raise errors[0]
    return out


async def settle(run_dir: Path, timeout: float = 15.0) -> None:
    """Until no gestvenv watchdog of our runtime dir runs (none is killed), ``timeout`` at most."""
    for _ in range(int(timeout * 10)):
        if not watchdog_pids(run_dir):
            return
        await asyncio.sleep(0.1)


async def peer_round(n: int, uv: str, python: str, base: Path,
                     env: dict[str, str]) -> dict[str, float]:
    dirs = [base / f"venv{i:02d}" for i in range(n)]

    async def run(*argv: str) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {err.decode(errors='replace')}")

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    await gather_all([run(uv, "venv", "--quiet", "--no-config", "--python", python, str(d))
                      for d in dirs])
    out["create"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # each venv's own python, as gestvenv runs the env's
    await gather_all([run(str(d / "bin" / "python"), "-c", "pass") for d in dirs])
    out["execute"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    await gather_all([asyncio.to_thread(shutil.rmtree, d) for d in dirs])
    out["destroy"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--envs", type=int, default=50, help="environments at once (50)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    parser.add_argument("--packages", nargs="*", default=[],
                        help="packages of each env (default none; offline, tiny wheels)")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd", "both"],
                        default="auto",
                        help="auto: local and systemd when systemd is PID 1, else local")
    parser.add_argument("--tmp-base", default="/var/tmp")
    args = parser.parse_args(argv)
    runtimes, note = choose_runtimes(args.runtime)
    root = Path(tempfile.mkdtemp(prefix="gestvenv-benchmany-", dir=args.tmp_base))
    saved = dict(os.environ)
    started = time.perf_counter()
    try:
        benchlib.header(f"bench_many.py: {args.envs} environments at once (issue 15)",
                        runtimes, note)
        cache = root / "cache" / "uv"
        wheelhouse = None
        if args.packages:
            from tests.harness.wheels import build_wheelhouse

            wheelhouse = build_wheelhouse(root / "wheelhouse")
        clean = benchlib.clean_environ()
        os.environ.clear()
        os.environ.update(clean)
        os.environ.update(benchlib.home_environ(root / "home", cache=cache,
                                                wheelhouse=wheelhouse,
                                                max_concurrent=args.envs + 10))
        asyncio.run(bench(args, runtimes, root, cache))
    finally:
        if "systemd" in runtimes:
            benchlib.drain_pool()  # (in the run's home: its pool)
        os.environ.clear()
        os.environ.update(saved)
        left = benchlib.leftovers(root, [root / "home" / "run"], [root / "home" / "envs"],
                                  "systemd" in runtimes)
    print(f"\nload average at end: {benchlib.loadavg()}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          + ("cleanup: nothing left behind" if not left else "LEFT BEHIND: " + "; ".join(left)))
    return 1 if left else 0


async def bench(args: argparse.Namespace, runtimes: list[str], root: Path, cache: Path) -> None:
    n = args.envs
    uv = benchlib.uv_path()
    python = benchlib.base_python()
    peer_env = benchlib.peer_environ(cache)
    peer_base = root / "peers"
    peer_base.mkdir()
    run_dir = root / "home" / "run"
    peer = f"peers ({n} uv venv / python -c pass / rmtree)"
    print(f"{n} envs per step, disk backend, packages: {' '.join(args.packages) or 'none'}; "
          f"{args.rounds} rounds after one warm-up, runtimes alternated; command: python -c pass",
          flush=True)
    labels = [*(f"gestvenv ({rt})" for rt in runtimes), peer]  # the order of the tables
    results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in labels} for s in STEPS}
    for r in range(args.rounds + 1):
        order = runtimes if r % 2 == 0 else runtimes[::-1]
        rows: dict[str, dict[str, float]] = {}
        for rt in order:
            await settle(run_dir)
            rows[f"gestvenv ({rt})"] = await gv_round(n, rt, args.packages, f"{rt[0]}{r}")
        await settle(run_dir)
        rows[peer] = await peer_round(n, uv, python, peer_base, peer_env)
        if r == 0:
            continue  # warm-up
        for label, steps in rows.items():
            for step, secs in steps.items():
                results[step][label].append(secs)
        print(f"round {r}: " + "; ".join(
            f"{label.split(' (')[0] if label == peer else label} "
            + "/".join(f"{steps[s]:.2f}" for s in STEPS) for label, steps in rows.items())
            + " s (create/execute/destroy)", flush=True)

    medians: dict[str, dict[str, float]] = {}
    for step in STEPS:
        print(f"\n{step} ({n} at once), seconds:")
        print(f"{'':<44}{'runs':>5}{'median':>9}{'p90':>8}{'min':>8}{'per env ms':>12}"
              f"  vs peer")
        medians[step] = {}
        ref = statistics.median(results[step][peer])
        for label, values in results[step].items():
            med = medians[step][label] = statistics.median(values)
            ratio = "1 (peer)" if label == peer else f"{med / ref:.2f}x"
            print(f"{label:<44}{len(values):>5}{med:>9.2f}{benchlib.p90(values):>8.2f}"
                  f"{min(values):>8.2f}{med * 1000 / n:>12.1f}  {ratio}")
    print()
    if len(runtimes) == 2:
        for step in STEPS:
            lo, sd = medians[step]["gestvenv (local)"], medians[step]["gestvenv (systemd)"]
            print(f"systemd vs local, {step}: {sd:.2f} vs {lo:.2f} s ({sd / lo:.2f}x, "
                  f"{(sd - lo) * 1000 / n:+.1f} ms per env)")
    cpus = len(os.sched_getaffinity(0))
    for rt in runtimes:
        for step in STEPS:
            value = medians[step][f"gestvenv ({rt})"]
            verdict = "met" if value <= 2.0 else "MISSED"
            what = "target" if rt == "systemd" else "for scale (the target is systemd's)"
            print(f"{what}: {step} {n} at once <= 2 s ({rt}, {cpus} CPUs): {value:.2f} s -> "
                  f"{verdict}")


if __name__ == "__main__":
    sys.exit(main())
