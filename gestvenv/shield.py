"""Work that must not be cut in half by a cancellation (Ctrl-C, a task group, a timeout)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def shielded(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled (again and again), then re-raise
    the cancellation. Teardown must not be cut in half by a second Ctrl-C, and a worker thread
    must not go on writing after the caller has moved on to undo its work."""
    task = asyncio.ensure_future(aw)
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
