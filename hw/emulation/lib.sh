# shellcheck shell=bash disable=SC2034  # variables used by the scripts that source this
# Shared by aarch64.sh and run-aarch64.sh: paths, and the kernel state qemu needs.
# Sourced, not run. Exit status 3 from either script means "this machine cannot run the
# emulation" (not root, no binfmt_misc, no namespaces); tests skip on it and say why.

EMU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$EMU_DIR/../.." && pwd)
CACHE=${EDGEPACK_EMU_CACHE:-$EMU_DIR/cache}
ROOTFS=$CACHE/rootfs
GUEST_SITE=/opt/edgepack/site
SUITE=bookworm
GUEST_PYTHON=3.11 # bookworm's python3
CANNOT=3
# tool:package for every host tool the two scripts call (a path where no command
# names the package's content). coreutils, bash, python3 and perl are on every
# Debian system (Essential or the project's own interpreter).
HOST_TOOLS=(
    qemu-aarch64-static:qemu-user-static
    /usr/lib/binfmt.d/qemu-aarch64.conf:qemu-user-static
    mmdebstrap:mmdebstrap
    arch-test:arch-test
    /usr/share/keyrings/debian-archive-keyring.gpg:debian-archive-keyring
    apt-get:apt
    gpgv:gpgv
    flock:util-linux
    unshare:util-linux
    mount:mount
)

log() { printf 'aarch64-emu: %s\n' "$*" >&2; }
cannot() {
    log "cannot set up the emulation: $*"
    exit "$CANNOT"
}

require_root() {
    [ "$(id -u)" -eq 0 ] || cannot "needs root (apt-get, binfmt_misc, mount namespaces, chroot)"
}

# qemu-user-static registers itself through systemd-binfmt, which does not run in
# containers or minimal VMs: mount binfmt_misc and register the handler ourselves.
# The handler has the F flag, so the kernel opens the interpreter once and chroots
# need no copy of qemu inside them.
ensure_binfmt() {
    local dir=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    if [ ! -e "$dir/register" ]; then
        mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null ||
            cannot "binfmt_misc is not available (mount -t binfmt_misc failed)"
    fi
    if [ ! -e "$dir/qemu-aarch64" ]; then
        [ -r "$conf" ] || cannot "$conf is missing; is qemu-user-static installed?"
        cat "$conf" >"$dir/register" 2>/dev/null ||
            cannot "registering qemu-aarch64 with binfmt_misc failed"
    fi
    grep -qx enabled "$dir/qemu-aarch64" || echo 1 >"$dir/qemu-aarch64"
}

# A Cortex-A72's /proc/cpuinfo (what a Raspberry Pi 4 or an AWS a1 prints), one block
# per host CPU so onnxruntime's cpuinfo sees the CPU count sysfs reports. qemu 7.2
# passes the host's x86 /proc/cpuinfo through, and onnxruntime crashes parsing it.
write_fake_cpuinfo() {
    local out=$1 n i
    n=$(nproc --all)
    : >"$out.tmp"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
        printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done >>"$out.tmp"
    mv "$out.tmp" "$out"
}
