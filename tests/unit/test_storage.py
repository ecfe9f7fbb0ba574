"""The only code that deletes: it stays inside the storage roots and never follows a link."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gestvenv import Config, StorageBackend, UnsafePathError
from gestvenv.storage import (
    CLAIM,
    all_roots,
    check_env_dir,
    check_inside_roots,
    claim_dir,
    claim_of,
    disk_usage,
    is_claimed,
    is_tmpfs,
    remove_tree,
    storage_root,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A precious directory outside the root, which nothing may delete."""
    path = tmp_path / "precious"
    path.mkdir()
    (path / "data.txt").write_text("keep me")
    return path


def _assert_intact(outside: Path) -> None:
    assert (outside / "data.txt").read_text() == "keep me"


def _make_env(root: Path, name: str = "env-0123abcd") -> Path:
    env = root / name
    (env / "lib" / "site-packages" / "pkg").mkdir(parents=True)
    (env / "lib" / "site-packages" / "pkg" / "__init__.py").write_text("x = 1\n")
    (env / "bin").mkdir()
    (env / "bin" / "python").symlink_to(sys.executable)
    return env


# --- check_inside_roots ---

def test_direct_child_of_a_root_is_accepted(root: Path) -> None:
    env = _make_env(root)
    assert check_inside_roots(env, [root]) == env
    missing = root / "not-created-yet"
    assert check_inside_roots(missing, [root]) == missing


def test_path_outside_the_roots_is_refused(root: Path, outside: Path) -> None:
    with pytest.raises(UnsafePathError, match="not directly inside"):
        check_inside_roots(outside, [root])
    with pytest.raises(UnsafePathError):
        remove_tree(outside, [root])
    _assert_intact(outside)


@pytest.mark.parametrize("relative", [
    "../precious",
    "env/../../precious",
    "./../precious",
])
def test_dotdot_escape_is_refused(root: Path, outside: Path, relative: str) -> None:
    (root / "env").mkdir()
    sneaky = Path(f"{root}/{relative}")
    with pytest.raises(UnsafePathError):
        check_inside_roots(sneaky, [root])
    with pytest.raises(UnsafePathError):
        remove_tree(sneaky, [root])
    _assert_intact(outside)


@pytest.mark.parametrize("relative", [".", "..", "", "env/.."])
def test_root_itself_and_its_parent_are_refused(root: Path, relative: str) -> None:
    _make_env(root, "env")
    with pytest.raises(UnsafePathError):
        remove_tree(Path(f"{root}/{relative}"), [root])
    assert (root / "env" / "bin").is_dir()


def test_grandchild_of_a_root_is_refused(root: Path) -> None:
    env = _make_env(root)
    with pytest.raises(UnsafePathError, match="not directly inside"):
        remove_tree(env / "lib", [root])
    assert (env / "lib" / "site-packages" / "pkg" / "__init__.py").exists()


def test_symlink_leaf_pointing_outside_is_refused_and_target_survives(
        root: Path, outside: Path) -> None:
    link = root / "env-0123abcd"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        check_inside_roots(link, [root])
    with pytest.raises(UnsafePathError, match=r"symlink to .*the link was removed"):
        remove_tree(link, [root])
    _assert_intact(outside)
    # The link was an entry of gestvenv's root: it goes, so no sweep trips on it again.
    assert not os.path.lexists(link)


def test_a_symlink_outside_the_roots_is_not_even_unlinked(root: Path, outside: Path,
                                                          tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = elsewhere / "env-0123abcd"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="not directly inside"):
        remove_tree(link, [root])
    assert link.is_symlink()
    _assert_intact(outside)


def test_dangling_symlink_leaf_is_refused(root: Path, tmp_path: Path) -> None:
    link = root / "env-0123abcd"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafePathError, match="symlink"):
        remove_tree(link, [root])


