"""Guaranteed cleanup of container envs: whatever ends one, its container goes with it.

At container isolation an env is a real container (podman: one per env, labelled with the
env's id, name, owner and state file; its commands are ``podman exec``s into it). On top of
what every env can leave (test_guaranteed_cleanup.py), such an env can leave a container,
its conmon, and the mounts of its root filesystem (the kernel's overlay here, fuse-overlayfs
in the systemd test host): :func:`support.leftovers` counts them ("containers", "conmon",
"container mounts"), and these tests end container envs in real ways (SIGKILL of the creator,
the TTL, ``cleanup NAME``, a container whose state file is gone) and wait for all of it to
be gone. A container without gestvenv's labels is never touched by any sweep.

The same tests run on both tiers: on this host the local runtime (the env's watchdog reaps),
in the systemd test host the systemd runtime (the env unit's stop action reaps); skipped where
no container engine answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gestvenv import registry, storage
from gestvenv.builder import find_interpreter
from gestvenv.container import images
from gestvenv.container.engine import (
    LABEL_ENV,
    LABEL_ID,
    LABEL_OWNER,
    LABEL_STATE,
    Engine,
    find,
)

from .support import (
    ENGINE_KINDS,
    Spawn,
    env_pids,
    labels_of,
    leftover_summary,
    leftovers,
    podman_containers,
    wait_until,
)
from .test_guaranteed_cleanup import (
    CLEANUP_INTERVAL,
    RUNTIME,
    SLACK,
    SYSTEMD,
    gone_within,
    gv_async,
    no_new_units,
    read_line,
)

# Seconds for everything of a container env to be gone once something ended it (its reaper
# removes the container: `podman rm --force --time 0`, then its files).
CONTAINER_GONE = 5.0
# Labels of the containers these tests make themselves (by hand, never through gestvenv):
# removed by it at the end, whatever happened.
TEST_LABEL = "io.gestvenv-tests.container-cleanup"
SLEEP = ["python", "-c", "import time; time.sleep(300)"]  # (the image has no sleep(1))
CLI_TTL = 3


@pytest.fixture(autouse=True)
def _settings(gv_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GESTVENV_EPHEMERAL_CLEANUP_INTERVAL", str(CLEANUP_INTERVAL))


@pytest.fixture(autouse=True)
def _no_units_left() -> Iterator[None]:
    """Under systemd, no unit of the test's is left either."""
    yield from no_new_units()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    found, why = find("auto", tmp_path_factory.mktemp("engine-conf"))
    if found is None:
        pytest.skip(f"no container engine answers: {why}")
    if found.name != "podman":
        pytest.skip("the leftover checks (conmon, the store's mounts) are podman's")
    return found


@pytest.fixture
def by_hand(engine: Engine) -> Iterator[list[str]]:
    """Containers the test makes with the engine directly (their ids): all removed at the
    end, by this module's own label."""
    made: list[str] = []
    yield made
    done = engine.run("ps", "-a", "-q", "--no-trunc", "--filter", f"label={TEST_LABEL}",
                      check=False)
    ids = set(done.stdout.decode().split()) | set(made)
    if ids:
        # (--ignore: without it podman 4.3 removes none of them if one is already gone.)
        engine.run("rm", "--force", "--ignore", "--time", "0", *sorted(ids), check=False)


def run_by_hand(engine: Engine, made: list[str], name: str, labels: dict[str, str]) -> str:
    """Start a container of gestvenv's base image (made if missing) that sleeps, with these
    labels (and TEST_LABEL); its id."""
    interpreter = find_interpreter().path
    image = images.ensure_base(engine, interpreter)
    args = ["run", "--detach", "--pull", "never", "--network", "none", "--name", name,
            "--label", f"{TEST_LABEL}={os.getpid()}"]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    done = engine.run(*args, image, interpreter, "-c", "import time; time.sleep(600)")
    container = done.stdout.decode().split()[-1]
    made.append(container)
    return container


def container_ids(engine: Engine) -> set[str]:
    done = engine.run("ps", "-a", "-q", "--no-trunc", check=False)
    return set(done.stdout.decode().split())


def gestvenv_labels(name: str, env_id: str, state_file: Path) -> dict[str, str]:
    return {LABEL_ID: env_id, LABEL_ENV: name, LABEL_OWNER: str(os.geteuid()),
            LABEL_STATE: str(state_file)}


