"""Many environments at once, races for one name, and environments seen across processes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

import gestvenv
from gestvenv import EnvironmentClosedError, EnvironmentExistsError

from .support import assert_destroyed, env_dirs, env_pids, latest, wait_until

# (package to install, module to import, its expected version)
PACKAGES = [("six", "six", latest("six")), ("gvdemo", "gvdep", latest("gvdep")),
            ("requests", "urllib3", latest("urllib3"))]


async def test_twenty_environments_created_concurrently(gv_home: Path) -> None:
    count = 20
    barrier = asyncio.Barrier(count)

    async def one(i: int) -> tuple[Path, str, str, int]:
        package, module, _ = PACKAGES[i % len(PACKAGES)]
        async with gestvenv.ephemeral(f"conc-{i:02d}", packages=[package]) as env:
            await asyncio.wait_for(barrier.wait(), 30)  # all of them exist at the same time
            listed = len(gestvenv.list_environments())
            result = await env.execute(
                ["python", "-c", f"import {module}; print({module}.__version__)"])
            assert result.ok, result.stderr
            return env.path, env.id, result.stdout.strip(), listed

    outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    paths = [path for path, _, _, _ in outcomes]
    assert len(set(paths)) == count
    assert len({env_id for _, env_id, _, _ in outcomes}) == count
    for i, (_, _, version, listed) in enumerate(outcomes):
        assert version == PACKAGES[i % len(PACKAGES)][2]
        assert listed == count
    for path, env_id, _, _ in outcomes:
        assert not path.exists()
        assert env_pids(env_id) == []
    assert gestvenv.list_environments() == []
    assert env_dirs(gv_home / "envs") == []


async def test_concurrent_creates_of_one_name_have_exactly_one_winner(gv_home: Path) -> None:
    attempts = 8
    winners: list[gestvenv.Environment] = []
    losers: list[EnvironmentExistsError] = []
    release = asyncio.Event()

    async def attempt() -> str | None:
        try:
            async with gestvenv.ephemeral("same", packages=["six"]) as env:
                winners.append(env)
                await release.wait()
                result = await env.execute(["python", "-c", "import six; print('winner')"])
                return result.stdout
        except EnvironmentExistsError as exc:
            losers.append(exc)
            return None

    tasks = [asyncio.ensure_future(attempt()) for _ in range(attempts)]
    try:
        def settled() -> bool:
            crashed = any(t.done() and t.exception() for t in tasks)
            return crashed or len(winners) + len(losers) == attempts

        await wait_until(settled, 30, "every attempt won or lost")
        assert len(winners) == 1
        assert len(losers) == attempts - 1
        [winner] = winners
        [listed] = gestvenv.list_environments()
        assert listed["id"] == winner.id
        assert listed["state"] == "ready"
        # the losers built nothing (or removed what they built)
        assert env_dirs(gv_home / "envs") == [winner.path]
    finally:
        release.set()
        results = await asyncio.gather(*tasks)
    assert results.count("winner\n") == 1
    assert results.count(None) == attempts - 1
    assert_destroyed(winner.path, winner.id)


RACER = """\
import asyncio, sys, gestvenv
async def main():
    try:
        async with gestvenv.ephemeral("race") as env:
            print("won", env.id, flush=True)
            sys.stdin.readline()
    except gestvenv.EnvironmentExistsError:
        print("lost", flush=True)
asyncio.run(main())
"""


async def test_processes_racing_for_one_name_have_exactly_one_winner() -> None:
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", RACER, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE) for _ in range(3)]
    try:
        lines = await asyncio.wait_for(
            asyncio.gather(*(p.stdout.readline() for p in procs)), 30)  # type: ignore[union-attr]
        words = [line.decode().split() for line in lines]
        assert sorted(w[0] for w in words) == ["lost", "lost", "won"]
        [won] = [w for w in words if w[0] == "won"]
        [listed] = gestvenv.list_environments()
        assert listed["id"] == won[1]
        assert listed["owner_pid"] in [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.stdin.write(b"go\n")  # type: ignore[union-attr]
        codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 30)
    assert codes == [0, 0, 0]
    assert gestvenv.list_environments() == []


HOLDER = """\
import asyncio, sys, gestvenv
async def main():
    async with gestvenv.ephemeral("xproc", packages=["six"]) as env:
        print(env.id, env.path, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    print("closed", flush=True)
asyncio.run(main())
"""


async def test_environment_of_another_process_is_listed_and_usable(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, cwd=tmp_path)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        env_id, path_text = line.decode().split()
        path = Path(path_text)
        [listed] = gestvenv.list_environments()
        assert listed["name"] == "xproc"
        assert listed["id"] == env_id
        assert listed["state"] == "ready"
        assert listed["owner_pid"] == proc.pid
        assert listed["path"] == str(path)
        assert listed["packages"] == ["six"]

        # another process can use it, without owning it
        async with gestvenv.attach("xproc") as handle:
            result = await handle.execute(["python", "-c", "import six; print(six.__version__)"])
        assert result.stdout == f"{latest('six')}\n"
        assert path.is_dir()  # noqa: ASYNC240 -- leaving the attached handle's block did not destroy it
        assert [e["id"] for e in gestvenv.list_environments()] == [env_id]
    finally:
        proc.stdin.write(b"release\n")
        out = await asyncio.wait_for(proc.stdout.read(), 30)
        code = await proc.wait()
    assert out == b"closed\n"
    assert code == 0
    assert_destroyed(path, env_id)
    with pytest.raises(EnvironmentClosedError):
        await handle.execute("true")
