"""Shell completion of environment names: read-only, cheap, silent.

It runs at every <TAB> press, so it must not do what a command does: no directory is created
(``storage.runtime_dir()`` creates its dir: ``runtime_dir_path()`` only computes it), no
config is loaded, no watchdog is started, systemd is not asked. On any error: no suggestions.
"""

from __future__ import annotations

import os

import click

from ..exceptions import GestvenvError
from ..names import validate_name
from ..storage import runtime_dir_path


def env_names(incomplete: str = "") -> list[str]:
    """Names of this user's environments that start with ``incomplete``, sorted."""
    try:
        names = []
        # File names only: no state file is parsed.
        with os.scandir(runtime_dir_path() / "envs") as entries:
            for entry in entries:
                name, dot, ext = entry.name.rpartition(".")
                if dot and ext == "json" and name.startswith(incomplete):
                    names.append(name)
        return sorted(n for n in names if _valid(n))
    except (OSError, ValueError):
        return []


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except GestvenvError:
        return False
    return True


def complete_env_name(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """``shell_complete=`` callback for a parameter that names existing environments; a name
    already given to a repeatable parameter (``cleanup a b``) is not offered again."""
    given = ctx.params.get(param.name or "") if param.multiple or param.nargs != 1 else None
    taken = set(given) if isinstance(given, list | tuple) else set()
    return [n for n in env_names(incomplete) if n not in taken]
