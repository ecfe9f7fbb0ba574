"""Container images, without an engine: what goes into a base, the package layer's venv and
Containerfile, and how the engine's answers are read."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from gestvenv import templates
from gestvenv.container import images
from gestvenv.container.engine import LABEL_IMAGE, LABEL_KEY, EngineError
from gestvenv.container.images import Entry, Facts, ImageInfo

PYENV = "/root/.pyenv/versions/3.11.7"


def facts(**changes: object) -> Facts:
    base: dict[str, object] = dict(
        given="/usr/bin/python3", executable="/usr/bin/python3.11", version="3.11.2",
        base_prefix="/usr", stdlib="/usr/lib/python3.11", platstdlib="/usr/lib/python3.11",
        dynload="/usr/lib/python3.11/lib-dynload", cache_tag="cpython-311", bits64=True,
        ssl_files=("/etc/ssl/certs/ca-certificates.crt", "/usr/lib/ssl/cert.pem"))
    base.update(changes)
    return Facts(**base)  # type: ignore[arg-type]


# --- the interpreter ----------------------------------------------------------------------

def answer(**changes: object) -> str:
    data: dict[str, object] = {
        "executable": f"{PYENV}/bin/python3.11", "version": "3.11.7", "base_prefix": PYENV,
        "in_venv": False, "stdlib": f"{PYENV}/lib/python3.11",
        "platstdlib": f"{PYENV}/lib/python3.11",
        "dynload": f"{PYENV}/lib/python3.11/lib-dynload", "cache_tag": "cpython-311",
        "bits64": True, "ssl_files": ["/usr/lib/ssl/cert.pem"]}
    data.update(changes)
    return json.dumps(data)


def test_the_interpreters_answer_is_read_as_facts() -> None:
    got = images.parse_facts(f"{PYENV}/bin/python3", answer())
    assert got.executable == f"{PYENV}/bin/python3.11"
    assert got.given == f"{PYENV}/bin/python3"
    assert got.short_version == "3.11"
    assert got.ssl_files == ("/usr/lib/ssl/cert.pem",)


def test_a_venvs_python_is_refused() -> None:
    with pytest.raises(EngineError, match="virtual environment"):
        images.parse_facts("/env/bin/python", answer(in_venv=True))


def test_the_running_interpreter_answers() -> None:
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    got = images.interpreter_facts(base)
    assert got.executable == base
    assert got.version == sys.version.split()[0]
    assert os.path.isdir(got.stdlib)
    assert got.dynload.endswith("lib-dynload")


def test_an_interpreter_that_does_not_run_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(EngineError, match="does not run: broken"):
        images.interpreter_facts(str(fake))
    with pytest.raises(EngineError, match="No such file"):
        images.interpreter_facts(str(tmp_path / "absent"))


def test_the_base_key_follows_the_interpreters_identity() -> None:
    stats: dict[str, tuple[int, int] | None] = {
        "/usr/bin/python3.11": (100, 1), "/usr/lib/python3.11": (4096, 2)}
    key = images.key_of(facts(), stats)
    assert len(key) == 16
    assert int(key, 16) >= 0
    assert images.key_of(facts(), dict(stats)) == key
    assert images.key_of(facts(version="3.11.9"), stats) != key
    assert images.key_of(facts(given="/usr/bin/python3.11"), stats) != key  # another CMD path
    upgraded = {**stats, "/usr/bin/python3.11": (100, 3)}
    assert images.key_of(facts(), upgraded) != key
    touched_stdlib = {**stats, "/usr/lib/python3.11": (4096, 5)}
    assert images.key_of(facts(), touched_stdlib) != key


def test_refs() -> None:
    assert images.ref_for(facts(), "0123456789abcdef") == \
        "localhost/gestvenv-python:3.11-0123456789ab"
    assert images.packages_ref("f" * 32) == f"localhost/gestvenv-env:{'f' * 32}"


# --- what goes into a base ----------------------------------------------------------------

LINKS = {"/lib": "usr/lib", "/bin": "usr/bin", "/usr/bin/python3": "python3.11",
         "/usr/lib/ssl/cert.pem": "/etc/ssl/certs/ca-certificates.crt",
         "/loop": "/loop"}


def test_resolution_records_every_link_on_the_way() -> None:
    assert images.resolution("/lib/x86_64-linux-gnu/libm.so.6", LINKS.get) == [
        ("/lib", "usr/lib"), ("/usr/lib/x86_64-linux-gnu/libm.so.6", "")]
    assert images.resolution("/bin/python3", LINKS.get) == [
        ("/bin", "usr/bin"), ("/usr/bin/python3", "python3.11"), ("/usr/bin/python3.11", "")]
    assert images.resolution("/usr/lib/ssl/cert.pem", LINKS.get) == [
        ("/usr/lib/ssl/cert.pem", "/etc/ssl/certs/ca-certificates.crt"),
        ("/etc/ssl/certs/ca-certificates.crt", "")]
    # ".." after a link goes up from where the link led, as the kernel does
    assert images.resolution("/lib/../share/x", LINKS.get)[-1] == ("/usr/share/x", "")
    assert images.resolution("/usr/lib/python3.11", LINKS.get) == [("/usr/lib/python3.11", "")]


def test_a_link_loop_is_an_error() -> None:
    with pytest.raises(EngineError, match="too many levels"):
        images.resolution("/loop/x", LINKS.get)


@pytest.mark.parametrize(("rel", "is_dir", "skipped"), [
    ("os.py", False, False),
    ("json", True, False),
    ("json/__init__.py", False, False),
    ("test", True, True),
    ("idlelib", True, True),
    ("tkinter", True, True),
    ("turtledemo", True, True),
    ("ensurepip", True, True),
    ("config-3.11-x86_64-linux-gnu", True, True),
    ("ctypes/test", True, True),
    ("unittest/test", True, True),
    ("site-packages", True, False),                 # kept, empty
    ("site-packages/README.txt", False, True),
    ("dist-packages/six.py", False, True),
    ("lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so", False, False),
    ("lib-dynload/_tkinter.cpython-311-x86_64-linux-gnu.so", False, True),
    ("__pycache__/os.cpython-311.pyc", False, False),
    ("__pycache__/os.cpython-311.opt-1.pyc", False, True),
    ("json/__pycache__/decoder.cpython-312.pyc", False, True),
])
def test_what_a_stdlib_copy_leaves_out(rel: str, is_dir: bool, skipped: bool) -> None:
    assert images.stdlib_skip(rel, is_dir, "cpython-311") is skipped


def test_pyc_files_are_left_out_without_a_cache_tag() -> None:
    assert images.stdlib_skip("__pycache__/os.cpython-311.pyc", False, "")


def test_trees_are_copied_once() -> None:
    assert images.tree_roots(facts()) == ["/usr/lib/python3.11"]
    fedora = facts(stdlib="/usr/lib/python3.11", platstdlib="/usr/lib64/python3.11",
                   dynload="/usr/lib64/python3.11/lib-dynload")
    assert images.tree_roots(fedora) == ["/usr/lib/python3.11", "/usr/lib64/python3.11"]


def test_single_paths_include_the_named_path_the_shell_and_the_ca_bundle() -> None:
    paths = images.single_paths(facts())
    assert paths[:3] == ["/usr/bin/python3", "/usr/bin/python3.11", "/bin/sh"]
    assert "/usr/lib/ssl/cert.pem" in paths
    assert paths.count("/etc/ssl/certs/ca-certificates.crt") == 1


def test_a_prefixs_own_libpython() -> None:
    assert images.libpython_pattern(facts(base_prefix=PYENV)) == \
        f"{PYENV}/lib/libpython*.so*"


LDD = f"""\
{PYENV}/bin/python3.11:
\tlinux-vdso.so.1 (0x00007ffd)
\tlibpython3.11.so.1.0 => {PYENV}/lib/libpython3.11.so.1.0 (0x00007f2a)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2a)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f2a)
{PYENV}/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so:
\tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x00007f2a)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2a)
\tlibgone.so.1 => not found
/usr/bin/true:
\tnot a dynamic executable
"""


def test_ldd_output_is_read_as_library_paths() -> None:
    assert images.parse_ldd(LDD) == [
        f"{PYENV}/lib/libpython3.11.so.1.0", "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libssl.so.3"]


def test_the_wheel_baseline_is_looked_for_where_the_interpreters_libraries_are() -> None:
    found = images.wheel_baseline(["/lib/x86_64-linux-gnu/libc.so.6", f"{PYENV}/lib/libx.so"])
    assert "/lib/x86_64-linux-gnu/libstdc++.so.6" in found
    assert "/lib/x86_64-linux-gnu/libgcc_s.so.1" in found
    assert f"{PYENV}/lib/libstdc++.so.6" in found


def test_the_hosts_top_level_layout_is_reproduced() -> None:
    merged = dict(images.top_level({"/bin": "usr/bin", "/lib64": "usr/lib64", "/sbin": None}))
    assert merged["/bin"] == Entry("link", target="usr/bin")
    assert merged["/usr/bin"].kind == "dir"
    assert merged["/usr/lib64"].kind == "dir"
    assert merged["/sbin"] == Entry("dir")


def test_the_skeleton() -> None:
    skel = dict(images.skeleton())
    assert skel["/tmp"].mode == skel["/var/tmp"].mode == 0o1777
    for mount in ("/dev", "/proc", "/sys", "/run"):
        assert skel[mount].kind == "dir"
    passwd = skel["/etc/passwd"].data.decode()
    assert passwd.startswith("root:x:0:0:")
    assert "nobody:x:65534:" in passwd
    assert b"root:x:0:" in skel["/etc/group"].data


@pytest.mark.parametrize(("mode", "expected"), [
    (0o100600, 0o644), (0o100700, 0o755), (0o104755, 0o755), (0o100444, 0o444),
    (0o102711, 0o755)])
def test_a_files_mode_in_an_image(mode: int, expected: int) -> None:
    assert images.file_mode(mode) == expected


def test_a_dirs_mode_in_an_image() -> None:
    assert images.dir_mode(0o40700) == 0o755
    assert images.dir_mode(0o40775) == 0o775


def test_import_changes() -> None:
    args = images.import_changes("abc", "/usr/bin/python3")
    changes = args[1::2]
    assert args[::2] == ["--change"] * len(changes)
    assert f"LABEL {LABEL_IMAGE}=base" in changes
    assert f"LABEL {LABEL_KEY}=abc" in changes
    assert "ENV PATH=/usr/local/bin:/usr/bin:/bin" in changes
    assert 'CMD ["/usr/bin/python3"]' in changes


# --- a base, from this host (no engine) ----------------------------------------------------

needs_ldd = pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd on this host")


@needs_ldd
def test_a_base_holds_the_interpreter_its_libraries_and_a_shell() -> None:
    interp = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    found = images.interpreter_facts(interp)
    entries = images.collect_base(found)
    assert entries[found.executable].kind == "file"
    assert entries[f"{found.stdlib}/os.py"].kind == "file"
    assert f"{found.stdlib}/test" not in entries
    assert not any(p.startswith(f"{found.stdlib}/site-packages/") for p in entries)
    assert any(p.endswith("/libc.so.6") for p in entries)
    shell = images.resolution("/bin/sh", images._readlink)
    for path, target in shell[:-1]:
        assert entries[path] == Entry("link", target=target)
    assert entries[shell[-1][0]].kind == "file"
    if os.path.islink("/lib"):
        assert entries["/lib"] == Entry("link", target=os.readlink("/lib"))
    # every entry's parent is a dir of the image (no path goes through a missing one)
    for path in entries:
        parent = os.path.dirname(path)
        assert parent == "/" or entries[parent].kind == "dir", path


def test_a_tar_is_owned_by_root_with_floored_mtimes(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text("x = 1\n")
    os.utime(src, ns=(0, 1_600_000_000_700_000_000))
    src.chmod(0o600)
    entries = {
        "/usr/lib/x/mod.py": Entry("file", mode=images.file_mode(src.stat().st_mode),
                                   source=str(src)),
        "/usr/lib/x": Entry("dir"),
        "/usr/lib": Entry("dir"),
        "/usr": Entry("dir"),
        "/lib": Entry("link", target="usr/lib"),
        "/etc/passwd": Entry("data", mode=0o644, data=b"root:x:0:0::/root:/bin/sh\n"),
        "/etc": Entry("dir"),
        "/tmp": Entry("dir", mode=0o1777),
    }
    out = io.BytesIO()
    images.write_tar(entries, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names.index("usr") < names.index("usr/lib") < names.index("usr/lib/x/mod.py")
        by_name = {m.name: m for m in members}
        assert all(m.uid == 0 and m.gid == 0 for m in members)
        mod = by_name["usr/lib/x/mod.py"]
        assert mod.mtime == 1_600_000_000  # floored, as a .pyc records its source's
        assert mod.mode == 0o644
        assert by_name["lib"].issym()
        assert by_name["lib"].linkname == "usr/lib"
        assert by_name["tmp"].mode == 0o1777
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        assert passwd.read().startswith(b"root:")


# --- the package layer --------------------------------------------------------------------

def snapshot(root: Path) -> Path:
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("VALUE = 1\n")
    (site / "fakepkg" / "link.py").symlink_to("__init__.py")
    (root / "bin").mkdir()
    tool = root / "bin" / "fake-tool"
    tool.write_bytes(b"#!" + templates.PLACEHOLDER + b"\nimport fakepkg\n")
    tool.chmod(0o700)
    (root / "bin" / "data.txt").write_text("not a script\n")
    (root / ".gestvenv-template").write_text("{}")
    (root / templates.PRIVATE_DIR).mkdir()
    (root / templates.PRIVATE_DIR / "secret").write_text("x")
    return root


def test_the_venv_skeleton_links_the_interpreter_at_its_path() -> None:
    skel = images.venv_skeleton(facts())
    assert skel["venv/bin/python"] == Entry("link", target="/usr/bin/python3.11")
    assert skel["venv/bin/python3.11"].target == "/usr/bin/python3.11"
    assert skel["venv/lib64"] == Entry("link", target="lib")
    assert skel["venv/lib/python3.11/site-packages"].kind == "dir"
    assert "venv/lib64" not in images.venv_skeleton(facts(bits64=False))
    cfg = skel["venv/pyvenv.cfg"].data.decode()
    assert "home = /usr/bin\n" in cfg
    assert "include-system-site-packages = false\n" in cfg
    assert "version = 3.11.2\n" in cfg


def test_the_venv_holds_the_snapshot_with_scripts_for_the_images_python(
        tmp_path: Path) -> None:
    entries = images.venv_entries(facts(), snapshot(tmp_path / "snap"))
    tool = entries["venv/bin/fake-tool"]
    assert tool.kind == "data"
    assert tool.data == b"#!/opt/gestvenv/venv/bin/python\nimport fakepkg\n"
    assert tool.mode == 0o755
    assert entries["venv/bin/data.txt"].kind == "file"
    init = "venv/lib/python3.11/site-packages/fakepkg/__init__.py"
    assert entries[init].source == str(tmp_path / "snap" / init.removeprefix("venv/"))
    assert entries["venv/lib/python3.11/site-packages/fakepkg/link.py"] == \
        Entry("link", target="__init__.py")
    assert entries["venv/bin/python"].kind == "link"          # the skeleton's, kept
    assert not any(".gestvenv" in path for path in entries)   # mark and private dir left out


def test_a_snapshot_entry_is_pure() -> None:
    st = os.stat_result((0o100755, 0, 0, 1, 0, 0, 10, 0, 0, 0))
    script = b"#!" + templates.PLACEHOLDER + b"\nbody\n"
    entry = images.snapshot_entry("bin/x", "/s/bin/x", st, script=script)
    assert entry == Entry("data", mode=0o755, data=b"#!/opt/gestvenv/venv/bin/python\nbody\n")
    # a script for another interpreter is copied as it is
    other = images.snapshot_entry("bin/x", "/s/bin/x", st, script=b"#!/bin/sh\necho\n")
    assert other == Entry("file", mode=0o755, source="/s/bin/x")
    fifo = os.stat_result((stat.S_IFIFO | 0o644, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert images.snapshot_entry("x", "/s/x", fifo) is None


def test_the_containerfile() -> None:
    text = images.containerfile("localhost/gestvenv-python:3.11-abc", "k" * 32, "b" * 16)
    lines = text.splitlines()
    assert lines[0] == "FROM localhost/gestvenv-python:3.11-abc"
    assert "ADD venv.tar /opt/gestvenv/" in lines
    assert ("ENV VIRTUAL_ENV=/opt/gestvenv/venv "
            "PATH=/opt/gestvenv/venv/bin:/usr/local/bin:/usr/bin:/bin") in lines
    assert (f"LABEL {LABEL_IMAGE}=packages {LABEL_KEY}={'k' * 32} "
            f"{images.LABEL_BASE}={'b' * 16}") in lines
    assert lines[-1] == 'CMD ["/opt/gestvenv/venv/bin/python"]'


def test_build_arguments_never_pull_and_have_no_network() -> None:
    podman = images.build_args("podman", "localhost/gestvenv-env:k", "/tmp/ctx")
    assert podman[0] == "build"
    assert "--pull=never" in podman
    assert "--layers=false" in podman
    assert podman[podman.index("--network") + 1] == "none"
    assert podman[podman.index("--tag") + 1] == "localhost/gestvenv-env:k"
    assert podman[podman.index("--file") + 1] == "/tmp/ctx/Containerfile"
    assert podman[-1] == "/tmp/ctx"
    docker = images.build_args("docker", "r", "/c")
    assert "--pull=false" in docker
    assert "--layers=false" not in docker


# --- the engine's answers ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2026-12-03T13:48:05.123456789Z", 1796305685.123456),
    ("2026-12-03T14:48:05+01:00", 1796305685.0),
    ("2026-12-03T13:48:05Z", 1796305685.0),
    ("yesterday", 0.0),
])
def test_engine_times(text: str, expected: float) -> None:
    assert images.parse_time(text) == pytest.approx(expected)


PODMAN_ITEM = {
    "Id": "ab" * 32, "RepoTags": ["localhost/gestvenv-env:" + "k" * 32], "Size": 1234,
    "Created": "2026-12-03T13:48:05.5Z",
    "Labels": {LABEL_IMAGE: "packages", LABEL_KEY: "k" * 32, images.LABEL_BASE: "b" * 16},
    "Config": {"Labels": {LABEL_IMAGE: "packages", LABEL_KEY: "k" * 32,
                          images.LABEL_BASE: "b" * 16}}}
DOCKER_ITEM = {
    "Id": "sha256:" + "cd" * 32, "RepoTags": [], "Size": 99,
    "Created": "2026-12-03T13:48:05Z",
    "Config": {"Labels": {LABEL_IMAGE: "base", LABEL_KEY: "b" * 16}}}


def test_inspect_records_are_read_as_image_infos() -> None:
    assert images.image_info(PODMAN_ITEM) == ImageInfo(
        ref="localhost/gestvenv-env:" + "k" * 32, id="ab" * 32, kind="packages", key="k" * 32,
        size_bytes=1234, created=1796305685.5, base="b" * 16)
    # Untagged, or tagged with a name that is not gestvenv's: an image built FROM one of ours
    # (it inherits the labels) is its maker's, never listed nor pruned.
    assert images.image_info(DOCKER_ITEM) is None
    derived = {**PODMAN_ITEM, "RepoTags": ["localhost/mine:1"]}
    assert images.image_info(derived) is None


def test_an_image_without_gestvenvs_label_is_not_one_of_ours() -> None:
    assert images.image_info({"Id": "x", "Config": {"Labels": {"other": "1"}}}) is None
    assert images.image_info({"Id": "x", "Config": {"Labels": None}}) is None


def info(kind: str, key: str, *, ref: str = "r", base: str = "") -> ImageInfo:
    return ImageInfo(ref=ref, id=f"id-{kind}-{key}-{ref}", kind=kind, key=key, size_bytes=1,
                     created=0.0, base=base)


def test_prune_removes_package_images_of_gone_snapshots_and_superseded_twins() -> None:
    live = info("packages", "live", base="b1")
    gone = info("packages", "gone", base="b1")
    twin = info("packages", "live", ref="", base="b1")
    base = info("base", "b1")
    doomed = images.doomed_packages([live, gone, twin, base], {"live"}, everything=False)
    assert doomed == [gone, twin]
    assert images.doomed_packages([live, gone, base], {"live"}, everything=True) == [live, gone]


def test_prune_keeps_a_base_while_a_package_image_uses_it() -> None:
    used = info("base", "b1")
    unused = info("base", "b2")
    untagged = info("base", "b1", ref="")
    left = [info("packages", "k", base="b1"), used, unused, untagged]
    assert images.doomed_bases(left) == [unused, untagged]
    assert images.doomed_bases([used, unused]) == [used, unused]
    assert images.doomed_bases([info("other", "x")]) == []


@pytest.mark.parametrize(("text", "refs"), [
    ("Loaded image: localhost/gestvenv-env:k\n", ["localhost/gestvenv-env:k"]),
    ("Getting image source signatures\nLoaded image(s): localhost/a:1,localhost/b:2\n",
     ["localhost/a:1", "localhost/b:2"]),
    ("Loaded image: a:1\nLoaded image ID: sha256:abc\n", ["a:1", "sha256:abc"]),
    ("nothing\n", []),
])
def test_load_output(text: str, refs: list[str]) -> None:
    assert images.parse_loaded(text) == refs
