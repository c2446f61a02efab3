#!/usr/bin/env bash
# Run a command inside the emulated aarch64 Debian prepared by aarch64.sh:
#   hw/emulation/run-aarch64.sh python3 -c 'import platform; print(platform.machine())'
#
# The guest runs in a private mount namespace (nothing leaks to the host's mounts),
# chrooted into cache/rootfs, with:
#   - a Cortex-A72 /proc/cpuinfo bind-mounted over the real one, and QEMU_CPU=cortex-a72
#     so the CPU features qemu advertises (HWCAP) agree with it;
#   - the checkout and /tmp visible at the same paths as on the host;
#   - the host's network namespace, so 127.0.0.1 servers on the host are reachable;
#   - PYTHONPATH = the checkout + the aarch64 wheels, and edgepack / edgepack-agent on PATH;
#   - no board identity: the host's DMI is hidden, and there is no device tree, so the
#     agent's detection picks generic-aarch64. EDGEPACK_EMU_BOARD="Raspberry Pi 4 Model B
#     Rev 1.4" presents that device-tree model (at /sys/firmware/devicetree/base/model)
#     to emulate a board the fake Cortex-A72 cpuinfo fits.
# The working directory is kept when it lies in the checkout or /tmp, else it is /.
# Variables named EDGEPACK_* pass through, and so do those listed in EDGEPACK_EMU_ENV.
# Exit status: the command's; 3 when the emulation cannot run here.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -gt 0 ] || {
    echo "usage: $0 CMD [ARG...]" >&2
    exit 2
}
require_root
[ -e "$CACHE/ready" ] || cannot "no prepared root file system; run hw/emulation/aarch64.sh first"
command -v unshare >/dev/null || cannot "unshare (util-linux) is missing"
ensure_binfmt

CPUINFO=$CACHE/cpuinfo-cortex-a72
write_fake_cpuinfo "$CPUINFO"

workdir=/
case "$PWD/" in
"$CHECKOUT"/* | /tmp/*) workdir=$PWD ;;
esac

guest_env=(
    "HOME=/root"
    "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    "LANG=C.UTF-8"
    "PYTHONPATH=$CHECKOUT:$GUEST_SITE"
    "PYTHONDONTWRITEBYTECODE=1"
    "QEMU_CPU=cortex-a72"
    "TMPDIR=/tmp"
)
while IFS='=' read -r name _; do
    case "$name" in EDGEPACK_EMU_*) ;; EDGEPACK_*) guest_env+=("$name=${!name}") ;; esac
done < <(env)
for name in ${EDGEPACK_EMU_ENV:-}; do
    [ -n "${!name+x}" ] && guest_env+=("$name=${!name}")
done

# Inside the new namespace: mount what the guest needs, then chroot. Arguments are
# passed positionally, never spliced into the script, so any command line is safe.
# shellcheck disable=SC2016  # the inner script expands its own positional parameters
exec unshare --mount --propagation private -- bash -euo pipefail -c '
    rootfs=$1 cpuinfo=$2 checkout=$3 workdir=$4 board=$5
    shift 5
    mount -t proc proc "$rootfs/proc"
    mount --bind "$cpuinfo" "$rootfs/proc/cpuinfo"
    mount --rbind /sys "$rootfs/sys"
    if [ -d /sys/devices/virtual/dmi/id ]; then
        mount -t tmpfs -o size=16k,mode=0555 none "$rootfs/sys/devices/virtual/dmi/id"
    fi
    if [ -n "$board" ]; then
        mount -t tmpfs -o size=16k none "$rootfs/sys/firmware"
        mkdir -p "$rootfs/sys/firmware/devicetree/base"
        printf "%s\0" "$board" >"$rootfs/sys/firmware/devicetree/base/model"
    fi
    mount --rbind /dev "$rootfs/dev"
    mount --bind /tmp "$rootfs/tmp"
    mkdir -p "$rootfs$checkout"
    mount --bind "$checkout" "$rootfs$checkout"
    env_count=$1
    shift
    envs=("${@:1:$env_count}")
    shift "$env_count"
    exec chroot "$rootfs" /usr/bin/env -i "${envs[@]}" /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$workdir" "$@"
' guest "$ROOTFS" "$CPUINFO" "$CHECKOUT" "$workdir" "${EDGEPACK_EMU_BOARD:-}" "${#guest_env[@]}" "${guest_env[@]}" "$@"
