#!/bin/bash
# build-image.sh - build the Debian guest for the VM test tier (systemd PID 1, pure cgroup
# v2, a lingering non-root user `tester`), WITHOUT loop mounts:
#   debootstrap (minbase + systemd, dbus, python3-venv, kernel) -> configure in chroot
#   -> small initramfs (virtio_blk + ext4) -> ext4 image via `mkfs.ext4 -d`.
#
# Why a VM at all: the CI machine has hybrid cgroups and PID 1 is not systemd, so a user
# manager gets no controllers there. Most users' hosts are pure cgroup v2, where a non-root
# user's manager has cpu, memory and pids delegated and `--user` limits are enforced. Debian 13
# (systemd 257) is such a host.
#
# Usage: build-image.sh OUT_DIR        (normally run by `python -m tests.harness.vm`, which
#   installs the host tools, takes a lock and caches OUT_DIR keyed by a hash of this file:
#   ANY change here rebuilds the image on the next run.)
# Output in OUT_DIR:
#   rootfs.raw   sparse ext4 image (label gvroot), booted with snapshot=on (never modified)
#   vmlinuz      guest kernel      initrd.img  guest initramfs
#   build-info   suite, mirror, package versions (the driver reads python3's), timings
# Env knobs: SUITE=trixie|bookworm  MIRROR=<url> (default: first deb URI in the host's apt
#   sources)  WORK=dir  SIZE=3G  EXTRA_PKGS="pkg1,pkg2"  DEB_CACHE=dir (debootstrap --cache-dir)
# Needs root. Host tools: debootstrap cpio e2fsprogs (mkfs.ext4 -d) xz-utils zstd.
set -euo pipefail

OUT=${1:?usage: build-image.sh OUT_DIR}
SUITE=${SUITE:-trixie}
BASE=${BASE:-/var/tmp/gestvenv-vm}
WORK=${WORK:-$BASE/work}    # one build at a time: the driver holds $BASE/build.lock
SIZE=${SIZE:-3G}
DEB_CACHE=${DEB_CACHE:-$BASE/deb-cache}
# busybox-static is for the initramfs (step 4): the guest's own static busybox is copied
# there, so the host needs none. podman, uidmap (newuidmap), catatonit (--init) and crun:
# rootless containers for tester (container isolation).
PKGS="systemd,systemd-sysv,dbus,dbus-user-session,libpam-systemd,udev,kmod,procps,python3,python3-venv,linux-image-amd64,busybox-static,podman,uidmap,catatonit,crun${EXTRA_PKGS:+,$EXTRA_PKGS}"

for tool in debootstrap cpio mkfs.ext4 xz zstd; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: missing host tool: $tool" >&2; exit 1; }
done

