"""The pool's decisions (pure): which requests a pool unit serves, and what the names are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gestvenv import registry, storage
from gestvenv.config import Config
from gestvenv.exceptions import InvalidNameError
from gestvenv.names import validate_name
from gestvenv.reaper import env_dir_name, pool_claimed_state
from gestvenv.runtime.systemd import plan
from gestvenv.runtime.systemd import pool as gvpool

BASE = dict(runtime="systemd", owned=True, pool_size=2, container=False, max_disk=False,
            own_uid=False)


def entry(**changes: object) -> gvpool.PoolEntry:
    values: dict[str, object] = dict(stem="gvpool-0123abcd", id="a" * 32, path="/r/x",
                                     key="k", created_at=1000.0, idle_until=1300.0,
                                     deadline=1000.0 + 3600 + 300)
    values.update(changes)
    return gvpool.PoolEntry(**values)  # type: ignore[arg-type]


def test_an_owned_plain_systemd_request_may_be_pooled() -> None:
    assert gvpool.refusal(**BASE) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "why"), [
    ({"pool_size": 0}, "pool_size is 0"),
    ({"runtime": "local"}, "local runtime"),
    ({"owned": False}, "kept env"),
    ({"container": True}, "container"),
    ({"max_disk": True}, "max_disk"),
    ({"own_uid": True}, "uid of its own"),
])
def test_what_a_pool_unit_cannot_serve(change: dict[str, object], why: str) -> None:
    assert why in (gvpool.refusal(**{**BASE, **change}) or "")  # type: ignore[arg-type]


def test_a_pool_unit_serves_its_key_unclaimed_within_its_backstop() -> None:
    now = 1010.0
    assert gvpool.serves(entry(), "k", 3600, now)
    assert not gvpool.serves(entry(), "other", 3600, now)            # another unit's sandbox
    assert not gvpool.serves(entry(claim={"name": "x"}), "k", 60, now)  # taken
    assert not gvpool.serves(entry(), "k", None, now)    # no TTL: RuntimeMaxSec would cut it
    assert not gvpool.serves(entry(), "k", 3900, now)    # past the backstop
    assert not gvpool.serves(entry(idle_until=now + 0.5), "k", 60, now)  # about to end
    assert gvpool.serves(entry(deadline=None), "k", None, now)  # default_ttl 0: no backstop


def test_the_backstop_is_default_ttl_plus_pool_idle() -> None:
    assert gvpool.backstop(Config(default_ttl=600, pool_idle=30)) == 630
    assert gvpool.backstop(Config(default_ttl=0)) is None


def test_pool_keys_differ_by_what_cannot_change_live() -> None:
    caps = plan.Capabilities(user=False, controllers=frozenset({"memory"}), cgroup_v2=True)
    open_box = plan.sandbox_properties(plan.SandboxSpec(
        level=plan.IsolationLevel.PROCESS, network=True, env_path=plan.POOL_PATH), caps)
    closed = plan.sandbox_properties(plan.SandboxSpec(
        level=plan.IsolationLevel.PROCESS, network=False, env_path=plan.POOL_PATH), caps)
    key = dict(interpreter="/usr/bin/python3", backend="disk", root="/r", user=False)
    assert plan.pool_key(**key, sandbox=open_box) == plan.pool_key(**key, sandbox=open_box)
    assert plan.pool_key(**key, sandbox=open_box) != plan.pool_key(**key, sandbox=closed)
    assert plan.pool_key(**key, sandbox=open_box) != plan.pool_key(
        **{**key, "backend": "memory"}, sandbox=open_box)


def test_only_cgroup_limits_and_the_description_are_set_live() -> None:
    caps = plan.Capabilities(user=False, controllers=frozenset({"memory", "cpu", "pids"}),
                             cgroup_v2=True)
    names = plan.UnitNames.of("gvpool-0123abcd")
    props = plan.live_slice_properties(names, "env", plan.ResourceLimits(
        max_memory=64, max_cpu_percent=50, max_processes=9), caps)
    assert {p[0] for p in props} == {"Description", "MemoryMax", "MemorySwapMax",
                                     "CPUQuotaPerSecUSec", "TasksMax"}
    assert plan.env_id_of_description(plan.pool_description("gvpool-0123abcd", "x", "a" * 32)) \
        == "a" * 32
    assert plan.env_id_of_description(
        plan.claimed_description("env", "gvpool-0123abcd", "x", "a" * 32)) == "a" * 32


def test_env_names_cannot_look_like_pool_units_and_dirs_follow_the_stem() -> None:
    with pytest.raises(InvalidNameError, match="pool units"):
        validate_name("gvpool-0123abcd")
    assert env_dir_name("gvpool-0123abcd", "f" * 32) == "gvpool-0123abcd-ffffffff"
    assert storage.env_dir_name is env_dir_name
    assert registry.is_pool_stem("gvpool-0123abcd") and not registry.is_pool_stem("gvpool-x")


def test_the_reaper_follows_a_claim_only_into_the_registrys_own_state_dir(
        tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    pool_file = tmp_path / "pool" / "gvpool-0123abcd.json"
    env_id = "a" * 32

    def claimed(state_file: str, owner: str = env_id) -> Path | None:
        pool_file.write_text(json.dumps({"id": owner, "claim": {"state_file": state_file}}))
        return pool_claimed_state(pool_file, env_id)

    assert claimed(str(tmp_path / "envs" / "x.json")) == tmp_path / "envs" / "x.json"
    assert claimed("/etc/passwd") is None
    assert claimed(str(tmp_path / "envs" / ".." / "y.json")) is None
    assert claimed(str(tmp_path / "envs" / "x.json"), owner="b" * 32) is None
    assert pool_claimed_state(tmp_path / "envs" / "x.json", env_id) is None  # not a pool file


@pytest.mark.parametrize(("timeout", "expires_at", "limit"), [
    (None, None, None),          # neither: no RuntimeMaxSec on the command
    (30.0, None, 30.0),          # a named env: only the command's own timeout
    (None, 1010.0, 10.0),        # pooled: the TTL left
    (30.0, 1010.0, 10.0),        # whichever ends first
    (5.0, 1010.0, 5.0),
    (None, 990.0, 0.001),        # past its TTL: ended at once, never unlimited
])
def test_a_pooled_envs_commands_end_at_its_ttl(timeout: float | None, expires_at: float | None,
                                               limit: float | None) -> None:
    """A pool unit's RuntimeMaxSec was set before its env was claimed: each command unit
    carries the TTL left, so systemd ends the env's code at its TTL whatever its holder does."""
    assert plan.command_time_limit(timeout, expires_at, 1000.0) == limit


