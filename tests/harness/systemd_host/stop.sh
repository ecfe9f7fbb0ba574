#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# stop.sh NAME [--kill] [--purge] -- stop the host booted by boot.sh NAME and
# remove every trace of it (processes, mounts, cgroups), then verify.
# Idempotent: also cleans up after a half-started boot or a killed harness run.
#
#  default : graceful: SIGRTMIN+4 to the inner systemd (= "systemctl
#            poweroff"); systemd stops all units, then its reboot(2) ends the
#            PID namespace.  SIGKILL after GVH_STOP_TIMEOUT s (default 10).
#  --kill  : SIGKILL the container's PID 1 right away (a power loss): the
#            kernel kills every process of the PID namespace, and the mount
#            namespace (overlay, tmpfs upper layer, all API mounts) goes with
#            its last process.  No unit is stopped, nothing cleaned.
#  --purge : also unmount and remove the persistent disk of NAME (boot.sh
#            GVH_PERSIST=1), if there is one.  Without --purge it is KEPT (for
#            the next boot, i.e. a reboot) and is the one thing not reported
#            as left over; with it, nothing of NAME may be left at all.  Works
#            whether or not the host is running (stop.sh NAME --kill --purge
#            clears whatever a crashed run left).
#
# Only processes recorded at boot (PID + start time, so a reused PID is never
# hit), processes in the container's own pid/mount namespaces and processes
# in its cgroups /sys/fs/cgroup/*/gv-NAME are signalled.
# Exit status: 0 = clean, 1 = something is left (listed on stderr).
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$HERE/common.sh"
gvh_setup_name "${1:-}"
shift || true
mode=--graceful purge=no
for arg in "$@"; do
    case "$arg" in
        --kill) mode=--kill ;;
        --purge) purge=yes ;;
        *) gvh_die "usage: stop.sh NAME [--kill] [--purge]" ;;
    esac
done
TIMEOUT=${GVH_STOP_TIMEOUT:-10}
[ "$(id -u)" = 0 ] || gvh_die "must be root"
t0=$(date +%s.%N)

read -r pid pstart <<<"$(gvh_read_pid "$GVH_DIR/pid")"
read -r upid ustart <<<"$(gvh_read_pid "$GVH_DIR/unshare.pid")"
read -r spid sstart <<<"$(gvh_read_pid "$GVH_DIR/script.pid")"
read -r -a nslinks <<<"$(cat "$GVH_DIR/ns" 2>/dev/null || true)"
ours=no
[ -e "$GVH_DIR/cgroups" ] && ours=yes

kill_alive() {   # kill_alive SIG PID START
    if gvh_alive "$2" "$3"; then kill -s "$1" "$2" 2>/dev/null || true; fi
}
wait_gone() {    # wait_gone TENTHS PID START
    local i
    for ((i = 0; i < $1 * 2; i++)); do gvh_alive "$2" "$3" || return 0; sleep 0.05; done
    ! gvh_alive "$2" "$3"
}

# 0. Pin the container's pid and mount namespaces with open fds while a
#    recorded process still lives in them.  Namespace inode numbers are
#    reused as soon as a namespace is freed (a concurrent boot may get the
#    same number), so processes are looked up by namespace only while it is
#    provably still ours.  Without a pin (everything recorded already dead),
#    the namespace scan is skipped; the cgroup scan still applies.
pinned=()
pin() {   # pin PID START NSFILE EXPECTED
    local fd
    [ -n "$4" ] && gvh_alive "$1" "$2" || return 1
    exec {fd}<"/proc/$1/ns/$3" || return 1
    if [ "$(readlink "/proc/$$/fd/$fd")" = "$4" ] && gvh_alive "$1" "$2"; then
        pinned+=("$4"); return 0
    fi
    exec {fd}<&-; return 1
}
pin "$pid" "$pstart" pid "${nslinks[0]:-}" || pin "$upid" "$ustart" pid_for_children "${nslinks[0]:-}" || true
pin "$pid" "$pstart" mnt "${nslinks[1]:-}" || pin "$upid" "$ustart" mnt "${nslinks[1]:-}" || true

