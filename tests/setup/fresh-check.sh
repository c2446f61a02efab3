#!/usr/bin/env bash
# Prove that `make test` passes on a fresh machine: run CI's entry point (.ci/run,
# which runs `make test`) in a clean clone of the committed tree, with nothing of
# this checkout's set-up reused.
#
#   tests/setup/fresh-check.sh [--purge] [--keep] [REF]
#
# What is fresh, always: the clone (committed files only, from REF, default HEAD),
# its .venv, its set-up stamps, the emulation cache (hw/emulation/cache lives in the
# clone) and pip's cache (a new PIP_CACHE_DIR), so no wheel or root file system
# built earlier is reused.
# With --purge (root only), the machine is also made like a new one first: every
# Debian package the project's set-up installs (install-services.sh --packages and
# hw/emulation/aarch64.sh --packages) that is not part of Debian's base system
# (priority required or important) is purged with the dependencies it brought, and
# the qemu-aarch64 binfmt_misc handler is unregistered; the set-up must then bring
# all of it back by itself. This changes the machine: it is meant for CI-like hosts.
# --keep keeps the clone (its path is printed) instead of deleting it.
#
# Output: the log in $FRESH_LOG (default /tmp/edgepack-fresh-check.log), then a
# summary: what was purged, what the set-up installed, the suite's counts and every
# skip with its reason. Exit status: .ci/run's; 1 also when a test errored.
set -euo pipefail

purge=0 keep=0 ref=HEAD
while [ $# -gt 0 ]; do
    case "$1" in
    --purge) purge=1 ;;
    --keep) keep=1 ;;
    -h | --help)
        sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "fresh-check: unknown option $1 (try --help)" >&2
        exit 2
        ;;
    *) ref=$1 ;;
    esac
    shift
done

src=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
log=${FRESH_LOG:-/tmp/edgepack-fresh-check.log}
work=$(mktemp -d /tmp/edgepack-fresh-XXXXXX)
cleanup() { [ "$keep" -eq 1 ] || rm -rf "$work"; }
trap cleanup EXIT
say() { printf 'fresh-check: %s\n' "$*" | tee -a "$log" >&2; }
: >"$log"

installed_list() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' 2>/dev/null | awk '$1 == "ii" { print $2 }' | sort; }

git clone -q --no-local "$src" "$work/edgepack"
git -C "$work/edgepack" checkout -q "$ref"
say "clean clone of $(git -C "$work/edgepack" rev-parse --short HEAD) in $work/edgepack"
if [ -n "$(git -C "$src" status --porcelain)" ]; then
    say "note: $src has uncommitted changes; they are not part of this check"
fi

if [ "$purge" -eq 1 ]; then
    [ "$(id -u)" -eq 0 ] || { say "--purge needs root"; exit 2; }
    mapfile -t wanted < <(
        "$work/edgepack/tests/setup/install-services.sh" --packages
        "$work/edgepack/hw/emulation/aarch64.sh" --packages
    )
    purge_list=()
    for pkg in "${wanted[@]}"; do
        prio=$(dpkg-query -W -f='${Priority}' "$pkg" 2>/dev/null || true)
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        case "$prio" in required | important) continue ;; esac
        [ "${status:0:2}" = "ii" ] && purge_list+=("$pkg")
    done
    if [ "${#purge_list[@]}" -gt 0 ]; then
        say "purging ${purge_list[*]} (and what they brought)"
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -q --autoremove "${purge_list[@]}" >>"$log" 2>&1
    else
        say "none of the set-up's packages is installed: nothing to purge"
    fi
    if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        echo -1 >/proc/sys/fs/binfmt_misc/qemu-aarch64
        say "unregistered the qemu-aarch64 binfmt_misc handler"
    fi
fi

before=$(installed_list)
export PIP_CACHE_DIR=$work/pip-cache
start=$(date +%s)
say "running .ci/run (make test) in the clone"
set +e
(cd "$work/edgepack" && ./.ci/run) >>"$log" 2>&1
rc=$?
set -e
elapsed=$(($(date +%s) - start))
added=$(comm -13 <(echo "$before") <(installed_list) | tr '\n' ' ')

summary=$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 || true)
say "finished in $((elapsed / 60)) min $((elapsed % 60)) s, exit status $rc"
say "Debian packages the set-up installed: ${added:-none}"
say "suite: ${summary:-no pytest summary line (see $log)}"
grep -E '^SKIPPED ' "$log" | sed 's/^/fresh-check:   /' >&2 || true
if grep -qE '^ERROR ' "$log"; then
    say "some tests errored:"
    grep -E '^ERROR ' "$log" | sed 's/^/fresh-check:   /' >&2
    [ "$rc" -ne 0 ] || rc=1
fi
[ "$keep" -eq 1 ] && say "kept the clone: $work/edgepack"
say "log: $log"
exit "$rc"
