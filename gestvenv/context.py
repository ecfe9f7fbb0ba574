"""The public API: ``ephemeral()``, the :class:`Environment` handle, and friends."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import diskcap, registry
from .builder import Interpreter, make_builder
from .config import Config, load_config
from .exceptions import (
    BuildError,
    CommandError,
    CommandNotExecutableError,
    CommandNotFoundError,
    EnvironmentClosedError,
    EnvironmentNotFoundError,
    ValidationError,
)
from .inside import InsideInstaller
from .lifecycle import EnvSpec, create, destroy, full_error
from .listing import describe, environments, environments_now
from .models import (
    Enforcement,
    ExecResult,
    IsolationLevel,
    ResourceLimits,
    StorageBackend,
)
from .monitor import EnvUsage, Sampler
from .names import generate_name, validate_name, validate_packages
from .registry import EnvRecord
from .runtime import (
    CommandSpec,
    StreamCallback,
    runtime_named,
)
from .runtime.base import console_stream
from .runtime.processes import ENV_MARKER, EXEC_MARKER
from .shield import HeldInterrupts, protected, shielded
from .ttl import extended_ttl

if TYPE_CHECKING:
    from .handle import CommandHandle

Command = str | Sequence[str | os.PathLike[str]]
_SCRUBBED = ("PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "__PYVENV_LAUNCHER__", ENV_MARKER,
             EXEC_MARKER)


class Environment:
    """A handle on one environment. Obtained from :func:`ephemeral` (which owns and destroys it)
    or :func:`attach` (which does not)."""

    def __init__(self, record: EnvRecord, config: Config, *, owned: bool) -> None:
        self._record = record
        self._config = config
        self._owned = owned
        self._closing: asyncio.Future[None] | None = None
        self._kept = False  # released from its creator by keep() through this handle
        self._sampler = Sampler()  # one per handle: its runtime object, the peak seen

    # --- what it is ---
    @property
    def name(self) -> str:
        return self._record.name

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def path(self) -> Path:
        return Path(self._record.path)

    @property
    def bin_dir(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> Path:
        return self.bin_dir / "python"

    @property
    def python_version(self) -> str:
        return self._record.python_version

    @property
    def storage_backend(self) -> StorageBackend:
        return StorageBackend(self._record.backend)

    @property
    def resource_limits(self) -> ResourceLimits:
        return self._record.resource_limits

    @property
    def enforcement(self) -> Enforcement:
        """The limits and isolation really applied (never the ones merely requested)."""
        return self._record.enforcement_record

    @property
    def isolation(self) -> IsolationLevel:
        """The isolation level really applied."""
        return self.enforcement.isolation_applied

    @property
    def runtime(self) -> str:
        return self._record.runtime

    @property
    def container(self) -> dict[str, Any] | None:
        """At container isolation: its engine, container name and id, its image and its
        package set's image (``podman ps``, ``images save``); None below."""
        return dict(self._record.container) or None

    @property
    def expires_at(self) -> float | None:
        return self._record.expires_at

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def info(self) -> dict[str, Any]:
        return describe(self._record)

    def __repr__(self) -> str:
        return f"<Environment {self.name!r} at {self.path} ({self.runtime})>"

    # --- using it ---
    def _live_record(self) -> EnvRecord:
        if self._closing is not None:
            raise EnvironmentClosedError(f"environment {self.name!r} is closed")
        try:
            current = registry.load(self.name)
        except EnvironmentNotFoundError:
            current = None
        if current is None or current.id != self.id:
            expired = self.expires_at is not None and time.time() >= self.expires_at
            why = "its TTL was reached" if expired else \
                "destroyed by a cleanup, its idle timeout or the exit of its creator"
            raise EnvironmentClosedError(
                f"environment {self.name!r} has ended and no longer exists ({why})")
        return current

    async def install(self, packages: Iterable[str] = (), *,
                      requirements: str | os.PathLike[str] | None = None) -> None:
        """Install packages into the environment; specs go to the installer unchanged."""
        specs = validate_packages(packages)
        reqs = _requirements(requirements)
        record = self._live_record()
        interpreter = Interpreter(record.interpreter, record.python_version)
        # Installing is activity (the idle timeout waits), and uv's processes carry the env's
        # marker (destroying the env mid-install kills them).
        await asyncio.to_thread(registry.touch, record.name, record.id)
        try:
            # After creation a sandboxed env's commands may have planted links in its dir:
            # the whole install runs inside, as the env's own uid (gestvenv.inside).
            boxed = record.enforcement_record.isolation_applied.sandboxed
            inside = InsideInstaller(record, runtime_named(record.runtime), everything=boxed)
            try:
                await make_builder(self._config, record.id, inside).install(
                    self.path, interpreter, specs, reqs)
            except (OSError, BuildError) as exc:
                if not diskcap.is_full(exc):
                    raise
                what = ", ".join([*specs, *(f"-r {r}" for r in reqs)]) or "packages"
                raise await asyncio.to_thread(full_error, record, self._config,
                                              f"installing {what}") from exc
        finally:
            await asyncio.to_thread(registry.touch, record.name, record.id)
        await asyncio.to_thread(_record_packages, record, specs)

    async def execute(self, cmd: Command, *, timeout: float | None = None,
                      cwd: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str] | None = None,
                      input: str | bytes | None = None, check: bool = False,
                      shell: bool = False, capture: bool = True,
                      stream: bool | StreamCallback = False,
                      output_limit: int | None = None,
                      handle: CommandHandle | None = None) -> ExecResult:
        """Run a command in the environment, as if it were activated, and wait for it.

        A string is split with :func:`shlex.split` and never given to a shell unless
        ``shell=True``. ``python``, ``pip`` and the env's scripts come first on PATH. With
        ``capture=False`` the command shares our stdin/stdout/stderr; ``stream=True`` (or a
        callback ``(name, text)``) shows output as it comes while still capturing it. A timeout
        kills the whole process tree and the result says so (``killed_by="timeout"``).
        ``output_limit``: at most that many bytes of stdout, and of stderr, kept in the result
        (a stream still shows all of it). ``handle`` (a :class:`CommandHandle`): signals
        sent to the command while it runs.
        """
        if timeout is not None and timeout <= 0:
            raise ValidationError(f"timeout must be positive, not {timeout!r}")
        if output_limit is not None and output_limit < 0:
            raise ValidationError(f"output_limit must be 0 or more, not {output_limit!r}")
        record = self._live_record()
        command = build_command(record, cmd, shell=shell, env=env, cwd=cwd, input=input,
                                timeout=timeout, capture=capture,
                                stream=console_stream(stream))
        if output_limit is not None:
            command = dataclasses.replace(command, output_limit=output_limit)
        if handle is not None:
            command = dataclasses.replace(command, handle=handle)
        runtime = runtime_named(record.runtime)
        if handle is not None:
            handle._take()  # (before any await: two calls never share it)
        try:
            await asyncio.to_thread(registry.touch, record.name, record.id)
            try:
                result = await runtime.run(record, command)
            finally:
                await asyncio.to_thread(registry.touch, record.name, record.id)
        finally:
            if handle is not None:
                handle._disarm()
        if check and not result.ok:
            raise CommandError(result)
        return result

    async def usage(self) -> EnvUsage:
        """What the environment uses now, against its limits. CPU % is since this handle's
        previous sample (None for its first; :meth:`watch` samples at a steady interval).
        The attributes of the former ``Usage`` (processes, memory_bytes, cpu_seconds,
        disk_bytes) are still there."""
        return await self._sampler.sample_one(self._live_record())

    async def watch(self, interval: float = 1.0) -> AsyncIterator[EnvUsage]:
        """A sample every ``interval`` seconds until the caller stops iterating (or the
        environment ends: :class:`EnvironmentClosedError`). The first comes at once, without
        CPU %; each later one has the CPU % since the one before."""
        if interval <= 0:
            raise ValidationError(f"interval must be positive, not {interval!r}")
        sampler = Sampler()
        while True:
            sample = await sampler.sample_one(self._live_record())
            yield sample
            # Paced from the reading itself: taking one may cost more the first time (the
            # runtime's first call), and samples are then still ``interval`` apart.
            await asyncio.sleep(max(0.0, sample.sampled_at + interval - time.time()))

    # --- ending it ---
    @property
    def kept(self) -> bool:
        """True when the environment belongs to no creator: released by :meth:`keep` through
        this handle, or made without one (:func:`create_environment`, ``ephemeral create``),
        as this handle knows it."""
        return self._kept or (not self._owned and self._record.owner_pid is None)

    async def keep(self) -> None:
        """Release the environment from its creator, to inspect it later.

        From now on it is destroyed neither when its ``ephemeral()`` block exits nor when the
        creating process dies: it lives until its TTL, its idle timeout or ``gestvenv
        ephemeral cleanup NAME``. Only the block's own handle can keep its environment (an
        ``attach()`` handle cannot take it from its block); one that would never end (no TTL,
        no idle timeout) is refused. Idempotent.
        """
        record = self._live_record()
        if record.expires_at is None and not record.idle_timeout:
            raise ValidationError(
                f"environment {self.name!r} has no TTL and no idle timeout: kept, it would "
                "never end (create it with a ttl to keep it)")
        if not self._owned:
            if record.owner_pid is None or self._kept:
                return  # it has no creator already
            raise ValidationError(
                f"environment {self.name!r} belongs to the ephemeral() block of process "
                f"{record.owner_pid}: keep() it through that block's own handle")
        self._record = await asyncio.to_thread(_release, record)
        self._kept, self._owned = True, False

    async def extend_ttl(self, seconds: float) -> float:
        """Move the environment's end ``seconds`` later (its TTL grows by that much), within
        the ``max_ttl`` it was made with (:mod:`gestvenv.ttl`); returns its new end (as
        :attr:`expires_at`). Commands running now get the time too."""
        record = self._live_record()
        self._record = await asyncio.to_thread(_extend, record, seconds)
        expires_at = self._record.expires_at
        assert expires_at is not None
        return expires_at

    async def aclose(self) -> None:
        """Destroy the environment (processes, files, state). Idempotent; survives cancellation."""
        if self._closing is None:
            # Uncancellable: asyncio.run's final cancel of every task must not cut it either.
            self._closing = protected(destroy(self._record, self._config))
        await shielded(_wait(self._closing))

    async def __aenter__(self) -> Environment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owned:
            await self.aclose()


