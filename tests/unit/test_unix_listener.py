"""The socket ``gestvenv serve`` binds itself (gestvenv.api.unix_listener), on real sockets:
its path appears only once it listens, a stale one is replaced and nothing else is, and at
exit it is removed only if the path still names it."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import resource
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gestvenv.api import unix_listener
from gestvenv.api.unix_listener import BINDING_PREFIX, listen_unix
from gestvenv.exceptions import GestvenvError


@pytest.fixture
def here(tmp_path: Path) -> Path:
    """A directory of the test's own (conftest puts gestvenv's roots in tmp_path)."""
    folder = tmp_path / "here"
    folder.mkdir()
    return folder


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True


def test_the_path_appears_only_once_the_socket_listens(here: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that waits for the path and connects at once is never refused: the CI run
    that found it had a service descheduled between bind() and listen(); here listen() waits
    0.3 s, and a watcher connects the moment the path exists."""
    real = socket.socket

    class SlowToListen(real):  # type: ignore[misc,valid-type]
        def listen(self, *args: int) -> None:
            time.sleep(0.3)
            super().listen(*args)

    path = here / "api.sock"
    seen: list[object] = []

    def watch() -> None:
        deadline = time.monotonic() + 10
        while not os.path.lexists(path) and time.monotonic() < deadline:
            time.sleep(0.0005)
        with real(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                seen.append("connected")
            except OSError as exc:
                seen.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    monkeypatch.setattr(socket, "socket", SlowToListen)
    listener = listen_unix(str(path))
    monkeypatch.undo()
    watcher.join()
    try:
        assert seen == ["connected"]
        assert sorted(os.listdir(here)) == ["api.sock"], "a temporary name was left"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        # Where `ss -xlp` shows it: its directory, by its absolute path (the address is fixed
        # at bind(), under the temporary name).
        assert listener.sock.getsockname().startswith(f"{here}/{BINDING_PREFIX}")
    finally:
        listener.sock.close()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(here: Path) -> None:
    path = here / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: a service that died
    stale.close()
    first = listen_unix(str(path))
    try:
        assert connects(path)
        with pytest.raises(GestvenvError, match="a service already listens there"):
            listen_unix(str(path))
        assert connects(path), "the live service's socket was touched"
        assert sorted(os.listdir(here)) == ["api.sock"]
    finally:
        first.sock.close()


def test_what_is_not_a_socket_is_never_replaced(here: Path) -> None:
    secret = here / "secret"
    secret.write_text("kept")
    cases = {"file": lambda p: p.write_text("mine"), "dir": lambda p: p.mkdir(),
             "link": lambda p: p.symlink_to(secret)}
    fds = open_fds()
    for kind, make in cases.items():
        path = here / f"{kind}.sock"
        make(path)
        with pytest.raises(GestvenvError, match="exists and is not a socket"):
            listen_unix(str(path))
        assert os.path.lexists(path)
    assert secret.read_text() == "kept" and (here / "file.sock").read_text() == "mine"
    assert not [n for n in os.listdir(here) if n.startswith(BINDING_PREFIX)]
    assert open_fds() == fds, "a refusal left a descriptor open"


def test_a_link_to_a_stale_socket_is_not_followed(here: Path) -> None:
    """The stale check looks at the path itself: a symlink to a dead socket elsewhere is
    refused, and the socket it points to stays."""
    elsewhere = here / "elsewhere"
    elsewhere.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(elsewhere / "dead.sock"))
    dead.close()
    path = here / "api.sock"
    path.symlink_to(elsewhere / "dead.sock")
    with pytest.raises(GestvenvError, match="not a socket"):
        listen_unix(str(path))
    assert (elsewhere / "dead.sock").is_socket() and path.is_symlink()


