"""The package tier: built packages, installed and purged (``make test-package``, as root).

It needs what ``make deb`` installs (the Debian build dependencies) and builds (the .deb, named
by GESTVENV_DEB_DIR), so the other tiers' runs of ``pytest`` skip it."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("GESTVENV_DEB_DIR"):
        return
    skip = pytest.mark.skip(reason="the package tier: run by `make test-package`")
    for item in items:
        if "tests/package/" in str(item.path):
            item.add_marker(skip)
