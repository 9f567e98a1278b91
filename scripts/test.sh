#!/usr/bin/env bash
# The README's test command (after `make setup build`): every test, then the benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy
status=0
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --release --locked --no-fail-fast || status=1
else
  cargo test --release --locked --no-fail-fast || status=1
fi
if grep -q '^test-packaging:' Makefile.pkg 2>/dev/null; then
  make --no-print-directory test-packaging || status=1
fi
if [ -x scripts/bench.sh ]; then
  BENCH_SMOKE=1 scripts/bench.sh || status=1
fi
exit $status
