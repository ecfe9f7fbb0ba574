"""The REST API with 50 clients at once (issue 16): what ``gestvenv serve`` adds to the library.

Per round, N (50) clients at once each make an environment without packages (disk), run one
command in it and destroy it:

* **API**: ``python -m gestvenv serve --socket PATH`` is a process of its own (started once,
  stopped with SIGTERM at the end); N ``gestvenv.api.client.connect(...)`` Client objects (one
  per client, so each has its own connections), each doing ``async with
  client.ephemeral(NAME, storage_backend="disk") as env: await env.execute(CMD)``;
* **library**: the same in this process, ``async with gestvenv.ephemeral(NAME,
  storage_backend="disk", runtime=RT) as env: await env.execute(CMD)``.

Each client's create (the ``async with`` entered), exec, destroy (left) and whole cycle are
timed; printed: p50 and p99 over every client of every round for both, the API's overhead
(difference and ratio) at p50 and at p99, and the wall time of the N (first start to last end).
The floor, in the same rounds: one client's cycles one after the other (``--seq`` per round),
for the library and the API. The two kinds alternate round by round (library first in odd
rounds); the first round is an untimed warm-up. Before each row the script waits until no
gestvenv watchdog of its runtime dir runs (the local runtime's linger about 2 s after their env).

Where the overhead goes, measured in the same rounds:

* the HTTP round trip alone: a GET of a route the service does not have (a 404 from its
  router, through its middleware), one client sequentially, and N clients at once (each a new
  connection, as a cycle's first request);
* exec minus the command's own duration as the library timed it (``ExecResult.duration``: in
  the service for the API), for both;
* CPU time per cycle: this process (the library, or the N clients) and the service process;
* a diagnostic row in the floor: the API against a second service started with ``--limit
  keepalive=0.01`` (the keepalive's own cost: a quiet stream's tick; before the fix, an exec's
  end waited for it);
* last, one untimed round of N API clients against a third service at its **default** bounds
  (N held creates plus N exec streams against ``max_streams``): how many cycles it refuses,
  and why. The measured service runs with ``--limit max_streams=max(2N+16, the default)``.

Usage (from anywhere; the repository root is put on sys.path)::

    python benchmarks/bench_api.py                     # 50 clients, 4 rounds, local runtime here
    python benchmarks/bench_api.py --clients 20 --rounds 3 --seq 5 --command 'python -c pass'
    python -m tests.harness.systemd_host run --name bench -- \\
        .venv/bin/python benchmarks/bench_api.py        # systemd runtime, inside the test host

``--runtime auto`` (default) is systemd where it is PID 1 and its manager answers (inside the
test host), else local; the service gets it as ``GESTVENV_EPHEMERAL_RUNTIME`` (a request
cannot name a runtime). Everything (gestvenv's runtime dir, config paths, storage root, uv
cache, the sockets and the services' logs) lives in one temporary directory under /var/tmp,
removed at the end, after checking that nothing is left: the registry empty, no env dir, no
process marked with an env's id, the services exited, no watchdog of ours, and under systemd no
``gestvenv-*`` unit (the pool is drained first). ``--save FILE`` writes every sample as JSON
(inside the test host, give a path under the checkout, e.g. build/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gestvenv  # noqa: E402
from benchmarks import benchlib  # noqa: E402
from benchmarks.bench_create import (  # noqa: E402
    ROOT_MARK,
    _leftover_units,
    choose_runtimes,
)
from benchmarks.bench_many import settle  # noqa: E402
from gestvenv.api import protocol  # noqa: E402
from gestvenv.api.client import Client, connect  # noqa: E402
from gestvenv.reaper import ENV_MARKER, is_zombie, marked_pids_of  # noqa: E402

STEPS = ("create", "exec", "destroy", "cycle")
LIB, API = "library", "API"
DIAG = "API, keepalive=0.01 (diagnostic)"
NO_ROUTE = "/v1/benchmark-no-such-route"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: How the DELETE of each API block's exit ended, per service ("204", or the error's name).
DELETES: dict[str, Counter[str]] = {}


@dataclass
class Sample:
    create: float
    exec: float
    destroy: float
    cycle: float
    command: float  # the command's own duration, as the library timed it (the service's)
    name: str = ""
    path: str = ""
    left: str = ""  # what of it was still there right after the block's exit (still_there)
    later: str = ""  # the same, at the end of its round


def pct(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the two nearest ranks."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- the services ---

class Service:
    """``python -m gestvenv serve --socket PATH`` as a process of its own, in our home."""

    def __init__(self, root: Path, name: str, environ: dict[str, str],
                 limits: dict[str, str]) -> None:
        self.name, self.environ, self.limits = name, environ, limits
        self.socket = root / f"{name}.sock"
        self.log_path = root / f"{name}.log"
        if len(str(self.socket)) > 100:
            raise SystemExit(f"{self.socket}: too long for a unix socket (use a shorter "
                             "--tmp-base)")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0
        self.exit: str = "not started"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "gestvenv", "serve", "--socket", str(self.socket)]
        for key, value in self.limits.items():
            argv += ["--limit", f"{key}={value}"]
        t0 = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=self.environ, cwd=REPO,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise SystemExit(f"gestvenv serve ({self.name}) exited "
                                 f"{self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"gestvenv serve ({self.name}) never listened:\n{self.log()}")
            time.sleep(0.01)
        self.started_in = time.perf_counter() - t0
        self.exit = "running"

    def cpu(self) -> float:
        """The service process's CPU time (user + system, its threads included), seconds."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        """SIGTERM, then wait (30 s at most, then SIGKILL: reported)."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.exit = f"had exited by itself ({self.proc.returncode})"
            return
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
            self.exit = f"exit {code}, {time.perf_counter() - t0:.2f} s after SIGTERM"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit = "KILLED: still running 30 s after SIGTERM"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --- one cycle ---

