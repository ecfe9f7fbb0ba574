#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# enter.sh NAME [-u USER] [-C DIR] [-l LEAF] [-e KEY=VALUE]... -- CMD [ARG...]
# Run CMD inside the host booted by boot.sh NAME: in all of its namespaces
# (pid, mount, net, uts, ipc, cgroup), with its root, in directory DIR
# (default /), with a clean environment (PATH, HOME, USER, LANG=C.UTF-8, TERM,
# plus the -e pairs).  With -u USER, as that user (setpriv, no PAM) with
# XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS pointing at its user manager.
# stdio and the exit status are passed through (killed by signal N: 128+N).
#
# CMD is first moved into the leaf cgroup LEAF of the container (host path
# /sys/fs/cgroup/*/gv-NAME/LEAF, "/LEAF" inside; default gv-exec) so that it is
# accounted to and limited by the container.  systemd_host.py uses one leaf
# per command and kills/removes it afterwards; stop.sh removes whatever is left.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$HERE/common.sh"
GVH_DIE_RC=125
gvh_setup_name "${1:-}"; shift
user='' cwd=/ leaf=gv-exec envs=()
while getopts u:C:l:e: opt; do
    case "$opt" in
        u) user=$OPTARG ;;
        C) cwd=$OPTARG ;;
        l) leaf=$OPTARG ;;
        e) [[ $OPTARG == [A-Za-z_]*=* ]] || gvh_die "bad -e $OPTARG"; envs+=("$OPTARG") ;;
        *) gvh_die "usage: enter.sh NAME [-u USER] [-C DIR] [-l LEAF] [-e K=V]... -- CMD..." ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || gvh_die "no command"
[[ $leaf =~ ^[A-Za-z0-9_.-]+$ ]] || gvh_die "bad leaf name $leaf"
[ "${cwd:0:1}" = / ] || gvh_die "-C needs an absolute path"

read -r pid start <<<"$(gvh_read_pid "$GVH_DIR/pid")" || true
gvh_alive "${pid:-}" "${start:-}" || gvh_die "host $NAME is not running"
for mp in $(gvh_cgroup_mounts); do
    [ -d "$mp/$CG" ] || gvh_die "host $NAME has no cgroup $mp/$CG"
    gvh_mkcg "$mp/$CG/$leaf"
done

# Runs inside, as root, with an empty environment:
#   $1 leaf  $2 cwd  $3 user  $4 TERM  $5 number of KEY=VALUE pairs, the pairs, CMD...
# The cgroup join is done from inside: the nsenter parent stays in the host's
# cgroups (it is not in the container's pid namespace; in the container's
# cgroup tree the inner systemd would see it as "pid 0").  The cd is done
# inside too: nsenter --wd resolves its path on the host side.
# shellcheck disable=SC2016
inner='
set -eu
leaf=$1 cwd=$2 user=$3 term=$4 n=$5
shift 5
for f in /sys/fs/cgroup/*/"$leaf"/cgroup.procs; do echo $$ > "$f"; done
if [ -n "$user" ]; then
    IFS=: read -r _ _ uid gid _ home _ <<<"$(getent passwd "$user" || true)"
    [ -n "$uid" ] || { echo "enter.sh: no user $user inside" >&2; exit 125; }
    e=(PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$user" LOGNAME="$user"
       XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus)
    as=(/usr/bin/setpriv --reuid="$uid" --regid="$gid" --init-groups --)
else
    e=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root USER=root
       LOGNAME=root)
    as=()
fi
e+=(LANG=C.UTF-8 TERM="$term" "${@:1:n}")
shift "$n"
cd "$cwd"
exec 3>&2 2>/dev/null    # the "Killed" notices of bash must not land in the stderr of CMD
/usr/bin/env -i --default-signal=INT,QUIT,TERM,HUP "${e[@]}" "${as[@]}" "$@" 2>&3 3>&-
exit $?
'
# The host-side nsenter process must outlive CMD: if it dies first, CMD is
# re-parented to the HOST's init (the reaper is chosen in the dying parent's
# pid namespace), whose zombie then stalls the container's shutdown (10 s,
# systemd-shutdown waits for it) or pid-namespace teardown.  So nsenter
# ignores the signals a terminal or a process-group kill sends, and CMD gets
# them back at their defaults (env --default-signal).  A Ctrl-C still reaches
# CMD; killing CMD ends nsenter.  The inner bash (ignoring them as well) stays
# as CMD's parent to turn "killed by signal N" into 128+N: nsenter's own
# re-raise of the signal would be ignored and give a plain 1.
trap '' INT QUIT TERM HUP
exec nsenter -t "$pid" -a /usr/bin/env -i /bin/bash -c "$inner" enter.sh \
    "$leaf" "$cwd" "$user" "${TERM:-dumb}" "${#envs[@]}" ${envs[@]+"${envs[@]}"} "$@"
