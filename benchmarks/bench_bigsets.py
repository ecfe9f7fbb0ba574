"""A big package set (numpy + pandas, issue 15): full cycle and private disk per environment.

Full cycle = create env with the set + ``python -c 'import numpy, pandas'`` + destroy, on disk,
with gestvenv (``ephemeral()`` + ``execute``) at each isolation level asked for:

* **first** env of the set: gestvenv's package-set snapshots are removed before it (the run's
  own snapshot dir, in its temp root), so uv installs the set from its (warm) cache and gestvenv
  stores the snapshot;
* **clone**: the next env of the set, cloned from that snapshot (the common case);

next to ``uv run --isolated --no-project --offline --with numpy --with pandas python -c 'import
numpy, pandas'`` (which reuses its one cached environment after its first run), in the same
interleaved rounds. Wheels are fetched once from PyPI (``pip download``, into the run's temp
dir) and then used offline by both (``--find-links``); or ``--wheelhouse DIR``.

Per env, before its first command: the **private disk** outside the shared cache, the bytes
allocated to files whose inode is the env's alone (st_nlink 1: copies; a reflink also counts
as private here, as its extents cannot be told apart by st_nlink), against the bytes of files
shared with the cache or the snapshot (hardlinks, or an overlay's lower layer: root at process
isolation), and where the private bytes are.

Targets (issue 15): the full cycle <= 1.0x ``uv run``; <= 2 MB private disk per env.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_bigsets.py                      # process + namespace (root) isolation
    python benchmarks/bench_bigsets.py --isolation process --runs 3
    python benchmarks/bench_bigsets.py --wheelhouse DIR      # wheels already downloaded

The test host has no network: there, pass ``--wheelhouse`` with a directory it sees. Everything
(uv cache, snapshots, storage root, runtime dir, config paths, wheels) lives in one temporary
directory under /var/tmp, removed at the end (helpers of bench_create.py, imported).
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
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from benchmarks import benchlib  # noqa: E402
from benchmarks.bench_create import (  # noqa: E402
    Bench,
    _cleanup,
    _shm_entries,
    choose_runtimes,
    download_wheels,
    own_bytes,
)
from gestvenv import storage  # noqa: E402

MB = 1e6


def private_breakdown(env_path: Path, top: int = 6) -> list[tuple[str, int, int]]:
    """Where an env's private bytes are: (dir two levels below the env, files, bytes)."""
    by_dir: Counter[str] = Counter()
    files: Counter[str] = Counter()
    dev = os.lstat(env_path).st_dev
    for dirpath, _dirs, names in os.walk(env_path):
        if os.lstat(dirpath).st_dev != dev:
            continue  # an overlay of a snapshot: shared (its upper layer is counted in .gestvenv)
        rel = os.path.relpath(dirpath, env_path).split(os.sep)
        key = "/".join(rel[:4] if rel[:1] == ["lib"] else rel[:2])
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.islink(path) and st.st_nlink == 1:
                by_dir[key] += st.st_blocks * 512
                files[key] += 1
    return [(k, files[k], b) for k, b in by_dir.most_common(top)]


