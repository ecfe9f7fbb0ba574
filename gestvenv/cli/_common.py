"""What every command group shares: error handling, output, running a command in the foreground."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .. import reaper
from ..exceptions import CommandNotExecutableError, CommandNotFoundError, GestvenvError

if TYPE_CHECKING:  # (the CLI imports what a command runs only when it runs: light start-up)
    from ..context import Environment
    from ..models import ExecResult

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption so that cleanup runs as for Ctrl-C."""


class UserError(click.ClickException):
    """One clear line on stderr, no traceback, exit 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"gestvenv: error: {self.format_message()}", err=True)


def handle_errors(func: F) -> F:
    """Turn gestvenv's exceptions into one line and an exit status."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CommandNotFoundError as exc:
            UserError(str(exc)).show()
            sys.exit(127)  # as a shell says "command not found"
        except CommandNotExecutableError as exc:  # before its base class, GestvenvError
            UserError(str(exc)).show()
            sys.exit(126)  # as a shell says "cannot execute"
        except GestvenvError as exc:
            raise UserError(str(exc)) from None
        except Terminated:
            click.echo("gestvenv: terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("gestvenv: interrupted", err=True)
            sys.exit(128 + signal.SIGINT)
    return wrapper  # type: ignore[return-value]


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def human_bytes(n: int | None) -> str:
    return "-" if n is None else reaper.human_bytes(n)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def remaining(expires_at: float | None) -> str:
    return "-" if expires_at is None else human_seconds(expires_at - time.time())


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def exit_status(result: ExecResult) -> int:
    """The command's status as a shell would give it (128+N for signal N, 124 for a timeout)."""
    if result.killed_by == "timeout":
        return 124
    if result.returncode < 0:
        return 128 - result.returncode
    return result.returncode


def run_foreground(env: Environment, argv: Sequence[str], *, timeout: float | None = None,
                   cwd: str | None = None) -> int:
    """Run a command attached to our terminal, as a shell would, and return its exit status.

    The command is in the terminal's foreground group, so Ctrl-C reaches it directly; like a
    shell, we ignore SIGINT meanwhile and let it decide. SIGTERM ends it (and its tree).
    """
    if argv and argv[0] == "--":  # "exec NAME -- cmd": after NAME, click keeps the "--"
        argv = argv[1:]
    if not argv:
        raise UserError("no command given")
    from ..sync import run_soon, run_sync

    if env.runtime == "systemd":  # (not imported otherwise: dbus-next costs ~15 ms to load)
        from ..runtime import SystemdRuntime

    def on_term(signum: int, frame: object) -> None:
        raise Terminated

    def on_int(signum: int, frame: object) -> None:
        """Ctrl-C is the command's to handle. (A handler, not SIG_IGN: an ignored signal stays
        ignored across exec, and the command could not be interrupted at all.)"""
        if env.runtime == "systemd":
            # The command runs in a unit, outside our terminal's process group: pass it on.
            run_soon(SystemdRuntime.signal_foreground(signum))

    old_int = signal.signal(signal.SIGINT, on_int)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        result = run_sync(env.execute(list(argv), timeout=timeout, cwd=cwd, capture=False))
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if result.killed_by is not None:
        click.echo(f"gestvenv: {argv[0]} {result.describe()}", err=True)
    return exit_status(result)