async def _wait(future: asyncio.Future[None]) -> None:
    await future


def _requirements(requirements: str | os.PathLike[str] | None) -> tuple[Path, ...]:
    if requirements is None:
        return ()
    path = Path(requirements)
    if not path.is_file():
        raise ValidationError(f"requirements file {str(path)!r} does not exist")
    return (path.resolve(),)


def _release(record: EnvRecord) -> EnvRecord:
    """The state without its owner: its unit's holder (or the local watchdog) then lets the
    env outlive its creator, as it does for ``ephemeral create``."""
    with registry.locked():
        try:
            current = registry.load(record.name)
        except EnvironmentNotFoundError:
            current = None
        if current is None or current.id != record.id:
            raise EnvironmentClosedError(f"environment {record.name!r} has ended")
        if current.status != "ready":  # (being destroyed: a release would not hold anyway)
            raise EnvironmentClosedError(
                f"environment {record.name!r} is {current.status}: it cannot be kept")
        released = current.evolve(owner_pid=None, owner_started=None)
        registry.save(released)
    return released


def _extend(record: EnvRecord, seconds: float) -> EnvRecord:
    """The state with its TTL extended (gestvenv.ttl's rule), written where its holder reads
    it (under the local runtime, and under systemd for an env made with max_ttl)."""
    with registry.locked():
        current = registry.current(record)
        if current is None or current.status != "ready":
            raise EnvironmentClosedError(f"environment {record.name!r} has ended")
        ttl = extended_ttl(current.name, current.ttl, current.max_ttl, current.created_at,
                           seconds, time.time())
        extended = current.evolve(ttl=ttl)
        registry.save(extended)
    return extended


