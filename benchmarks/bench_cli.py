"""Whole-process CLI figures (issue 15): start-up, listing many environments, the one-shot run.

Every figure is the wall time of whole processes, started by this script (``subprocess.run``,
output to /dev/null), in interleaved rounds (the order rotated each round, so that drift hits
every row alike), after one untimed warm-up round (bytecode compiled, caches filled):

* **start-up**: ``python -c pass`` (the interpreter of the gestvenv entry point) next to
  ``gestvenv --help``, ``gestvenv config show``, ``gestvenv ephemeral list`` in a home with no
  environment and in one with N (50) environments without packages, ``gestvenv ephemeral show
  NAME`` there; then, once each, the modules these commands import (``-X importtime``): how
  many, their import time, and whether the heavy ones (asyncio's event loop, dbus_next,
  psutil, gestvenv.builder) are among them.
* **one-shot**: ``gestvenv ephemeral run -p PKG -- python -c 'import PKG'`` (reported as not
  available, and skipped, where this gestvenv has no ``ephemeral run``) next to ``uv run
  --isolated --no-project --offline --with PKG python -c 'import PKG'`` and the three commands
  ``gestvenv ephemeral create x -p PKG``, ``gestvenv run --env x -- python -c 'import PKG'``,
  ``gestvenv ephemeral cleanup x`` (timed together, and each apart).

Targets printed (issue 15): ``list`` with no env <= 2.5x ``python -c pass``; ``list`` with 50
envs <= 100 ms; ``ephemeral run`` <= 1.0x ``uv run``.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_cli.py                     # offline, tiny wheels (requests)
    python benchmarks/bench_cli.py --online            # real requests from PyPI (caches warmed
                                                       # online, then measured offline)
    python benchmarks/bench_cli.py --only startup --runs 30
    python -m tests.harness.systemd_host run --name bench -- \\
        .venv/bin/python benchmarks/bench_cli.py        # local and systemd runtimes (root)

Everything (gestvenv homes: runtime dirs, config paths, storage roots; the uv cache shared by
gestvenv and uv; the wheelhouse) lives in one temporary directory under /var/tmp: the machine's
gestvenv configuration is never read nor written. Every environment is destroyed, the script
checks that none is left (and no ``gestvenv-*`` unit, under systemd) and removes the directory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import benchlib  # noqa: E402
from benchmarks.bench_create import choose_runtimes, import_names, run_rounds  # noqa: E402

# Imported by a light command only if it needs them (issue 15): reported per command.
HEAVY = ("asyncio.base_events", "dbus_next", "psutil", "gestvenv.builder")
STDLIB_FLOOR = "typing, dataclasses, pathlib, json, enum"


def entry_point(arg: str | None) -> tuple[str, str]:
    """(the gestvenv script, the interpreter of its #! line)."""
    script = arg or str(Path(sys.executable).parent / "gestvenv")
    if not os.path.exists(script):
        script = shutil.which("gestvenv") or ""
    if not script:
        raise SystemExit("no gestvenv entry point found (pip install -e . or --gestvenv PATH)")
    with open(script, "rb") as f:
        first = f.readline().decode().strip()
    if not first.startswith("#!"):
        raise SystemExit(f"{script}: no #! line")
    return script, first[2:].split()[0]


def timed_proc(argv: list[str], env: Mapping[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(argv)}\n"
                         f"{proc.stderr.decode(errors='replace')}")
    return elapsed


class CliBench:
    def __init__(self, args: argparse.Namespace, root: Path, runtimes: list[str]) -> None:
        self.args = args
        self.root = root
        self.runtimes = runtimes
        self.gv, self.python = entry_point(args.gestvenv)
        self.uv = benchlib.uv_path()
        self.base_python = benchlib.base_python()
        self.cache = root / "cache" / "uv"
        self.cache.mkdir(parents=True)
        self.wheelhouse: Path | None = None
        if args.online:
            self.mode = "online: caches warmed from PyPI, then measured offline"
        elif args.wheelhouse:
            self.wheelhouse = Path(args.wheelhouse).resolve()
            self.mode = f"offline, wheelhouse {self.wheelhouse}"
        else:
            from tests.harness.wheels import build_wheelhouse

            self.wheelhouse = build_wheelhouse(root / "wheelhouse")
            self.mode = "offline, tiny wheels from tests/harness/wheels.py"
        self.packages: list[str] = args.packages
        self.imports = args.imports or import_names(self.packages)
        self.code = "import " + ", ".join(self.imports)
        self.n = args.envs
        self.homes: list[Path] = []
        self._seq = 0

    # --- homes: one per (purpose, runtime), sharing the uv cache ---

    def home(self, purpose: str, runtime: str, *, offline: bool = True) -> dict[str, str]:
        home = self.root / f"{purpose}-{runtime}"
        if home not in self.homes:
            self.homes.append(home)
        return {**benchlib.clean_environ(),
                **benchlib.home_environ(home, cache=self.cache, runtime=runtime,
                                        wheelhouse=self.wheelhouse, offline=offline,
                                        max_concurrent=self.n + 20)}

    def uv_argv(self, offline: bool = True) -> list[str]:
        argv = [self.uv, "run", "--isolated", "--no-project", "--no-config",
                "--python", self.base_python]
        if offline:
            argv.append("--offline")
        if self.wheelhouse is not None:
            argv += ["--find-links", str(self.wheelhouse)]
        for spec in self.packages:
            argv += ["--with", spec]
        return [*argv, "python", "-c", self.code]

    def gv_argv(self, *words: str) -> list[str]:
        return [self.gv, *words]

    def name(self, runtime: str) -> str:
        self._seq += 1
        return f"bcli-{runtime[0]}{self._seq}"

    # --- start-up ---

    def populate(self, runtime: str) -> float:
        """N environments without packages in the 'full' home (a TTL as a safety net)."""
        env = self.home("full", runtime)

        def create(i: int) -> None:
            benchlib.run_quiet(self.gv_argv("ephemeral", "create", f"bench-{runtime[0]}{i:02d}",
                                            "--ttl", "7200"), env, "ephemeral create")

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(create, range(self.n)))
        return time.perf_counter() - t0

    def startup_tools(self) -> dict[str, Callable[[], object]]:
        first = self.runtimes[0]
        tools: dict[str, Callable[[], object]] = {}

        def proc(argv: list[str], env: dict[str, str]) -> Callable[[], object]:
            return lambda: timed_proc(argv, env)

        tools["python -c pass"] = proc([self.python, "-c", "pass"], benchlib.clean_environ())
        # The floor under any structured Python CLI: what the stdlib modules the listing path
        # needs cost (dataclasses brings inspect, pathlib brings urllib.parse), then click.
        tools["  floor: python -c 'import " + STDLIB_FLOOR + "'"] = proc(
            [self.python, "-c", f"import {STDLIB_FLOOR}"], benchlib.clean_environ())
        tools["  floor: the same + click"] = proc(
            [self.python, "-c", f"import {STDLIB_FLOOR}, click"], benchlib.clean_environ())
        tools["gestvenv --help"] = proc(self.gv_argv("--help"), self.home("empty", first))
        tools["gestvenv config show"] = proc(self.gv_argv("config", "show"),
                                             self.home("empty", first))
        for rt in self.runtimes:
            tools[f"gestvenv ephemeral list, no env ({rt})"] = proc(
                self.gv_argv("ephemeral", "list"), self.home("empty", rt))
            tools[f"gestvenv ephemeral list, {self.n} envs ({rt})"] = proc(
                self.gv_argv("ephemeral", "list"), self.home("full", rt))
            tools[f"gestvenv ephemeral show NAME, {self.n} envs ({rt})"] = proc(
                self.gv_argv("ephemeral", "show", f"bench-{rt[0]}00"), self.home("full", rt))
        return tools

    def check_startup(self) -> None:
        for rt in self.runtimes:
            out = benchlib.run_quiet(self.gv_argv("ephemeral", "list"), self.home("empty", rt),
                                     "list").stdout
            if out.strip() != "no environments":
                print(f"note: list in the empty home ({rt}) printed {out.strip()[:200]!r}")
            out = benchlib.run_quiet(self.gv_argv("ephemeral", "list"), self.home("full", rt),
                                     "list").stdout
            rows = [line for line in out.splitlines()[1:] if line.strip()]
            if len(rows) != self.n:
                raise SystemExit(f"list in the full home ({rt}): {len(rows)} rows, expected "
                                 f"{self.n}:\n{out}")

    def import_sets(self) -> list[tuple[str, int, float, list[str]]]:
        """(command, modules imported, their import time s, heavy ones among them)."""
        first = self.runtimes[0]
        commands = {
            "--help": (("--help",), self.home("empty", first)),
            "config show": (("config", "show"), self.home("empty", first)),
        }
        for rt in self.runtimes:
            commands.update({
                f"ephemeral list, no env ({rt})": (("ephemeral", "list"),
                                                   self.home("empty", rt)),
                f"ephemeral list, {self.n} envs ({rt})": (("ephemeral", "list"),
                                                         self.home("full", rt)),
                f"ephemeral show NAME ({rt})": (("ephemeral", "show", f"bench-{rt[0]}00"),
                                                self.home("full", rt)),
            })
        out = []
        for label, (words, env) in commands.items():
            proc = benchlib.run_quiet([self.python, "-X", "importtime", self.gv, *words], env,
                                      label)
            modules: dict[str, int] = {}
            total = 0
            for line in proc.stderr.splitlines():
                m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
                if m:
                    modules[m.group(4)] = int(m.group(1))
                    total += int(m.group(1))  # self times: their sum is the whole
            heavy = [h for h in HEAVY if h in modules]
            out.append((label, len(modules), total / 1e6, heavy))
        return out

    # --- one-shot ---

    def run_available(self) -> bool:
        proc = subprocess.run(self.gv_argv("ephemeral", "run", "--help"),
                              env=self.home("empty", self.runtimes[0]),
                              capture_output=True, text=True)
        return proc.returncode == 0

    def oneshot_tools(self, available: bool, parts: dict[str, list[float]],
                      offline: bool = True) -> dict[str, Callable[[], object]]:
        tools: dict[str, Callable[[], object]] = {}
        for rt in self.runtimes:
            env = self.home("oneshot", rt, offline=offline)
            if available:
                argv = self.gv_argv("ephemeral", "run")
                for spec in self.packages:
                    argv += ["-p", spec]
                argv += ["--", "python", "-c", self.code]
                tools[f"gestvenv ephemeral run ({rt})"] = functools.partial(timed_proc, argv, env)
            tools[f"create + run --env + cleanup ({rt})"] = functools.partial(
                self.three, rt, env, parts)
        uv = self.uv_argv(offline)
        env = benchlib.peer_environ(self.cache)
        tools["uv run --isolated --offline --with"] = lambda: timed_proc(uv, env)
        return tools

    def three(self, rt: str, env: dict[str, str], parts: dict[str, list[float]]) -> float:
        name = self.name(rt)
        create = self.gv_argv("ephemeral", "create", name)
        for spec in self.packages:
            create += ["-p", spec]
        steps = {
            f"  ephemeral create x -p PKG ({rt})": create,
            f"  run --env x -- python -c 'import PKG' ({rt})":
                self.gv_argv("run", "--env", name, "--", "python", "-c", self.code),
            f"  ephemeral cleanup x ({rt})": self.gv_argv("ephemeral", "cleanup", name),
        }
        total = 0.0
        for label, argv in steps.items():
            elapsed = timed_proc(argv, env)
            parts.setdefault(label, []).append(elapsed)
            total += elapsed
        return total

    def cleanup_all(self) -> None:
        for home in self.homes:
            purpose, rt = home.name.rsplit("-", 1)
            env = self.home(purpose, rt)
            subprocess.run(self.gv_argv("ephemeral", "cleanup", "--all", "--quiet"), env=env,
                           stdin=subprocess.DEVNULL, capture_output=True)


