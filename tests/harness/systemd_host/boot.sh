#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# boot.sh NAME -- boot a throw-away systemd (252, the host's own) as PID 1 of
# its own PID/mount/cgroup/UTS/IPC/net namespaces, on an overlay of the host
# "/" whose upper layer is a private tmpfs (or, with GVH_PERSIST=1, a tmpfs
# that outlives the container: a "disk" kept across reboots, see below).  Used by tests/harness/systemd_host.py
# (prefer `python -m tests.harness.systemd_host ...`); runnable by hand for
# debugging.  Root only.  No extra packages: util-linux (unshare, nsenter,
# setpriv, script) plus the host's systemd and dbus.
#
# Why not boot systemd on the host root: its boot-time systemd-tmpfiles wipes
# /tmp (D /tmp), and it would take over the host.  Why not systemd-nspawn: on
# this hybrid-cgroup host it mounts the v1 controller hierarchies read-only,
# so MemoryMax/CPUQuota/TasksMax are silently not enforced.
#
# Inside the host:
#   * systemd is PID 1, the system bus is at /run/dbus/system_bus_socket;
#   * $GVH_CHECKOUT (the project checkout) is bind-mounted read-write at the
#     SAME absolute path, so its .venv (interpreter on the host root) works;
#   * user $GVH_USER (uid $GVH_UID) exists only in the overlay and lingers, so
#     user@UID.service and its bus /run/user/UID/bus are up after boot;
#   * network: own netns with only lo (up), or the host's (GVH_NET=host);
#   * the whole host is capped by a v1 memory cgroup (GVH_MEMORY_LIMIT).
#
# State (host side) in $GVH_BASE/NAME: pid files, console.log (the
# container's /dev/console), init.log, env.  Stop with stop.sh NAME, run
# commands inside with enter.sh NAME -- CMD...
#
# Persistent disk (GVH_PERSIST=1), for "reboots" of the test host: whatever
# the container writes to its root filesystem (/etc, /var, /home, ...) lands
# in the overlay's upper layer; keep that layer and boot again on it, and the
# new boot finds the old boot's files, as a real machine finds its disk.
# /run, /tmp and /dev/shm are tmpfs mounted over the overlay at every boot, so
# they start empty, as on a real machine.  The upper layer cannot be a plain
# directory of the host: the lower layer is the host's "/" itself, and
# overlayfs refuses an upper/work dir inside its lower layer (overlapping
# layers).  The private tmpfs of a normal boot lives in the container's mount
# namespace and dies with it.  So the upper layer goes to a tmpfs mounted here,
# in the HOST mount namespace, at $GVH_BASE/NAME/persist (source name
# "gvh-persist.NAME", size GVH_TMPFS_SIZE): the container's mount namespace
# gets a copy of it at unshare() time, init.sh puts the overlay on it, and it
# outlives the container.  A boot whose persist mount already exists reuses it
# (a reboot); stop.sh NAME (with or without --kill) keeps it; stop.sh NAME
# --purge unmounts and removes it.  A failed boot keeps it as well.
#
# Environment knobs:
#   GVH_BASE          state dir parent (default /var/tmp/gestvenv-testhost)
#   GVH_CHECKOUT      host dir bind-mounted rw at the same path (default: none)
#   GVH_NET           private (default) | host
#   GVH_MEMORY_LIMIT  memory.limit_in_bytes of the whole host (default 4G)
#   GVH_PIDS_LIMIT    pids.max of the whole host (default 32768)
#   GVH_TMPFS_SIZE    size of the tmpfs holding the overlay upper layer, and of
#                     /tmp inside (default 4G); a reused persistent disk keeps
#                     the size it was created with
#   GVH_PERSIST       1: upper layer on the persistent disk (created or reused);
#                     0 (default): on a private tmpfs gone with the container
#   GVH_USER/GVH_UID  the non-root test user (default gvtest / 4242)
#   GVH_BOOT_TIMEOUT  seconds to wait for the boot (default 60)
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$HERE/common.sh"
gvh_setup_name "${1:-}"
GVH_NET=${GVH_NET:-private}
GVH_PERSIST=${GVH_PERSIST:-0}
GVH_TMPFS_SIZE=${GVH_TMPFS_SIZE:-4G}
GVH_USER=${GVH_USER:-gvtest}
GVH_UID=${GVH_UID:-4242}
TIMEOUT=${GVH_BOOT_TIMEOUT:-60}

