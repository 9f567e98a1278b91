#!/bin/sh
# Builds target/rpm/RPMS/<arch>/taskrunner-<version>-1.<arch>.rpm with rpmbuild (`make rpm`).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
top=$here/target/rpm
mkdir -p "$top"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
# %license needs the file inside the build directory.
rm -rf "$top/BUILD"; mkdir -p "$top/BUILD"; cp debian/copyright "$top/BUILD/"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
rpmbuild -bb --nodeps \
    --define "_topdir $top" \
    --define "_builddir $top/BUILD" \
    --define "srcdir $here" \
    --define "version_override $version" \
    --define "use_source_date_epoch_as_buildtime 1" \
    --define "_buildhost taskrunner" \
    rpm/taskrunner.spec >"$top/build.log" 2>&1 || { cat "$top/build.log" >&2; exit 1; }
find "$top/RPMS" -name 'taskrunner-*.rpm' | head -n1
