"""shielded(): a teardown runs to its end, whoever cancels what (gestvenv/shield.py)."""

from __future__ import annotations

import asyncio

import pytest

from gestvenv import shield
from gestvenv.shield import protected, shielded


async def _teardown(done: list[str], tag: str) -> None:
    await asyncio.sleep(0.2)
    await asyncio.to_thread(lambda: None)
    done.append(tag)


async def _failing(done: list[str], tag: str, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
        raise ValueError(tag)
    finally:
        await shielded(_teardown(done, tag))


@pytest.mark.parametrize("abandoned", [False, True], ids=["protected", "control"])
def test_asyncio_runs_final_cancel_does_not_cut_a_siblings_teardown(abandoned: bool) -> None:
    """``gather`` raises the first error while the second task is still tearing down; then
    asyncio.run cancels every task left, the shielded inner one too: it must finish. The
    control (as after a third Ctrl-C, or before this protection): it is cut."""
    done: list[str] = []

    async def main() -> None:
        await asyncio.gather(_failing(done, "a", 0), _failing(done, "b", 0.05))

    if abandoned:
        shield._abandoned.set()
    try:
        with pytest.raises(ValueError, match="a"):
            asyncio.run(main())
    finally:
        shield._abandoned.clear()
    assert done == (["a"] if abandoned else ["a", "b"])


def test_a_cancelled_caller_still_waits_and_then_is_cancelled() -> None:
    done: list[str] = []

    async def main() -> None:
        caller = asyncio.ensure_future(shielded(_teardown(done, "x")))
        await asyncio.sleep(0.05)
        caller.cancel()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert done == ["x"]

    asyncio.run(main())


def test_the_protected_task_ignores_cancel_until_a_third_ctrl_c_abandons_it() -> None:
    async def main() -> None:
        task = protected(asyncio.sleep(10))
        assert task.cancel() is False
        await asyncio.sleep(0)
        assert not task.done()
        shield._abandoned.set()
        try:
            assert task.cancel() is True
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            shield._abandoned.clear()

    asyncio.run(main())
