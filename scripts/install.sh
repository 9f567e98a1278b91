#!/bin/sh
# Installs taskrunner's files into $DESTDIR (the layout every package uses). Called by
# `make install` (Makefile.pkg) and by scripts/build-deb.sh and rpm/taskrunner.spec.
#
#   DESTDIR     staging root (default: empty, i.e. the live system)
#   PREFIX      /usr/local by default; the packages use /usr
#   SYSCONFDIR  /etc (config.toml goes to $SYSCONFDIR/taskrunner; never overwritten unless STAGING=1)
#   UNITDIR     systemd system units (default $PREFIX/lib/systemd/system; Debian: /lib/systemd/system)
#   LIBDIR_SD   where sysusers.d/tmpfiles.d go (default /usr/lib: systemd reads only /usr/lib and /etc)
#   BINDIR_SRC  where the built binaries are (default target/release)
#   DOCS_SRC    output of `cargo run --release --example gen-docs -- DIR` (default target/gen-docs)
#   STRIP=1     strip the binaries (packages)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
LIBDIR_SD=${LIBDIR_SD:-/usr/lib}
BINDIR_SRC=${BINDIR_SRC:-$here/target/release}
DOCS_SRC=${DOCS_SRC:-$here/target/gen-docs}
STRIP=${STRIP:-0}

for f in taskrunner taskrunner-ctl datapipeline-local; do
    [ -x "$BINDIR_SRC/$f" ] || { echo "install.sh: $BINDIR_SRC/$f missing: run cargo build --release" >&2; exit 1; }
done
[ -d "$DOCS_SRC/man" ] || { echo "install.sh: $DOCS_SRC/man missing: run make man completions" >&2; exit 1; }

d=$DESTDIR
install -d "$d$PREFIX/bin"
for f in taskrunner taskrunner-ctl datapipeline-local; do
    install -m 0755 "$BINDIR_SRC/$f" "$d$PREFIX/bin/$f"
    if [ "$STRIP" = 1 ]; then strip --strip-unneeded --remove-section=.comment --remove-section=.note "$d$PREFIX/bin/$f"; fi
done

# The unit names the binary by its installed path.
install -d "$d$UNITDIR"
sed "s|/usr/bin/taskrunner|$PREFIX/bin/taskrunner|" "$here/systemd/taskrunner@.service" >"$d$UNITDIR/taskrunner@.service"
chmod 0644 "$d$UNITDIR/taskrunner@.service"
install -D -m 0644 "$here/systemd/taskrunner.sysusers" "$d$LIBDIR_SD/sysusers.d/taskrunner.conf"
install -D -m 0644 "$here/systemd/taskrunner.tmpfiles" "$d$LIBDIR_SD/tmpfiles.d/taskrunner.conf"

# Configuration: the commented config.toml (written by the config module's owner). Until it
# exists, a placeholder that says so. An existing file on a live system is left alone.
install -d -m 0755 "$d$SYSCONFDIR/taskrunner"
conf="$d$SYSCONFDIR/taskrunner/config.toml"
if [ ! -e "$conf" ] || [ -n "$DESTDIR" ]; then
    if [ -f "$here/packaging/config.toml" ]; then
        install -m 0644 "$here/packaging/config.toml" "$conf"
    else
        printf '%s\n' '# /etc/taskrunner/config.toml: taskrunner settings (see taskrunner(8)).' \
            '# Placeholder: the documented file is packaging/config.toml in the source tree.' >"$conf"
        chmod 0644 "$conf"
    fi
fi

docdir="$d$PREFIX/share/doc/taskrunner"
install -D -m 0644 "$here/packaging/credentials.json.example" "$docdir/examples/credentials.json.example"
for f in "$here"/systemd/dropins/*.conf; do
    install -D -m 0644 "$f" "$docdir/examples/dropins/$(basename "$f")"
done

mandir="$d$PREFIX/share/man"
for page in "$DOCS_SRC"/man/*.[0-9]; do
    sec=${page##*.}
    install -d "$mandir/man$sec"
    gzip -9n <"$page" >"$mandir/man$sec/$(basename "$page").gz"
    chmod 0644 "$mandir/man$sec/$(basename "$page").gz"
done

install -d "$d$PREFIX/share/bash-completion/completions" "$d$PREFIX/share/zsh/vendor-completions" \
    "$d$PREFIX/share/fish/vendor_completions.d"
install -m 0644 "$DOCS_SRC"/completions/bash/* "$d$PREFIX/share/bash-completion/completions/"
install -m 0644 "$DOCS_SRC"/completions/zsh/* "$d$PREFIX/share/zsh/vendor-completions/"
install -m 0644 "$DOCS_SRC"/completions/fish/* "$d$PREFIX/share/fish/vendor_completions.d/"
