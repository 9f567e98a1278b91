# taskrunner — build, test, run, package.
# The two commands of the README: `make run` (the main job on the embedded datapipeline-local) and `make test`.
# Everything is built in the release profile only: the AWS crates are built once and the tests run on them.

CARGO ?= cargo
PREFIX ?= /usr
DESTDIR ?=
TARGET_DIR ?= target
RELEASE := $(TARGET_DIR)/release

.PHONY: all build test test-unit test-py setup run bench bench-smoke soak fmt clippy clean

all: build

## build: the three binaries, release profile
build:
	$(CARGO) build --release --locked

## setup: install what the tests need on a fresh Debian machine (idempotent; root or sudo)
setup:
	scripts/setup.sh

## test: set-up, build, every test (Rust unit + integration, Python clients, packaging), bench smoke run
test: setup build
	scripts/test.sh

## run: the README's main job: datapipeline-local + the seed pipeline + taskrunner until FINISHED
run: build
	scripts/run-demo.sh

## bench: the benchmark table (prints it, writes target/bench/results.json)
bench: build
	scripts/bench.sh

bench-smoke: build
	BENCH_SMOKE=1 scripts/bench.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --release --all-targets

clean:
	$(CARGO) clean
	rm -rf dist output

# Packaging targets (deb, rpm, apt-repo, install, man, completions, test-packaging).
-include Makefile.pkg
