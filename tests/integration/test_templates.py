"""Package-set snapshots: the second environment asking for the same packages is a clone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gestvenv
from gestvenv import storage
from gestvenv.config import load_config
from gestvenv.reaper import mount_of

from .support import no_watchdog_sweep


def templates(gv_home: Path) -> list[Path]:
    root = storage.templates_dir(load_config())
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() \
        else []


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Snapshots live beside the cache: give each test its own, so counts are exact.
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CACHE_DIR", str(tmp_path / "cache" / "uv"))


async def test_second_env_is_cloned_with_scripts_pointing_at_itself(gv_home: Path) -> None:
    async with gestvenv.ephemeral("first", packages=["gvtool", "six>=1.0"]) as env:
        first = await env.execute(["gvtool"])
    assert first.stdout == "gvtool ran\n"
    [snapshot] = templates(gv_home)
    stored = (snapshot / "bin" / "gvtool").read_bytes()
    assert b"@@gestvenv-env-python@@" in stored           # no env path frozen in the snapshot
    assert not (snapshot / "bin" / "python").exists()      # only what the install added

    async with gestvenv.ephemeral("second", packages=["gvtool", "six>=1.0"]) as env:
        script = (env.bin_dir / "gvtool").read_text()
        assert script.startswith(f"#!{env.python}\n")
        result = await env.execute(["gvtool"])
        six = await env.execute(["python", "-c", "import six; print(six.__version__)"])
        site = next(env.path.glob("lib/python*/site-packages"))
        mine = (site / "six" / "__init__.py").stat()
        twin = snapshot / site.relative_to(env.path) / "six"
        if mount_of(str(site))[1] == "overlay":
            # Root at process isolation: the snapshot is the lower layer of an overlay, the
            # env's writes go to its upper one (test_overlay.py writes through it).
            assert mine.st_dev != (twin / "__init__.py").stat().st_dev
        else:
            # Its own dirs and its own files (reflinked or copied, never hardlinked).
            assert mine.st_nlink == 1
            assert mine.st_ino != (twin / "__init__.py").stat().st_ino
            assert (site / "six").stat().st_ino != twin.stat().st_ino
        assert mine.st_mtime_ns == (twin / "__init__.py").stat().st_mtime_ns  # .pyc stay valid
        listed = await env.execute(["pip", "list"])
    assert result.stdout == "gvtool ran\n"
    assert six.stdout == "1.16.0\n"
    assert "gvtool" in listed.stdout
    assert len(templates(gv_home)) == 1                    # reused, not stored again


async def test_a_different_package_set_or_requirements_content_is_resolved_anew(
        gv_home: Path, tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("gvdep==1.0\n")
    async with gestvenv.ephemeral("r1", requirements=req):
        pass
    req.write_text("gvdep==2.0\n")                          # same file, new content
    async with gestvenv.ephemeral("r2", requirements=req) as env:
        out = await env.execute(["python", "-c", "import gvdep; print(gvdep.__version__)"])
    assert out.stdout == "2.0\n"
    async with gestvenv.ephemeral("r3", packages=["six==0.9.0"]) as env:
        old = await env.execute(["python", "-c", "import six; print(six.__version__)"])
    assert old.stdout == "0.9.0\n"
    assert len(templates(gv_home)) == 3


async def test_template_ttl_zero_disables_snapshots(gv_home: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_TEMPLATE_TTL", "0")
    async with gestvenv.ephemeral("nosnap", packages=["six"]) as env:
        assert (await env.execute(["python", "-c", "import six"])).ok
    assert templates(gv_home) == []


async def test_a_damaged_snapshot_falls_back_to_a_real_install(gv_home: Path) -> None:
    async with gestvenv.ephemeral("seed", packages=["gvdemo"]):
        pass
    [snapshot] = templates(gv_home)
    # a snapshot whose files vanished (pruned by hand, a full disk while storing...)
    for path in sorted(snapshot.rglob("*"), reverse=True):
        if path.is_file() and path.name != ".gestvenv-template":
            path.unlink()
    (snapshot / "lib").rename(snapshot / "lib-gone")
    (snapshot / "lib-gone" / "oops").mkdir(parents=True)
    (snapshot / "lib").symlink_to("/nonexistent-target")   # cloning it fails
    async with gestvenv.ephemeral("after", packages=["gvdemo"]) as env:
        out = await env.execute(["python", "-c", "import gvdemo; print(gvdemo.VALUE)"])
    assert out.stdout == "42\n"


async def test_orphan_sweep_prunes_stale_snapshots(gv_home: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from gestvenv.cleanup import sweep

    with no_watchdog_sweep():  # this sweep is the one that must find the snapshot stale
        async with gestvenv.ephemeral("old", packages=["six"]):
            pass
        [snapshot] = templates(gv_home)
        made = snapshot / ".gestvenv-template"
        os.utime(made, (made.stat().st_atime, made.stat().st_mtime - 90_000))  # past a day
        report = await sweep(load_config(), expired=False, idle=False, orphans=True)
    assert str(snapshot) in report.orphan_paths
    assert templates(gv_home) == []


async def test_env_dir_keeps_its_claim_after_a_failed_clone(gv_home: Path) -> None:
    async with gestvenv.ephemeral("seed2", packages=["six"]):
        pass
    [snapshot] = templates(gv_home)
    (snapshot / "bin" / "python").symlink_to("/nonexistent")  # collides with the venv's own
    async with gestvenv.ephemeral("claimed", packages=["six"]) as env:
        assert storage.is_claimed(env.path) is True
        assert (await env.execute(["python", "-c", "import six"])).ok


async def test_a_snapshot_records_what_it_holds(gv_home: Path) -> None:
    # (Said when it is cloned, on a terminal: gestvenv.progress.)
    from gestvenv.templates import TemplateCache

    async with gestvenv.ephemeral("counted", packages=["gvtool", "gvbig"]):
        pass
    [snapshot] = templates(gv_home)
    files = [p for p in snapshot.rglob("*") if not p.is_dir()
             and p.name != ".gestvenv-template"]
    assert TemplateCache.contents(snapshot) == (len(files),
                                                sum(p.lstat().st_size for p in files))
    assert TemplateCache.contents(snapshot)[1] > 4 << 20  # gvbig's 4 MB are in it
    (snapshot / ".gestvenv-template").write_text('{"created": 1}')  # an older gestvenv's
    assert TemplateCache.contents(snapshot) is None
