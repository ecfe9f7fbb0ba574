"""Package sets installed once, then cloned into each new environment that asks for them.

``uv run --with`` reuses one cached environment per set of requirements; gestvenv gives every
caller a fresh environment, so it keeps instead a snapshot of what the first install added
(site-packages, scripts, data) and clones it: reflinks (copy-on-write clones) where the
filesystem has them, else copies, never hardlinks (an environment's in-place edit of an
installed file must not reach the snapshot nor any other environment); scripts are rewritten
for the new environment's interpreter. A snapshot is keyed by
everything that decides the resolution (interpreter, specs, requirements files' contents, index
settings, uv) and is used for ``template_ttl`` seconds, after which the set is resolved again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from . import overlay as overlays
from .diskcap import TEMP_NAMES
from .exceptions import GestvenvError
from .sandbox import shared_safe
from .storage import remove_tree

# Stands for the environment's interpreter in the scripts of a snapshot.
PLACEHOLDER = b"/@@gestvenv-env-python@@"
COMPLETE_MARK = ".gestvenv-template"  # in a snapshot: it is whole
_MARK = ".gestvenv-templates"
_KEY_RE = re.compile(r"[0-9a-f]{32}|\.tmp-[0-9a-f]{32}-[0-9a-f]{8}")
# The kernel reads at most this much of a "#!" line; longer paths need a /bin/sh preamble.
_MAX_SHEBANG = 127
# A requirement this simple resolves the same wherever it is read: a name, extras, version
# specifiers, markers. Paths, URLs and installer options (-r, -c, -e...) are not snapshotted.
_PLAIN_REQ = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[A-Za-z0-9._,\s-]*\])?\s*"
                        r"([<>=!~][^@/\\]*)?(;[^@/\\]*)?", re.ASCII)
_SH_PREAMBLE = b"#!/bin/sh\n'''exec'"
# In an environment's dir: what belongs to the environment alone (the pip shim's own uv
# cache), never part of a snapshot.
PRIVATE_DIR = ".gestvenv"
# ioctl(dst, FICLONE, src): dst becomes a copy-on-write clone of src (btrfs, XFS, bcachefs...).
_FICLONE = 0x40049409
# What a filesystem (or a pair of them) without reflinks answers: stop trying for this transfer.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
               errno.EPERM, errno.EBADF}


def snapshottable(packages: Sequence[str], requirements: Sequence[Path]) -> bool:
    """True if the set is named only by plain requirements (no local path, URL or option), so
    that the key below covers everything that decides what gets installed."""
    lines = list(packages)
    for path in requirements:
        for line in path.read_text().splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return all(_PLAIN_REQ.fullmatch(line.strip()) for line in lines)


def shebang(python: bytes) -> bytes:
    if len(python) + 2 <= _MAX_SHEBANG and b" " not in python:
        return b"#!" + python + b"\n"
    quoted = python.replace(b"'", b"'\"'\"'")
    return _SH_PREAMBLE + b" '" + quoted + b"' \"$0\" \"$@\"\n' '''\n"


def retarget(data: bytes, old: bytes, python: bytes) -> bytes | None:
    """``data`` re-headed for ``python`` if its header names interpreter ``old``, else None.

    A header is "#!/path/python" or, for long paths, the three-line /bin/sh "exec" preamble
    that uv and pip write (valid both as shell and as Python).
    """
    if not data.startswith(b"#!"):
        return None
    if data.startswith(_SH_PREAMBLE):
        lines = data.split(b"\n", 3)
        if len(lines) < 3 or old not in lines[1]:
            return None
        body = lines[3] if len(lines) > 3 else b""
    else:
        first, _, body = data.partition(b"\n")
        if old not in first:
            return None
    return shebang(python) + body


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def installer_part(name: str, path: str, env_prefix: str) -> dict[str, object]:
    """What of an installer decides what it installs, for :func:`template_key`: the tool (by
    path and mtime: an upgrade is a new key) and its own configuration by variable (indexes,
    pre-releases...), but for where its cache is. Named by the installer (``uv``, ``pip``): a
    set installed by one is never cloned for the other."""
    return {name: [path, _mtime(path)],
            f"{name}_env": sorted((k, v) for k, v in os.environ.items()
                                  if k.startswith(env_prefix) and k != f"{env_prefix}CACHE_DIR")}


def template_key(*, interpreter: str, version: str, installer: Mapping[str, object],
                 packages: Sequence[str], requirements: Sequence[Path],
                 settings: dict[str, object]) -> str:
    data = {
        "interpreter": [interpreter, version, _mtime(interpreter)],
        **installer,
        "packages": list(packages),
        "requirements": [hashlib.sha256(p.read_bytes()).hexdigest() for p in requirements],
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def walk(root: Path, *, topdown: bool = True,
         prune: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, str, bool]]:
    """(path relative to ``root``, full path, is a real directory) for everything below
    ``root``; symlinks are listed, never followed. Entries named in ``prune`` are left out,
    with all they hold (``topdown`` only): top-level names, and dirs by their relative path
    ("lib/python3.12/site-packages")."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=topdown):
        rel = os.path.relpath(dirpath, root)
        if prune and rel == ".":
            dirnames[:] = [d for d in dirnames if d not in prune]
            filenames = [f for f in filenames if f not in prune]
        elif prune:
            dirnames[:] = [d for d in dirnames if os.path.join(rel, d) not in prune]
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            is_dir = name in dirnames and not os.path.islink(path)
            yield os.path.normpath(os.path.join(rel, name)), path, is_dir


