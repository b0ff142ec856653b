#!/usr/bin/env bash
# Lock latency benchmark: what the distributed lock adds to open(O_RDWR) + close() through the
# drive. One run mounts three setups side by side on loopback, all real `peerfs` daemons:
#   lone   a drive with no peers (no networking, no lock)
#   duo    peers A and B;      measured on A (1 other peer)
#   trio   peers A, B and C;   measured on A (2 other peers)
# and times, beside them, the same opens on the lone drive's backing folder directly.
# See bench/README.md ("Lock latency"). Needs root (mounts).
#
# Environment:
#   LOCK_BENCH_DIR  scratch directory (default /var/tmp/peerfs-lock-bench)
#   PEERFS_BIN      peerfs binary (default: build target/release/peerfs)
#   LOCK_FILES      case 1: files opened once each, per target (default 2000)
#   LOCK_REOPENS    case 2: open+close of one file, per target (default 5000)
#   LOCK_ROUNDS     rounds that rotate the order of the targets (default 5)
#   LOCK_LINGER     [locks] linger of the peers (default 1s, the built-in default)
#   LOCK_SETTLE     seconds of pause before each target's segment (default 1.5)
#   KEEP=1          keep the data, configs and logs in LOCK_BENCH_DIR afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export LC_ALL=C
COMMAND=""
for v in LOCK_BENCH_DIR LOCK_FILES LOCK_REOPENS LOCK_ROUNDS LOCK_LINGER LOCK_SETTLE; do
    if [[ -n "${!v:-}" ]]; then
        COMMAND+="$v=$(printf '%q' "${!v}") "
    fi
done
COMMAND+="bench/locks.sh"
BENCH_DIR=${LOCK_BENCH_DIR:-/var/tmp/peerfs-lock-bench}
FILES=${LOCK_FILES:-2000}
REOPENS=${LOCK_REOPENS:-5000}
ROUNDS=${LOCK_ROUNDS:-5}
LINGER=${LOCK_LINGER:-1s}
SETTLE=${LOCK_SETTLE:-1.5}
PY=$ROOT/bench/lock_latency.py

die() {
    echo "bench: error: $*" >&2
    exit 2
}

[[ $(id -u) -eq 0 ]] || die "must run as root (FUSE mounts with allow_other)"
for tool in python3 findmnt mountpoint timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
for v in FILES REOPENS ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "LOCK_$v must be a positive integer"
done

if [[ -n "${PEERFS_BIN:-}" ]]; then
    PEERFS=$PEERFS_BIN
else
    echo "building peerfs (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p peerfs-cli) >&2
    PEERFS=${CARGO_TARGET_DIR:-$ROOT/target}/release/peerfs
fi
[[ -x "$PEERFS" ]] || die "no peerfs binary at $PEERFS"

# ---------------------------------------------------------------- layout, cleanup

# Every peer is a folder $BENCH_DIR/NAME with backing/, mnt/, state/ and peerfs.toml.
DRIVES=(lone duo-a duo-b trio-a trio-b trio-c)
MOUNTED=()
MEASURE_PID=""

is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

