"""Container images with a real engine: a base made of this host's interpreter runs offline,
a package layer holds a snapshot's venv, images survive save and load, prune keeps what is in
use and never touches an image without gestvenv's label.

With podman the tests run against a store of their own (CONTAINERS_STORAGE_CONF, in the test's
temp dir): prune acts on every gestvenv image an engine has, and neither the user's images nor
another test run's may be touched, nor touch these. Docker has no such switch: there the tests
that prune are skipped, the others remove what they made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from gestvenv import templates
from gestvenv.builder import find_interpreter
from gestvenv.container import images
from gestvenv.container.engine import LABEL_IMAGE, Engine, EngineError, find


class Store:
    """The engine the tests use, and what they made in it."""

    def __init__(self, engine: Engine, private: bool) -> None:
        self.engine = engine
        self.private = private          # a store of the tests' own (podman)
        self.images: list[str] = []     # ids of images made here (docker: removed one by one)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``run --rm`` an image, never pulling, without network."""
        return self.engine.run("run", "--rm", "--pull", "never", "--network", "none", *args,
                               check=check, timeout=120.0)

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.decode().strip()

    def image_id(self, ref: str) -> str:
        done = self.engine.run("image", "inspect", "--format", "{{.Id}}", ref)
        return done.stdout.decode().strip().removeprefix("sha256:")

    def made(self, ref: str) -> str:
        self.images.append(self.image_id(ref))
        return ref


def _private_store(engine: Engine, root: Path) -> Engine | None:
    """``engine`` (podman) on a store in ``root``, with the host's storage driver; None if
    podman does not answer there."""
    done = engine.run("info", "--format", "{{.Store.GraphDriverName}}", check=False)
    driver = done.stdout.decode().strip() or "overlay"
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "{driver}"\ngraphroot = "{root}/graph"\n'
                    f'runroot = "{root}/run"\n')
    private = replace(engine, environ={**engine.environ, "CONTAINERS_STORAGE_CONF": str(conf)})
    answer = private.run("info", "--format", "{{.Store.GraphRoot}}", check=False)
    if answer.returncode != 0 or answer.stdout.decode().strip() != f"{root}/graph":
        return None
    return private


def _remove_store(engine: Engine, root: Path) -> None:
    """Empty the tests' own store, then remove it (nothing of it may stay mounted)."""
    engine.run("rm", "--all", "--force", "--time", "0", check=False)
    engine.run("rmi", "--all", "--force", check=False)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "--lazy", mount], check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    engine, why = find("auto", tmp_path_factory.mktemp("engine-conf"))
    if engine is None:
        pytest.skip(f"no container engine answers: {why}")
    if engine.name != "podman":
        yield Store(engine, private=False)
        return
    root = tmp_path_factory.mktemp("store")
    private = _private_store(engine, root)
    if private is None:
        pytest.skip(f"podman does not run on a store of its own in {root}")
    try:
        yield Store(private, private=True)
    finally:
        _remove_store(private, root)


@pytest.fixture(scope="module")
def interpreter() -> str:
    return find_interpreter().path


@pytest.fixture(scope="module")
def base(store: Store, interpreter: str) -> Iterator[str]:
    existed = images.image_exists(store.engine, images.base_ref(interpreter))
    started = time.monotonic()
    ref = images.ensure_base(store.engine, interpreter)
    print(f"base {ref}: {time.monotonic() - started:.2f} s")
    base_id = store.image_id(ref)
    yield ref
    if not store.private and not existed:
        store.engine.run("rmi", base_id, check=False)


@pytest.fixture
def made(store: Store) -> Iterator[Store]:
    """The store, removing at the end the images a test made (docker's shared store)."""
    start = len(store.images)
    yield store
    for image_id in reversed(store.images[start:]):
        store.engine.run("rmi", "--force", image_id, check=False)
    del store.images[start:]


def make_snapshot(root: Path, interpreter: str) -> Path:
    """A snapshot as templates.TemplateCache.store leaves one: a package (with its .pyc)
    and a script whose "#!" names the placeholder."""
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("VALUE = 42\n")
    subprocess.run([interpreter, "-m", "compileall", "-q", str(site)], check=True)
    (root / "bin").mkdir()
    tool = root / "bin" / "fake-tool"
    tool.write_bytes(b"#!" + templates.PLACEHOLDER + b"\n"
                     b"import sys, fakepkg\nprint('fake-tool', fakepkg.VALUE, sys.executable)\n")
    tool.chmod(0o755)
    (root / ".gestvenv-template").write_text(json.dumps({"created": time.time()}))
    return root


