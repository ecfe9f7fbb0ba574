#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# init.sh -- stages 1 and 2 of boot.sh.  DO NOT RUN BY HAND.
#
# stage1 runs under `script` (its pty becomes the container's /dev/console,
#        logged to $GVH_DIR/console.log), joins the cgroups
#        /sys/fs/cgroup/*/gv-NAME and execs `unshare`, whose forked child runs
#        stage2.
# stage2 runs as PID 1 of a fresh PID + mount + UTS + IPC + cgroup (+ net)
#        namespace and builds a throw-away root:
#
#     overlayfs( lower = host "/" (never written), upper/work = private tmpfs )
#
# (with GVH_PERSIST=1, upper/work are on the persistent disk that boot.sh
# mounted in the host mount namespace instead: see boot.sh).
#
# It mounts the API filesystems much like systemd-nspawn would (read-only /sys
# and /proc/sys, tmpfs /dev with a few bind-mounted nodes, private devpts,
# tmpfs /dev/shm and /run) EXCEPT that the cgroup v1 controller hierarchies
# are mounted READ-WRITE inside the cgroup namespace (so limits are enforced),
# bind-mounts the checkout at its own path, creates the test user, masks
# units that must not run here, pivot_root()s into the overlay and execs
# systemd.  Every write except into the checkout lands in the tmpfs, which
# disappears with the mount namespace when the container's last process exits
# (or stays on the persistent disk for the next boot).
#
# A second boot on the same persistent disk must work, so every step that
# writes to the root is idempotent or copes with what an earlier boot left:
# the machine-id is kept (as on a real machine; a fresh one on a first boot),
# the test user is created only if missing, files are overwritten, symlinks
# replaced.  /run, /tmp, /dev and /dev/shm are new tmpfs at every boot.
#
# Environment (set by boot.sh): GVH_DIR GVH_NAME GVH_CG GVH_CGMOUNTS
#   GVH_NETFLAG GVH_TMPFS_SIZE GVH_CHECKOUT GVH_USER GVH_UID GVH_PERSIST
set -euo pipefail

: "${GVH_DIR:?}" "${GVH_NAME:?}" "${GVH_CG:?}" "${GVH_USER:?}" "${GVH_UID:?}"
RW="$GVH_DIR/rw"          # tmpfs holding overlay upper+work (private to this mount ns)
if [ "${GVH_PERSIST:-0}" = 1 ]; then RW="$GVH_DIR/persist"; fi   # or: the persistent disk
R="$GVH_DIR/root"         # overlay mount point == future container "/"