class PhaseError(Exception):
    """A cycle's failure, with the step it happened in."""

    def __init__(self, phase: str, exc: BaseException) -> None:
        super().__init__(f"{phase}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:110] if str(exc) else ''}")


async def cycle(ctx: Any, name: str, command: list[str], ids: set[str]) -> Sample:
    """``async with ctx as env: await env.execute(command)``, each step timed."""
    phase = "create"
    t0 = time.perf_counter()
    try:
        async with ctx as env:
            t1 = time.perf_counter()
            phase = "exec"
            ids.add(env.id)
            path = str(env.path)
            result = await env.execute(command)
            t2 = time.perf_counter()
            phase = "destroy"
        t3 = time.perf_counter()
    except Exception as exc:
        raise PhaseError(phase, exc) from exc
    if not result.ok:
        raise PhaseError("exec", RuntimeError(f"{name}: {command} failed: {result}"))
    return Sample(t1 - t0, t2 - t1, t3 - t2, t3 - t0, result.duration, name, path,
                  still_there(name, path))


def api_cycle(client: Client, name: str, command: list[str], ids: set[str]
              ) -> Awaitable[Sample]:
    return cycle(client.ephemeral(name, storage_backend="disk"), name, command, ids)


def lib_cycle(runtime: str, name: str, command: list[str], ids: set[str]
              ) -> Awaitable[Sample]:
    return cycle(gestvenv.ephemeral(name, storage_backend="disk", runtime=runtime), name,
                 command, ids)


def still_there(name: str, path: str) -> str:
    """What of the env outlived the block: "dir", "state" (its state file), both, or ""
    (the library's exit returns once both are gone; the API client's should mean the same)."""
    from gestvenv import registry

    return "+".join(what for what, there in (("dir", os.path.lexists(path)),
                                             ("state", registry.state_path(name).exists()))
                    if there)


def counted(client: Client, key: str) -> Client:
    """The client, its DELETEs counted by outcome (the block's exit hides them: it ignores
    a GestvenvError there, e.g. a 404 when the service's held stream destroyed it first)."""
    from gestvenv.exceptions import GestvenvError

    outcomes = DELETES.setdefault(key, Counter())
    original = client.destroy_environment

    async def destroy_environment(name: str) -> None:
        try:
            await original(name)
        except GestvenvError as exc:
            outcomes[type(exc).__name__] += 1
            raise
        outcomes["204"] += 1

    client.destroy_environment = destroy_environment  # type: ignore[method-assign]
    return client


def describe(exc: BaseException) -> str:
    if isinstance(exc, PhaseError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:110] if str(exc) else ''}"


@dataclass
class Row:
    """One kind's N clients at once in one round."""

    samples: list[Sample]
    errors: list[str]
    wall: float
    cpu_here: float
    cpu_service: float


