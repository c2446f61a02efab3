#!/usr/bin/env bash
# Prepare an aarch64 Python environment under qemu user-mode emulation, idempotently:
#   1. the host's Debian packages (HOST_TOOLS in lib.sh: qemu-user-static, mmdebstrap,
#      arch-test, the archive keyring, util-linux, mount), with apt-get when missing;
#   2. the qemu-aarch64 binfmt_misc handler (kernel state: redone after every boot);
#   3. a minimal arm64 Debian bookworm root with python3 (3.11), in cache/rootfs;
#   4. the aarch64 manylinux wheels of the agent's dependencies (pyproject's
#      [project].dependencies, pinned to the host .venv's versions when it exists),
#      downloaded on the host with `pip download --platform …` and installed into
#      the guest's /opt/edgepack/site; the checkout itself is on the guest's PYTHONPATH;
#   5. edgepack / edgepack-agent launchers in the guest's /usr/local/bin;
#   6. a smoke test: aarch64 python imports onnxruntime and runs a tiny model.
# Everything lands in hw/emulation/cache/ (git-ignored; EDGEPACK_EMU_CACHE moves it).
# A second run only re-checks: each step leaves a stamp keyed on its inputs.
#
# Usage: hw/emulation/aarch64.sh [--check]   (--check: run the smoke test even when warm)
#        hw/emulation/aarch64.sh --packages   (print the Debian packages it installs, and exit)
# Exit status: 0 ready; 3 this machine cannot run the emulation (reason on stderr);
# anything else: a real failure.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

check=0
case "${1:-}" in
--check) check=1 ;;
--packages)
    for spec in "${HOST_TOOLS[@]}"; do echo "${spec#*:}"; done | sort -u
    exit 0
    ;;
"") ;;
*)
    echo "usage: $0 [--check | --packages]" >&2
    exit 2
    ;;
esac

require_root
mkdir -p "$CACHE"
# One preparation at a time (two test runs may start it together).
exec 9>"$CACHE/.lock"
flock 9
TIMINGS=$CACHE/timings.log
t0=$(date +%s)
step() { # step NAME START: log how long a step took
    local now
    now=$(date +%s)
    log "$1 done in $((now - $2)) s"
    printf '%s %s %ss\n' "$(date -u +%FT%TZ)" "$1" "$((now - $2))" >>"$TIMINGS"
}

