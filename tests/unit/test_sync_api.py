"""The blocking handle passes plain attributes through, never the async API's coroutines."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gestvenv.sync import SyncEnvironment


class _Async:
    name = "x"

    async def aclose(self) -> None: ...

    async def watch(self) -> AsyncIterator[int]:
        yield 1


def test_async_members_are_refused_with_the_way_to_reach_them() -> None:
    env = SyncEnvironment(_Async())  # type: ignore[arg-type]
    assert env.name == "x"
    with pytest.raises(AttributeError, match=r"aclose\(\) is the async API's: use "
                                             r"env.aio.aclose\(\) in async code; close\(\) here"):
        env.aclose  # noqa: B018
    with pytest.raises(AttributeError, match=r"env.aio.watch\(\)"):
        env.watch  # noqa: B018
