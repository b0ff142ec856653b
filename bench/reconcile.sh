#!/usr/bin/env bash
# Reconciliation benchmark: what bringing two trees together costs on the wire and in time,
# for peerfs and, side by side in the same run, for rsync (Debian's rsync, `rsync -a --stats`
# to an rsync daemon). All on loopback, with real release peers (`peerfs mount` in the
# foreground as children of reconcile.py: `--daemon` gives up after 30 s, shorter than a first
# start scan of 100,000 files):
#   (1) initial sync: 10,000 files of 1 KiB in 100 folders put in A's backing folder before A
#       starts (its start scan indexes them), B starts empty; until B's backing tree equals
#       A's; rsync copies the same tree into an empty folder
#   (2) reconnection after 1 changed file in a tree seeded identically into both backing
#       folders (BIG=1: 100,000 files in 1,000 folders; default 10,000 in 100):
#       (a) B stopped, the file changed through A's drive, B started;
#       (b) A stopped, the file changed in A's backing folder, A started (its start scan
#           finds it); rsync brings over one changed file of the same tree
# See bench/README.md ("Reconciliation"). Needs root (mounts).
#
# Environment:
#   RECON_BENCH_DIR  scratch directory, on a real disk (default /var/tmp/peerfs-recon-bench)
#   PEERFS_BIN       peerfs binary (default: build target/release/peerfs)
#   RECON_REPS       repetitions of each case; medians are reported (default 3)
#   RECON_FILES      files of the initial sync (default 10000, in RECON_FILES/100 folders)
#   BIG=1            the reconnection tree has 100,000 files (default 0: 10,000)
#   RECON_FLAT=1     the reconnection tree's files all in one folder `flat` (default 0: in
#                    folders of 100), the worst case of a folder listing
#   RECON_CASES      which parts to run: "initial", "reconnect" or both (default)
#   RECON_TIMEOUT    seconds a sync may take before it counts as not done (default 300)
#   RECON_LOG_LEVEL  log_level of the peers (default info)
#   RECON_RSYNC_FSYNC 1 (default): (1) also times `rsync -a --fsync` (every copy durable
#                    before rsync moves on, as peerfs's are before it acknowledges them; about
#                    5 s more per repetition here); 0: plain rsync only
#   RECON_LOOP       1 (default): the trees live on a fresh ext4 file system (with its journal,
#                    as servers have) in an image in RECON_BENCH_DIR, mounted by loop; 0: on
#                    RECON_BENCH_DIR's own file system. This machine's disk is ext4 without a
#                    journal, which skips inodes freed in the last 1-6 minutes when it allocates
#                    one: creating 10,000 files soon after deleting many took 2-10x longer, for
#                    both tools, and from run to run by chance.
#   KEEP=1           keep the folders, configs and logs in RECON_BENCH_DIR afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export LC_ALL=C
COMMAND=""
for v in RECON_BENCH_DIR RECON_REPS RECON_FILES BIG RECON_FLAT RECON_CASES RECON_TIMEOUT \
    RECON_LOG_LEVEL RECON_LOOP RECON_RSYNC_FSYNC; do
    if [[ -n "${!v:-}" ]]; then
        COMMAND+="$v=$(printf '%q' "${!v}") "
    fi
done
COMMAND+="bench/reconcile.sh"
BENCH_DIR=${RECON_BENCH_DIR:-/var/tmp/peerfs-recon-bench}
REPS=${RECON_REPS:-3}
FILES=${RECON_FILES:-10000}
BIG=${BIG:-0}
FLAT=${RECON_FLAT:-0}
RUN_CASES=${RECON_CASES:-initial reconnect}
TIMEOUT=${RECON_TIMEOUT:-300}
LOG_LEVEL=${RECON_LOG_LEVEL:-info}
LOOP=${RECON_LOOP:-1}
RSYNC_FSYNC=${RECON_RSYNC_FSYNC:-1}
PY=$ROOT/bench/reconcile.py

die() {
    echo "bench: error: $*" >&2
    exit 2
}

[[ $(id -u) -eq 0 ]] || die "must run as root (FUSE mounts with allow_other)"
for tool in python3 findmnt mountpoint timeout df sync flock; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
command -v rsync >/dev/null || die "rsync not found (apt-get install -y rsync)"
[[ -e /dev/fuse ]] || die "/dev/fuse not found (modprobe fuse)"
for v in REPS FILES TIMEOUT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
((FILES % 100 == 0)) || die "RECON_FILES must be a multiple of 100 (100 folders)"
[[ $BIG == 0 || $BIG == 1 ]] || die "BIG must be 0 or 1"
[[ $FLAT == 0 || $FLAT == 1 ]] || die "RECON_FLAT must be 0 or 1"
[[ $LOOP == 0 || $LOOP == 1 ]] || die "RECON_LOOP must be 0 or 1"
[[ $RSYNC_FSYNC == 0 || $RSYNC_FSYNC == 1 ]] || die "RECON_RSYNC_FSYNC must be 0 or 1"
if [[ $LOOP == 1 ]]; then
    for tool in mkfs.ext4 mount umount truncate; do
        command -v "$tool" >/dev/null || die "$tool not found (or set RECON_LOOP=0)"
    done
