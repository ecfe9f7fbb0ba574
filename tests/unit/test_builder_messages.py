"""A failed install names what it was given (a requirements file too, not an empty list)."""

from __future__ import annotations

from pathlib import Path

from gestvenv.builder import _install_what


def test_an_install_names_its_requirements_files_and_packages() -> None:
    assert _install_what([], [Path("/w/requirements.txt")]) == "-r /w/requirements.txt"
    assert _install_what(["six", "rich>=13"], [Path("/w/r.txt")]) == "-r /w/r.txt six rich>=13"
    assert _install_what(["six"], []) == "six"
