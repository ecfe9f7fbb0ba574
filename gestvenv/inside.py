"""Package code runs inside the environment: an install whose packages must be built from
source (an sdist's build backend, ``setup.py``) is run as a command of the environment, in its
unit(s), under its limits, isolation, uid and network policy, never in the creator's process.

What runs in the creator is uv alone, with ``--no-build``: resolving, downloading and unpacking
wheels run no package code. Only when that is refused for a build does the install move inside
(:class:`InsideInstaller`), with a uv cache of the env's own (a build cannot write the shared
one) and, with ``network_access=False``, ``--offline``: what it needs must then be local (a
path, a find-links dir, the configured wheelhouse), copied into the env for the build
(:func:`stage_inputs`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import sandbox
from .models import ExecResult
from .registry import EnvRecord
from .runtime.base import CommandSpec, Runtime
from .runtime.processes import ENV_MARKER


@dataclass(frozen=True)
class InsideInstaller:
    """Runs an installer command as a command of ``record``'s environment."""

    record: EnvRecord
    runtime: Runtime

    @property
    def network(self) -> bool:
        return bool(self.record.limits.get("network_access", True))

    @property
    def memory_limit(self) -> int | None:
        value = self.record.limits.get("max_memory")
        return int(value) if value else None

    async def run(self, argv: Sequence[str], environ: Mapping[str, str]) -> ExecResult:
        # Its commands write the env as its sandbox uid: what the creator wrote so far is
        # handed over first (the cache the build writes lives in the env).
        await asyncio.to_thread(sandbox.hand_over_env, self.record.path, self.record.sandbox_uid)
        bin_dir = os.path.join(self.record.path, "bin")
        env = {**environ, "VIRTUAL_ENV": self.record.path, ENV_MARKER: self.record.id,
               "GESTVENV_ENV_NAME": self.record.name,
               "PATH": os.pathsep.join([bin_dir, environ.get("PATH", os.defpath)]),
               "HOME": self.record.path}
        spec = CommandSpec(argv=tuple(argv), environ=env, cwd=self.record.path, input=None,
                           timeout=None)
        return await self.runtime.run(self.record, spec)


def stage_inputs(args: Sequence[str], into: Path) -> list[str]:
    """``args`` with every host path (an sdist, a project dir, a requirements file, a find-links
    dir) replaced by a copy under ``into`` (inside the env, handed to its uid with it): the
    sandbox hides most of the host, and a root creator's files may be unreadable to the env's
    uid. Options and plain requirements are left as they are."""
    out = []
    for n, arg in enumerate(args):
        path = arg[len("file://"):] if arg.startswith("file://") else arg
        if arg.startswith("-") or not (os.sep in path or path.startswith(".")) \
                or not os.path.exists(path):
            out.append(arg)
            continue
        target = into / str(n) / os.path.basename(os.path.abspath(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(path):
            shutil.copytree(path, target, symlinks=True)
        else:
            shutil.copy2(path, target)
        out.append(str(target))
    return out
