#!/bin/bash
# Builds gestvenv's SRPM and noarch RPM on a Debian host (CI), offline:
#
#   packaging/rpm/build.sh OUTDIR [RPMBUILD-OPTION...]     e.g. --without tests
#
# Source0 is made from the working tree as it is (tracked and untracked files, .gitignore'd ones
# left out), so a fresh clone and a dirty tree both build. rpmbuild runs with a private _topdir
# (OUTDIR/rpmbuild), --nodeps (the build dependencies are Debian's: python3-setuptools, -wheel,
# -pip, -packaging, -pytest, -click, -tomlkit, -psutil, -dbus-next) and debian-host.macros in
# place of Fedora's macros. Prints the paths of the .src.rpm and .rpm; rpmbuild's output is in
# OUTDIR/rpmbuild.log. Exits nonzero on any failure.
set -euo pipefail

if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUTDIR [RPMBUILD-OPTION...]" >&2
    exit 2
fi
for tool in rpmbuild git tar /usr/bin/python3; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found" >&2; exit 1; }
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
# The builder's own gestvenv settings are no part of the package.
while IFS= read -r var; do
    case $var in GESTVENV_*|UV_*) unset "$var" ;; esac
done < <(compgen -e)
spec=$here/gestvenv.spec

version=$(/usr/bin/python3 -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
spec_version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
if [ "$version" != "$spec_version" ]; then
    echo "build.sh: pyproject.toml says $version, gestvenv.spec says $spec_version" >&2
    exit 1
fi

top=$out/rpmbuild
rm -rf "$top"
mkdir -p "$top"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}

# The tarball: every file git knows of or would add, that still exists (a deleted tracked file
# is left out), under gestvenv-VERSION/.
tarball=$top/SOURCES/gestvenv-$version.tar.gz
git -C "$root" ls-files -z --cached --others --exclude-standard \
    | (cd "$root" && while IFS= read -r -d '' f; do
           if [ -f "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
       done) \
    | sort -zu \
    | tar -C "$root" --no-recursion --owner=0 --group=0 --numeric-owner --null -T - \
          --transform "s,^,gestvenv-$version/," -czf "$tarball"
cp "$spec" "$top/SPECS/"

log=$out/rpmbuild.log
start=$(date +%s)
if ! rpmbuild -ba --nodeps \
        --load "$here/debian-host.macros" \
        --define "_topdir $top" \
        "$@" "$top/SPECS/gestvenv.spec" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "build.sh: rpmbuild failed (full output: $log)" >&2
    exit 1
fi

srpm=$(find "$top/SRPMS" -name "gestvenv-$version-*.src.rpm" | head -n 1)
rpm=$(find "$top/RPMS" -name "gestvenv-$version-*.noarch.rpm" | head -n 1)
if [ -z "$srpm" ] || [ -z "$rpm" ]; then
    echo "build.sh: rpmbuild made no .src.rpm or .noarch.rpm (see $log)" >&2
    exit 1
fi
echo "built in $(( $(date +%s) - start ))s (log: $log)" >&2
echo "$srpm"
echo "$rpm"
