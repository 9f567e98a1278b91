#!/usr/bin/env bash
# `make bench`: whole-process figures (bench/bench.py) against the release binaries and a local
# datapipeline-local. BENCH_SMOKE=1: tiny sizes, seconds, judged by nothing (CI runs it so the harness cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/bench.py
