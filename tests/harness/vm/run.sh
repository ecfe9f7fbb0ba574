#!/bin/bash
# run.sh - shell entry of the VM test tier: boot a Debian 13 guest (pure cgroup v2), run CMD
# in it as the lingering user `tester`, stop the guest, exit with CMD's status.
#   tests/harness/vm/run.sh [options] -- python -m pytest tests/systemd -m v2
# Same as `python -m tests.harness.vm run ...` from the repo root (options: --help).
# PYTHON: the host interpreter for the driver (stdlib only, >= 3.11, with pip for the wheels).
set -euo pipefail
# (`python -m` imports from the working directory first: be in the repo root.)
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
exec "${PYTHON:-python3}" -m tests.harness.vm run "$@"
