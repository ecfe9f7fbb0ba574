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
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    # The whole install runs inside, not only what must be built: after creation the commands
    # of a sandboxed env (namespace isolation and above) may have planted links in its dir, and
    # the creator, who sees the host the sandbox hides, must write nothing there by path
    # (its uv and its script rewriting would follow them: a hostile review did just that).
    everything: bool = False

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


def stage_inputs(args: Sequence[str], env_path: str) -> tuple[list[str], str | None]:
    """``args`` with every host path (an sdist, a project dir, a requirements file, a find-links
    dir) replaced by a copy in a fresh dir of the env's (returned, for :func:`unstage`): the
    sandbox hides most of the host, and a root creator's files may be unreadable to the env's
    uid. Options and plain requirements are left as they are.

    The env's dir may be its uid's, and its commands may have planted links in it: the copy is
    made through directory descriptors, into a dir created here, never through a path in the
    env, and the files are root's (readable, not writable, by the env).
    """
    out: list[str] = []
    stage: str | None = None
    env_fd = os.open(env_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        stage_fd = None
        for n, arg in enumerate(args):
            path = arg[len("file://"):] if arg.startswith("file://") else arg
            if arg.startswith("-") or not (os.sep in path or path.startswith(".")) \
                    or not os.path.exists(path):
                out.append(arg)
                continue
            if stage_fd is None:
                stage = f"{STAGE_PREFIX}{secrets.token_hex(8)}"
                os.mkdir(stage, 0o755, dir_fd=env_fd)
                stage_fd = os.open(stage, _DIR_FLAGS, dir_fd=env_fd)
            os.mkdir(str(n), 0o755, dir_fd=stage_fd)
            slot = os.open(str(n), _DIR_FLAGS, dir_fd=stage_fd)
            try:
                name = os.path.basename(os.path.abspath(path))
                _copy_into(os.path.abspath(path), name, slot)
            finally:
                os.close(slot)
            out.append(os.path.join(env_path, stage or "", str(n), name))
        if stage_fd is not None:
            os.close(stage_fd)
    finally:
        os.close(env_fd)
    return out, stage


STAGE_PREFIX = ".gestvenv-inputs-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _copy_into(src: str, name: str, dir_fd: int) -> None:
    """Copy ``src`` (a file or a tree; links inside it are not followed) as ``name`` into
    ``dir_fd``, creating every entry exclusively."""
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            with os.scandir(src) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        continue
                    _copy_into(entry.path, entry.name, sub)
        finally:
            os.close(sub)
        return
    if not os.path.isfile(src):
        return
    dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                  dir_fd=dir_fd)
    with os.fdopen(dst, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def unstage(env_path: str, stage: str | None) -> None:
    """Remove what :func:`stage_inputs` copied (by descriptor: never through a planted link)."""
    if stage is None:
        return
    env_fd = os.open(env_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        shutil.rmtree(stage, dir_fd=env_fd, ignore_errors=True)
    finally:
        os.close(env_fd)
