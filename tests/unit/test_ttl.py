"""Extending a TTL: the rules (gestvenv.ttl), what the env's unit and holder are given for it
(the plan, the holder's reading of its state file), without a bus."""

from __future__ import annotations

import pytest

from gestvenv.exceptions import ValidationError
from gestvenv.holder import _expires_at
from gestvenv.runtime.systemd import plan
from gestvenv.runtime.systemd.plan import HolderArgs, UnitNames
from gestvenv.ttl import extended_ttl, extension_cap, note


@pytest.mark.parametrize(("max_ttl", "ttl", "cap"), [
    (0, 60, None), (60, 60, None), (30, 60, None), (600, None, None), (600, 0, None),
    (600, 60, 600)])
def test_which_envs_have_an_extendable_ttl(max_ttl: int, ttl: int | None,
                                           cap: int | None) -> None:
    assert extension_cap(max_ttl, ttl) == cap
    assert (note(cap) is None) == (cap is None)


def test_an_extension_adds_to_the_current_end_within_max_ttl() -> None:
    assert extended_ttl("e", 60, 600, 1000.0, 30, now=1010.0) == 90
    assert extended_ttl("e", 60, 600, 1000.0, 0.2, now=1010.0) == 61   # whole seconds, up
    assert extended_ttl("e", 60, 600, 1000.0, 540, now=1059.0) == 600  # up to the cap


@pytest.mark.parametrize(("ttl", "max_ttl", "seconds", "now", "why"), [
    (60, 600, 541, 1010.0, "extended by 540 s more, not 541"),
    (60, None, 10, 1010.0, "fixed TTL"),
    (None, None, 10, 1010.0, "no TTL to extend"),
    (60, 600, 10, 1060.0, "reached its TTL"),
    (60, 600, 0, 1010.0, "positive number"),
    (60, 600, -5, 1010.0, "positive number"),
    (60, 600, float("inf"), 1010.0, "positive number"),
    (60, 600, float("nan"), 1010.0, "positive number"),
    (60, 600, True, 1010.0, "positive number"),
    (60, 600, "10", 1010.0, "positive number"),
])
def test_what_cannot_be_extended_says_why(ttl: int | None, max_ttl: int | None,
                                          seconds: object, now: float, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        extended_ttl("e", ttl, max_ttl, 1000.0, seconds, now)  # type: ignore[arg-type]


def test_the_unit_of_an_extendable_env_has_its_holder_hold_the_ttl() -> None:
    names = UnitNames.of("e")
    holder = HolderArgs(python="py", script="h.py", state_file="s", env_id="i",
                        expires_at=1060.0)
    props = {name: value for name, _, value in plan.env_properties(names, "e", "d", 600,
                                                                   holder, [])}
    assert props["RuntimeMaxUSec"] == 600 * plan.USEC            # max_ttl: the backstop
    argv = props["ExecStart"][0][1]
    assert argv[argv.index("--expires-at") + 1] == "1060.0"
    fixed = {name: value for name, _, value in plan.env_properties(
        names, "e", "d", 60, HolderArgs(python="py", script="h.py", state_file="s",
                                        env_id="i"), [])}
    assert fixed["RuntimeMaxUSec"] == 60 * plan.USEC             # systemd's, exact
    assert "--expires-at" not in fixed["ExecStart"][0][1]


def test_a_command_unit_is_held_to_the_backstop_of_an_extendable_ttl() -> None:
    assert plan.command_end(1060.0, pooled=False, extendable_until=1600.0) == 1600.0
    assert plan.command_end(1060.0, pooled=True, extendable_until=1600.0) == 1600.0
    assert plan.command_end(1060.0, pooled=True, extendable_until=None) == 1060.0
    assert plan.command_end(1060.0, pooled=False, extendable_until=None) is None


def test_the_holder_follows_the_ttl_its_state_file_gives() -> None:
    assert _expires_at({"created_at": 1000.0, "ttl": 90}, 1060.0) == 1090.0
    for odd in ({}, {"created_at": 1000.0}, {"created_at": "x", "ttl": 90},
                {"created_at": 1000.0, "ttl": True}, {"created_at": 1000.0, "ttl": 0},
                {"created_at": 1000.0, "ttl": "90"}):
        assert _expires_at(odd, 1060.0) == 1060.0
