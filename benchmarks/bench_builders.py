"""Builders side by side: ``builder = "uv"`` against ``builder = "venv"`` (no uv), in-process.

Per builder (``GESTVENV_EPHEMERAL_BUILDER``), with ``gestvenv.ephemeral(packages=[...])`` on
disk, two figures per environment: **create** (the ``async with`` entered: the venv written and
its packages installed) and the **whole cycle** (create + ``env.execute(["python", "-c",
"import PKG"])`` + the context left), each for

* the **first** env of a package set: the package-set snapshots are removed before each run
  (the templates dir beside the run's own uv cache), so the builder installs for real (uv from
  its warm cache; the venv builder with the one pip of the Python that runs gestvenv) and
  stores the snapshot;
* the **second** env of the set: a clone of that snapshot (no installer process at all);

and, for reference, the old way (what the venv builder did before it wrote the venv itself):
``python -m venv ENV`` + ``ENV/bin/pip install`` (create), + the import + ``rmtree`` (whole
cycle); fewer runs (``--slow-runs``), it takes seconds. All in the same interleaved rounds (the
builders' order alternated each round, the old way's runs spread over the rounds), after one
untimed warm-up of each. Printed: median, p90 and min per row, ratios to the uv builder's
second env, and the tracker's targets, on create and on the whole cycle:

* venv builder, second env <= 2x uv builder, second env;
* venv builder, first env <= 0.5x ``python -m venv`` + pip.

Offline by default: the tiny wheels of ``tests/harness/wheels.py`` (``six``); ``--wheelhouse
DIR``; or ``--online``: real ``requests`` (and its dependencies) fetched once from PyPI with
``pip download`` into the run's temp dir, then measured offline from there like the rest (pip
has no offline mode from its cache: a wheelhouse is how both builders and the old way see the
same wheels). uv gets ``--find-links DIR --offline``, pip ``--no-index --find-links DIR``.

This machine's pip settings are not used, by the builders nor by the old way: every ``PIP_*``,
``UV_*`` and ``GESTVENV_*`` variable is dropped (``PIP_CERT`` and ``PIP_DEFAULT_TIMEOUT``
included) and ``PIP_CONFIG_FILE=/dev/null`` (its pip.conf adds a find-links dir of large
wheels, extra indexes and a constraints file, which slow every pip run). Everything (uv cache,
snapshots, pip caches, runtime dir, storage root, config paths, wheels, the old way's venvs)
lives in one temporary directory under /var/tmp; at the end the script waits for its
watchdogs, checks that nothing is left (benchlib.leftovers) and removes it.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_builders.py                    # offline, tiny wheels, ~1 min
    python benchmarks/bench_builders.py --online           # real requests from PyPI
    python benchmarks/bench_builders.py --runs 30 --packages attrs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from benchmarks import benchlib  # noqa: E402
from benchmarks.bench_create import choose_runtimes, import_names, tool_version  # noqa: E402
from gestvenv import storage  # noqa: E402
from gestvenv.builder import find_pip  # noqa: E402

BUILDERS = ("uv", "venv")
OLD = "python -m venv + ENV/bin/pip install (old way)"
REFERENCE = "builder=uv, second env (clone)"
SHIMS = {"uv": "built with uv", "venv": "has no pip of its own"}  # bin/pip of each builder


def label(builder: str, first: bool) -> str:
    return (f"builder={builder}, first env (install + snapshot)" if first
            else f"builder={builder}, second env (clone)")


def download_wheels(dest: Path, packages: list[str]) -> None:
    """Wheels of ``packages`` and their dependencies from PyPI itself (this machine's pip.conf
    ignored: its indexes and find-links are not PyPI), for this interpreter."""
    env = benchlib.clean_environ()  # (keeps the CA settings, for the download only)
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    dest.mkdir(parents=True, exist_ok=True)
    benchlib.run_quiet([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary",
                        ":all:", "--dest", str(dest), *packages], env, "pip download")


class BuilderBench:
    def __init__(self, args: argparse.Namespace, root: Path, runtime: str,
                 wheelhouse: Path) -> None:
        self.root = root
        self.runtime = runtime
        self.wheelhouse = wheelhouse
        self.packages: list[str] = args.packages
        self.modules: list[str] = args.imports or import_names(self.packages)
        self.import_code = "import " + ", ".join(self.modules)
        self.base_python = benchlib.base_python()
        pip = find_pip()
        if pip is None:
            raise SystemExit("builder 'venv' needs a pip for this Python: none found")
        self.pip = pip
        self.cache = root / "uv-cache"
        # gestvenv runs in this process: its environment is the benchmark's own home, and the
        # pip of the venv builder (run with os.environ) sees no setting of this machine's.
        environ = benchlib.clean_environ()
        for key in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT"):
            environ.pop(key, None)
        environ["PIP_CONFIG_FILE"] = os.devnull
        environ.update(benchlib.home_environ(root, cache=self.cache, runtime=runtime,
                                             wheelhouse=wheelhouse, offline=True))
        os.environ.clear()
        os.environ.update(environ)
        config = gestvenv.load_config()
        self.templates = storage.templates_dir(config)
        for path in (self.templates, storage.uv_cache_dir(config)):
            if root not in path.parents:
                raise SystemExit(f"{path} is not in the benchmark's own dir {root}")
        if config.template_ttl <= 0:
            raise SystemExit("template_ttl is 0: no snapshots, no second env to measure")
        # The old way: the same environment, its own pip cache and venvs.
        self.old_environ = {**environ, "PIP_CACHE_DIR": str(root / "old-pip-cache"),
                            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        self.old_dir = root / "old"
        self.old_dir.mkdir()
        self._counter = 0
        self.old_pip = "?"

    async def cycle(self, builder: str, first: bool, check: bool = False) -> tuple[float, float]:
        """(s to create the env with its packages, s for the whole cycle)."""
        os.environ["GESTVENV_EPHEMERAL_BUILDER"] = builder
        if first:
            shutil.rmtree(self.templates, ignore_errors=True)
        t0 = time.perf_counter()
        async with gestvenv.ephemeral(packages=self.packages, storage_backend="disk",
                                      runtime=self.runtime) as env:
            t1 = time.perf_counter()
            result = await env.execute(["python", "-c", self.import_code])
            if check:  # warm-up only: the builder asked for is the one that built the env
                shim = (env.path / "bin" / "pip").read_text()
                if SHIMS[builder] not in shim:
                    raise SystemExit(f"builder={builder}: not its pip shim in {env.path}/bin")
        t2 = time.perf_counter()
        if not result.ok:
            raise SystemExit(f"{label(builder, first)}: import failed\n{result.stderr}")
        if check and first and not any(self.templates.iterdir()):
            raise SystemExit(f"{label(builder, first)}: no snapshot stored in {self.templates}")
        return t1 - t0, t2 - t0

    def old_way(self, check: bool = False) -> tuple[float, float]:
        """(s for python -m venv + pip install, s for that + the import + rmtree)."""
        self._counter += 1
        path = self.old_dir / f"env{self._counter}"
        env = self.old_environ
        try:
            t0 = time.perf_counter()
            benchlib.run_quiet([self.base_python, "-m", "venv", str(path)], env,
                               "python -m venv")
            benchlib.run_quiet([str(path / "bin" / "pip"), "install", "--quiet",
                                "--disable-pip-version-check", "--no-index", "--find-links",
                                str(self.wheelhouse), *self.packages], env, "pip install")
            t1 = time.perf_counter()
            if check:  # warm-up only (untimed): which pip ensurepip put there
                self.old_pip = tool_version([str(path / "bin" / "pip"),
                                             "--version"]).split(" from ")[0]
            benchlib.run_quiet([str(path / "bin" / "python"), "-c", self.import_code], env,
                               "import")
            shutil.rmtree(path)
            t2 = time.perf_counter()
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return t1 - t0, t2 - t0


def spread(runs: int, slow: int) -> set[int]:
    """The rounds (of ``runs``) that also run the old way, ``slow`` of them spread evenly."""
    return {i * runs // slow for i in range(slow)} if slow > 0 else set()


def run(bench: BuilderBench, runs: int, slow_runs: int) -> None:
    keys = [(b, first) for b in BUILDERS for first in (True, False)]
    with asyncio.Runner() as runner:
        t0 = time.perf_counter()
        for builder, first in keys:  # warm-up: uv and pip caches, imports, checks
            runner.run(bench.cycle(builder, first, check=True))
        bench.old_way(check=True)
        print(f"warm-up (one of each, untimed): {time.perf_counter() - t0:.1f} s; {runs} "
              f"interleaved rounds, the old way in {slow_runs} of them...", flush=True)
        create: dict[str, list[float]] = {label(*k): [] for k in keys}
        whole: dict[str, list[float]] = {label(*k): [] for k in keys}
        create[OLD], whole[OLD] = [], []
        old_rounds = spread(runs, slow_runs)
        for i in range(runs):
            order = BUILDERS if i % 2 == 0 else BUILDERS[::-1]
            for builder in order:
                for first in (True, False):  # a second env needs the snapshot its first made
                    c, w = runner.run(bench.cycle(builder, first))
                    create[label(builder, first)].append(c)
                    whole[label(builder, first)].append(w)
            if i in old_rounds:
                c, w = bench.old_way()
                create[OLD].append(c)
                whole[OLD].append(w)
    width = 52
    print("\ncreate (ephemeral() entered: venv written, packages in), ms:")
    med_create = benchlib.report(_ordered(create), REFERENCE, width=width)
    print(f"\nwhole cycle (create + python -c '{bench.import_code}' + exit), ms:")
    med_whole = benchlib.report(_ordered(whole), REFERENCE, width=width)
    print()
    for what, med in (("create", med_create), ("whole cycle", med_whole)):
        _target(f"venv builder second env <= 2x uv builder second env ({what})",
                med[label("venv", False)], med[label("uv", False)], 2.0, "uv second env")
    for what, med in (("create", med_create), ("whole cycle", med_whole)):
        _target(f"venv builder first env <= 0.5x python -m venv + pip ({what})",
                med[label("venv", True)], med[OLD], 0.5, "venv + pip")


def _ordered(results: dict[str, list[float]]) -> dict[str, list[float]]:
    """Second envs first (the reference on top), then first envs, then the old way."""
    names = [label(b, False) for b in BUILDERS] + [label(b, True) for b in BUILDERS] + [OLD]
    return {n: results[n] for n in names}


def _target(what: str, value: float, base: float, limit: float, base_name: str) -> None:
    ratio = value / base
    print(f"target: {what}: {value * 1000:.1f} ms = {ratio:.2f}x {base_name} "
          f"{base * 1000:.1f} ms -> {'met' if ratio <= limit else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument("--slow-runs", type=int, default=None,
                        help="runs of python -m venv + pip (default: min(runs, 5))")
    parser.add_argument("--packages", nargs="+", default=None,
                        help="packages (default: six offline, requests with --online)")
    parser.add_argument("--imports", nargs="+", default=None,
                        help="modules to import (default: derived from --packages)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--online", action="store_true",
                        help="real packages from PyPI (pip download once, then offline)")
    source.add_argument("--wheelhouse", metavar="DIR", help="wheels already there")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd"], default="local",
                        help="one runtime (default local; auto: systemd when it is PID 1)")
    parser.add_argument("--tmp-base", default="/var/tmp")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.packages is None:
        args.packages = ["requests"] if args.online else ["six"]
    slow_runs = min(args.runs, 5) if args.slow_runs is None else min(args.slow_runs, args.runs)
    if slow_runs < 1:
        parser.error("--slow-runs must be >= 1")
    runtimes, note = choose_runtimes(args.runtime)
    runtime = runtimes[-1]  # auto: systemd where it runs
    root = Path(tempfile.mkdtemp(prefix="gestvenv-benchbuilders-", dir=args.tmp_base))
    saved = dict(os.environ)
    started = time.perf_counter()
    left: list[str] = []
    try:
        benchlib.header("bench_builders.py: builder uv vs venv, first and second env of a "
                        "package set, and python -m venv + pip", [runtime], note)
        if args.online:
            wheels = root / "wheels"
            t0 = time.perf_counter()
            download_wheels(wheels, args.packages)
            mode = (f"online: wheels fetched from PyPI once (pip download, "
                    f"{time.perf_counter() - t0:.1f} s), then measured offline")
        elif args.wheelhouse:
            wheels = Path(args.wheelhouse).resolve()
            mode = f"offline, wheelhouse {wheels}"
        else:
            from tests.harness.wheels import build_wheelhouse

            wheels = build_wheelhouse(root / "wheels")
            mode = "offline, tiny wheels from tests/harness/wheels.py"
        files = sorted(f.name for f in wheels.iterdir() if f.suffix == ".whl")
        bench = BuilderBench(args, root, runtime, wheels)
        print(f"packages: {' '.join(args.packages)} | {mode} ({len(files)} wheels in the "
              f"wheelhouse) | disk backend, {runtime} runtime | temp root: {root}")
        print(f"venv builder's pip: {bench.pip.version} ({bench.pip.location}) | "
              "PIP_CONFIG_FILE=/dev/null, no PIP_*/UV_*/GESTVENV_* of this machine", flush=True)
        run(bench, args.runs, slow_runs)
        print(f"old way's pip (ensurepip's, in each venv): {bench.old_pip}")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        left = benchlib.leftovers(root, [root / "run"], [root / "envs"], runtime == "systemd")
    print(f"\nload average at end: {benchlib.loadavg()}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          + ("cleanup: nothing left behind" if not left else "LEFT BEHIND: " + "; ".join(left)))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
