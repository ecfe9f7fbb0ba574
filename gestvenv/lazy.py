"""Names of a package loaded on first use (PEP 562): importing the package costs nothing, and a
light CLI command pays only for the modules it uses (tests/cli/test_import_cost.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def exports(package: str, where: Mapping[str, str],
            namespace: dict[str, Any]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each name to the submodule that
    defines it; a name is imported once, then kept in ``namespace`` (the package's globals), so
    that later lookups are plain attribute reads."""
    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{module}", package), name)
        namespace[name] = value
        return value
    return __getattr__
