"""The unix socket ``gestvenv serve`` binds itself: at its path only once it listens, and
removed at exit only if that path still names it.

Why: ``bind()`` makes the path before ``listen()``. A client that waits for the path to appear
(a script, the docs' own examples, a test) and connects in between is refused
(``ECONNREFUSED``); a CI run found it. And a second service probing the path then would take
the live socket for a stale one and unlink it. So the socket is bound under a temporary name in
the same directory, given its mode and made to listen, then linked at its path (``link(2)``
fails if anything is there). Every look at, replacement or removal of the path is made under
an exclusive lock on the directory, which each ``gestvenv serve`` takes for a few
microseconds: a socket found there that refuses connections is then really a stale one.

Everything goes through one descriptor of the directory, kept for the service's life: the
check, the unlink and the link name the same entry whatever renames or ``chdir`` happen, and
the exit's removal finds the directory a relative path named at the start. A socket found at
the path is opened (``O_PATH``) and probed through that descriptor, and unlinked only if the
path still names it. The directory must be readable, for its lock (else: refused).

The temporary name is bound by the directory's absolute path, so that ``ss -xlp`` shows where
the service is (as ``.gestvenv-binding-<hex>``: a socket's address is fixed at ``bind()``);
where that would not fit ``sun_path``, through ``/proc/self/fd/N/``, whose length does not
depend on the directory's: a path that fits always binds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..exceptions import GestvenvError

#: ``sun_path`` holds 108 bytes with its NUL: a longer path can be neither bound nor reached.
MAX_PATH_BYTES = 107
#: Sockets bound but not yet published start so. Under the directory's lock none is being
#: published, so any found then was left by a service killed in between: removed.
BINDING_PREFIX = ".gestvenv-binding-"
#: How long a service waits for the directory's lock.
LOCK_WAIT = 5.0


@dataclass
class UnixListener:
    """A listening socket published at ``path`` (as given). ``directory`` is a descriptor of
    its directory; ``pin`` an ``O_PATH`` one of the socket's file: it keeps that inode
    allocated, so a later file at the path cannot reuse its number (ext4 reuses a freed one at
    once), and :meth:`remove` tells ours by it."""

    sock: socket.socket
    path: str
    directory: int
    pin: int
    #: An ``O_PATH`` descriptor of the directory above, if this start made ``directory``.
    made_in: int = -1

    def remove(self) -> None:
        """Unlink the path if it still names this socket (a later service may have replaced
        it once this one stopped listening), and the directory if this start made it and it
        is empty; the socket itself is closed elsewhere. The lock is waited for, then done
        without: a user who holds a shared directory's lock must not keep the socket there."""
        if self.pin < 0:
            return
        try:
            with _locked(self.directory, self.path, or_unlocked=True):
                _unlink_if_same(os.path.basename(self.path), self.directory,
                                os.fstat(self.pin))
                if self.made_in >= 0:  # (under the lock: a service starting there waits)
                    with contextlib.suppress(OSError):  # (not empty: something else is there)
                        _unlink_if_same(os.path.basename(os.path.dirname(self.path)),
                                        self.made_in, os.fstat(self.directory),
                                        remove=os.rmdir)
        except OSError as exc:
            raise GestvenvError(f"{self.path}: not removed: {exc.strerror}") from None
        finally:
            for fd in (self.pin, self.directory, self.made_in):
                if fd >= 0:
                    os.close(fd)
            self.pin = self.directory = self.made_in = -1


