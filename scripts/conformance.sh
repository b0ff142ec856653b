#!/usr/bin/env bash
# Conformance of the drive with its backing folder (needs root and /dev/fuse).
#
#   1. pjdfstest (the Rust rewrite, https://crates.io/crates/pjdfstest) runs on a plain
#      directory and on a peerfs mount whose backing folder is on the same filesystem.
#      Every test that passes on the plain directory must pass on the mount; the
#      difference is printed with each failure's message.
#   2. fsx (https://crates.io/crates/fsx) runs FSX_OPS random operations (reads, writes,
#      mmap, truncate, fallocate, hole punching, copy_file_range, ...) on a file in the
#      mount and must report no corruption; afterwards the file read through the mount
#      must equal the backing file.
#
# Both run once per drive mode: `passthrough` ([drive] passthrough = true, kernel FUSE
# passthrough where the kernel offers it) and `daemon` (passthrough = false: every read
# and write goes through the daemon).
#
# Environment:
#   PEERFS_BIN          use this peerfs binary instead of building target/release/peerfs
#   CONFORMANCE_MODES   modes to test (default "passthrough daemon networked"; networked: the
#                       drive has a connected peer that receives everything it replicates)
#   PEERFS_PASSTHROUGH  0 or 1: shorthand for CONFORMANCE_MODES=daemon / passthrough
#   CONFORMANCE_DIR     parent of the scratch directory (default /var/tmp); use a disk
#                       filesystem such as ext4, not tmpfs
#   CONFORMANCE_OUT     logs are kept here (default target/conformance)
#   PJDFSTEST_FILTER    space-separated pjdfstest name patterns (default: all tests)
#   FSX_OPS             fsx operations (default 100000); FSX_SEED (default 1)
#   KEEP=1              keep the scratch directory
#
# Requires: pjdfstest 0.2.x and fsx 0.3.x on PATH (see .ci/run), fuse3, util-linux.
# Functions called from traps look unreachable to shellcheck 0.9:
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export NO_COLOR=1 # pjdfstest colours its output otherwise
export LC_ALL=C  # sort and comm must agree

FSX_OPS=${FSX_OPS:-100000}
FSX_SEED=${FSX_SEED:-1}
OUT=${CONFORMANCE_OUT:-$ROOT/target/conformance}
case "${PEERFS_PASSTHROUGH:-}" in
    0 | false) MODES=daemon ;;
    1 | true) MODES=passthrough ;;
    *) MODES=${CONFORMANCE_MODES:-passthrough daemon networked} ;;
esac
read -r -a FILTER <<<"${PJDFSTEST_FILTER:-}"

log() { printf '\n== %s\n' "$*"; }
die() {
    echo "conformance: error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------- prerequisites

[[ $(id -u) -eq 0 ]] || die "must run as root (mounts, and pjdfstest switches users)"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse)"
for tool in pjdfstest fsx mountpoint timeout; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH (see .ci/run)"
done

# pjdfstest needs two unprivileged users, each with its own primary group.
if ! getent group tests >/dev/null; then
    groupadd --system tests
fi
if ! id -u tests >/dev/null 2>&1; then
    useradd --system --gid tests --no-create-home --home-dir / \
        --shell "$(command -v nologin || echo /bin/false)" tests
fi
id -u nobody >/dev/null 2>&1 || die "user nobody is missing"
NOBODY_GROUP=$(id -gn nobody)

if [[ -n "${PEERFS_BIN:-}" ]]; then
    PEERFS=$PEERFS_BIN
else
    log "building peerfs (release)"
    (cd "$ROOT" && cargo build --release -p peerfs-cli)
    PEERFS=${CARGO_TARGET_DIR:-$ROOT/target}/release/peerfs
fi
[[ -x "$PEERFS" ]] || die "no peerfs binary at $PEERFS"

# ---------------------------------------------------------------- scratch area and cleanup

