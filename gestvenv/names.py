"""Validation of what callers hand us: environment names and package specs.

A name becomes a path component, a state-file name and (under systemd) part of a unit name, so it
is restricted to a small ASCII set that is safe in all three, checked before anything exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .exceptions import InvalidNameError, ValidationError

MAX_NAME_LENGTH = 64
# ASCII letters and digits first (no hidden files, no option-like "-x"); then also "_", "." and "-".
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)
# Names whose units would be gestvenv's own: "cleanup" is gestvenv-cleanup.service/.timer.
RESERVED_NAMES = frozenset({"cleanup"})
# The stem of the systemd runtime's pool units (``gestvenv-gvpool-<hex8>.service``): a pooled
# env keeps its pool unit's names, so no env may be named like one.
POOL_PREFIX = "gvpool-"


def validate_name(name: object) -> str:
    """Return ``name`` if it is safe as a path component and a systemd unit name, else raise."""
    if not isinstance(name, str):
        raise InvalidNameError(f"environment name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidNameError("environment name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"environment name is {len(name)} characters long; at most {MAX_NAME_LENGTH} allowed"
        )
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid environment name {name!r}: use ASCII letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    if ".." in name or name.endswith("."):
        raise InvalidNameError(f"invalid environment name {name!r}: no '..' and no trailing '.'")
    if name.startswith(POOL_PREFIX):
        raise InvalidNameError(
            f"environment name {name!r} is reserved: names starting with {POOL_PREFIX!r} are "
            "those of gestvenv's pool units (pool_size)")
    if name in RESERVED_NAMES:
        raise InvalidNameError(
            f"environment name {name!r} is reserved: gestvenv-{name}.service is gestvenv's own "
            "unit (the cleanup timer's)")
    return name


def generate_name() -> str:
    import secrets

    return f"env-{secrets.token_hex(4)}"


def validate_packages(packages: Iterable[str] | str | None) -> tuple[str, ...]:
    """Check package specs without rewriting them: ``"six>=1.0"`` goes to the installer as is.

    A spec is refused only when it could not be a requirement at all: empty, starting with '-'
    (it would be read as an installer option) or containing a line break or NUL.
    """
    if packages is None:
        return ()
    if isinstance(packages, str):
        raise ValidationError(
            f"packages must be a list of specs, not the string {packages!r}; "
            f"write [{packages!r}]"
        )
    specs = tuple(packages)
    for spec in specs:
        if not isinstance(spec, str):
            raise ValidationError(f"package spec must be a string, not {spec!r}")
        if not spec.strip():
            raise ValidationError("empty package spec")
        if spec.lstrip().startswith("-"):
            raise ValidationError(
                f"package spec {spec!r} looks like an installer option; options are not accepted "
                "as packages (use config keys find_links/index_url, or a requirements file)"
            )
        if any(c in spec for c in "\n\r\0"):
            raise ValidationError(f"package spec {spec!r} contains a line break or NUL")
    return specs