async def concurrent(kind: str, n: int, tag: str, runtime: str, command: list[str],
                     service: Service | None, ids: set[str]) -> Row:
    clients = [counted(connect(service.url), service.name)
               for _ in range(n)] if service is not None else []

    async def one(i: int) -> Sample | BaseException:
        name = f"{tag}-{i:02d}"
        try:
            if service is not None:
                return await api_cycle(clients[i], name, command, ids)
            return await lib_cycle(runtime, name, command, ids)
        except Exception as exc:
            return exc

    cpu0, svc0 = time.process_time(), service.cpu() if service is not None else 0.0
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    cpu_here = time.process_time() - cpu0
    cpu_service = service.cpu() - svc0 if service is not None else 0.0
    for client in clients:
        await client.aclose()
    for r in results:
        if isinstance(r, Sample) and r.left:
            r.later = still_there(r.name, r.path)
    return Row([r for r in results if isinstance(r, Sample)],
               [describe(r) for r in results if isinstance(r, BaseException)],
               wall, cpu_here, cpu_service)


async def sequential(count: int, tag: str, runtime: str, command: list[str],
                     service: Service | None, ids: set[str]) -> list[Sample]:
    out = []
    client = counted(connect(service.url), service.name) if service is not None else None
    try:
        for i in range(count):
            name = f"{tag}-{i:02d}"
            if client is not None:
                out.append(await api_cycle(client, name, command, ids))
            else:
                out.append(await lib_cycle(runtime, name, command, ids))
    finally:
        if client is not None:
            await client.aclose()
    for sample in out:
        if sample.left:
            sample.later = still_there(sample.name, sample.path)
    return out


async def http_floor(socket_path: Path, n_seq: int, n_conc: int) -> tuple[list[float],
                                                                           list[float], float]:
    """GET of a route the service does not have: one client, ``n_seq`` requests in turn (after
    one to connect); then ``n_conc`` clients at once, one request each on a new connection."""
    import aiohttp

    async def get(session: Any) -> float:
        t0 = time.perf_counter()
        async with session.get(f"http://gestvenv{NO_ROUTE}") as response:
            await response.read()
            if response.status != 404:
                raise SystemExit(f"GET {NO_ROUTE}: {response.status}, not 404")
        return time.perf_counter() - t0

    def session() -> Any:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path)))

    async with session() as s:
        await get(s)
        seq = [await get(s) for _ in range(n_seq)]
    sessions = [session() for _ in range(n_conc)]
    try:
        t0 = time.perf_counter()
        conc = list(await asyncio.gather(*(get(s) for s in sessions)))
        wall = time.perf_counter() - t0
    finally:
        for s in sessions:
            await s.close()
    return seq, conc, wall


