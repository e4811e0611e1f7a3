#!/usr/bin/env bash
# `make test`: the whole suite against a real PostgreSQL. Each test creates its own schema.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
DATABASE_URL="$(test_database_url)"
export DATABASE_URL
echo "testing against $DATABASE_URL"
cargo build --all-targets
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast --test-threads 4
else
    cargo test --no-fail-fast -- --test-threads 4
fi
