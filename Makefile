# The two commands of the README, plus the developer's tools.
.PHONY: run test lint bench chaos build release

CARGO ?= cargo

build:
	$(CARGO) build

release:
	$(CARGO) build --release --locked

## Builds and runs the daemon against DATABASE_URL, a local PostgreSQL on 127.0.0.1:5432, or a
## private throwaway cluster under target/pg (started from the installed initdb/pg_ctl).
run: release
	./scripts/run.sh

## The whole test suite against a real PostgreSQL (DATABASE_URL, default 127.0.0.1:5432/test).
test:
	./scripts/test.sh

## Formatting and lints; both must be clean.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## Benchmarks (release build); prints a table and writes docs/benchmarks.md.
bench: release
	./scripts/bench.sh

## The long fault-injection suite.
chaos:
	FORKQ_CHAOS=long $(CARGO) test --release --test reliability -- --nocapture --test-threads=1