def _record_packages(record: EnvRecord, specs: Sequence[str]) -> None:
    with registry.locked():
        try:
            current = registry.load(record.name)
        except EnvironmentNotFoundError:
            return
        if current.id == record.id:
            added = [s for s in dict.fromkeys(specs) if s not in current.packages]
            registry.save(current.evolve(packages=[*current.packages, *added]))


def build_command(record: EnvRecord, cmd: Command, *, shell: bool = False,
                  env: Mapping[str, str] | None = None,
                  cwd: str | os.PathLike[str] | None = None,
                  input: str | bytes | None = None, timeout: float | None = None,
                  capture: bool = True, stream: StreamCallback | None = None) -> CommandSpec:
    """Resolve a command against the environment: argv, PATH, VIRTUAL_ENV, markers."""
    if isinstance(cmd, str):
        argv = ["/bin/sh", "-c", cmd] if shell else shlex.split(cmd)
    else:
        if shell:
            raise ValidationError("shell=True takes the command as one string")
        argv = [os.fspath(a) for a in cmd]
        if not all(isinstance(a, str) for a in argv):
            raise ValidationError(f"command arguments must be strings: {cmd!r}")
    if not argv or not argv[0]:
        raise ValidationError("empty command")
    environ = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    environ.update(record_env(record))
    temp = diskcap.capped_temp_dirs(record.enforcement_record, record.path)
    if temp and not record.enforcement_record.isolation_applied.sandboxed:
        # (Sandboxed, its /tmp is there already.) What honours TMPDIR writes within the cap.
        environ["TMPDIR"] = temp["/tmp"]
    if env:
        environ.update(env)
    environ["VIRTUAL_ENV"] = record.path
    bin_dir = os.path.join(record.path, "bin")
    environ["PATH"] = os.pathsep.join([bin_dir, environ.get("PATH", os.defpath)])
    environ[ENV_MARKER] = record.id
    environ["GESTVENV_ENV_NAME"] = record.name
    program = argv[0]
    if os.sep not in program:
        found = shutil.which(program, path=environ["PATH"])
        if found is None:
            raise CommandNotFoundError(
                f"command not found in environment {record.name!r} or on PATH: {program!r}")
        argv[0] = found
    else:
        base = os.fspath(cwd) if cwd is not None else os.getcwd()
        full = os.path.join(base, program)
        if not os.path.isfile(full):
            raise CommandNotFoundError(f"{program!r} is not a file")
        if not os.access(full, os.X_OK):  # (exit status 126 in the CLI, as in a shell)
            raise CommandNotExecutableError(f"{program!r} is not executable")
    if cwd is not None and not os.path.isdir(cwd):
        raise ValidationError(f"working directory {os.fspath(cwd)!r} does not exist")
    data = input.encode() if isinstance(input, str) else input
    return CommandSpec(argv=tuple(argv), environ=environ,
                       cwd=os.fspath(cwd) if cwd is not None else None, input=data,
                       timeout=timeout, capture=capture, stream=stream,
                       passed=(*record_env(record), *(env or {})))


