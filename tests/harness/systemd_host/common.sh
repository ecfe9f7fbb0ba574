# shellcheck shell=bash
# common.sh -- helpers shared by the stages of the gestvenv systemd test host.
# Sourced, never executed.  See boot.sh for the overall picture.

GVH_BASE=${GVH_BASE:-/var/tmp/gestvenv-testhost}

gvh_die() { echo "systemd-host: $*" >&2; exit "${GVH_DIE_RC:-1}"; }

# gvh_setup_name NAME: validate NAME and set NAME, GVH_DIR (state dir) and CG
# (the cgroup directory name used in every host hierarchy).
# shellcheck disable=SC2034  # used by the sourcing scripts
gvh_setup_name() {
    NAME=${1:-}
    # Also used as hostname (max 64) and inside cgroup/mount names: keep it plain.
    [[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$ ]] || gvh_die "bad host name '${NAME}'"
    GVH_DIR=$GVH_BASE/$NAME
    CG=gv-$NAME
    # The persistent disk (boot.sh with GVH_PERSIST=1): a tmpfs mounted in the
    # HOST mount namespace at $PERSIST, holding the overlay's upper/ and work/.
    # Its source name is how stop.sh recognises it as ours; "." cannot occur
    # in a host name, so it never matches another host's "gvh-NAME".
    PERSIST=$GVH_DIR/persist
    PERSIST_SRC=gvh-persist.$NAME
}

# gvh_persist_mounts: how many mounts of ours (tmpfs named $PERSIST_SRC) sit
# at $PERSIST in this mount namespace (0, or 1 unless something went wrong).
gvh_persist_mounts() {
    awk -v mp="$PERSIST" -v src="$PERSIST_SRC" '
        { for (i = 7; i <= NF; i++) if ($i == "-") break }
        $5 == mp && $(i+1) == "tmpfs" && $(i+2) == src { n++ }
        END { print n + 0 }' /proc/self/mountinfo
}

# gvh_host_mounts KEEP: the mounts (mountinfo lines) of this mount namespace
# that belong to host NAME: its overlay or tmpfs ("gvh-NAME ") or anything
# under "$GVH_DIR/".  With KEEP=keep, the persistent-disk mount (see above)
# is not listed.
gvh_host_mounts() {
    awk -v keep="$1" -v mp="$PERSIST" -v src="$PERSIST_SRC" -v name="gvh-$NAME " \
        -v dir="$GVH_DIR/" '
        { for (i = 7; i <= NF; i++) if ($i == "-") break }
        keep == "keep" && $5 == mp && $(i+1) == "tmpfs" && $(i+2) == src && !seen++ { next }
        index($0, name) || index($0, dir) { print }' /proc/self/mountinfo
}

# Mount points of the host's cgroup hierarchies (v1 controllers, name=systemd,
# cgroup2), one per line.
gvh_cgroup_mounts() {
    awk '$3 ~ /^cgroup2?$/ && $2 ~ "^/sys/fs/cgroup/" {print $2}' /proc/self/mounts
}

# gvh_mkcg DIR: create a cgroup directory; a new v1 cpuset cgroup accepts no
# process before cpuset.cpus/cpuset.mems are filled in (copied from its parent).
gvh_mkcg() {
    [ -d "$1" ] && return 0
    mkdir "$1"
    if [ -e "$1/cpuset.cpus" ]; then
        cat "$1/../cpuset.cpus" > "$1/cpuset.cpus"
        cat "$1/../cpuset.mems" > "$1/cpuset.mems"
    fi
}

# gvh_starttime PID: start time (clock ticks since boot, field 22 of
# /proc/PID/stat).  A PID is recorded together with it, so that a PID reused by
# an unrelated process after a crash is never signalled.
gvh_starttime() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }               # comm (field 2) may contain spaces and parentheses
    # shellcheck disable=SC2086
    set -- $s                 # $1 is field 3 (state) => field 22 is ${20}
    echo "${20}"
}

# gvh_alive PID [STARTTIME]: the process exists, is not a zombie (kill -0
# succeeds on zombies) and, if given, started at STARTTIME.
gvh_alive() {
    [ -n "${1:-}" ] && [ -e "/proc/$1" ] || return 1
    grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null && return 1
    [ -z "${2:-}" ] || [ "$(gvh_starttime "$1")" = "$2" ]
}

# gvh_read_pid FILE: prints "PID STARTTIME" recorded in FILE (or nothing).
gvh_read_pid() { cat "$1" 2>/dev/null || true; }

# gvh_record_pid PID FILE
gvh_record_pid() { echo "$1 $(gvh_starttime "$1")" > "$2"; }

# gvh_ns_members NSLINK...: PIDs (host view) of every process in any of the
# given namespaces ("pid:[4026532...]", "mnt:[...]": readlink /proc/X/ns/Y).
gvh_ns_members() {
    # one find instead of a readlink per process: this runs in loops at stop
    find /proc/[0-9]*/ns -maxdepth 1 \( -name pid -o -name mnt \) -printf '%h %l\n' 2>/dev/null \
        | awk -v want=" $* " '$2 ~ /^[a-z_]+:\[[0-9]+\]$/ && index(want, " " $2 " ") {
                                  split($1, p, "/"); if (p[3] != 1) print p[3] }' | sort -u
}