WORK=$(mktemp -d "${CONFORMANCE_DIR:-/var/tmp}/pfc.XXXXXX")
chmod 755 "$WORK" # pjdfstest's unprivileged users must traverse it
MOUNTS=()         # mountpoints to release on exit, in mount order
STATES=()         # "mode:statedir" of drives, for their logs
FAILURES=()
rm -rf "$OUT"
mkdir -p "$OUT"

is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

# fuse_abort MOUNTPOINT: abort the FUSE connection, which releases every process blocked
# on a daemon that stopped answering (a plain umount would wait for them).
fuse_abort() {
    local dev
    dev=$(awk -v m="$1" '$5 == m { split($3, d, ":"); print d[2] }' /proc/self/mountinfo | tail -n 1)
    [[ -n "$dev" ]] || return 0
    if [[ ! -d /sys/fs/fuse/connections/$dev ]]; then
        mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
    fi
    if [[ -w /sys/fs/fuse/connections/$dev/abort ]]; then
        echo "aborting FUSE connection $dev of $1" >&2
        echo 1 >"/sys/fs/fuse/connections/$dev/abort" || true
    fi
}

release_mount() {
    local mnt=$1
    is_mounted "$mnt" || return 0
    if [[ "$(findmnt -n -o FSTYPE --mountpoint "$mnt" 2>/dev/null)" == fuse.peerfs ]]; then
        timeout 60 "$PEERFS" unmount "$mnt" || echo "peerfs unmount $mnt failed" >&2
    fi
    if is_mounted "$mnt"; then
        fuse_abort "$mnt"
        umount -l "$mnt" || true
    fi
}

cleanup() {
    local rc=$? i entry
    set +e
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        release_mount "${MOUNTS[i]}"
    done
    for entry in "${STATES[@]}"; do
        [[ -f "${entry#*:}/peerfs.log" ]] && cp "${entry#*:}/peerfs.log" "$OUT/${entry%%:*}/peerfs.log"
    done
    local busy
    busy=$(awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo)
    if [[ -n "$busy" ]]; then
        echo "still mounted, keeping $WORK: $busy" >&2
    elif [[ "${KEEP:-0}" == 1 ]]; then
        echo "kept $WORK"
    else
        rm -rf --one-file-system "$WORK"
    fi
    echo "logs: $OUT"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A separate small filesystem for pjdfstest's EXDEV tests.
mkdir -p "$WORK/secondary"
mount -t tmpfs -o size=16m,mode=0755 tmpfs "$WORK/secondary"
MOUNTS+=("$WORK/secondary")

echo "peerfs:    $PEERFS"
echo "scratch:   $WORK ($(stat -f -c %T "$WORK"), $(findmnt -n -o SOURCE --target "$WORK"))"
echo "kernel:    $(uname -r)"
echo "tools:     $(pjdfstest --version), $(fsx --version)"
echo "modes:     $MODES"

cat >"$WORK/pjdfstest.toml" <<EOF
# Features Linux ext4 has; tests of features a filesystem lacks are skipped.
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}
secondary_fs = "$WORK/secondary"

[settings]
# Longer than the timestamp granularity of ext4 and of the drive.
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "$NOBODY_GROUP"], ["tests", "tests"]]
EOF

# fsx: every operation ext4 supports; 256 KiB file, operations up to 64 KiB.
cat >"$WORK/fsx.toml" <<'EOF'
flen = 262144
[opsize]
max = 65536
[weights]
close_open = 2
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 2
fsync = 1
fdatasync = 1
posix_fallocate = 2
punch_hole = 2
sendfile = 2
posix_fadvise = 1
copy_file_range = 2
EOF

# ---------------------------------------------------------------- pjdfstest helpers

# run_pjdfstest DIR LOG: run the suite in DIR (its exit status is judged by comparison).
run_pjdfstest() {
    local dir=$1 logf=$2 rc=0
    (cd / && RUST_BACKTRACE=0 timeout --kill-after=30 1200 \
        pjdfstest -c "$WORK/pjdfstest.toml" -p "$dir" "${FILTER[@]}") >"$logf" 2>&1 || rc=$?
    sed -i -E 's/\x1b\[[0-9;]*m//g' "$logf"
    echo "$dir: $(grep -E '^Summary:' "$logf" || echo "no summary (exit $rc; killed or crashed?)")"
}

