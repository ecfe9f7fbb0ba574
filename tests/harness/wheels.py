"""Tiny real wheels, built by the tests themselves, so installs need no network.

The wheelhouse holds stand-ins named like the packages of the README's examples (``requests``,
``six``, ``pytest``: a tiny runner of test_* functions) plus a few for resolution tests. They
are real wheels: uv and pip install them normally.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

_MINI_PYTEST = """\
import importlib.util, pathlib, sys


def main():
    files = []
    for arg in sys.argv[1:] or ["."]:
        path = pathlib.Path(arg)
        files += sorted(path.rglob("test_*.py")) if path.is_dir() else [path]
    passed = failed = 0
    for file in files:
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name in sorted(vars(module)):
            if name.startswith("test_") and callable(getattr(module, name)):
                try:
                    getattr(module, name)()
                    passed += 1
                except Exception as exc:
                    failed += 1
                    print(f"FAILED {file}::{name}: {exc!r}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
"""

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
    ("pytest", "8.0.0", [], _MINI_PYTEST),
    ("gvbig", "1.0", [], ""),  # + 4 MB of data (DATA): bigger than a small max_disk
    # More names the docs' examples use (docs/, examples/: tests/integration/doc_snippets.py).
    ("pytest-asyncio", "0.23.0", ["pytest"], ""),
    ("rich", "13.0.0", [], "from builtins import print\n"),
    ("attrs", "23.1.0", [], ""),
]
# Import names that are not the distribution's name.
MODULES = {"pytest-asyncio": "pytest_asyncio"}
# Data files: package -> (path in the wheel, size). Zeros: the wheel stays small, the install
# does not.
DATA = {"gvbig": ("gvbig/blob.bin", 4 << 20)}

# Console scripts: package -> (script name, "module:function").
SCRIPTS = {"gvtool": ("gvtool", "gvtool:main"), "pytest": ("pytest", "pytest:main")}


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, name: str, version: str, requires: list[str], body: str) -> Path:
    module = MODULES.get(name, name)
    dist = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{module}/__init__.py": f"{body}__version__ = {version!r}\n",
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: gestvenv-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    if name in DATA:
        arcname, size = DATA[name]
        files[arcname] = "\0" * size
    if name in SCRIPTS:
        script, target = SCRIPTS[name]
        files[f"{dist}/entry_points.txt"] = f"[console_scripts]\n{script} = {target}\n"
    path = directory / f"{module}-{version}-py3-none-any.whl"
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