fi
read -r -a RUN_CASES <<<"$RUN_CASES"
((${#RUN_CASES[@]} > 0)) || die "RECON_CASES is empty"
for c in "${RUN_CASES[@]}"; do
    [[ $c == initial || $c == reconnect ]] || die "RECON_CASES: unknown case $c"
done
FLAT_ARG=()
[[ $FLAT == 1 ]] && FLAT_ARG=(--flat)
FSYNC_ARG=()
[[ $RSYNC_FSYNC == 1 ]] && FSYNC_ARG=(--rsync-fsync)
if [[ $BIG == 1 ]]; then
    TREE_DIRS=1000
else
    TREE_DIRS=100
fi

# The source tree as it is when the build starts (a given PEERFS_BIN may be older).
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    REV+=" + uncommitted changes"
fi
if [[ -n "${PEERFS_BIN:-}" ]]; then
    PEERFS=$PEERFS_BIN
    REV="binary $PEERFS_BIN, source tree at $REV"
else
    echo "building peerfs (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p peerfs-cli) >&2
    PEERFS=${CARGO_TARGET_DIR:-$ROOT/target}/release/peerfs
fi
[[ -x "$PEERFS" ]] || die "no peerfs binary at $PEERFS"

# ---------------------------------------------------------------- layout, cleanup

# The measurement (reconcile.py) starts and stops the peers itself, under
# $WORK/{initial,reconnect}/{a,b}/{backing,mnt,state,peerfs.toml}; rsync: $WORK/rsync/. WORK is
# $BENCH_DIR/scratch, the loop-mounted file system (RECON_LOOP=1), or $BENCH_DIR.
CASES=(initial reconnect)
MEASURE_PID=""
RSYNCD_PID=""
WORK=$BENCH_DIR

is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

cleanup() {
    local rc=$? c p m
    set +e
    if [[ -n $MEASURE_PID ]] && kill -0 "$MEASURE_PID" 2>/dev/null; then
        kill "$MEASURE_PID"
        wait "$MEASURE_PID" 2>/dev/null
    fi
    if [[ -n $RSYNCD_PID ]] && kill -0 "$RSYNCD_PID" 2>/dev/null; then
        kill "$RSYNCD_PID"
        wait "$RSYNCD_PID" 2>/dev/null
    fi
    for c in "${CASES[@]}"; do
        for p in a b; do
            m=$WORK/$c/$p/mnt
            is_mounted "$m" || continue
            timeout 60 "$PEERFS" unmount "$m" >&2
            is_mounted "$m" && umount -l "$m"
        done
    done
    if [[ "${KEEP:-0}" != 1 ]]; then
        for c in "${CASES[@]}"; do
            if ! is_mounted "$WORK/$c/a/mnt" && ! is_mounted "$WORK/$c/b/mnt"; then
                rm -rf -- "${WORK:?}/$c"
            fi
        done
        rm -rf -- "${WORK:?}/rsync" "${WORK:?}/retired"
    fi
    if [[ $LOOP == 1 ]] && is_mounted "$BENCH_DIR/scratch"; then
        if [[ "${KEEP:-0}" == 1 ]]; then
            echo "kept: $BENCH_DIR/scratch (loop-mounted $BENCH_DIR/scratch.img; umount it when done)" >&2
        else
            umount "$BENCH_DIR/scratch" || umount -l "$BENCH_DIR/scratch"
            rm -f -- "$BENCH_DIR/scratch.img"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
WORK=$BENCH_DIR
# One run per scratch directory: a second one would delete the first one's trees under it.
exec 9>"$BENCH_DIR/.lock"
flock -n 9 || die "another bench/reconcile.sh is using $BENCH_DIR (set RECON_BENCH_DIR to another folder)"
for w in "$BENCH_DIR" "$BENCH_DIR/scratch"; do
    for c in "${CASES[@]}"; do
        for p in a b; do
            is_mounted "$w/$c/$p/mnt" &&
                die "$w/$c/$p/mnt is still mounted (an earlier run?): unmount it first"
        done
    done
done
if is_mounted "$BENCH_DIR/scratch"; then
    umount "$BENCH_DIR/scratch" || die "cannot unmount an earlier run's $BENCH_DIR/scratch"
fi
rm -f -- "$BENCH_DIR/scratch.img"
# Trees of an earlier run are deleted, and then the run waits 31 s: ext4 without a journal
# skips inodes freed in the last 30 s when it allocates new ones, which slows down creating
# many files right after deleting many (by 2-10x here). For the same reason the run moves
# the trees it replaces between repetitions aside (into retired/) instead of deleting them.
leftovers=0
for d in "${CASES[@]}" rsync retired; do
    [[ -e $BENCH_DIR/$d ]] && leftovers=1
    rm -rf -- "${BENCH_DIR:?}/$d"
done

# Disk: the reconnection tree four times (A, B, rsync's source and target), the initial tree
# three times and two or three times more per repetition (retired copies), 4 KiB blocks per
# file, plus room for the peers' state.
avail_mib=$(($(df --output=avail -k "$BENCH_DIR" | tail -n 1) / 1024))
need_mib=$(((TREE_DIRS * 100 * 4 + FILES * (3 + (2 + RSYNC_FSYNC) * REPS)) * 4 / 1024 + 2048))
((avail_mib >= need_mib)) || die "$BENCH_DIR has $avail_mib MiB free; this run needs about $need_mib MiB"

if [[ $LOOP == 1 ]]; then
    # Twice the estimate: ext4's own metadata, and inodes (one per 16 KiB by default).
    truncate -s "$((need_mib * 2))M" "$BENCH_DIR/scratch.img"
    mkfs.ext4 -q -F -i 4096 "$BENCH_DIR/scratch.img" >&2
    mkdir -p "$BENCH_DIR/scratch"
    mount -o loop "$BENCH_DIR/scratch.img" "$BENCH_DIR/scratch" ||
        die "cannot loop-mount $BENCH_DIR/scratch.img (or set RECON_LOOP=0)"
    WORK=$BENCH_DIR/scratch
elif ((leftovers)); then
    echo "deleted an earlier run's trees; waiting 61 s (ext4 without a journal skips inodes freed in the last minute)..." >&2
    sync
    sleep 61
fi
mkdir -p "$WORK/rsync/dst"
export RECON_RETIRED=$WORK

# ---------------------------------------------------------------- rsync daemon

RSYNC_PORT=$(python3 "$PY" ports 1)
cat >"$WORK/rsync/rsyncd.conf" <<EOF
use chroot = no
log file = $WORK/rsync/rsyncd.log
pid file = $WORK/rsync/rsyncd.pid

[bench]
path = $WORK/rsync/dst
read only = false
uid = root
gid = root
EOF
rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNC_PORT" \
    --config="$WORK/rsync/rsyncd.conf" >&2 9>&- &
RSYNCD_PID=$!
deadline=$((SECONDS + 10))
until rsync "rsync://127.0.0.1:$RSYNC_PORT/" >/dev/null 2>&1; do
    kill -0 "$RSYNCD_PID" 2>/dev/null || die "the rsync daemon exited (log: $WORK/rsync/rsyncd.log)"
    ((SECONDS < deadline)) || die "the rsync daemon does not answer on 127.0.0.1:$RSYNC_PORT"
    sleep 0.1
done

# ---------------------------------------------------------------- measure

FS_NOTE="$(findmnt -n -o FSTYPE --target "$WORK") ($WORK)"
[[ $LOOP == 1 ]] && FS_NOTE+=", a fresh file system with a journal in a loop-mounted image"
echo "measuring: initial sync of $FILES files, reconnection in a $((TREE_DIRS * 100))-file tree, $REPS repetitions..." >&2
# In the background and waited for, so that Ctrl-C or SIGTERM reaches the trap at once.
python3 "$PY" measure --peerfs "$PEERFS" --dir "$WORK" \
    --rsync-url "rsync://127.0.0.1:$RSYNC_PORT/bench/" \
    --reps "$REPS" --files "$FILES" --tree-dirs "$TREE_DIRS" "${FLAT_ARG[@]}" "${FSYNC_ARG[@]}" \
    --cases "${RUN_CASES[@]}" --timeout "$TIMEOUT" \
    --log-level "$LOG_LEVEL" --command "$COMMAND" \
    --note "peerfs $REV (release build); peers A and B on 127.0.0.1 (pinned TLS 1.3), every [locks], [network], [drive] and [replication] key at its default. $(rsync --version | head -n 1 | sed 's/  */ /g'), daemon on 127.0.0.1, \`rsync -a --stats\`. Backing folders and rsync's folders on $FS_NOTE." \
    --markdown "$BENCH_DIR/reconcile.md" --json "$BENCH_DIR/reconcile.json" &
MEASURE_PID=$!
wait "$MEASURE_PID"
