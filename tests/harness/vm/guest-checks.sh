#!/bin/bash
# guest-checks.sh - does this host give a non-root user's systemd manager what the v2 tests
# need? Run as the user, e.g. in the VM tier (the tree is the cwd there):
#   python -m tests.harness.vm run -- bash tests/harness/vm/guest-checks.sh
# Checks: pure cgroup v2; cpu, memory and pids delegated to user@UID.service; under
# `systemd-run --user`: MemoryMax OOM-kills, TasksMax and CPUQuota land in pids.max/cpu.max.
# Exit 0 when all pass; prints one line per check. (CPU quota is checked in cpu.max, not by
# measuring: under TCG a measured share is noisy.)
set -uo pipefail
fails=0
check() {  # check LABEL OK(0/1) DETAIL
  if [ "$2" = 0 ]; then echo "ok   $1: $3"; else echo "FAIL $1: $3"; fails=$((fails + 1)); fi
}
uid=$(id -u)
run() { systemd-run --user --wait --quiet --pipe "$@"; }

# shellcheck disable=SC1091
echo "== $(. /etc/os-release; echo "$PRETTY_NAME") / $(systemctl --version | head -1) / kernel $(uname -r) / uid $uid"
fs=$(stat -fc %T /sys/fs/cgroup)
[ "$fs" = cgroup2fs ]; check "pure cgroup v2" $? "/sys/fs/cgroup is $fs"

mgr=/sys/fs/cgroup/user.slice/user-$uid.slice/user@$uid.service
ctl=$(cat "$mgr/cgroup.controllers" 2>/dev/null)
missing=""
for c in cpu memory pids; do [[ " $ctl " == *" $c "* ]] || missing="$missing $c"; done
[ -z "$missing" ]; check "delegated to user@$uid" $? "'$ctl'${missing:+ (missing:$missing)}"

state=$(systemctl --user is-system-running 2>&1)
[ "$state" = running ]; check "user manager" $? "$state"

out=$(run -p MemoryMax=64M python3 -c 'b = bytearray(200 << 20); print("NOT KILLED")' 2>&1)
rc=$?
[ $rc != 0 ] && [[ "$out" != *"NOT KILLED"* ]]; check "MemoryMax=64M, 200 MB allocated" $? "exit $rc (expect non-zero: oom-kill)"

# shellcheck disable=SC2016  # expanded by the shell in the unit
lim=$(run -p TasksMax=7 -p CPUQuota=20% sh -c 'cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); echo "$(cat "$cg/pids.max") $(cat "$cg/cpu.max")"' 2>&1)
[ "$lim" = "7 20000 100000" ]; check "TasksMax=7 CPUQuota=20% in the unit's cgroup" $? "pids.max cpu.max = '$lim'"

[ "$fails" = 0 ] && echo "all checks passed" || echo "$fails check(s) failed"
exit $((fails > 0))
