"""Process isolation, root creator: a snapshot's site-packages reach the env as an overlay.

Real mounts, on both tiers (the local runtime here; the systemd runtime in the test host, where
the env's commands run in PID 1's mount namespace). What is checked: the clone costs no copy
(the env's private disk stays tiny), code in the env that rewrites, deletes or adds package
files changes neither the snapshot nor the next env, nothing stays mounted after a destroy or
after the creator is SIGKILLed, and a snapshot past its age is not pruned from under a live env.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import gestvenv
from gestvenv import overlay, storage
from gestvenv.config import load_config
from gestvenv.reaper import mount_of
from gestvenv.templates import TemplateCache

from .support import no_watchdog_sweep, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay clones are root's")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(tmp_path / "cache" / "uv"))


def snapshots() -> list[Path]:
    root = storage.templates_dir(load_config())
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() \
        else []


def private_bytes(path: Path) -> int:
    """What the env's own filesystem holds for it (an overlay is another device: not in it)."""
    out = subprocess.run(["du", "-s", "-x", "-B1", str(path)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[0])


def overlays_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(real + "/")]


def expects_overlay() -> bool:
    runtime = load_config().runtime
    systemd = runtime == "systemd" or (runtime == "auto" and os.path.isdir("/run/systemd/system"))
    return overlay.chosen(euid=os.geteuid(), sandboxed=False, link_mode="auto",
                          runtime="systemd" if systemd else "local",
                          same_mount_ns=overlay.same_mount_ns_as_init())


async def test_a_clone_mounts_the_snapshot_and_writes_stay_in_the_env(gv_home: Path) -> None:
    if not expects_overlay():
        pytest.skip("this creator is not in PID 1's mount namespace: clones are copies")
    async with gestvenv.ephemeral("seed", packages=["gvbig"]):
        pass
    [snapshot] = snapshots()
    rel = next(snapshot.glob("lib/python*/site-packages")).relative_to(snapshot)
    pristine = (snapshot / rel / "gvbig" / "__init__.py").read_bytes()
    hostile = textwrap.dedent("""
        import os, pathlib, sys, gvbig
        pkg = pathlib.Path(gvbig.__file__).parent
        (pkg / "__init__.py").write_text("POISONED = True\\n")   # a module rewritten in place
        for f in pkg.glob("*.bin"):
            os.remove(f)                                         # package data deleted
        (pkg.parent / "evil.pth").write_text("import os\\n")      # a .pth for every next env
        print("wrote")
    """)
    async with gestvenv.ephemeral("first", packages=["gvbig"]) as env:
        site = env.path / rel
        assert mount_of(str(site))[1] == "overlay"
        assert private_bytes(env.path) < 2 * 1024 * 1024, "the clone copied the package set"
        # What the env is said to use is its own (the 4 MB blob is the snapshot's).
        assert (await env.usage()).disk_bytes < 2 * 1024 * 1024
        result = await env.execute(["python", "-c", hostile])
        assert result.stdout == "wrote\n", result.stderr
        seen = await env.execute(["python", "-c", "import gvbig; print(gvbig.POISONED)"])
        assert seen.stdout == "True\n"                          # the env's own view changed
        path = env.path
    assert (snapshot / rel / "gvbig" / "__init__.py").read_bytes() == pristine
    assert not (snapshot / rel / "evil.pth").exists()
    assert list((snapshot / rel / "gvbig").glob("*.bin")), "the snapshot lost its data files"
    assert not path.exists() and overlays_under(path.parent) == []
    async with gestvenv.ephemeral("second", packages=["gvbig"]) as env:
        again = await env.execute(["python", "-c",
                                   "import gvbig; print(hasattr(gvbig, 'POISONED'))"])
        assert again.stdout == "False\n"
        assert not (env.path / rel / "evil.pth").exists()