# 1. The container's PID 1.
if gvh_alive "$pid" "$pstart"; then
    if [ "$mode" != --kill ]; then
        kill -s SIGRTMIN+4 "$pid"           # systemd: start poweroff.target
        wait_gone $((TIMEOUT * 10)) "$pid" "$pstart" || echo "stop.sh: graceful stop timed out, SIGKILL" >&2
    fi
    kill_alive KILL "$pid" "$pstart"
    wait_gone 50 "$pid" "$pstart"
fi
# 2. unshare exits once its child is gone, script once unshare is gone.
wait_gone 20 "$upid" "$ustart" || kill_alive KILL "$upid" "$ustart"
wait_gone 20 "$spid" "$sstart" || kill_alive KILL "$spid" "$sstart"

# 3. Anything still in the container's namespaces (e.g. the host-side half of
#    an `nsenter` that is still running holds the mount namespace).
if [ ${#pinned[@]} -gt 0 ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        left=$(gvh_ns_members "${pinned[@]}")
        [ -z "$left" ] && break
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null; sleep 0.05
    done
fi

# 4. cgroups, only if a boot of ours created them: kill what is left in them,
#    then remove the directories deepest first.
for mp in $(gvh_cgroup_mounts); do
    [ -d "$mp/$CG" ] || continue
    if [ $ours != yes ]; then
        echo "stop.sh: $mp/$CG was not created by this harness ($GVH_DIR/cgroups missing), left alone" >&2
        continue
    fi
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        left=$(find "$mp/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null)
        [ -z "$left" ] && break
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null; sleep 0.05
    done
    find "$mp/$CG" -depth -type d -exec rmdir {} + 2>/dev/null
done

# 5. The persistent disk, with --purge only (the container, which had the
#    overlay on it, is gone by now; our mount is the host namespace's).
if [ $purge = yes ]; then
    for _ in 1 2 3; do
        [ "$(gvh_persist_mounts)" -gt 0 ] || break
        umount "$PERSIST" || break
    done
    [ "$(gvh_persist_mounts)" -gt 0 ] || rmdir "$PERSIST" 2>/dev/null
fi
t1=$(date +%s.%N)

# 6. Verify.
fail=0
for p in "$pid:$pstart" "$upid:$ustart" "$spid:$sstart"; do
    if gvh_alive "${p%%:*}" "${p#*:}"; then echo "stop.sh: LEFT: process ${p%%:*}" >&2; fail=1; fi
done
if [ ${#pinned[@]} -gt 0 ]; then
    left=$(gvh_ns_members "${pinned[@]}" | tr '\n' ' ')
    if [ -n "$left" ]; then echo "stop.sh: LEFT: processes in its namespaces: $left" >&2; fail=1; fi
fi
keep=keep
[ $purge = yes ] && keep=
left=$(gvh_host_mounts "$keep")
if [ -n "$left" ]; then
    echo "stop.sh: LEFT: mounts on the host:" >&2
    echo "$left" >&2
    fail=1
fi
if [ $purge = yes ] && [ -e "$PERSIST" ]; then echo "stop.sh: LEFT: $PERSIST" >&2; fail=1; fi
for mp in $(gvh_cgroup_mounts); do
    if [ -d "$mp/$CG" ]; then echo "stop.sh: LEFT: cgroup $mp/$CG" >&2; fail=1; fi
done
if [ $fail = 0 ]; then
    rm -f "$GVH_DIR"/*.pid "$GVH_DIR/pid" "$GVH_DIR/ns" "$GVH_DIR/env" \
          "$GVH_DIR/system_bus_socket" "$GVH_DIR/cgroups" "$GVH_DIR/detached"
    rmdir "$GVH_DIR/root" "$GVH_DIR/rw" 2>/dev/null
fi
disk=
if [ $purge = yes ]; then disk=", disk purged"
elif [ "$(gvh_persist_mounts)" -gt 0 ]; then disk=", disk kept: $PERSIST"; fi
echo "host $NAME stopped (${mode#--}) in $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s; clean=$([ $fail = 0 ] && echo yes || echo NO)$disk"
exit $fail
