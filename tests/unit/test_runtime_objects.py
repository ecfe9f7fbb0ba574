"""One runtime object per process, probed once; and how few calls the systemd runtime makes to
tell its units apart and to learn a command's end (a scripted manager: no bus, no systemd)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gestvenv import registry, runtime
from gestvenv.config import Config
from gestvenv.runtime import runtime_key, runtime_named, select_runtime
from gestvenv.runtime.local import LocalRuntime
from gestvenv.runtime.systemd import cgroups, plan, units
from gestvenv.runtime.systemd import runtime as sdruntime
from gestvenv.runtime.systemd.bus import SERVICE, UNIT, NoSuchUnit, UnitInfo
from gestvenv.runtime.systemd.runtime import SystemdRuntime, UnitSignals

ID_A = "a" * 32
ID_B = "b" * 32


class FakeManager:
    """What SystemdRuntime asks of a SystemdBus, scripted: units by name, calls counted."""

    def __init__(self, units: dict[str, tuple[str, str, list[str]]] | None = None) -> None:
        self.units = units or {}  # unit name -> (ActiveState, Description, Environment)
        self.calls: Counter[str] = Counter()
        self.settled: set[str] = set()

    async def manager_property(self, prop: str) -> Any:
        self.calls[f"manager {prop}"] += 1
        await asyncio.sleep(0.01)
        return {"Version": "252.38-1~deb12u1", "ControlGroup": "/user.slice/u"}[prop]

    async def list_units(self, patterns: list[str], states: list[str] = ()) -> list[UnitInfo]:  # type: ignore[assignment]
        self.calls["ListUnitsByPatterns"] += 1
        import fnmatch
        return [UnitInfo(name, desc, "loaded", state, "running", f"/unit/{name}")
                for name, (state, desc, _) in self.units.items()
                if any(fnmatch.fnmatchcase(name, p) for p in patterns)]

    async def get_unit(self, name: str) -> str:
        self.calls["GetUnit"] += 1
        if name not in self.units:
            raise NoSuchUnit(name)
        return f"/unit/{name}"

    async def get(self, path: str, interface: str, prop: str) -> Any:
        self.calls[f"Get {prop}"] += 1
        state, _, environment = self.units[path.removeprefix("/unit/")]
        return {"Environment": environment, "ActiveState": state}[prop]

    async def stop_unit(self, name: str, wait: bool = True) -> str:
        self.calls[f"StopUnit {name}"] += 1
        return "done"


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    fake = FakeManager()

    async def connection(user: bool) -> FakeManager:
        return fake

    monkeypatch.setattr(sdruntime, "connection", connection)
    monkeypatch.setattr(sdruntime, "systemd_booted", lambda: True)
    for probe in ("system_controllers", "user_namespaces_allowed", "swap_active"):
        monkeypatch.setattr(cgroups, probe, lambda: False)
    monkeypatch.setattr(cgroups, "delegated_controllers", lambda root: frozenset())
    SystemdRuntime.forget_probes()
    runtime.forget_runtimes()
    yield fake
    SystemdRuntime.forget_probes()
    runtime.forget_runtimes()


def env_unit(name: str, env_id: str | None, state: str = "active",
             state_file: str = "/elsewhere/x.json") -> tuple[str, tuple[str, str, list[str]]]:
    described = plan.env_description(name, "python 3.11", env_id) if env_id \
        else f"gestvenv environment {name} (python 3.11)"  # an older gestvenv's
    environment = [f"{plan.UNIT_ENV_ID}={env_id or ID_B}", f"{plan.UNIT_STATE_FILE}={state_file}"]
    return f"gestvenv-{name}.service", (state, described, environment)


# --- one runtime object, probed once ---

def test_runtime_named_gives_one_object_per_runtime_for_the_whole_process() -> None:
    runtime.forget_runtimes()
    assert runtime_named("systemd") is runtime_named("systemd")
    assert runtime_named("local") is runtime_named("local")
    assert isinstance(runtime_named("local"), LocalRuntime)
    with pytest.raises(Exception, match="not available here"):
        runtime_named("chroot")


def test_the_key_tells_managers_and_global_caps_apart() -> None:
    assert runtime_key("systemd", 0, None) != runtime_key("systemd", 1000, None)
    assert runtime_key("systemd", 0, 8192) != runtime_key("systemd", 0, None)
    assert runtime_key("local", 0, 8192) == runtime_key("local", 1000, None)  # no state


def test_select_runtime_reuses_the_object_and_probes_the_manager_once(
        manager: FakeManager) -> None:
    config = Config(runtime="systemd")

    async def go() -> list[Any]:
        first = await asyncio.gather(*(select_runtime(config) for _ in range(20)))
        return [*first, await select_runtime(config), runtime_named("systemd")]

    got = asyncio.run(go())
    assert all(r is got[0] for r in got[:-1])
    assert got[-1] is not got[0]  # (no global cap to set: existing envs' runtime)
    assert manager.calls["manager Version"] == 1  # 20 creates at once: one probe

    async def execute_like() -> None:  # what run() does first: prepare() again
        await got[-1].prepare()
    asyncio.run(execute_like())
    assert manager.calls["manager Version"] == 1
    assert got[-1].capabilities == got[0].capabilities


# --- telling units apart in one call ---

def test_list_tells_every_known_env_unit_apart_in_one_call(manager: FakeManager,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(units, "state_path",
                        lambda name, folder=None: Path(f"/ours/{name}.json"))
    manager.units = dict([env_unit(f"e{i}", f"{i:032x}") for i in range(50)])
    known = {f"e{i}": f"{i:032x}" for i in range(50)}
    views = asyncio.run(SystemdRuntime().live_environments(known))
    assert manager.calls == {"ListUnitsByPatterns": 1}
    assert views["e7"].env_id == f"{7:032x}" and views["e7"].state == "active"
    assert views["e7"].state_file == "/ours/e7.json"


def test_units_not_known_as_ours_or_older_ones_are_read(manager: FakeManager) -> None:
    manager.units = dict([
        env_unit("mine", ID_A),
        env_unit("theirs", ID_B, state_file="/other/run/envs/theirs.json"),  # another registry
        env_unit("old", None, state="deactivating"),  # started by an older gestvenv
    ])
    views = asyncio.run(SystemdRuntime().live_environments({"mine": ID_A, "theirs": ID_A}))
    assert manager.calls == {"ListUnitsByPatterns": 1, "Get Environment": 2}
    assert views["theirs"].env_id == ID_B
    assert views["theirs"].state_file == "/other/run/envs/theirs.json"
    assert views["old"].env_id == ID_B and views["old"].state == "deactivating"
    assert set(views) == {"mine", "theirs", "old"}
    # Without the caller's envs, each is read (the former way).
    manager.calls.clear()
    asyncio.run(SystemdRuntime().live_environments())
    assert manager.calls == {"ListUnitsByPatterns": 1, "Get Environment": 3}


def test_a_units_owner_is_one_call_and_an_older_units_three(manager: FakeManager) -> None:
    manager.units = dict([env_unit("mine", ID_A), env_unit("old", None)])

    async def owners() -> list[Any]:
        rt = SystemdRuntime()
        return [await rt._owner(manager, u)  # type: ignore[arg-type]
                for u in ("gestvenv-mine.service", "gestvenv-gone.service",
                          "gestvenv-old.service")]

    assert asyncio.run(owners()) == [("active", ID_A), None, ("active", ID_B)]
    assert manager.calls == {"ListUnitsByPatterns": 3, "Get Environment": 1}


def test_destroy_stops_only_its_own_envs_units(manager: FakeManager) -> None:
    manager.units = dict([env_unit("x", ID_A)])
    asyncio.run(SystemdRuntime().stop_units_of("x", ID_B))  # the name is another env's now
    assert not any(c.startswith("StopUnit") for c in manager.calls)
    asyncio.run(SystemdRuntime().stop_units_of("x", ID_A))
    assert manager.calls["StopUnit gestvenv-x.service"] == 1
    assert manager.calls["ListUnitsByPatterns"] == 2 and "GetUnit" not in manager.calls


# --- a command's end, from its signals ---

def service(code: int, status: int, result: str = "success") -> dict[str, Any]:
    return {"__interface__": SERVICE, "Result": result, "ExecMainCode": code,
            "ExecMainStatus": status, "MainPID": 0}


def unit(state: str) -> dict[str, Any]:
    return {"__interface__": UNIT, "ActiveState": state, "SubState": "dead"}


def test_the_end_is_the_service_values_sent_just_before_the_units_last_state() -> None:
    seen = UnitSignals()
    for changed in (service(0, 0), unit("activating"), service(0, 0), unit("active"),
                    service(1, 3, "exit-code"), unit("failed")):
        seen.update(changed)
    assert seen.final == {"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 3}
    seen.update(service(2, 9, "signal"))  # (later signals change nothing)
    seen.update(unit("inactive"))
    assert seen.final == {"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 3}


def test_the_state_a_unit_is_made_in_is_not_its_end() -> None:
    seen = UnitSignals()
    seen.update(service(0, 0))  # made: inactive, no process has run
    seen.update(unit("inactive"))
    assert seen.final is None
    seen.update(service(0, 0))
    seen.update(unit("activating"))
    seen.update(service(2, 9, "signal"))  # (a quick command: its whole life in one flush)
    seen.update(unit("inactive"))
    assert seen.final == {"Result": "signal", "ExecMainCode": 2, "ExecMainStatus": 9}


def test_an_end_without_final_values_is_asked_for() -> None:
    seen = UnitSignals()
    seen.update(unit("inactive"))  # no service values seen (a signal missed)
    assert seen.final is None
    partial = UnitSignals()
    partial.update({"__interface__": SERVICE, "ExecMainCode": 1})
    partial.update(unit("failed"))
    assert partial.final is None


def test_signals_wake_the_waiter_and_other_changes_are_not_an_end() -> None:
    async def go() -> tuple[bool, bool]:
        changed = asyncio.Event()
        seen = UnitSignals(changed)
        seen.update(service(1, 0))
        seen.update(unit("deactivating"))
        return changed.is_set(), seen.final is None
    assert asyncio.run(go()) == (True, True)


def test_the_registry_is_not_read_to_tell_units_apart(manager: FakeManager,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reading(*args: Any) -> Any:
        raise AssertionError("a state file was read")
    monkeypatch.setattr(registry, "load", no_reading)
    monkeypatch.setattr(registry, "list_records", no_reading)
    manager.units = dict([env_unit("mine", ID_A)])
    assert asyncio.run(SystemdRuntime().live_environments({"mine": ID_A}))["mine"].ours
