"""The local runtime's bubblewrap command line, built without running bwrap."""

from __future__ import annotations

from gestvenv.models import IsolationLevel
from gestvenv.runtime.bwrap import INIT, Sandbox, bwrap_argv
from gestvenv.sandbox import interpreter_prefix

NS = IsolationLevel.NAMESPACE
ENV = "/var/cache/gestvenv/envs/demo-1234abcd"


def build(box: Sandbox, exists: set[str] | None = None, **kw: object) -> list[str]:
    present = exists if exists is not None else {"/tmp", "/var/tmp", "/home", "/root",
                                                 "/run/user", "/run/dbus", "/root/.pyenv/v"}
    args = {"bwrap": "/usr/bin/bwrap", "python": "/usr/bin/python3.11", "status_fd": 7,
            "limits": [(9, 1024)], "argv": ["/bin/true", "x"], "cwd": ENV,
            "new_session": True, **kw}
    return bwrap_argv(box, exists=present.__contains__, **args)  # type: ignore[arg-type]


def pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_non_root_namespace() -> None:
    present = {"/tmp", "/var/tmp", "/home", "/root", "/run/user", "/run/dbus",
               "/var/cache/gestvenv/envs"}
    argv = build(Sandbox(NS, network=False, env_path=ENV, hide=("/var/cache/gestvenv/envs",)),
                 present)
    head = argv[:argv.index("--")]
    for option in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                   "--unshare-net", "--die-with-parent", "--new-session"):
        assert option in head
    assert pairs(head, "--cap-drop") == ["ALL"]
    assert head[head.index("--ro-bind"):head.index("--ro-bind") + 3] == ["--ro-bind", "/", "/"]
    assert pairs(head, "--proc") == ["/proc"] and pairs(head, "--dev") == ["/dev"]
    assert pairs(head, "--tmpfs") == ["/dev/shm", "/tmp", "/var/tmp", "/home", "/root",
                                      "/run/user", "/run/dbus", "/var/cache/gestvenv/envs"]
    # The env's dir, bound read-write after the tmpfs over its root.
    assert head[-5:] == ["--bind", ENV, ENV, "--chdir", ENV]
    tail = argv[argv.index("--") + 1:]
    assert tail[:6] == ["/usr/bin/python3.11", "-I", "-S", "-B", "-c", INIT]
    assert tail[6:] == ["7", "9:1024", "/bin/true", "/bin/true", "x"]


def test_root_with_own_uid_drops_inside_without_user_namespace() -> None:
    argv = build(Sandbox(NS, network=True, env_path=ENV, uid=1879048200, root=True))
    head, tail = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    assert "--unshare-user" not in head and "--unshare-net" not in head
    assert "--cap-drop" not in head  # setpriv needs CAP_SETUID, then drops everything
    assert tail[0] == "/usr/bin/setpriv"
    assert "--reuid=1879048200" in tail and "--bounding-set=-all" in tail
    assert tail[tail.index("--") + 1] == "/usr/bin/python3.11"


def test_root_without_own_uid_drops_capabilities() -> None:
    argv = build(Sandbox(NS, network=True, env_path=ENV, root=True))
    assert pairs(argv, "--cap-drop") == ["ALL"]
    assert "/usr/bin/setpriv" not in argv


def test_exposed_paths_under_hidden_trees_are_bound_back_with_traversable_parents() -> None:
    box = Sandbox(NS, network=True, env_path="/tmp/t/envs/e-1",
                  expose=("/root/.pyenv/v", "/usr/lib/python3", "/root/missing"))
    argv = build(box)
    assert pairs(argv, "--ro-bind") == ["/", "/root/.pyenv/v"]  # /usr is not hidden
    dirs = pairs(argv, "--dir")
    assert dirs == ["/root/.pyenv", "/tmp/t", "/tmp/t/envs"]
    assert pairs(argv, "--perms").count("0755") == 3
    assert box.visible("/root/.pyenv/v/bin/python3") and not box.visible("/root/.bashrc")
    assert box.visible("/tmp/t/envs/e-1/bin") and not box.visible("/tmp/t/envs/e-2")
    assert not box.visible("/tmp") and box.visible("/work/x")


def test_missing_trees_are_not_mounted() -> None:
    argv = build(Sandbox(NS, network=True, env_path=ENV), exists={"/tmp"})
    assert pairs(argv, "--tmpfs") == ["/dev/shm", "/tmp"]


def test_process_level_without_network_is_only_a_network_namespace() -> None:
    box = Sandbox(IsolationLevel.PROCESS, network=False, env_path=ENV)
    assert box.wrapped and not box.namespaced and box.visible("/root/x")
    argv = build(box, new_session=False)
    head = argv[:argv.index("--")]
    assert head == ["/usr/bin/bwrap", "--die-with-parent", "--unshare-net", "--dev-bind", "/",
                    "/", "--chdir", ENV]
    assert not Sandbox(IsolationLevel.PROCESS, network=True, env_path=ENV).wrapped


def test_interpreter_prefix(tmp_path: object) -> None:
    assert interpreter_prefix("/usr/bin/python3.11") == "/usr"
    assert interpreter_prefix("/opt/py/python") == "/opt/py"


def test_a_capped_envs_temp_dirs_are_bound_from_its_own_filesystem() -> None:
    temp = (("/tmp", f"{ENV}/.gestvenv-tmp"), ("/var/tmp", f"{ENV}/.gestvenv-var-tmp"))
    head = build(Sandbox(NS, network=True, env_path=ENV, root=True, temp=temp, shm_mb=20))
    head = head[:head.index("--")]
    # Its private /dev/shm is capped too (RAM, the same size).
    shm = head.index("/dev/shm") - 1
    assert head[shm - 2:shm + 2] == ["--size", str(20 << 20), "--tmpfs", "/dev/shm"]
    assert "/tmp" not in pairs(head, "--tmpfs") and "/var/tmp" not in pairs(head, "--tmpfs")
    binds = [head[i + 1:i + 3] for i, a in enumerate(head) if a == "--bind"]
    assert [f"{ENV}/.gestvenv-tmp", "/tmp"] in binds
    assert [f"{ENV}/.gestvenv-var-tmp", "/var/tmp"] in binds
