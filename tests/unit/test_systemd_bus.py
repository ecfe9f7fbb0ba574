"""The D-Bus façade's own logic, on a scripted connection (no claim about systemd itself: the
re-exec is exercised for real in tests/integration/systemd, test_envs_survive_a_daemon_reexec)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_next.constants import MessageType
from dbus_next.errors import DBusError
from dbus_next.message import Message

from gestvenv.exceptions import RuntimeUnavailableError, SystemdError
from gestvenv.runtime.systemd import bus as busmod
from gestvenv.runtime.systemd.bus import MANAGER, MANAGER_PATH, SystemdBus

GONE = DBusError("org.freedesktop.DBus.Error.ServiceUnknown",  # type: ignore[no-untyped-call]
                 "The name org.freedesktop.systemd1 was not provided by any .service files")
LOST = DBusError("org.freedesktop.DBus.Error.NoReply",  # type: ignore[no-untyped-call]
                 "Message recipient disconnected from message bus without replying")


class ScriptedBus:
    """Answers each call with the next scripted outcome: an exception, or a reply body."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes: Iterator[Any] = iter(outcomes)
        self.sent: list[str] = []

    def add_message_handler(self, handler: object) -> None:
        pass

    async def call(self, msg: Message) -> Message:
        self.sent.append(msg.member)
        outcome = next(self.outcomes)
        if isinstance(outcome, BaseException):
            raise outcome
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s",
                       body=[outcome])


def call(outcomes: list[Any], member: str, *, answered: bool = True) -> tuple[Any, list[str]]:
    fake = ScriptedBus(outcomes)
    bus = SystemdBus(fake, user=True)  # type: ignore[arg-type]
    bus._answered = answered

    async def go() -> Any:
        return await bus.call(MANAGER_PATH, MANAGER, member, "s", ["x"], what="testing")
    return asyncio.run(go()), fake.sent


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(busmod, "REEXEC_WAIT", 0.5)


def test_a_call_the_manager_never_received_is_sent_again_once_it_is_back() -> None:
    assert call([GONE, GONE, "ok"], "StartTransientUnit") == (["ok"], ["StartTransientUnit"] * 3)


def test_a_lost_reply_is_repeated_only_for_a_call_that_can_be() -> None:
    assert call([LOST, "ok"], "GetUnit") == (["ok"], ["GetUnit"] * 2)
    with pytest.raises(RuntimeUnavailableError, match="not reachable"):
        call([LOST, "ok"], "StartTransientUnit")  # it may have happened: not done twice


def test_a_manager_that_never_answered_is_reported_at_once() -> None:
    with pytest.raises(RuntimeUnavailableError):
        call([GONE, "ok"], "GetUnit", answered=False)


def test_it_gives_up_after_the_wait_and_other_errors_pass_through() -> None:
    with pytest.raises(RuntimeUnavailableError):
        call([GONE] * 1000, "GetUnit")
    refused = DBusError("org.freedesktop.systemd1.UnitExists", "exists")  # type: ignore[no-untyped-call]
    with pytest.raises(SystemdError, match="exists"):
        call([refused, "ok"], "StartTransientUnit")


class SlowBus:
    """Replies after a while, counting the calls awaiting their reply at once."""

    def __init__(self) -> None:
        self.pending = 0
        self.most = 0

    def add_message_handler(self, handler: object) -> None:
        pass

    async def call(self, msg: Message) -> Message:
        self.pending += 1
        self.most = max(self.most, self.pending)
        await asyncio.sleep(0.01)
        self.pending -= 1
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s",
                       body=["ok"])


def test_calls_awaiting_a_reply_at_once_stay_under_the_bus_daemons_limit() -> None:
    # dbus-daemon refuses a connection's 129th pending call ("The maximum number of pending
    # replies per connection has been reached"): 50 envs running a command at once did.
    fake = SlowBus()

    async def go() -> list[list[Any]]:
        bus = SystemdBus(fake, user=True)  # type: ignore[arg-type]
        return await asyncio.gather(*(
            bus.call(MANAGER_PATH, MANAGER, "GetUnit", "s", ["x"], what="testing")
            for _ in range(300)))

    assert asyncio.run(go()) == [["ok"]] * 300
    assert fake.most == busmod.MAX_PENDING < 128