# --- the leftover checks themselves: they see what they must ---

FAKE_CONMON = "#!/bin/sh\nwhile :; do sleep 0.1; done\n"


async def test_leftovers_see_containers_orphaned_conmon_and_mounts_of_gone_containers(
        engine: Engine, by_hand: list[str], tmp_path: Path) -> None:
    """A zero from leftovers() means gone, not unseen: a container labelled for this test's
    state dir counts; so does a conmon of a gestvenv container the engine does not have (a
    process named conmon, with conmon's arguments), and a container's root mounted in a store
    whose record has no such container."""
    state = storage.state_dir()
    assert leftovers()["containers"] == []
    name = f"gestvenv-cc-probe-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(run_by_hand, engine, by_hand, name,
                            gestvenv_labels("cc-probe", uuid.uuid4().hex, state / "x.json"))
    [seen] = leftovers()["containers"]
    assert seen.startswith(f"{name} (running"), seen
    await asyncio.to_thread(engine.run, "rm", "--force", "--time", "0", name)
    assert leftovers()["containers"] == []
    # A conmon whose container is gone, as a reaper killed mid-way could leave one; and one
    # of another run (its containers.conf is elsewhere), which is not this test's.
    conmon = tmp_path / "conmon"
    conmon.write_text(FAKE_CONMON)
    conmon.chmod(0o755)
    gone = uuid.uuid4().hex * 2
    runtime = storage.runtime_dir()
    fakes = [await asyncio.to_thread(
        subprocess.Popen, [str(conmon), "--api-version", "1", "-c", gone, "-u", gone,
                           "-n", f"gestvenv-cc-{whose}-12345678"],
        env={**os.environ, "CONTAINERS_CONF": conf})
        for whose, conf in (("gone", f"{runtime}/containers.conf"),
                            ("other", "/elsewhere/containers.conf"))]
    try:
        await wait_until(lambda: leftovers()["conmon"], 5, "the orphaned conmon is seen")
        [orphan] = leftovers()["conmon"]
        assert orphan.startswith(f"{fakes[0].pid} conmon -n gestvenv-cc-gone-"), orphan
    finally:
        for proc in fakes:
            proc.kill()
            await asyncio.to_thread(proc.wait)
    assert leftovers()["conmon"] == []
    if os.geteuid() == 0:
        # A container's root in a store that has no such container.
        store = tmp_path / "store"
        (store / "overlay-containers").mkdir(parents=True)
        (store / "overlay-containers" / "containers.json").write_text("[]")
        merged = store / "overlay" / (uuid.uuid4().hex * 2) / "merged"
        merged.mkdir(parents=True)
        await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "gv-probe",
                                                 str(merged)], check=True)
        try:
            assert leftovers()["container mounts"] == [f"mount {merged}"]
            # With the container in the store's record, it is a live container's root.
            (store / "overlay-containers" / "containers.json").write_text(json.dumps(
                [{"id": uuid.uuid4().hex * 2, "layer": merged.parent.name}]))
            assert leftovers()["container mounts"] == []
        finally:
            await asyncio.to_thread(subprocess.run, ["umount", str(merged)], check=False)
    assert {k: v for k, v in leftovers().items() if k in ENGINE_KINDS} == \
        {kind: [] for kind in ENGINE_KINDS}


# --- SIGKILL of the creator ---

OWNED_CONTAINER = """
    import asyncio, json, sys, gestvenv

    async def main():
        async with gestvenv.ephemeral(sys.argv[1], ttl=int(sys.argv[2]),
                                      isolation_level=gestvenv.IsolationLevel.CONTAINER) as env:
            print(json.dumps({"id": env.id, "isolation": env.isolation.value,
                              "container": (env.container or {}).get("name")}), flush=True)
            await env.execute(json.loads(sys.argv[3]))

    asyncio.run(main())
"""


async def command_runs(creator: subprocess.Popen[str], env_id: str) -> None:
    """Wait until the env's command runs in its container (its processes carry the env's
    marker there); fail with what the creator said if it does not."""
    try:
        await wait_until(lambda: env_pids(env_id) or creator.poll() is not None, 30,
                         "the command runs in the container")
    finally:
        if creator.poll() is not None:
            raise AssertionError(f"the creator ended ({creator.returncode}) before its command "
                                 f"ran: {creator.communicate()[1][-2000:]}")