log() { echo "init.sh: $*" >&2; }
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
GVH_BASE=${GVH_DIR%/*}
gvh_setup_name "$GVH_NAME"    # PERSIST, PERSIST_SRC (GVH_DIR unchanged)

if [ "${1:-}" = stage1 ]; then
    gvh_record_pid $$ "$GVH_DIR/unshare.pid"
    # Join the container's cgroups *before* unshare(CLONE_NEWCGROUP): that
    # makes /sys/fs/cgroup/*/gv-NAME the root of the new cgroup namespace.
    for mp in $GVH_CGMOUNTS; do echo $$ > "$mp/$GVH_CG/cgroup.procs"; done
    # --kill-child: if unshare dies, the container's PID 1 gets SIGKILL.
    # shellcheck disable=SC2086
    exec unshare --pid --fork --kill-child --mount --uts --ipc --cgroup $GVH_NETFLAG \
         --propagation private -- /bin/bash "$0" stage2
fi

[ "$$" = 1 ] || { log "must be PID 1 of a new pid namespace"; exit 1; }

# 0. Nothing mounted here may propagate back to the host (unshare already did
#    --propagation private; repeat to be safe).
mount --make-rprivate /

# 1. Writable layer on tmpfs + overlay of the host root.  Only the root
#    filesystem itself is the lower layer (no submounts of the host).  The
#    persistent disk is this mount namespace's copy of the host's mount (made
#    at unshare(), same tmpfs): nothing to mount, only to check.
mkdir -p "$RW" "$R"
if [ "${GVH_PERSIST:-0}" = 1 ]; then
    [ "$(gvh_persist_mounts)" = 1 ] || { log "no persistent disk at $RW"; exit 1; }
else
    mount -t tmpfs -o "mode=0755,size=$GVH_TMPFS_SIZE" "gvh-$GVH_NAME" "$RW"
fi
mkdir -p "$RW/upper" "$RW/work"
mount -t overlay -o "lowerdir=/,upperdir=$RW/upper,workdir=$RW/work" "gvh-$GVH_NAME" "$R"

# 2. /proc of this PID namespace with the kernel-global knobs read-only, so
#    systemd-sysctl, systemd-binfmt, binfmt_misc.automount etc. are skipped
#    (ConditionPathIsReadWrite=/proc/sys/) and nothing in the container can
#    change a kernel-global sysctl.
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in sys sysrq-trigger; do
    [ -e "$R/proc/$p" ] || continue
    mount --bind "$R/proc/$p" "$R/proc/$p"
    mount -o remount,bind,ro "$R/proc/$p"
done

# 3. /sys read-only => systemd-udevd, udev-trigger, ... are skipped
#    (ConditionPathIsReadWrite=/sys).
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"

# 4. cgroups.  stage1 joined /gv-NAME of every host hierarchy before
#    unshare(CLONE_NEWCGROUP), so inside this cgroup namespace that sub-tree
#    is "/".  Mount every hierarchy read-write with the host's super-options
#    (different options => EBUSY).  Doing it here instead of letting systemd
#    do it matters on this host: cpu and cpuacct are SEPARATE hierarchies,
#    systemd would try a joint "cpu,cpuacct" mount, fail, and CPUQuota would be
#    silently lost.
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec,size=4m cgroup "$R/sys/fs/cgroup"
while read -r mp fstype sopts; do
    name=${mp#/sys/fs/cgroup/}
    mkdir -p "$R/sys/fs/cgroup/$name"
    if [ "$fstype" = cgroup ]; then
        o=$(sed -E 's/(^|,)(rw|ro)(,|$)/\1/; s/^,//; s/,$//' <<<"$sopts")
        case "$o" in name=*) o="none,$o" ;; esac     # a named-only hierarchy needs "none,"
        mount -t cgroup -o "nosuid,nodev,noexec,$o" cgroup "$R/sys/fs/cgroup/$name"
    else
        mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup/$name"
    fi
done < <(awk '{ for (i = 7; i <= NF; i++) if ($i == "-") {
                  if ($(i+1) ~ /^cgroup2?$/ && $5 ~ "^/sys/fs/cgroup/") print $5, $(i+1), $(i+3) } }' \
         /proc/self/mountinfo)
mount -o remount,ro,mode=0755,size=4m "$R/sys/fs/cgroup"

# 5. Minimal /dev (like nspawn): tmpfs + bind-mounted harmless nodes + a
#    private devpts.  No /dev/tty0 => getty@tty1 is skipped.  /dev/console is
#    the pty `script` allocated (logged to $GVH_DIR/console.log).
mount -t tmpfs -o mode=0755,nosuid,size=8m,nr_inodes=64k dev "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
if [ -e /dev/fuse ]; then touch "$R/dev/fuse"; mount --bind /dev/fuse "$R/dev/fuse"; fi
# Loop devices (max_disk on the disk backend is a loop-mounted image of the env's own): the
# control node, and nodes for the first 64 devices.  A real host's devtmpfs makes each node as
# the kernel adds the device; on this plain tmpfs they are made ahead (block major 7, one
# minor per device: loop's max_part is 0).  Devices are the host kernel's: the images' mounts
# live in this container's mount namespace, and autoclear frees a device with its mount.
if [ -e /dev/loop-control ]; then
    touch "$R/dev/loop-control"; mount --bind /dev/loop-control "$R/dev/loop-control"
    for i in $(seq 0 63); do mknod -m 0660 "$R/dev/loop$i" b 7 "$i"; done
    chgrp disk "$R"/dev/loop[0-9]* 2>/dev/null || true
fi
touch "$R/dev/console"
if tty -s; then
    mount --bind "$(tty)" "$R/dev/console"
else
    mount --bind /dev/null "$R/dev/console"
fi
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue" "$R/dev/hugepages"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
# the container's own /dev/shm (POSIX shm/semaphores of tests stay inside)
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
ln -s /proc/kcore "$R/dev/core"

# 6. /run as tmpfs (systemd would mount one anyway; pre-mounting lets us put
#    files there before boot).
mount -t tmpfs -o mode=0755,nosuid,nodev,size=20% tmpfs "$R/run"
# An empty /tmp of its own: boot-time systemd-tmpfiles empties /tmp ("D /tmp"),
# which on the overlay means a copy-up + whiteout per file of the host's /tmp
# (took 1.4 s with 10k stale files there).  Tests get a clean /tmp, too.
mount -t tmpfs -o "mode=1777,nosuid,nodev,size=$GVH_TMPFS_SIZE" tmpfs "$R/tmp"

