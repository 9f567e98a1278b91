#!/bin/sh
# Installs what the packaging tests need on a fresh Debian (bookworm) machine, as root:
# building the packages (dpkg-dev, rpm, lintian, apt-utils, gnupg, fakeroot), the unit checks
# (systemd's systemd-analyze), the systemd-nspawn journey (systemd-container, debootstrap), and
# the Homebrew formula check (ruby). Python's plistlib is in the standard library.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    dpkg-dev lintian rpm apt-utils gnupg fakeroot \
    systemd systemd-container debootstrap \
    ruby python3 man-db >/dev/null