def listen_unix(path: str, mode: int = 0o600, backlog: int = 128) -> UnixListener:
    """A listening unix socket at ``path``, mode ``mode``. A stale socket there (its service
    gone) is replaced; a live one, or anything that is not a socket, is refused."""
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise GestvenvError(f"{path!r}: not a path this system can name") from None
    if b"\0" in encoded:
        raise GestvenvError(f"{path!r}: a path has no NUL byte")
    if len(encoded) > MAX_PATH_BYTES:
        raise GestvenvError(f"{path}: a unix socket's path is at most {MAX_PATH_BYTES} bytes "
                            f"(this one is {len(encoded)})")
    directory, name = os.path.split(path)
    directory = directory or "."
    if name in ("", ".", "..") or name.startswith(BINDING_PREFIX):
        raise GestvenvError(f"{path}: not a name for a socket")
    made = False
    made_in = dfd = -1
    try:
        if not os.path.isdir(directory):
            os.mkdir(directory, mode=0o700)  # the leaf only: its parent must exist
            made = True
            made_in = os.open(os.path.dirname(os.path.normpath(directory)) or ".",
                              os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        dfd = _open_directory(directory)
        with _locked(dfd, directory):
            if os.fstat(dfd).st_nlink == 0:  # removed by a service's exit as this one started
                raise GestvenvError(f"{directory} was removed as the service started (another "
                                    "service's exit): start it again")
            sock, pin = _publish(path, name, mode, backlog, dfd, directory)
    except BaseException as exc:
        for fd in (dfd, made_in):
            if fd >= 0:
                os.close(fd)
        _undo_directory(directory, made)
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and dfd < 0:
            raise GestvenvError(f"{directory}: not a directory") from None
        if isinstance(exc, OSError):
            raise GestvenvError(f"{path}: cannot listen there: {exc.strerror}") from None
        raise
    return UnixListener(sock, path, dfd, pin, made_in)


def _open_directory(directory: str) -> int:
    """Read access, for its lock."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise
        raise GestvenvError(f"{directory}: this user may write there but not read it, so it "
                            "cannot take its lock: put the socket in a directory of its "
                            "own") from None


def _undo_directory(directory: str, made: bool) -> None:
    """The directory this start made, removed if the start failed (empty: rmdir)."""
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _publish(path: str, name: str, mode: int, backlog: int, dfd: int,
             directory: str) -> tuple[socket.socket, int]:
    """Under the directory's lock: bound under a temporary name, listening, then linked. On
    any failure nothing of it is left: not the temporary name, not the path, not a fd."""
    _sweep_unpublished(dfd)
    _clear_stale(path, name, dfd)
    temporary = BINDING_PREFIX + secrets.token_hex(8)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pin = -1
    published = False
    try:
        try:
            pin = _bind_listening(sock, dfd, directory, temporary, mode, backlog)
            try:
                os.link(temporary, name, src_dir_fd=dfd, dst_dir_fd=dfd,
                        follow_symlinks=False)
            except FileExistsError:
                # Nothing was there under the lock: a program that does not take it.
                raise GestvenvError(f"{path}: something else was put there while the "
                                    "service bound it: not replaced") from None
            published = True
        finally:
            if pin >= 0:  # (a socket bound but not pinned: the next start sweeps it)
                _unlink_if_same(temporary, dfd, os.fstat(pin))
    except BaseException:
        if pin >= 0:
            if published:
                with contextlib.suppress(OSError):
                    _unlink_if_same(name, dfd, os.fstat(pin))
            os.close(pin)
        sock.close()
        raise
    return sock, pin


def _bind_listening(sock: socket.socket, dfd: int, directory: str, temporary: str,
                    mode: int, backlog: int) -> int:
    """``sock`` bound at ``temporary``, given ``mode`` and listening; returns its pin. No
    umask games (they are the whole process's): until listen() nothing can connect, and the
    mode is set before it."""
    sock.bind(_bind_address(dfd, directory, temporary))
    try:
        pin = os.open(temporary, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):  # (a random name, made just now, under the lock)
            os.unlink(temporary, dir_fd=dfd)
        raise
    try:
        os.chmod(temporary, mode, dir_fd=dfd)
        sock.listen(backlog)
    except BaseException:
        with contextlib.suppress(OSError):
            _unlink_if_same(temporary, dfd, os.fstat(pin))
        os.close(pin)
        raise
    return pin


def _bind_address(dfd: int, directory: str, temporary: str) -> str:
    """The temporary name by the directory's absolute path (what ``ss`` will show) if it fits
    ``sun_path``, else through the descriptor."""
    try:
        where = os.readlink(f"/proc/self/fd/{dfd}")  # the directory as it is now
    except OSError:
        where = os.path.abspath(directory)  # (no /proc)
    address = os.path.join(where, temporary)
    if len(os.fsencode(address)) <= MAX_PATH_BYTES:
        return address
    return f"/proc/self/fd/{dfd}/{temporary}"


def _unlink_if_same(name: str, dfd: int, ours: os.stat_result, *,
                    remove: Callable[..., None] = os.unlink) -> None:
    """Unlink ``name`` (or ``remove`` it: os.rmdir) if it is the file ``ours`` (by device
    and inode)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(name, dir_fd=dfd)
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            remove(name, dir_fd=dfd)


@contextlib.contextmanager
def _locked(dfd: int, where: str, *, or_unlocked: bool = False) -> Iterator[None]:
    """The directory exclusively locked (flock: released if its holder dies). A holder keeps
    it for microseconds; one that keeps it longer (any user who may read a shared directory
    can take it) is waited for ``LOCK_WAIT`` seconds, then refused, or gone on without
    (``or_unlocked``)."""
    deadline = time.monotonic() + LOCK_WAIT
    held = False
    while not held:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                if or_unlocked:
                    break
                raise GestvenvError(f"{where}: another process holds its directory's lock "
                                    f"(flock) for over {LOCK_WAIT:g} s: put the socket in "
                                    "a directory of its own") from None
            time.sleep(0.01)
    try:
        yield
    finally:
        if held:
            fcntl.flock(dfd, fcntl.LOCK_UN)


def _sweep_unpublished(dfd: int) -> None:
    """This user's sockets left between bind and link by a service killed there."""
    for entry in os.listdir(dfd):
        if entry.startswith(BINDING_PREFIX):
            with contextlib.suppress(OSError):
                st = os.lstat(entry, dir_fd=dfd)
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
                    os.unlink(entry, dir_fd=dfd)


def _clear_stale(path: str, name: str, dfd: int) -> None:
    """Nothing at ``name``, or a stale socket removed; anything else refused. The entry is
    opened once and probed through that descriptor: what is unlinked is what was probed."""
    try:
        entry = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return
    try:
        st = os.fstat(entry)
        if not stat.S_ISSOCK(st.st_mode):
            raise GestvenvError(f"{path} exists and is not a socket: not replaced")
        if _listens(path, entry):
            raise GestvenvError(f"{path}: a service already listens there")
        _unlink_if_same(name, dfd, st)  # its service is gone
    finally:
        os.close(entry)


def _listens(path: str, entry: int) -> bool:
    """Whether a service listens on the socket ``entry`` (an ``O_PATH`` descriptor) is."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live service with a full backlog: EAGAIN, not a wait
    try:
        try:
            probe.connect(f"/proc/self/fd/{entry}")
        except FileNotFoundError:  # no /proc: by its path, which names it under the lock
            probe.connect(path)
    except ConnectionRefusedError:
        return False
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        raise GestvenvError(f"{path}: cannot tell whether a service listens there "
                            f"({exc.strerror}): not replaced") from None
    finally:
        probe.close()
    return True
