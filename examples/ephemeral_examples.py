#!/usr/bin/env python3
"""gestvenv by example: the product's examples and common tasks, one small function each.

    python examples/ephemeral_examples.py       # runs them all, in order; exit 0 if all held

Each example prints a heading and what it shows, and asserts what it claims: this file is also
a check of the host it runs on. None of them needs systemd or a container engine. Where one is
missing, gestvenv applies what it can and says so (``env.runtime``, ``env.isolation``,
``env.enforcement``), and so do the examples; an example that cannot run at all here says
"skipped: needs ...". The packages (six, attrs) come from your package index the first time,
then from gestvenv's cache. Every environment is destroyed when its block ends: afterwards
``gestvenv ephemeral list`` shows none of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import os
import shutil
import socket
import sys
import tempfile
import textwrap
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import gestvenv
from gestvenv import ResourceLimits, UnenforceableLimitError

MiB = 1 << 20


class Skipped(Exception):
    """Raised by an example that this host cannot run; its message says what it needs."""


def say(text: str) -> None:
    print(textwrap.indent(text, "   "), flush=True)


# --- 1 ---------------------------------------------------------------------------------------

async def basic() -> None:
    """The basic async example
    An environment with six, attrs installed into it, a command run in it; once the block has
    ended (as after an exception or Ctrl-C) its directory, state and processes are gone."""
    async with gestvenv.ephemeral("example-basic", packages=["six"]) as env:
        await env.install(["attrs"])  # specs go to the installer unchanged: "attrs>=22" works
        # A string is split with shlex (no shell); `python` is the environment's.
        result = await env.execute(
            "python -c 'import attrs, six; print(six.__version__, attrs.__version__)'")
        say(f"{env.name}: {env.runtime} runtime, {env.isolation} isolation, at {env.path}")
        say(f"six and attrs versions: {result.stdout.strip()} "
            f"(exit {result.returncode}, {result.duration:.2f}s)")
        assert result.ok, result.stderr
        path = env.path
    assert not path.exists(), f"{path} is still there"
    say(f"after the block: {path} is gone")


# --- 2 ---------------------------------------------------------------------------------------

def sync_api() -> None:
    """The sync API: ephemeral_sync
    The same environment for code without asyncio: a `with` block, blocking calls; check=True
    turns a failed command into a CommandError."""
    with gestvenv.ephemeral_sync("example-sync", packages=["six"]) as env:
        result = env.execute(["python", "-c", "import six; print(six.PY3)"], check=True)
        say(f"{env.name}: six.PY3 is {result.stdout.strip()}")
        assert result.stdout.strip() == "True"
        try:
            env.execute(["python", "-c", "raise SystemExit(3)"], check=True)
        except gestvenv.CommandError as exc:
            failed = exc.result  # the ExecResult: returncode, stdout, stderr...
        else:
            raise AssertionError("check=True did not raise")
        say(f"check=True raised CommandError: the command {failed.describe()}")
        assert failed.returncode == 3


# --- 3 ---------------------------------------------------------------------------------------

async def parallel() -> None:
    """Parallel environments
    Three environments created, used and destroyed at once with asyncio.gather: each has its
    own directory and interpreter."""

    async def one(i: int) -> tuple[str, str]:
        async with gestvenv.ephemeral(f"example-parallel-{i}", packages=["six"]) as env:
            result = await env.execute(["python", "-c", "import sys; print(sys.prefix)"],
                                       check=True)
            return env.name, result.stdout.strip()

    started = time.monotonic()
    # Plain gather: if one block fails, its error comes out at once and the other blocks'
    # teardowns still run to their end (also when asyncio.run then cancels what is left).
    # A TaskGroup would cancel the others instead; either way, nothing stays.
    results = await asyncio.gather(*(one(i) for i in range(3)))
    for name, prefix in results:
        say(f"{name}: sys.prefix {prefix}")
    say(f"3 environments in {time.monotonic() - started:.2f}s")
    assert len({prefix for _, prefix in results}) == 3


# --- 4 ---------------------------------------------------------------------------------------

# Sleeps a minute, beside a child that left its process group (a new session).
SLEEPERS = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                     start_new_session=True)
    time.sleep(60)
""")