# --- the run ---

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=50, help="clients at once (50)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="timed rounds, after one warm-up (4)")
    parser.add_argument("--seq", type=int, default=10,
                        help="sequential cycles of one client, per kind and round (10)")
    parser.add_argument("--command", default="true", type=shlex.split,
                        help="the command each client runs, one string (default: true)")
    parser.add_argument("--runtime", choices=["auto", "local", "systemd"], default="auto",
                        help="auto: systemd where it is PID 1 and answers, else local")
    parser.add_argument("--skip-defaults-check", action="store_true",
                        help="no untimed round against a service at its default bounds")
    parser.add_argument("--tmp-base", default="/var/tmp")
    parser.add_argument("--save", metavar="FILE", help="write every sample here (JSON)")
    args = parser.parse_args(argv)
    if args.runtime == "auto":
        runtimes, note = choose_runtimes("auto")
        runtime = runtimes[-1]  # (["local"] or ["local", "systemd"])
    else:
        runtime, note = choose_runtimes(args.runtime)[0][-1], None
    root = Path(tempfile.mkdtemp(prefix="gestvenv-benchapi-", dir=args.tmp_base))
    saved = dict(os.environ)
    started = time.perf_counter()
    n = args.clients
    services: dict[str, Service] = {}
    ids: set[str] = set()
    problems: list[str] = []
    logs: dict[str, str] = {}
    try:
        benchlib.header(f"bench_api.py: the REST API, {n} clients at once (issue 16)",
                        [runtime], note)
        print(f"checkout: {checkout()}")
        os.environ.clear()
        os.environ.update(benchlib.clean_environ())
        os.environ.update(benchlib.home_environ(root / "home", cache=root / "cache" / "uv",
                                                runtime=runtime, max_concurrent=2 * n + 10))
        environ = dict(os.environ)
        streams = str(max(protocol.MAX_STREAMS, 2 * n + 16))
        services[API] = Service(root, "api", environ, {"max_streams": streams})
        services[DIAG] = Service(root, "diag", environ, {"max_streams": streams,
                                                          "keepalive": "0.01"})
        if not args.skip_defaults_check:
            services["defaults"] = Service(root, "defaults", environ, {})
        for service in services.values():
            service.start()
        main_service = services[API]
        pid = main_service.proc.pid if main_service.proc is not None else None
        print(f"service: {sys.executable} -m gestvenv serve --socket {main_service.socket} "
              f"--limit max_streams={streams} (pid {pid}, listening "
              f"{main_service.started_in * 1000:.0f} ms after its start); runtime {runtime}, "
              f"disk backend, no packages; command: {' '.join(args.command)}", flush=True)
        problems += asyncio.run(bench(args, runtime, root, services, ids))
    finally:
        for service in services.values():
            service.stop()
        for key, service in services.items():
            logs[key] = service.log()
        if not (root / "home" / "run").is_dir():
            (root / "home" / "run").mkdir(parents=True, exist_ok=True)
        asyncio.run(settle(root / "home" / "run"))
        if runtime == "systemd":
            benchlib.drain_pool()  # (in the run's home: its pool; no env's)
        problems += left_here(ids, root / "home", runtime)
        os.environ.clear()
        os.environ.update(saved)
        # (units: counted by left_here already)
        problems += benchlib.leftovers(root, [root / "home" / "run"], [root / "home" / "envs"],
                                       False)
    print("\nthe services:")
    for key, service in services.items():
        text = logs[key]
        gone = text.count("client gone")
        tracebacks = text.count("Traceback")
        other = [line for line in text.splitlines()
                 if line.strip() and "client gone" not in line
                 and not line.startswith("gestvenv: serving the API")]
        print(f"  {service.name}: {service.exit}; log: {tracebacks} tracebacks, {gone} "
              f"'client gone' lines, {len(other)} other lines")
        for line in other[:8]:
            print(f"      | {line[:150]}")
        if tracebacks:
            problems.append(f"service {service.name}: {tracebacks} tracebacks in its log")
        if not service.exit.startswith("exit 0"):
            problems.append(f"service {service.name}: {service.exit}")
    print(f"\nload average at end: {benchlib.loadavg()}")
    print(f"total {time.perf_counter() - started:.0f} s; "
          + ("nothing left behind" if not problems else "PROBLEMS: " + "; ".join(problems)))
    return 1 if problems else 0


