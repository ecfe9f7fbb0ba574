"""The overlay clone's decisions, without mounting anything (tests/integration/test_overlay.py
mounts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gestvenv import overlay
from gestvenv.templates import walk


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


def test_lowers_in_use_reads_overlay_mounts_only(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / / rw - ext4 /dev/root rw\n"
        "40 36 0:40 / /e/lib/site-packages rw,nosuid,nodev - overlay overlay "
        "rw,lowerdir=/c/tpl/k1/lib/site-packages,upperdir=/e/.gestvenv/overlay/0/upper,"
        "workdir=/e/.gestvenv/overlay/0/work\n"
        "41 36 0:41 / /m rw - overlay overlay rw,lowerdir=/a\\040b:/c/d,upperdir=/u,workdir=/w\n"
        "42 36 0:42 / /t rw - tmpfs tmpfs rw,lowerdir=/not/an/overlay\n")
    lowers = overlay.lowers_in_use(str(info))
    assert lowers == {"/c/tpl/k1/lib/site-packages", "/a b", "/c/d"}
    assert overlay.in_use(Path("/c/tpl/k1"), lowers)
    assert not overlay.in_use(Path("/c/tpl/k"), lowers)     # a prefix of a name is not a parent
    assert not overlay.in_use(Path("/c/tpl/k2"), lowers)
    assert overlay.lowers_in_use(str(tmp_path / "none")) == set()


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
