"""gestvenv.progress: off unless turned on, stage lines, an installer's terminal copied live."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import struct
import sys
import termios
import textwrap
import time

import pytest

from gestvenv import progress


def test_it_is_off_unless_turned_on_and_only_for_the_block() -> None:
    out = io.StringIO()
    progress.step("nobody hears this")
    with progress.reporting(out, enabled=False) as off:
        assert off is None and progress.current() is None
        progress.step("nor this")
    with progress.reporting(out) as on:
        assert progress.current() is on
        progress.step("writing its virtualenv")
    assert progress.current() is None
    progress.step("nor this, after")
    assert out.getvalue() == "gestvenv: writing its virtualenv\n"


def test_threads_started_from_the_call_report_too() -> None:
    out = io.StringIO()

    async def call() -> None:
        await asyncio.to_thread(progress.step, "cloning")

    with progress.reporting(out):
        asyncio.run(call())
    assert out.getvalue() == "gestvenv: cloning\n"


def test_only_a_terminal_wants_it_and_never_with_quiet_or_json() -> None:
    assert not progress.wanted(io.StringIO())

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress.wanted(Tty())
    assert not progress.wanted(Tty(), quiet=True)
    assert not progress.wanted(Tty(), as_json=True)


def test_sizes_read_as_a_person_reads_them() -> None:
    assert [progress.size(n) for n in (0, 999, 1000, 123_456, 12_345_678, 5 * 10**9)] == [
        "0 B", "999 B", "1.0 kB", "123.5 kB", "12.3 MB", "5.0 GB"]


def test_terminal_output_is_cleaned_to_the_lines_it_leaves() -> None:
    raw = ("\x1b[2mUsing CPython\x1b[0m\r\n\x1b[37m⠋\x1b[0m Resolving...\r\x1b[2K⠙ Resolving..."
           "\r\x1b[2KResolved 3 packages\r\n\r\n\x1b]8;;http://x\x07link\x1b]8;;\x07\r\n"
           "error: \x1b[1mnope\x1b[0m\n")
    assert progress.clean(raw) == "Using CPython\nResolved 3 packages\nlink\nerror: nope"


def test_the_tail_keeps_the_end() -> None:
    tail = progress.Tail()
    for n in range(20000):
        tail.add(f"line {n}\n".encode())
    assert tail.size < progress.TAIL_BYTES + 100
    lines = tail.text().splitlines()
    assert len(lines) == progress.TAIL_LINES and lines[-1] == "line 19999"


CHILD = textwrap.dedent("""
    import fcntl, struct, sys, termios, time
    rows, cols = struct.unpack("hh", fcntl.ioctl(2, termios.TIOCGWINSZ, b"\\0" * 4))
    print("tty", sys.stdout.isatty(), sys.stderr.isatty(), sys.stdin.isatty(), flush=True)
    time.sleep(0.3)
    sys.stderr.write("\\x1b[32m50%\\x1b[0m\\r100%\\n")
    print("size", rows, cols, flush=True)
    print("error: it failed", file=sys.stderr)
    sys.exit(3)
""")


class Terminal(io.StringIO):
    """A reporter's stream that keeps when each write came."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def write(self, text: str) -> int:
        self.times.append(time.monotonic())
        return super().write(text)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("not a file")


def test_an_installer_runs_on_a_terminal_of_its_own_copied_as_it_comes() -> None:
    out = Terminal()
    reporter = progress.Reporter(out)
    started = time.monotonic()
    code, tail = asyncio.run(progress.run_live([sys.executable, "-c", CHILD], {}, reporter))
    ended = time.monotonic()
    assert code == 3
    assert out.getvalue().startswith("tty True True False\n")  # no CR LF: passed as written
    assert out.times[0] - started < ended - started - 0.25     # live, not at the end
    # The tail is text: codes gone, each line as it was left.
    assert tail == "tty True True False\n100%\nsize 0 0\nerror: it failed"


def test_the_installers_terminal_is_as_wide_as_ours() -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("hhhh", 40, 120, 0, 0))
    with open(slave, "w") as ours:
        code, tail = asyncio.run(progress.run_live([sys.executable, "-c", CHILD], {},
                                                   progress.Reporter(ours)))
    # One read returns what the tty layer has passed on so far, which may be the first line
    # only; with the slave closed, the master gives the rest and then EIO.
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    copied = b"".join(chunks).decode()
    assert code == 3
    assert "size 40 120" in tail.splitlines()
    assert "size 40 120" in copied and "\x1b[32m50%" in copied  # raw, as it drew it


def test_a_cancelled_install_kills_the_installer() -> None:
    reporter = progress.Reporter(Terminal())

    async def main() -> float:
        task = asyncio.ensure_future(progress.run_live(
            [sys.executable, "-c", "import time; print('go', flush=True); time.sleep(60)"], {},
            reporter))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(main()) < 5
