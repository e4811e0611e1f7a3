#!/usr/bin/env bash
# No-op throughput of each handler kind with 2 children (release build): exec, coproc in Python
# and Node, and builtin for reference. Usage: scripts/bench_handlers.sh [JOBS]
# Each run enqueues JOBS no-op jobs (exec: a tenth of them) into a private schema, starts
# `forkq run` and times it until every job is completed.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
JOBS="${1:-50000}"
BIN="$PWD/target/release/forkq"
cargo build --release --quiet
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/noop.py" <<'PY'
import json, sys
for line in sys.stdin:
    sys.stdout.write('{"id": %d, "ok": true}\n' % json.loads(line)["id"])
    sys.stdout.flush()
PY
cat > "$work/noop.js" <<'JS'
require("readline").createInterface({ input: process.stdin }).on("line", (line) => {
  process.stdout.write(JSON.stringify({ id: JSON.parse(line).id, ok: true }) + "\n");
});
JS
python="$(python3 -c 'import sys; print(sys.executable)')"

bench() {
    local label="$1" handler="$2" n="$3" pid start end done
    export FORKQ_SCHEMA="bench_handlers_$$"
    psql -q "$DATABASE_URL" -c "DROP SCHEMA IF EXISTS $FORKQ_SCHEMA CASCADE" 2>/dev/null
    "$BIN" migrate >/dev/null
    python3 -c "import sys; sys.stdout.write('{\"task\":\"noop\",\"payload\":{}}\n' * $n)" > "$work/jobs.jsonl"
    "$BIN" enqueue --jsonl "$work/jobs.jsonl" >/dev/null
    start=$(date +%s.%N)
    FORKQ_HANDLER="$handler" FORKQ_CONCURRENCY=2 FORKQ_PREFETCH=100 FORKQ_HEALTH_ADDR=127.0.0.1:0 \
        FORKQ_LOG=warn "$BIN" run &
    pid=$!
    done=0
    while [ "$done" -lt "$n" ]; do
        sleep 0.05
        done=$(psql -qtA "$DATABASE_URL" -c "SELECT count(*) FROM $FORKQ_SCHEMA.jobs_archive WHERE state = 'completed'")
        kill -0 "$pid" 2>/dev/null || { echo "forkq run exited early" >&2; exit 1; }
    done
    end=$(date +%s.%N)
    kill -TERM "$pid"
    wait "$pid" || true
    psql -q "$DATABASE_URL" -c "DROP SCHEMA $FORKQ_SCHEMA CASCADE" 2>/dev/null
    python3 -c "print(f'{\"$label\":24} {$n:>7} jobs {$end - $start:6.2f} s {$n / ($end - $start):>8.0f} jobs/s')"
}

bench "exec:/bin/true" "exec:/bin/true" $((JOBS / 10))
bench "coproc: python noop.py" "coproc:$python $work/noop.py" "$JOBS"
bench "coproc: node noop.js" "coproc:node $work/noop.js" "$JOBS"
bench "builtin noop" "builtin" "$JOBS"
