"""What container isolation costs, against the engine itself (same run, same machine).

- first create: an env of a package set whose images do not exist yet (the interpreter's base
  image is generated, then the set's layer);
- warm create: the same set again (images and snapshot reused);
- the whole cycle (create, one command importing the set, destroy) of a container env, against
  ``podman run --rm`` of the set's own image running the same command: the target is at most
  20 % over the engine itself;
- the engine's own steps for one env (``run -d``, ``exec``, ``rm -f``) beside gestvenv's
  create, exec and destroy, so that what gestvenv adds shows;
- a process-isolation env's cycle, for scale.

Needs an engine (podman here; ``--engine docker`` with a docker daemon). Usage::

    python benchmarks/bench_container.py [--rounds 10] [--engine podman]
    python -m tests.harness.systemd_host run -- .venv/bin/python benchmarks/bench_container.py
                                                  # under the systemd runtime

Everything lives in a temporary directory under /var/tmp (removed at the end); the images it
generates carry gestvenv's labels and are removed at the end too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_create import wait_for_watchdogs  # noqa: E402

PACKAGES = ["gvdemo"]
SYSTEMD = os.path.exists("/run/systemd/system")
COMMAND = ["python", "-c", "import gvdemo, gvdep; assert gvdemo.VALUE == 42"]


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:7.0f} ms"


async def _timed(samples: list[float], step: Callable[[], Awaitable[object]]) -> object:
    started = time.perf_counter()
    out = await step()
    samples.append(time.perf_counter() - started)
    return out


def _engine_run(engine: object, *args: str) -> float:
    from gestvenv.container.engine import Engine
    assert isinstance(engine, Engine)
    started = time.perf_counter()
    done = engine.run(*args, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{engine.name} {' '.join(args[:2])} failed: {done.stderr.decode()}")
    return took


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--engine", default="podman", choices=("podman", "docker"))
    args = parser.parse_args()
    from tests.harness.gv_env import gestvenv_environ
    from tests.harness.wheels import build_wheelhouse

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="gv-bench-container-") as tmp:
        base = Path(tmp)
        home = base / "gv"
        (home / "config").mkdir(parents=True)
        wheels = build_wheelhouse(base / "wheels")
        os.environ.update(gestvenv_environ(home, cache=base / "uv-cache", wheelhouse=wheels))
        os.environ["GESTVENV_EPHEMERAL_CONTAINER_ENGINE"] = args.engine
        try:
            return await _bench(args.rounds, args.engine, home / "run")
        finally:
            wait_for_watchdogs(home / "run")


async def _bench(rounds: int, engine_name: str, runtime_dir: Path) -> int:
    import gestvenv
    from gestvenv import IsolationLevel
    from gestvenv.container import images
    from gestvenv.container.engine import LABEL_STATE
    from gestvenv.runtime import container

    engine = container.engine_for(engine_name)
    container_level = IsolationLevel.CONTAINER
    print(f"engine: {engine.name} ({engine.path}), cgroup v{engine.cgroup_version}, "
          f"runtime: {'systemd' if SYSTEMD else 'local'}, {rounds} rounds, medians")

    # First create: no image of this interpreter nor of the set (ours are removed first; the
    # base is the interpreter's, shared with other users of this engine: only when unused).
    interpreter = gestvenv.builder.find_interpreter(None).path
    base_ref = images.base_ref(interpreter)
    engine.run("rmi", base_ref, check=False)
    cold = time.perf_counter()
    env = await gestvenv.create_environment("first", packages=PACKAGES,
                                            isolation_level=container_level, ttl=600)
    first = time.perf_counter() - cold
    packages_image = (env.container or {}).get("packages_image")
    await env.aclose()
    assert packages_image, "no package-set image was made"
    print(f"first create (base image + the set's layer generated): {first * 1000:7.0f} ms")

    creates: list[float] = []
    execs: list[float] = []
    destroys: list[float] = []
    cycles: list[float] = []
    for i in range(rounds):
        started = time.perf_counter()
        env = await _timed(creates, lambda i=i: gestvenv.create_environment(  # type: ignore[misc]
            f"warm{i}", packages=PACKAGES, isolation_level=container_level, ttl=600))
        assert isinstance(env, gestvenv.Environment)
        result = await _timed(execs, lambda env=env: env.execute(COMMAND))  # type: ignore[misc]
        assert isinstance(result, gestvenv.ExecResult) and result.ok, result
        await _timed(destroys, env.aclose)
        cycles.append(time.perf_counter() - started)
    print(f"warm create:                      {_ms(creates)}")
    print(f"one command (exec):               {_ms(execs)}")
    print(f"destroy:                          {_ms(destroys)}")
    print(f"gestvenv whole cycle:             {_ms(cycles)}")

    peer: list[float] = []
    run_d: list[float] = []
    exec_only: list[float] = []
    rm: list[float] = []
    for i in range(rounds):
        peer.append(_engine_run(engine, "run", "--rm", "--network", "none", "--pull", "never",
                                packages_image, *COMMAND))
        name = f"gv-bench-{os.getpid()}-{i}"
        run_d.append(_engine_run(engine, "run", "-d", "--init", "--name", name, "--network",
                                 "none", "--pull", "never", packages_image, "python", "-c",
                                 "import signal\nwhile True: signal.pause()"))
        exec_only.append(_engine_run(engine, "exec", name, *COMMAND))
        rm.append(_engine_run(engine, "rm", "--force", *(["--time", "0"]
                                                         if engine.name == "podman" else []),
                              name))
    print(f"{engine.name} run --rm (same image, same command): {_ms(peer)}")
    print(f"{engine.name} run -d / exec / rm -f:  {_ms(run_d)} /{_ms(exec_only)} /{_ms(rm)}")
    ratio = statistics.median(cycles) / statistics.median(peer)
    print(f"ratio gestvenv cycle / {engine.name} run --rm: {ratio:.2f}x "
          f"(target <= 1.20: {'met' if ratio <= 1.2 else 'missed'})")

    process: list[float] = []
    for i in range(rounds):
        started = time.perf_counter()
        async with gestvenv.ephemeral(f"proc{i}", packages=PACKAGES, ttl=600) as env:
            await env.execute(COMMAND, check=True)
        process.append(time.perf_counter() - started)
    print(f"process-isolation cycle (scale):  {_ms(process)}")

    # Only what this run generated (other users' images of this engine stay).
    removed = [ref for ref in (packages_image, base_ref)
               if engine.run("rmi", ref, check=False).returncode == 0]
    left = [c for c in engine.ours() if c.get(f"label:{LABEL_STATE}", "").startswith(
        f"{runtime_dir}/")]  # (ours: their state file was in our runtime dir)
    print(f"removed images: {len(removed)}; containers left: {len(left)}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