def one_container_env(left: dict[str, list[str]], container: str) -> None:
    """One container env is present, whole: its container, its dir and state, and its
    container's root filesystem mounted (not a leftover while it lives)."""
    assert len(left["containers"]) == 1 and left["containers"][0].startswith(
        f"{container} (running"), left
    assert left["dirs"] and left["state files"], left
    assert left["conmon"] == [] and left["container mounts"] == [], left


@pytest.mark.parametrize("name", ["cc-sigkill", "a.b_c-1"])
async def test_sigkill_of_a_creator_inside_ephemeral_container_leaves_nothing(
        spawn: Spawn, engine: Engine, name: str) -> None:
    """SIGKILL of the process inside ``async with ephemeral(..., isolation_level=CONTAINER)``
    while a command runs in the container: within seconds no container, conmon, mount, dir,
    state file (nor unit) is left. Also with a name that is not a plain word (dots,
    underscores, dashes: the container's name is made of it)."""
    ttl = 30
    creator = spawn(OWNED_CONTAINER, name, str(ttl), json.dumps(SLEEP))
    env = json.loads(await read_line(creator, timeout=60))
    assert env["isolation"] == "container", env
    await command_runs(creator, env["id"])
    before = leftovers()
    one_container_env(before, env["container"])
    creator.kill()
    killed = time.monotonic()
    await asyncio.to_thread(creator.wait)
    took = await gone_within(CONTAINER_GONE, killed,
                             "everything of a container env whose creator was SIGKILLed")
    print(f"{RUNTIME}: container env {name!r}: nothing left {took:.2f}s after the creator's "
          f"SIGKILL (present before: {leftover_summary(before)})")
    # (Whatever its labels say of its state file: no container of that env at all.)
    assert [c for c in podman_containers() or [] if labels_of(c).get(LABEL_ID) == env["id"]] \
        == []


DIES_WHILE_ITS_CONTAINER_STARTS = """
    import asyncio, os, signal, sys, threading, gestvenv
    from gestvenv.container import engine as engines

    real_run = engines.Engine.run

    def run(self, *args, **kwargs):
        if "run" in args and "--detach" in args:
            # The engine is starting the env's container: the creator dies meanwhile (its
            # `podman run`, a child of its own, goes on).
            threading.Timer(float(sys.argv[3]), os.kill, (os.getpid(), signal.SIGKILL)).start()
        return real_run(self, *args, **kwargs)

    engines.Engine.run = run

    async def main():
        async with gestvenv.ephemeral(sys.argv[1], ttl=int(sys.argv[2]),
                                      isolation_level=gestvenv.IsolationLevel.CONTAINER):
            pass

    asyncio.run(main())
"""


def podman_runs(env: str) -> list[int]:
    """The live ``podman run`` processes starting a container of the env named ``env``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv[:1] and os.path.basename(argv[0]) == "podman" and "run" in argv and \
                any(a.startswith(f"gestvenv-{env}-") for a in argv):
            found.append(proc.pid)
    return found


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3])
async def test_sigkill_of_a_creator_while_its_container_starts_leaves_nothing(
        spawn: Spawn, engine: Engine, delay: float) -> None:
    """The creator is SIGKILLed while the engine starts the env's container (``podman run``
    in flight, ``delay`` seconds after it began): the env's reaper may run before the
    container exists, which then appears, labelled with a state file that is gone. Within
    the TTL and a sweep's interval nothing is left, without any gestvenv command."""
    ttl = CLI_TTL
    name = f"cc-dies-{int(delay * 100)}"
    creator = spawn(DIES_WHILE_ITS_CONTAINER_STARTS, name, str(ttl), str(delay))
    status = await asyncio.to_thread(creator.wait, 60)
    killed = time.monotonic()
    assert status == -signal.SIGKILL, creator.communicate()[1]
    # Judged once its `podman run` is over (until then its container may yet appear).
    await wait_until(lambda: not podman_runs(name), 30, f"the `podman run` of {name} ends")
    at_kill = leftovers()
    try:
        took = await gone_within(ttl + CLEANUP_INTERVAL + SLACK, killed,
                                 f"what the creator of {name}, killed while its container "
                                 "started, left")
    except AssertionError:
        left = leftovers()
        print(f"{RUNTIME}: killed {delay}s into `podman run`: present at the kill "
              f"{leftover_summary(at_kill)}; {ttl + CLEANUP_INTERVAL + SLACK:.0f}s later: "
              f"{leftover_summary(left)} {left}")
        # Under systemd one thing is left to the cleanup timer: a temporary state file the
        # creator was writing as it died (its unit's reaper forgets the state file by its
        # name; locally the per-user watchdog's sweep removes it). Swept here as the timer
        # would: then nothing may be left.
        stale = f"{registry.state_path(name).parent}/.{name}.{creator.pid}."
        if not (SYSTEMD and left["state files"]
                and all(f.startswith(stale) for f in left["state files"])
                and sum(map(len, left.values())) == len(left["state files"])):
            raise
        swept = await gv_async("ephemeral", "cleanup", "--orphans")
        assert swept.returncode == 0, swept.stderr
        assert sum(map(len, leftovers().values())) == 0, leftovers()
        print(f"{RUNTIME}: only a temporary state file of the killed creator was left; "
              "the sweep removed it")
        return
    print(f"{RUNTIME}: killed {delay}s into `podman run` (present then: "
          f"{leftover_summary(at_kill)}): nothing left {took:.2f}s later")


