"""The runtime interface: what runs an environment's processes and enforces its limits.

It is shaped after systemd's model so that both runtimes fit it: an environment is a group
(a slice under systemd, a marker on every process locally) that holds its limits; every command
is a unit of its own inside that group; the environment's lifetime (TTL) is held by the runtime,
not by the process that created it.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..models import Enforcement, ExecResult, IsolationLevel, ResourceLimits
from ..registry import EnvRecord
from .unitview import UnitView

if TYPE_CHECKING:
    from ..handle import CommandHandle

# Called with ("stdout" | "stderr", text) as output arrives, when streaming.
# (stream name, text); a callback that returns an awaitable is awaited before more is read:
# the command then waits on its pipe (backpressure), as it would for a slow terminal.
StreamCallback = Callable[[str, str], object]


def console_stream(stream: bool | StreamCallback) -> StreamCallback | None:
    """``execute(stream=...)``'s value as a callback: True writes each piece to our stdout
    or stderr as it comes (the library's and the API client's)."""
    if stream is True:
        import sys

        def write(name: str, text: str) -> None:
            out = sys.stdout if name == "stdout" else sys.stderr
            out.write(text)
            out.flush()
        return write
    return stream or None


async def streamed(stream: StreamCallback, name: str, text: str) -> None:
    """Give ``text`` to ``stream``, waiting for it when it asks to (see StreamCallback)."""
    result = stream(name, text)
    if inspect.isawaitable(result):
        await result


@dataclass(frozen=True)
class CommandSpec:
    """A fully resolved command: argv with an absolute program, the complete environment."""

    argv: tuple[str, ...]
    environ: Mapping[str, str]
    cwd: str | None
    input: bytes | None
    timeout: float | None
    capture: bool = True
    stream: StreamCallback | None = None
    # Variables set for this command on purpose (by the caller, the env's creation, an
    # installer), even where they equal ours: a container passes only those, and its terminal's.
    passed: tuple[str, ...] = ()
    # At most this many bytes of stdout, and of stderr, kept for the result (a ``stream``
    # still gets every byte): a command that prints without end costs its caller no memory.
    output_limit: int | None = None
    # Armed by the runtime while the command runs: signals sent to it (gestvenv.handle).
    handle: CommandHandle | None = field(default=None, compare=False)

    def kept(self, chunks: list[bytes], data: bytes) -> None:
        """Keep ``data`` of one stream for the result, within :attr:`output_limit`."""
        if self.output_limit is None:
            chunks.append(data)
            return
        room = self.output_limit - sum(map(len, chunks))
        if room > 0:
            chunks.append(data[:room])


@dataclass(frozen=True)
class Usage:
    """What an environment uses right now, as its runtime measures it (the richer, public
    figures are :class:`gestvenv.monitor.EnvUsage`)."""

    processes: int
    memory_bytes: int
    cpu_seconds: float
    disk_bytes: int
    # The highest memory use the runtime can vouch for, and what it is: None where it cannot
    # be measured (a user manager without the memory controller).
    memory_peak_bytes: int | None = None
    memory_peak_source: str | None = None


class Runtime(abc.ABC):
    name: str

    async def prepare(self) -> None:  # noqa: B027 - optional hook
        """Connect and probe what the host can enforce; called before :meth:`plan`."""

    def watch_creators(self) -> None:  # noqa: B027 - optional hook
        """Make sure something outside this process holds the TTL, the idle timeout and a
        dead creator of this runtime's environments (blocking; called in a thread before and
        after a new env's state file is written). systemd holds them itself: nothing to do."""

    async def live_environments(self, known: Mapping[str, str] | None = None
                                ) -> dict[str, UnitView] | None:
        """Env name -> its unit, from the runtime's own view; None if it has none. ``known``:
        the caller's envs (name -> id), which the runtime may recognise more cheaply."""
        return None

    @abc.abstractmethod
    def plan(self, limits: ResourceLimits, isolation: IsolationLevel) -> Enforcement:
        """What this runtime would enforce for these limits and isolation (no side effects)."""

    @abc.abstractmethod
    async def start(self, record: EnvRecord) -> None:
        """Make the environment's group live: limits and TTL held by the runtime from now on."""

    @abc.abstractmethod
    async def start_container(self, record: EnvRecord) -> EnvRecord:
        """Start the env's container (container isolation), once its dir exists; the record
        with what it became (:mod:`.container`)."""

    @abc.abstractmethod
    async def run(self, record: EnvRecord, command: CommandSpec) -> ExecResult:
        """Run one command inside the environment and wait for it."""

    @abc.abstractmethod
    async def stop(self, record: EnvRecord) -> None:
        """End every process of the environment and release what ``start`` took. Idempotent."""

    @abc.abstractmethod
    async def usage(self, record: EnvRecord) -> Usage:
        """Processes, memory (now and peak) and CPU of the environment (disk is measured by
        the caller)."""

    async def usage_many(self, records: Sequence[EnvRecord]) -> list[Usage]:
        """:meth:`usage` of several environments, read at once (``top``)."""
        return list(await asyncio.gather(*(self.usage(r) for r in records)))

    @abc.abstractmethod
    def guarantees(self, record: EnvRecord | None = None) -> Sequence[str]:
        """Human-readable notes on what this runtime cannot guarantee (shown by ``show``), for
        ``record`` where they depend on how its env was made (a pooled env's TTL)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the environments themselves stay as they are."""