def target_line(what: str, value: float, limit: float, shown: str) -> None:
    verdict = "met" if value <= limit else "MISSED"
    print(f"target: {what}: {shown} -> {verdict}")


def run_startup(bench: CliBench, runs: int) -> None:
    print(f"\n-- start-up: whole processes, {runs} interleaved rounds (medians, ms)", flush=True)
    for rt in bench.runtimes:
        took = bench.populate(rt)
        print(f"{bench.n} environments without packages created in the 'full' home ({rt}) in "
              f"{took:.1f} s (4 CLI creates at a time; not a figure of this benchmark)")
    bench.check_startup()
    tools = bench.startup_tools()
    for fn in tools.values():  # warm-up: bytecode compiled, page cache
        fn()
    results: dict[str, list[float]] = {}
    run_rounds(tools, runs, results)
    med = benchlib.report(results, "python -c pass")
    base = med["python -c pass"]
    for rt in bench.runtimes:
        empty = med[f"gestvenv ephemeral list, no env ({rt})"]
        full = med[f"gestvenv ephemeral list, {bench.n} envs ({rt})"]
        target_line(f"list, no env <= 2.5x python -c pass ({rt})", empty / base, 2.5,
                    f"{empty * 1000:.1f} ms = {empty / base:.2f}x {base * 1000:.1f} ms")
        target_line(f"list, {bench.n} envs <= 100 ms ({rt})", full, 0.100,
                    f"{full * 1000:.1f} ms ({(full - empty) * 1000 / bench.n:.2f} ms per env "
                    "over the empty list)")
    floor = med["  floor: python -c 'import " + STDLIB_FLOOR + "'"]
    click_floor = med["  floor: the same + click"]
    print(f"the floor: {STDLIB_FLOOR} alone = {floor / base:.2f}x python -c pass, with click "
          f"{click_floor / base:.2f}x: what a list costs above that is gestvenv's")
    print(f"\nimports of the light commands (-X importtime, one run each; the sum of the "
          f"modules' own times; heavy: {', '.join(HEAVY)}):")
    for label, count, secs, heavy in bench.import_sets():
        print(f"  {label:<36}{count:>5} modules, {secs * 1000:6.1f} ms importing; heavy: "
              f"{', '.join(heavy) or 'none'}")


