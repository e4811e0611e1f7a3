#!/usr/bin/env bash
# Runs Debian's PgBouncer in transaction mode in the foreground, in front of one PostgreSQL, for
# the tests (tests/pooler.rs) and the benchmark's pooler rows:
#
#   scripts/pgbouncer.sh DIR PORT HOST UPSTREAM_PORT USER [PASSWORD]
#
# listens on 127.0.0.1:PORT, forwards every database name to HOST:UPSTREAM_PORT, lets USER in
# without a password (and logs in upstream with PASSWORD when given), with POOL_SIZE (default 4)
# server connections per database and user; CONNECT_QUERY, when set, runs on every new server
# connection (how a pool gives forkq's sessions their settings, e.g.
# "SET synchronous_commit = off; SET statement_timeout = 5000"). USER may use the admin console (database
# "pgbouncer": SHOW SERVERS, KILL, RESUME, RECONNECT). Writes its configuration into DIR; logs to
# stderr. Installs pgbouncer with scripts/ops-tools.sh when it is missing. PgBouncer refuses to
# run as root, so as root it runs as nobody. It execs PgBouncer: the caller stops it by the pid it
# started.
set -euo pipefail

if [ $# -lt 5 ]; then
    echo "usage: $0 DIR PORT HOST UPSTREAM_PORT USER [PASSWORD]" >&2
    exit 64
fi
dir=$1 port=$2 host=$3 upstream=$4 user=$5 password=${6:-}

find_pgbouncer() { command -v pgbouncer || { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; }; }
bin=$(find_pgbouncer) || {
    "$(dirname "$0")/ops-tools.sh" pgbouncer >&2
    bin=$(find_pgbouncer) || { echo "pgbouncer is missing and could not be installed (apt-get install pgbouncer)" >&2; exit 69; }
}

mkdir -p "$dir"
cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=$host port=$upstream${CONNECT_QUERY:+ connect_query='$CONNECT_QUERY'}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
admin_users = $user
pool_mode = transaction
default_pool_size = ${POOL_SIZE:-4}
max_client_conn = 2000
query_wait_timeout = 30
server_login_retry = 1
log_connections = 0
log_disconnections = 0
EOF
printf '"%s" "%s"\n' "$user" "$password" >"$dir/users.txt"
chmod 755 "$dir"
chmod 644 "$dir/pgbouncer.ini" "$dir/users.txt"

if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=nobody --regid=nogroup --clear-groups "$bin" "$dir/pgbouncer.ini"
fi
exec "$bin" "$dir/pgbouncer.ini"
