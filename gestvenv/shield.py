"""Work that must not be cut in half by a cancellation (Ctrl-C, a task group, a timeout)."""

from __future__ import annotations

import asyncio
import asyncio.runners
import functools
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")
# Set by a third Ctrl-C (HeldInterrupts): the way out, where teardown may be cut after all.
_abandoned = threading.Event()


class _Uncancellable(asyncio.Task[T]):
    """A task that ``cancel()`` does not stop. When the main coroutine of ``asyncio.run`` ends
    (an exception out of ``gather`` while a sibling is still tearing its environment down, a
    Ctrl-C), asyncio cancels *every* task left, the inner tasks of :func:`shielded` too, and
    then waits for them: refusing that cancellation lets a teardown finish there."""

    def cancel(self, msg: Any | None = None) -> bool:
        if _abandoned.is_set():
            return super().cancel(msg)
        return False


def protected(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start ``coro`` as a task that no ``cancel()`` stops (but after a third Ctrl-C)."""
    return _Uncancellable(coro, loop=asyncio.get_running_loop())


async def shielded(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled (again and again), then re-raise
    the cancellation. Teardown must not be cut in half by a second Ctrl-C, nor by asyncio.run
    cancelling every task left when its main coroutine ends, and a worker thread must not go
    on writing after the caller has moved on to undo its work."""
    task = protected(aw) if asyncio.iscoroutine(aw) else asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def in_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread``, shielded: a thread cannot be stopped, so wait for it."""
    return await shielded(asyncio.to_thread(functools.partial(func, *args, **kwargs)))


class HeldInterrupts:
    """Under ``asyncio.run``, a Ctrl-C after the first is held back until a teardown is over.

    ``asyncio.run`` turns the first Ctrl-C into a cancellation of the main task, which a
    teardown survives (:func:`shielded`). The second one it raises as KeyboardInterrupt wherever
    the main thread is (between two callbacks of the event loop, in a half-read D-Bus reply)
    and then cancels every task, the teardown's included: the environment is left to its unit
    or watchdog, and the script may hang on a reply that will never come. So, from
    :meth:`install` (an ``ephemeral()`` context opens) to :meth:`release` (its teardown is
    over), the first Ctrl-C goes to asyncio as usual, the second is held and delivered by
    ``release`` (the KeyboardInterrupt comes out of the ``async with``), and a third is not
    held: a way out. Only asyncio.run's own handler is wrapped; any other is left alone.
    """

    def __init__(self) -> None:
        self._previous: Callable[[int, FrameType | None], Any] | None = None
        self._seen = 0
        self._held = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGINT)
        runners_handler = getattr(asyncio.runners.Runner, "_on_sigint", None)
        if not (isinstance(current, functools.partial) and runners_handler is not None
                and getattr(current.func, "__func__", None) is runners_handler):
            return
        self._previous = current
        _abandoned.clear()
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if previous is None:  # released, but another handler was set over ours meanwhile
            raise KeyboardInterrupt
        self._seen += 1
        if self._seen == 1:
            previous(signum, frame)  # asyncio cancels the main task: the teardown starts
        elif not self._held:
            self._held = True
        else:
            _abandoned.set()  # the way out: asyncio may now cut the teardown
            self.release(deliver=False)
            previous(signum, frame)

    def release(self, *, deliver: bool = True) -> None:
        """Give asyncio its handler back, and the held Ctrl-C (``deliver``)."""
        previous, self._previous = self._previous, None
        if previous is None:
            return
        if signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, previous)
        if self._held and deliver:
            self._held = False
            previous(signal.SIGINT, None)
