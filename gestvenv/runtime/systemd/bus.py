"""The D-Bus façade: systemd's manager API, as few calls as gestvenv needs, on dbus-next (asyncio).

Thin on purpose: method calls are built as raw messages with explicit signatures (no
introspection round trip per object), signals are dispatched by one message handler, and every
``DBusError`` becomes a gestvenv exception here, at the boundary, never further in.

One connection per event loop and manager (the sync API runs its own loop in a helper thread,
so "one per process" in practice); it is opened on first use and reused by every environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.errors import AuthError, DBusError
from dbus_next.message import Message
from dbus_next.signature import Variant

from ...exceptions import GestvenvError, RuntimeUnavailableError, SystemdError, ValidationError
from .units import MANAGER as MANAGER
from .units import MANAGER_PATH as MANAGER_PATH
from .units import SYSTEMD as SYSTEMD
from .units import UnitInfo, bus_address

UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"

# (name, D-Bus signature, value): what StartTransientUnit takes for one property.
Property = tuple[str, str, Any]


class NoSuchUnit(GestvenvError):
    """The unit is not loaded (never started, or stopped and garbage-collected)."""


def unit_path(name: str) -> str:
    """The object path of a unit, as systemd builds it (sd_bus_path_encode)."""
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return f"{MANAGER_PATH}/unit/{''.join(out) or '_'}"


def translate(exc: DBusError, what: str) -> GestvenvError:
    """A D-Bus error as a gestvenv exception, with what was being done."""
    name = exc.type
    if name in ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject"):
        return NoSuchUnit(f"{what}: {exc.text}")
    if name in ("org.freedesktop.DBus.Error.AccessDenied",
                "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"):
        return RuntimeUnavailableError(
            f"{what}: systemd refused ({exc.text}); a non-root user's environments run under "
            "their own user manager (systemd --user)")
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NoReply",
                "org.freedesktop.DBus.Error.Disconnected"):
        return RuntimeUnavailableError(f"{what}: systemd is not reachable ({exc.text})")
    return SystemdError(f"{what}: {exc.text}", name)


# Calls awaiting their reply at once on one connection: the system bus refuses more than
# max_replies_per_connection (128 in dbus-daemon's system.conf) with "The maximum number of
# pending replies per connection has been reached" (50 envs running a command at once did).
MAX_PENDING = 64

# How long a call waits for a manager that is re-executing itself (it takes well under a
# second; a loaded machine, or a VM, takes longer).
REEXEC_WAIT = 15.0
_UNDELIVERED = ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner")
_LOST = "org.freedesktop.DBus.Error.NoReply"
# Calls that may be repeated when their reply was lost: reads, and requests whose second
# sending does what the first did.
_REPEATABLE = frozenset({"Get", "GetAll", "GetUnit", "LoadUnit", "ListUnitsByPatterns", "StopUnit",
                         "KillUnit", "ResetFailedUnit", "Subscribe", "Reload"})


class _Reexecuting(Exception):
    def __init__(self, error: GestvenvError, lost: bool) -> None:
        super().__init__(str(error))
        self.error, self.lost = error, lost


def _checked(exc: DBusError, what: str) -> Exception:
    """``exc`` translated, or marked as a call the manager may answer once it is back."""
    error = translate(exc, what)
    if exc.type in _UNDELIVERED:
        return _Reexecuting(error, lost=False)
    if exc.type == _LOST and "disconnected" in (exc.text or ""):
        return _Reexecuting(error, lost=True)
    return error


def variants(properties: Iterable[Property]) -> list[list[Any]]:
    """Properties as D-Bus ``a(sv)``; dbus-next checks each value against its signature here."""
    return [[k, Variant(sig, value)] for k, sig, value in properties]


class SystemdBus:
    """A connection to one systemd manager (the system's, or the calling user's)."""

    def __init__(self, bus: MessageBus, user: bool) -> None:
        self._bus = bus
        self.user = user
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished_jobs: dict[str, str] = {}  # JobRemoved seen before its caller asked
        self._watchers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        # What this connection already made sure of (gestvenv.slice and its cap): once each.
        self.settled: set[str] = set()
        self.settling: dict[str, asyncio.Future[None]] = {}  # being made sure of, now
        self._answered = False  # the manager has replied on this connection
        self._pending = asyncio.Semaphore(MAX_PENDING)
        bus.add_message_handler(self._on_message)

    # -- connection -------------------------------------------------------------------------

    @classmethod
    async def connect(cls, user: bool) -> SystemdBus:
        address = bus_address(user)
        try:
            bus = await MessageBus(bus_address=address,  # type: ignore[arg-type] # None: default
                                   bus_type=BusType.SYSTEM,
                                   negotiate_unix_fd=True).connect()
        except (OSError, EOFError, ValueError, AuthError) as exc:
            # ValueError: an address dbus-next cannot parse ("disabled:", set by some images).
            which = "your user manager's bus" if user else "the system bus"
            raise RuntimeUnavailableError(
                f"cannot connect to {which} ({address or 'default address'}): {exc}") from None
        except DBusError as exc:
            raise translate(exc, "connecting to systemd") from None
        self = cls(bus, user)
        try:
            await self._add_match(f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',"
                                  "member='JobRemoved'")
            await self.call(MANAGER_PATH, MANAGER, "Subscribe", "", [],
                            what="subscribing to systemd")
        except BaseException:
            self.abandon()
            raise
        return self

    @property
    def connected(self) -> bool:
        return bool(self._bus.connected)

    def close(self) -> None:
        self._bus.disconnect()  # type: ignore[no-untyped-call]

    def abandon(self) -> None:
        """Close the socket without the event loop (whose loop may be closed already)."""
        # dbus-next reads through a file made from the socket: the fd lives until both go.
        for handle in (getattr(self._bus, "_stream", None), getattr(self._bus, "_sock", None)):
            with contextlib.suppress(OSError):
                if handle is not None:
                    handle.close()

    # -- raw calls --------------------------------------------------------------------------

    async def call(self, path: str, interface: str, member: str, signature: str,
                   body: Sequence[Any], *, what: str, destination: str = SYSTEMD,
                   unix_fds: Sequence[int] = ()) -> list[Any]:
        deadline = time.monotonic() + REEXEC_WAIT
        while True:
            try:
                return await self._call_once(path, interface, member, signature, body,
                                             what=what, destination=destination,
                                             unix_fds=unix_fds)
            except _Reexecuting as exc:
                # The manager answered before and is gone from the bus: it is re-executing
                # itself (daemon-reexec, an upgrade). A call it never received is sent again;
                # one lost in the re-exec only if repeating it is harmless. (A manager that
                # never answered is not there at all: that is said at once.)
                if not self._answered or (exc.lost and member not in _REPEATABLE) \
                        or time.monotonic() > deadline:
                    raise exc.error from None
                await asyncio.sleep(0.05)

    async def _call_once(self, path: str, interface: str, member: str, signature: str,
                         body: Sequence[Any], *, what: str, destination: str,
                         unix_fds: Sequence[int]) -> list[Any]:
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=list(body), unix_fds=list(unix_fds))
        try:
            async with self._pending:
                reply = await self._bus.call(msg)
        except DBusError as exc:
            raise _checked(exc, what) from None
        except UnicodeEncodeError:
            raise ValidationError(f"{what}: a value is not valid UTF-8") from None
        except (OSError, EOFError) as exc:
            raise RuntimeUnavailableError(f"{what}: lost the connection to systemd ({exc})") \
                from None
        assert reply is not None
        if reply.message_type != MessageType.ERROR:
            self._answered = True
        else:
            error = DBusError(  # type: ignore[no-untyped-call]
                reply.error_name, str(reply.body[0]) if reply.body else "", reply=reply)
            raise _checked(error, what)
        return list(reply.body)

    async def _add_match(self, rule: str) -> None:
        await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule],
                        destination="org.freedesktop.DBus", what="subscribing to signals")

    async def _remove_match(self, rule: str) -> None:
        await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "RemoveMatch", "s",
                        [rule], destination="org.freedesktop.DBus", what="unsubscribing")

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "JobRemoved" and msg.interface == MANAGER:
            _id, job, _unit, result = msg.body
            # Kept even when someone waits: systemd merges concurrent requests into one job,
            # so a second caller may ask for this job's result after it has ended.
            self._finished_jobs[job] = result
            if len(self._finished_jobs) > 4096:  # job paths are never reused; keep recent ones
                self._finished_jobs.pop(next(iter(self._finished_jobs)))
            future = self._jobs.pop(job, None)
            if future is not None and not future.done():
                future.set_result(result)
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            for callback in self._watchers.get(msg.path, ()):
                changed = {k: v.value for k, v in msg.body[1].items()}
                callback({"__interface__": msg.body[0], **changed})
        return False  # let other handlers see it too

    async def wait_job(self, job: str) -> str:
        """The result of a job: done, canceled, timeout, failed, dependency or skipped."""
        if job in self._finished_jobs:
            return self._finished_jobs[job]
        future = self._jobs.setdefault(job, asyncio.get_running_loop().create_future())
        return await asyncio.shield(future)  # shared by every caller waiting for this job

    # -- the manager's API ------------------------------------------------------------------

    async def start_transient_unit(self, name: str, properties: Iterable[Property],
                                   aux: Iterable[tuple[str, Iterable[Property]]] = (),
                                   unix_fds: Sequence[int] = (), wait: bool = True) -> str:
        """Create and start a unit; with ``wait``, return the start job's result."""
        props = variants(properties)
        aux_units = [[n, variants(p)] for n, p in aux]
        (job,) = await self.call(MANAGER_PATH, MANAGER, "StartTransientUnit",
                                 "ssa(sv)a(sa(sv))", [name, "fail", props, aux_units],
                                 unix_fds=unix_fds, what=f"starting {name}")
        return await self.wait_job(job) if wait else "queued"

    async def stop_unit(self, name: str, wait: bool = True) -> str:
        """Stop a unit; a unit that is not loaded counts as stopped."""
        try:
            (job,) = await self.call(MANAGER_PATH, MANAGER, "StopUnit", "ss", [name, "replace"],
                                     what=f"stopping {name}")
        except NoSuchUnit:
            return "done"
        return await self.wait_job(job) if wait else "queued"

    async def set_unit_properties(self, name: str, properties: Iterable[Property]) -> None:
        """Change properties of a loaded unit now, for its current runtime (``runtime=true``:
        a drop-in under /run, gone at reboot): only those systemd allows live (a running
        service's cgroup limits and Description, not its RuntimeMaxSec)."""
        await self.call(MANAGER_PATH, MANAGER, "SetUnitProperties", "sba(sv)",
                        [name, True, variants(properties)], what=f"setting properties of {name}")

    async def kill_unit(self, name: str, signal: int, whom: str = "all") -> None:
        with contextlib.suppress(NoSuchUnit):
            await self.call(MANAGER_PATH, MANAGER, "KillUnit", "ssi", [name, whom, signal],
                            what=f"killing {name}")

    async def reset_failed(self, name: str) -> None:
        with contextlib.suppress(NoSuchUnit, SystemdError):  # not failed, or collected
            await self.call(MANAGER_PATH, MANAGER, "ResetFailedUnit", "s", [name],
                            what=f"resetting {name}")

    async def unref(self, name: str) -> None:
        """Drop the reference AddRef=yes took, so that systemd may collect the unit."""
        with contextlib.suppress(NoSuchUnit, SystemdError):
            await self.call(unit_path(name), UNIT, "Unref", "", [], what=f"releasing {name}")

    async def get_unit(self, name: str) -> str:
        (path,) = await self.call(MANAGER_PATH, MANAGER, "GetUnit", "s", [name],
                                  what=f"looking up {name}")
        return str(path)

    async def load_unit(self, name: str) -> str:
        """The unit's path, loading it from its unit file if it is not in memory (a packaged
        unit nothing has started yet)."""
        (path,) = await self.call(MANAGER_PATH, MANAGER, "LoadUnit", "s", [name],
                                  what=f"loading {name}")
        return str(path)

    async def list_units(self, patterns: Sequence[str],
                         states: Sequence[str] = ()) -> list[UnitInfo]:
        (rows,) = await self.call(MANAGER_PATH, MANAGER, "ListUnitsByPatterns", "asas",
                                  [list(states), list(patterns)], what="listing units")
        return [UnitInfo(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows]

    async def properties(self, name: str, interface: str, *, load: bool = False) -> dict[str, Any]:
        """All properties of one interface of a loaded unit (:class:`NoSuchUnit` if not).
        ``load``: load it from its unit file first (LoadState ``not-found`` if there is none)."""
        path = await (self.load_unit(name) if load else self.get_unit(name))
        (values,) = await self.call(path, PROPERTIES, "GetAll", "s", [interface],
                                    what=f"reading {name}")
        return {k: v.value for k, v in values.items()}

    async def get(self, path: str, interface: str, prop: str) -> Any:
        """One property by object path (a unit's GetAll is hundreds of values: far slower).
        For a unit known to be loaded: asking an unloaded one's path makes systemd load a stub."""
        (value,) = await self.call(path, PROPERTIES, "Get", "ss", [interface, prop],
                                   what=f"reading {prop} of {path}")
        return value.value

    async def manager_property(self, prop: str) -> Any:
        (value,) = await self.call(MANAGER_PATH, PROPERTIES, "Get", "ss", [MANAGER, prop],
                                   what=f"reading the manager's {prop}")
        return value.value

    # -- watching a unit --------------------------------------------------------------------

    async def watch(self, name: str, callback: Callable[[dict[str, Any]], None]) -> Callable[
            [], Coroutine[Any, Any, None]]:
        """Call ``callback`` with every PropertiesChanged of unit ``name``; return an async
        function that stops watching. Set up before the unit starts, so no change is missed."""
        path = unit_path(name)
        rule = (f"type='signal',sender='{SYSTEMD}',path='{path}',interface='{PROPERTIES}',"
                "member='PropertiesChanged'")
        self._watchers.setdefault(path, []).append(callback)

        def forget() -> None:
            callbacks = self._watchers.get(path, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._watchers.pop(path, None)

        try:
            await self._add_match(rule)
        except BaseException:
            forget()
            raise

        async def unwatch() -> None:
            forget()
            if self.connected:
                with contextlib.suppress(GestvenvError):
                    await self._remove_match(rule)
        return unwatch


# One connection per (event loop, manager). A loop that has been closed (``asyncio.run`` ends)
# cannot close its connection any more: its socket is closed at the next lookup instead, so
# that a program calling ``asyncio.run`` many times does not pile up connections to the bus.
_connections: dict[int, tuple[asyncio.AbstractEventLoop, dict[bool, SystemdBus]]] = {}
_connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
    weakref.WeakKeyDictionary()


def _drop_closed_loops() -> None:
    for key, (loop, per_loop) in list(_connections.items()):
        if loop.is_closed():
            del _connections[key]
            for bus in per_loop.values():
                bus.abandon()


async def connection(user: bool) -> SystemdBus:
    """This loop's connection to the manager (opened on first use, reopened if it dropped)."""
    _drop_closed_loops()
    loop = asyncio.get_running_loop()
    lock = _connecting.setdefault(loop, asyncio.Lock())
    async with lock:
        per_loop = _connections.setdefault(id(loop), (loop, {}))[1]
        bus = per_loop.get(user)
        if bus is None or not bus.connected:
            bus = per_loop[user] = await SystemdBus.connect(user)
        return bus


def forget_connections() -> None:
    """Close every cached connection (tests, and after fork: a child must not share them)."""
    for _loop, per_loop in list(_connections.values()):
        for bus in per_loop.values():
            bus.abandon()
    _connections.clear()


# A forked child must not talk on its parent's connections (their replies would go astray).
os.register_at_fork(after_in_child=forget_connections)
