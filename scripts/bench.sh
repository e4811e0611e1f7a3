#!/usr/bin/env bash
# `make bench` (after the release build): runs target/release/forkq-bench against DATABASE_URL, the
# local PostgreSQL on 127.0.0.1:5432 (database `test`), or a private cluster (see pg.sh). Prints one
# markdown table and writes docs/benchmarks.md. BENCH_QUICK=1 for a run of a few minutes; BENCH_ONLY=w1,w2,...
# for a subset; BENCH_OUT=- to write nothing. Never fails on a number: only on errors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
DATABASE_URL="$(test_database_url)"
export DATABASE_URL
export BENCH_FORKQ_BIN="${BENCH_FORKQ_BIN:-$PWD/target/release/forkq}"
# The second soak runs on a private cluster with stock settings (autovacuum on), whatever the
# main server is configured with; BENCH_STOCK_URL= (empty) skips it.
if [ -z "${BENCH_STOCK_URL+set}" ]; then
    BENCH_STOCK_URL="$(private_cluster "$PWD/target/pg-stock" 54330)"
fi
export BENCH_STOCK_URL
# The scale curve (8 daemons x 32 children, ~300 connections), the hosts at rest and the NOTIFY
# fan-out run on a private cluster that takes that many connections and loads pg_stat_statements
# (stock settings otherwise) and runs nothing else, so the statements it counts are forkq's alone;
# BENCH_SCALE_URL=URL picks another server.
if [ -z "${BENCH_SCALE_URL+set}" ]; then
    BENCH_SCALE_URL="$(private_cluster "$PWD/target/pg-scale" 54331 \
        "-c max_connections=400 -c shared_preload_libraries=pg_stat_statements")"
fi
export BENCH_SCALE_URL
exec ./target/release/forkq-bench
