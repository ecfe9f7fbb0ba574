"""Where things live, and the only code that deletes an environment's files.

Layout (root / other users)::

    /run/gestvenv               $XDG_RUNTIME_DIR/gestvenv    state: one JSON file per env, locks
    /run/gestvenv/storage       $XDG_RUNTIME_DIR/gestvenv/storage         TMPFS backend
    /dev/shm/gestvenv           /dev/shm/gestvenv-UID                     MEMORY backend
    /var/cache/gestvenv/envs    $XDG_CACHE_HOME/gestvenv/envs             DISK backend
    /var/cache/gestvenv/uv      $XDG_CACHE_HOME/gestvenv/uv               the shared uv cache

The uv cache sits on the DISK root's filesystem so that uv hardlinks files instead of copying
them; environments on a tmpfs get copies (a hardlink cannot cross filesystems).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .exceptions import ConfigError, GestvenvError, UnsafePathError
from .models import StorageBackend
from .reaper import (  # the deletion code, shared with the env unit's stop action
    CLAIM,
    ROOT_MARK,
    check_inside_roots,
    disk_used,
    env_dir_name,
    is_env_dir_name,
    is_marked_root,
    mount_of,
    names_env,
    remove_tree,
    stem_of_env_dir,
)

__all__ = [
    "CLAIM",
    "ROOT_MARK",
    "check_inside_roots",
    "env_dir_name",
    "is_env_dir_name",
    "is_marked_root",
    "names_env",
    "remove_tree",
    "stem_of_env_dir",
]

# Root's dirs (other users' are under their XDG dirs): also what the packaged tmpfiles.d file
# creates at boot (gestvenv.distfiles).
ROOT_RUNTIME_DIR = Path("/run/gestvenv")
ROOT_SHM_DIR = Path("/dev/shm/gestvenv")
ROOT_CACHE_DIR = Path("/var/cache/gestvenv")
USER_TMP_RUNTIME_PREFIX = "/tmp/gestvenv-"  # + uid: a runtime dir without XDG_RUNTIME_DIR


def _is_root() -> bool:
    return os.geteuid() == 0


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700), or accept it if it is ours: a real dir we own, not a link."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise GestvenvError(f"cannot create {path}: {exc.strerror}") from None
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} is not a directory owned by uid {os.geteuid()}; refusing")
    return path


def runtime_dir_path() -> Path:
    """Where :func:`runtime_dir` is, computed without creating or checking anything (shell
    completion reads it at every <TAB>)."""
    explicit = os.environ.get("GESTVENV_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    if _is_root():
        return ROOT_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.geteuid():
        return Path(xdg) / "gestvenv"
    return Path(f"{USER_TMP_RUNTIME_PREFIX}{os.geteuid()}")


def runtime_dir() -> Path:
    """The per-user runtime directory: state files and locks (a tmpfs on systemd hosts)."""
    return _private_dir(runtime_dir_path())


def state_dir() -> Path:
    return _private_dir(runtime_dir() / "envs")


def pool_dir() -> Path:
    """The systemd runtime's pool files (gestvenv.runtime.systemd.pool), one per pool unit."""
    return _private_dir(runtime_dir() / "pool")


def cache_base(config: Config) -> Path:
    if _is_root():
        return ROOT_CACHE_DIR
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "gestvenv"


def uv_cache_dir(config: Config) -> Path:
    return config.cache_dir or cache_base(config) / "uv"


def templates_dir(config: Config) -> Path:
    """Snapshots of installed package sets, beside the uv cache (same filesystem: hardlinks)."""
    return uv_cache_dir(config).parent / "gestvenv-templates"


def is_tmpfs(path: Path) -> bool:
    """Whether ``path`` is on a tmpfs (statfs(2).f_type, which os.statvfs does not expose,
    read from /proc/self/mountinfo)."""
    try:
        return mount_of(str(path))[1] == "tmpfs"
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class StorageRoot:
    """Where a backend's environments go, and the honest note when the backend fell back."""

    backend: StorageBackend
    path: Path
    note: str | None = None


def storage_root(backend: StorageBackend, config: Config) -> StorageRoot:
    if backend is StorageBackend.DISK:
        root = config.storage_root or cache_base(config) / "envs"
        return StorageRoot(backend, _mark_root(_private_dir(root)))
    shm = ROOT_SHM_DIR if _is_root() else Path(f"{ROOT_SHM_DIR}-{os.geteuid()}")
    if backend is StorageBackend.MEMORY:
        return StorageRoot(backend, _mark_root(_private_dir(shm)))
    candidate = runtime_dir() / "storage"
    _private_dir(candidate)
    if is_tmpfs(candidate):
        return StorageRoot(backend, _mark_root(candidate))
    # The runtime dir is not a tmpfs here (no systemd-logind, a container): /dev/shm is one.
    return StorageRoot(
        backend,
        _mark_root(_private_dir(shm)),
        note=f"tmpfs backend: {candidate.parent} is not a tmpfs on this host; using {shm}",
    )


def _mark_root(path: Path) -> Path:
    """Note in a storage root that gestvenv made it, so that cleanup under another config (or by
    the watchdog) may delete there too; a dir without the mark is never a root."""
    mark = path / ROOT_MARK
    if mark.exists():
        return path
    others = set(os.listdir(path)) - {ROOT_MARK}
    # Listed before looking at the mark again: a concurrent creator writes the mark before any
    # env dir, so an env dir seen here means the mark exists by now.
    if others and not mark.exists():
        raise ConfigError(
            f"storage root {path} already holds files that are not gestvenv's; give "
            "gestvenv a directory of its own (it deletes what it finds unclaimed there)")
    with contextlib.suppress(FileExistsError):
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write("gestvenv storage root: its <name>-<id> subdirectories are gestvenv's\n")
    return path