async def test_link_mode_copy_gives_the_env_files_of_its_own(
        gv_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_LINK_MODE", "copy")
    async with gestvenv.ephemeral("seed", packages=["six"]):
        pass
    async with gestvenv.ephemeral("copied", packages=["six"]) as env:
        site = next(env.path.glob("lib/python*/site-packages"))
        assert mount_of(str(site))[1] != "overlay"
        assert (site / "six" / "__init__.py").stat().st_nlink == 1


async def test_a_snapshot_past_its_age_is_kept_while_an_env_sits_on_it(gv_home: Path) -> None:
    if not expects_overlay():
        pytest.skip("this creator is not in PID 1's mount namespace: clones are copies")
    with no_watchdog_sweep():  # (the last prune must be the one that finds it unleased)
        async with gestvenv.ephemeral("seed", packages=["six"]):
            pass
        [snapshot] = snapshots()
        cache = TemplateCache(snapshot.parent, max_age=1)
        async with gestvenv.ephemeral("user", packages=["six"]) as env:
            old = time.time() - 3600
            os.utime(snapshot / ".gestvenv-template", (old, old))   # past any age
            assert cache.prune() == []
            assert snapshot.exists()
            out = await env.execute(["python", "-c", "import six; print(six.__name__)"])
            assert out.stdout == "six\n"
        assert cache.prune() == [str(snapshot)]


async def test_a_snapshot_reached_through_a_symlink_is_kept_too(
        gv_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease is in the snapshot, not read back from mountinfo, where the lowerdir would be
    spelled as the creator reached it (a review: a cache dir behind a symlink lost its
    snapshot to the next sweep, and the env every package)."""
    if not expects_overlay():
        pytest.skip("this creator is not in PID 1's mount namespace: clones are copies")
    (tmp_path / "real-cache").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real-cache")
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(tmp_path / "link" / "uv"))
    async with gestvenv.ephemeral("seed", packages=["six"]):
        pass
    [snapshot] = snapshots()
    async with gestvenv.ephemeral("user", packages=["six"]) as env:
        old = time.time() - 3600
        os.utime(snapshot / ".gestvenv-template", (old, old))
        real = TemplateCache(tmp_path / "real-cache" / "gestvenv-templates", max_age=1)
        assert real.prune() == []                        # the same dir, spelled without the link
        out = await env.execute(["python", "-c", "import six; print(six.__name__)"])
        assert out.stdout == "six\n"


async def test_code_that_mounts_over_its_overlay_does_not_keep_the_env(gv_home: Path) -> None:
    """A mount over the overlay's parent hides the overlay from its path: unmounting deepest
    first failed on it, and the env's dir stayed (a review)."""
    if not expects_overlay():
        pytest.skip("this creator is not in PID 1's mount namespace: clones are copies")
    async with gestvenv.ephemeral("seed", packages=["six"]):
        pass
    async with gestvenv.ephemeral("hider", packages=["six"]) as env:
        hidden = await env.execute(["sh", "-c", 'mount -t tmpfs none "$VIRTUAL_ENV/lib"'])
        assert hidden.ok, hidden.stderr
        path = env.path
        assert len(overlays_under(path)) == 2
    assert not path.exists()
    assert overlays_under(path.parent) == []


def test_a_sigkilled_creator_leaves_no_mount(gv_home: Path, tmp_path: Path) -> None:
    if not expects_overlay():
        pytest.skip("this creator is not in PID 1's mount namespace: clones are copies")
    import asyncio

    async def seed() -> None:
        async with gestvenv.ephemeral("seed", packages=["six"]):
            pass
    asyncio.run(seed())
    ready = tmp_path / "ready"
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib, time, gestvenv
        with gestvenv.ephemeral_sync("killed", packages=["six"]) as env:
            pathlib.Path({str(ready)!r}).write_text(str(env.path))
            time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), "the creator never got its env"
        path = Path(ready.read_text())
        assert overlays_under(path), "the env had no overlay"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    async def gone() -> None:
        await wait_until(lambda: not path.exists() and not overlays_under(path), 20,
                         "the env's reaper unmounted and removed it")
    asyncio.run(gone())
