#!/usr/bin/env bash
# Prints a DATABASE_URL that answers: $DATABASE_URL, else the local server on 127.0.0.1:5432,
# else a private throwaway cluster under target/pg started from the installed binaries.
# Sourced by run.sh, test.sh and bench.sh.
set -euo pipefail

find_pg_bin() {
    for dir in "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent)")" /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
    done
    return 1
}

# Starts (initialising it first if needed) a private cluster with stock settings under $1 on
# 127.0.0.1:$2 from the installed binaries, and prints its URL; $3 adds server options
# ("-c max_connections=400").
private_cluster() {
    local root="$1" port="$2" options="${3:-}"
    local bin; bin="$(find_pg_bin)" || { echo "no PostgreSQL found: set DATABASE_URL or install PostgreSQL (initdb, pg_ctl)" >&2; return 1; }
    mkdir -p "$root"
    local as_user=()
    if [ "$(id -u)" = 0 ]; then
        # initdb refuses to run as root: the cluster belongs to the postgres (or nobody) user.
        local owner=postgres; id postgres >/dev/null 2>&1 || owner=nobody
        chown "$owner" "$root"
        as_user=(runuser -u "$owner" --)
    fi
    if [ ! -f "$root/data/PG_VERSION" ]; then
        "${as_user[@]}" "$bin/initdb" -D "$root/data" -U postgres --auth=trust >"$root/initdb.log" 2>&1 \
            || { echo "initdb failed; see $root/initdb.log" >&2; return 1; }
    fi
    if ! "${as_user[@]}" "$bin/pg_ctl" -D "$root/data" status >/dev/null 2>&1; then
        "${as_user[@]}" "$bin/pg_ctl" -D "$root/data" -l "$root/server.log" -w \
            -o "-p $port -k $root -c listen_addresses=127.0.0.1 $options" start >/dev/null \
            || { echo "the private PostgreSQL did not start; see $root/server.log" >&2; return 1; }
        echo "started a private PostgreSQL in $root/data on 127.0.0.1:$port (stop: pg_ctl -D $root/data stop)" >&2
    fi
    echo "postgres://postgres@127.0.0.1:$port/postgres"
}

database_url() {
    if [ -n "${DATABASE_URL:-}" ]; then
        echo "$DATABASE_URL"; return 0
    fi
    if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
        local user="${PGUSER:-postgres}"
        echo "postgres://$user@127.0.0.1:5432/${PGDATABASE:-postgres}"; return 0
    fi
    private_cluster "$(pwd)/target/pg" 54329
}

# The database for tests and benchmarks: $DATABASE_URL, else the database `test` of the local
# server (created when missing), else the private cluster of database_url.
test_database_url() {
    if [ -z "${DATABASE_URL:-}" ] && pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        local admin="postgres://postgres@127.0.0.1:5432/postgres"
        psql "$admin" -qtc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
            || psql "$admin" -qc "CREATE DATABASE test"
        echo "postgres://postgres@127.0.0.1:5432/test"
        return 0
    fi
    database_url
}
