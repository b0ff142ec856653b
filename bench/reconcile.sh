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
#   KEEP=1           keep the folders, configs and logs in RECON_BENCH_DIR afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export LC_ALL=C
COMMAND=""
for v in RECON_BENCH_DIR RECON_REPS RECON_FILES BIG RECON_FLAT RECON_CASES RECON_TIMEOUT \
    RECON_LOG_LEVEL; do
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
read -r -a RUN_CASES <<<"$RUN_CASES"
((${#RUN_CASES[@]} > 0)) || die "RECON_CASES is empty"
for c in "${RUN_CASES[@]}"; do
    [[ $c == initial || $c == reconnect ]] || die "RECON_CASES: unknown case $c"
done
FLAT_ARG=()
[[ $FLAT == 1 ]] && FLAT_ARG=(--flat)
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
# $BENCH_DIR/{initial,reconnect}/{a,b}/{backing,mnt,state,peerfs.toml}; rsync: $BENCH_DIR/rsync/.
CASES=(initial reconnect)
MEASURE_PID=""
RSYNCD_PID=""

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
            m=$BENCH_DIR/$c/$p/mnt
            is_mounted "$m" || continue
            timeout 60 "$PEERFS" unmount "$m" >&2
            is_mounted "$m" && umount -l "$m"
        done
    done
    if [[ "${KEEP:-0}" != 1 ]]; then
        for c in "${CASES[@]}"; do
            if ! is_mounted "$BENCH_DIR/$c/a/mnt" && ! is_mounted "$BENCH_DIR/$c/b/mnt"; then
                rm -rf -- "${BENCH_DIR:?}/$c"
            fi
        done
        rm -rf -- "${BENCH_DIR:?}/rsync"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
# One run per scratch directory: a second one would delete the first one's trees under it.
exec 9>"$BENCH_DIR/.lock"
flock -n 9 || die "another bench/reconcile.sh is using $BENCH_DIR (set RECON_BENCH_DIR to another folder)"
for c in "${CASES[@]}"; do
    for p in a b; do
        is_mounted "$BENCH_DIR/$c/$p/mnt" &&
            die "$BENCH_DIR/$c/$p/mnt is still mounted (an earlier run?): unmount it first"
    done
    rm -rf -- "${BENCH_DIR:?}/$c"
done
rm -rf -- "${BENCH_DIR:?}/rsync"
mkdir -p "$BENCH_DIR/rsync/dst"

# Disk: the reconnection tree four times (A, B, rsync's source and target), the initial tree
# three times, 4 KiB blocks per file, plus room for the peers' state.
avail_mib=$(($(df --output=avail -k "$BENCH_DIR" | tail -n 1) / 1024))
need_mib=$(((TREE_DIRS * 100 * 4 + FILES * 3) * 4 / 1024 + 2048))
((avail_mib >= need_mib)) || die "$BENCH_DIR has $avail_mib MiB free; this run needs about $need_mib MiB"

# ---------------------------------------------------------------- rsync daemon

RSYNC_PORT=$(python3 "$PY" ports 1)
cat >"$BENCH_DIR/rsync/rsyncd.conf" <<EOF
use chroot = no
log file = $BENCH_DIR/rsync/rsyncd.log
pid file = $BENCH_DIR/rsync/rsyncd.pid

[bench]
path = $BENCH_DIR/rsync/dst
read only = false
uid = root
gid = root
EOF
rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNC_PORT" \
    --config="$BENCH_DIR/rsync/rsyncd.conf" >&2 9>&- &
RSYNCD_PID=$!
deadline=$((SECONDS + 10))
until rsync "rsync://127.0.0.1:$RSYNC_PORT/" >/dev/null 2>&1; do
    kill -0 "$RSYNCD_PID" 2>/dev/null || die "the rsync daemon exited (log: $BENCH_DIR/rsync/rsyncd.log)"
    ((SECONDS < deadline)) || die "the rsync daemon does not answer on 127.0.0.1:$RSYNC_PORT"
    sleep 0.1
done

# ---------------------------------------------------------------- measure

FS=$(findmnt -n -o FSTYPE --target "$BENCH_DIR")
echo "measuring: initial sync of $FILES files, reconnection in a $((TREE_DIRS * 100))-file tree, $REPS repetitions..." >&2
# In the background and waited for, so that Ctrl-C or SIGTERM reaches the trap at once.
python3 "$PY" measure --peerfs "$PEERFS" --dir "$BENCH_DIR" \
    --rsync-url "rsync://127.0.0.1:$RSYNC_PORT/bench/" \
    --reps "$REPS" --files "$FILES" --tree-dirs "$TREE_DIRS" "${FLAT_ARG[@]}" \
    --cases "${RUN_CASES[@]}" --timeout "$TIMEOUT" \
    --log-level "$LOG_LEVEL" --command "$COMMAND" \
    --note "peerfs $REV (release build); peers A and B on 127.0.0.1 (pinned TLS 1.3), every [locks], [network], [drive] and [replication] key at its default. $(rsync --version | head -n 1 | sed 's/  */ /g'), daemon on 127.0.0.1, \`rsync -a --stats\`. Backing folders and rsync's folders on $FS ($BENCH_DIR)." \
    --markdown "$BENCH_DIR/reconcile.md" --json "$BENCH_DIR/reconcile.json" &
MEASURE_PID=$!
wait "$MEASURE_PID"
