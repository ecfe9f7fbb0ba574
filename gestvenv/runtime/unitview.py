"""An environment's unit as its manager sees it: light (no asyncio, no D-Bus), so that the
CLI's ``list`` can hold one (gestvenv.runtime.systemd.units)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..reaper import names_env


@dataclass(frozen=True)
class UnitView:
    """An environment's unit as the runtime's manager sees it."""

    state: str                # active, activating, deactivating, failed, inactive...
    env_id: str | None        # which environment it was started for
    state_file: str | None    # where that environment's state file was

    @property
    def ours(self) -> bool:
        """Started by gestvenv (it says which env): a unit that merely has a gestvenv-like
        name, someone's own ``gestvenv-web.service``, is never touched."""
        return bool(self.env_id and self.state_file)

    def orphaned(self) -> bool:
        """Ours, and its environment's state file is gone or now belongs to another env."""
        if not self.ours:
            return False
        assert self.state_file is not None
        try:
            with open(self.state_file) as f:
                return not names_env(json.load(f), self.env_id or "")
        except (OSError, ValueError, AttributeError):
            return True