# 1. Host packages: every tool this script and run-aarch64.sh call, with the Debian
# package that provides it. mmdebstrap needs arch-test for a foreign architecture
# (a Recommends, so --no-install-recommends would drop it) and the archive keyring
# to check the arm64 packages it fetches.
t=$(date +%s)
missing=()
for spec in "${HOST_TOOLS[@]}"; do
    tool=${spec%%:*} pkg=${spec#*:}
    if [[ $tool == /* ]]; then [ -e "$tool" ] && continue; else command -v "$tool" >/dev/null && continue; fi
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || cannot "${missing[*]} missing and there is no apt-get to install them"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >&2 || cannot "apt-get update failed (no Debian mirror reachable?)"
    # The mirror answered: a failing install is a real failure, not a reason to skip.
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >&2
    for spec in "${HOST_TOOLS[@]}"; do
        tool=${spec%%:*}
        if [[ $tool == /* ]]; then [ -e "$tool" ]; else command -v "$tool" >/dev/null; fi ||
            { log "$tool is still missing after installing ${spec#*:}"; exit 1; }
    done
    step host-packages "$t"
fi

# 2. binfmt_misc.
ensure_binfmt

# 3. The arm64 root file system.
if [ ! -e "$ROOTFS/.complete" ]; then
    t=$(date +%s)
    log "creating an arm64 Debian $SUITE root with python3 in $ROOTFS (a few minutes)"
    rm -rf "$ROOTFS.tmp"
    # shellcheck disable=SC2016  # $1 is for mmdebstrap's hook shell: the root directory
    mmdebstrap --arch=arm64 --variant=minbase --include=python3 \
        --customize-hook='echo "127.0.0.1 localhost" >"$1/etc/hosts"; echo "::1 localhost" >>"$1/etc/hosts"' \
        "$SUITE" "$ROOTFS.tmp" >&2
    rm -rf "$ROOTFS"
    mv "$ROOTFS.tmp" "$ROOTFS"
    touch "$ROOTFS/.complete"
    step rootfs "$t"
fi

# 4. The agent's aarch64 wheels.
quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }
host_python=python3
[ -x "$CHECKOUT/.venv/bin/python" ] && host_python=$CHECKOUT/.venv/bin/python
reqs=$CACHE/requirements.txt
constraints=$CACHE/constraints.txt
"$host_python" - "$CHECKOUT/pyproject.toml" >"$reqs.new" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
EOF
if [ "$host_python" != python3 ]; then
    # Pin the guest to what the host's tests run with (the editable project excluded).
    "$host_python" -m pip freeze --exclude-editable 2>/dev/null | grep -v '^-e ' >"$constraints.new" || true
else
    : >"$constraints.new"
fi
mv "$reqs.new" "$reqs"
mv "$constraints.new" "$constraints"
key=$(cat "$reqs" "$constraints" | sha256sum | cut -c1-16)
if [ "$(cat "$CACHE/.wheels-key" 2>/dev/null)" != "$key" ] || [ ! -d "$ROOTFS$GUEST_SITE/onnxruntime" ]; then
    t=$(date +%s)
    # pip does not widen a manylinux_2_X tag to older ones: list every glibc the guest
    # (bookworm: 2.36) can load.
    platforms=(--platform manylinux2014_aarch64)
    for v in $(seq 17 36); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
    target=(--only-binary=:all: --python-version "$GUEST_PYTHON" --implementation cp "${platforms[@]}")
    log "downloading aarch64 wheels for: $(tr '\n' ' ' <"$reqs")"
    "$host_python" -m pip download -q --disable-pip-version-check --dest "$CACHE/wheels" \
        "${target[@]}" -r "$reqs" -c "$constraints" 2>&1 | quiet_pip >&2
    rm -rf "$ROOTFS$GUEST_SITE.tmp"
    "$host_python" -m pip install -q --disable-pip-version-check --no-index \
        --find-links "$CACHE/wheels" --target "$ROOTFS$GUEST_SITE.tmp" --no-compile \
        "${target[@]}" -r "$reqs" -c "$constraints" 2>&1 | quiet_pip >&2
    rm -rf "$ROOTFS$GUEST_SITE"
    mv "$ROOTFS$GUEST_SITE.tmp" "$ROOTFS$GUEST_SITE"
    echo "$key" >"$CACHE/.wheels-key"
    step wheels "$t"
    check=1
fi

# 5. Launchers (the console scripts pip would make, for the checkout on PYTHONPATH).
for spec in edgepack:edgepack.cli edgepack-agent:device_agent.cli; do
    name=${spec%%:*} module=${spec#*:}
    printf '#!/usr/bin/python3\nimport sys\n\nfrom %s import main\n\nsys.exit(main())\n' \
        "$module" >"$ROOTFS/usr/local/bin/$name"
    chmod 0755 "$ROOTFS/usr/local/bin/$name"
done
touch "$CACHE/ready"

# 6. Smoke test: aarch64 Python, onnxruntime imported and running a tiny model
# (y = x·W + b, W = 1..12 as 4x3, b = [0.5, -1, 2], built once with onnx.helper).
if [ "$check" -eq 1 ]; then
    t=$(date +%s)
    "$EMU_DIR/run-aarch64.sh" python3 - <<'EOF' || { rm -f "$CACHE/ready"; log "smoke test failed"; exit 1; }
import base64, platform
import numpy as np
import onnxruntime as ort

MODEL = (
    "CAgSDmVkZ2VwYWNrLXNtb2tlOqoBChEKAXgKAVcSAWgiBk1hdE11bAoOCgFoCgFiEgF5IgNBZGQSBXNtb2tlKjsI"
    "BAgDEAFCAVdKMAAAgD8AAABAAABAQAAAgEAAAKBAAADAQAAA4EAAAABBAAAQQQAAIEEAADBBAABAQSoVCAMQAUIB"
    "YkoMAAAAPwAAgL8AAABAWhQKAXgSDwoNCAESCQoDEgFuCgIIBGIUCgF5Eg8KDQgBEgkKAxIBbgoCCANCBAoAEA0="
)
session = ort.InferenceSession(base64.b64decode(MODEL), providers=["CPUExecutionProvider"])
(y,) = session.run(None, {"x": np.ones((2, 4), dtype=np.float32)})
assert platform.machine() == "aarch64", platform.machine()
assert np.allclose(y, [[22.5, 25.0, 32.0]] * 2), y
print(f"smoke: {platform.machine()} python {platform.python_version()} "
      f"onnxruntime {ort.__version__} inference ok")
EOF
    step smoke "$t"
fi
step total "$t0"