# 7. The project checkout, read-write at its own absolute path, so that its
#    .venv (whose interpreter lives on the host root, i.e. in the lower layer)
#    and every absolute path in it work unchanged.
if [ -n "${GVH_CHECKOUT:-}" ]; then
    mkdir -p "$R$GVH_CHECKOUT"
    mount --bind "$GVH_CHECKOUT" "$R$GVH_CHECKOUT"
fi

# 8. Container-local configuration (lands in the tmpfs upper layer only).
#    A fresh machine-id per container, kept across reboots on a persistent
#    disk: one written by an earlier boot is a regular file in the upper layer
#    (the host's own is in the lower one).
if [ -f "$RW/upper/etc/machine-id" ] && grep -qx '[0-9a-f]\{32\}' "$RW/upper/etc/machine-id"; then
    log "reboot: keeping machine-id $(cat "$RW/upper/etc/machine-id")"
else
    rm -f "$R/etc/machine-id"; dbus-uuidgen > "$R/etc/machine-id"
fi
echo "$GVH_NAME" > "$R/etc/hostname"
hostname "$GVH_NAME"
# The non-root test user, inside the overlay only, lingering: logind starts
# user@UID.service (and with it the user bus /run/user/UID/bus) at boot.  On a
# reboot it exists already (with its home): it must have the same uid.
uid=$(awk -F: -v u="$GVH_USER" '$1 == u { print $3 }' "$R/etc/passwd")
if [ -z "$uid" ]; then
    useradd --root "$R" --uid "$GVH_UID" --user-group --create-home --shell /bin/bash \
        --comment "gestvenv test user" "$GVH_USER"
elif [ "$uid" != "$GVH_UID" ]; then
    log "user $GVH_USER exists on this disk with uid $uid, not $GVH_UID"; exit 1
fi
mkdir -p "$R/var/lib/systemd/linger"
touch "$R/var/lib/systemd/linger/$GVH_USER"
# Units that are useless or harmful here (host services, timers, udev/network
# management, gettys), masked only inside the overlay.  systemd-tmpfiles-clean
# ages out /var/tmp (and /tmp): a CI checkout may be bind-mounted under
# /var/tmp, so it must never run in here.
mask=(
  postgresql.service e2scrub_reap.service e2scrub_all.timer e2scrub_all.service
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer man-db.timer
  systemd-tmpfiles-clean.timer systemd-tmpfiles-clean.service
  systemd-pstore.service systemd-timesyncd.service
  systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service
  systemd-resolved.service networking.service
  getty@tty1.service console-getty.service serial-getty@.service getty-static.service
  systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service
  systemd-modules-load.service kmod-static-nodes.service
  systemd-hwdb-update.service systemd-firstboot.service
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount
  sys-fs-fuse-connections.mount
  systemd-remount-fs.service systemd-random-seed.service
)
for u in "${mask[@]}"; do ln -sf /dev/null "$R/etc/systemd/system/$u"; done
# Belt and braces for the checkout: tmpfiles "x" = never clean/age it.  (Boot-
# time `systemd-tmpfiles --remove` only empties "D" dirs such as /tmp, and it
# does not descend into mount points anyway.)
if [ -n "${GVH_CHECKOUT:-}" ]; then
    mkdir -p "$R/etc/tmpfiles.d"
    printf 'x %s\nx %s/*\n' "$GVH_CHECKOUT" "$GVH_CHECKOUT" > "$R/etc/tmpfiles.d/zz-gestvenv-testhost.conf"
fi
# Keep journald small and volatile.
mkdir -p "$R/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' > "$R/etc/systemd/journald.conf.d/gestvenv-testhost.conf"

# 9. Loopback of the private netns up (tests use 127.0.0.1).
if [ -n "${GVH_NETFLAG:-}" ]; then ip link set lo up; fi

# 10. Switch root.  pivot_root + lazy umount of the old root hides every host
#     mount from the container (chroot would not).
cd "$R"
mkdir -p .gvh-oldroot
pivot_root . .gvh-oldroot
cd /
umount -l /.gvh-oldroot
rmdir /.gvh-oldroot

# 11. exec systemd as PID 1.  The bounding set drops capabilities a test
#     container has no business using on a shared kernel (module loading,
#     clock, raw IO, syslog/dmesg, MAC).  container= tells systemd it runs in a
#     container (ConditionVirtualization=container, no hardware units).
exec /usr/bin/env -i container=gestvenv-testhost TERM=dumb \
    /usr/bin/setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-syslog,-mac_admin,-mac_override,-wake_alarm,-audit_control \
    /lib/systemd/systemd --unit=multi-user.target --show-status=yes
