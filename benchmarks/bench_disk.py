"""What ``max_disk`` costs: create and destroy of an environment with a filesystem of its own,
next to the same environment without one, per storage backend (same run, same machine).

- no cap: the env's dir on the backend's shared root;
- tmpfs/memory + max_disk: a tmpfs of its own (size=max_disk) mounted on the dir;
- disk + max_disk: an ext4 image loop-mounted on the dir, pre-allocated (default) or sparse
  (``preallocate = false``), at 50 MB and 1 GB.

Then the steps of the disk backend's cap alone (mkfs, fallocate, attach + mount, unmount), and
a full cycle with a package (create + install + import + destroy) with and without the cap, so
that the copy the cap forces (an own filesystem cannot hardlink from the shared cache) shows.

Needs root (mounting). Usage::

    python benchmarks/bench_disk.py [--rounds 10]
    python -m tests.harness.systemd_host run -- .venv/bin/python benchmarks/bench_disk.py
                                                  # under the systemd runtime

Everything lives in a temporary directory under /var/tmp (removed at the end), but the memory
backend's root (/dev/shm/gestvenv), which gestvenv empties itself; the script checks that no
mount and no loop device of its own is left.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_create import wait_for_watchdogs  # noqa: E402


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def _cycle(name: str, backend: str, max_disk: int | None, packages: list[str],
                 run: bool) -> tuple[float, float]:
    import gestvenv
    from gestvenv import ResourceLimits

    started = time.perf_counter()
    env = await gestvenv.create_environment(
        name, storage_backend=backend, packages=packages,
        resource_limits=ResourceLimits(max_disk=max_disk), ttl=600)
    created = time.perf_counter()
    if run:
        await env.execute(["python", "-c", f"import {packages[0]}"], check=True)
    before_destroy = time.perf_counter()
    await env.aclose()
    return created - started, time.perf_counter() - before_destroy


async def _measure(rounds: int, backend: str, max_disk: int | None,
                   packages: list[str] = (), run: bool = False) -> tuple[float, float]:
    creates, destroys = [], []
    await _cycle("warm", backend, max_disk, list(packages), run)  # caches, imports
    for i in range(rounds):
        c, d = await _cycle(f"b{i}", backend, max_disk, list(packages), run)
        creates.append(c)
        destroys.append(d)
    return _median_ms(creates), _median_ms(destroys)


def _steps(base: Path, rounds: int) -> dict[str, float]:
    """The disk cap's own steps, timed alone (the same calls gestvenv.diskcap makes)."""
    from gestvenv import diskcap
    from gestvenv.reaper import CLAIM, remove_tree

    base = base / "steps"
    base.mkdir()
    (base / ".gestvenv-root").write_text("bench\n")
    out: dict[str, list[float]] = {"make (50 MB, pre-allocated)": [],
                                   "make (1 GB, pre-allocated)": [],
                                   "make (1 GB, sparse)": [], "make (tmpfs)": [],
                                   "remove (image)": [], "remove (tmpfs)": []}
    from gestvenv.models import StorageBackend
    cases = [("make (50 MB, pre-allocated)", StorageBackend.DISK, 50, True, "remove (image)"),
             ("make (1 GB, pre-allocated)", StorageBackend.DISK, 1024, True, None),
             ("make (1 GB, sparse)", StorageBackend.DISK, 1024, False, None),
             ("make (tmpfs)", StorageBackend.TMPFS, 50, True, "remove (tmpfs)")]
    for i in range(rounds):
        for label, backend, size, prealloc, removal in cases:
            path = base / f"s{i}-{size}-{int(prealloc)}-{backend.value}-deadbeef"
            path.mkdir()
            (path / CLAIM).write_text("{}")
            t0 = time.perf_counter()
            diskcap.make(path, backend, size, prealloc)
            out[label].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            remove_tree(path, [base])
            if removal:
                out[removal].append(time.perf_counter() - t0)
    return {k: _median_ms(v) for k, v in out.items() if v}


def _left_behind(tmp: str) -> tuple[list[str], list[str]]:
    """Mounts under ``tmp``, and loop devices backed by a file there."""
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if tmp in line]
    loops = [p.parent.parent.name for p in Path("/sys/block").glob("loop*/loop/backing_file")
             if p.read_text().startswith(tmp)]
    return left, loops


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_disk: mounting needs root", file=sys.stderr)
        return 2
    from tests.harness.gv_env import gestvenv_environ
    from tests.harness.wheels import build_wheelhouse

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="gv-bench-disk-") as tmp:
        base = Path(tmp)
        home = base / "home"
        (home / "config").mkdir(parents=True)
        wheels = build_wheelhouse(base / "wheels")
        os.environ.update(gestvenv_environ(home, cache=base / "uv-cache", wheelhouse=wheels))
        import gestvenv
        from gestvenv.runtime import select_runtime

        runtime = (await select_runtime(gestvenv.load_config())).name
        print(f"bench_disk: runtime {runtime}, {args.rounds} rounds, medians (ms)\n")
        print(f"{'empty env':34} {'create':>8} {'destroy':>8} {'create ratio':>13}")
        for backend in ("tmpfs", "memory", "disk"):
            plain = await _measure(args.rounds, backend, None)
            print(f"{backend + ', no cap':34} {plain[0]:8.1f} {plain[1]:8.1f} {'1.00':>13}")
            sizes: list[tuple[str, int, bool]] = [("max_disk=50", 50, True)]
            if backend == "disk":
                sizes += [("max_disk=1024", 1024, True), ("max_disk=1024, sparse", 1024, False)]
            for label, size, prealloc in sizes:
                os.environ["GESTVENV_EPHEMERAL_PREALLOCATE"] = str(prealloc).lower()
                capped = await _measure(args.rounds, backend, size)
                print(f"{backend + ', ' + label:34} {capped[0]:8.1f} {capped[1]:8.1f} "
                      f"{capped[0] / plain[0]:13.2f}")
            os.environ.pop("GESTVENV_EPHEMERAL_PREALLOCATE", None)
        print(f"\n{'with gvbig (4 MB) installed + import':34} {'create':>8} {'destroy':>8} "
              f"{'create ratio':>13}")
        for backend in ("memory", "disk"):
            plain = await _measure(args.rounds, backend, None, ["gvbig"], run=True)
            capped = await _measure(args.rounds, backend, 64, ["gvbig"], run=True)
            print(f"{backend + ', no cap':34} {plain[0]:8.1f} {plain[1]:8.1f} {'1.00':>13}")
            print(f"{backend + ', max_disk=64':34} {capped[0]:8.1f} {capped[1]:8.1f} "
                  f"{capped[0] / plain[0]:13.2f}")
        print("\nthe disk cap's steps alone:")
        for label, ms in _steps(base, args.rounds).items():
            print(f"  {label:32} {ms:8.1f}")
        wait_for_watchdogs(home / "run")
        left, loops = _left_behind(tmp)
        assert not left and not loops, (left, loops)
    print("\nleft behind: no mount, no loop device")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