# Mirror: reuse whatever the host's apt is configured with (never hardcode a host).
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
              grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'; } \
            | grep -v -e security -e '^$' | grep '/debian/*$' | head -1) || true
fi
[ -n "$MIRROR" ] || { echo "no Debian mirror found in apt sources; set MIRROR=" >&2; exit 1; }

t() { date +%s.%N; }
el() { python3 -c "print(f'{$(t)-$1:.1f}')"; }
T0=$(t)

# Safety net: debootstrap mounts proc/sys (and maybe binds /dev) inside the target. Unmount
# everything under the work dir (deepest first) BEFORE deleting it, and delete with
# --one-file-system: a plain `rm -rf` through a leftover /dev bind would wipe host devices.
ROOT=$WORK/rootfs
cleanup() {
  local m
  awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
# A SIGTERM/SIGINT (the driver forwards them to this process group) must still run the
# EXIT trap, so turn them into a plain exit.
trap 'exit 143' TERM
trap 'exit 130' INT HUP

cleanup; mkdir -p "$WORK" "$OUT" "$DEB_CACHE"

# 1. debootstrap. minbase has no init: systemd-sysv provides /sbin/init.
#    linux-image-amd64 pulls initramfs-tools, which builds a big (MODULES=most) initrd;
#    we replace it with a tiny one in step 3.
T1=$(t)
debootstrap --variant=minbase --cache-dir="$DEB_CACHE" --include="$PKGS" \
  "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
  || { tail -30 "$WORK/debootstrap.log" >&2; exit 1; }
T_DEBOOTSTRAP=$(el "$T1")

# 2. Configure the guest.
T2=$(t)
echo gestvenv-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 gestvenv-vm\n' > "$ROOT/etc/hosts"
# Root fs is /dev/vda (whole disk, no partition table); the kernel mounts it rw (cmdline).
cat > "$ROOT/etc/fstab" <<'EOF'
/dev/vda   /          ext4  rw,errors=remount-ro           0 0
# host <-> guest exchange directory (qemu -virtfs ... mount_tag=hostshare); nofail so the
# image also boots without the share.
hostshare  /mnt/host  9p    trans=virtio,version=9p2000.L,msize=262144,nofail  0 0
EOF
mkdir -p "$ROOT/mnt/host"
chroot "$ROOT" passwd -d root >/dev/null                   # empty root pw: serial-console debugging
chroot "$ROOT" useradd -m -u 1000 -s /bin/bash tester      # unprivileged user for systemd-run --user
# Its subordinate ids, for rootless podman (useradd adds them where login.defs says so; made
# sure of here).
grep -q '^tester:' "$ROOT/etc/subuid" 2>/dev/null || echo 'tester:100000:65536' >> "$ROOT/etc/subuid"
grep -q '^tester:' "$ROOT/etc/subgid" 2>/dev/null || echo 'tester:100000:65536' >> "$ROOT/etc/subgid"
# = loginctl enable-linger: logind starts user@1000.service at boot, without a login session,
# and systemd 257's user@.service has Delegate=pids memory cpu (checked by the driver's setup).
mkdir -p "$ROOT/var/lib/systemd/linger"; touch "$ROOT/var/lib/systemd/linger/tester"
# Deterministic test host: no background apt/dpkg/fstrim timers.
rm -f "$ROOT"/etc/systemd/system/timers.target.wants/{apt-daily,apt-daily-upgrade,dpkg-db-backup,fstrim,e2scrub_all}.timer
# No network in the guest (qemu -nic none): the project comes in as wheels over 9p. A
# networkd config is kept for debugging with a NIC, but networkd is NOT enabled: it sits on
# the boot critical path (network.target) and cost ~9 s under TCG.
mkdir -p "$ROOT/etc/systemd/network"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' > "$ROOT/etc/systemd/network/50-dhcp.network"
# Persistent journal not needed; keep it in RAM (less I/O under TCG).
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$ROOT/etc/systemd/journald.conf.d/gv.conf"

# Command runner: the host drops jobs/<id>.sh into the 9p share, the guest runs each as root
# with bash and writes <id>.out and <id>.err while it runs (the host streams them: 9p is
# uncached in the guest, so writes reach the host file at once), then <id>.rc (written last,
# atomically).
cat > "$ROOT/usr/local/sbin/gv-runner" <<'EOF'
#!/bin/bash
# gv-runner: run job scripts the host drops into /mnt/host/jobs (9p share).
SHARE=/mnt/host; JOBS=$SHARE/jobs
mountpoint -q "$SHARE" || { echo "no host share mounted; runner idle"; exec sleep infinity; }
mkdir -p "$JOBS"
# Tell the host when boot has finished ("running" or "degraded") and how long it took.
state=$(systemctl is-system-running --wait 2>&1)
{ echo "state=$state"; echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
  systemd-analyze time 2>&1 | head -1; } > "$SHARE/ready.tmp" && mv "$SHARE/ready.tmp" "$SHARE/ready"
shopt -s nullglob
# Poll with bash's builtin `read -t` on an idle FIFO instead of forking /bin/sleep: under
# TCG a fork+exec every 0.2 s cost ~25% of a vCPU, which would skew CPU-quota tests.
mkfifo /run/gv-runner.fifo 2>/dev/null; exec 9<>/run/gv-runner.fifo
while :; do
  for job in "$JOBS"/*.sh; do
    id=${job%.sh}
    [ -e "$id.started" ] && continue
    : > "$id.started"
    ( cd /root && bash "$job" > "$id.out" 2> "$id.err" < /dev/null
      echo $? > "$id.rc.tmp"; mv "$id.rc.tmp" "$id.rc" ) &
  done
  read -r -t 0.2 -u 9 _ || true
done
EOF
chmod 755 "$ROOT/usr/local/sbin/gv-runner"
cat > "$ROOT/etc/systemd/system/gv-runner.service" <<'EOF'
[Unit]
Description=Run host-submitted test jobs from the 9p share
RequiresMountsFor=/mnt/host
After=mnt-host.mount

[Service]
Type=simple
ExecStart=/usr/local/sbin/gv-runner
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Environment=HOME=/root
Environment=LANG=C.UTF-8

[Install]
WantedBy=multi-user.target
EOF
chroot "$ROOT" systemctl enable gv-runner.service >/dev/null 2>&1

# 3. Tiny custom initramfs (static busybox + the few modules needed for an ext4 root on
#    virtio-blk + a 20-line /init) instead of initramfs-tools' udev-based one: ~10 s faster
#    boot under TCG. Which of virtio_pci/virtio_blk/ext4 are modules differs per kernel
#    (6.1: all modules; 6.12: virtio_pci built in), so resolve them via modules.dep.
#    Debian's own initrd is deleted from the image's /boot (unused, ~36 MB incompressible).
KVER=$(find "$ROOT/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -1)
[ -n "$KVER" ] || { echo "no kernel in $ROOT/boot" >&2; exit 1; }
MODDIR=$ROOT/usr/lib/modules/$KVER
IRD=$WORK/initramfs
mkdir -p "$IRD/bin" "$IRD/lib" "$IRD/dev" "$IRD/proc" "$IRD/sys" "$IRD/newroot"
cp "$ROOT/bin/busybox" "$IRD/bin/busybox"
# dependency closure, dependencies first; prints module paths relative to $MODDIR
python3 - "$MODDIR" virtio_pci virtio_blk ext4 crc32c_generic > "$WORK/initramfs.mods" <<'EOF'
import os, re, sys
moddir, wanted = sys.argv[1], sys.argv[2:]
deps = {}
for line in open(os.path.join(moddir, "modules.dep")):
    mod, _, rest = line.partition(":")
    deps[mod] = rest.split()
builtin = {re.sub(r"\.ko.*$", "", os.path.basename(l.strip())).replace("-", "_")
           for l in open(os.path.join(moddir, "modules.builtin"))}
byname = {re.sub(r"\.ko.*$", "", os.path.basename(m)).replace("-", "_"): m for m in deps}
order = []
def visit(m):
    if m in order: return
    for d in reversed(deps[m]): visit(d)          # modprobe loads the last-listed dep first
    order.append(m)
for w in wanted:
    if w in byname: visit(byname[w])
    elif w not in builtin: sys.exit(f"module {w} neither loadable nor built in")
print("\n".join(order))
EOF
n=10
while read -r m; do
  f=$MODDIR/$m; name=$(basename "$m"); name=${name%%.ko*}
  case "$f" in *.xz) xz -dc "$f";; *.zst) zstd -dcq "$f";; *) cat "$f";; esac > "$IRD/lib/$n-$name.ko"
  n=$((n+1))
done < "$WORK/initramfs.mods"
cat > "$IRD/init" <<'EOF'
#!/bin/busybox sh
# Minimal initramfs: insmod the bundled modules (numbered in dependency order), mount
# /dev/vda on /newroot, exec systemd. On failure: print why and power off, so the host
# sees qemu exit instead of waiting for a timeout.
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sysfs /sys; $B mount -t devtmpfs devtmpfs /dev
for m in /lib/*.ko; do $B insmod "$m" || echo "initramfs: insmod $m failed"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $B sleep 0.05; i=$((i+1)); done
if ! $B mount -t ext4 -o rw /dev/vda /newroot; then
  echo "initramfs: cannot mount /dev/vda; powering off"; $B sleep 1; $B poweroff -f
fi
$B umount /proc /sys
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /sbin/init
EOF
chmod 755 "$IRD/init"
(cd "$IRD" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initrd.img"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
rm -f "$ROOT"/boot/initrd.img-*

# Record what we built (the driver reads python3's version from here to download wheels
# for the guest's Python), then drop the package cache from the image.
{
  echo "suite=$SUITE mirror=$MIRROR kernel=$KVER built=$(date -u +%FT%TZ)"
  chroot "$ROOT" dpkg-query -W systemd python3 linux-image-amd64 udev dbus
} > "$OUT/build-info"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/*_Packages
# Write /etc/.updated + /var/.updated now, so ldconfig.service and systemd-update-done.service
# (ConditionNeedsUpdate=) don't run on every boot of the snapshot=on image (~2 s under TCG).
chroot "$ROOT" /usr/lib/systemd/systemd-update-done || true
T_CONFIG=$(el "$T2")

# 4. ext4 image straight from the directory (no loop device, no mount).
T3=$(t)
rm -f "$OUT/rootfs.raw"
mkfs.ext4 -q -F -L gvroot -d "$ROOT" "$OUT/rootfs.raw" "$SIZE"
T_IMAGE=$(el "$T3")

{
  echo "timings_s debootstrap=$T_DEBOOTSTRAP configure+initramfs=$T_CONFIG mkfs=$T_IMAGE total=$(el "$T0")"
  echo "image_apparent=$(du -h --apparent-size "$OUT/rootfs.raw" | cut -f1) image_allocated=$(du -h "$OUT/rootfs.raw" | cut -f1) initrd=$(du -h "$OUT/initrd.img" | cut -f1)"
} | tee -a "$OUT/build-info"
# (the EXIT trap removes $WORK: the rootfs dir is no longer needed, ~600 MB)
