#!/usr/bin/env bash
# `make test`: the whole suite against a real PostgreSQL. Each test creates its own schema.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
if [ -z "${DATABASE_URL:-}" ] && pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
    psql "postgres://postgres@127.0.0.1:5432/postgres" -qtc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
        || psql "postgres://postgres@127.0.0.1:5432/postgres" -qc "CREATE DATABASE test"
fi
DATABASE_URL="$(database_url)"
export DATABASE_URL
echo "testing against $DATABASE_URL"
cargo build --all-targets
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast --test-threads 4
else
    cargo test --no-fail-fast -- --test-threads 4
fi