def run_oneshot(bench: CliBench, runs: int, online: bool) -> None:
    available = bench.run_available()
    print(f"\n-- one-shot: {bench.code!r} with {' '.join(bench.packages)}, whole processes, "
          f"{runs} interleaved rounds (medians, ms); {bench.mode}", flush=True)
    if not available:
        print("gestvenv ephemeral run: not available in this gestvenv (`gestvenv ephemeral run "
              "--help` fails): skipped; the peers are measured")
    parts: dict[str, list[float]] = {}
    if online:  # warm-up from PyPI: fills the shared uv cache, gestvenv's snapshot
        for fn in bench.oneshot_tools(available, parts, offline=False).values():
            fn()
    tools = bench.oneshot_tools(available, parts)
    for fn in tools.values():  # warm-up, offline as measured (snapshot, uv run's env)
        fn()
    parts.clear()
    results: dict[str, list[float]] = {}
    run_rounds(tools, runs, results)
    reference = "uv run --isolated --offline --with"
    med = benchlib.report(results, reference)
    print("the three commands, each:")
    for label, values in parts.items():
        print(f"{label:<58}{len(values):>5}{statistics.median(values) * 1000:>12.1f}"
              f"{benchlib.p90(values) * 1000:>9.1f}{min(values) * 1000:>9.1f}")
    uv = med[reference]
    for rt in bench.runtimes:
        key = f"gestvenv ephemeral run ({rt})"
        if key in med:
            target_line(f"ephemeral run <= 1.0x uv run ({rt})", med[key] / uv, 1.0,
                        f"{med[key] * 1000:.1f} ms = {med[key] / uv:.2f}x {uv * 1000:.1f} ms")
        else:
            print(f"target: ephemeral run <= 1.0x uv run ({rt}): not measured (no ephemeral run)")
        three = med[f"create + run --env + cleanup ({rt})"]
        print(f"create + run --env + cleanup ({rt}): {three * 1000:.1f} ms = {three / uv:.2f}x "
              "uv run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20, help="start-up rounds (20)")
    parser.add_argument("--oneshot-runs", type=int, default=10, help="one-shot rounds (10)")
    parser.add_argument("--envs", type=int, default=50, help="envs for `list` (50)")
    parser.add_argument("--only", choices=["startup", "oneshot"], default=None)
    parser.add_argument("--packages", nargs="+", default=["requests"],
                        help="packages of the one-shot (default: requests)")
    parser.add_argument("--imports", nargs="+", default=None,
                        help="modules to import (default: derived from --packages)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheelhouse", metavar="DIR",
                        help="offline from DIR (default: a wheelhouse of tiny wheels)")
    source.add_argument("--online", action="store_true",
                        help="real packages from PyPI: caches warmed online, measured offline")
    parser.add_argument("--gestvenv", metavar="PATH",
                        help="the gestvenv entry point (default: beside this interpreter)")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd", "both"],
                        default="auto",
                        help="auto: local and systemd when systemd is PID 1, else local")
    parser.add_argument("--tmp-base", default="/var/tmp")
    args = parser.parse_args(argv)
    runtimes, note = choose_runtimes(args.runtime)
    root = Path(tempfile.mkdtemp(prefix="gestvenv-benchcli-", dir=args.tmp_base))
    started = time.perf_counter()
    bench = None
    try:
        benchlib.header("bench_cli.py: whole-process CLI figures (issue 15)", runtimes, note)
        bench = CliBench(args, root, runtimes)
        print(f"entry point: {bench.gv} (#! {bench.python}) | temp root: {root}")
        if args.only in (None, "startup"):
            run_startup(bench, args.runs)
        if args.only in (None, "oneshot"):
            run_oneshot(bench, args.oneshot_runs, args.online)
    finally:
        if bench is not None:
            bench.cleanup_all()
        homes = bench.homes if bench is not None else []
        left = benchlib.leftovers(root, [h / "run" for h in homes], [h / "envs" for h in homes],
                                  "systemd" in runtimes)
    print(f"\nload average at end: {benchlib.loadavg()}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          + ("cleanup: nothing left behind" if not left else "LEFT BEHIND: " + "; ".join(left)))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
