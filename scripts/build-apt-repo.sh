#!/bin/sh
# Lays out a signed apt repository (`make apt-repo`) holding the .deb(s) in target/debian:
#
#   $APT_REPO_DIR/pool/main/taskrunner_<version>_<arch>.deb
#   $APT_REPO_DIR/dists/stable/main/binary-<arch>/Packages{,.gz}
#   $APT_REPO_DIR/dists/stable/{Release,Release.gpg,InRelease}
#   $APT_REPO_DIR/taskrunner-archive-keyring.gpg   the public key, for signed-by= (binary)
#   $APT_REPO_DIR/taskrunner-archive-keyring.asc   the same, armored
#
# APT_REPO_DIR (default target/apt-repo) and APT_SIGNING_KEY (required: a key id, fingerprint or
# e-mail of a secret key in the builder's gpg keyring; GNUPGHOME is honoured) come from whoever
# builds it. Publish the folder with any web server, or use it as file://.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
repo=${APT_REPO_DIR:-$here/target/apt-repo}
key=${APT_SIGNING_KEY:?set APT_SIGNING_KEY to the gpg key that signs the repository}
suite=stable
arch=$(dpkg --print-architecture)

set -- target/debian/taskrunner_*.deb
[ -e "$1" ] || { echo "no .deb in target/debian: run make deb" >&2; exit 1; }

rm -rf "$repo/dists"
mkdir -p "$repo/pool/main" "$repo/dists/$suite/main/binary-$arch"
cp "$@" "$repo/pool/main/"
cd "$repo"
apt-ftparchive packages pool >"dists/$suite/main/binary-$arch/Packages"
gzip -9n <"dists/$suite/main/binary-$arch/Packages" >"dists/$suite/main/binary-$arch/Packages.gz"
apt-ftparchive \
    -o APT::FTPArchive::Release::Origin=taskrunner \
    -o APT::FTPArchive::Release::Label=taskrunner \
    -o APT::FTPArchive::Release::Suite=$suite \
    -o APT::FTPArchive::Release::Codename=$suite \
    -o APT::FTPArchive::Release::Architectures="$arch" \
    -o APT::FTPArchive::Release::Components=main \
    -o APT::FTPArchive::Release::Description="taskrunner packages" \
    release "dists/$suite" >"dists/$suite/Release.tmp"
mv "dists/$suite/Release.tmp" "dists/$suite/Release"
rm -f "dists/$suite/InRelease" "dists/$suite/Release.gpg"
gpg --batch --yes --local-user "$key" --clearsign -o "dists/$suite/InRelease" "dists/$suite/Release"
gpg --batch --yes --local-user "$key" --armor --detach-sign -o "dists/$suite/Release.gpg" "dists/$suite/Release"
gpg --batch --yes --export "$key" >taskrunner-archive-keyring.gpg
gpg --batch --yes --armor --export "$key" >taskrunner-archive-keyring.asc
echo "$repo"
