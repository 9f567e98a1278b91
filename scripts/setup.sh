#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, and nothing that is already there.
# Idempotent; runs as root (CI does) or through sudo. Called by `make test` (and so by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- Debian packages -------------------------------------------------------------------------------
# faketime: the end-to-end hour-boundary test of the hourly log files.
# postgresql: SqlActivity/CopyActivity tests (initdb/pg_ctl run as a non-root user).
# procps: `kill` for ExecReload on minimal systems, and `ps` in tests.
apt_pkgs=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || apt_pkgs+=("$2"); }
need_cmd faketime faketime
need_cmd ps procps
need_cmd runuser util-linux
need_cmd useradd passwd
need_cmd setpriv util-linux
# Extra packages named by other parts of the tree (packaging tests etc.), one per line.
for f in scripts/apt-packages.d/*.txt; do
  [ -e "$f" ] || continue
  while read -r cmd pkg; do
    case "$cmd" in ''|'#'*) continue ;; esac
    need_cmd "$cmd" "$pkg"
  done <"$f"
done
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

# --- Python packages ---------------------------------------------------------------------------------
# Clients this project did not write (awscli, boto3) drive datapipeline-local; moto's server is the real S3.
py_missing=()
python3 -c 'import boto3' 2>/dev/null || py_missing+=(boto3)
python3 -c 'import awscli' 2>/dev/null || py_missing+=(awscli)
python3 -c 'import moto.server, flask, flask_cors' 2>/dev/null || py_missing+=("moto[server]")
python3 -c 'import pytest' 2>/dev/null || py_missing+=(pytest)
if [ ${#py_missing[@]} -gt 0 ]; then
  echo "setup: installing Python packages: ${py_missing[*]}"
  python3 -m pip install -q "${py_missing[@]}"
fi
echo "setup: ok"
