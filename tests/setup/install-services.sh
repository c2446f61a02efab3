#!/usr/bin/env bash
# Installs, from Debian's packages, the services the end-to-end tests start on
# loopback: nginx (a production web server in front of the repository), PostgreSQL (the
# fleet store's production database: tests/pg.py runs its own initdb/pg_ctl cluster in
# a temporary directory), Chromium (the headless browser the fleet dashboard's test
# drives through Playwright), the tools
# tests/agent/test_packaging.py checks the systemd unit with (systemd-analyze,
# systemd-sysusers, systemd-tmpfiles: Debian's systemd; no systemd needs to run), and
# the software TPM 2.0 tests/agent/test_keyprotect.py seals the device's keys with
# (swtpm, swtpm_setup from swtpm-tools, and tpm2-tools, which the agent runs). The
# tests start and stop their own nginx; the system one the package starts is stopped.
# Idempotent: quiet when everything is present. Needs root or passwordless sudo;
# without either it says in one line which tests will skip, and exits 0.
#
# Usage: tests/setup/install-services.sh [--packages]  (--packages: list, and exit)
set -euo pipefail

# tool:package for every program the tests start (EDGEPACK_SERVICES, space-separated,
# replaces the list: the tests use it to exercise the skip path).
read -r -a SERVICES <<<"${EDGEPACK_SERVICES:-nginx:nginx systemd-analyze:systemd initdb:postgresql chromium:chromium swtpm:swtpm swtpm_setup:swtpm-tools tpm2_createprimary:tpm2-tools}"

if [ "${1:-}" = "--packages" ]; then
    for spec in "${SERVICES[@]}"; do echo "${spec#*:}"; done | sort -u
    exit 0
fi

# Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/VERSION/bin.
present() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null
}

need=()
for spec in "${SERVICES[@]}"; do
    present "${spec%%:*}" || need+=("${spec#*:}")
done
[ "${#need[@]}" -eq 0 ] && exit 0

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
        echo "install-services: skipped: installing ${need[*]} needs root or passwordless sudo; the tests that need them will skip" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-services: skipped: no apt-get to install ${need[*]}; the tests that need them will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
"${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a system nginx on port 80; the tests run their own instances.
if command -v systemctl >/dev/null 2>&1; then "${SUDO[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true; fi
"${SUDO[@]}" pkill -x nginx >/dev/null 2>&1 || true
# Likewise the cluster the postgresql package starts: the tests run their own.
if command -v systemctl >/dev/null 2>&1; then "${SUDO[@]}" systemctl disable --now postgresql >/dev/null 2>&1 || true; fi
for spec in "${SERVICES[@]}"; do
    present "${spec%%:*}" || { echo "install-services: ${spec%%:*} is still missing after installing ${spec#*:}" >&2; exit 1; }
done
echo "install-services: installed ${need[*]}"
