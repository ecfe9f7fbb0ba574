"""The env's container as command lines, and what container isolation reports (no engine)."""

from __future__ import annotations

import pytest

from gestvenv.container import engine as engines
from gestvenv.container import plan
from gestvenv.models import (
    NOT_HELD,
    THREATS,
    Enforcement,
    IsolationLevel,
    LimitStatus,
    ResourceLimits,
)


def _spec(**changes: object) -> plan.ContainerSpec:
    base: dict[str, object] = dict(
        engine="podman", image="localhost/gestvenv-python:3.11-abc", env_name="web",
        env_id="0123456789abcdef0123456789abcdef", owner=0, state_file="/run/gestvenv/web.json",
        env_path="/var/cache/gestvenv/envs/web-01234567", interpreter="/usr/bin/python3.11",
        network=False)
    base.update(changes)
    return plan.ContainerSpec(**base)  # type: ignore[arg-type]


def _pairs(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_the_container_is_named_and_labelled_after_its_env() -> None:
    args = plan.run_args(_spec())
    assert _pairs(args, "--name") == ["gestvenv-web-01234567"]
    labels = dict(v.split("=", 1) for v in _pairs(args, "--label"))
    assert labels == {engines.LABEL_ID: "0123456789abcdef0123456789abcdef",
                      engines.LABEL_ENV: "web", engines.LABEL_OWNER: "0",
                      engines.LABEL_STATE: "/run/gestvenv/web.json"}
    assert plan.container_name("a b/c", "f" * 32) == "gestvenv-a_b_c-ffffffff"


def test_only_the_env_is_writable_and_nothing_is_privileged() -> None:
    args = plan.run_args(_spec())
    assert "--http-proxy=false" in args  # not the creator's proxy credentials
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert _pairs(args, "--cap-drop") == ["all"]
    assert _pairs(args, "--security-opt") == ["no-new-privileges"]
    env = "/var/cache/gestvenv/envs/web-01234567"
    assert _pairs(args, "--volume") == [f"{env}:{env}:rw"]
    assert sorted(t.split(":")[0] for t in _pairs(args, "--tmpfs")) == ["/run", "/tmp",
                                                                         "/var/tmp"]
    assert _pairs(args, "--pull") == ["never"]  # no registry, ever
    # The image's interpreter holds the container open; everything else is exec'd.
    assert args[-len(plan.HOLD) - 2:] == ["localhost/gestvenv-python:3.11-abc",
                                          "/usr/bin/python3.11", *plan.HOLD]


def test_network_is_none_or_the_hosts() -> None:
    assert _pairs(plan.run_args(_spec(network=False)), "--network") == ["none"]
    assert _pairs(plan.run_args(_spec(network=True)), "--network") == ["host"]


def test_a_capped_env_writes_its_temp_dirs_and_shm_within_its_cap() -> None:
    args = plan.run_args(_spec(temp=(("/tmp", "/e/.gestvenv-tmp"),
                                     ("/var/tmp", "/e/.gestvenv-var-tmp")), shm_mb=64))
    volumes = _pairs(args, "--volume")
    assert "/e/.gestvenv-tmp:/tmp:rw" in volumes and "/e/.gestvenv-var-tmp:/var/tmp:rw" in volumes
    assert [t.split(":")[0] for t in _pairs(args, "--tmpfs")] == ["/run"]
    assert _pairs(args, "--shm-size") == ["64m"]


def test_the_engine_holds_limits_only_where_no_slice_does() -> None:
    local = plan.run_args(_spec(memory_mb=64, processes=20, cpu_percent=50.0))
    assert _pairs(local, "--memory") == ["64m"] and _pairs(local, "--memory-swap") == ["64m"]
    assert _pairs(local, "--pids-limit") == [str(20 + plan.CONTAINER_TASKS)]
    assert _pairs(local, "--cpus") == ["0.50"]
    assert "--cgroup-parent" not in local
    under_systemd = plan.run_args(_spec(cgroup_parent="gestvenv-web.slice"))
    assert _pairs(under_systemd, "--cgroup-parent") == ["gestvenv-web.slice"]
    assert "--memory" not in under_systemd
    assert plan.global_args("podman", "systemd") == ["--cgroup-manager", "systemd"]
    assert plan.global_args("docker", "systemd") == []


def test_users_and_rootless_mapping() -> None:
    assert _pairs(plan.run_args(_spec(user="1234:1234")), "--user") == ["1234:1234"]
    rootless = plan.run_args(_spec(keep_id=True))
    assert _pairs(rootless, "--userns") == ["keep-id"] and "--user" not in rootless


def test_tools_are_bound_read_only() -> None:
    args = plan.run_args(_spec(expose=("/usr/bin/uv", "/usr/bin/uv")))
    assert _pairs(args, "--volume").count("/usr/bin/uv:/usr/bin/uv:ro") == 1


def test_a_command_keeps_only_its_own_variables() -> None:
    inherited = {"HOME": "/root", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "LANG": "C.UTF-8",
                 "PATH": "/usr/bin"}
    environ = {**inherited, "GESTVENV_ENV_ID": "x", "MINE": "1", "PATH": "/e/bin:/usr/bin"}
    out = plan.command_environ(environ, inherited, "/e")
    assert "AWS_SECRET_ACCESS_KEY" not in out  # the host's secrets stay on the host
    assert out["LANG"] == "C.UTF-8" and out["MINE"] == "1" and out["GESTVENV_ENV_ID"] == "x"
    assert out["PATH"] == "/e/bin:/usr/local/bin:/usr/bin:/bin"
    assert out["HOME"] == out["VIRTUAL_ENV"] == "/e"
    # A variable the caller set to the value we have ourselves is still the caller's.
    assert plan.command_environ({"LC_ALL": "C"}, {"LC_ALL": "C"}, "/e")["LC_ALL"] == "C"


def test_exec_args() -> None:
    environ = {"API_TOKEN": "s3cr3t", "PATH": "/e/bin", "GESTVENV_ENV_ID": "x"}
    args = plan.exec_args("gestvenv-web-01234567", environ=environ, cwd="/e",
                          argv=["python", "-V"], interactive=True, tty=False, user=None,
                          preserve_fds=1)
    # A value the caller gave goes by name (the engine's CLI has it in its environment): never
    # on a command line, which every local user can read. What the CLI itself would read
    # (PATH, HOME...) and gestvenv's own go by value.
    assert args == ["exec", "--interactive", "--preserve-fds", "1", "--workdir", "/e",
                    "--env", "PATH=/e/bin", "--env", "GESTVENV_ENV_ID=x", "--env", "API_TOKEN",
                    "gestvenv-web-01234567", "python", "-V"]
    assert "s3cr3t" not in " ".join(args)
    assert plan.split_environ(environ)[1] == {"API_TOKEN": "s3cr3t"}


def _base(**limits: LimitStatus) -> Enforcement:
    return Enforcement("local", IsolationLevel.PROCESS, IsolationLevel.PROCESS, dict(limits),
                       ("isolation process: something", "another note"))


def test_locally_the_engine_enforces_memory_processes_and_cpu() -> None:
    limits = ResourceLimits(max_memory=64, max_processes=20, max_cpu_percent=50,
                            network_access=False)
    base = _base(max_memory=LimitStatus(64, True, "RLIMIT_AS"),
                 max_cpu_percent=LimitStatus(50, False, "needs a cpu cgroup"))
    out = plan.enforcement(base, limits, engine="podman", rootless=False, own_uid=True,
                           slice_holds=False, requested=IsolationLevel.CONTAINER)
    assert out.isolation_applied is IsolationLevel.CONTAINER
    assert not out.unenforced
    assert "--memory" in out.limits["max_memory"].mechanism
    assert "--pids-limit" in out.limits["max_processes"].mechanism
    assert "--network none" in out.limits["network_access"].mechanism
    assert out.notes == ("another note",)
    assert set(out.protections) == set(THREATS)
    assert not any(v.startswith(NOT_HELD) for v in out.protections.values())


def test_under_systemd_the_slice_keeps_its_limits() -> None:
    limits = ResourceLimits(max_memory=64)
    base = _base(max_memory=LimitStatus(64, True, "MemoryMax= on the env's slice"))
    out = plan.enforcement(base, limits, engine="podman", rootless=False, own_uid=True,
                           slice_holds=True, requested=IsolationLevel.CHROOT)
    assert out.limits["max_memory"].mechanism == "MemoryMax= on the env's slice"
    assert out.isolation_requested is IsolationLevel.CHROOT
    assert any("chroot" in n for n in out.notes)
    # With network access, the container shares the host's network, and says so.
    assert out.protections["network"].startswith(NOT_HELD)


@pytest.mark.parametrize(("requested", "found", "expected"), [
    ("auto", {"podman": "/p", "docker": "/d"}, ["podman", "docker"]),
    ("auto", {"podman": None, "docker": "/d"}, ["docker"]),
    ("docker", {"podman": "/p", "docker": "/d"}, ["docker"]),
    ("podman", {"podman": None, "docker": "/d"}, []),
])
def test_engine_choice(requested: str, found: dict[str, str | None],
                       expected: list[str]) -> None:
    assert engines.choose(requested, found) == expected


def test_containers_conf_only_where_the_host_needs_it() -> None:
    assert engines.containers_conf_text(drop_ulimits=False, runtime=None) is None
    text = engines.containers_conf_text(drop_ulimits=True, runtime="runc")
    assert text is not None
    assert "default_ulimits = []" in text and 'runtime = "runc"' in text


def test_the_memory_cgroup_of_a_container_init() -> None:
    from gestvenv.runtime.container import cgroup_in
    hybrid = ["12:pids:/libpod_parent/libpod-abc", "4:memory:/libpod_parent/libpod-abc",
              "1:name=systemd:/libpod_parent/libpod-abc", "0::/"]
    assert cgroup_in(hybrid) == "/libpod_parent/libpod-abc"
    assert cgroup_in(["0::/gestvenv.slice/gestvenv-web.slice/libpod-abc.scope"]) == \
        "/gestvenv.slice/gestvenv-web.slice/libpod-abc.scope"
    assert cgroup_in(["3:cpu,cpuacct:/x"]) is None


def test_without_a_status_channel_the_inits_exit_status_is_the_report() -> None:
    from gestvenv.exceptions import CommandNotExecutableError, CommandNotFoundError
    from gestvenv.models import ExecResult
    from gestvenv.runtime.container import _reported

    def result(code: int, stderr: str = "") -> ExecResult:
        return ExecResult(argv=("x",), returncode=code, stdout="", stderr=stderr, duration=0.1)

    assert _reported(result(137), "x").returncode == -9
    assert _reported(result(3), "x").returncode == 3
    assert _reported(result(127, "sh: nope: not found\n"), "x").returncode == 127
    with pytest.raises(CommandNotFoundError, match="No such file"):
        _reported(result(127, "gestvenv: cannot run /x: [Errno 2] No such file\n"), "/x")
    with pytest.raises(CommandNotExecutableError, match="Permission denied"):
        _reported(result(127, "gestvenv: cannot run /x: [Errno 13] Permission denied\n"), "/x")


def test_a_state_file_cannot_name_another_program_as_the_engine() -> None:
    from gestvenv.exceptions import RuntimeUnavailableError
    from gestvenv.registry import EnvRecord
    from gestvenv.runtime.container import engine_of

    def record(**container: object) -> EnvRecord:
        return EnvRecord(name="x", id="0" * 32, path="/nonexistent/x-00000000", backend="disk",
                         runtime="local", interpreter="/usr/bin/python3", python_version="3",
                         created_at=0.0, ttl=None, idle_timeout=None, limits={},
                         enforcement={}, container=dict(container))

    assert engine_of(record(engine="podman", path="/usr/bin/podman")).path == "/usr/bin/podman"
    for engine, path in (("podman", "/tmp/evil"), ("sh", "/bin/sh"), ("docker", "docker")):
        with pytest.raises(RuntimeUnavailableError, match="unknown container engine"):
            engine_of(record(engine=engine, path=path))
    kept = engine_of(record(engine="docker", path="/usr/bin/docker",
                            environ={"DOCKER_HOST": "unix:///x", "LD_PRELOAD": "/evil.so"}))
    assert kept.environ == {"DOCKER_HOST": "unix:///x"}


def test_private_tmpfs_mounts_are_sized_to_max_memory() -> None:
    args = plan.run_args(_spec(tmpfs_mb=64))
    assert all(t.endswith(",size=64m") for t in _pairs(args, "--tmpfs")), args