# --- the TTL, and cleanup NAME, of a kept env ---

async def test_a_kept_container_env_ends_at_its_ttl_with_its_container(engine: Engine) -> None:
    name = "cc-ttl"
    started = time.monotonic()
    created = await gv_async("ephemeral", "create", name, "--isolation", "container",
                             "--ttl", str(CLI_TTL))
    assert created.returncode == 0, created.stderr
    present = leftovers()
    container = registry.load(name).container["name"]
    one_container_env(present, container)
    took = await gone_within(CLI_TTL + CLEANUP_INTERVAL + SLACK, started,
                             f"a container env at its TTL ({CLI_TTL}s)")
    print(f"{RUNTIME}: container env, ttl {CLI_TTL}s: nothing left {took:.2f}s after "
          "`create` began")
    assert took > CLI_TTL - 1  # its TTL ended it, not something else


OWNED_TTL = """
    import asyncio, json, sys, gestvenv

    async def main():
        async with gestvenv.ephemeral(sys.argv[1], ttl=int(sys.argv[2]),
                                      isolation_level=gestvenv.IsolationLevel.CONTAINER) as env:
            print(json.dumps({"id": env.id}), flush=True)
            try:
                result = await env.execute(json.loads(sys.argv[3]))
                print(json.dumps({"returncode": result.returncode,
                                  "killed_by": result.killed_by}), flush=True)
            except gestvenv.GestvenvError as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        print(json.dumps({"closed": True}), flush=True)

    asyncio.run(main())
"""


async def test_an_owned_container_env_ends_at_its_ttl_while_a_command_runs(
        spawn: Spawn, engine: Engine) -> None:
    """ttl=3 in ``ephemeral()``: the TTL ends the env, its container included, while its
    creator still lives; the running command's result says the TTL killed it, and the block
    closes without an error."""
    ttl = 3
    creator = spawn(OWNED_TTL, "cc-ttl-owned", str(ttl), json.dumps(SLEEP))
    env = json.loads(await read_line(creator, timeout=60))
    started = time.monotonic()
    await command_runs(creator, env["id"])
    ended = json.loads(await read_line(creator, timeout=ttl + CONTAINER_GONE + SLACK))
    took = await gone_within(ttl + CONTAINER_GONE + SLACK, started,
                             "a container env at its TTL, its creator still running")
    status = await asyncio.to_thread(creator.wait, 10)
    out, err = creator.communicate()
    print(f"{RUNTIME}: owned container env, ttl {ttl}s: the command's end {ended}; nothing "
          f"left {took:.2f}s after it began; creator exit {status}")
    assert ended == {"returncode": -9, "killed_by": "ttl"} or \
        ended.get("killed_by") == "ttl", ended
    assert (status, out.strip()) == (0, json.dumps({"closed": True})), err


async def test_create_then_cleanup_name_leaves_nothing(engine: Engine) -> None:
    name = "cc-kept"
    created = await gv_async("ephemeral", "create", name, "--isolation", "container",
                             "--ttl", "600")
    assert created.returncode == 0, created.stderr
    ran = await gv_async("run", "--env", name, "--", "python", "-c", "print('in it')")
    assert (ran.returncode, ran.stdout) == (0, "in it\n"), ran.stderr
    one_container_env(leftovers(), registry.load(name).container["name"])
    started = time.monotonic()
    cleaned = await gv_async("ephemeral", "cleanup", name)
    assert cleaned.returncode == 0, cleaned.stderr
    took = time.monotonic() - started
    left = leftovers()
    assert sum(map(len, left.values())) == 0, left  # at once: cleanup NAME waits for it
    print(f"{RUNTIME}: `cleanup {name}` of a container env: {took:.2f}s, nothing left")