def record_env(record: EnvRecord) -> dict[str, str]:
    """Variables given at creation (``ephemeral(env=...)``), stored with the environment."""
    return {k: v for k, v in record.environ.items() if isinstance(v, str)}


# --- the entry points ---

def resolve_spec(config: Config, name: str | None, *, packages: Iterable[str],
                 requirements: str | os.PathLike[str] | None, python: str | None,
                 resource_limits: ResourceLimits | None,
                 isolation_level: IsolationLevel | str | None,
                 storage_backend: StorageBackend | str | None, ttl: int | None,
                 idle_timeout: int | None, allow_unenforced: bool | None,
                 runtime: str | None, owned: bool,
                 env: Mapping[str, str] | None) -> EnvSpec:
    if resource_limits is not None and not isinstance(resource_limits, ResourceLimits):
        raise ValidationError("resource_limits must be a ResourceLimits")
    for label, value in (("ttl", ttl), ("idle_timeout", idle_timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValidationError(f"{label} must be an integer >= 0 (seconds), not {value!r}")
    return EnvSpec(
        name=validate_name(name) if name is not None else generate_name(),
        packages=validate_packages(packages),
        requirements=_requirements(requirements),
        python=python or config.python,
        limits=resource_limits or ResourceLimits(),
        isolation=IsolationLevel.parse(isolation_level or config.default_isolation_level),
        backend=StorageBackend.parse(storage_backend or config.storage_backend),
        ttl=config.default_ttl if ttl is None else ttl,
        idle_timeout=config.idle_timeout if idle_timeout is None else idle_timeout,
        allow_unenforced=config.allow_unenforced_limits if allow_unenforced is None
        else allow_unenforced,
        owned=owned,
        runtime=runtime,
        environ=tuple(sorted(_check_env(env).items())),
    )


class EphemeralContext:
    """``async with ephemeral(...) as env``: created on entry, destroyed on exit, always."""

    def __init__(self, spec: EnvSpec, config: Config) -> None:
        self._spec = spec
        self._config = config
        self._env: Environment | None = None
        self._interrupts = HeldInterrupts()  # a second Ctrl-C waits for the teardown
        # Off for a block that spans several asyncio.run calls (pytest-asyncio runs a fixture's
        # setup and teardown in two): the handler wrapped in the first would outlive it.
        self._hold_interrupts = True

    async def __aenter__(self) -> Environment:
        if self._env is not None:
            raise RuntimeError("this ephemeral() context is already in use")
        if self._hold_interrupts:
            self._interrupts.install()
        try:
            record = await create(self._spec, self._config)
        except BaseException:
            self._interrupts.release()
            raise
        self._env = Environment(record, self._config, owned=True)
        return self._env

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            # Kept by keep() on this handle: it outlives the block. (Decided by the handle, not
            # by the state file, which an env's own commands can write at process isolation.)
            if self._env is not None and not self._env.kept:
                await self._env.aclose()
        finally:
            self._interrupts.release()


def ephemeral(name: str | None = None, *, packages: Iterable[str] = (),
              requirements: str | os.PathLike[str] | None = None, python: str | None = None,
              resource_limits: ResourceLimits | None = None,
              isolation_level: IsolationLevel | str | None = None,
              storage_backend: StorageBackend | str | None = None, ttl: int | None = None,
              idle_timeout: int | None = None, env: Mapping[str, str] | None = None,
              allow_unenforced: bool | None = None, runtime: str | None = None,
              config: Config | None = None) -> EphemeralContext:
    """An environment for the duration of an ``async with`` block.

    Every keyword left out takes its default from the configuration. All input is validated
    here, before anything is created.
    """
    config = config or load_config()
    spec = resolve_spec(config, name, packages=packages, requirements=requirements,
                         python=python, resource_limits=resource_limits,
                         isolation_level=isolation_level, storage_backend=storage_backend,
                         ttl=ttl, idle_timeout=idle_timeout, allow_unenforced=allow_unenforced,
                         runtime=runtime, owned=True, env=env)
    return EphemeralContext(spec, config)


async def create_environment(name: str | None = None, *, packages: Iterable[str] = (),
                             requirements: str | os.PathLike[str] | None = None,
                             python: str | None = None,
                             resource_limits: ResourceLimits | None = None,
                             isolation_level: IsolationLevel | str | None = None,
                             storage_backend: StorageBackend | str | None = None,
                             ttl: int | None = None, idle_timeout: int | None = None,
                             env: Mapping[str, str] | None = None,
                             allow_unenforced: bool | None = None, runtime: str | None = None,
                             config: Config | None = None) -> Environment:
    """Create an environment that outlives this process (until its TTL or a cleanup)."""
    config = config or load_config()
    spec = resolve_spec(config, name, packages=packages, requirements=requirements,
                         python=python, resource_limits=resource_limits,
                         isolation_level=isolation_level, storage_backend=storage_backend,
                         ttl=ttl, idle_timeout=idle_timeout, allow_unenforced=allow_unenforced,
                         runtime=runtime, owned=False, env=env)
    record = await create(spec, config)
    return Environment(record, config, owned=False)


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(env or {})
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key:
            raise ValidationError(f"env must map names to strings: {key!r}={value!r}")
    return env


def attach(name: str, *, config: Config | None = None) -> Environment:
    """A handle on an existing environment (created by any process of this user); not owned."""
    record = registry.load(validate_name(name))
    return Environment(record, config or load_config(), owned=False)


def list_environments() -> list[dict[str, Any]]:
    """:func:`environments`, from synchronous code."""
    return environments_now()


async def destroy_environment(name: str, *, config: Config | None = None) -> None:
    record = registry.load(validate_name(name))
    await destroy(record, config or load_config())


__all__ = ["Environment", "EphemeralContext", "attach", "build_command", "create_environment",
           "describe", "destroy_environment", "environments", "ephemeral",
           "list_environments"]
