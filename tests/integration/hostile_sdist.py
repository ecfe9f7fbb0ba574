"""A hostile sdist, made offline: an in-tree PEP 517 backend (no build requirements) whose
``build_wheel`` writes a marker to ``/``, reads a private file of the creator's home, connects to
a listener on the host's loopback, reports all that on stderr (``GVEVIL-REPORT {json}``), then
allocates ``alloc_mb`` MB before it builds a small wheel (``gvevil``)."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

BACKEND = textwrap.dedent('''
    import base64, hashlib, json, os, socket, sys, zipfile
    TAG, SECRET, PORT, ALLOC_MB = {tag!r}, {secret!r}, {port!r}, {alloc_mb!r}

    def _wheel(directory):
        name = "gvevil-1.0-py3-none-any.whl"
        files = {{"gvevil/__init__.py": "BUILT = True\\n",
                  "gvevil-1.0.dist-info/METADATA":
                      "Metadata-Version: 2.1\\nName: gvevil\\nVersion: 1.0\\n",
                  "gvevil-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: t\\n"
                      "Root-Is-Purelib: true\\nTag: py3-none-any\\n"}}
        record = []
        with zipfile.ZipFile(os.path.join(directory, name), "w") as zf:
            for arc, text in files.items():
                zf.writestr(arc, text)
                digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
                record.append(f"{{arc}},sha256={{digest.rstrip(b'=').decode()}},{{len(text)}}")
            record.append("gvevil-1.0.dist-info/RECORD,,")
            zf.writestr("gvevil-1.0.dist-info/RECORD", "\\n".join(record) + "\\n")
        return name

    def _try(report, key, func):
        try:
            report[key] = "ESCAPED " + str(func())
        except Exception as exc:
            report[key] = "held " + type(exc).__name__ + ": " + str(exc)

    def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
        report = {{"uid": os.getuid()}}
        def marker():
            with open("/" + TAG, "w") as f:
                f.write("escaped")
            return "wrote /" + TAG
        _try(report, "root_marker", marker)
        _try(report, "read_home", lambda: open(SECRET).read())
        _try(report, "network", lambda: socket.create_connection(("127.0.0.1", PORT), 2))
        print("GVEVIL-REPORT " + json.dumps(report), file=sys.stderr, flush=True)
        if ALLOC_MB:
            blob = bytearray(ALLOC_MB << 20)
            for i in range(0, len(blob), 4096):
                blob[i] = 1
        return _wheel(wheel_directory)
''')

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = []
    build-backend = "gvevilbackend"
    backend-path = ["."]

    [project]
    name = "gvevil"
    version = "1.0"
''')


def make_sdist(directory: Path, *, tag: str, secret: str, port: int, alloc_mb: int) -> Path:
    src = directory / "gvevil-1.0"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "gvevilbackend.py").write_text(
        BACKEND.format(tag=tag, secret=secret, port=port, alloc_mb=alloc_mb))
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: gvevil\nVersion: 1.0\n")
    sdist = directory / "gvevil-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="gvevil-1.0")
    return sdist


def report_of(text: str) -> dict[str, str]:
    line = next(line for line in text.splitlines() if "GVEVIL-REPORT " in line)
    return dict(json.loads(line.split("GVEVIL-REPORT ", 1)[1]))


@contextlib.contextmanager
def hostile_sdist(directory: Path, alloc_mb: int) -> Iterator[tuple[Path, str, socket.socket]]:
    """(the sdist, its marker's name, the listener it tries to reach); the secret it tries
    to read is a 0600 file in the creator's home. All removed afterwards."""
    tag = f"gvevil-{secrets.token_hex(4)}"
    secret = Path.home() / f"{tag}-secret"
    secret.write_text("private key\n")
    secret.chmod(0o600)
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield (make_sdist(directory, tag=tag, secret=str(secret),
                          port=listener.getsockname()[1], alloc_mb=alloc_mb), tag, listener)
    finally:
        listener.close()
        secret.unlink()
        Path("/" + tag).unlink(missing_ok=True)
