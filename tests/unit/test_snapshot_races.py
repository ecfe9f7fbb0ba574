"""A snapshot is never removed while a clone reads it (real files, no mount: the copy path,
the one the systemd tier takes). Found by 20 concurrent creates in CI: a clone walked a
snapshot that a twin's store was replacing, and its env got requests without urllib3."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gestvenv import templates
from gestvenv.templates import COMPLETE_MARK, TemplateCache, snapshot_baseline, walk

KEY = "a" * 32
SITE = "lib/python3.11/site-packages"


def installed_env(path: Path) -> set[str]:
    """An env as after an install: a venv's own files (the baseline), then a package set of
    many files across many dirs (a walk that takes a while)."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text("")
    (path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    baseline = snapshot_baseline(path)
    for package in ("requests", "urllib3", "idna", "certifi", "charset_normalizer"):
        for sub in range(4):
            folder = path / SITE / package / f"sub{sub}"
            folder.mkdir(parents=True)
            for n in range(10):
                (folder / f"m{n}.py").write_text(f"# {package} {sub} {n}\n")
    return baseline


def files_of(root: Path) -> set[str]:
    return {rel for rel, _, is_dir in walk(root) if not is_dir} - {COMPLETE_MARK}


@pytest.fixture
def stored(tmp_path: Path) -> tuple[TemplateCache, Path, set[str]]:
    cache = TemplateCache(tmp_path / "templates", max_age=3600, reflink=False)
    env = tmp_path / "first"
    baseline = installed_env(env)
    cache.store(KEY, env, baseline)
    snapshot = cache.lookup(KEY)
    assert snapshot is not None
    return cache, snapshot, baseline


def during_the_copy(monkeypatch: pytest.MonkeyPatch, action: object, after: int = 20) -> None:
    """Run ``action`` once, in the middle of a clone's copy (after ``after`` files)."""
    copy = templates.Copier.copy
    count = 0

    def copying(self: templates.Copier, src: str, dst: str) -> None:
        nonlocal count
        count += 1
        if count == after:
            action()  # type: ignore[operator]
        copy(self, src, dst)
    monkeypatch.setattr(templates.Copier, "copy", copying)


def test_a_prune_during_a_clone_leaves_the_snapshot_to_it(
        stored: tuple[TemplateCache, Path, set[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache, snapshot, _ = stored
    expected = files_of(snapshot)
    old = time.time() - 7200
    os.utime(snapshot / COMPLETE_MARK, (old, old))  # past its age: prune's to remove
    pruned: list[list[str]] = []
    during_the_copy(monkeypatch, lambda: pruned.append(cache.prune()))
    clone = tmp_path / "clone"
    clone.mkdir()
    cache.clone(snapshot, clone)
    assert pruned == [[]]                      # kept while read...
    assert files_of(clone) == expected         # ...so the clone is whole
    monkeypatch.undo()
    assert cache.prune() == [str(snapshot)]    # and pruned once read


def test_a_twin_stored_during_a_clone_keeps_the_fresh_snapshot(
        stored: tuple[TemplateCache, Path, set[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache, snapshot, _ = stored
    expected = files_of(snapshot)
    inode = snapshot.stat().st_ino
    twin = tmp_path / "twin"
    twin_baseline = installed_env(twin)
    during_the_copy(monkeypatch, lambda: cache.store(KEY, twin, twin_baseline))
    clone = tmp_path / "clone"
    clone.mkdir()
    cache.clone(snapshot, clone)
    assert files_of(clone) == expected
    assert snapshot.stat().st_ino == inode     # the first one kept, not replaced
    assert [p.name for p in cache.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_stale_snapshot_read_by_a_clone_is_not_replaced_under_it(
        stored: tuple[TemplateCache, Path, set[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache, snapshot, _ = stored
    expected = files_of(snapshot)
    old = time.time() - 7200
    os.utime(snapshot / COMPLETE_MARK, (old, old))
    inode = snapshot.stat().st_ino
    twin = tmp_path / "twin"
    twin_baseline = installed_env(twin)
    during_the_copy(monkeypatch, lambda: cache.store(KEY, twin, twin_baseline))
    clone = tmp_path / "clone"
    clone.mkdir()
    cache.clone(snapshot, clone)
    assert files_of(clone) == expected
    assert snapshot.stat().st_ino == inode     # not removed while read
    monkeypatch.undo()
    cache.store(KEY, twin, twin_baseline)      # no clone reads it now: replaced
    assert snapshot.stat().st_ino != inode
    assert cache.lookup(KEY) is not None and files_of(snapshot) == expected


def test_a_snapshot_removed_since_its_lookup_fails_the_clone_and_adds_nothing(
        stored: tuple[TemplateCache, Path, set[str]], tmp_path: Path) -> None:
    cache, snapshot, _ = stored
    old = time.time() - 7200
    os.utime(snapshot / COMPLETE_MARK, (old, old))
    assert cache.prune() == [str(snapshot)]
    clone = tmp_path / "clone"
    clone.mkdir()
    with pytest.raises(FileNotFoundError, match="removed meanwhile"):
        cache.clone(snapshot, clone)
    assert list(clone.iterdir()) == []


def test_reading_a_snapshot_keeps_removals_off_it(
        stored: tuple[TemplateCache, Path, set[str]]) -> None:
    """What a container image's layer is read under (images.ensure_packages), as a clone."""
    cache, snapshot, _ = stored
    old = time.time() - 7200
    os.utime(snapshot / COMPLETE_MARK, (old, old))
    with templates.reading(snapshot):
        assert cache.prune() == []
        assert snapshot.is_dir()
    assert cache.prune() == [str(snapshot)]
    with pytest.raises(FileNotFoundError), templates.reading(snapshot):
        pass
