"""Who an environment's commands run as, and what their sandbox hides and shows.

A root creator's commands at namespace isolation or above never run as root: each environment
gets an unprivileged uid (and a gid of the same number) of its own, from a range no distribution
or systemd allocates (systemd's container range ends at 1879048191, its foreign range starts at
2147352576). The uid needs no passwd entry: ``setpriv`` switches to it (systemd 252 refuses a
numeric ``User=`` without one). One uid per environment, so that two environments cannot signal
each other's processes or read each other's files even where both are visible. What the creator
wrote at creation is handed to that uid once, before any of the env's code runs
(:func:`hand_over`); gestvenv's reaper (root) deletes it as any other file.

A non-root creator cannot switch uids: its commands keep its uid, inside a user namespace.
The decisions here are pure functions; :func:`hand_over` is the one that writes.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from . import diskcap
from .models import IsolationLevel
from .reaper import CLAIM

UID_BASE = 0x70000000   # 1879048192
UID_COUNT = 1 << 24     # up to 1895825407


def needs_own_uid(creator_uid: int, isolation_applied: IsolationLevel) -> bool:
    """Whether the env's commands get a uid of their own (root creators, namespace and above)."""
    return creator_uid == 0 and isolation_applied.sandboxed


def uid_for(env_id: str, taken: Collection[int] = ()) -> int:
    """The env's sandbox uid: derived from its id (hex), stepping past uids ``taken`` by other
    live environments."""
    offset = int(env_id[:8], 16) % UID_COUNT
    for step in range(UID_COUNT):
        uid = UID_BASE + (offset + step) % UID_COUNT
        if uid not in taken:
            return uid
    raise RuntimeError("no sandbox uid left")  # 16M live environments


# Trees a sandbox hides wholesale (homes, private /tmp and /dev/shm): what a command needs from
# below them (the interpreter, uv) is bound back read-only.
HIDDEN_TREES = ("/home", "/root", "/run/user", "/tmp", "/var/tmp", "/dev/shm")


def is_hidden(path: str) -> bool:
    """Whether a sandbox at namespace isolation or above hides ``path`` (see HIDDEN_TREES)."""
    return any(_under(path, tree) for tree in HIDDEN_TREES)


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def visible(path: str, env_path: str, hide: Iterable[str] = (),
            expose: Iterable[str] = ()) -> bool:
    """Whether ``path`` is the same file inside a namespace sandbox as outside: the env's dir
    and what is exposed are; the hidden trees and gestvenv's hidden dirs are not."""
    path = os.path.normpath(path)
    if _under(path, env_path) or any(_under(path, e) for e in expose):
        return True
    return not any(_under(path, tree) for tree in (*HIDDEN_TREES, *hide))


def command_cwd(requested: str | None, current: str, env_path: str,
                seen: Callable[[str], bool]) -> str:
    """Where a sandboxed command starts: where the caller asked; without a request, the
    caller's own working directory where the sandbox shows it, else the env's dir (a home, a
    private /tmp). An explicit cwd the sandbox hides is the caller's error, said by the runtime."""
    if requested is not None:
        return os.path.abspath(requested)
    return current if seen(current) else env_path


def interpreter_prefix(interpreter: str) -> str:
    """The installation an interpreter belongs to: /root/.pyenv/versions/3.11.7 for its
    bin/python3.11 (its lib/ is needed too), the interpreter's own dir otherwise."""
    real = os.path.realpath(interpreter)
    bin_dir = os.path.dirname(real)
    return os.path.dirname(bin_dir) if os.path.basename(bin_dir) == "bin" else bin_dir


def sandbox_paths(interpreter: str, tools: Iterable[str],
                  gestvenv_dirs: Iterable[str]) -> tuple[list[str], list[str]]:
    """(dirs to hide, paths to expose read-only) for an env's sandbox.

    Hidden: gestvenv's own dirs (the shared cache, the snapshots, the storage roots and the
    state files) unless a hidden tree covers them already; the env's own dir is bound back over
    them by the runtime. Exposed: the interpreter's prefix (its ``bin/python`` links to it) and
    gestvenv's tools (uv, for the env's pip, by its path and by its target) where a hidden tree
    would take them away.
    """
    hide = [d for d in dict.fromkeys(gestvenv_dirs) if not is_hidden(d)]
    wanted = [interpreter_prefix(interpreter)]
    for tool in tools:
        wanted += [os.path.abspath(tool), os.path.realpath(tool)]
    return hide, [p for p in dict.fromkeys(wanted) if is_hidden(p)]


# What holds the shared files of such an env (Enforcement.protections["shared_files"]).
SHARED_FILES_OWN_UID = (
    "installed files are hardlinks of the cache and snapshots that are root's and read-only to "
    "the env's uid (an edit in place fails: EACCES; a file replaced is the env's own), or "
    "copies; the cache and snapshots are hidden")
# Every other env: what the creator's uid can write is never shared with anything else.
SHARED_FILES_COPIES = (
    "installed files are copies or reflinks, never hardlinks, of the cache and snapshots; a "
    "root creator's clone at process isolation (link_mode auto) has the snapshot's "
    "site-packages as the read-only lower layer of an overlay, the env's writes going to its "
    "own upper layer")


def shared_safe(st: os.stat_result) -> bool:
    """Whether a file may stay shared (a hardlink of the cache's or a snapshot's) in an env whose
    commands run under a uid of their own: root's, writable by root alone, no setuid/setgid
    bit. Such a file cannot be changed in place by the env (EACCES); the env may still replace
    it with a file of its own, which reaches nothing shared."""
    return (stat.S_ISREG(st.st_mode) and st.st_uid == 0
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID))


def hand_over(path: Path, uid: int, keep: Collection[str] = ()) -> None:
    """Give the env's files to its sandbox uid (after its root creator wrote them): its
    commands can then change their own env, and only it. Called once, at creation, before any
    of the env's code has run (``InsideInstaller.hand_over``): done while its code runs, each
    decision here (by name, in dirs the env writes) could be raced.

    The env's top dir stays root's, world-writable and sticky (1777, as /tmp; nobody else
    can reach it: the storage root is root's 0700 and hidden from other envs): the env's
    commands can create there, but neither replace nor remove what is root's (gestvenv's claim,
    in ``keep``). Files shared with the cache or a snapshot (hardlinks) stay root's where that
    holds (:func:`shared_safe`); any other is first made a file of the env's own. The walk goes
    by directory descriptors (``os.fwalk``) and never follows a link, so root changes owners
    inside the env's dir and nowhere else.
    """
    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(top, 0o1777)
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top):
            for name in (*dirnames, *filenames):
                if dirpath == "." and name in keep:
                    continue
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    if shared_safe(st):
                        continue
                    _unshare(name, dirfd, st)
                os.chown(name, uid, uid, dir_fd=dirfd, follow_symlinks=False)
    finally:
        os.close(top)


def _unshare(name: str, dirfd: int, st: os.stat_result) -> None:
    """Replace a shared file by a copy of its own, by descriptor (never through a link)."""
    tmp = f".gestvenv-own-{secrets.token_hex(8)}"
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                      dir_fd=dirfd)
        try:
            while os.sendfile(dst, src, None, 1 << 20):
                pass
            os.fchmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)


def hand_over_env(path: str, uid: int | None) -> None:
    """At creation, by a root creator: the env's files (but its claim) to its sandbox uid."""
    if uid is not None:
        # (Its temp dirs, if it has a cap, stay its creator's: they are bound over /tmp.)
        hand_over(Path(path), uid, keep=(CLAIM, *diskcap.TEMP_NAMES.values()))
