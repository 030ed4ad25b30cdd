# Scratch filesystems on loop devices, for the tests and the demo.
# Source this file; call scratch_init DIR first, scratch_cleanup at exit.
#
#   scratch_init DIR          where images and mountpoints go
#   scratch_fs NAME TYPE SIZE makes a TYPE filesystem of SIZE (e.g. 2G) on a
#                             loop device and mounts it at DIR/mnt/NAME;
#                             prints the mountpoint
#   scratch_cleanup           unmounts FUSE mounts and filesystems under DIR,
#                             detaches every loop device backed by a file
#                             under DIR, removes DIR
#
# With SCRATCH_VERBOSE=1 (scripts/demo, scripts/test), each says what it
# does: the image, its loop device and mountpoint; each unmount and detach.

SCRATCH_DIR=
SCRATCH_VERBOSE=${SCRATCH_VERBOSE:-0}

# A line of what is being done, on stderr (stdout carries results).
scratch_say() {
    [ "$SCRATCH_VERBOSE" = 1 ] && echo "$*" >&2
    return 0
}

scratch_init() {
    SCRATCH_DIR=$1
    mkdir -p "$SCRATCH_DIR/img" "$SCRATCH_DIR/mnt"
}

scratch_fs() {
    local name=$1 type=$2 size=$3
    local img="$SCRATCH_DIR/img/$name.img" mnt="$SCRATCH_DIR/mnt/$name"
    truncate -s "$size" "$img"
    case $type in
        xfs) mkfs.xfs -q -f -m reflink=1 "$img" ;;
        btrfs) mkfs.btrfs -q -f "$img" >/dev/null ;;
        ext4) mkfs.ext4 -q -F -E nodiscard "$img" ;;
        *) echo "scratch_fs: unknown type $type" >&2; return 1 ;;
    esac
    mkdir -p "$mnt"
    mount -o loop "$img" "$mnt"
    scratch_say "  $type: image $img ($size, sparse) on $(findmnt -no SOURCE "$mnt"), mounted on $mnt"
    echo "$mnt"
}

scratch_cleanup() {
    [ -n "$SCRATCH_DIR" ] && [ -d "$SCRATCH_DIR" ] || return 0
    local m dev file try loops left src type
    # Loop devices whose backing file lives under the scratch directory
    # (including ones a test attached to an image inside a mount). A
    # detach of a device in use (mounted, or a file of it open) only marks
    # it to go once its last user is gone, so they are detached first:
    # none then keeps a file busy under a mount below.
    loops=$(scratch_loops)
    for dev in $(echo "$loops" | awk '{ print $1 }'); do
        losetup -d "$dev" 2>/dev/null || true
    done
    # Innermost first (a guest's filesystem, then the FUSE mount whose
    # file it is on, then the scratch filesystem under the pool), retrying
    # while a daemon still commits and holds files, lazily as a last
    # resort.
    for try in $(seq 50); do
        left=0
        while read -r src m type; do
            [ -n "$m" ] || continue
            if umount "$m" 2>/dev/null; then
                case $type in
                    fuse*) scratch_say "unmounted $m (reflinkfs, pool $src: its daemon commits and exits)" ;;
                    *) scratch_say "unmounted $m ($type on $src)" ;;
                esac
            else
                left=1
            fi
        done <<< "$(scratch_mounts)"
        [ "$left" = 0 ] && break
        sleep 0.2
    done
    while read -r src m type; do
        [ -n "$m" ] || continue
        if umount -l "$m" 2>/dev/null; then
            scratch_say "unmounted $m lazily ($type on $src, still busy after 10 s)"
        fi
    done <<< "$(scratch_mounts)"
    # The kernel detaches a device once its last user is gone: wait for
    # that briefly, then say what became of each.
    for try in $(seq 20); do
        [ -z "$(scratch_loops)" ] && break
        sleep 0.1
    done
    while read -r dev id file; do
        [ -n "$dev" ] || continue
        # The same backing file by device and inode: a lazily unmounted
        # filesystem shows its files by another path.
        if [ "$(losetup -nl -O BACK-MAJ:MIN,BACK-INO "$dev" 2>/dev/null | awk '{ print $1 "/" $2 }')" = "$id" ]; then
            echo "scratch_cleanup: $dev is still attached to $file" >&2
        else
            scratch_say "detached $dev (on $file)"
        fi
    done <<< "$loops"
    rm -rf "$SCRATCH_DIR"
    scratch_say "removed $SCRATCH_DIR"
    SCRATCH_DIR=
}