# --- containers whose env is gone; containers that are not gestvenv's ---

async def test_orphans_sweep_removes_a_container_whose_state_file_is_gone_and_no_other(
        engine: Engine, by_hand: list[str]) -> None:
    """A container of gestvenv's whose env is gone (its state file deleted, its reaper never
    ran: a crash) is removed by ``cleanup --orphans``; a container without gestvenv's labels
    (named like one), and a live env's, are never touched by any sweep (``--orphans``,
    ``--expired --idle``, ``--all``; ``--all`` ends the live env, as it must)."""
    state = storage.state_dir()
    # Not gestvenv's: a container of the user's own, labelled otherwise (and named like one).
    foreign = await asyncio.to_thread(
        run_by_hand, engine, by_hand, f"gestvenv-cc-foreign-{uuid.uuid4().hex[:8]}",
        {"io.example.owner": "someone", LABEL_ENV: "cc-foreign"})
    # A live kept env: its container must stay through every sweep but --all.
    created = await gv_async("ephemeral", "create", "cc-alive", "--isolation", "container",
                             "--ttl", "600")
    assert created.returncode == 0, created.stderr
    alive = registry.load("cc-alive").container["id"]
    orphan_id = uuid.uuid4().hex
    orphan = await asyncio.to_thread(
        run_by_hand, engine, by_hand, f"gestvenv-cc-orphan-{orphan_id[:8]}",
        gestvenv_labels("cc-orphan", orphan_id, state / "cc-orphan.json"))
    swept = await gv_async("ephemeral", "cleanup", "--orphans", "--json")
    assert swept.returncode == 0, swept.stderr
    report = json.loads(swept.stdout)
    ids = await asyncio.to_thread(container_ids, engine)
    assert orphan not in ids, (report, swept.stderr)
    assert {foreign, alive} <= ids
    # (The local runtime's per-user watchdog sweeps orphans too, every cleanup_interval: it
    # may have been first.)
    by = "cleanup --orphans" if any(f"gestvenv-cc-orphan-{orphan_id[:8]}" in p
                                    for p in report["orphan_paths"]) else "the watchdog"
    assert by == "cleanup --orphans" or not SYSTEMD, report
    print(f"{RUNTIME}: the orphaned container was removed by {by}; the foreign one and the "
          "live env's stay")
    for sweep in (["--expired", "--idle", "--orphans"], ["--all"]):
        again = await gv_async("ephemeral", "cleanup", *sweep)
        assert again.returncode == 0, again.stderr
        assert foreign in await asyncio.to_thread(container_ids, engine), sweep
    assert alive not in await asyncio.to_thread(container_ids, engine)  # (--all ended it)
    running = await asyncio.to_thread(
        engine.run, "inspect", "--format", "{{.State.Status}}", foreign)
    assert running.stdout.decode().strip() == "running"
    left = leftovers()
    assert sum(map(len, left.values())) == 0, left


async def test_a_kept_env_whose_state_file_is_deleted_leaves_nothing(engine: Engine) -> None:
    """The state file of a kept container env is deleted (by hand, or a crash took /run):
    its reaper (the env's watchdog locally, its unit's under systemd, both watch the state
    file), or else the sweep, removes the container with the rest."""
    name = "cc-stateless"
    created = await gv_async("ephemeral", "create", name, "--isolation", "container",
                             "--ttl", "600")
    assert created.returncode == 0, created.stderr
    one_container_env(leftovers(), registry.load(name).container["name"])
    deleted = time.monotonic()
    await asyncio.to_thread(registry.state_path(name).unlink)
    try:
        took = await gone_within(CONTAINER_GONE + CLEANUP_INTERVAL, deleted,
                                 "a container env whose state file was deleted")
        how = "without any command"
    except AssertionError:
        left = leftovers()
        print(f"{RUNTIME}: left after the state file's deletion: {leftover_summary(left)}")
        swept = await gv_async("ephemeral", "cleanup", "--orphans")
        assert swept.returncode == 0, swept.stderr
        took = await gone_within(CONTAINER_GONE + CLEANUP_INTERVAL + 30, deleted,
                                 "a container env whose state file was deleted, swept")
        how = "after `cleanup --orphans`"
    print(f"{RUNTIME}: state file of a container env deleted: nothing left {took:.2f}s "
          f"later, {how}")
    assert how == "without any command"