cleanup() {
    local rc=$? p m
    set +e
    if [[ -n $MEASURE_PID ]] && kill -0 "$MEASURE_PID" 2>/dev/null; then
        kill "$MEASURE_PID"
        wait "$MEASURE_PID" 2>/dev/null
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
            tail -n 5 "$BENCH_DIR/$p/state/peerfs.log" >&2
        done
    fi
    if [[ "${KEEP:-0}" != 1 ]]; then
        for p in "${DRIVES[@]}"; do
            [[ -d $BENCH_DIR/$p ]] && ! is_mounted "$BENCH_DIR/$p/mnt" && rm -rf -- "${BENCH_DIR:?}/$p"
        done
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
for p in "${DRIVES[@]}"; do
    is_mounted "$BENCH_DIR/$p/mnt" && die "$BENCH_DIR/$p/mnt is still mounted (an earlier run?): unmount it first"
done
for p in "${DRIVES[@]}"; do
    rm -rf -- "${BENCH_DIR:?}/$p"
    mkdir -p "$BENCH_DIR/$p/backing" "$BENCH_DIR/$p/mnt"
done

# ---------------------------------------------------------------- identities and configs

declare -A ID PORT
read -r -a FREE <<<"$(python3 "$PY" ports 5)"
i=0
for p in "${DRIVES[@]:1}"; do
    ID[$p]=$("$PEERFS" init --state "$BENCH_DIR/$p/state" --name "$p" | tail -n 1)
    [[ -n ${ID[$p]} ]] || die "peerfs init printed no peer id for $p"
    PORT[$p]=${FREE[i]}
    i=$((i + 1))
done

# write_config NAME [OTHER...]: the config of peer NAME, listing the OTHER peers.
write_config() {
    local p=$1 o
    shift
    {
        cat <<EOF
name = "$p"
backing = "$BENCH_DIR/$p/backing"
mountpoint = "$BENCH_DIR/$p/mnt"
state = "$BENCH_DIR/$p/state"
log_level = "warn"
EOF
        if [[ $p != lone ]]; then
            cat <<EOF
listen = "127.0.0.1:${PORT[$p]}"

[locks]
linger = "$LINGER"
EOF
        fi
        for o in "$@"; do
            cat <<EOF

[[peers]]
name = "$o"
id = "${ID[$o]}"
address = "127.0.0.1:${PORT[$o]}"
EOF
        done
    } >"$BENCH_DIR/$p/peerfs.toml"
}
write_config lone
write_config duo-a duo-b
write_config duo-b duo-a
write_config trio-a trio-b trio-c
write_config trio-b trio-a trio-c
write_config trio-c trio-a trio-b

# The files, made before the drives start (never behind a mounted drive's back): the drives
# measured (lone, duo-a, trio-a) and the plain baseline in lone's backing folder.
echo "creating $FILES files in each of 4 folders..." >&2
for d in lone/backing/direct lone/backing/bench duo-a/backing/bench trio-a/backing/bench; do
    python3 "$PY" prepare "$BENCH_DIR/$d" "$FILES"
done

# ---------------------------------------------------------------- mounts

for p in "${DRIVES[@]}"; do
    MOUNTED+=("$p")
    timeout 60 "$PEERFS" mount --config "$BENCH_DIR/$p/peerfs.toml" --daemon >&2 ||
        die "peerfs mount of $p failed (log: $BENCH_DIR/$p/state/peerfs.log)"
    [[ "$(findmnt -n -o FSTYPE --mountpoint "$BENCH_DIR/$p/mnt")" == fuse.peerfs ]] ||
        die "peerfs mount did not appear at $BENCH_DIR/$p/mnt"
done

# Every networked peer must report all its peers connected.
echo "waiting for the peers to connect..." >&2
deadline=$((SECONDS + 30))
RTT=()
for p in "${DRIVES[@]:1}"; do
    until out=$(timeout 10 "$PEERFS" status --config "$BENCH_DIR/$p/peerfs.toml" --json 2>/dev/null |
        python3 "$PY" connected); do
        ((SECONDS < deadline)) || die "$p: peers not connected after 30 s ($PEERFS status --config $BENCH_DIR/$p/peerfs.toml)"
        sleep 0.2
    done
    RTT+=("$p: $out")
done
echo "connected (rtt_ms as status reports it): ${RTT[*]}" >&2

# ---------------------------------------------------------------- measure

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]]; then
    REV+=" + uncommitted changes"
fi
FS=$(findmnt -n -o FSTYPE --target "$BENCH_DIR")

echo "measuring: $ROUNDS rounds, $FILES first opens and $REOPENS re-opens per target..." >&2
# In the background and waited for, so that Ctrl-C or SIGTERM reaches the trap at once.
python3 "$PY" measure --files "$FILES" --reopens "$REOPENS" --rounds "$ROUNDS" \
    --settle "$SETTLE" --command "$COMMAND" \
    --others 0 --others 1 --others 2 \
    --note "peerfs $REV, release build, [drive] defaults (passthrough, 4 FUSE threads, cache_ttl 1s); peers on 127.0.0.1 over TLS, [locks] linger = \"$LINGER\", other [locks]/[network] keys default. Backing folders on $FS ($BENCH_DIR). \"backing\" is the lone drive's backing folder opened directly; \"lone\" the drive without peers; \"1 peer\"/\"2 peers\" peer A of the duo/trio." \
    --markdown "$BENCH_DIR/lock-latency.md" --json "$BENCH_DIR/lock-latency.json" \
    "backing=$BENCH_DIR/lone/backing/direct" \
    "lone=$BENCH_DIR/lone/mnt/bench" \
    "1 peer=$BENCH_DIR/duo-a/mnt/bench" \
    "2 peers=$BENCH_DIR/trio-a/mnt/bench" &
MEASURE_PID=$!
wait "$MEASURE_PID"
