#!/bin/sh
# Builds target/debian/taskrunner_<version>_<arch>.deb from the tree (`make deb`): stages the
# files with scripts/install.sh, computes the shared-library dependencies and the control file
# with dpkg-shlibdeps/dpkg-gencontrol from debian/, and packs it with dpkg-deb. Needs the
# binaries and generated docs (`make deb` builds them first) and dpkg-dev.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=target/debian
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
# Reproducible: file times and gzip headers from the changelog's date.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -STimestamp)}
export SOURCE_DATE_EPOCH

DESTDIR=$here/$stage PREFIX=/usr SYSCONFDIR=/etc UNITDIR=/lib/systemd/system STRIP=1 sh scripts/install.sh

doc=$stage/usr/share/doc/taskrunner
install -m 0644 debian/copyright "$doc/copyright"
gzip -9n <debian/changelog >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"

install -D -m 0644 debian/lintian-overrides "$stage/usr/share/lintian/overrides/taskrunner"
for s in postinst prerm postrm; do install -m 0755 "debian/$s" "$stage/DEBIAN/$s"; done
echo /etc/taskrunner/config.toml >"$stage/DEBIAN/conffiles"
chmod 0644 "$stage/DEBIAN/conffiles"

dpkg-shlibdeps -T"$out/substvars" -e"$stage/usr/bin/taskrunner" -e"$stage/usr/bin/taskrunner-ctl" \
    -e"$stage/usr/bin/datapipeline-local"
dpkg-gencontrol -ptaskrunner -P"$stage" -T"$out/substvars" -f"$out/files"

(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/md5sums"
find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0 touch -h -d "@$SOURCE_DATE_EPOCH"

version=$(dpkg-parsechangelog -SVersion)
arch=$(dpkg --print-architecture)
deb=$out/taskrunner_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
