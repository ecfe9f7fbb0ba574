"""The sandbox's pure decisions (gestvenv/sandbox.py): who commands run as, what they see."""

from __future__ import annotations

import os
import stat

from gestvenv import sandbox
from gestvenv.models import IsolationLevel

ENV = "/var/cache/gestvenv/envs/e-0123abcd"


def test_only_root_creators_at_namespace_and_above_get_a_uid_of_their_own() -> None:
    assert sandbox.needs_own_uid(0, IsolationLevel.NAMESPACE)
    assert sandbox.needs_own_uid(0, IsolationLevel.CONTAINER)
    assert not sandbox.needs_own_uid(0, IsolationLevel.PROCESS)
    assert not sandbox.needs_own_uid(1000, IsolationLevel.CONTAINER)


def test_the_uid_comes_from_the_id_and_steps_past_taken_ones() -> None:
    uid = sandbox.uid_for("0123abcd" + "0" * 24)
    assert uid == sandbox.UID_BASE + 0x0123ABCD % sandbox.UID_COUNT
    assert sandbox.uid_for("0123abcd" + "0" * 24, {uid}) == uid + 1
    assert sandbox.UID_BASE <= sandbox.uid_for("ffffffff" * 4) < sandbox.UID_BASE + (1 << 24)


def test_what_a_sandbox_shows() -> None:
    seen = {"hide": ["/var/cache/gestvenv"], "expose": ["/root/.pyenv/versions/3.11.7"]}
    assert sandbox.visible(ENV + "/bin/python", ENV, **seen)
    assert sandbox.visible("/root/.pyenv/versions/3.11.7/bin/python3.11", ENV, **seen)
    assert sandbox.visible("/usr/bin/python3", ENV, **seen)
    for hidden in ("/root/.ssh", "/home/u/x", "/tmp/x", "/var/cache/gestvenv/uv",
                   "/var/cache/gestvenv/envs/other-89abcdef"):
        assert not sandbox.visible(hidden, ENV, **seen), hidden
    assert sandbox.visible("/rooted", ENV)  # /root is a prefix of it, not a parent


def test_a_command_starts_where_asked_else_where_its_caller_is_if_shown() -> None:
    def shown(path: str) -> bool:
        return not path.startswith("/root")

    assert sandbox.command_cwd("/srv/x", "/root", ENV, shown) == "/srv/x"
    assert sandbox.command_cwd(None, "/srv", ENV, shown) == "/srv"
    assert sandbox.command_cwd(None, "/root/proj", ENV, shown) == ENV


def test_paths_to_hide_and_to_expose() -> None:
    hide, expose = sandbox.sandbox_paths(
        "/root/.pyenv/versions/3.11.7/bin/python3.11", ["/tmp/ci/.venv/bin/uv"],
        ["/var/cache/gestvenv", "/tmp/x/envs", "/var/cache/gestvenv"])
    assert hide == ["/var/cache/gestvenv"]  # under /tmp: hidden already
    assert expose[0] == "/root/.pyenv/versions/3.11.7"
    assert "/tmp/ci/.venv/bin/uv" in expose
    assert sandbox.sandbox_paths("/usr/bin/python3.11", [], []) == ([], [])
    assert sandbox.interpreter_prefix("/usr/bin/python3.11") == "/usr"


def test_which_shared_files_may_stay_shared() -> None:
    def st(mode: int, uid: int = 0) -> os.stat_result:
        return os.stat_result((stat.S_IFREG | mode, 0, 0, 2, uid, 0, 0, 0, 0, 0))

    assert sandbox.shared_safe(st(0o644))
    assert sandbox.shared_safe(st(0o755))
    assert not sandbox.shared_safe(st(0o664))           # group-writable
    assert not sandbox.shared_safe(st(0o646))           # world-writable
    assert not sandbox.shared_safe(st(0o4755))          # setuid
    assert not sandbox.shared_safe(st(0o644, uid=1000))  # not root's
