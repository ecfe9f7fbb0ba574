"""A failed install names what it was given (a requirements file too, not an empty list)."""

from __future__ import annotations

from pathlib import Path

from gestvenv.builder import _install_what


def test_an_install_names_its_requirements_files_and_packages() -> None:
    assert _install_what([], [Path("/w/requirements.txt")]) == "-r /w/requirements.txt"
    assert _install_what(["six", "rich>=13"], [Path("/w/r.txt")]) == "-r /w/r.txt six rich>=13"
    assert _install_what(["six"], []) == "six"


def test_an_install_inside_gets_the_proxy_and_ca_settings_and_nothing_else() -> None:
    from gestvenv.builder import _passed_inside

    for name in ("UV_INDEX_URL", "LANG", "LC_ALL", "HTTPS_PROXY", "no_proxy", "SSL_CERT_FILE"):
        assert _passed_inside(name, "UV_"), name
    for name in ("AWS_SECRET_ACCESS_KEY", "HOME", "PIP_INDEX_URL", "GITHUB_TOKEN"):
        assert not _passed_inside(name, "UV_"), name
    assert _passed_inside("PIP_INDEX_URL", "PIP_")