[ "$(id -u)" = 0 ] || gvh_die "must be root"
case "$GVH_NET" in private|host) ;; *) gvh_die "GVH_NET must be private or host" ;; esac
case "$GVH_PERSIST" in 0|1) ;; *) gvh_die "GVH_PERSIST must be 0 or 1" ;; esac
if [ -n "${GVH_CHECKOUT:-}" ]; then
    if [ "${GVH_CHECKOUT:0:1}" != / ] || [ ! -d "$GVH_CHECKOUT" ]; then
        gvh_die "GVH_CHECKOUT must be an absolute directory: $GVH_CHECKOUT"
    fi
    GVH_CHECKOUT=$(readlink -f "$GVH_CHECKOUT")
    case "$GVH_CHECKOUT" in
        /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/run|/run/*|/tmp|/var/tmp|"$GVH_BASE"|"$GVH_BASE"/*)
            gvh_die "GVH_CHECKOUT cannot be $GVH_CHECKOUT" ;;
    esac
fi
# The test user must not shadow a host account (its files would be shared).
for key in "$GVH_UID" "$GVH_USER"; do
    if getent passwd "$key" >/dev/null || getent group "$key" >/dev/null; then
        gvh_die "user/group $key already exists on the host: pick another GVH_USER/GVH_UID"
    fi
done

mkdir -p "$GVH_DIR"
read -r pid start <<<"$(gvh_read_pid "$GVH_DIR/pid")" || true
if gvh_alive "${pid:-}" "${start:-}"; then
    gvh_die "host $NAME already running (pid $pid); stop it with stop.sh $NAME"
fi
for mp in $(gvh_cgroup_mounts); do
    [ -d "$mp/$CG" ] && gvh_die "$mp/$CG exists (stale host? run stop.sh $NAME --kill)"
done
rm -f "$GVH_DIR"/*.pid "$GVH_DIR"/pid "$GVH_DIR"/ns "$GVH_DIR"/env "$GVH_DIR"/*.log
t0=$(date +%s.%N)

# 0. The persistent disk (see the top): reuse ours, or mount a new one.  It
#    is made private, so that nothing mounted under it later propagates.
disk=
if [ "$GVH_PERSIST" = 1 ]; then
    case $(gvh_persist_mounts) in
        1) disk="reused disk $PERSIST" ;;
        0) if mountpoint -q "$PERSIST" 2>/dev/null; then
               gvh_die "$PERSIST is a mount point, not a disk of this harness"
           fi
           mkdir -p "$PERSIST"
           mount -t tmpfs -o "mode=0755,size=$GVH_TMPFS_SIZE" "$PERSIST_SRC" "$PERSIST"
           mount --make-private "$PERSIST"
           disk="new disk $PERSIST" ;;
        *) gvh_die "several mounts at $PERSIST: stop.sh $NAME --purge" ;;
    esac
fi

# 1. One cgroup per host hierarchy (v1 controllers, name=systemd, cgroup2).
#    stage1 joins them before unshare(CLONE_NEWCGROUP), which makes them the
#    root of the container's cgroup namespace.  The marker tells stop.sh (and a
#    later boot) that these cgroups are ours.
touch "$GVH_DIR/cgroups"
cgmounts=$(gvh_cgroup_mounts | tr '\n' ' ')
for mp in $cgmounts; do gvh_mkcg "$mp/$CG"; done
echo "${GVH_MEMORY_LIMIT:-4G}" > "/sys/fs/cgroup/memory/$CG/memory.limit_in_bytes"
echo "${GVH_PIDS_LIMIT:-32768}" > "/sys/fs/cgroup/pids/$CG/pids.max"

# 2. Start.  `script` allocates a pty (becomes the container's /dev/console,
#    logged to console.log: systemd writes nothing to a regular-file console)
#    and runs init.sh stage1, which joins the cgroups and becomes `unshare`;
#    unshare's forked child (PID 1 of the new pid namespace) runs init.sh
#    stage2, which builds the root, pivot_root()s and execs systemd.
#    setsid: not in the caller's process group (a Ctrl-C meant for a test
#    command must not hit the container; teardown is stop.sh's job).
netflag=--net
[ "$GVH_NET" = host ] && netflag=
export GVH_DIR GVH_NAME=$NAME GVH_CG=$CG GVH_CGMOUNTS="$cgmounts" GVH_NETFLAG=$netflag \
       GVH_TMPFS_SIZE GVH_CHECKOUT=${GVH_CHECKOUT:-} GVH_PERSIST \
       GVH_USER GVH_UID
setsid script -qfe -c "exec /bin/bash $HERE/init.sh stage1" "$GVH_DIR/console.log" \
    > /dev/null 2> "$GVH_DIR/init.log" < /dev/null &
gvh_record_pid $! "$GVH_DIR/script.pid"

# From here on, any failure tears the half-started host down again.
fail() {
    echo "systemd-host: $*" >&2
    sed 's/^/init.log: /' "$GVH_DIR/init.log" >&2 2>/dev/null || true
    tail -n 25 "$GVH_DIR/console.log" 2>/dev/null | sed 's/^/console: /' >&2 || true
    "$HERE/stop.sh" "$NAME" --kill >&2 || true
    exit 1
}
trap 'fail "interrupted"' INT TERM

# 3. Find the container's PID 1 (the child of unshare).
cpid=
for _ in $(seq 1 250); do
    if [ -s "$GVH_DIR/unshare.pid" ]; then
        read -r upid _ < "$GVH_DIR/unshare.pid"
        cpid=$(awk '{print $1}' "/proc/$upid/task/$upid/children" 2>/dev/null || true)
        [ -n "$cpid" ] && break
    fi
    sleep 0.02
done
[ -n "$cpid" ] || fail "container did not start"
gvh_record_pid "$cpid" "$GVH_DIR/pid"
# Its namespaces, to find (and kill) every process left in them at stop.
echo "$(readlink "/proc/$cpid/ns/pid") $(readlink "/proc/$cpid/ns/mnt")" > "$GVH_DIR/ns"
# The unshare parent only had to be in gv-NAME at unshare() time (that fixed
# the cgroup-namespace root).  Move it back into our own cgroups: left in
# gv-NAME it would sit in the container's root cgroup, where the inner systemd
# sees a process of another pid namespace as "pid 0" and logs "Failed to
# migrate controller cgroups from /".
while IFS=: read -r _ ctrl path; do
    case "$ctrl" in
        "")            mp=/sys/fs/cgroup/unified ;;
        name=systemd)  mp=/sys/fs/cgroup/systemd ;;
        *)             mp=/sys/fs/cgroup/$ctrl ;;
    esac
    if [ -e "$mp$path/cgroup.procs" ]; then echo "$upid" > "$mp$path/cgroup.procs" || true; fi
done < /proc/$$/cgroup

# 4. Wait until the inner systemd has finished booting and the test user's
#    manager is up.  systemctl must run inside (the host's systemctl refuses
#    to talk to it: the host was not booted with systemd).
state=unknown
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    gvh_alive "$cpid" || fail "container died during boot"
    # before the exec of systemd, comm is still bash (and / is the host's)
    if [ "$(cat "/proc/$cpid/comm" 2>/dev/null)" = systemd ]; then
        state=$(nsenter -t "$cpid" -a /bin/sh -c \
            "echo \$(systemctl is-system-running) \$(systemctl is-active user@$GVH_UID.service)" \
            2>/dev/null || true)
        case "$state" in "running active"|"degraded active") break ;; esac
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "timeout waiting for boot (state: $state)"
    sleep 0.03
done
# The user bus socket appears a moment after user@UID.service is active.
for _ in $(seq 1 100); do
    [ -S "/proc/$cpid/root/run/user/$GVH_UID/bus" ] && break
    sleep 0.02
done
[ -S "/proc/$cpid/root/run/user/$GVH_UID/bus" ] || fail "no user bus for $GVH_USER"
# Boot-time systemd-tmpfiles must not have removed anything from the checkout
# (a CI clone may live under /var/tmp).  Same device+inode inside = our bind.
if [ -n "$GVH_CHECKOUT" ]; then
    want=$(stat -c %d:%i "$GVH_CHECKOUT")
    got=$(nsenter -t "$cpid" -a stat -c %d:%i "$GVH_CHECKOUT" 2>/dev/null || true)
    [ "$want" = "$got" ] || fail "checkout $GVH_CHECKOUT not visible inside ($want != $got)"
fi
t1=$(date +%s.%N)
trap - INT TERM

# Host-side path to the system bus, through /proc/PID/root (connect() follows
# the symlink; a path in another mount namespace cannot be bind-mounted here).
ln -sfn "/proc/$cpid/root/run/dbus/system_bus_socket" "$GVH_DIR/system_bus_socket"
cat > "$GVH_DIR/env" <<EOT
GVH_NAME=$NAME
GVH_PID=$cpid
GVH_DIR=$GVH_DIR
GVH_CHECKOUT=$GVH_CHECKOUT
GVH_NET=$GVH_NET
GVH_MEMORY_LIMIT=${GVH_MEMORY_LIMIT:-4G}
GVH_TMPFS_SIZE=$GVH_TMPFS_SIZE
GVH_PERSIST=$GVH_PERSIST
DBUS_SYSTEM_BUS_ADDRESS=unix:path=$GVH_DIR/system_bus_socket
EOT
echo "host $NAME booted (${state% *}) in $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s, pid $cpid${disk:+, $disk}"
