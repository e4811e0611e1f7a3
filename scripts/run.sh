#!/usr/bin/env bash
# `make run`: find or start PostgreSQL, migrate, enqueue a few demo jobs and run the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
DATABASE_URL="$(database_url)"
export DATABASE_URL
export FORKQ_HEALTH_ADDR="${FORKQ_HEALTH_ADDR:-127.0.0.1:9280}"
# A local try-out: the demo tasks (crash, spin, getenv) answer, to see recovery at work.
export FORKQ_DEMO_TASKS="${FORKQ_DEMO_TASKS:-1}"
forkq=./target/release/forkq
$forkq migrate
$forkq enqueue --queue default --task noop >/dev/null
$forkq enqueue --queue default --task sleep --payload '{"ms": 200}' >/dev/null
cat <<INFO

forkq is starting against $DATABASE_URL
  liveness:  curl http://$FORKQ_HEALTH_ADDR/livez
  readiness: curl http://$FORKQ_HEALTH_ADDR/readyz
  metrics:   curl http://$FORKQ_HEALTH_ADDR/metrics
Try, in another terminal (with DATABASE_URL=$DATABASE_URL):
  $forkq enqueue --task sleep --payload '{"ms": 500}'
  $forkq enqueue --task crash --max-attempts 2   # kills its worker twice, then dead-lettered
  $forkq status
Stop with Ctrl-C (graceful) or Ctrl-\\ (immediate).

INFO
exec $forkq run