def test_discarding_a_pool_entry_deletes_only_its_own_dir(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool file is only a file in gestvenv's runtime dir: the dir it names is removed only
    if it is that entry's own (its stem and id in its name, claimed by that very pool file, in
    a marked storage root), never a directory a crafted pool file points at."""
    monkeypatch.setenv("GESTVENV_RUNTIME_DIR", str(tmp_path / "run"))
    root = tmp_path / "root"
    root.mkdir()
    (root / storage.ROOT_MARK).write_text("")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    env_id = "b" * 32
    stem = "gvpool-0badf00d"
    file = gvpool.pool_file(stem)
    crafted = entry(stem=stem, id=env_id, path=str(victim), file=str(file))
    gvpool._write(crafted, file)
    gvpool._discard(crafted)
    assert (victim / "precious").read_text() == "keep" and not file.exists()
    # A dir named right but claimed by another pool file: left alone too.
    own = root / env_dir_name(stem, env_id)
    storage.claim_dir(own, tmp_path / "another.json", env_id)
    gvpool._discard(entry(stem=stem, id=env_id, path=str(own), file=str(file)))
    assert own.is_dir()
    # Its own dir, claimed by its pool file: removed.
    other = root / env_dir_name("gvpool-00c0ffee", env_id)
    storage.claim_dir(other, gvpool.pool_file("gvpool-00c0ffee"), env_id)
    gvpool._discard(entry(stem="gvpool-00c0ffee", id=env_id, path=str(other),
                          file=str(gvpool.pool_file("gvpool-00c0ffee"))))
    assert not other.exists()