# The mounts under SCRATCH_DIR, innermost first: "SOURCE MOUNTPOINT TYPE".
scratch_mounts() {
    awk -v d="$SCRATCH_DIR" '$2 == d || index($2, d "/") == 1 { print $1, $2, $3 }' /proc/mounts | sort -r -k2,2
}

# The loop devices on files under SCRATCH_DIR: "DEVICE MAJ:MIN/INODE FILE"
# lines (the backing file's device and inode).
scratch_loops() {
    losetup -nl -O NAME,BACK-MAJ:MIN,BACK-INO,BACK-FILE 2>/dev/null |
        awk -v d="$SCRATCH_DIR" 'index($4, d "/") == 1 { print $1, $2 "/" $3, $4 }'
}

# Installs the packages the tests and the demo need, when missing (always
# in CI, which starts on a fresh machine).
install_packages() {
    local need=0 tool
    for tool in mkfs.xfs mkfs.btrfs mkfs.ext4 losetup fusermount3 fio fsck.ext4 debugfs setfattr runuser fallocate qemu-io qemu-system-x86_64 busybox ceph-mon ceph-osd rbd; do
        command -v "$tool" >/dev/null 2>&1 || need=1
    done
    # The Qubes driver's tests run on Debian's own Python, as dom0's would.
    /usr/bin/python3 -m pytest --version >/dev/null 2>&1 || need=1
    if [ "$need" = 1 ] || [ "${CI:-}" = true ]; then
        export DEBIAN_FRONTEND=noninteractive
        # qemu-system-x86 and busybox-static: the real VMs of tests/vm
        # (tests/vm/build-guest fetches the guest's kernel package itself).
        # ceph-mon, ceph-osd, ceph-common: the single-node Ceph cluster of
        # tests/admin/delta.rs (../shared/ceph-single-node.sh) and `rbd`.
        local pkgs="xfsprogs btrfs-progs e2fsprogs util-linux fuse3 fio attr qemu-utils python3 python3-pytest qemu-system-x86 busybox-static ceph-mon ceph-osd ceph-common"
        echo "apt-get install: $pkgs"
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq $pkgs >/dev/null
    fi
}

# Refuses to go on without a Rust toolchain of at least the version
# Cargo.toml asks for, saying how to get one (Debian's own rustc is older).
require_rust() {
    local want have
    want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
    if ! command -v cargo >/dev/null 2>&1; then
        echo "no cargo on PATH: reflinkfs needs Rust >= $want; install it with rustup:" >&2
        echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
        return 1
    fi
    have=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" != "$want" ]; then
        echo "rustc $have is older than $want, which reflinkfs needs: rustup update" >&2
        return 1
    fi
}

# A real single-node Ceph cluster (../shared/ceph-single-node.sh, beside the
# checkout) for the delta tests, in DIR; exports CEPH_CONF. Without the
# script it says so, and fails under CI=true.
CEPH_DIR=
CEPH_SCRIPT=
ceph_start() {
    local script out
    script="$(cd .. && pwd)/shared/ceph-single-node.sh"
    if [ ! -f "$script" ]; then
        echo "no $script: the Ceph tests will be skipped" >&2
        [ "${CI:-}" = true ] && { echo "CI=true: the Ceph cluster script is required" >&2; return 1; }
        return 0
    fi
    CEPH_DIR=$1 CEPH_SCRIPT=$script
    # monmaptool records the monitor's address as msgr2 only, so with the
    # script's `ms bind msgr2 = false` an OSD finds no address to reach the
    # monitor and never comes up (Debian 12's Ceph 16): bind msgr2 too.
    export CEPH_ARGS="${CEPH_ARGS:-} --ms_bind_msgr2=true"
    # A start that fails says so here, not as a missing cluster later.
    out=$(bash "$script" start "$CEPH_DIR" "${CEPH_PORT:-6799}") || {
        echo "ceph_start: the single-node Ceph cluster did not start" >&2
        return 1
    }
    eval "$out"
    export CEPH_CONF
}

# Stops the cluster ceph_start started (its daemons, by their pids).
ceph_stop() {
    [ -n "$CEPH_DIR" ] || return 0
    bash "$CEPH_SCRIPT" stop "$CEPH_DIR" || true
    CEPH_DIR=
}
