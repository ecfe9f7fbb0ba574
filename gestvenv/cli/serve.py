"""``gestvenv serve``: the REST API (a shell over the library, in gestvenv.api.server)."""

from __future__ import annotations

import click

from ._common import UserError, handle_errors


@click.command("serve")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Bind this unix socket (default: the socket systemd passed when "
                   "socket-activated, else /run/gestvenv/api.sock for root and "
                   "$XDG_RUNTIME_DIR/gestvenv/api.sock for a user).")
@click.option("--idle-exit", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Exit after this long without a request or a connection (default: 60 "
                   "when socket-activated, never otherwise).")
@click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE",
              help="Override one of the service's bounds, e.g. write_timeout=10 (the fields of "
                   "gestvenv.api.server.Limits; repeatable).")
@handle_errors
def serve_command(socket_path: str | None, idle_exit: float | None,
                  limits: tuple[str, ...]) -> None:
    """Serve the REST API (under /v1; its OpenAPI document at /v1/openapi.json) on a unix
    socket: each caller is known by its uid (SO_PEERCRED) and acts on this user's
    environments only. Usually started by systemd: gestvenv-api.socket."""
    import asyncio

    from .remote import refuse

    refuse("serve")
    try:
        from ..api import server
    except ImportError as exc:
        raise UserError(f"gestvenv serve needs aiohttp ({exc}): reinstall gestvenv "
                        "or apt install python3-aiohttp") from None
    from ..api.client import default_socket

    bounds = server.Limits()
    for item in limits:
        key, _, value = item.partition("=")
        if not hasattr(bounds, key):
            raise UserError(f"--limit {item!r}: no such bound")
        setattr(bounds, key, type(getattr(bounds, key))(value))
    sockets = [] if socket_path else server.inherited_sockets()
    activated = bool(sockets)
    if not sockets:
        sockets = [server.bind_unix(socket_path or default_socket())]
    if idle_exit is None and activated:
        idle_exit = 60.0

    def ready() -> None:
        where = ", ".join(str(s.getsockname()) for s in sockets)
        click.echo(f"gestvenv: serving the API on {where}"
                   + (f" (exits after {idle_exit:g} s idle)" if idle_exit else ""), err=True)

    asyncio.run(server.serve(sockets, idle_exit=idle_exit, limits=bounds, ready=ready))