def test_bad_paths_get_clear_errors_and_leave_nothing(here: Path) -> None:
    # The longest path that fits binds, in a directory too deep for the temporary name's
    # absolute address (bound through /proc/self/fd then).
    longest = here / ("d" * (unix_listener.MAX_PATH_BYTES - len(str(here)) - 3)) / "s"
    assert len(str(longest)) == unix_listener.MAX_PATH_BYTES
    listener = listen_unix(str(longest))
    assert listener.sock.getsockname().startswith("/proc/self/fd/") and connects(longest)
    listener.sock.close()
    listener.remove()
    assert not longest.parent.exists()  # (made by the start, removed at its exit)
    fds = open_fds()
    too_long = Path(str(longest) + "b")
    with pytest.raises(GestvenvError, match="at most 107 bytes"):
        listen_unix(str(too_long))
    with pytest.raises(GestvenvError, match="not a name for a socket"):
        listen_unix(str(here / f"{BINDING_PREFIX}x"))
    for bad in ("a\0b", "\udcff\ud800"):
        with pytest.raises(GestvenvError, match=r"NUL byte|this system can name"):
            listen_unix(str(here / bad))
    (here / "plain").write_text("")
    with pytest.raises(GestvenvError, match="plain: not a directory"):
        listen_unix(str(here / "plain" / "api.sock"))
    (here / "plain").unlink()
    (here / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(GestvenvError, match="cannot listen there"):
            listen_unix(str(here / "ro" / "api.sock"))
    assert sorted(os.listdir(here)) == ["ro"] and not os.listdir(here / "ro")
    assert open_fds() == fds, "a refusal left a descriptor open"


def test_mode_and_a_new_directory(here: Path) -> None:
    path = here / "new" / "api.sock"
    listener = listen_unix(str(path), mode=0o660)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    finally:
        listener.sock.close()
    listener.remove()
    assert not path.parent.exists(), "the directory the start made is removed at its exit"
    # ...unless something else was put there meanwhile; and one it did not make stays.
    other = listen_unix(str(path))
    (path.parent / "notes").write_text("kept")
    other.sock.close()
    other.remove()
    assert os.listdir(path.parent) == ["notes"]
    again = listen_unix(str(path))
    again.sock.close()
    again.remove()
    assert os.listdir(path.parent) == ["notes"]


def test_removed_at_exit_only_if_still_ours(here: Path) -> None:
    path = here / "api.sock"
    first = listen_unix(str(path))
    first.sock.close()
    first.remove()
    assert not os.path.lexists(path)
    first.remove()  # gone already: nothing to do
    # Stopped listening, replaced by a later service: that one's socket stays.
    old = listen_unix(str(path))
    old.sock.close()
    later = listen_unix(str(path))
    try:
        old.remove()
        assert connects(path), "the later service's socket was removed"
    finally:
        later.sock.close()
        later.remove()
    assert not os.listdir(here)


def test_a_binding_left_by_a_killed_service_is_swept(here: Path) -> None:
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(here / f"{BINDING_PREFIX}0123456789abcdef"))
    left.close()
    (here / f"{BINDING_PREFIX}notes").write_text("a file of that name: not ours to sweep")
    listener = listen_unix(str(here / "api.sock"))
    try:
        assert sorted(os.listdir(here)) == sorted(["api.sock", f"{BINDING_PREFIX}notes"])
    finally:
        listener.sock.close()


def test_a_directory_locked_too_long_is_refused(here: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unix_listener, "LOCK_WAIT", 0.2)
    published = listen_unix(str(here / "api.sock"))
    published.sock.close()
    fds = open_fds()
    holder = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(GestvenvError, match="holds its directory's lock"):
            listen_unix(str(here / "other.sock"))
        # At exit the lock is waited for, then gone without: a user who holds a shared
        # directory's lock does not keep the socket there.
        published.remove()
    finally:
        os.close(holder)
    assert not os.listdir(here)
    assert open_fds() == fds - 2, "the listener's pin and directory are closed"


def test_two_services_started_at_once_one_listens(here: Path) -> None:
    """Old code: the second probed the first between its bind and listen, took it for stale
    and unlinked it. Now one listens at the path, the other is refused, 20 times."""
    context = multiprocessing.get_context("fork")
    for round_ in range(20):
        path = here / f"r{round_}.sock"
        barrier = context.Barrier(2)
        out: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
        procs = [context.Process(target=_start, args=(str(path), barrier, out))
                 for _ in range(2)]
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=20)[0] for _ in procs)
        assert results == ["listening", "refused"], (round_, results)
        assert connects(path)
        for p in procs:
            p.join(10)
    assert not [n for n in os.listdir(here) if n.startswith(BINDING_PREFIX)]


