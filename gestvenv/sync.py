"""The blocking API: a thin bridge onto the async one, not a second implementation.

One event loop runs in a daemon helper thread for the whole process (a blocking portal, as in
anyio): connections such as the D-Bus one live on that loop across calls, which ``asyncio.run``
per call would not allow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import threading
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # (run_sync serves light CLI commands too: the library is loaded on use)
    from .config import Config
    from .context import Command, Environment, EphemeralContext
    from .models import ExecResult, IsolationLevel, ResourceLimits, StorageBackend
    from .monitor import EnvUsage
    from .runtime import StreamCallback

T = TypeVar("T")
SIGNAL_POLL = 0.1  # seconds


class _Portal:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            # After fork() the loop object is copied but not its thread: start a new one.
            alive = self._thread is not None and self._thread.is_alive()
            if self._loop is None or self._pid != os.getpid() or not alive:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="gestvenv-portal", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def call(self, coro: Coroutine[Any, Any, T], *, shield: bool = False) -> T:
        """Run ``coro`` on the portal's loop and wait for it.

        Ctrl-C (KeyboardInterrupt in this thread) cancels the task and waits until it has
        finished, its cleanup included, before re-raising; with ``shield`` the task is not
        cancelled but run to its end first.
        """
        loop = self._get_loop()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def finished(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                done.cancel()
            elif (exc := task.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result(task.result())

        def start() -> None:
            task = loop.create_task(coro)
            task.add_done_callback(finished)
            tasks.append(task)

        def cancel() -> None:  # queued after start(): the task exists by then
            tasks[0].cancel()

        loop.call_soon_threadsafe(start)
        interrupted: BaseException | None = None
        while True:
            try:
                # Woken now and then: a signal (Ctrl-C, SIGTERM) the kernel hands to another
                # of our threads does not interrupt this thread's wait, and Python runs its
                # handler only here, in the main thread, once it wakes up.
                concurrent.futures.wait([done], timeout=SIGNAL_POLL)
                if not done.done():
                    continue
                result = done.result()  # (a TimeoutError here is the task's own)
                break
            except KeyboardInterrupt as exc:
                if interrupted is None and not shield:
                    loop.call_soon_threadsafe(cancel)
                interrupted = interrupted or exc
            except concurrent.futures.CancelledError:
                if interrupted is not None:
                    raise interrupted from None
                raise
        if interrupted is not None:
            raise interrupted
        return result


    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the portal's loop without waiting (safe from a signal handler)."""
        loop = self._get_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(coro))


_portal = _Portal()


def run_soon(coro: Coroutine[Any, Any, Any]) -> None:
    """Start ``coro`` on the portal without waiting for it: usable from a signal handler."""
    _portal.submit(coro)


class SyncEnvironment:
    """The blocking twin of :class:`Environment`; every call runs the async one on the portal."""

    def __init__(self, env: Environment) -> None:
        self._env = env

    @property
    def aio(self) -> Environment:
        """The async handle underneath."""
        return self._env

    def __getattr__(self, name: str) -> Any:
        # Plain attributes (name, path, python, enforcement...) are the async handle's; its
        # coroutines are not: one never awaited (``aclose()``) would silently do nothing.
        value = getattr(self._env, name)
        if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            raise AttributeError(
                f"{name}() is the async API's: use env.aio.{name}() in async code"
                + ("; close() here" if name == "aclose" else ""))
        return value

    def install(self, packages: Iterable[str] = (), *,
                requirements: str | os.PathLike[str] | None = None) -> None:
        _portal.call(self._env.install(packages, requirements=requirements))

    def execute(self, cmd: Command, *, timeout: float | None = None,
                cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                input: str | bytes | None = None, check: bool = False, shell: bool = False,
                capture: bool = True, stream: bool | StreamCallback = False,
                output_limit: int | None = None) -> ExecResult:
        return _portal.call(self._env.execute(cmd, timeout=timeout, cwd=cwd, env=env,
                                              input=input, check=check, shell=shell,
                                              capture=capture, stream=stream,
                                              output_limit=output_limit))

    def usage(self) -> EnvUsage:
        return _portal.call(self._env.usage())

    def keep(self) -> None:
        """:meth:`Environment.keep`: the environment outlives this block and its creator,
        until its TTL."""
        _portal.call(self._env.keep())

    def extend_ttl(self, seconds: float) -> float:
        """:meth:`Environment.extend_ttl`: its end, ``seconds`` later; returns it."""
        return _portal.call(self._env.extend_ttl(seconds))

    def close(self) -> None:
        _portal.call(self._env.aclose(), shield=True)

    def __repr__(self) -> str:
        return f"<SyncEnvironment {self._env.name!r}>"


class SyncEphemeralContext:
    def __init__(self, context: EphemeralContext) -> None:
        self._context = context

    def __enter__(self) -> SyncEnvironment:
        return SyncEnvironment(_portal.call(self._context.__aenter__()))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _portal.call(self._context.__aexit__(exc_type, exc, tb), shield=True)


def ephemeral_sync(name: str | None = None, *, packages: Iterable[str] = (),
                   requirements: str | os.PathLike[str] | Path | None = None,
                   python: str | None = None, resource_limits: ResourceLimits | None = None,
                   isolation_level: IsolationLevel | str | None = None,
                   storage_backend: StorageBackend | str | None = None, ttl: int | None = None,
                   idle_timeout: int | None = None, env: Mapping[str, str] | None = None,
                   allow_unenforced: bool | None = None,
                   runtime: str | None = None,
                   config: Config | None = None) -> SyncEphemeralContext:
    """``with ephemeral_sync(...) as env``: :func:`ephemeral` without asyncio."""
    from .context import ephemeral

    return SyncEphemeralContext(ephemeral(
        name, packages=packages, requirements=requirements, python=python,
        resource_limits=resource_limits, isolation_level=isolation_level,
        storage_backend=storage_backend, ttl=ttl, idle_timeout=idle_timeout, env=env,
        allow_unenforced=allow_unenforced, runtime=runtime, config=config))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on the portal (used by the CLI)."""
    return _portal.call(coro)
