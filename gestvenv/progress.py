"""Progress of long work (creating an environment, installing into it), on a terminal.

Off by default: the library, pipes, ``--quiet`` and ``--json`` see nothing of it, and the
installers run quiet, their output captured for the error. The CLI turns it on for one call
(:func:`reporting`) when stderr is a terminal (:func:`wanted`). While it is on, for the code that
runs in that context (a ContextVar: the call's task, and the threads it starts with
``asyncio.to_thread``):

- :func:`step` says what stage the work is at, one line each ("gestvenv: cloning snapshot...");
- :func:`run_live` runs an installer (uv, pip) on a pseudo-terminal of its own, without
  ``--quiet``, so that it draws its own progress (resolving, downloading with bytes, building,
  installing, compiling), copied to the terminal as it comes; the end of its output is kept,
  cleaned of terminal codes, for the error if it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import subprocess
import termios
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TextIO

PREFIX = "gestvenv: "
# What of an installer's output a failure keeps (its error is at the end).
TAIL_BYTES = 64 << 10
TAIL_LINES = 60
# Once the installer has exited, how long its last output may take to drain from the pty.
DRAIN_SECONDS = 1.0
# Terminal control sequences: CSI (colours, cursor moves, erasing), OSC (titles, links), and
# the lone ESC + one char ones.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[@-Z\\-_]")


class Reporter:
    """Where progress goes: a terminal's stream (stderr)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def step(self, text: str) -> None:
        self.stream.write(f"{PREFIX}{text}\n")
        self.stream.flush()

    def write(self, data: bytes) -> None:
        """An installer's raw output, terminal codes and all (its progress bars redraw)."""
        self.stream.flush()  # (what was written through the text layer goes first)
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.stream.write(data.decode(errors="replace"))
            self.stream.flush()
            return
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def window(self) -> bytes | None:
        """The terminal's size (struct winsize), for the installer's own terminal."""
        try:
            return fcntl.ioctl(self.stream.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        except (AttributeError, OSError, ValueError):
            return None


_current: ContextVar[Reporter | None] = ContextVar("gestvenv_progress", default=None)


def wanted(stream: TextIO, *, quiet: bool = False, as_json: bool = False) -> bool:
    """Whether a command should report progress on ``stream``: a terminal, not --quiet or
    --json (whose output must stay what it says)."""
    if quiet or as_json:
        return False
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def reporting(stream: TextIO, *, enabled: bool = True) -> Iterator[Reporter | None]:
    """Progress on ``stream`` for the code run inside the block (nothing if not ``enabled``)."""
    if not enabled:
        yield None
        return
    reporter = Reporter(stream)
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        _current.reset(token)


def current() -> Reporter | None:
    return _current.get()


def step(text: str) -> None:
    """Say what stage the work is at, when reporting; nothing otherwise."""
    reporter = _current.get()
    if reporter is not None:
        reporter.step(text)


def size(nbytes: int) -> str:
    """``nbytes`` for a person: "512 B", "3.4 MB"."""
    if nbytes < 1000:
        return f"{nbytes} B"
    value, unit = nbytes / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


class Tail:
    """The last bytes of an output, read back as its last lines of text."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        while self.size - len(self.chunks[0]) >= TAIL_BYTES:
            self.size -= len(self.chunks.popleft())

    def text(self) -> str:
        return clean(b"".join(self.chunks).decode(errors="replace"))


def clean(text: str) -> str:
    """Terminal output as the lines it leaves: codes removed, each line as its last redraw
    (after its last carriage return), blank ones dropped; the last TAIL_LINES."""
    lines = []
    for line in _ANSI.sub("", text).replace("\r\n", "\n").split("\n"):
        line = line.rsplit("\r", 1)[-1].rstrip()
        if line.strip():
            lines.append(line)
    return "\n".join(lines[-TAIL_LINES:])


def _as_ours(slave: int, reporter: Reporter) -> None:
    """The installer's terminal as ours: its size (progress bars fit), and its output passed
    as written (no newline turned into CR LF: our own terminal does that, once)."""
    window = reporter.window()
    with contextlib.suppress(OSError, termios.error):
        if window is not None:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, window)
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR  # (oflag)
        termios.tcsetattr(slave, termios.TCSANOW, attrs)


async def run_live(argv: Sequence[str], env: Mapping[str, str],
                   reporter: Reporter) -> tuple[int, str]:
    """Run ``argv`` with its stdout and stderr on a new pseudo-terminal (stdin: /dev/null)
    whose output is copied to ``reporter`` as it comes; (its exit status, the end of its
    output as text). Cancelled, it kills the installer and waits for it."""
    master, slave = os.openpty()
    _as_ours(slave, reporter)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=dict(env))
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # (the child has its own: the master sees EOF when it is gone)
    loop = asyncio.get_running_loop()
    tail = Tail()
    ended = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: every end of the slave is closed
            data = b""
        if not data:
            loop.remove_reader(master)
            if not ended.done():
                ended.set_result(None)
            return
        tail.add(data)
        with contextlib.suppress(OSError):  # (a terminal gone does not fail the install)
            reporter.write(data)

    loop.add_reader(master, readable)
    try:
        await proc.wait()
        # What it wrote last may still be in the pty; a child it left holding the pty open
        # does not hold us.
        await asyncio.wait({ended}, timeout=DRAIN_SECONDS)
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    finally:
        loop.remove_reader(master)
        os.close(master)
    return proc.returncode or 0, tail.text()