def all_roots(config: Config) -> list[Path]:
    """Every directory under which gestvenv may delete, for this user and config."""
    roots = []
    for backend in StorageBackend:
        try:
            roots.append(storage_root(backend, config).path)
        except GestvenvError:
            continue
    return list(dict.fromkeys(roots))


# --- claiming: an env dir names the state file that owns it ---

def create_whole(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create the file ``path`` holding ``data``, whole or not at all: an unnamed file
    (O_TMPFILE) linked into place once written, so that a process killed meanwhile leaves
    nothing, never a half-written file nor a temporary one. FileExistsError if ``path``
    exists; False, having done nothing, where its filesystem has no unnamed files."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=folder)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return False
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # (The way open(2) gives: linkat() of its /proc link, followed, which os.link
            # does when given a dir fd. No /proc: not linked, and nothing left.)
            try:
                os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder)
            except FileNotFoundError:
                if os.path.isdir("/proc/self/fd"):
                    raise
                return False
        finally:
            os.close(fd)
    finally:
        os.close(folder)
    return True


def claim_dir(path: Path, state_file: Path, env_id: str) -> None:
    """Create an environment's dir with a note of its owner, so any sweep can tell an orphan.
    The claim appears whole or not at all: a creator killed meanwhile leaves the dir empty
    (:func:`left_before_its_claim`), never with a claim no sweep can read."""
    path.mkdir(mode=0o755)
    if not create_whole(path / CLAIM, _claim(state_file, env_id)):
        write_claim(path, state_file, env_id)


def write_claim(path: Path, state_file: Path, env_id: str) -> None:
    """The claim in ``path`` (again on top of a filesystem of the env's own, once mounted)."""
    (path / CLAIM).write_bytes(_claim(state_file, env_id))


def _claim(state_file: Path, env_id: str) -> bytes:
    return json.dumps({"id": env_id, "state_file": str(state_file)}).encode()


# A claim or a state file is a few hundred bytes; what is bigger is not one.
_SMALL = 1 << 16


def _read_small(name: str | Path, dir_fd: int | None = None, *, owner: int | None = None) -> bytes:
    """A small regular file, read without following a link nor blocking (a FIFO planted in its
    place would hang the sweep), and only if ``owner`` owns it. OSError otherwise."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _SMALL:
            raise OSError(f"{name}: not a small regular file")
        if owner is not None and st.st_uid != owner:
            raise OSError(f"{name}: owned by uid {st.st_uid}, not {owner}")
        return os.read(fd, _SMALL + 1)
    finally:
        os.close(fd)


def claim_of(path: Path) -> tuple[str, str] | None:
    """The (env id, state file) an env dir's claim names; None without a claim to trust.

    Trusted: a small regular file of the sweeping user's own (an env whose commands run under
    a uid of their own can replace its claim, never forge one of its creator's), naming an id
    that the dir's own name ends with (:func:`env_dir_name`): a claim cannot speak for another
    environment's processes or state.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        claim = json.loads(_read_small(CLAIM, fd, owner=os.geteuid()))
        env_id, state_file = str(claim["id"]), str(claim["state_file"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
    if stem_of_env_dir(Path(path).name, env_id) is None:
        return None
    return env_id, state_file


def left_before_its_claim(path: Path) -> bool:
    """Whether ``path`` is a dir (not a link) that its creator left before its claim was
    whole: nothing in it, or nothing but a claim file of ours that does not read as one
    (half-written, where the filesystem has no O_TMPFILE)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        names = os.listdir(fd)
        if names and names != [CLAIM]:
            return False
        if names:
            st = os.stat(CLAIM, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return False
    except OSError:
        return False
    finally:
        os.close(fd)
    return claim_of(path) is None


def is_claimed(path: Path) -> bool | None:
    """True if the state file named in ``path``'s claim exists and holds the same id; None if
    the dir has no claim to trust (too young to have written one, not an env dir, or one its
    commands replaced)."""
    claim = claim_of(path)
    if claim is None:
        return None
    env_id, state_file = claim
    try:
        return names_env(json.loads(_read_small(state_file)), env_id)
    except (OSError, ValueError, AttributeError):
        return False


def check_env_dir(path: Path, stem: str, env_id: str) -> None:
    """Raise unless ``path`` can be the own dir of the environment whose units run under
    ``stem`` (its name, or its pool unit's): named :func:`env_dir_name` and, once claimed,
    claiming that id. A state file edited to point at another environment's dir (or anywhere
    else) is refused, not obeyed."""
    if Path(path).name != env_dir_name(stem, env_id):
        raise UnsafePathError(
            f"refusing to delete {path}: that environment lives in a dir named "
            f"{env_dir_name(stem, env_id)}; its state file was changed")
    claim = claim_of(path)  # (none, or not one to trust: a creator killed before writing it)
    if claim is not None and claim[0] != env_id:
        raise UnsafePathError(
            f"refusing to delete {path}: it belongs to environment {claim[0]!r}, not {env_id!r}")


def env_roots(path: Path, config: Config) -> list[Path]:
    """The roots under which an environment's ``path`` may be deleted: the configured ones, and
    its own parent if that dir carries gestvenv's root mark (a root from another config)."""
    roots = all_roots(config)
    parent = Path(os.path.abspath(path)).parent
    if is_marked_root(parent):
        roots.append(parent)
    return roots


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (hardlinked files counted once, links not followed); an
    env with a filesystem of its own (max_disk) is read from statvfs, at no cost."""
    return disk_used(path) or 0