def snapshot_baseline(env_path: Path) -> set[str]:
    """Relative paths present before an install: what the snapshot leaves out."""
    return {relname for relname, _, _ in walk(env_path)}


def _is_script(rel: str, path: str) -> bool:
    if not rel.startswith("bin" + os.sep):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _retargeted(path: str, old: bytes, new: bytes) -> bytes | None:
    with open(path, "rb") as f:
        return retarget(f.read(), old, new)


class Copier:
    """Copies files, never links them: each copy is an inode of its own, so writing one never
    changes another. ``reflink``: try a copy-on-write clone first (FICLONE), then the kernel's
    copy_file_range (which may clone too, on btrfs/XFS), else sendfile; without it, sendfile
    only (a byte copy). Mode bits and times are kept (times: so that the .pyc files copied
    alongside stay valid). What fails once is not tried again for the rest of the transfer."""

    def __init__(self, *, reflink: bool, share_read_only: bool = False) -> None:
        self.reflink = reflink
        self.range = reflink
        # Hardlink what the env's commands cannot write (sandbox.shared_safe), for an env whose
        # commands run under a uid of their own: then a link holds as a copy does.
        self.share = share_read_only
        self.reflinked = self.copied = self.linked = 0

    def copy(self, src: str, dst: str) -> None:
        fsrc = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fsrc)
            if self.share and shared_safe(st):
                try:
                    os.link(src, dst, follow_symlinks=False)
                    self.linked += 1
                    return
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    self.share = False  # another filesystem: copies from now on
            fdst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                           | os.O_NOFOLLOW, 0o600)
            try:
                if st.st_size:
                    self._data(fsrc, fdst, st.st_size)
                os.fchmod(fdst, stat.S_IMODE(st.st_mode))
                os.utime(fdst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fdst)
        finally:
            os.close(fsrc)

    def _data(self, fsrc: int, fdst: int, size: int) -> None:
        if self.reflink:
            try:
                fcntl.ioctl(fdst, _FICLONE, fsrc)
                self.reflinked += 1
                return
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                self.reflink = False
        self.copied += 1
        done = 0
        if self.range:
            try:
                while done < size:
                    n = os.copy_file_range(fsrc, fdst, size - done)
                    if n == 0:
                        return  # shrunk meanwhile
                    done += n
                return
            except OSError as exc:
                if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                                             errno.EINVAL):
                    raise
                self.range = False
        while done < size:
            n = os.sendfile(fdst, fsrc, done, size - done)
            if n == 0:
                return
            done += n