def test_regular_file_leaf_is_refused(root: Path) -> None:
    file = root / "env-0123abcd"
    file.write_text("not a dir")
    with pytest.raises(UnsafePathError, match="not a directory"):
        remove_tree(file, [root])
    assert file.read_text() == "not a dir"


def test_root_behind_a_symlink_is_resolved(root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    env = _make_env(root)
    assert remove_tree(alias / env.name, [root]) is True
    assert not env.exists()
    assert root.is_dir()


# --- remove_tree ---

def test_remove_tree_deletes_and_reports_missing(root: Path) -> None:
    env = _make_env(root)
    assert remove_tree(env, [root]) is True
    assert not env.exists()
    assert remove_tree(env, [root]) is False
    assert list(root.iterdir()) == []


def test_links_inside_the_tree_are_removed_not_followed(root: Path, outside: Path) -> None:
    env = _make_env(root)
    (env / "lib" / "to-precious").symlink_to(outside, target_is_directory=True)
    (env / "data-link").symlink_to(outside / "data.txt")
    os.link(outside / "data.txt", env / "hardlinked.txt")
    assert remove_tree(env, [root]) is True
    assert not env.exists()
    _assert_intact(outside)


def _build_readonly_tree(env: Path) -> None:
    (env / "ro-dir" / "nested-ro").mkdir(parents=True)
    (env / "ro-dir" / "file.txt").write_text("x")
    (env / "ro-dir" / "nested-ro" / "deep.txt").write_text("y")
    (env / "locked").mkdir()
    (env / "locked" / "secret.txt").write_text("z")
    (env / "ro-file.txt").write_text("read only")
    os.chmod(env / "ro-file.txt", 0o444)
    os.chmod(env / "ro-dir" / "nested-ro" / "deep.txt", 0o400)
    os.chmod(env / "ro-dir" / "nested-ro", 0o555)
    os.chmod(env / "ro-dir", 0o555)
    os.chmod(env / "locked", 0o000)
    os.chmod(env, 0o555)


def readonly_scenario(base: str) -> None:
    """Build a tree of read-only files and dirs under ``base``/root and remove it."""
    root = Path(base) / "root"
    env = root / "env-0123abcd"
    env.mkdir()
    _build_readonly_tree(env)
    assert remove_tree(env, [root]) is True
    assert not os.path.lexists(env)


@pytest.fixture
def unprivileged_base() -> Iterator[str]:
    """A directory that a non-root user may write in (for the drop-privileges run)."""
    base = tempfile.mkdtemp(prefix="gv-storage-test-")
    try:
        os.chmod(base, 0o755)
        (Path(base) / "root").mkdir()
        if os.geteuid() == 0:
            os.chown(Path(base) / "root", 65534, 65534)
        yield base
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o700)
        shutil.rmtree(base)


