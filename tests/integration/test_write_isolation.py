"""Nothing an environment writes reaches anything shared (issue 11): the uv cache, the
package-set snapshots, later environments of the same set.

Code inside an environment appends to its installed ``six`` (an in-place edit, the write that
hardlinks used to carry into the cache and every later env). Then: the next environment of the
set imports an unmodified six, no file of the shared cache nor of the snapshots holds the
marker, and no installed file is a hardlink (st_nlink 1, no inode shared with the cache or the
snapshots). For each storage backend, under the runtime the tier gives ("auto": local here,
systemd inside the test host). ``write_isolation_problems`` is also run as non-root users by
tests/integration/systemd/test_write_isolation_user.py.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import gestvenv
from gestvenv import storage
from gestvenv.builder import shim_cache_dir
from gestvenv.config import load_config
from gestvenv.templates import TemplateCache

# What each round's environment is: the first install of the set runs uv, the others are
# clones of the snapshot that install stored.
ROUNDS = ("installed by uv", "cloned from the snapshot", "cloned again")


def regular_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                yield path, st


def inodes(root: Path) -> dict[tuple[int, int], str]:
    return {(st.st_dev, st.st_ino): path for path, st in regular_files(root)} \
        if root.exists() else {}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def holding(root: Path, marker: bytes) -> list[str]:
    """Files under ``root`` (or ``root`` itself) that contain ``marker``."""
    found = []
    files = [(str(root), None)] if root.is_file() else regular_files(root) if root.exists() \
        else []
    for path, _ in files:
        with open(path, "rb") as f:
            if marker in f.read():
                found.append(path)
    return found


def snapshots_dir() -> Path:
    return storage.templates_dir(load_config())


async def write_isolation_problems(backend: str, cache: Path) -> list[str]:
    """Three environments of one package set on ``backend`` (the first installed by uv, the
    next two cloned from its snapshot), each edited in place from inside; what leaked."""
    nonce = str(secrets.randbelow(10**9))
    spec = f"six!=0.0.{nonce}"  # six 1.16.0, under a key no other test has snapshotted
    poison = f"POISONED_{nonce}"
    marker = f"\n{poison} = True\n".encode()
    problems: list[str] = []
    snapshots = snapshots_dir()
    for what in ROUNDS:
        where = f"{backend}, {what}"
        async with gestvenv.ephemeral(f"wi-{backend}", packages=[spec],
                                      storage_backend=backend) as env:
            site = next(env.path.glob("lib/python*/site-packages"))
            installed = dict(regular_files(site))
            if not any(p.endswith(os.path.join("six", "__init__.py")) for p in installed):
                problems.append(f"{where}: six not installed in {site}")
            problems += [f"{where}: {p} has {st.st_nlink} links"
                         for p, st in installed.items() if st.st_nlink != 1]
            shared = inodes(cache) | inodes(snapshots)
            problems += [f"{where}: {p} is {shared[key]}"
                         for key, p in inodes(env.path).items() if key in shared]
            seen = await env.execute(["python", "-c",
                                      f"import six; print(hasattr(six, {poison!r}))"])
            if seen.stdout != "False\n":
                problems.append(f"{where}: six as imported: {seen.stdout!r} {seen.stderr!r}")
            edit = await env.execute(["python", "-c", f"import six; open(six.__file__, 'ab')"
                                      f".write({marker!r}); print(six.__file__)"])
            if not edit.ok or holding(Path(edit.stdout.strip()), marker) == []:
                problems.append(f"{where}: the edit from inside did not happen: {edit}")
        problems += [f"{where}: shared file {p} holds the marker"
                     for root in (cache, snapshots) for p in holding(root, marker)]
    return problems


@pytest.mark.parametrize("backend", ["disk", "tmpfs", "memory"])
async def test_an_in_place_edit_reaches_nothing_shared(backend: str, shared_cache: Path) -> None:
    assert os.environ["GESTVENV_EPHEMERAL_CACHE_DIR"] == str(shared_cache)
    problems = await write_isolation_problems(backend, shared_cache)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("link_mode", ["auto", "copy"])
async def test_both_link_modes_copy(link_mode: str, shared_cache: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_LINK_MODE", link_mode)
    problems = await write_isolation_problems("disk", shared_cache)
    assert not problems, "\n".join(problems)


async def test_pip_in_an_env_uses_a_cache_of_its_own(shared_cache: Path) -> None:
    """What runs under the env's pip (an sdist's build) cannot write the shared cache: the
    shim's uv has a cache inside the env, and copies from it."""
    before = listing(shared_cache)
    async with gestvenv.ephemeral("wi-pip", packages=["six"]) as env:
        shim = (env.bin_dir / "pip").read_text()
        own = shim_cache_dir(env.path)
        installed = await env.execute("pip install gvdemo")
        imported = await env.execute(["python", "-c", "import gvdemo; print(gvdemo.VALUE)"])
        own_files = listing(own)
        site = next(env.path.glob("lib/python*/site-packages"))
        links = {p: st.st_nlink for p, st in regular_files(site) if st.st_nlink != 1}
    after = listing(shared_cache)
    assert f"UV_CACHE_DIR={own}" in shim
    assert "UV_LINK_MODE=copy" in shim
    assert installed.ok, installed.stderr
    assert imported.stdout == "42\n"
    assert own_files                     # the shim's uv used the env's own cache...
    assert after == before               # ...and never the shared one
    assert links == {}


