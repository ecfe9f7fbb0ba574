"""The lazy facade: every public name resolves, from the module the table says, and nothing
else does (a typo is an AttributeError, not a silent None)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gestvenv
import gestvenv.runtime


@pytest.mark.parametrize("package", [gestvenv, gestvenv.runtime])
def test_every_lazy_name_resolves_and_no_other(package: object) -> None:
    table = package._EXPORTS  # type: ignore[attr-defined]
    for name, module in table.items():
        source = __import__(f"{package.__name__}.{module}", fromlist=[name])  # type: ignore[attr-defined]
        assert getattr(package, name) is getattr(source, name), (name, module)
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_the_facade_exports_exactly_its_all() -> None:
    assert set(gestvenv._EXPORTS) == set(gestvenv.__all__) - {"__version__"}
    assert dir(gestvenv) == sorted(gestvenv.__all__)


def test_importing_the_facade_loads_no_submodule_of_the_library() -> None:
    code = ("import sys, gestvenv; print(sorted(m for m in sys.modules "
            "if m.startswith('gestvenv.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['gestvenv.lazy']", out  # (the loader itself, stdlib only)