def _as_nobody(func: Callable[[str], None], arg: str) -> None:
    """Run ``func(arg)`` in a forked child that dropped root for uid/gid 65534; re-raise there."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            func(arg)
            code = 0
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        error = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, error


def test_remove_tree_handles_readonly_files_and_dirs(unprivileged_base: str) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits: run the scenario as "nobody", where they matter.
        _as_nobody(readonly_scenario, unprivileged_base)
    else:
        readonly_scenario(unprivileged_base)
    assert os.listdir(Path(unprivileged_base) / "root") == []


def test_readonly_tree_as_current_user(root: Path) -> None:
    env = root / "env-0123abcd"
    env.mkdir()
    _build_readonly_tree(env)
    assert stat.S_IMODE(env.stat().st_mode) == 0o555
    assert remove_tree(env, [root]) is True
    assert not os.path.lexists(env)


def test_mount_inside_is_detached_not_descended(root: Path, outside: Path) -> None:
    env = _make_env(root)
    mnt = env / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "--bind", str(outside), str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.decode(errors='replace')}")
    try:
        assert (mnt / "data.txt").exists()
        assert remove_tree(env, [root]) is True
        assert not env.exists()
        _assert_intact(outside)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- disk_usage ---

def test_disk_usage_counts_hardlinks_once(root: Path) -> None:
    env = root / "env"
    env.mkdir()
    (env / "big.bin").write_bytes(os.urandom(512 * 1024))
    os.sync()
    once = disk_usage(env)
    assert once >= 512 * 1024
    for i in range(3):
        os.link(env / "big.bin", env / f"link{i}.bin")
    (env / "sub").mkdir()
    os.link(env / "big.bin", env / "sub" / "deep-link.bin")
    with_links = disk_usage(env)
    # the new directory entry "sub" adds a block or so, never another copy of the file
    assert once <= with_links < once + 256 * 1024


def test_disk_usage_does_not_follow_symlinks(root: Path, tmp_path: Path) -> None:
    big = tmp_path / "elsewhere.bin"
    big.write_bytes(os.urandom(512 * 1024))
    env = root / "env"
    env.mkdir()
    (env / "small.txt").write_text("x")
    before = disk_usage(env)
    (env / "link").symlink_to(big)
    (env / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    assert disk_usage(env) < before + 64 * 1024


def test_disk_usage_of_copies_grows(root: Path) -> None:
    env = root / "env"
    env.mkdir()
    (env / "a.bin").write_bytes(os.urandom(256 * 1024))
    one = disk_usage(env)
    (env / "b.bin").write_bytes((env / "a.bin").read_bytes())
    assert disk_usage(env) >= one + 256 * 1024


# --- roots ---

def test_storage_roots_per_backend(gv_home: Path) -> None:
    config = Config().replace(storage_root=str(gv_home / "envs"))
    disk = storage_root(StorageBackend.DISK, config)
    assert disk.path == gv_home / "envs"
    assert disk.note is None
    assert stat.S_IMODE(disk.path.stat().st_mode) == 0o700

    memory = storage_root(StorageBackend.MEMORY, config)
    assert str(memory.path).startswith("/dev/shm/")
    assert is_tmpfs(memory.path)

    tmpfs = storage_root(StorageBackend.TMPFS, config)
    assert is_tmpfs(tmpfs.path)
    if tmpfs.path != gv_home / "run" / "storage":
        # the runtime dir is not a tmpfs here: the fallback says so
        assert tmpfs.note is not None
        assert "not a tmpfs" in tmpfs.note
    assert set(all_roots(config)) == {disk.path, memory.path, tmpfs.path}


def test_is_tmpfs(tmp_path: Path) -> None:
    assert is_tmpfs(Path("/dev/shm"))
    assert not is_tmpfs(Path("/proc"))
    assert is_tmpfs(tmp_path) == (_fstype(tmp_path) == "tmpfs")


def _fstype(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip()


def test_storage_root_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="not a directory owned"):
        storage_root(StorageBackend.DISK, Config(storage_root=link))


@contextlib.contextmanager
def _mounted(env: Path, *mount_args: str) -> Iterator[Path]:
    """``env/mnt`` with something mounted on it (skip where mounting is not allowed)."""
    mnt = env / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", *mount_args, str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_mount_inside_is_detached_when_the_root_is_reached_through_a_symlink(
        root: Path, outside: Path, tmp_path: Path) -> None:
    """Mounts are found under the resolved path, not the (symlinked) one given."""
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    env = _make_env(root)
    with _mounted(env, "--bind", str(outside)), contextlib.suppress(OSError):
        remove_tree(alias / env.name, [alias])
    _assert_intact(outside)
    assert not env.exists()


def test_mount_inside_is_detached_under_a_root_with_unicode_and_spaces(
        tmp_path: Path, outside: Path) -> None:
    """mountinfo writes a space as \\040 and UTF-8 as is: both must be read back right."""
    odd_root = tmp_path / "café envs"
    odd_root.mkdir()
    env = _make_env(odd_root)
    with _mounted(env, "--bind", str(outside)), contextlib.suppress(OSError):
        remove_tree(env, [odd_root])
    _assert_intact(outside)
    assert not env.exists()


def test_a_directory_on_another_device_is_never_entered(root: Path, tmp_path: Path) -> None:
    """Even a mount that mountinfo did not show (one made after the check) stops the walk."""
    env = _make_env(root)
    with _mounted(env, "-t", "tmpfs", "-o", "size=1m", "gvtest") as mnt:
        (mnt / "inside-the-mount.txt").write_text("keep me")
        from gestvenv.reaper import _remove_at

        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(UnsafePathError, match="mounted"):
                _remove_at(fd, env.name, os.fstat(fd).st_dev, str(env))
        finally:
            os.close(fd)
        assert (mnt / "inside-the-mount.txt").read_text() == "keep me"


def test_a_non_empty_foreign_dir_is_not_adopted_as_a_storage_root(tmp_path: Path) -> None:
    from gestvenv.config import load_config
    from gestvenv.exceptions import ConfigError
    from gestvenv.models import StorageBackend
    from gestvenv.storage import ROOT_MARK, storage_root

    shared = tmp_path / "shared"
    (shared / "build-1a2b3c4d").mkdir(parents=True)
    config = load_config().replace(storage_root=str(shared))
    with pytest.raises(ConfigError, match="not gestvenv's"):
        storage_root(StorageBackend.DISK, config)
    assert not (shared / ROOT_MARK).exists()
    fresh = tmp_path / "fresh"
    assert storage_root(StorageBackend.DISK, config.replace(storage_root=str(fresh))).path == fresh
    assert (fresh / ROOT_MARK).is_file()


# --- claims: trusted only when gestvenv's own (a hostile review planted the others) ---

def _claimed_dir(tmp_path: Path, env_id: str = "0123abcd" + "0" * 24) -> Path:
    path = tmp_path / f"env-{env_id[:8]}"
    state = tmp_path / "state.json"
    state.write_text(f'{{"id": "{env_id}"}}')
    claim_dir(path, state, env_id)
    return path


def test_a_claim_of_gestvenvs_own_is_trusted(tmp_path: Path) -> None:
    path = _claimed_dir(tmp_path)
    assert claim_of(path) == ("0123abcd" + "0" * 24, str(tmp_path / "state.json"))
    assert is_claimed(path) is True


def test_a_claim_for_another_envs_id_is_not_trusted(tmp_path: Path) -> None:
    path = _claimed_dir(tmp_path)
    (path / CLAIM).write_text('{"id": "ffffffff' + "0" * 24 + '", "state_file": "/x"}')
    assert claim_of(path) is None  # the dir's name ends with another id
    assert is_claimed(path) is None


@pytest.mark.parametrize("kind", ["fifo", "symlink", "foreign owner", "huge"])
def test_a_planted_claim_is_not_read_nor_waited_for(tmp_path: Path, kind: str) -> None:
    path = _claimed_dir(tmp_path)
    claim = path / CLAIM
    text = claim.read_text()
    claim.unlink()
    if kind == "fifo":
        os.mkfifo(claim)  # a blocking open would hang the sweep
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_text(text)
        claim.symlink_to(tmp_path / "elsewhere")
    elif kind == "foreign owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file away")
        claim.write_text(text)
        os.chown(claim, 65534, 65534)  # as an env's own uid would have written it
    else:
        claim.write_text(text + " " * (1 << 17))
    assert claim_of(path) is None
    assert is_claimed(path) is None
    check_env_dir(path, "env", "0123abcd" + "0" * 24)  # its own dir, whatever the claim


def test_a_fifo_as_the_state_file_is_not_waited_for(tmp_path: Path) -> None:
    path = _claimed_dir(tmp_path)
    (tmp_path / "state.json").unlink()
    os.mkfifo(tmp_path / "state.json")
    assert is_claimed(path) is False
