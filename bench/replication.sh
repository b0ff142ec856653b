#!/usr/bin/env bash
# Replication benchmark: what a change costs on the wire and how long until the other peer has
# it, for peerfs and, side by side in the same run, for rsync (Debian's rsync, default delta
# algorithm, to an rsync daemon). One run sets up, all on loopback:
#   peerfs  peers A and B, real release daemons (`peerfs mount --daemon`), pinned TLS
#   rsync   an rsync daemon with one module; `rsync -a --stats` from a plain source folder
# then makes the same edits to a 256 MiB file on A's drive and in rsync's source folder, and
# times a new 4 KiB file on A's drive until B has it. BIG=1 adds a 4 GiB file and B's peak RSS.
# See bench/README.md ("Replication"). Needs root (mounts).
#
# Environment:
#   REPL_BENCH_DIR  scratch directory, on a real disk (default /var/tmp/peerfs-repl-bench)
#   PEERFS_BIN      peerfs binary (default: build target/release/peerfs)
#   REPL_SIZE_MIB   size of the big file in MiB (default 256); (a) edits its middle, (e) cuts
#                   its last quarter
#   REPL_REPS       repetitions of the whole edit sequence; medians are reported (default 3)
#   REPL_SMALL      new 4 KiB files timed (default 50)
#   REPL_POLL_MS    how often B's backing file is polled, in ms (default 2)
#   REPL_LOG_LEVEL  log_level of the peers (default info)
#   BIG=1           also replicate a BIG_MIB file A->B and sample the daemons' RSS
#   BIG_MIB         size of that file in MiB (default 4096)
#   KEEP=1          keep the folders, configs and logs in REPL_BENCH_DIR afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export LC_ALL=C
COMMAND=""
for v in REPL_BENCH_DIR REPL_SIZE_MIB REPL_REPS REPL_SMALL REPL_POLL_MS REPL_LOG_LEVEL BIG BIG_MIB; do
    if [[ -n "${!v:-}" ]]; then
        COMMAND+="$v=$(printf '%q' "${!v}") "
    fi
done
COMMAND+="bench/replication.sh"
BENCH_DIR=${REPL_BENCH_DIR:-/var/tmp/peerfs-repl-bench}
SIZE_MIB=${REPL_SIZE_MIB:-256}
REPS=${REPL_REPS:-3}
SMALL=${REPL_SMALL:-50}
POLL_MS=${REPL_POLL_MS:-2}
LOG_LEVEL=${REPL_LOG_LEVEL:-info}
BIG=${BIG:-0}
BIG_MIB=${BIG_MIB:-4096}
PY=$ROOT/bench/replication.py
LOCKPY=$ROOT/bench/lock_latency.py

die() {
    echo "bench: error: $*" >&2
    exit 2
}

