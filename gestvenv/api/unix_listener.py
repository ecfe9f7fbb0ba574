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

The temporary name is bound through ``/proc/self/fd/N/``: its length does not depend on the
directory's, so a path that fits ``sun_path`` always binds.
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
from collections.abc import Iterator
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
    """A listening socket published at ``path``. ``pin`` is an ``O_PATH`` descriptor of the
    socket's file: it keeps that inode allocated, so a later file at ``path`` cannot reuse
    its number (ext4 reuses a freed one at once), and :meth:`remove` tells ours by it."""

    sock: socket.socket
    path: str
    pin: int

    def remove(self) -> None:
        """Unlink the path if it still names this socket (a later service may have replaced
        it once this one stopped listening); the socket itself is closed elsewhere."""
        if self.pin < 0:
            return
        directory, name = _split(self.path)
        try:
            ours = os.fstat(self.pin)
            with _locked(directory) as dfd:
                st = os.lstat(name, dir_fd=dfd)
                if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                    os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass  # removed already, or its directory
        except OSError as exc:
            raise GestvenvError(f"{self.path}: not removed: {exc.strerror}") from None
        finally:
            os.close(self.pin)
            self.pin = -1


def listen_unix(path: str, mode: int = 0o600, backlog: int = 128) -> UnixListener:
    """A listening unix socket at ``path``, mode ``mode``. A stale socket there (its service
    gone) is replaced; a live one, or anything that is not a socket, is refused."""
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise GestvenvError(f"{path}: a unix socket's path is at most {MAX_PATH_BYTES} bytes "
                            f"(this one is {size})")
    directory, name = _split(path)
    if name in ("", ".", "..") or name.startswith(BINDING_PREFIX):
        raise GestvenvError(f"{path}: not a name for a socket")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with _locked(directory) as dfd:
            return _publish(path, name, mode, backlog, dfd)
    except OSError as exc:
        raise GestvenvError(f"{path}: cannot listen there: {exc.strerror}") from None


def _publish(path: str, name: str, mode: int, backlog: int, dfd: int) -> UnixListener:
    """Under the directory's lock: bound under a temporary name, listening, then linked."""
    _sweep_unpublished(dfd)
    _clear_stale(path, name, dfd)
    temporary = BINDING_PREFIX + secrets.token_hex(8)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(f"/proc/self/fd/{dfd}/{temporary}")
        finally:
            os.umask(old)
        pin = -1
        try:
            pin = os.open(temporary, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.chmod(temporary, mode, dir_fd=dfd)
            sock.listen(backlog)
            try:
                os.link(temporary, name, src_dir_fd=dfd, dst_dir_fd=dfd,
                        follow_symlinks=False)
            except FileExistsError:
                # Nothing was there under the lock: a program that does not take it.
                raise GestvenvError(f"{path}: something else was put there while the "
                                    "service bound it: not replaced") from None
        except BaseException:
            if pin >= 0:
                os.close(pin)
            raise
        finally:
            os.unlink(temporary, dir_fd=dfd)
    except BaseException:
        sock.close()
        raise
    return UnixListener(sock, path, pin)


def _split(path: str) -> tuple[str, str]:
    directory, name = os.path.split(path)
    return directory or ".", name


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[int]:
    """The directory, open and exclusively locked (flock: released if its holder dies). A
    holder keeps it for microseconds; one that keeps it longer (any user who may read a shared
    directory can take it) is waited for ``LOCK_WAIT`` seconds, then refused."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise GestvenvError(f"{directory}: another process holds its lock "
                                        f"(flock) for over {LOCK_WAIT:g} s") from None
                time.sleep(0.01)
        yield dfd
    finally:
        os.close(dfd)


def _sweep_unpublished(dfd: int) -> None:
    """This user's sockets left between bind and link by a service killed there."""
    for entry in os.listdir(dfd):
        if entry.startswith(BINDING_PREFIX):
            with contextlib.suppress(OSError):
                st = os.lstat(entry, dir_fd=dfd)
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
                    os.unlink(entry, dir_fd=dfd)


def _clear_stale(path: str, name: str, dfd: int) -> None:
    """Nothing at ``name``, or a stale socket removed; anything else refused."""
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise GestvenvError(f"{path} exists and is not a socket: not replaced")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live service with a full backlog: EAGAIN, not a wait
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(name, dir_fd=dfd)  # nothing listens: its service is gone
        return
    except BlockingIOError:
        pass
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            raise GestvenvError(f"{path}: cannot tell whether a service listens there "
                                f"({exc.strerror}): not replaced") from None
    finally:
        probe.close()
    raise GestvenvError(f"{path}: a service already listens there")
