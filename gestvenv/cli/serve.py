"""``gestvenv serve``: the REST API (a shell over the library, in gestvenv.api.server)."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import UserError, handle_errors


@click.command("serve")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Bind this unix socket (default: the sockets systemd passed when "
                   "socket-activated, else /run/gestvenv/api.sock for root and "
                   "$XDG_RUNTIME_DIR/gestvenv/api.sock for a user).")
@click.option("--listen", "listen", multiple=True, metavar="tcp://HOST:PORT",
              help="Also serve TCP there: bearer tokens (--tokens) always, TLS (--tls-cert, "
                   "--tls-key) unless HOST is loopback. Repeatable.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="The TLS certificate (chain) for TCP, PEM.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="The TLS certificate's private key, PEM.")
@click.option("--tokens", "tokens_file", type=click.Path(exists=True, dir_okay=False),
              help="The hashes of the bearer tokens TCP callers may send (one sha256:<hex> "
                   "per line: --new-token makes them).")
@click.option("--new-token", "new_token", type=click.Path(dir_okay=False), metavar="FILE",
              help="Make a bearer token, add its hash to FILE (created 0600), print the token "
                   "(shown once, kept nowhere), and exit.")
@click.option("--idle-exit", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Exit after this long without a request or a connection (default: 60 "
                   "when socket-activated, never otherwise).")
@click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE",
              help="Override one of the service's bounds, e.g. write_timeout=10 (the fields of "
                   "gestvenv.api.server.Limits; repeatable).")
@handle_errors
def serve_command(socket_path: str | None, listen: tuple[str, ...], tls_cert: str | None,
                  tls_key: str | None, tokens_file: str | None, new_token: str | None,
                  idle_exit: float | None, limits: tuple[str, ...]) -> None:
    """Serve the REST API (under /v1; its OpenAPI document at /v1/openapi.json) on a unix
    socket, where each caller is known by its uid (SO_PEERCRED), and optionally over TCP,
    with bearer tokens and TLS. Usually started by systemd: gestvenv-api.socket."""
    from ..api.lifetime import Stops

    # First: a Ctrl-C or SIGTERM from now on stops the service cleanly (gestvenv.api.lifetime).
    stops = Stops()
    from .remote import refuse

    refuse("serve")
    try:
        from ..api import lifetime, server, tokens
    except ImportError as exc:
        raise UserError(f"gestvenv serve needs aiohttp ({exc}): reinstall gestvenv "
                        "or apt install python3-aiohttp") from None

    if new_token:
        click.echo(tokens.new_token(Path(new_token)))
        return
    bounds = server.Limits()
    for item in limits:
        key, _, value = item.partition("=")
        if not hasattr(bounds, key):
            raise UserError(f"--limit {item!r}: no such bound")
        setattr(bounds, key, type(getattr(bounds, key))(value))
    hashes: frozenset[str] = frozenset()
    if tokens_file:
        try:
            hashes = tokens.parse(Path(tokens_file).read_text())
        except ValueError as exc:
            raise UserError(f"{tokens_file}: {exc}") from None
    tls = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise UserError("TLS needs both --tls-cert and --tls-key")
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(tls_cert, tls_key)
    lifetime.run(socket_path=socket_path, listen=listen, stops=stops, idle_exit=idle_exit,
                 limits=bounds, tls=tls, token_hashes=hashes)
