"""Tiny real wheels, built by the tests themselves, so installs need no network.

The wheelhouse holds stand-ins named like the packages of the README's examples (``requests``,
``six``) plus a few for resolution tests. They are real wheels: uv and pip install them normally.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

# (name, version, requirements, module body)
PACKAGES: list[tuple[str, str, list[str], str]] = [
    ("six", "0.9.0", [], "PY3 = True\n"),
    ("six", "1.16.0", [], "PY3 = True\n"),
    ("requests", "2.32.0", ["urllib3>=2"], "def get(url):\n    return url\n"),
    ("urllib3", "2.2.0", [], ""),
    ("gvdemo", "1.0", ["gvdep"], "VALUE = 42\n"),
    ("gvdep", "1.0", [], ""),
    ("gvdep", "2.0", [], ""),
    ("gvtool", "1.0", [], "def main():\n    print('gvtool ran')\n"),
]


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, name: str, version: str, requires: list[str], body: str) -> Path:
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name}/__init__.py": f"{body}__version__ = {version!r}\n",
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: gestvenv-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    if name == "gvtool":
        files[f"{dist}/entry_points.txt"] = "[console_scripts]\ngvtool = gvtool:main\n"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            data = text.encode()
            zf.writestr(arcname, data)
            record.append(f"{arcname},sha256={_digest(data)},{len(data)}")
        record.append(f"{dist}/RECORD,,")
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def build_wheelhouse(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, version, requires, body in PACKAGES:
        build_wheel(directory, name, version, requires, body)
    return directory