async def timeout() -> None:
    """A timeout
    A command that sleeps for a minute, run with timeout=1: its whole process tree is killed
    (here a child in a session of its own too) and the result says why."""
    async with gestvenv.ephemeral("example-timeout") as env:
        result = await env.execute(["python", "-c", SLEEPERS], timeout=1)
        say(f"the command {result.describe()} (killed_by={result.killed_by!r})")
        assert result.killed_by == "timeout" and result.timed_out and not result.ok
        assert result.duration < 30
        usage = await env.usage()
        say(f"processes left in the environment: {usage.processes}")
        assert usage.processes == 0


# --- 5 ---------------------------------------------------------------------------------------

# Allocates (and touches) 256 MiB: more than the 64 MB the environment may have.
ALLOCATE = "b = bytearray(256 * 2**20); print('allocated 256 MiB')"

# Starts up to 50 processes and reports how many it got.
FORK = textwrap.dedent("""
    import os, time
    children = []
    try:
        for _ in range(50):
            pid = os.fork()
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            children.append(pid)
        print(f"started all {len(children)} processes")
    except OSError as exc:
        print(f"refused after {len(children)} processes: {exc.strerror}")
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
""")


async def resource_limits() -> None:
    """Resource limits
    max_memory=64 MB and max_processes=20: env.enforcement says what is really enforced, and
    how; a limit this host cannot enforce is refused unless allow_unenforced=True."""
    limits = ResourceLimits(max_memory=64, max_processes=20)
    try:
        async with gestvenv.ephemeral("example-limits", resource_limits=limits) as env:
            await limits_shown(env)
        return
    except UnenforceableLimitError as exc:  # raised on entry: nothing was created
        say(f"refused: {exc}")
    # The same, accepting that some limit is not enforced: the environment says which.
    async with gestvenv.ephemeral("example-limits", resource_limits=limits,
                                  allow_unenforced=True) as env:
        assert env.enforcement.unenforced, "refused, yet every limit is enforced"
        await limits_shown(env)


async def limits_shown(env: gestvenv.Environment) -> None:
    for name, status in env.enforcement.limits.items():
        state = "enforced" if status.enforced else "NOT enforced"
        say(f"{name}={status.requested}: {state} ({status.mechanism})")
    memory = env.enforcement.limits["max_memory"]
    if memory.enforced:
        result = await env.execute(["python", "-c", ALLOCATE])
        assert not result.ok and "allocated" not in result.stdout, result
        if result.killed_by == "memory":  # a cgroup's OOM kill (systemd, a container)
            say(f"allocating 256 MiB: the command {result.describe()} (killed_by='memory')")
        else:  # RLIMIT_AS (local runtime): the allocation fails, the program says so
            assert "MemoryError" in result.stderr, result.stderr
            say("allocating 256 MiB: refused, MemoryError (killed_by='memory' needs cgroups: "
                "systemd or a container)")
    processes = env.enforcement.limits["max_processes"]
    if processes.enforced:
        result = await env.execute(["python", "-c", FORK], check=True)
        say(f"starting 50 processes: {result.stdout.strip()}")
        assert result.stdout.startswith("refused"), result.stdout
    else:
        say("max_processes is not enforced here: not tried")


# --- 6 ---------------------------------------------------------------------------------------

# Tries each HOST:PORT given and says whether it connected.
CONNECT = textwrap.dedent("""
    import socket, sys
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            print(f"{target} connected")
        except OSError as exc:
            print(f"{target} failed: {exc.strerror or exc}")
""")


async def no_network() -> None:
    """No network
    network_access=False: a command can reach neither a listener on the host's loopback nor an
    outside address (1.1.1.1:53); the same command in a default environment reaches the
    listener."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        loopback = f"127.0.0.1:{listener.getsockname()[1]}"
        async with gestvenv.ephemeral("example-network") as env:
            result = await env.execute(["python", "-c", CONNECT, loopback], check=True)
            say(f"network_access=True (the default): {result.stdout.strip()}")
            assert result.stdout.strip() == f"{loopback} connected"
        no_network = ResourceLimits(network_access=False)
        try:
            async with gestvenv.ephemeral("example-no-network",
                                          resource_limits=no_network) as env:
                status = env.enforcement.limits["network_access"]
                say(f"network_access=False: enforced={status.enforced} ({status.mechanism})")
                result = await env.execute(["python", "-c", CONNECT, loopback, "1.1.1.1:53"],
                                           check=True)
        except UnenforceableLimitError as exc:
            raise Skipped(f"systemd, or bubblewrap with user namespaces ({exc})") from exc
    for line in result.stdout.splitlines():
        say(f"network_access=False: {line}")
    assert status.enforced
    assert result.stdout.count("failed") == 2, result.stdout


# --- 7 ---------------------------------------------------------------------------------------

TICKS = textwrap.dedent("""
    import sys, time
    for i in range(3):
        print(f"tick {i}", flush=True)
        time.sleep(0.3)
    print("done", file=sys.stderr)