def test_a_relative_path_is_removed_after_a_chdir(here: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The service chdirs (to a dir of its own, then /) before it exits: the removal goes
    through the directory's descriptor, not the path again."""
    monkeypatch.chdir(here)
    listener = listen_unix("sub/api.sock")
    monkeypatch.chdir("/")
    listener.sock.close()
    listener.remove()
    assert not os.listdir(here)  # (sub/ too: the start made it)


def test_a_live_service_with_a_full_backlog_is_not_taken_for_stale(here: Path) -> None:
    path = here / "api.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(0)
    waiting = []
    try:
        while True:  # fill its backlog: a connect then gets EAGAIN
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            waiting.append(s)
            try:
                s.connect(str(path))
            except BlockingIOError:
                break
        started = time.monotonic()
        with pytest.raises(GestvenvError, match="already listens"):
            listen_unix(str(path))
        assert time.monotonic() - started < 1, "the probe waited on the full backlog"
        assert path.is_socket()
    finally:
        for s in waiting:
            s.close()
        live.close()


def test_the_sweep_leaves_another_users_bindings(here: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(here / f"{BINDING_PREFIX}0123456789abcdef"))
    left.close()
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)  # not ours
    listener = listen_unix(str(here / "api.sock"))
    monkeypatch.undo()
    try:
        assert (here / f"{BINDING_PREFIX}0123456789abcdef").is_socket()
    finally:
        listener.sock.close()
        listener.remove()


def _start(path: str, barrier: Any, out: Any, slow: bool = False) -> None:
    """A service that says whether it listens (with its socket's inode) or why not. ``slow``:
    its probe and its bind each take 30 ms more, the windows where another service, without
    the lock, would unlink this one's live socket or sweep its binding."""
    def slower(function: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            finally:
                time.sleep(0.03)
        return call

    if slow:
        unix_listener._listens = slower(unix_listener._listens)
        unix_listener._bind_listening = slower(unix_listener._bind_listening)
    barrier.wait()
    try:
        listener = listen_unix(path)
    except GestvenvError as exc:
        out.put(("refused", str(exc)))
        return
    out.put(("listening", os.fstat(listener.pin).st_ino))
    time.sleep(1.5)  # listening while the others look
    listener.sock.close()


def test_services_started_at_once_over_a_stale_socket_one_listens(here: Path) -> None:
    """Four at once, over a stale socket and a binding a killed service left: one listens at
    the path, the three others are told a service listens there. Without the lock (LOCK_SH),
    one sweeps another's binding mid-way, or two unlink and link in turn."""
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        path = here / f"r{round_}.sock"
        for name in (path.name, f"{BINDING_PREFIX}{round_:016x}"):
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dead.bind(str(here / name))
            dead.close()
        barrier = context.Barrier(4)
        out = context.Queue()
        procs = [context.Process(target=_start, args=(str(path), barrier, out, True))
                 for _ in range(4)]
        for p in procs:
            p.start()
        results = sorted((out.get(timeout=30) for _ in procs), key=lambda r: r[0])
        assert [r[0] for r in results] == ["listening"] + ["refused"] * 3, (round_, results)
        assert all("a service already listens there" in r[1] for r in results[1:]), results
        assert os.lstat(path).st_ino == results[0][1] and connects(path)
        for p in procs:
            p.join(10)
    assert not [n for n in os.listdir(here) if n.startswith(BINDING_PREFIX)]


def test_short_of_descriptors_after_bind_nothing_is_left(here: Path) -> None:
    """The socket is bound, then its pin cannot be opened (EMFILE): its temporary name goes,
    and the directory the start made."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = open_fds()
    # the directory's descriptor and the socket fit, the pin does not
    resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_leaving(2), hard))
    try:
        with pytest.raises(GestvenvError, match="Too many open files"):
            listen_unix(str(here / "new" / "api.sock"))  # (the dir it made goes too)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert os.listdir(here) == [] and open_fds() == fds


def _limit_leaving(free: int) -> int:
    """The descriptor limit under which exactly ``free`` more descriptors can be opened
    (the lowest free numbers are taken first)."""
    used = {int(fd) for fd in os.listdir("/proc/self/fd")}
    lowest = os.open("/dev/null", os.O_RDONLY)  # the number listdir's own descriptor had
    os.close(lowest)
    used.discard(lowest)
    limit = 0
    while limit - len([fd for fd in used if fd < limit]) < free:
        limit += 1
    return limit