async def test_the_state_file_of_an_owned_env_deleted_while_a_command_runs_leaves_nothing(
        spawn: Spawn, engine: Engine) -> None:
    """The state file of an env whose creator is running a command in it is deleted: its
    reaper ends it, container included; the command's end reaches the creator (its ``podman
    exec`` returns: it must not wait for a container that is gone), its block closes, and
    nothing is left, no ``podman exec`` either."""
    name = "cc-stateless-owned"
    creator = spawn(OWNED_TTL, name, "60", json.dumps(SLEEP))
    env = json.loads(await read_line(creator, timeout=60))
    await command_runs(creator, env["id"])
    one_container_env(leftovers(), registry.load(name).container["name"])
    deleted = time.monotonic()
    await asyncio.to_thread(registry.state_path(name).unlink)
    try:
        took = await gone_within(CONTAINER_GONE + CLEANUP_INTERVAL, deleted,
                                 "an owned container env whose state file was deleted while "
                                 "a command ran")
    finally:
        if creator.poll() is None:
            print(f"{RUNTIME}: the creator still waits for its command "
                  f"{time.monotonic() - deleted:.1f}s after the state file's deletion")
    ended = json.loads(await read_line(creator, timeout=5))
    print(f"{RUNTIME}: state file deleted under a running command: nothing left {took:.2f}s "
          f"later; the command's end: {ended}")
    assert await asyncio.to_thread(creator.wait, 10) == 0, creator.communicate()[1]


# --- a container of gestvenv's that the engine made but no env ever knew ---

async def test_sweep_leaves_a_container_of_another_users_env_alone(
        engine: Engine, by_hand: list[str]) -> None:
    """gestvenv's labels, a missing state file, but another owner: a user's sweep removes
    only its own user's containers (root's sweep, as a user's, goes by the owner label)."""
    state = storage.state_dir()
    other = await asyncio.to_thread(
        run_by_hand, engine, by_hand, f"gestvenv-cc-owner-{uuid.uuid4().hex[:8]}",
        {**gestvenv_labels("cc-owner", uuid.uuid4().hex, state / "cc-owner.json"),
         LABEL_OWNER: str(os.geteuid() + 4242)})
    swept = await gv_async("ephemeral", "cleanup", "--orphans")
    assert swept.returncode == 0, swept.stderr
    assert other in await asyncio.to_thread(container_ids, engine)
    await asyncio.to_thread(engine.run, "rm", "--force", "--time", "0", other)


async def test_a_sweep_removes_every_orphan_even_if_one_went_meanwhile(
        engine: Engine, by_hand: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep lists gestvenv's orphaned containers, then removes them in one ``rm``. Between
    the two, one of them can go by itself (its own reaper, its ``--rm``, another sweep: all
    run at once when many envs end together, as after a crash): the others must still go.
    Simulated exactly: the listing also names a container that no longer exists."""
    from gestvenv import load_config
    from gestvenv.runtime import container

    state = storage.state_dir()
    orphans = [await asyncio.to_thread(
        run_by_hand, engine, by_hand, f"gestvenv-cc-orphan{n}-{env_id[:8]}",
        gestvenv_labels(f"cc-orphan{n}", env_id, state / f"cc-orphan{n}.json"))
        for n, env_id in enumerate(uuid.uuid4().hex for _ in range(2))]
    real_ours = Engine.ours

    def ours_and_one_gone(self: Engine, **kwargs: object) -> list[dict[str, str]]:
        gone_id = uuid.uuid4().hex
        gone = {"id": uuid.uuid4().hex * 2, "name": f"gestvenv-cc-gone-{gone_id[:8]}",
                "state": "exited", f"label:{LABEL_ID}": gone_id,
                f"label:{LABEL_STATE}": str(state / "cc-gone.json")}
        return [gone, *real_ours(self, **kwargs)]  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "ours", ours_and_one_gone)
    removed = await asyncio.to_thread(container.sweep, load_config())
    print(f"{RUNTIME}: the sweep said: {removed}")
    left = set(orphans) & await asyncio.to_thread(container_ids, engine)
    assert left == set(), f"{len(left)} of the 2 orphans are still there"
