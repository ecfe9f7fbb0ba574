"""The light commands stay light: what `--help`, `list`, `show` and `config show` import.

A command imports only what it uses (the CLI's start-up is most of what `gestvenv ephemeral
list` costs). Each command runs in a fresh interpreter, which writes the modules it ended with;
a module on the forbidden list fails the test by name, so a top-level import added later to a
light path is caught here, not in a benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Heavy for a command that does not run anything in an environment.
EVENT_LOOP = "asyncio.base_events"
NEVER_LIGHT = {"gestvenv.builder", "gestvenv.context", "gestvenv.lifecycle", "gestvenv.inside",
               "tomlkit.api"}
LIGHT = NEVER_LIGHT | {EVENT_LOOP, "dbus_next", "psutil", "gestvenv.runtime.local",
                       "gestvenv.runtime.systemd.runtime", "gestvenv.monitor",
                       "gestvenv.templates", "gestvenv.container.images"}
# Where systemd runs, `list` asks it for every unit through busctl (units.listed_by_busctl):
# no event loop, no dbus-next, no runtime there either.

_PROBE = """\
import atexit, json, sys
out, args = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["gestvenv", *args]
from gestvenv.cli import main
main()
"""


def imported(tmp_path: Path, *args: str) -> set[str]:
    out = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", _PROBE, str(out), *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return set(json.loads(out.read_text()))


def check(modules: set[str], forbidden: set[str]) -> None:
    loaded = sorted(m for m in forbidden if m in modules)
    assert not loaded, f"imported by a light command: {loaded}"


@pytest.mark.parametrize("args", [("--help",), ("ephemeral", "--help"), ("ephemeral", "list"),
                                  ("config", "show"), ("ephemeral", "create", "--help")])
def test_light_commands_import_nothing_heavy(tmp_path: Path, args: tuple[str, ...]) -> None:
    forbidden = LIGHT
    if args == ("config", "show"):
        forbidden = LIGHT - {"tomlkit.api"}  # (it prints TOML: tomlkit writes its values)
    check(imported(tmp_path, *args), forbidden)


def test_list_of_envs_without_json_loads_no_runtime(tmp_path: Path) -> None:
    """With environments, the table still needs no runtime (their guarantees are not printed)
    and no builder; an env made by the CLI has no creator to check (no psutil)."""
    made = subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "create", "light-a",
                           "--ttl", "600"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    try:
        modules = imported(tmp_path, "ephemeral", "list")
        check(modules, LIGHT)
        shown = imported(tmp_path, "ephemeral", "show", "light-a")
        # `show` reads the env's usage (a runtime, an event loop): never the builder.
        check(shown, NEVER_LIGHT)
    finally:
        subprocess.run([sys.executable, "-m", "gestvenv", "ephemeral", "cleanup", "light-a"],
                       capture_output=True, timeout=120)


def test_the_probe_sees_heavy_imports(tmp_path: Path) -> None:
    """The probe itself: a command that runs something does import the heavy modules."""
    modules = imported(tmp_path, "ephemeral", "cleanup", "--orphans")
    assert EVENT_LOOP in modules and "gestvenv.lifecycle" in modules
