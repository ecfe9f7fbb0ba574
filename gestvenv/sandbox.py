"""Who an environment's commands run as: the sandbox identity, decided without I/O.

A root creator's commands at namespace isolation or above never run as root: each environment
gets an unprivileged uid (and a gid of the same number) of its own, from a range no distribution
or systemd allocates (systemd's container range ends at 1879048191, its foreign range starts at
2147352576). The uid needs no passwd entry: systemd takes a numeric ``User=``, setpriv too. One
uid per environment, so that two environments cannot signal each other's processes or read each
other's files even where both are visible. The env's files are handed to it after each install
(:func:`hand_over_paths`), and gestvenv's reaper (root) deletes them as any other.

A non-root creator cannot switch uids: its commands keep its uid, inside a user namespace.
"""

from __future__ import annotations

from collections.abc import Collection

from .models import IsolationLevel

UID_BASE = 0x70000000   # 1879048192
UID_COUNT = 1 << 24     # up to 1895825407


def needs_own_uid(creator_uid: int, isolation_applied: IsolationLevel) -> bool:
    """Whether the env's commands get a uid of their own (root creators, namespace and above)."""
    return creator_uid == 0 and isolation_applied.rank >= IsolationLevel.NAMESPACE.rank


def uid_for(env_id: str, taken: Collection[int] = ()) -> int:
    """The env's sandbox uid: derived from its id (hex), stepping past uids ``taken`` by other
    live environments."""
    offset = int(env_id[:8], 16) % UID_COUNT
    for step in range(UID_COUNT):
        uid = UID_BASE + (offset + step) % UID_COUNT
        if uid not in taken:
            return uid
    raise RuntimeError("no sandbox uid left")  # 16M live environments


def is_sandbox_uid(uid: int) -> bool:
    return UID_BASE <= uid < UID_BASE + UID_COUNT
