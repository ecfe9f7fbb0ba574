"""A running command's handle: signals sent to it while it runs.

``execute(..., handle=h)`` arms ``h`` once the command has started and disarms it when the
command ends; :meth:`CommandHandle.signal` then delivers a signal to the command's processes,
by the runtime's own means: its transient unit's cgroup (systemd's ``KillUnit``, every process
of the unit), or every process carrying the command's marker and holding its output pipes
(the local runtime, bubblewrap, a container's ``exec``). A signal is the command's to handle:
``TERM`` that it traps is not an end; a deadline or a cancellation still ends the whole tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable

from .exceptions import CommandNotRunningError, ValidationError

# What a caller may send. Not KILL's stand-ins for stopping a tree (cancel does that, whole)
# nor signals that mean a fault (SEGV, BUS...): a command's own signals and job control.
SENDABLE = frozenset({"HUP", "INT", "QUIT", "TERM", "USR1", "USR2", "KILL", "CONT", "STOP",
                      "TSTP", "WINCH", "ALRM"})

Deliver = Callable[[int], Awaitable[None]]


def signal_number(sig: int | str) -> int:
    """The number of a sendable signal given as a number, ``"TERM"`` or ``"SIGTERM"``
    (ValidationError otherwise)."""
    if isinstance(sig, bool):
        raise ValidationError(f"not a signal: {sig!r}")
    if isinstance(sig, int):
        try:
            name = signals.Signals(sig).name.removeprefix("SIG")
        except ValueError:
            raise ValidationError(f"not a signal number: {sig!r}") from None
    elif isinstance(sig, str):
        name = sig.strip().upper().removeprefix("SIG")
    else:
        raise ValidationError(f"not a signal: {sig!r}")
    if name not in SENDABLE:
        raise ValidationError(f"signal {sig!r} cannot be sent to a command; one of: "
                              + ", ".join(sorted(SENDABLE)))
    return int(getattr(signals, f"SIG{name}"))


# Seconds a signal sent while the command is being started waits for it to be running.
START_WAIT = 30.0


class CommandHandle:
    """Pass to :meth:`Environment.execute` (``handle=``) to signal the command while it runs:
    ``await handle.signal("TERM")``. One command at a time; reusable once it has ended."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        # idle (never used), starting (execute() called: taken), running, ended
        self._state = "idle"
        self._changed: asyncio.Event | None = None
        # Shared by a service's handles: how many walks of /proc (each in a worker thread) its
        # callers' signals may make at once. Taken per walk, not while a delivery waits for a
        # wrapped command to appear: a waiting delivery holds no one else's signals.
        self._walks: asyncio.Semaphore | None = None

    @property
    def running(self) -> bool:
        """True from the call of ``execute()`` that took it to the command's end."""
        return self._state in ("starting", "running")

    async def signal(self, sig: int | str) -> None:
        """Send ``sig`` (a number, ``"TERM"`` or ``"SIGTERM"``) to the command's processes; sent
        while the command is being started, it is delivered once it runs.
        :class:`CommandNotRunningError` if no command was started or it has ended."""
        number = signal_number(sig)
        deliver = await self._once_running()
        await deliver(number)  # (at once: a command that ends meanwhile is its delivery's)

    @contextlib.asynccontextmanager
    async def _walk_slot(self) -> AsyncIterator[None]:
        """Held by a delivery for each walk of /proc (see ``_walks``)."""
        if self._walks is None:
            yield
            return
        async with self._walks:
            yield

    async def _once_running(self) -> Deliver:
        """What delivers a signal to the command, once it runs (waited for while it starts,
        :data:`START_WAIT` at most)."""
        if self._state == "starting":
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), START_WAIT)
            except TimeoutError:
                raise CommandNotRunningError(
                    f"the command has not started in {START_WAIT:g} s") from None
        deliver = self._deliver
        if deliver is None:
            raise CommandNotRunningError(
                "the command has ended" if self._state == "ended" else
                "the command has not started")
        return deliver

    # (The side of execute() and the runtimes: taken at the call, so that two commands never
    # share it; running once started; ended whatever happened.)
    def _take(self) -> None:
        if self.running:
            raise ValidationError("this CommandHandle is running another command")
        self._state, self._deliver = "starting", None

    def _arm(self, deliver: Deliver) -> None:
        if self._state == "running":
            raise ValidationError("this CommandHandle is running another command")
        self._deliver, self._state = deliver, "running"
        self._wake()

    def _disarm(self) -> None:
        self._deliver, self._state = None, "ended"
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
