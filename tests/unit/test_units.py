"""Which unit is which env (units.views), and `list`'s busctl reading of them, without a bus
(tests/cli/test_import_cost.py and the systemd tier read a real manager)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gestvenv.registry import state_path
from gestvenv.runtime.systemd import plan, units
from gestvenv.runtime.systemd.pool import PoolEntry, pool_file
from gestvenv.runtime.systemd.units import UnitInfo
from gestvenv.runtime.unitview import UnitView

ID_A, ID_B = "a" * 32, "b" * 32


def row(name: str, description: str, state: str = "active") -> UnitInfo:
    return UnitInfo(f"gestvenv-{name}.service", description, "loaded", state, "running",
                    f"/org/freedesktop/systemd1/unit/{name}")


def test_known_units_are_placed_from_their_description_alone() -> None:
    rows = [row("mine", plan.env_description("mine", "python 3.11", ID_A)),
            row("theirs", plan.env_description("theirs", "python 3.11", ID_B)),
            row("old", "gestvenv environment old (python 3.11)"),      # an older gestvenv's
            UnitInfo("other.service", "not ours", "loaded", "active", "running", "/x")]
    found, unread = units.views(rows, {"mine": ID_A, "theirs": ID_A})
    assert found == {"mine": UnitView("active", ID_A, str(state_path("mine")))}
    # Another registry's env of that name (another id) and an older unit: read by the runtime.
    assert [name for name, _ in unread] == ["theirs", "old"]


def test_an_unclaimed_pool_unit_of_this_registry_is_placed_by_its_pool_file(
        gv_home: Path) -> None:
    stem = "gvpool-0123abcd"
    path = pool_file(stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PoolEntry(stem=stem, id=ID_A, path="/e", key="k", created_at=0.0,
                              idle_until=0.0).to_json())
    waiting = row(stem, plan.pool_description(stem, "python 3.11", ID_A))
    found, unread = units.views([waiting], {})
    assert unread == []
    assert found == {stem: UnitView("active", ID_A, str(path))}
    assert not found[stem].orphaned()                   # so `list` does not show it
    other = row("gvpool-99999999", plan.pool_description("gvpool-99999999", "py", ID_B))
    assert units.views([other], {})[1] == [("gvpool-99999999", other)]   # another registry's


def test_rows_of_a_busctl_reply() -> None:
    reply = json.dumps({"type": "a(ssssssouso)", "data": [[
        ["gestvenv-x.service", "d", "loaded", "active", "running", "",
         "/org/freedesktop/systemd1/unit/gestvenv_2dx_2eservice", 0, "", "/"]]]})
    assert units.rows_of(reply) == [UnitInfo("gestvenv-x.service", "d", "loaded", "active",
                                             "running",
                                             "/org/freedesktop/systemd1/unit/"
                                             "gestvenv_2dx_2eservice")]
    with pytest.raises(ValueError, match="unexpected reply type"):
        units.rows_of(json.dumps({"type": "as", "data": [[]]}))


def test_no_busctl_means_asking_the_runtime(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))                 # no busctl on it
    assert units.listed_by_busctl({}) is None
    fake = tmp_path / "busctl"
    fake.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    assert units.listed_by_busctl({}) is None                 # a manager that cannot be asked
    fake.write_text("#!/bin/sh\necho '{\"type\": \"a(ssssssouso)\", \"data\": [[]]}'\n")
    assert units.listed_by_busctl({}) == {}                   # asked: no unit
