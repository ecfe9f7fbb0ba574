"""``--host URL`` (or ``GESTVENV_HOST``): the commands that act through a gestvenv service
(``gestvenv serve``) instead of this machine's library: create, list, show, exec, run, extend and
cleanup by name, with the same options and output. Each goes through the client
(:mod:`gestvenv.api.client`), as a program would; the others say they are local-only."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from ._common import UserError, echo_json, exit_status, remaining, table

if TYPE_CHECKING:
    from ..handle import CommandHandle

HOST_ENV = "GESTVENV_HOST"


def host() -> str | None:
    """The service this command acts through, or None (this machine)."""
    ctx = click.get_current_context(silent=True)
    url = ctx.find_root().meta.get("gestvenv.host") if ctx is not None else None
    return url or os.environ.get(HOST_ENV) or None


def refuse(command: str) -> None:
    """A command that has no remote form yet: said, never done locally by mistake."""
    if host() is not None:
        raise UserError(f"`{command}` acts on this machine only: it has no --host form "
                        f"(unset {HOST_ENV} or drop --host)")


def _run(coro_factory: Any) -> Any:
    import asyncio

    from ..api.client import connect

    async def main() -> Any:
        async with connect(host()) as client:
            return await coro_factory(client)

    return asyncio.run(main())


def create(name: str | None, request: dict[str, Any], *, as_json: bool) -> None:
    if request.pop("runtime", None) is not None:
        raise UserError("--runtime is the service's to choose: not taken with --host")
    env = _run(lambda c: c.create_environment(name, **request))
    if as_json:
        echo_json(env.info)
    else:
        click.echo(f"created {env.name} at {env.path} (through {host()})")
        for note in env.info.get("notes", []):
            click.echo(f"note: {note}", err=True)


def list_(as_json: bool) -> None:
    infos = _run(lambda c: c.list_environments())
    if as_json:
        echo_json(infos)
        return
    if not infos:
        click.echo("no environments")
        return
    rows = [(i["name"], i["state"], i["runtime"], i["storage_backend"] or "-",
             i["python"] or "-", remaining(i["expires_at"]), str(i["owner_pid"] or "-"),
             ",".join(i["packages"]) or "-") for i in infos]
    table(rows, ("NAME", "STATE", "RUNTIME", "STORAGE", "PYTHON", "TTL LEFT", "OWNER",
                 "PACKAGES"))


def show(name: str, *, as_json: bool) -> None:
    async def both(c: Any) -> tuple[Any, Any]:
        env = await c.attach(name)
        return env.info, await env.usage()

    info, usage = _run(both)
    if as_json:
        echo_json({**info, "usage": usage})
        return
    for key in ("name", "state", "path", "runtime", "python", "storage_backend"):
        click.echo(f"{key + ':':<13}{info.get(key)}")
    click.echo(f"{'ttl left:':<13}{remaining(info.get('expires_at'))}")
    click.echo(f"{'packages:':<13}{', '.join(info.get('packages') or []) or '-'}")
    click.echo(f"{'usage:':<13}{usage.get('processes')} processes, "
               f"{usage.get('memory_bytes')} bytes memory, {usage.get('disk_bytes')} bytes disk")
    for line in (*info.get("notes", []), *info.get("guarantees", [])):
        click.echo(f"{'note:':<13}{line}")


def extend(name: str, seconds: float) -> None:
    async def extended(c: Any) -> float:
        env = await c.attach(name)
        return float(await env.extend_ttl(seconds))

    click.echo(f"extended {name}: it ends in {remaining(_run(extended))} (through {host()})")


def stats() -> None:
    echo_json(_run(lambda c: c.global_stats()))


def run_once(name: str | None, request: dict[str, Any], argv: Sequence[str], *,
             timeout: float | None, cwd: str | None) -> int:
    """``ephemeral run`` through the service: an env held by this connection for the
    command's time (this process killed, the service ends it)."""
    if request.pop("runtime", None) is not None:
        raise UserError("--runtime is the service's to choose: not taken with --host")
    if argv and argv[0] == "--":
        argv = argv[1:]

    async def run(c: Any) -> Any:
        async with c.ephemeral(name, **request) as env:
            return await _forwarded(lambda handle: env.execute(
                list(argv), timeout=timeout, cwd=cwd, stream=True, handle=handle))

    return _status(_run(run), argv)


def execute(name: str, argv: Sequence[str], *, timeout: float | None,
            cwd: str | None) -> int:
    """The command's output as it comes; its exit status as a shell gives it."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError("no command given")

    async def run(c: Any) -> Any:
        env = await c.attach(name)
        return await _forwarded(lambda handle: env.execute(
            list(argv), timeout=timeout, cwd=cwd, stream=True, handle=handle))

    return _status(_run(run), argv)


async def _forwarded(run: Callable[[CommandHandle], Awaitable[Any]]) -> Any:
    """The remote command run with this process's INT, TERM and HUP sent on to it, as a
    command in a terminal's foreground gets them (it may handle them). A second INT, or one
    before the command has started, ends it whole: the stream is dropped, the service kills
    its tree."""
    import asyncio
    import functools
    import signal

    from ..handle import CommandHandle

    handle = CommandHandle()
    task = asyncio.ensure_future(run(handle))
    loop = asyncio.get_running_loop()
    interrupts = 0

    def forward(signum: int) -> None:
        nonlocal interrupts
        interrupts += signum == signal.SIGINT
        if interrupts > 1 or not handle.running:
            task.cancel()
            return
        sending = asyncio.ensure_future(handle.signal(signum))
        sending.add_done_callback(functools.partial(_said, signum))

    def _said(signum: int, sending: asyncio.Future[None]) -> None:
        """A signal that did not reach the command, said (one that ended meanwhile: not)."""
        from ..exceptions import CommandNotRunningError

        failed = None if sending.cancelled() else sending.exception()
        if failed is not None and not isinstance(failed, CommandNotRunningError):
            click.echo(f"gestvenv: {signal.Signals(signum).name} not delivered to the "
                       f"command: {failed}", err=True)

    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signum in caught:
        loop.add_signal_handler(signum, forward, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled():
            raise SystemExit(130) from None
        raise
    finally:
        for signum in caught:
            loop.remove_signal_handler(signum)


def _status(result: Any, argv: Sequence[str]) -> int:
    """What a shell would say of the command's end (as run_foreground does)."""
    if result.killed_by is not None:
        click.echo(f"gestvenv: {argv[0]} {result.describe()}", err=True)
    sys.stdout.flush()
    return exit_status(result)


def cleanup(names: Sequence[str], *, as_json: bool, quiet: bool) -> None:
    report = _run(lambda c: c.cleanup_environments(names))
    if as_json:
        echo_json(report)
    else:
        for name, reason in report["removed"].items():
            click.echo(f"removed {name} ({reason})")
        for name, error in report["errors"].items():
            click.echo(f"gestvenv: error: {name}: {error}", err=True)
        if not (report["removed"] or report["errors"] or quiet):
            click.echo("nothing to clean up")
    if report["errors"]:
        raise SystemExit(1)