def checkout() -> str:
    """HEAD and how far the working tree is from it (read only: no index refresh)."""
    git = ["git", "--no-optional-locks", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True,
                                text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    changed = [line[3:] for line in status if not line.startswith("??")]
    new = [line[3:] for line in status if line.startswith("??")]
    return (f"HEAD {head or '?'}" + (f", {len(changed)} files modified, {len(new)} untracked "
                                     "(the figures are of the working tree): "
                                     + " ".join(changed[:12])
                                     + (" ..." if len(changed) > 12 else "")
                                     if status else ", clean"))


def left_here(ids: set[str], home: Path, runtime: str) -> list[str]:
    """In our home (its variables set): the registry, the env dirs in its storage roots, and
    processes marked with one of the run's env ids (waiting up to 5 s for those being
    ended); under systemd, gestvenv-* units. Printed, and returned as problems."""
    from gestvenv import registry

    found = []
    records = registry.list_records()
    if records:
        found.append(f"registry: {[r.name for r in records][:5]}")
    dirs = [p for d in (home / "envs", home / "run" / "storage") if d.is_dir()
            for p in d.iterdir() if p.name != ROOT_MARK]
    if dirs:
        found.append(f"env dirs: {[str(p) for p in dirs][:5]}")
    deadline = time.monotonic() + 5
    while True:
        marked = {k: [p for p in v if not is_zombie(p)]
                  for k, v in marked_pids_of(ENV_MARKER, ids).items()}
        marked = {k: v for k, v in marked.items() if v}
        if not marked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    count = sum(len(v) for v in marked.values())
    if marked:
        found.append(f"marked processes: {marked}")
    units = ""
    if runtime == "systemd":
        left_units = _leftover_units()
        units = f", {len(left_units)} gestvenv-* units"
        if left_units:
            found.append(f"systemd units: {left_units}")
    print(f"\nleft behind ({len(ids)} envs made): {len(records)} in the registry, {len(dirs)} "
          f"env dirs, {count} processes marked with one of their ids{units} -> "
          + ("OK" if not found else "NOT CLEAN"))
    return found


async def bench(args: argparse.Namespace, runtime: str, root: Path,
                services: dict[str, Service], ids: set[str]) -> list[str]:
    n, command = args.clients, args.command
    run_dir = root / "home" / "run"
    api = services[API]
    rows: dict[str, list[Row]] = {LIB: [], API: []}
    seq: dict[str, list[Sample]] = {LIB: [], API: [], DIAG: []}
    floor_seq: list[float] = []
    floor_conc: list[float] = []
    floor_walls: list[float] = []
    problems: list[str] = []
    print(f"{n} clients at once, {args.rounds} rounds after one warm-up, library and API "
          f"alternated; then {args.seq} sequential cycles of one client per kind; then the "
          f"HTTP round trip (GET {NO_ROUTE}: a 404)", flush=True)
    for r in range(args.rounds + 1):
        order = [LIB, API] if r % 2 else [API, LIB]
        line = []
        for kind in order:
            await settle(run_dir)
            row = await concurrent(kind, n, f"{'api' if kind == API else 'lib'}-c{r}", runtime,
                                   command, api if kind == API else None, ids)
            line.append(f"{kind} {row.wall:.2f} s" + (f" ({len(row.errors)} FAILED)"
                                                      if row.errors else ""))
            if row.errors:
                problems.append(f"round {r}, {kind}: {len(row.errors)} of {n} cycles failed: "
                                + "; ".join(f"{c}x {e}" for e, c in
                                            Counter(row.errors).most_common(3)))
            if r:
                rows[kind].append(row)
        seq_kinds = [LIB, API, DIAG] if r % 2 else [DIAG, API, LIB]
        for kind in seq_kinds:
            await settle(run_dir)
            service = None if kind == LIB else services[kind]
            tag = {LIB: "lib", API: "api", DIAG: "diag"}[kind]
            samples = await sequential(args.seq if r else 2, f"{tag}-s{r}", runtime, command,
                                       service, ids)
            if r:
                seq[kind] += samples
        await settle(run_dir)
        fs, fc, fw = await http_floor(api.socket, 20, n)
        if r:
            floor_seq += fs
            floor_conc += fc
            floor_walls.append(fw)
        cycles = {k.split(" (")[0]: statistics.median(s.cycle for s in seq[k][-args.seq:])
                  for k in seq_kinds if r and seq[k]}
        print(f"round {r}{' (warm-up)' if not r else ''}: {n} at once: " + "; ".join(line)
              + ("; one client, cycle p50: " + ", ".join(
                  f"{k} {v * 1000:.0f} ms" for k, v in cycles.items()) if cycles else "")
              + f"; load {benchlib.loadavg().split()[0]}", flush=True)

    report(n, args.rounds, rows, seq, floor_seq, floor_conc, floor_walls)

    if "defaults" in services:
        await settle(run_dir)
        row = await concurrent(API, n, "dft", runtime, command, services["defaults"], ids)
        print(f"\nat the service's default bounds (max_streams {protocol.MAX_STREAMS}; "
              f"untimed): {n} clients at once, {len(row.samples)} cycles done, "
              f"{len(row.errors)} refused, in {row.wall:.2f} s")
        for error, count in Counter(row.errors).most_common(5):
            print(f"  {count}x {error}")
    print("\nat each block's exit (checked right after it, untimed):")
    every = {f"{n} at once, {k}": [x for row in v for x in row.samples] for k, v in rows.items()}
    every.update({f"sequential, {k}": v for k, v in seq.items()})
    for label, samples in every.items():
        left = [x for x in samples if x.left]
        print(f"  {label:<48} {len(left)} of {len(samples)} envs still had their dir or "
              "state file" + (" <- the block returned before the env was gone: " + ", ".join(
                  f"{x.name} ({x.left}; at the round's end: {x.later or 'gone'}; its destroy "
                  f"{x.destroy * 1000:.0f} ms)" for x in left[:5]) if left else ""))
    for key, outcomes in DELETES.items():
        print(f"  service {key}: the client's DELETEs: " + ", ".join(
            f"{k} x{v}" for k, v in outcomes.most_common()))
    if args.save:
        save(args.save, {
            "clients": n, "rounds": args.rounds, "runtime": runtime, "command": command,
            "concurrent": {k: [{"samples": [asdict(s) for s in row.samples],
                                "errors": row.errors, "wall": row.wall,
                                "cpu_here": row.cpu_here, "cpu_service": row.cpu_service}
                               for row in v] for k, v in rows.items()},
            "sequential": {k: [asdict(s) for s in v] for k, v in seq.items()},
            "http_floor": {"sequential": floor_seq, "concurrent": floor_conc,
                           "walls": floor_walls}})
        print(f"samples written to {args.save}")
    return problems


def save(path: str, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))