[[ $(id -u) -eq 0 ]] || die "must run as root (FUSE mounts with allow_other)"
for tool in python3 findmnt mountpoint timeout ss df sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
command -v rsync >/dev/null || die "rsync not found (apt-get install -y rsync)"
[[ -e /dev/fuse ]] || die "/dev/fuse not found (modprobe fuse)"
for v in SIZE_MIB REPS SMALL BIG_MIB; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
[[ $POLL_MS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "REPL_POLL_MS must be a number"
((SIZE_MIB >= 128)) || die "REPL_SIZE_MIB must be at least 128 (the edits need room)"
[[ $BIG == 0 || $BIG == 1 ]] || die "BIG must be 0 or 1"

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

# Peers a and b: $BENCH_DIR/{a,b}/{backing,mnt,state,peerfs.toml}; rsync: $BENCH_DIR/rsync/.
PEERS=(a b)
MOUNTED=()
MEASURE_PID=""
RSYNCD_PID=""

is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

cleanup() {
    local rc=$? p m
    set +e
    if [[ -n $MEASURE_PID ]] && kill -0 "$MEASURE_PID" 2>/dev/null; then
        kill "$MEASURE_PID"
        wait "$MEASURE_PID" 2>/dev/null
    fi
    if [[ -n $RSYNCD_PID ]] && kill -0 "$RSYNCD_PID" 2>/dev/null; then
        kill "$RSYNCD_PID"
        wait "$RSYNCD_PID" 2>/dev/null
    fi
    for p in "${MOUNTED[@]}"; do
        m=$BENCH_DIR/$p/mnt
        is_mounted "$m" || continue
        timeout 60 "$PEERFS" unmount "$m" >&2
        is_mounted "$m" && umount -l "$m"
    done
    if ((rc != 0 && rc != 130)); then
        for p in "${MOUNTED[@]}"; do
            [[ -s $BENCH_DIR/$p/state/peerfs.log ]] || continue
            echo "--- last lines of $p's log:" >&2
            tail -n 10 "$BENCH_DIR/$p/state/peerfs.log" >&2
        done
    fi
    if [[ "${KEEP:-0}" != 1 ]]; then
        for p in "${PEERS[@]}"; do
            [[ -d $BENCH_DIR/$p ]] && ! is_mounted "$BENCH_DIR/$p/mnt" && rm -rf -- "${BENCH_DIR:?}/$p"
        done
        rm -rf -- "${BENCH_DIR:?}/rsync"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
for p in "${PEERS[@]}"; do
    is_mounted "$BENCH_DIR/$p/mnt" && die "$BENCH_DIR/$p/mnt is still mounted (an earlier run?): unmount it first"
done
for p in "${PEERS[@]}"; do
    rm -rf -- "${BENCH_DIR:?}/$p"
    mkdir -p "$BENCH_DIR/$p/backing" "$BENCH_DIR/$p/mnt"
done
rm -rf -- "${BENCH_DIR:?}/rsync"
mkdir -p "$BENCH_DIR/rsync/src" "$BENCH_DIR/rsync/dst"

# Disk: the big file lives on A, on B and in rsync's source and target, plus one rebuild each;
# B's trash keeps each repetition's file.
avail_mib=$(($(df --output=avail -k "$BENCH_DIR" | tail -n 1) / 1024))
need_mib=$((SIZE_MIB * (6 + REPS) + 1024))
((avail_mib >= need_mib)) || die "$BENCH_DIR has $avail_mib MiB free; this run needs about $need_mib MiB"
BIG_NOTE=""
if [[ $BIG == 1 ]]; then
    # A's copy, B's rebuild (then its copy), and the trash on B after the deletion.
    big_need=$((BIG_MIB * 3 + need_mib))
    if ((avail_mib < big_need)); then
        BIG=0
        BIG_NOTE="BIG=1 skipped: $BENCH_DIR has $avail_mib MiB free, the ${BIG_MIB} MiB test needs about $big_need MiB."
        echo "bench: $BIG_NOTE" >&2
    fi
fi

# ---------------------------------------------------------------- identities, configs, mounts

declare -A ID PORT
read -r -a FREE <<<"$(python3 "$LOCKPY" ports 3)"
PORT[a]=${FREE[0]}
PORT[b]=${FREE[1]}
RSYNC_PORT=${FREE[2]}
for p in "${PEERS[@]}"; do
    ID[$p]=$("$PEERFS" init --state "$BENCH_DIR/$p/state" --name "peer-$p" | tail -n 1)
    [[ -n ${ID[$p]} ]] || die "peerfs init printed no peer id for $p"
done

# write_config NAME OTHER: peer NAME's config, listing peer OTHER. Every key not written here
# ([locks], [network], [drive], [files]) keeps its default.
write_config() {
    cat >"$BENCH_DIR/$1/peerfs.toml" <<EOF
name = "peer-$1"
backing = "$BENCH_DIR/$1/backing"
mountpoint = "$BENCH_DIR/$1/mnt"
state = "$BENCH_DIR/$1/state"
log_level = "$LOG_LEVEL"
listen = "127.0.0.1:${PORT[$1]}"

[[peers]]
name = "peer-$2"
id = "${ID[$2]}"
address = "127.0.0.1:${PORT[$2]}"
EOF
}
write_config a b
write_config b a

for p in "${PEERS[@]}"; do
    MOUNTED+=("$p")
    timeout 60 "$PEERFS" mount --config "$BENCH_DIR/$p/peerfs.toml" --daemon >&2 ||
        die "peerfs mount of $p failed (log: $BENCH_DIR/$p/state/peerfs.log)"
    [[ "$(findmnt -n -o FSTYPE --mountpoint "$BENCH_DIR/$p/mnt")" == fuse.peerfs ]] ||
        die "peerfs mount did not appear at $BENCH_DIR/$p/mnt"
done

echo "waiting for the peers to connect..." >&2
deadline=$((SECONDS + 30))
for p in "${PEERS[@]}"; do
    until timeout 10 "$PEERFS" status --config "$BENCH_DIR/$p/peerfs.toml" --json 2>/dev/null |
        python3 "$LOCKPY" connected >/dev/null; do
        ((SECONDS < deadline)) || die "$p: peer not connected after 30 s ($PEERFS status --config $BENCH_DIR/$p/peerfs.toml)"
        sleep 0.2
    done
done

# ---------------------------------------------------------------- rsync daemon

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
    --config="$BENCH_DIR/rsync/rsyncd.conf" >&2 &
RSYNCD_PID=$!
deadline=$((SECONDS + 10))
until rsync "rsync://127.0.0.1:$RSYNC_PORT/" >/dev/null 2>&1; do
    kill -0 "$RSYNCD_PID" 2>/dev/null || die "the rsync daemon exited (log: $BENCH_DIR/rsync/rsyncd.log)"
    ((SECONDS < deadline)) || die "the rsync daemon does not answer on 127.0.0.1:$RSYNC_PORT"
    sleep 0.1
done

# ---------------------------------------------------------------- measure

FS=$(findmnt -n -o FSTYPE --target "$BENCH_DIR")
ARGS=(--size-mib "$SIZE_MIB" --reps "$REPS" --small "$SMALL" --poll-ms "$POLL_MS")
if [[ $BIG == 1 ]]; then
    ARGS+=(--big-mib "$BIG_MIB")
fi
if [[ -n $BIG_NOTE ]]; then
    ARGS+=(--note "$BIG_NOTE")
fi

echo "measuring: $REPS repetitions of the edit sequence on a $SIZE_MIB MiB file, $SMALL small files..." >&2
# In the background and waited for, so that Ctrl-C or SIGTERM reaches the trap at once.
python3 "$PY" measure "${ARGS[@]}" \
    --peerfs "$PEERFS" --dir "$BENCH_DIR" \
    --rsync-url "rsync://127.0.0.1:$RSYNC_PORT/bench/" \
    --command "$COMMAND" \
    --note "peerfs $REV (release build); peers A and B on 127.0.0.1 (pinned TLS 1.3), every [locks], [network] and [drive] key at its default (linger 1 s, heartbeat 1 s, passthrough on). $(rsync --version | head -n 1 | sed 's/  */ /g'), daemon on 127.0.0.1, \`rsync -a --stats\`. Backing folders and rsync's folders on $FS ($BENCH_DIR)." \
    --markdown "$BENCH_DIR/replication.md" --json "$BENCH_DIR/replication.json" &
MEASURE_PID=$!
wait "$MEASURE_PID"
