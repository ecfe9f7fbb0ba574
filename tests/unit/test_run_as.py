"""Who may create an environment that runs as another uid (lifecycle.check_run_as): pure."""

from __future__ import annotations

import pytest

from gestvenv import IsolationLevel, UnenforceableLimitError, ValidationError
from gestvenv.lifecycle import check_run_as


def test_root_in_a_sandbox_may() -> None:
    for level in (IsolationLevel.NAMESPACE, IsolationLevel.CONTAINER, IsolationLevel.CHROOT):
        check_run_as(4242, 0, level)
    check_run_as(None, 1000, IsolationLevel.PROCESS)  # (nobody else asked)


@pytest.mark.parametrize(("run_as", "creator", "level", "error"), [
    (4242, 1000, IsolationLevel.NAMESPACE, ValidationError),        # only root switches uids
    (0, 0, IsolationLevel.NAMESPACE, ValidationError),              # never as root
    (-1, 0, IsolationLevel.NAMESPACE, ValidationError),
    (4242, 0, IsolationLevel.PROCESS, UnenforceableLimitError),     # no sandbox: no dir to see
])
def test_the_others_may_not(run_as: int, creator: int, level: IsolationLevel,
                            error: type[Exception]) -> None:
    with pytest.raises(error):
        check_run_as(run_as, creator, level)