def report(n: int, rounds: int, rows: dict[str, list[Row]], seq: dict[str, list[Sample]],
           floor_seq: list[float], floor_conc: list[float], floor_walls: list[float]) -> None:
    def table(title: str, lib: list[Sample], apis: dict[str, list[Sample]]) -> None:
        print(f"\n{title}, ms:")
        print(f"{'':<26}{'p50':>9}{'p99':>9}   {'API - library at p50':>22}   "
              f"{'API - library at p99':>22}")
        for step in STEPS:
            lv = [getattr(s, step) for s in lib]
            l50, l99 = pct(lv, 50) * 1000, pct(lv, 99) * 1000
            print(f"{step + ', library':<26}{l50:>9.1f}{l99:>9.1f}")
            for label, samples in apis.items():
                av = [getattr(s, step) for s in samples]
                a50, a99 = pct(av, 50) * 1000, pct(av, 99) * 1000
                print(f"{step + ', ' + label:<26}{a50:>9.1f}{a99:>9.1f}   "
                      f"{a50 - l50:>+10.1f} ({a50 / l50:>6.2f}x)   "
                      f"{a99 - l99:>+10.1f} ({a99 / l99:>6.2f}x)")
        print(f"{'(samples)':<26}" + ", ".join(
            f"{k} {len(v)}" for k, v in {LIB: lib, **apis}.items()))

    lib = [s for row in rows[LIB] for s in row.samples]
    api = [s for row in rows[API] for s in row.samples]
    if not lib or not api:
        print("\nno samples: nothing to report")
        return
    table(f"{n} clients at once ({rounds} rounds, every client's cycle)", lib, {API: api})
    print(f"\nwall time for the {n} (first start to last end), s:")
    for kind in (LIB, API):
        walls = [row.wall for row in rows[kind]]
        print(f"  {kind:<10} median {statistics.median(walls):.2f}  min {min(walls):.2f}  "
              f"max {max(walls):.2f}  (rounds: {', '.join(f'{w:.2f}' for w in walls)})")
    lw = statistics.median(row.wall for row in rows[LIB])
    aw = statistics.median(row.wall for row in rows[API])
    print(f"  API - library: {aw - lw:+.2f} s ({aw / lw:.2f}x)")
    print(f"\nCPU time per cycle (median of rounds, ms): library: this process "
          f"{statistics.median(r.cpu_here for r in rows[LIB]) * 1000 / n:.1f}; API: the "
          f"service {statistics.median(r.cpu_service for r in rows[API]) * 1000 / n:.1f} + "
          f"the {n} clients (this process) "
          f"{statistics.median(r.cpu_here for r in rows[API]) * 1000 / n:.1f}")

    table("one client, sequential cycles (the floor)", seq[LIB],
          {API: seq[API], DIAG.replace(" (diagnostic)", ""): seq[DIAG]})

    print("\nwhere the API's time goes, ms (p50):")
    for label, samples in ((f"{n} at once, library", lib), (f"{n} at once, API", api),
                           ("sequential, library", seq[LIB]), ("sequential, API", seq[API]),
                           ("sequential, API keepalive=0.01", seq[DIAG])):
        print(f"  {label:<34} exec {pct([s.exec for s in samples], 50) * 1000:7.1f} = the "
              f"command's own duration {pct([s.command for s in samples], 50) * 1000:6.1f} "
              f"+ the rest {pct([s.exec - s.command for s in samples], 50) * 1000:6.1f}")
    print(f"  HTTP round trip alone (GET of no route, a 404): one client in turn p50 "
          f"{pct(floor_seq, 50) * 1000:.2f}, p99 {pct(floor_seq, 99) * 1000:.2f}; {n} clients "
          f"at once (new connections) p50 {pct(floor_conc, 50) * 1000:.1f}, p99 "
          f"{pct(floor_conc, 99) * 1000:.1f}, wall {statistics.median(floor_walls) * 1000:.1f}")
    print("  (a cycle is 3 requests: the held create, the exec stream, the DELETE)")


if __name__ == "__main__":
    sys.exit(main())