@pytest.fixture
def snapshot(tmp_path: Path, interpreter: str) -> Path:
    if find_interpreter().short_version != "3.11":
        pytest.skip("the hand-made snapshot is for Python 3.11")
    return make_snapshot(tmp_path / "snapshot", interpreter)


def test_the_base_runs_the_hosts_interpreter_offline(store: Store, base: str,
                                                     interpreter: str) -> None:
    code = "import ssl, sqlite3, json, ctypes, sys; print(sys.executable)"
    assert store.out(base, interpreter, "-c", code) == interpreter
    assert store.out(base, "/bin/sh", "-c", "echo ok") == "ok"
    # any uid reads it all (the env's commands may run as one of their own)
    assert store.out("--user", "65534:65534", base, interpreter, "-c",
                     "import ssl, os; print(os.getuid())") == "65534"
    labels = store.engine.run("image", "inspect", "--format",
                              f'{{{{index .Config.Labels "{LABEL_IMAGE}"}}}}', base)
    assert labels.stdout.decode().strip() == "base"

    started = time.monotonic()
    again = images.ensure_base(store.engine, interpreter)
    assert time.monotonic() - started < 2.0
    assert again == base


def test_a_package_layer_holds_the_snapshot_as_a_venv(made: Store, base: str,
                                                      interpreter: str,
                                                      snapshot: Path) -> None:
    key = uuid.uuid4().hex
    started = time.monotonic()
    ref = made.made(images.ensure_packages(made.engine, base, key, snapshot, interpreter))
    print(f"package layer: {time.monotonic() - started:.2f} s")
    assert ref == images.packages_ref(key)
    assert images.find_packages(made.engine, key) == ref
    assert made.out(ref, "python", "-c", "import fakepkg, sys; print(fakepkg.VALUE, sys.prefix)") \
        == "42 /opt/gestvenv/venv"
    assert made.out(ref, "fake-tool") == "fake-tool 42 /opt/gestvenv/venv/bin/python"
    assert made.out("--user", "1000:1000", ref, "fake-tool").startswith("fake-tool 42")
    # the snapshot's .pyc files are valid in the image (ADD keeps mtimes; COPY rounds them)
    verbose = made.run("--read-only", ref, "python", "-v", "-c", "import fakepkg").stderr
    pyc = "/opt/gestvenv/venv/lib/python3.11/site-packages/fakepkg/__pycache__/"
    assert f"code object from '{pyc}__init__.cpython-311.pyc'".encode() in verbose

    first_id = made.image_id(ref)
    started = time.monotonic()
    assert images.ensure_packages(made.engine, base, key, snapshot, interpreter) == ref
    reuse = time.monotonic() - started
    print(f"package layer reused: {reuse:.3f} s")
    assert reuse < 2.0
    assert made.image_id(ref) == first_id


def test_a_package_layer_needs_its_snapshot_and_its_base(made: Store, base: str,
                                                         interpreter: str,
                                                         tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no snapshot"):
        images.ensure_packages(made.engine, base, uuid.uuid4().hex, tmp_path / "absent",
                               interpreter)
    with pytest.raises(EngineError, match="is missing"):
        images.ensure_packages(made.engine, "localhost/gestvenv-python:0.0-absent",
                               uuid.uuid4().hex, tmp_path, interpreter)
    assert images.find_packages(made.engine, uuid.uuid4().hex) is None


def test_an_image_survives_save_and_load(made: Store, base: str, interpreter: str,
                                         snapshot: Path, tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    ref = made.made(images.ensure_packages(made.engine, base, key, snapshot, interpreter))
    archive = tmp_path / "image.tar"
    images.save(made.engine, ref, archive)
    images.save(made.engine, ref, archive)  # written over whole
    assert archive.stat().st_size > 10_000_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    made.engine.run("rmi", ref)
    assert images.find_packages(made.engine, key) is None
    assert ref in images.load(made.engine, archive)
    made.made(ref)
    assert made.out(ref, "fake-tool") == "fake-tool 42 /opt/gestvenv/venv/bin/python"


@pytest.fixture
def holder(made: Store) -> Iterator[list[str]]:
    """Names of the containers a test starts, removed at its end."""
    names: list[str] = []
    yield names
    for name in names:
        made.engine.run("rm", "--force", "--time", "0", name, check=False)


def _unlabelled_image(store: Store, tmp_path: Path) -> str:
    """An image that is not gestvenv's: one file, imported."""
    tar = tmp_path / "plain.tar"
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(tar), "--", "snapshot/bin"],
                   check=True)
    ref = f"localhost/gvtest-plain:{uuid.uuid4().hex[:12]}"
    store.engine.run("import", str(tar), ref)
    return ref


