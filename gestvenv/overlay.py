"""A snapshot's site-packages shared with an env through an overlay mount, writes kept apart.

At process isolation an env's commands run under its creator's uid and can write its files, so
a clone of a package set's snapshot (templates.py) is a copy of every file: 3.7 MB and ~250 ms
for ``requests``, 166 MB and seconds for numpy + pandas on a filesystem without reflinks. For
a root creator an overlay gives the same write isolation without the copy: the snapshot's
site-packages is the read-only lower layer, a dir in the env's private dir the upper one, and
the merge is mounted on the env's site-packages. What the env writes (``pip install -U``, a
patched module) is copied up into its upper layer; the snapshot is never written through it.

The mount lives in the creator's mount namespace, which is where the env's commands run (its
children locally; PID 1's under systemd, hence :func:`chosen`'s same-namespace rule). It goes
with the env's dir: ``reaper.remove_tree`` unmounts what is mounted inside a dir before
deleting it, whoever removes it (destroy, the undo of a failed create, the reaper, a sweep).
A snapshot that is the lower layer of a live mount is never pruned: each clone leaves a lease in
it, under a shared lock on the snapshot that prune and store take exclusively (:func:`leased`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from . import reaper

# In the env's private dir (templates.PRIVATE_DIR): one <n>/upper and <n>/work per overlay.
OVERLAY_DIR = "overlay"
# In a snapshot: one file per env whose overlay has it as lower layer (its path inside).
LEASES = ".leases"
_MS_NOSUID, _MS_NODEV = 2, 4
# What an overlay's mount options cannot carry without escaping (lowerdir takes ":" lists).
_UNSAFE = frozenset(",:\\\n\t ")


def chosen(*, euid: int, sandboxed: bool, link_mode: str, runtime: str,
           same_mount_ns: bool) -> bool:
    """Whether an env's snapshot clone shares site-packages through an overlay.

    Only at process isolation (``sandboxed`` envs run under a uid of their own and get
    read-only hardlinks instead, which cost no mount), only for root (mounting needs
    CAP_SYS_ADMIN in the initial namespaces), only with ``link_mode`` "auto" ("copy" asks for
    files of the env's own), and under systemd only when the creator shares PID 1's mount
    namespace (the env's commands run there, and must see the mount)."""
    return (euid == 0 and not sandboxed and link_mode == "auto"
            and (runtime != "systemd" or same_mount_ns))


def same_mount_ns_as_init() -> bool:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return False


def options(lower: str, upper: str, work: str) -> str | None:
    """The overlay's mount options; None when a path holds a character they cannot carry."""
    if any(set(p) & _UNSAFE for p in (lower, upper, work)):
        return None
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def site_packages(template: Path) -> list[str]:
    """The site-packages dirs of a snapshot, relative to it (lib/pythonX.Y/site-packages)."""
    found = []
    lib = template / "lib"
    try:
        names = sorted(os.listdir(lib))
    except OSError:
        return []
    for name in names:
        rel = f"lib/{name}/site-packages"
        if name.startswith("python") and os.path.isdir(template / rel) \
                and not os.path.islink(template / rel):
            found.append(rel)
    return found


def mount(lower: Path, env_path: Path, rel: str, private: Path, index: int) -> bool:
    """Mount ``lower`` (a snapshot's ``rel``) over the env's ``rel``, what the env already has
    there (its venv's own files) becoming the upper layer. False, with the env as it was, when
    it cannot be done (no overlay, the kernel's refusal, a path the options cannot carry): the
    caller copies instead."""
    target = env_path / rel
    base = private / OVERLAY_DIR / str(index)
    upper, work = base / "upper", base / "work"
    opts = options(os.path.realpath(lower), str(upper), str(work))
    if opts is None or os.path.islink(target) or not target.is_dir():
        return False
    import ctypes  # (only here: a few ms, and only root at process isolation gets here)

    moved = False
    try:
        base.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        os.rename(target, upper)  # (same filesystem: the env's dir; its baseline files stay)
        moved = True
        os.mkdir(target)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"overlay", str(target).encode(), b"overlay", _MS_NOSUID | _MS_NODEV,
                      opts.encode()) == 0:
            return True
    except OSError:
        pass
    if moved:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        os.rename(upper, target)  # (if even this fails, the clone fails: a real install then)
    for leftover in (work, base, base.parent):
        with contextlib.suppress(OSError):
            os.rmdir(leftover)
    return False


def unmount(env_path: Path, rel: str, private: Path, index: int) -> None:
    """Undo :func:`mount`: the env's own files back where they were (a clone that failed
    after mounting, before the env was anyone's). Best effort, step by step: what is left is
    the env's dir's, removed with it (reaper.remove_tree unmounts first)."""
    target = env_path / rel
    base = private / OVERLAY_DIR / str(index)
    if not reaper.unmount(str(target)):
        return  # still mounted: never moved from under the mount
    with contextlib.suppress(OSError):
        os.rmdir(target)
        os.rename(base / "upper", target)
    for leftover in (base / "work" / "work", base / "work", base):
        with contextlib.suppress(OSError):
            os.rmdir(leftover)


def lease(snapshot: Path, env_path: Path) -> None:
    """Note in ``snapshot`` that ``env_path``'s overlay sits on it (see :func:`leased`)."""
    leases = snapshot / LEASES
    leases.mkdir(exist_ok=True)
    name = hashlib.sha256(str(env_path).encode()).hexdigest()[:32]
    (leases / name).write_text(str(env_path))


def leased(snapshot: Path, private: str) -> bool:
    """Whether an env's overlay may sit on ``snapshot``: a lease whose env still has its
    overlay dir (``<env>/<private>/overlay``). A file, not a look at mountinfo: the mount may be
    in another mount namespace than the sweep's, and its lowerdir spelled through a symlink.
    Leases of envs that are gone (destroyed, reaped, swept: their dir with them) are removed."""
    try:
        names = os.listdir(snapshot / LEASES)
    except OSError:
        return False
    held = False
    for name in names:
        path = snapshot / LEASES / name
        try:
            env = Path(path.read_text())
            if (env / private / OVERLAY_DIR).is_dir():
                held = True
                continue
            os.unlink(path)
        except OSError:
            continue
    return held