def test_a_snapshot_leaves_the_envs_private_dir_out(tmp_path: Path) -> None:
    """Whatever the env holds in .gestvenv/ (the shim's cache) is its own: never stored."""
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to("/usr/bin/python3")
    baseline = {"bin", os.path.join("bin", "python")}
    lib = env / "lib" / "pkg"
    lib.mkdir(parents=True)
    (lib / "mod.py").write_text("X = 1\n")
    os.chmod(lib / "mod.py", 0o640)
    private = shim_cache_dir(env)
    private.mkdir(parents=True)
    (private / "wheel.py").write_text("CACHED = 1\n")
    cache = TemplateCache(tmp_path / "snapshots", 3600)
    cache.store("0" * 32, env, baseline)
    snapshot = tmp_path / "snapshots" / ("0" * 32)
    stored = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*"))
    assert stored == [".gestvenv-template", "bin", "lib", "lib/pkg", "lib/pkg/mod.py"]
    copy = snapshot / "lib" / "pkg" / "mod.py"
    assert copy.stat().st_nlink == 1 and (lib / "mod.py").stat().st_nlink == 1
    assert stat.S_IMODE(copy.stat().st_mode) == 0o640
    assert copy.stat().st_mtime_ns == (lib / "mod.py").stat().st_mtime_ns
    assert json.loads((snapshot / ".gestvenv-template").read_text())["created"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a root creator's env (its commands' own uid)")
@pytest.mark.parametrize("backend", ["disk", "memory"])
async def test_a_root_creators_sandboxed_env_shares_only_what_it_cannot_write(
        backend: str, shared_cache: Path) -> None:
    """Namespace isolation as root: the commands run under the env's own uid, so the cache's
    and the snapshot's files may stay shared (hardlinks: no copy) where they are root's and
    read-only to it. An edit in place is refused (EACCES); a replacement is the env's own."""
    marker = f"GESTVENV_POISON_{secrets.token_hex(4)}"
    edit = ("import errno, os, six\n"
            "path = six.__file__\n"
            "try:\n"
            f"    open(path, 'a').write('{marker} = 1')\n"
            "    print('edited')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno])\n"
            "os.unlink(path)\n"  # the env's dir is its uid's: a file of its own replaces it
            f"open(path, 'w').write('{marker} = 2')\n"
            "print('replaced')\n")
    for round_ in ROUNDS:
        async with gestvenv.ephemeral("shared", packages=["six"], storage_backend=backend,
                                      isolation_level="namespace") as env:
            installed = next(env.path.glob("lib/python*/site-packages/six/__init__.py"))
            st = installed.stat()
            same_fs = os.stat(shared_cache).st_dev == os.stat(env.path).st_dev
            if same_fs:  # (the memory backend is another filesystem: copies)
                assert (st.st_nlink > 1, st.st_uid, stat.S_IMODE(st.st_mode) & 0o022) == \
                    (True, 0, 0), round_
            done = await env.execute(["python", "-c", edit], cwd=str(env.path))
            assert done.returncode == 0, done.stderr
            expected = "EACCES" if st.st_uid == 0 else "edited"
            assert done.stdout.split() == [expected, "replaced"], round_
        assert holding(shared_cache, marker.encode()) == [], round_
        assert holding(snapshots_dir(), marker.encode()) == [], round_
