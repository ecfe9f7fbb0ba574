"""How the systemd runtime tells env units apart, in as few calls as it can, against a real
systemd: one ListUnitsByPatterns for the whole listing, one call before each command, and
never a unit of another env (or an older gestvenv's unit) taken for ours."""

from __future__ import annotations

import asyncio
import collections
import uuid
from typing import Any

import pytest

import gestvenv
from gestvenv import listing, registry
from gestvenv.context import build_command
from gestvenv.exceptions import EnvironmentClosedError
from gestvenv.runtime import runtime_named
from gestvenv.runtime.systemd import bus as sdbus
from gestvenv.runtime.systemd import live_units, plan, units

from .test_systemd_runtime import SD, run, units_of


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """The D-Bus calls this process makes, by member."""
    counted: collections.Counter[str] = collections.Counter()
    original = sdbus.SystemdBus._call_once

    async def counting(self: Any, path: str, interface: str, member: str, *args: Any,
                       **kwargs: Any) -> Any:
        counted[member] += 1
        return await original(self, path, interface, member, *args, **kwargs)

    monkeypatch.setattr(sdbus.SystemdBus, "_call_once", counting)
    return counted


async def foreign_unit(name: str, description: str, env_id: str, state_file: str) -> None:
    """A unit of env name ``name`` that is not ours: another registry's, or an older
    gestvenv's (its Description without the id)."""
    await run("systemd-run", "--quiet", "--unit", f"gestvenv-{name}", "--description",
              description, f"--setenv={plan.UNIT_ENV_ID}={env_id}",
              f"--setenv={plan.UNIT_STATE_FILE}={state_file}", "sleep", "300", check=True)


async def test_the_listing_asks_systemd_once_for_every_unit(
        calls: collections.Counter[str]) -> None:
    envs = [await gestvenv.create_environment(f"sd-view{i}", runtime=SD, ttl=300)
            for i in range(8)]
    try:
        records = await asyncio.to_thread(registry.list_records)
        await live_units()  # (the loop's connection, opened once)
        calls.clear()
        units = await live_units({r.name: r.id for r in records})
        assert calls == {"ListUnitsByPatterns": 1}
        assert units is not None
        for env in envs:
            view = units[env.name]
            assert (view.env_id, view.state) == (env.id, "active")
            assert view.state_file == str(registry.state_path(env.name))
            assert not view.orphaned()
        listed = {e["name"]: e for e in gestvenv.list_environments()}
        assert all(listed[e.name]["state"] == "ready" for e in envs)
        # One call before a command (its env's unit), none to read how it ended.
        calls.clear()
        assert (await envs[0].execute(["sh", "-c", "exit 3"])).returncode == 3
        assert calls["ListUnitsByPatterns"] == 1 and calls["Get"] == 0
        assert calls["StartTransientUnit"] == 1
    finally:
        for env in envs:
            await gestvenv.destroy_environment(env.name)


async def test_list_reads_the_same_units_through_busctl(
        calls: collections.Counter[str]) -> None:
    """The CLI's table asks through busctl (no dbus-next, no loop): the same views as the
    runtime's, and the runtime's path only when busctl cannot place a unit."""
    envs = [await gestvenv.create_environment(f"sd-busctl{i}", runtime=SD, ttl=300)
            for i in range(3)]
    env_id = uuid.uuid4().hex
    try:
        records = await asyncio.to_thread(registry.list_records)
        known = {r.stem: r.id for r in records}
        light = await asyncio.to_thread(units.listed_by_busctl, known)
        assert light is not None
        assert light == await live_units(known)
        assert {e.name for e in envs} <= set(light)
        calls.clear()
        table = await asyncio.to_thread(listing.environments_now, guarantees=False)
        assert calls == {}                                   # no dbus-next call at all
        assert {e["name"] for e in table} >= {e.name for e in envs}
        # A unit only its Environment can place (an older gestvenv's): busctl says so, and
        # the listing asks the runtime, which reads it.
        await foreign_unit("sd-busctl-old", "gestvenv environment sd-busctl-old (python 3)",
                           env_id, str(registry.state_path("sd-busctl-old")))
        assert await asyncio.to_thread(units.listed_by_busctl, known) is None
        table = await asyncio.to_thread(listing.environments_now, guarantees=False)
        assert {"sd-busctl-old": "unit-only"}.items() <= \
            {e["name"]: e["state"] for e in table}.items()
    finally:
        await run("systemctl", "stop", "gestvenv-sd-busctl-old.service")
        for env in envs:
            await gestvenv.destroy_environment(env.name)


async def test_an_older_gestvenvs_unit_is_read_and_told_apart() -> None:
    env_id = uuid.uuid4().hex
    state_file = str(registry.state_path("sd-oldunit"))
    old = "gestvenv environment sd-oldunit (python 3.11.7, disk storage, /nowhere)"
    await foreign_unit("sd-oldunit", old, env_id, state_file)
    try:
        units = await live_units({"sd-oldunit": env_id})
        assert units is not None
        view = units["sd-oldunit"]
        assert (view.env_id, view.state_file, view.state) == (env_id, state_file, "active")
        assert view.orphaned()  # (no such state file: listed as unit-only, swept)
        listed = {e["name"]: e for e in gestvenv.list_environments()}
        assert listed["sd-oldunit"]["state"] == "unit-only"
    finally:
        await run("systemctl", "stop", "gestvenv-sd-oldunit.service")


@pytest.mark.parametrize("how", ["described", "older"])
async def test_a_command_never_joins_another_envs_unit_of_the_same_name(how: str) -> None:
    env = await gestvenv.create_environment("sd-taken", runtime=SD, ttl=300)
    record = registry.load("sd-taken")
    command = build_command(record, ["true"])
    await run("systemctl", "stop", "gestvenv-sd-taken.service", check=True)
    other = uuid.uuid4().hex
    description = plan.env_description("sd-taken", "elsewhere", other) if how == "described" \
        else "gestvenv environment sd-taken (python 3.11.7, disk storage, /elsewhere)"
    await foreign_unit("sd-taken", description, other, "/elsewhere/run/envs/sd-taken.json")
    try:
        with pytest.raises(EnvironmentClosedError, match="now another environment's"):
            await runtime_named(SD).run(record, command)
        # Nor is it stopped for ours.
        await runtime_named(SD).stop(record)
        active = await run("systemctl", "is-active", "gestvenv-sd-taken.service")
        assert active.stdout.strip() == "active"
    finally:
        await run("systemctl", "stop", "gestvenv-sd-taken.service")
    assert units_of("sd-taken") == []
    assert not env.path.exists()  # (its reaper deleted it when its unit stopped)


def test_the_description_systemctl_shows_names_the_env_and_its_id() -> None:
    async def go() -> str:
        async with gestvenv.ephemeral("sd-described", runtime=SD) as env:
            shown = await run("systemctl", "show", "-P", "Description",
                              "gestvenv-sd-described.service")
            assert plan.env_id_of_description(shown.stdout.strip()) == env.id
            return shown.stdout.strip()
    described = asyncio.run(go())
    assert described.startswith("gestvenv environment sd-described (python ")
