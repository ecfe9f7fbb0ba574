"""CommandHandle's pure parts: which signals may be sent, and which processes of a command's
tree are its wrappers (never signalled)."""

from __future__ import annotations

import signal

import pytest

from gestvenv.exceptions import ValidationError
from gestvenv.handle import signal_number
from gestvenv.runtime.bwrap import INIT
from gestvenv.runtime.processes import is_wrapper


@pytest.mark.parametrize(("given", "number"), [
    ("TERM", signal.SIGTERM), ("sigint", signal.SIGINT), (" SIGHUP ", signal.SIGHUP),
    (signal.SIGUSR1, signal.SIGUSR1), (9, signal.SIGKILL), ("STOP", signal.SIGSTOP)])
def test_sendable_signals(given: int | str, number: int) -> None:
    assert signal_number(given) == number


@pytest.mark.parametrize("given", ["SEGV", "SIGBUS", "", "TERM;KILL", 0, 11, 4096, True, 1.0,
                                   None])
def test_other_signals_are_refused(given: object) -> None:
    with pytest.raises(ValidationError):
        signal_number(given)  # type: ignore[arg-type]


def test_wrappers_are_told_from_the_command() -> None:
    init = INIT.encode()
    assert is_wrapper("/usr/bin/bwrap", [b"bwrap", b"--unshare-pid"], init)
    assert is_wrapper("/usr/bin/podman", [b"podman", b"exec"], init)
    assert is_wrapper("/usr/bin/python3.11", [b"python", b"-I", b"-S", b"-B", b"-c", init,
                                              b"5"], init)
    assert not is_wrapper("/usr/bin/python3.11", [b"python", b"-c", b"print(1)"], init)
    assert not is_wrapper("/usr/bin/sleep", [b"sleep", b"60"], init)
    assert not is_wrapper("", [], init)  # (gone meanwhile: signalled, and nothing happens)
