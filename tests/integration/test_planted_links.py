"""An environment's commands plant links and fakes in its own dir, then wait for gestvenv's own
work (an install, a sweep) to follow them: found by a hostile review, each failed before its fix.

Runs in both tiers: the local runtime (bubblewrap) on this host, systemd in the test host.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import IsolationLevel
from gestvenv.runtime import bwrap
from gestvenv.runtime.systemd import systemd_booted

from .support import wait_until

# The local runtime needs bubblewrap for namespace isolation (elsewhere it falls back, said).
pytestmark = pytest.mark.skipif(
    not systemd_booted() and bwrap.probe_for(os.geteuid(), True) is not None,
    reason="no namespace sandbox on this host")


@pytest.fixture
def host_target() -> Iterator[Path]:
    """A host file and dir the env cannot reach (outside every tree it sees)."""
    base = Path("/var/lib") / f"gv-target-{os.getpid()}"
    base.mkdir(mode=0o755)
    (base / "victim").write_text("untouched\n")
    yield base
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)


async def run_in(env: gestvenv.Environment, code: str) -> str:
    result = await env.execute(["python", "-c", code], cwd=str(env.path))
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_an_install_after_planted_links_writes_nothing_outside(host_target: Path) -> None:
    victim = host_target / "victim"
    async with gestvenv.ephemeral("planter", isolation_level=IsolationLevel.NAMESPACE) as env:
        site = next(env.path.glob("lib/python*/site-packages"))
        # Where root (or the creator) used to write by path after an install: the rewritten
        # scripts' temp file, and a package's dir.
        await run_in(env, f"import os; os.symlink({str(victim)!r}, 'bin/.gvtool.gestvenv'); "
                          f"os.symlink({str(host_target)!r}, {str(site / 'gvdemo')!r})")
        with pytest.raises(gestvenv.BuildError):
            await env.install(["gvdemo"])  # its dir is a link the env made: uv refuses it
        await env.install(["gvtool"])
        ran = await env.execute(["gvtool"])
        assert ran.stdout == "gvtool ran\n", ran.stderr
    assert victim.read_text() == "untouched\n"
    assert sorted(os.listdir(host_target)) == ["victim"]
    assert oct(victim.stat().st_mode & 0o777) == "0o644"


async def test_a_rewritten_claim_neither_kills_another_env_nor_deletes_a_live_one() -> None:
    async with gestvenv.ephemeral("claim-b", isolation_level=IsolationLevel.NAMESPACE) as b, \
            gestvenv.ephemeral("claim-c", isolation_level=IsolationLevel.NAMESPACE) as c:
        busy = asyncio.ensure_future(b.execute(["sleep", "20"]))
        await asyncio.sleep(0.5)
        forged = json.dumps({"id": b.id, "state_file": "/nonexistent"})
        # The claim is the creator's, in a top dir the env's uid cannot write (root creators),
        # or the env's own (a user's): either way a forgery must not be obeyed.
        out = await run_in(c, "import os, json\n"
                              "try:\n"
                              "    os.unlink('.gestvenv-env')\n"
                              f"    open('.gestvenv-env', 'w').write({forged!r})\n"
                              "    print('rewritten')\n"
                              "except OSError as e:\n"
                              "    print('refused', e.errno)\n")
        assert out.split()[0] == ("refused" if os.geteuid() == 0 else "rewritten")
        swept = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "cleanup",
                             "--orphans", "--json"], capture_output=True, text=True, timeout=30)
        assert swept.returncode == 0, swept.stderr
        assert json.loads(swept.stdout)["orphan_paths"] == []
        assert c.path.is_dir() and b.path.is_dir()
        assert not busy.done()  # b's command was not killed
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy


async def test_a_fifo_for_a_claim_does_not_hang_the_sweep() -> None:
    async with gestvenv.ephemeral("fifo", isolation_level=IsolationLevel.NAMESPACE) as env:
        # (As the env's uid the top dir is not writable: made by the creator here, as a user's
        # env could.)
        claim = env.path / ".gestvenv-env"
        claim.unlink()
        os.mkfifo(claim)
        started = time.monotonic()
        swept = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gestvenv", "ephemeral", "cleanup",
                             "--orphans"], capture_output=True, text=True, timeout=30)
        assert time.monotonic() - started < 20
        assert swept.returncode == 0, swept.stderr
        assert env.path.is_dir()  # a live env's dir, whatever its claim
    await wait_until(lambda: not env.path.exists(), 5, "the env's dir removed at its end")


@pytest.mark.skipif(os.geteuid() != 0, reason="a root creator's env (its commands' own uid)")
async def test_after_creation_root_hands_nothing_over(shared_cache: Path) -> None:
    """A second hostile review won a cache file through root's hand-over after an install (a
    rename into the copy's temp name, a stat-then-chown race), filled the disk through a
    sparse file with two links, and broke installs with planted temp names. After creation
    nothing is handed over: installs run as the env's uid."""
    async with gestvenv.ephemeral("racer", packages=["six"],
                                  isolation_level=IsolationLevel.NAMESPACE) as env:
        site = next(env.path.glob("lib/python*/site-packages"))
        shared = site / "six" / "__init__.py"
        before = os.stat(shared)
        await run_in(env, "import os\n"
                          f"os.rename({str(shared)!r}, 'lib/planted')\n"  # a root-owned inode
                          "open('lib/sparse', 'w').truncate(1 << 30)\n"  # 1 GB, two links
                          "os.link('lib/sparse', 'lib/sparse2')\n"
                          "for n in ('sparse', 'sparse2', 'planted'):\n"
                          "    open(f'lib/.{n}.gestvenv-own', 'w').close()\n")
        await env.install(["gvtool"])
        ran = await env.execute(["gvtool"])
        assert ran.stdout == "gvtool ran\n", ran.stderr
        planted = os.stat(env.path / "lib" / "planted")
        assert (planted.st_ino, planted.st_uid, stat.S_IMODE(planted.st_mode)) == \
            (before.st_ino, 0, stat.S_IMODE(before.st_mode))  # still root's, read-only
        assert gestvenv.storage.disk_usage(env.path) < 64 << 20  # the holes stayed holes
    uid = env.info()["sandbox_uid"]
    owned = (await asyncio.to_thread(
        subprocess.run, ["find", str(shared_cache), "-uid", str(uid)], capture_output=True,
        text=True, check=True)).stdout.split()
    assert owned == []
