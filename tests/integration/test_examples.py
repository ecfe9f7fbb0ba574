"""examples/ephemeral_examples.py runs as a reader would run it, and every example holds.

The script is run from the checkout's root with this interpreter, against the test's own
gestvenv home (tests/conftest.py) and its offline wheelhouse (the examples install six and
attrs: a stand-in attrs is added if the wheelhouse has none). An example may say "skipped"
only where this host lacks what it needs, decided here with the probes the other tests use;
afterwards no environment is left (``gestvenv ephemeral list``, and the ``no_leftovers``
fixture)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gestvenv.container import engine as engines
from gestvenv.runtime import bwrap
from gestvenv.runtime.systemd import systemd_booted
from tests.harness.wheels import PACKAGES, build_wheel

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPT = CHECKOUT / "examples" / "ephemeral_examples.py"

TITLES = {
    1: "The basic async example",
    2: "The sync API: ephemeral_sync",
    3: "Parallel environments",
    4: "A timeout",
    5: "Resource limits",
    6: "No network",
    7: "Streaming output",
    8: "A requirements file",
    9: "An untrusted package in a container",
    10: "Monitoring",
}


def blocks(output: str) -> dict[int, str]:
    """Each example's output, by its number (from its heading ``== N. TITLE``)."""
    found = {}
    for block in output.split("\n== ")[1:]:
        number, _, rest = block.partition(". ")
        found[int(number)] = rest
    return found


def test_the_examples_run_and_hold(tmp_path: Path, wheelhouse: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if not any(name == "attrs" for name, *_ in PACKAGES):  # (the examples install attrs)
        extra = tmp_path / "wheels"
        extra.mkdir()
        build_wheel(extra, "attrs", "23.1.0", [], "")
        monkeypatch.setenv("GESTVENV_EPHEMERAL_FIND_LINKS", f"{wheelhouse} {extra}")

    systemd = systemd_booted()
    sandbox = systemd or bwrap.probe_for(os.geteuid(), namespaces=True) is None
    engine, _ = engines.find("auto", tmp_path)
    # What needs what: 6 a network namespace (systemd or bubblewrap); 9 a sandbox of any kind
    # (a container engine, else namespace isolation: systemd or bubblewrap).
    expected_skips = set() if sandbox else {6} | (set() if engine else {9})

    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    output = done.stdout
    shown = f"stdout:\n{output}\nstderr:\n{done.stderr}"
    print(shown)  # (shown by pytest -s or -rP: what each example reported on this host)
    assert done.returncode == 0, shown

    found = blocks(output)
    assert sorted(found) == sorted(TITLES), shown
    skipped = set()
    for number, title in TITLES.items():
        block = found[number]
        assert block.startswith(f"{title}\n"), shown
        assert "Traceback" not in block, shown
        if "\n   skipped: needs " in block:
            skipped.add(number)
        else:
            assert re.search(r"\n   ok \(\d+\.\d+s\)\n", block), shown
    assert skipped == expected_skips, shown
    assert re.search(rf"\n10 examples: {10 - len(skipped)} ok, {len(skipped)} skipped, "
                     r"0 failed \(", output), shown

    # What each example reports is what this host applies.
    runtime = "systemd" if systemd else "local"
    assert f": {runtime} runtime, process isolation, at " in found[1], shown
    if systemd:
        assert "(killed_by='memory')" in found[5], shown
    else:
        assert "refused, MemoryError" in found[5], shown
    if 9 not in skipped:
        applied = "container" if engine is not None else "namespace"
        assert f"isolation requested: container; applied: {applied}\n" in found[9], shown

    listed = subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "list", "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    # (Under systemd, a unit-only entry may be another test's unit, still stopping.)
    assert [e for e in json.loads(listed.stdout) if e["state"] != "unit-only"] == []
