"""The overlay clone's decisions, without mounting anything (tests/integration/test_overlay.py
mounts)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from gestvenv import overlay
from gestvenv.templates import _MARK, COMPLETE_MARK, PRIVATE_DIR, TemplateCache, _locked, walk


@pytest.mark.parametrize(("facts", "expected"), [
    ({}, True),
    ({"euid": 1000}, False),                       # no mount without CAP_SYS_ADMIN
    ({"sandboxed": True}, False),                  # a uid of its own: read-only hardlinks
    ({"link_mode": "copy"}, False),                # files of the env's own, asked for
    ({"runtime": "systemd"}, True),
    ({"runtime": "systemd", "same_mount_ns": False}, False),  # its commands would not see it
    ({"runtime": "local", "same_mount_ns": False}, True),     # they are the creator's children
])
def test_when_a_clone_is_an_overlay(facts: dict[str, object], expected: bool) -> None:
    base: dict[str, object] = {"euid": 0, "sandboxed": False, "link_mode": "auto",
                               "runtime": "local", "same_mount_ns": True}
    assert overlay.chosen(**{**base, **facts}) is expected  # type: ignore[arg-type]


def test_options_refuse_what_they_cannot_carry() -> None:
    assert overlay.options("/c/t/lib", "/e/u", "/e/w") == \
        "lowerdir=/c/t/lib,upperdir=/e/u,workdir=/e/w"
    for bad in ("/c/a,b", "/c/a:b", "/c/a b", "/c/a\\b", "/c/a\nb"):
        assert overlay.options(bad, "/e/u", "/e/w") is None
        assert overlay.options("/c/t", bad, "/e/w") is None


def snapshot_with_mark(root: Path, key: str) -> Path:
    snap = root / key
    (snap / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (root / _MARK).write_text("gestvenv package-set snapshots\n")  # (prune's: the root is ours)
    (snap / COMPLETE_MARK).write_text("{}")
    old = time.time() - 3600
    os.utime(snap / COMPLETE_MARK, (old, old))  # past any max_age below
    return snap


def test_a_leased_snapshot_is_kept_until_its_env_is_gone(tmp_path: Path) -> None:
    """No mountinfo involved: the mount may be in another mount namespace than the sweep's,
    or its lowerdir spelled through a symlink; the lease is in the snapshot itself."""
    root = tmp_path / "gestvenv-templates"
    snap = snapshot_with_mark(root, "0" * 32)
    env = tmp_path / "envs" / "e-01234567"
    (env / PRIVATE_DIR / overlay.OVERLAY_DIR).mkdir(parents=True)
    overlay.lease(snap, env)
    cache = TemplateCache(root, max_age=60)
    assert cache.prune() == []
    assert snap.exists() and overlay.leased(snap, PRIVATE_DIR)
    shutil.rmtree(env)                                   # the env destroyed, reaped or swept
    assert cache.prune() == [str(snap)]
    assert not snap.exists()


def test_a_stale_lease_is_dropped(tmp_path: Path) -> None:
    snap = snapshot_with_mark(tmp_path, "1" * 32)
    overlay.lease(snap, tmp_path / "gone")
    assert not overlay.leased(snap, PRIVATE_DIR)
    assert list((snap / overlay.LEASES).iterdir()) == []


def test_a_clone_holding_the_snapshot_keeps_prune_off_it(tmp_path: Path) -> None:
    root = tmp_path / "gestvenv-templates"
    snap = snapshot_with_mark(root, "2" * 32)
    cache = TemplateCache(root, max_age=60)
    with _locked(snap, exclusive=False) as whole:        # a clone between lookup and mount
        assert whole is True
        assert cache.prune() == []
    assert cache.prune() == [str(snap)]
    with _locked(snap, exclusive=False) as whole:        # pruned: the clone fails
        assert whole is False


def test_site_packages_dirs_of_a_snapshot(tmp_path: Path) -> None:
    tmp_path = tmp_path / "snapshot"
    (tmp_path / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (tmp_path / "lib" / "python3.12").mkdir()                    # no site-packages in it
    (tmp_path / "lib" / "other" / "site-packages").mkdir(parents=True)
    assert overlay.site_packages(tmp_path) == ["lib/python3.11/site-packages"]
    assert overlay.site_packages(tmp_path / "missing") == []


def test_walk_prunes_a_nested_dir_with_all_it_holds(tmp_path: Path) -> None:
    tmp_path = tmp_path / "snapshot"
    (tmp_path / "lib" / "py" / "site-packages" / "pkg").mkdir(parents=True)
    (tmp_path / "lib" / "py" / "site-packages" / "pkg" / "m.py").write_text("")
    (tmp_path / "lib" / "py" / "other.py").write_text("")
    (tmp_path / "bin").mkdir()
    found = {rel for rel, _, _ in walk(tmp_path, prune={"lib/py/site-packages", "bin"})}
    assert found == {"lib", "lib/py", "lib/py/other.py"}