""")


async def streaming() -> None:
    """Streaming output
    stream=True echoes a command's output as it comes; a callback (name, text) gets it, here
    with the time each chunk arrived. The result still has all of it."""
    async with gestvenv.ephemeral("example-streaming") as env:
        await env.execute(["python", "-c", "print('   hello from stream=True')"], stream=True)

        started = time.monotonic()
        arrivals: list[float] = []
        partial = {"stdout": "", "stderr": ""}  # output arrives in chunks, not always lines

        def show(name: str, text: str) -> None:  # called as output arrives: "stdout"/"stderr"
            arrivals.append(time.monotonic() - started)
            *lines, partial[name] = (partial[name] + text).split("\n")
            for line in lines:
                say(f"[{name} at {arrivals[-1]:.1f}s] {line}")

        result = await env.execute(["python", "-c", TICKS], stream=show)
        ended = time.monotonic() - started
        say(f"the command ended at {ended:.1f}s; result.stdout has "
            f"{len(result.stdout.splitlines())} lines")
        assert result.stdout == "tick 0\ntick 1\ntick 2\n" and result.stderr == "done\n"
        assert ended - arrivals[0] >= 0.5, "the first line came only at the end"


# --- 8 ---------------------------------------------------------------------------------------

# Prints the installed version of each distribution named.
VERSIONS = "import sys, importlib.metadata as m; print(*(m.version(d) for d in sys.argv[1:]))"


def write_requirements(directory: str, *lines: str) -> Path:
    path = Path(directory, "requirements.txt")
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


async def requirements_file() -> None:
    """A requirements file
    requirements= installs the packages a requirements.txt lists (here six and attrs, written
    to a temporary dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = write_requirements(tmp, "six", "attrs")
        async with gestvenv.ephemeral("example-requirements", requirements=requirements) as env:
            result = await env.execute(["python", "-c", VERSIONS, "six", "attrs"], check=True)
            six, attrs = result.stdout.split()
            say(f"installed from {requirements}: six {six}, attrs {attrs}")


# --- 9 ---------------------------------------------------------------------------------------

# The untrusted package's code, run when it is imported: it tries to read a secret from the
# host's home and to write beside it.
SNOOP = textwrap.dedent("""
    import pathlib
    secret = pathlib.Path({secret!r})
    try:
        print("read the secret:", secret.read_text())
    except OSError as exc:
        print("reading the secret failed:", exc.strerror)
    try:
        (secret.parent / "written-by-snoop").write_text("was here")
        print("wrote to the host")
    except OSError as exc:
        print("writing to the host failed:", exc.strerror)
""")


def build_wheel(directory: Path, name: str, code: str) -> Path:
    """A minimal pure-Python wheel of one module: what `pip wheel` would make of a package.
    (A wheel installs without running any of its code, and needs no build backend.)"""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": code,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: example\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            data = text.encode()
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist}/RECORD,,")
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


@contextlib.contextmanager
def secret_in_home() -> Iterator[Path]:
    """A private file in a new dir of the host's home (of the temp dir if the home is not
    writable), removed afterwards."""
    home = Path.home()
    folder = tempfile.mkdtemp(prefix=".gestvenv-example-",
                              dir=home if os.access(home, os.W_OK) else None)
    try:
        secret = Path(folder, "secret.txt")
        secret.write_text("the host's secret")
        secret.chmod(0o600)
        yield secret
    finally:
        shutil.rmtree(folder)


