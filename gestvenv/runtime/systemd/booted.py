"""Whether systemd runs this host: a check light enough for every command (no D-Bus)."""

import os


def systemd_booted() -> bool:
    """sd_booted(): systemd is PID 1 of this host (or of this container)."""
    return os.path.isdir("/run/systemd/system")
