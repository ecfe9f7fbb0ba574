"""The files of the source tree's ``systemd/`` directory: what a distro package installs.

- ``gestvenv-cleanup.service`` and ``.timer`` (rendered by :mod:`gestvenv.timer`): the sweep,
  for the system manager (root's environments) and user managers (a user's own);
- ``gestvenv.slice``: the parent of every environment's slice, with the global caps (the
  config's ``max_total_memory_mb``; a different configured value is applied at run time);
- ``gestvenv.tmpfiles`` (installed as ``/usr/lib/tmpfiles.d/gestvenv.conf``): root's dirs,
  created private at boot;
- ``gestvenv-api.socket`` and ``.service``: ``gestvenv serve``, socket-activated, for the
  system manager (``/run/gestvenv/api.sock``) and user managers
  (``$XDG_RUNTIME_DIR/gestvenv/api.sock``: ``%t`` is either); shipped, not enabled.

They are rendered here from the same constants the code uses, and a unit test compares the
checked-in files byte for byte. Regenerate them with ``python -m gestvenv.distfiles --write
systemd/``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from . import storage, timer
from .config import Config
from .runtime.systemd import plan

SLICE_UNIT = plan.PARENT_SLICE
TMPFILES = "gestvenv.tmpfiles"  # installed as tmpfiles.d/gestvenv.conf
ROOT_DIRS = (storage.ROOT_RUNTIME_DIR, storage.ROOT_SHM_DIR, storage.ROOT_CACHE_DIR)
_HEADER = ("# {what}, as a distro package installs it. Generated from gestvenv/distfiles.py:\n"
           "#   python -m gestvenv.distfiles --write systemd/\n")


def render_slice(max_total_memory_mb: int) -> str:
    """The same properties as the transient slice the runtime starts when no unit file exists
    (:func:`plan.parent_slice_properties`), so that both look alike in ``systemctl show``."""
    return (
        "[Unit]\n"
        "Description=gestvenv ephemeral environments\n"
        "Documentation=man:gestvenv(1)\n"
        "Before=slices.target\n"
        "\n"
        "[Slice]\n"
        "MemoryAccounting=yes\n"
        "TasksAccounting=yes\n"
        "# All environments together (config: max_total_memory_mb). gestvenv sets another\n"
        "# configured value at run time (a drop-in under /run).\n"
        f"MemoryMax={max_total_memory_mb}M\n"
    )


def root_dir_mode(path: Path) -> int:
    """Root's dirs are private; its runtime dir holds the system API's socket too."""
    return 0o711 if path == storage.ROOT_RUNTIME_DIR else 0o700


def render_tmpfiles() -> str:
    return (
        "# Type Path                Mode User Group Age\n"
        "# Root's runtime dir (state files, locks, tmpfs-backed envs), memory-backed envs and\n"
        "# cache (uv cache, disk-backed envs): created private at boot, before any user could\n"
        "# take a name first (/dev/shm is world-writable). No age: environments end by their\n"
        "# own units and the cleanup timer, never by systemd-tmpfiles-clean.\n"
        + "# The runtime dir is 0711: anyone may reach the API's socket in it (api.sock, 0666:\n"
        "# its peer credentials say who calls), nobody else may list it, and what is in it is\n"
        "# root's own (0700 dirs, 0600 files).\n"
        + "".join(f"d     {path!s:<21}{root_dir_mode(path):04o} root root  -\n"
                  for path in ROOT_DIRS)
        + "# A user's runtime dir when there is no $XDG_RUNTIME_DIR: never aged while envs live.\n"
        f"x     {storage.USER_TMP_RUNTIME_PREFIX}*\n"
    )


API_SOCKET, API_SERVICE = "gestvenv-api.socket", "gestvenv-api.service"
API_IDLE_EXIT = 60  # seconds without a request or a connection before the service exits


def render_api_socket() -> str:
    return (
        "[Unit]\n"
        "Description=gestvenv REST API socket\n"
        "Documentation=man:gestvenv-serve(1)\n"
        "\n"
        "[Socket]\n"
        "# /run/gestvenv/api.sock for the system manager, $XDG_RUNTIME_DIR/gestvenv/api.sock\n"
        "# for a user's (in the user's 0700 runtime dir: the user's only). Who connects is\n"
        "# known by its peer credentials (SO_PEERCRED): root's service gives each user\n"
        "# environments of its own, run as that user; a user's service serves its user only.\n"
        "ListenStream=%t/gestvenv/api.sock\n"
        "SocketMode=0666\n"
        "DirectoryMode=0711\n"
        "Accept=no\n"
        "RemoveOnStop=yes\n"
        "\n"
        "[Install]\n"
        "WantedBy=sockets.target\n"
    )


def render_api_service(gestvenv: str = "/usr/bin/gestvenv", idle_exit: float = API_IDLE_EXIT
                       ) -> str:
    return (
        "[Unit]\n"
        "Description=gestvenv REST API\n"
        "Documentation=man:gestvenv-serve(1)\n"
        f"Requires={API_SOCKET}\n"
        f"After={API_SOCKET}\n"
        "# It exits when idle and the socket starts it again: that must never count as a\n"
        "# restart loop (start-limit-hit would leave the socket failed).\n"
        "StartLimitIntervalSec=0\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        f"ExecStart={gestvenv} serve --idle-exit {idle_exit:g}\n"
        "# Environments run in units of their own (the systemd runtime): stopping this\n"
        "# service ends the streams it holds, and the environments those held with them.\n"
        "TimeoutStopSec=2min\n"
    )


def distro_files() -> dict[str, str]:
    """Every file of ``systemd/``, by name."""
    config = Config()
    return {
        **timer.packaged_units(),
        SLICE_UNIT: _HEADER.format(what="The parent slice of gestvenv's environments")
        + render_slice(config.max_total_memory_mb),
        TMPFILES: _HEADER.format(what="gestvenv's tmpfiles.d file") + render_tmpfiles(),
        API_SOCKET: _HEADER.format(what="The socket of gestvenv's REST API")
        + render_api_socket(),
        API_SERVICE: _HEADER.format(what="gestvenv's REST API (`gestvenv serve`)")
        + render_api_service(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gestvenv.distfiles",
                                     description="Write the files a distro package installs.")
    parser.add_argument("--write", metavar="DIR", required=True, type=Path,
                        help="the directory to write them into (the source tree's systemd/)")
    args = parser.parse_args(argv)
    for name, text in distro_files().items():
        (args.write / name).write_text(text)
        print(args.write / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
