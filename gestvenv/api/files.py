"""Files in an environment's dir, for the API's upload and download: reached from the env's
dir component by component, never through a symlink, and only regular files.

The standard library only, and runnable as a script of its own: for a caller who is not the
service's user (a user of the system service), the service runs this file with
``/usr/bin/python3 -I -S`` as the caller's uid, handing it the env's dir as an open fd, so that
every permission on the way is checked as the caller, not as root. (Run as ``-c`` source: it
imports nothing of gestvenv's.)

    python3 -I -S -c "$(cat files.py)" put|get DIRFD PATH LIMIT
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TOO_LARGE = 3  # the exit status of a put past its limit
ABANDONED = 4  # ... and of one whose stream ended before its last frame


def frame(data: bytes) -> bytes:
    """One piece of an upload, as the helper reads it (``b""``: the end)."""
    return len(data).to_bytes(4, "big") + data


def _exactly(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def walk(dirfd: int, parts: list[str], *, create: bool, owner: int | None = None) -> int:
    """An fd of the dir holding ``parts[-1]``, from ``dirfd`` with O_NOFOLLOW at each step
    (ELOOP or ENOTDIR when a symlink or a non-dir is on the way); missing dirs made when
    ``create`` (and given to ``owner``: a sandboxed env's uid, which must write in them)."""
    fd = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR, dir_fd=fd)
                if owner is not None:
                    os.fchown(nxt, owner, owner)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(dirfd: int, parts: list[str]) -> int:
    """The file, for reading: opened without following a link and without blocking (a FIFO
    planted there must not hang us), refused unless it is a regular file."""
    folder = walk(dirfd, parts, create=False)
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=folder)
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file")
    os.set_blocking(fd, True)
    return fd


def open_upload(dirfd: int, parts: list[str], owner: int | None = None) -> tuple[int, int, str]:
    """(the dir's fd, a new file's fd, its name): the upload is written beside its target and
    renamed over it by :func:`commit`, so that a refused or abandoned upload leaves the file
    it would replace as it was, and a reader never sees half of it. What is at the target
    now must be a regular file (or nothing): a link, FIFO, device or dir is refused."""
    folder = walk(dirfd, parts, create=True, owner=owner)
    try:
        try:
            st = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "a directory")
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EPERM, "not a regular file")
        name = f".gestvenv-upload-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=folder)
        if owner is not None:
            os.fchown(fd, owner, owner)
    except BaseException:
        os.close(folder)
        raise
    return folder, fd, name


def commit(folder: int, name: str, target: str) -> None:
    os.rename(name, target, src_dir_fd=folder, dst_dir_fd=folder)


def abandon(folder: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=folder)


def _main(argv: list[str]) -> int:
    op, dirfd, path, limit = argv[0], int(argv[1]), argv[2], int(argv[3])
    parts = path.split("/")  # (checked by the service: gestvenv.api.protocol.relative_parts)
    try:
        if op == "get":
            fd = open_file(dirfd, parts)
            try:
                while chunk := os.read(fd, 1 << 16):
                    sys.stdout.buffer.write(chunk)
            finally:
                os.close(fd)
            return 0
        folder, fd, name = open_upload(dirfd, parts)
    except OSError as exc:
        sys.stderr.write(f"{exc.errno}\n")
        return 2
    try:
        written = 0
        # Framed (a 4-byte length before each piece, 0 at the end): a stream cut short (the
        # client gone) is abandoned, never committed as if it were the whole file.
        while (size := int.from_bytes(_exactly(4), "big")) > 0:
            chunk = _exactly(size)
            written += len(chunk)
            if written > limit:
                abandon(folder, name)
                return TOO_LARGE
            os.write(fd, chunk)
        os.close(fd)
        fd = -1
        commit(folder, name, parts[-1])
        return 0
    except EOFError:
        abandon(folder, name)
        return ABANDONED
    except OSError as exc:
        abandon(folder, name)
        sys.stderr.write(f"{exc.errno}\n")
        return 2
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(folder)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