async def untrusted_package() -> None:
    """An untrusted package in a container
    isolation_level="container": a package whose import reads a secret file of the host's home
    and writes beside it, installed from a local path and run; it can do neither. Without a
    container engine gestvenv applies namespace isolation and says so."""
    with secret_in_home() as secret, tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp), "snoop", SNOOP.format(secret=str(secret)))
        async with gestvenv.ephemeral("example-untrusted", isolation_level="container") as env:
            say(f"isolation requested: container; applied: {env.isolation}")
            for note in env.enforcement.notes:  # why, when it is not the one requested
                say(f"note: {note}")
            if not env.isolation.sandboxed:  # process isolation: the host is open to it
                raise Skipped("a container engine (podman, docker), systemd or bubblewrap: "
                              f"only {env.isolation} isolation here, the package is not run")
            say(f"against secrets: {env.enforcement.protections['secrets']}")
            await env.install([str(wheel)])
            result = await env.execute(["python", "-c", "import snoop"], check=True)
        for line in result.stdout.splitlines():
            say(f"the package: {line}")
        assert "reading the secret failed" in result.stdout, result.stdout
        assert "writing to the host failed" in result.stdout, result.stdout
        assert os.listdir(secret.parent) == ["secret.txt"]
        say(f"on the host: {secret.parent} holds only secret.txt")


# --- 10 --------------------------------------------------------------------------------------

# Allocates 64 MiB, says so, and holds it for 2 seconds.
HOLD = "import time; b = bytearray(64 * 2**20); print('allocated', flush=True); time.sleep(2)"


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.0f} MiB"


async def monitoring() -> None:
    """Monitoring
    env.usage() while a command holds 64 MiB: its processes, memory now and at peak, CPU time
    and % (between two samples), disk, TTL left, each beside its limit."""
    async with gestvenv.ephemeral("example-monitoring", ttl=600) as env:
        allocated = asyncio.Event()

        def on_output(name: str, text: str) -> None:
            if "allocated" in text:
                allocated.set()

        command = asyncio.create_task(env.execute(["python", "-c", HOLD], stream=on_output))
        await asyncio.wait_for(allocated.wait(), 30)
        await env.usage()  # a first sample: CPU % is measured from here
        await asyncio.sleep(0.5)
        usage = await env.usage()
        result = await command
        say(f"processes {usage.processes} (max {usage.max_processes}), memory "
            f"{mib(usage.memory_bytes)}, peak {mib(usage.memory_peak_bytes)} "
            f"(max {mib(usage.max_memory)})")
        cpu = "n/a" if usage.cpu_percent is None else f"{usage.cpu_percent:.0f}%"
        say(f"CPU {usage.cpu_seconds:.2f}s, {cpu} of one CPU; disk {mib(usage.disk_bytes)}; "
            f"TTL left {usage.ttl_left:.0f}s; runtime {usage.runtime}")
        assert result.ok, result
        assert usage.processes >= 1 and usage.ttl_left is not None and usage.ttl_left <= 600
        if usage.memory_bytes:
            assert usage.memory_bytes >= 48 * MiB, usage
        else:
            say("memory use is not measured here (no memory controller for this manager)")
        after = await env.usage()
        say(f"after the command: processes {after.processes}, idle {after.idle_seconds:.1f}s")
        # To follow it live: `async for sample in env.watch(interval=1.0): ...`
        # (or `gestvenv ephemeral top`, `gestvenv ephemeral show NAME --watch`).


# --- running them ----------------------------------------------------------------------------

EXAMPLES: list[Callable[[], object]] = [
    basic, sync_api, parallel, timeout, resource_limits, no_network, streaming,
    requirements_file, untrusted_package, monitoring,
]


def main() -> int:
    counts = {"ok": 0, "skipped": 0, "FAILED": 0}
    started = time.monotonic()
    for number, example in enumerate(EXAMPLES, 1):
        title, _, what = (example.__doc__ or example.__name__).partition("\n")
        print(f"\n== {number}. {title}", flush=True)
        say(textwrap.dedent(what).strip())
        begun = time.monotonic()
        outcome = "ok"
        try:
            if inspect.iscoroutinefunction(example):
                asyncio.run(example())
            else:
                example()
        except Skipped as exc:
            outcome = "skipped"
            say(f"skipped: needs {exc}")
        except Exception:
            outcome = "FAILED"
            say(traceback.format_exc().rstrip())
        counts[outcome] += 1
        if outcome != "skipped":
            say(f"{outcome} ({time.monotonic() - begun:.1f}s)")
    # Every example's environment ended with its block.
    left = [e["name"] for e in gestvenv.list_environments()
            if str(e.get("name", "")).startswith("example-")]
    if left:
        counts["FAILED"] += 1
        print(f"\nenvironments left behind: {left}")
    print(f"\n{len(EXAMPLES)} examples: {counts['ok']} ok, {counts['skipped']} skipped, "
          f"{counts['FAILED']} failed ({time.monotonic() - started:.1f}s)")
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
