"""Extending an environment's TTL: the rules, without I/O.

An environment's end at its TTL is systemd's to guarantee (its unit's RuntimeMaxSec), and a
running transient service's RuntimeMaxSec cannot be changed (systemd 252 and later: "Cannot
set property RuntimeMaxUSec"). So a TTL can be extended only where the configuration said so
before the environment was made: with ``max_ttl`` (seconds, more than its TTL), its unit's
RuntimeMaxSec is ``max_ttl``, systemd's backstop, and its holder holds the TTL exactly, as it
does for a pooled env and under the local runtime: it reads the TTL from the state file, where
an extension writes it. Without ``max_ttl`` (0, the default) the TTL is exact and fixed.
"""

from __future__ import annotations

import math

from .exceptions import ValidationError


def extension_cap(max_ttl: int, ttl: int | None) -> int | None:
    """The longest lifetime an environment created with ``ttl`` may be extended to, as
    recorded at its creation (``EnvRecord.max_ttl``); None: its TTL is fixed (no TTL, no
    ``max_ttl``, or one not above the TTL)."""
    if not ttl or max_ttl <= ttl:
        return None
    return max_ttl


def note(max_ttl: int | None) -> str | None:
    """What an environment with an extendable TTL says of itself (its notes)."""
    if max_ttl is None:
        return None
    return (f"TTL extendable up to {max_ttl} s from creation (max_ttl): held by the env's "
            f"holder, exact, and under systemd its unit's RuntimeMaxSec ({max_ttl} s) is the "
            "backstop")


def extended_ttl(name: str, ttl: int | None, max_ttl: int | None, created_at: float,
                 seconds: float, now: float) -> int:
    """The TTL (seconds from ``created_at``) of an environment whose TTL is extended by
    ``seconds`` at ``now``: more time from its current end, never beyond ``max_ttl``.
    ValidationError, saying why, where it cannot be."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError(f"a TTL is extended by a positive number of seconds, "
                              f"not {seconds!r}")
    if not ttl:
        raise ValidationError(f"environment {name!r} has no TTL to extend")
    if max_ttl is None:
        raise ValidationError(
            f"environment {name!r} has a fixed TTL (it was made without a max_ttl above its "
            "TTL; under systemd its end is then its unit's RuntimeMaxSec, which cannot change "
            "once it runs): set max_ttl in the configuration for the environments to come")
    if created_at + ttl <= now:
        raise ValidationError(f"environment {name!r} has reached its TTL")
    wanted = ttl + math.ceil(seconds)
    if wanted > max_ttl:
        left = max_ttl - ttl
        raise ValidationError(
            f"environment {name!r} may live {max_ttl} s at most (max_ttl): its TTL can be "
            f"extended by {left} s more, not {math.ceil(seconds)}")
    return wanted
