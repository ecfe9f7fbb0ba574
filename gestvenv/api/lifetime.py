"""The service process's life around :func:`~gestvenv.api.server.serve`: its sockets made,
the signals that stop it noted for its whole life, its loop closed, its socket removed.

- **Sockets.** The TCP ones are bound and checked first, so a refused TCP start has
  published nothing; then the unix one, at its path only once it listens
  (:mod:`.unix_listener`). Without ``--socket`` nor ``--listen``, the sockets systemd passed.
- **Signals.** SIGTERM and SIGINT are noted from the start (:class:`Stops`): one that comes
  before the loop takes them over stops the service as soon as it has started. The default
  action would kill it with its socket left, refusing clients, and an exception raised at any
  point could leave asyncio half-built. serve() hands them back as it found them (noted)
  before its loop closes, which would put them to their default action: a second Ctrl-C while
  the socket is removed is noted, not a kill. (Not by blocking them until the loop has closed:
  that needs its executor shut down first, and a task aiohttp cancelled but left running
  would lose the threads its shielded undo needs.)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exceptions import GestvenvError

if TYPE_CHECKING:
    import ssl

    from .server import Limits
    from .unix_listener import UnixListener

#: The signals that stop the service (serve() takes them over, then hands them back).
STOPS = (signal.SIGTERM, signal.SIGINT)


class Stops:
    """SIGTERM and SIGINT, noted (in ``asked``) rather than acted on."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.install()

    def install(self) -> None:
        for signum in STOPS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.asked.append(signum)


def run(*, socket_path: str | None, listen: Sequence[str], stops: Stops,
        idle_exit: float | None, limits: Limits, tls: ssl.SSLContext | None,
        token_hashes: frozenset[str]) -> None:
    """Serve until stopped: on ``socket_path`` (default: the user's or root's socket) and
    each ``listen`` address, or, with neither, on the sockets systemd passed (then exiting
    after 60 s idle unless ``idle_exit`` says otherwise)."""
    from . import server
    from .client import default_socket
    from .unix_listener import listen_unix

    if socket_path == "":  # (an unset variable: not the default socket in its place)
        raise GestvenvError("--socket: an empty path")
    sockets = [] if (socket_path or listen) else server.inherited_sockets()
    where = [str(s.getsockname()) for s in sockets]
    if idle_exit is None and sockets:
        idle_exit = 60.0
    bound: list[socket.socket] = []
    published: UnixListener | None = None
    try:
        if not sockets:
            for address in listen:  # first: a refused TCP start has published nothing
                bound.append(server.bind_tcp(address))
                server.check_tcp(bound[-1], tls is not None, token_hashes)
                where.append(str(bound[-1].getsockname()))
            if socket_path or not listen:
                published = listen_unix(socket_path or default_socket())
                where.insert(0, published.path)
            sockets = ([published.sock] if published else []) + bound

        def ready() -> None:
            print(f"gestvenv: serving the API on {', '.join(where)}"
                  + (f" (exits after {idle_exit:g} s idle)" if idle_exit else ""),
                  file=sys.stderr, flush=True)

        if not stops.asked:
            asyncio.run(server.serve(
                sockets, idle_exit=idle_exit, limits=limits, ready=ready, tls=tls,
                token_hashes=token_hashes, stop_asked=lambda: bool(stops.asked)))
    finally:
        stops.install()  # (as serve() hands them back; also after a failed start)
        for sock in bound:
            sock.close()
        if published is not None:
            try:
                published.remove()
            except GestvenvError as exc:  # said, not in place of the service's own error
                print(f"gestvenv: {exc}", file=sys.stderr, flush=True)
