"""Bearer tokens for the API over TCP: made here, shown once, stored hashed.

A token file holds one ``sha256:<hex>`` line per token (and comments): the service compares the
hash of what a caller sends, in constant time, and never holds a token itself. Pure but for
:func:`new_token`'s write.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "sha256:"


def hashed(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode()).hexdigest()


def parse(text: str) -> frozenset[str]:
    """The hashes of a token file; a line that is not one is an error (a token pasted there
    in clear would otherwise be taken, or silently ignored)."""
    found = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest = line.removeprefix(PREFIX)
        if not line.startswith(PREFIX) or len(digest) != 64 or \
                any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"line {number}: not a token hash ({PREFIX}<64 hex digits); "
                             "make tokens with `gestvenv serve --new-token FILE`")
        found.add(line)
    return frozenset(found)


def accepted(header: str | None, hashes: frozenset[str]) -> bool:
    """Whether an ``Authorization`` header carries a token whose hash is in ``hashes``."""
    if not header or not header.startswith("Bearer ") or not hashes:
        return False
    digest = hashed(header.removeprefix("Bearer ").strip())
    # Every hash compared, in constant time each: no early exit tells which one came close.
    return any([hmac.compare_digest(digest, known) for known in hashes])


def new_token(path: Path) -> str:
    """A new token, its hash appended to ``path`` (created 0600): the token is returned to be
    shown once, and is kept nowhere."""
    token = "gv_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(hashed(token) + "\n")
    return token