# results LOG: "name<TAB>status" for each test in a pjdfstest log.
results() {
    sed -E -n 's/^([^[:space:]]+)[[:space:]]+(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$/\1\t\2/p' "$1" |
        sort -u
}

passed() { results "$1" | awk -F'\t' '$2 == "ok" { print $1 }' | sort -u; }

# failure_message LOG NAME: the message printed under NAME's result line (up to the
# backtrace, if any, or the next result).
failure_message() {
    awk -v n="$2" '
        function is_result(s) {
            return s ~ /^[^ \t]+[ \t]+(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$/
        }
        {
            if (p) {
                if (is_result($0) || $0 ~ /^Backtrace:/) {
                    p = 0
                } else {
                    if (++k <= 12) { s = $0; sub(/^\t/, "", s); print "        " s }
                    next
                }
            }
            if ($1 == n && is_result($0) && $NF != "ok") { p = 1; k = 0 }
        }
    ' "$1"
}

# Tests a FUSE mount skips for reasons outside the drive's control. Only a *skip* of these is
# excused; a failure still counts.
declare -A EXCUSED_SKIPS=(
    [link::link_count_max]="glibc's pathconf(_PC_LINK_MAX) knows limits by statfs f_type only and returns 127 (unknown) for every FUSE filesystem, so pjdfstest's guard skips the test"
)

# compare_pjdfstest PLAIN_LOG MOUNT_LOG MODE
compare_pjdfstest() {
    local plain=$1 mnt=$2 mode=$3 name status n_plain n_mount
    passed "$plain" >"$OUT/pjdfstest-ext4.pass"
    passed "$mnt" >"$OUT/$mode/pjdfstest-peerfs.pass"
    n_plain=$(wc -l <"$OUT/pjdfstest-ext4.pass")
    n_mount=$(wc -l <"$OUT/$mode/pjdfstest-peerfs.pass")
    comm -23 "$OUT/pjdfstest-ext4.pass" "$OUT/$mode/pjdfstest-peerfs.pass" >"$OUT/$mode/pjdfstest-regressions"
    echo "passed on ext4: $n_plain; passed on peerfs ($mode): $n_mount"

    if [[ $n_plain -eq 0 ]]; then
        echo "pjdfstest passed nothing on the plain directory: harness problem, see $plain"
        FAILURES+=("pjdfstest harness")
        return
    fi
    local extra
    extra=$(comm -13 "$OUT/pjdfstest-ext4.pass" "$OUT/$mode/pjdfstest-peerfs.pass")
    [[ -z "$extra" ]] || printf 'passes on peerfs but not on ext4 (fine):\n%s\n' "$extra"

    if [[ ! -s "$OUT/$mode/pjdfstest-regressions" ]]; then
        echo "OK: every test that passes on ext4 passes on peerfs ($mode)"
        return
    fi
    local count=0
    while IFS= read -r name; do
        status=$(results "$mnt" | awk -F'\t' -v n="$name" '$1 == n { print $2 }')
        if [[ $status == skipped && -n "${EXCUSED_SKIPS[$name]:-}" ]]; then
            echo "excused: $name skipped on peerfs: ${EXCUSED_SKIPS[$name]}"
            continue
        fi
        [[ $count -gt 0 ]] || echo "REGRESSIONS: tests that pass on ext4 but not on peerfs ($mode):"
        count=$((count + 1))
        echo "  $name: ${status:-not run}"
        failure_message "$mnt" "$name"
    done <"$OUT/$mode/pjdfstest-regressions"
    if [[ $count -eq 0 ]]; then
        echo "OK: every test that passes on ext4 passes on peerfs ($mode), excused skips aside"
    else
        echo "$count regressions on peerfs ($mode)"
        FAILURES+=("pjdfstest ($mode): $count regressions")
    fi
}

# ---------------------------------------------------------------- networked mode

# free_port: a TCP port nothing listens on now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# net_setup I CFG: gives drive I a peer (its own identity, backing, mount and daemon) and
# writes CFG's network settings (listen before the tables, the peer after them).
net_setup() {
    local i=$1 cfg=$2 pcfg pstate pbak pmnt port_a port_b id_a id_b
    pcfg=$WORK/peer$i.toml
    pstate=$WORK/pstate$i
    pbak=$WORK/pbak$i
    pmnt=$WORK/pmnt$i
    mkdir -m 755 "$pbak" "$pmnt"
    id_a=$("$PEERFS" init --state "$WORK/state$i" --name conformance | tail -n 1) || return 1
    id_b=$("$PEERFS" init --state "$pstate" --name replica | tail -n 1) || return 1
    port_a=$(free_port)
    port_b=$(free_port)
    sed -i "/^log_level/a listen = \"127.0.0.1:$port_a\"" "$cfg"
    printf '\n[[peers]]\nname = "replica"\nid = "%s"\naddress = "127.0.0.1:%s"\n' \
        "$id_b" "$port_b" >>"$cfg"
    printf 'name = "replica"\nbacking = "%s"\nmountpoint = "%s"\nstate = "%s"\nlisten = "127.0.0.1:%s"\n\n[[peers]]\nname = "conformance"\nid = "%s"\naddress = "127.0.0.1:%s"\n' \
        "$pbak" "$pmnt" "$pstate" "$port_b" "$id_a" "$port_a" >"$pcfg"
    STATES+=("networked-replica:$pstate")
    MOUNTS+=("$pmnt")
    mkdir -p "$OUT/networked-replica"
    timeout 60 "$PEERFS" mount --config "$pcfg" --daemon
}

# net_converged CFG BACKING REPLICA: waits (bounded) until the drive's queue to its peer is
# empty, then compares the two backing folders.
net_converged() {
    local cfg=$1 a=$2 b=$3 deadline=$((SECONDS + 120)) q
    while :; do
        q=$("$PEERFS" status --config "$cfg" --json 2>/dev/null |
            python3 -c 'import json,sys; print(sum(p.get("queue", 0) for p in json.load(sys.stdin).get("peers", [])))' 2>/dev/null || echo "?")
        [[ "$q" == 0 ]] && break
        if ((SECONDS > deadline)); then
            echo "queue to the replica still $q after 120 s"
            return 1
        fi
        sleep 0.2
    done
    # The same names, kinds, modes, symlink targets and contents (times are not compared:
    # atime never replicates).
    local la lb
    la=$(cd "$a" && find . -mindepth 1 -printf '%y %m %l %s %p\n' | sort)
    lb=$(cd "$b" && find . -mindepth 1 -printf '%y %m %l %s %p\n' | sort)
    if [[ "$la" != "$lb" ]]; then
        echo "trees differ (drive < > replica):"
        diff <(echo "$la") <(echo "$lb") | head -n 20
        return 1
    fi
    if ! diff -r --no-dereference "$a" "$b" >/dev/null; then
        echo "file contents differ:"
        diff -rq --no-dereference "$a" "$b" | head -n 20
        return 1
    fi
}

# ---------------------------------------------------------------- runs

# Paths are short and of equal length for the plain directory and every mount: pjdfstest
# binds unix sockets below them, and sun_path holds only 107 bytes.
log "pjdfstest on plain directory ($(stat -f -c %T "$WORK"))"
mkdir -m 755 "$WORK/ext4"
run_pjdfstest "$WORK/ext4" "$OUT/pjdfstest-ext4.log"

i=0
for mode in $MODES; do
    i=$((i + 1))
    case $mode in
        passthrough | networked) passthrough=true ;;
        daemon) passthrough=false ;;
        *) die "unknown mode $mode (passthrough, daemon or networked)" ;;
    esac
    cfg=$WORK/peerfs$i.toml
    backing=$WORK/bak$i
    mnt=$WORK/mnt$i
    state=$WORK/state$i
    mkdir -p "$OUT/$mode"
    mkdir -m 755 "$backing" "$mnt"
    cat >"$cfg" <<EOF
