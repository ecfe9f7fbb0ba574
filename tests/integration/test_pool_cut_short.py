"""What a refill of the systemd pool cut short leaves, and what removes it: an env dir is
claimed whole or not at all (``storage.claim_dir``, killed at each of its writes), a drain's
``_discard`` removes a pool unit's dir left without its claim (and nothing that is not
provably that entry's), the sweep removes a pool file's temporary file never finished.

Host tier: real files, real killed processes; the systemd tier's test_pool.py kills whole
refills and drains them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from gestvenv import storage
from gestvenv.runtime.systemd import pool as gvpool

from .support import Spawn

ID = "0123abcd" + "0" * 24

CLAIMING = """
    import os, signal, sys, threading
    from pathlib import Path
    from gestvenv import storage

    # storage.claim_dir, SIGKILLed before its n-th write to the filesystem (how: kill) or, when
    # that write is an open by path, right after it (how: opened: a kill between the open and
    # the write). Prints what it was at, before; "done" if it got through.
    how, n, path, state, env_id = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
    EVENTS = ("open", "os.mkdir", "os.rename", "os.link", "os.remove", "os.rmdir")
    seen = 0
    busy = False

    def hook(event, args):
        global seen, busy
        if busy or event not in EVENTS or isinstance(args[0], int) or \\
                (event == "open" and not args[2] & WRITES):
            return
        seen += 1
        if seen != n:
            return
        busy = True
        if how == "opened" and (event != "open" or args[2] & os.O_TMPFILE == os.O_TMPFILE
                                or not os.path.isabs(args[0])):
            os._exit(3)  # (not an open by path: nothing between it and a write to see)
        if how == "opened":
            os.close(os.open(args[0], args[2], 0o644))
        print(f"{event} {args!r}", flush=True)
        signal.pthread_kill(threading.get_ident(), signal.SIGKILL)

    sys.addaudithook(hook)
    storage.claim_dir(Path(path), Path(state), env_id)
    print("done", flush=True)
"""


def test_a_dir_is_claimed_whole_or_left_empty_wherever_its_creator_is_killed(
        tmp_path: Path, spawn: Spawn) -> None:
    """A creator killed at any point of claim_dir leaves no dir, an empty one (which a drain and
    the orphan sweep recognise as cut short) or one whose claim reads whole: never a dir with
    a claim nobody can read (the orphan sweep leaves those alone for good)."""
    root = tmp_path / "root"
    root.mkdir()
    state = tmp_path / "state.json"
    path = root / storage.env_dir_name("env", ID)
    seen = []

    def kill(how: str, n: int) -> int:
        proc = spawn(CLAIMING, how, str(n), str(path), str(state), ID)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 3, -signal.SIGKILL), err
        left = sorted(os.listdir(path)) if path.exists() else None
        if proc.returncode != 3:  # (3: that write was no open by path)
            seen.append(f"{how} {n} at {out.strip()}: left {left}")
            if left:
                assert storage.claim_of(path) == (ID, str(state)), seen[-1]
            else:
                assert left is None or storage.left_before_its_claim(path), seen[-1]
        if path.exists():
            storage.remove_tree(path, [root])
        return proc.returncode

    for n in range(1, 20):
        if kill("kill", n) == 0:
            break
        kill("opened", n)
    assert seen[-1].startswith(f"kill {n} at done: left ['{storage.CLAIM}']"), seen
    assert n >= 3, seen  # (its mkdir and its claim's writes, each a point where it died)


def _entry(folder: Path, stem: str, env_id: str, path: Path) -> gvpool.PoolEntry:
    entry = gvpool.PoolEntry(stem=stem, id=env_id, path=str(path), key="k", created_at=1.0,
                             idle_until=2.0, file=str(gvpool.pool_file(stem, folder)))
    gvpool._write(entry, Path(entry.file))
    return entry


@pytest.fixture
def marked_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / storage.ROOT_MARK).write_text("")
    return root


@pytest.mark.parametrize("left", ["empty", "half-written claim"])
def test_a_drain_removes_a_pool_dir_its_refill_left_before_its_claim(
        marked_root: Path, left: str) -> None:
    """The CI failure: a refill killed between its pool dir's mkdir and its claim. The dir is
    that entry's (named for its stem and id, in a marked root) and holds nothing of value:
    _discard (what a drain does with each unclaimed entry) removes it with its pool file."""
    stem = "gvpool-0badc0de"
    path = marked_root / storage.env_dir_name(stem, ID)
    path.mkdir()
    if left == "half-written claim":  # (where the filesystem has no O_TMPFILE)
        (path / storage.CLAIM).write_text('{"id": "0123')
    entry = _entry(storage.pool_dir(), stem, ID, path)
    gvpool._discard(entry)
    assert not path.exists() and not Path(entry.file).exists()


@pytest.mark.parametrize("case", ["unmarked root", "something else in it", "another name",
                                  "a symlink", "claimed by another pool file"])
def test_a_drain_leaves_a_dir_that_is_not_provably_the_entrys(
        tmp_path: Path, marked_root: Path, case: str) -> None:
    """Without a claim naming its pool file, a dir goes only if it is exactly what the refill
    was cut short in: empty, named for that entry, in a marked root, a dir."""
    stem = "gvpool-0badc0de"
    root = tmp_path / "plain" if case == "unmarked root" else marked_root
    root.mkdir(exist_ok=True)
    path = root / storage.env_dir_name(stem, ID)
    kept = path
    if case == "a symlink":
        kept = tmp_path / "target"
        kept.mkdir()
        path.symlink_to(kept)
    elif case == "another name":
        kept = root / storage.env_dir_name("gvpool-00c0ffee", ID)
        kept.mkdir()
    else:
        path.mkdir()
    if case == "something else in it":
        (path / "precious").write_text("keep")
    if case == "claimed by another pool file":
        storage.write_claim(path, gvpool.pool_file("gvpool-00c0ffee"), ID)
    gvpool._discard(_entry(storage.pool_dir(), stem, ID, path))
    assert kept.is_dir()
    assert case != "something else in it" or (path / "precious").read_text() == "keep"


def test_the_sweep_removes_a_pool_files_temporary_file_never_finished() -> None:
    """A process killed while it wrote a pool file (a claim, or a refill where the filesystem
    has no O_TMPFILE) leaves its temporary file: the sweep removes it once it is older than
    the grace, and nothing else of the pool dir."""
    folder = storage.pool_dir()
    stale = folder / f".gvpool-0badc0de.json.{os.getpid()}.123.tmp"
    fresh = folder / f".gvpool-00c0ffee.json.{os.getpid()}.456.tmp"
    other = folder / ".gvpool-notatemp.tmp"
    for path in (stale, fresh, other):
        path.write_text("{")
    old = time.time() - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    removed = gvpool.sweep_files({})
    assert removed == {stale.name: "a pool file its writer never finished"}, removed
    assert not stale.exists() and fresh.exists() and other.exists()
    for path in (fresh, other):
        path.unlink()