def _transfer(src_root: Path, dst_root: Path, *, skip: set[str], replace: tuple[bytes, bytes],
              reflink: bool, share_read_only: bool = False,
              shared: frozenset[str] = frozenset()) -> tuple[int, int]:
    """Recreate ``src_root``'s tree under ``dst_root``, minus the relative paths in ``skip``
    and the environment's private dir: directories made, symlinks recreated, scripts in bin/
    rewritten (``replace``: the interpreter's path for the placeholder or back), other files
    copied (reflinked when ``reflink`` and the filesystem allow); hardlinked only with
    ``share_read_only``, where the target's commands cannot write them (see Copier). The
    dirs in ``shared`` (relative) are left out: an overlay already shows them (overlay.py).
    Returns (files, bytes) transferred."""
    copier = Copier(reflink=reflink, share_read_only=share_read_only)
    old, new = replace
    files = nbytes = 0
    for relname, src, is_dir in walk(src_root, prune={PRIVATE_DIR, overlays.LEASES,
                                                      *TEMP_NAMES.values(), *shared}):
        dst = os.path.join(dst_root, relname)
        if is_dir:
            os.makedirs(dst, exist_ok=True)  # also a skipped dir: it may hold new files
            continue
        if relname in skip:
            continue
        files += 1
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif _is_script(relname, src) and (data := _retargeted(src, old, new)) is not None:
            with open(dst, "wb") as f:
                f.write(data)
            os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode))
            nbytes += len(data)
        else:
            copier.copy(src, dst)
            nbytes += os.lstat(dst).st_size
    return files, nbytes