name = "conformance"
backing = "$backing"
mountpoint = "$mnt"
state = "$state"
log_level = "info"

[drive]
passthrough = $passthrough
EOF
    if [[ $mode == networked ]]; then
        # A second server replicating everything the suite does: the drive under test locks
        # and ships every change to it.
        net_setup "$i" "$cfg" || {
            FAILURES+=("peer setup ($mode)")
            continue
        }
    fi

    log "mounting peerfs ($mode): $PEERFS mount --config $cfg --daemon"
    STATES+=("$mode:$state")
    MOUNTS+=("$mnt")
    if ! timeout 60 "$PEERFS" mount --config "$cfg" --daemon; then
        FAILURES+=("mount ($mode)")
        tail -n 30 "$state/peerfs.log" 2>/dev/null || true
        continue
    fi
    fstype=$(findmnt -n -o FSTYPE --mountpoint "$mnt" || true)
    if [[ "$fstype" != fuse.peerfs ]]; then
        echo "mount reported success but $mnt is '${fstype:-not mounted}', not fuse.peerfs"
        FAILURES+=("mount ($mode)")
        continue
    fi
    findmnt -n -o SOURCE,FSTYPE,OPTIONS --mountpoint "$mnt"

    log "pjdfstest on peerfs ($mode)"
    run_pjdfstest "$mnt" "$OUT/$mode/pjdfstest-peerfs.log"
    compare_pjdfstest "$OUT/pjdfstest-ext4.log" "$OUT/$mode/pjdfstest-peerfs.log" "$mode"

    log "fsx on peerfs ($mode): $FSX_OPS operations, seed $FSX_SEED"
    t0=$SECONDS
    rc=0
    (cd / && RUST_BACKTRACE=0 timeout --kill-after=30 1800 fsx -f "$WORK/fsx.toml" -N "$FSX_OPS" -S "$FSX_SEED" \
        -P "$OUT/$mode" "$mnt/fsx.data") >"$OUT/$mode/fsx.log" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]] && grep -q 'All operations completed A-OK' "$OUT/$mode/fsx.log"; then
        echo "fsx: no corruption in $FSX_OPS operations ($((SECONDS - t0)) s)"
        if cmp -s "$mnt/fsx.data" "$backing/fsx.data"; then
            echo "fsx file reads the same through the mount and from the backing folder"
        else
            echo "fsx file differs between the mount and the backing folder"
            FAILURES+=("fsx ($mode): mount and backing differ")
        fi
    else
        echo "fsx FAILED (exit $rc) after $((SECONDS - t0)) s; last lines of $OUT/$mode/fsx.log:"
        tail -n 40 "$OUT/$mode/fsx.log"
        FAILURES+=("fsx ($mode)")
    fi

    timeout 30 "$PEERFS" status --config "$cfg" --json >"$OUT/$mode/status.json" 2>&1 ||
        echo "warning: peerfs status failed: $(head -c 300 "$OUT/$mode/status.json")"

    if [[ $mode == networked ]]; then
        log "the replica converges to the drive's tree"
        if net_converged "$cfg" "$backing" "$WORK/pbak$i"; then
            echo "replica's backing folder equals the drive's (content, names, modes, symlinks)"
        else
            FAILURES+=("replica ($mode) differs from the drive")
        fi
    fi

    log "unmounting peerfs ($mode)"
    if timeout 60 "$PEERFS" unmount "$mnt" && ! is_mounted "$mnt"; then
        echo "unmounted"
    else
        echo "peerfs unmount failed or left $mnt mounted"
        FAILURES+=("unmount ($mode)")
    fi
    if grep -qiE 'panick|\bERROR\b' "$state/peerfs.log" 2>/dev/null; then
        echo "daemon log has errors or panics (first 10):"
        grep -iE 'panick|\bERROR\b' "$state/peerfs.log" | head -n 10
    fi
done

log "conformance summary"
if [[ ${#FAILURES[@]} -eq 0 ]]; then
    echo "PASS: pjdfstest (no regressions against ext4) and fsx for modes: $MODES"
    exit 0
fi
printf 'FAIL: %s\n' "${FAILURES[@]}"
exit 1
