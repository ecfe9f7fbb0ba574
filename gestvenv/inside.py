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

from . import sandbox
from .exceptions import BuildError
from .models import ExecResult
from .registry import EnvRecord
from .runtime.base import CommandSpec, Runtime
from .runtime.processes import ENV_MARKER


class InsideInstaller:
    """Runs an installer command as a command of ``record``'s environment.

    ``everything``: the whole install runs inside, not only what must be built. After
    creation the commands of a sandboxed env (namespace isolation and above) may have planted
    links in its dir, and the creator, who sees the host the sandbox hides, must write nothing
    there by path (its uv and its script rewriting would follow them: a hostile review did
    just that).

    ``hand_over_first``: at creation, what the creator wrote so far goes to the env's own uid
    (:func:`sandbox.hand_over_env`) before the first command of the env runs, and only then:
    once any of the env's code has run, a hand-over by root would race it (a second review
    turned a cache file into the env's through one). After creation nothing is handed over:
    installs run as the env's uid and what they write is its own already.
    """

    def __init__(self, record: EnvRecord, runtime: Runtime, *, everything: bool = False,
                 hand_over_first: bool = False) -> None:
        self.record = record
        self.runtime = runtime
        self.everything = everything
        self.pending_hand_over = hand_over_first
        # At container isolation, the env's container being started: its commands wait for it.
        self.ready: asyncio.Future[EnvRecord] | None = None

    async def hand_over(self) -> None:
        """The creation's one hand-over, if it has not happened (no command of the env yet)."""
        if self.pending_hand_over:
            self.pending_hand_over = False
            try:
                await asyncio.to_thread(sandbox.hand_over_env, self.record.path,
                                        self.record.sandbox_uid)
            except OSError as exc:
                raise BuildError(f"cannot give environment {self.record.name!r} its files: "
                                 f"{exc}") from None

    @property
    def network(self) -> bool:
        return bool(self.record.limits.get("network_access", True))

    @property
    def memory_limit(self) -> int | None:
        value = self.record.limits.get("max_memory")
        return int(value) if value else None

    async def run(self, argv: Sequence[str], environ: Mapping[str, str]) -> ExecResult:
        if self.ready is not None:
            self.record = await self.ready
        await self.hand_over()  # (the env's commands write it as its own uid from now on)
        bin_dir = os.path.join(self.record.path, "bin")
        env = {**environ, "VIRTUAL_ENV": self.record.path, ENV_MARKER: self.record.id,
               "GESTVENV_ENV_NAME": self.record.name,
               "PATH": os.pathsep.join([bin_dir, environ.get("PATH", os.defpath)]),
               "HOME": self.record.path}
        spec = CommandSpec(argv=tuple(argv), environ=env, cwd=self.record.path, input=None,
                           timeout=None, passed=tuple(environ))
        return await self.runtime.run(self.record, spec)


def stage_inputs(args: Sequence[str], env_path: str,
                 uid: int | None = None) -> tuple[list[str], str | None]:
    """``args`` with every host path (an sdist, a project dir, a requirements file, a find-links
    dir) replaced by a copy in a fresh dir of the env's (returned, for :func:`unstage`): the
    sandbox hides most of the host, and a root creator's files may be unreadable to the env's
    uid. Options and plain requirements are left as they are.

    The env's dir may be its uid's, and its commands may have planted links in it: the copy is
    made through directory descriptors, into a dir created here, never through a path in the
    env; with ``uid`` (the env's own), each entry is given to it through the descriptor that
    made it (a build may write into its source tree), never by name.
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
                os.mkdir(stage, 0o700, dir_fd=env_fd)
                stage_fd = os.open(stage, _DIR_FLAGS, dir_fd=env_fd)
                _give(stage_fd, uid)
            os.mkdir(str(n), 0o755, dir_fd=stage_fd)
            slot = os.open(str(n), _DIR_FLAGS, dir_fd=stage_fd)
            try:
                _give(slot, uid)
                name = os.path.basename(os.path.abspath(path))
                _copy_into(os.path.abspath(path), name, slot, uid)
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


def _give(fd: int, uid: int | None) -> None:
    if uid is not None:
        os.fchown(fd, uid, uid)


def _copy_into(src: str, name: str, dir_fd: int, uid: int | None) -> None:
    """Copy ``src`` (a file or a tree; links inside it are not followed) as ``name`` into
    ``dir_fd``, creating every entry exclusively (and giving it to ``uid``)."""
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            _give(sub, uid)
            with os.scandir(src) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        continue
                    _copy_into(entry.path, entry.name, sub, uid)
        finally:
            os.close(sub)
        return
    if not os.path.isfile(src):
        return
    dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                  dir_fd=dir_fd)
    with os.fdopen(dst, "wb") as out, open(src, "rb") as f:
        _give(out.fileno(), uid)
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