def test_list_and_prune(made: Store, holder: list[str], base: str, interpreter: str,
                        snapshot: Path, tmp_path: Path) -> None:
    if not made.private:
        pytest.skip("prune acts on every gestvenv image of the engine; only podman gives the "
                    "tests a store of their own")
    kept, dropped, twin = (uuid.uuid4().hex for _ in range(3))
    refs = {key: images.ensure_packages(made.engine, base, key, snapshot, interpreter)
            for key in (kept, dropped, twin)}
    plain = _unlabelled_image(made, tmp_path)
    # a package image whose tag went to a newer twin: untagged
    twin_id = made.image_id(refs[twin])
    made.engine.run("untag", refs[twin])

    listed = {i.id: i for i in images.list_images(made.engine)}
    base_key = images.base_key(interpreter)
    base_info = listed[made.image_id(base)]
    assert (base_info.kind, base_info.key, base_info.ref) == ("base", base_key, base)
    for key in (kept, dropped):
        info = listed[made.image_id(refs[key])]
        assert (info.kind, info.key, info.base, info.ref) == ("packages", key, base_key,
                                                               refs[key])
        assert info.size_bytes > 1_000_000
        assert abs(info.created - time.time()) < 600
    # Untagged: nobody's to judge (an image built FROM one of ours inherits its labels too).
    assert twin_id not in listed
    assert made.image_id(plain) not in listed

    # in use by a running container: kept, and so is its base
    name = f"gvtest-images-{uuid.uuid4().hex[:8]}"
    holder.append(name)
    made.engine.run("run", "--detach", "--rm", "--pull", "never", "--network", "none",
                    "--name", name, refs[dropped], "python", "-c",
                    "import signal\nwhile True: signal.pause()")
    assert images.prune(made.engine, {kept, twin}) == []
    assert images.find_packages(made.engine, dropped) == refs[dropped]
    assert images.image_exists(made.engine, base)

    made.engine.run("rm", "--force", "--time", "0", name)
    assert images.prune(made.engine, {kept}) == [refs[dropped]]
    assert images.find_packages(made.engine, kept) == refs[kept]
    assert images.image_exists(made.engine, base)  # the kept one is built on it

    assert images.prune(made.engine, set(), everything=True) == [refs[kept], base]
    assert images.list_images(made.engine) == []
    assert images.image_exists(made.engine, plain)  # not gestvenv's: never touched
    assert made.image_id(twin_id) == twin_id  # nor is the untagged one
    made.engine.run("rmi", plain, twin_id)

    # a pruned base is made again when asked for (the module's other tests use it too)
    assert images.ensure_base(made.engine, interpreter) == base
    assert made.out(base, "/bin/sh", "-c", "echo ok") == "ok"


def test_concurrent_callers_get_one_working_image(made: Store, base: str, interpreter: str,
                                                  snapshot: Path) -> None:
    if not made.private:
        pytest.skip("twins are pruned, which acts on every gestvenv image of the engine")
    key = uuid.uuid4().hex
    with ThreadPoolExecutor(3) as pool:
        refs = set(pool.map(lambda _: images.ensure_packages(made.engine, base, key, snapshot,
                                                              interpreter), range(3)))
    assert refs == {images.packages_ref(key)}
    ref = made.made(refs.pop())
    assert made.out(ref, "fake-tool") == "fake-tool 42 /opt/gestvenv/venv/bin/python"
    twins = [i for i in images.list_images(made.engine) if i.key == key]
    assert [i.ref for i in twins if i.ref] == [ref]
    images.prune(made.engine, {key})  # the untagged twins, if any
    assert [i.ref for i in images.list_images(made.engine) if i.key == key] == [ref]
    assert images.image_exists(made.engine, base)