class BigSets:
    def __init__(self, bench: Bench, levels: list[str], runtime: str) -> None:
        self.bench = bench
        self.levels = levels
        self.runtime = runtime
        self.templates = storage.templates_dir(gestvenv.load_config())
        self.applied: dict[str, str] = {}
        self.breakdown: dict[str, list[tuple[str, int, int]]] = {}

    async def cycle(self, level: str, first: bool) -> dict[str, float]:
        if first:
            shutil.rmtree(self.templates, ignore_errors=True)
        t0 = time.perf_counter()
        async with gestvenv.ephemeral(packages=self.bench.packages, storage_backend="disk",
                                      isolation_level=level, runtime=self.runtime) as env:
            t1 = time.perf_counter()
            own, shared = own_bytes(env.path)
            if not first and level not in self.breakdown:
                self.breakdown[level] = private_breakdown(env.path)
            self.applied[level] = str(getattr(env.isolation, "value", env.isolation))
            t2 = time.perf_counter()  # the walk is not part of the cycle: taken off
            result = await env.execute(self.bench.argv_import)
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        if not result.ok:
            raise SystemExit(f"{level} ({'first' if first else 'clone'}): import failed\n"
                             f"{result.stderr}")
        return {"create": t1 - t0, "import": t3 - t2, "destroy": t4 - t3,
                "cycle": t4 - t0 - (t2 - t1), "own": own, "shared": shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--packages", nargs="+", default=["numpy", "pandas"])
    parser.add_argument("--imports", nargs="+", default=None)
    parser.add_argument("--isolation", nargs="+", choices=["process", "namespace"],
                        default=None, help="levels (default: process, and namespace as root)")
    parser.add_argument("--wheelhouse", metavar="DIR",
                        help="wheels already there (default: pip download from PyPI)")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd"], default="local",
                        help="one runtime (default local; auto: systemd when it is PID 1)")
    parser.add_argument("--tmp-base", default="/var/tmp")
    args = parser.parse_args(argv)
    levels = args.isolation or (["process", "namespace"] if os.geteuid() == 0 else ["process"])
    runtimes, note = choose_runtimes(args.runtime)
    runtime = runtimes[-1]  # auto: systemd where it runs
    root = Path(tempfile.mkdtemp(prefix="gestvenv-benchbig-", dir=args.tmp_base))
    shm_before = _shm_entries()
    saved = dict(os.environ)
    started = time.perf_counter()
    try:
        benchlib.header(f"bench_bigsets.py: {' + '.join(args.packages)}, full cycle and private "
                        "disk (issue 15)", [runtime], note)
        if args.wheelhouse:
            wheels = Path(args.wheelhouse).resolve()
        else:
            wheels = root / "wheels"
            t0 = time.perf_counter()
            download_wheels(wheels, args.packages)
            print(f"wheels from PyPI (pip download, once): {time.perf_counter() - t0:.1f} s")
        files = [f for f in wheels.iterdir() if f.suffix == ".whl"]
        print(f"wheelhouse: {len(files)} wheels, "
              f"{sum(f.stat().st_size for f in files) / MB:.0f} MB, used offline by both "
              f"({', '.join(sorted(f.name.split('-')[0] for f in files))})")
        ns = argparse.Namespace(packages=args.packages, imports=args.imports, online=False,
                                wheelhouse=str(wheels))
        bench = Bench(ns, root, [runtime])
        run(bench, BigSets(bench, levels, runtime), args.runs)
    finally:
        left = _cleanup(root, shm_before, runtime == "systemd")
        os.environ.clear()
        os.environ.update(saved)
    print(f"\nload average at end: {benchlib.loadavg()}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          + ("cleanup: nothing left behind" if not left else "LEFT BEHIND: " + "; ".join(left)))
    return 1 if left else 0


def run(bench: Bench, big: BigSets, runs: int) -> None:
    print(f"command: python -c '{bench.import_code}' | disk backend, {big.runtime} runtime, "
          f"isolation: {', '.join(big.levels)} | temp root: {bench.root}")
    keys = [(level, first) for level in big.levels for first in (True, False)]
    with asyncio.Runner() as runner:
        t0 = time.perf_counter()
        for level in big.levels:  # warm-up: the uv cache, the snapshot
            runner.run(big.cycle(level, True))
        bench.uv_run()
        print(f"warm-up (uv cache filled, first envs, uv run's own env): "
              f"{time.perf_counter() - t0:.1f} s; {runs} interleaved rounds...", flush=True)
        rows: dict[tuple[str, bool], list[dict[str, float]]] = {k: [] for k in keys}
        uv: list[float] = []
        for i in range(runs):
            order = big.levels if i % 2 == 0 else big.levels[::-1]
            for level in order:
                for first in (True, False):  # a clone needs the snapshot its first made
                    rows[(level, first)].append(runner.run(big.cycle(level, first)))
            t1 = time.perf_counter()
            bench.uv_run()
            uv.append(time.perf_counter() - t1)

    def label(level: str, first: bool) -> str:
        applied = big.applied.get(level, level)
        shown = level if applied == level else f"{level}, applied: {applied}"
        return f"gestvenv {'first env' if first else 'clone'} ({shown})"

    results: dict[str, list[float]] = {label(*k): [r["cycle"] for r in v] for k, v in rows.items()}
    reference = "uv run --isolated --offline --with"
    results[reference] = uv
    print("\nfull cycle (create with the set + import + destroy):")
    med = benchlib.report(results, reference, width=52)
    print(f"\nsteps and disk per env (medians of {runs}): ms, MB")
    print(f"{'':<52}{'create':>9}{'import':>9}{'destroy':>9}{'private MB':>12}{'shared MB':>11}")
    for key, values in rows.items():
        def m(field: str, values: list[dict[str, Any]] = values) -> float:
            return float(statistics.median(v[field] for v in values))
        print(f"{label(*key):<52}{m('create') * 1000:>9.0f}{m('import') * 1000:>9.0f}"
              f"{m('destroy') * 1000:>9.0f}{m('own') / MB:>12.2f}{m('shared') / MB:>11.1f}")
    for level, parts in big.breakdown.items():
        print(f"where a clone's private bytes are ({level}): " + ", ".join(
            f"{d} {n} files {b / MB:.2f} MB" for d, n, b in parts))
    print()
    uv_med = med[reference]
    for level in big.levels:
        clone = med[label(level, False)]
        first_env = med[label(level, True)]
        own = statistics.median(r["own"] for r in rows[(level, False)])
        print(f"target: full cycle <= 1.0x uv run ({level}, clone): {clone * 1000:.0f} ms = "
              f"{clone / uv_med:.2f}x {uv_med * 1000:.0f} ms -> "
              f"{'met' if clone <= uv_med else 'MISSED'} (first env: {first_env / uv_med:.2f}x)")
        print(f"target: <= 2 MB private disk per env ({level}, clone): {own / MB:.2f} MB -> "
              f"{'met' if own <= 2 * MB else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