@contextlib.contextmanager
def _locked(snapshot: Path, *, exclusive: bool) -> Iterator[bool | None]:
    """Hold a snapshot's lock (a flock on its completion mark): shared while a clone leases
    and mounts it, exclusive while prune or store removes it, so that no removal falls between
    a clone's lookup and its mount. Yields whether the snapshot is still whole (False: removed
    meanwhile); a snapshot without its mark (being removed) yields False to a clone and True
    to a removal; an exclusive lock that another holds yields None at once (never waits: a
    sweep goes on)."""
    try:
        fd = os.open(snapshot / COMPLETE_MARK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        yield exclusive  # (no mark: nothing clones it; removable)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            yield None
            return
        yield os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def reading(snapshot: Path) -> Iterator[None]:
    """Hold ``snapshot`` whole while it is read (a clone, a container image's layer): a
    removal (prune, or a store replacing a stale snapshot) never runs meanwhile. A walk of a
    snapshot being removed sees only what is left: silently partial (CI: an env with requests
    and without urllib3). FileNotFoundError if it was removed since its lookup."""
    with _locked(snapshot, exclusive=False) as whole:
        if not whole:
            raise FileNotFoundError(errno.ENOENT, "package-set snapshot removed meanwhile",
                                    str(snapshot))
        yield


class TemplateCache:
    def __init__(self, root: Path, max_age: int, *, reflink: bool = True) -> None:
        self.root = root
        self.max_age = max_age
        # True (link_mode "auto"): reflinks where the filesystem has them, else copies;
        # False ("copy"): byte copies. Never hardlinks, in either direction.
        self.reflink = reflink

    def _usable_root(self) -> bool:
        """Create the snapshots dir, marked as gestvenv's; a dir of that name that is not ours
        (unmarked, with files) is never written to nor pruned."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            mark = self.root / _MARK
            if mark.exists():
                return True
            if any(n != _MARK for n in os.listdir(self.root)):
                return mark.exists()
            mark.write_text("gestvenv package-set snapshots; safe to delete\n")
            return True
        except OSError:
            return False

    def lookup(self, key: str) -> Path | None:
        if self.max_age <= 0:
            return None
        path = self.root / key
        try:
            made = (path / COMPLETE_MARK).stat().st_mtime
        except OSError:
            return None
        return path if time.time() - made < self.max_age else None

    @staticmethod
    def contents(template: Path) -> tuple[int, int] | None:
        """(files, bytes) a snapshot holds, as stored with it (None: not recorded)."""
        try:
            made = json.loads((template / COMPLETE_MARK).read_text())
            return int(made["files"]), int(made["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def clone(self, template: Path, env_path: Path, *, share_read_only: bool = False,
              overlay: bool = False) -> None:
        """Recreate the snapshot's files in ``env_path``. With ``overlay`` (overlay.chosen),
        its site-packages are mounted rather than copied, where the kernel agrees. A failure
        leaves no mount behind. The whole clone, copy included, is :func:`reading` the
        snapshot (removed since its lookup: FileNotFoundError, and the builder installs for
        real)."""
        python = str(env_path / "bin" / "python").encode()
        mounted: list[tuple[int, str]] = []
        with reading(template):
            try:
                if overlay:
                    for index, rel in enumerate(overlays.site_packages(template)):
                        if overlays.mount(template / rel, env_path, rel,
                                          env_path / PRIVATE_DIR, index):
                            mounted.append((index, rel))
                    if mounted:
                        overlays.lease(template, env_path)
                _transfer(template, env_path, skip={COMPLETE_MARK},
                          replace=(PLACEHOLDER, python), reflink=self.reflink,
                          share_read_only=share_read_only,
                          shared=frozenset(rel for _, rel in mounted))
            except BaseException:
                for index, rel in reversed(mounted):
                    overlays.unmount(env_path, rel, env_path / PRIVATE_DIR, index)
                raise

    def store(self, key: str, env_path: Path, baseline: set[str]) -> None:
        """Snapshot what an install added to ``env_path``; a concurrent twin may win, fine."""
        if self.max_age <= 0 or not self._usable_root():
            return
        python = str(env_path / "bin" / "python").encode()
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files, nbytes = _transfer(env_path, tmp, skip=baseline,
                                      replace=(python, PLACEHOLDER), reflink=self.reflink)
            # (What it holds: said when it is cloned, without a walk.)
            (tmp / COMPLETE_MARK).write_text(json.dumps({"created": time.time(),
                                                         "files": files, "bytes": nbytes}))
            final = self.root / key
            if self.lookup(key) is not None:
                return  # a twin's, stored first and fresh: kept (ours is the same set)
            # Stale (past max_age): replaced, unless a clone reads it or a live env's overlay
            # sits on it.
            if final.exists() and not self._remove_unleased(final):
                return
            os.rename(tmp, final)
        except OSError:
            # Not having a snapshot only costs speed; never fail the environment for it.
            pass
        finally:
            if tmp.exists():
                self._remove(tmp)

    def live_keys(self) -> set[str]:
        """The keys of the snapshots still in use (within their age)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return set()
        return {n for n in names if not n.startswith(".") and _KEY_RE.fullmatch(n)
                and self.lookup(n) is not None}

    def prune(self) -> list[str]:
        """Remove snapshots past their age and leftovers of interrupted stores."""
        removed: list[str] = []
        if not (self.root / _MARK).exists():
            return removed  # not a dir gestvenv made: nothing in it is ours to remove
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return removed
        now = time.time()
        for entry in entries:
            if not _KEY_RE.fullmatch(entry.name):
                continue
            try:
                if entry.name.startswith(".tmp-"):
                    if now - entry.stat(follow_symlinks=False).st_mtime > 3600:
                        remove_tree(Path(entry.path), [self.root])
                        removed.append(entry.path)
                elif self.lookup(entry.name) is None \
                        and self._remove_unleased(Path(entry.path)):
                    # (Past its age but the lower layer of a live env's overlay: kept until
                    # that env is gone, and pruned by a later sweep.)
                    removed.append(entry.path)
            except (OSError, GestvenvError):
                continue
        return removed

    def _remove_unleased(self, snapshot: Path) -> bool:
        """Remove a snapshot no env's overlay sits on; False (kept) if one does, or if a clone
        holds it this instant."""
        with _locked(snapshot, exclusive=True) as whole:
            if not whole:
                return False  # (a clone is reading it; or another removal was first)
            if overlays.leased(snapshot, PRIVATE_DIR):
                return False
            remove_tree(snapshot, [self.root])
            return True

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            remove_tree(path, [self.root])
