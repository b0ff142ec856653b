#!/usr/bin/env bash
# Side-by-side benchmark: a native folder, a peerfs mount and a bindfs mount, all three on
# the same backing filesystem. See bench/README.md. Needs root (mounts, drop_caches).
#
# Environment:
#   BENCH_DIR           scratch directory on the filesystem under test (default /var/tmp/peerfs-bench)
#   BENCH_TARGETS       subset of "native peerfs bindfs" (native is always run: ratios need it)
#   PEERFS_BIN          peerfs binary (default: build target/release/peerfs)
#   PEERFS_PASSTHROUGH  1 (default): [drive] passthrough = true; 0: false (daemon I/O path)
#   PEERFS_DRIVE_TOML   extra lines for the peerfs [drive] table, e.g. 'threads = 8'
#   SEQ_SIZE            sequential file size (default 1G)
#   RAND_SIZE           random I/O file size (default 256M)
#   RAND_RUNTIME        seconds per random I/O test (default 30)
#   BENCH_WORKLOADS     subset of "fio metadata" (default both)
#   FIO_RUNS            repetitions of the fio tests, the median is reported (default 1)
#   META_RUNS           metadata workload repetitions, the median is reported (default 3)
#   TREE_DIRS, TREE_FILES  metadata tree shape (default 400 directories x 20 files)
#   KEEP=1              keep the data in BENCH_DIR afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export LC_ALL=C
COMMAND=""
for v in BENCH_DIR BENCH_TARGETS BENCH_WORKLOADS PEERFS_PASSTHROUGH PEERFS_DRIVE_TOML SEQ_SIZE RAND_SIZE \
    RAND_RUNTIME FIO_RUNS META_RUNS TREE_DIRS TREE_FILES; do
    if [[ -n "${!v:-}" ]]; then
        COMMAND+="$v=$(printf '%q' "${!v}") "
    fi
done
COMMAND+="bench/run.sh"
BENCH_DIR=${BENCH_DIR:-/var/tmp/peerfs-bench}
SEQ_SIZE=${SEQ_SIZE:-1G}
RAND_SIZE=${RAND_SIZE:-256M}
RAND_RUNTIME=${RAND_RUNTIME:-30}
META_RUNS=${META_RUNS:-3}
FIO_RUNS=${FIO_RUNS:-1}
TREE_DIRS=${TREE_DIRS:-400}
TREE_FILES=${TREE_FILES:-20}
PEERFS_PASSTHROUGH=${PEERFS_PASSTHROUGH:-1}
read -r -a REQUESTED <<<"${BENCH_TARGETS:-native peerfs bindfs}"
WORKLOADS=" ${BENCH_WORKLOADS:-fio metadata} "
[[ $WORKLOADS == *" fio "* ]] || FIO_RUNS=0
[[ $WORKLOADS == *" metadata "* ]] || META_RUNS=0

die() {
    echo "bench: error: $*" >&2
    exit 2
}

[[ $(id -u) -eq 0 ]] || die "must run as root (mounts and /proc/sys/vm/drop_caches)"
for tool in fio tar perl findmnt mountpoint timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

TARGETS=(native)
for t in "${REQUESTED[@]}"; do
    case $t in
        native) ;;
        peerfs | bindfs) TARGETS+=("$t") ;;
        *) die "unknown target $t (native, peerfs, bindfs)" ;;
    esac
done
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

case $PEERFS_PASSTHROUGH in
    1 | true) PASSTHROUGH=true PEERFS_LABEL="peerfs" ;;
    0 | false) PASSTHROUGH=false PEERFS_LABEL="peerfs (daemon I/O)" ;;
    *) die "PEERFS_PASSTHROUGH must be 0 or 1" ;;
esac

if has_target peerfs; then
    if [[ -n "${PEERFS_BIN:-}" ]]; then
        PEERFS=$PEERFS_BIN
    else
        echo "building peerfs (release)..." >&2
        (cd "$ROOT" && cargo build --release -q -p peerfs-cli) >&2
        PEERFS=${CARGO_TARGET_DIR:-$ROOT/target}/release/peerfs
    fi
    [[ -x "$PEERFS" ]] || die "no peerfs binary at $PEERFS"
fi
if has_target bindfs; then
    command -v bindfs >/dev/null || die "bindfs not found (apt-get install bindfs)"
fi

# ---------------------------------------------------------------- layout, mounts, cleanup

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
declare -A DIR
DIR[native]=$BENCH_DIR/native
DIR[peerfs]=$BENCH_DIR/peerfs/mnt
DIR[bindfs]=$BENCH_DIR/bindfs/mnt
MOUNTED=()

is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

cleanup() {
    local rc=$? m
    set +e
    for m in "${MOUNTED[@]}"; do
        is_mounted "$m" || continue
        if [[ $m == "${DIR[peerfs]}" ]]; then
            timeout 60 "$PEERFS" unmount "$m" >&2
        else
            fusermount3 -u "$m" 2>/dev/null || umount "$m"
        fi
        is_mounted "$m" && umount -l "$m"
    done
    if [[ "${KEEP:-0}" != 1 ]]; then
        local d
        for d in "$BENCH_DIR/native" "$BENCH_DIR/peerfs/backing" "$BENCH_DIR/bindfs/backing"; do
            [[ -d $d ]] && find "$d" -mindepth 1 -xdev -delete
        done
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for d in "${DIR[peerfs]}" "${DIR[bindfs]}"; do
    is_mounted "$d" && die "$d is still mounted (an earlier run?): unmount it first"
done
mkdir -p "$BENCH_DIR/native" "$BENCH_DIR/peerfs/backing" "$BENCH_DIR/peerfs/mnt" \
    "$BENCH_DIR/peerfs/state" "$BENCH_DIR/bindfs/backing" "$BENCH_DIR/bindfs/mnt"
for d in "$BENCH_DIR/native" "$BENCH_DIR/peerfs/backing" "$BENCH_DIR/bindfs/backing"; do
    find "$d" -mindepth 1 -xdev -delete
done

# The small-file tree, generated once and reused (deterministic).
TARBALL=$BENCH_DIR/tree-${TREE_DIRS}x${TREE_FILES}.tar
if [[ ! -f $TARBALL ]]; then
    echo "generating $TARBALL..." >&2
    gen=$(mktemp -d "$BENCH_DIR/gen.XXXXXX")
    (umask 022 && perl "$ROOT/bench/mktree.pl" "$gen" "$TREE_DIRS" "$TREE_FILES")
    tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner \
        --format=gnu -cf "$TARBALL.tmp" -C "$gen" tree
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$gen"
fi
TREE_COUNT=$(tar -tf "$TARBALL" | grep -cv '/$')

if has_target peerfs; then
    cat >"$BENCH_DIR/peerfs/peerfs.toml" <<EOF
name = "bench"
backing = "$BENCH_DIR/peerfs/backing"
mountpoint = "$BENCH_DIR/peerfs/mnt"
state = "$BENCH_DIR/peerfs/state"
log_level = "warn"

[drive]
passthrough = $PASSTHROUGH
${PEERFS_DRIVE_TOML:-}
EOF
    MOUNTED+=("${DIR[peerfs]}")
    timeout 60 "$PEERFS" mount --config "$BENCH_DIR/peerfs/peerfs.toml" --daemon >&2 ||
        die "peerfs mount failed (log: $BENCH_DIR/peerfs/state/peerfs.log)"
    [[ "$(findmnt -n -o FSTYPE --mountpoint "${DIR[peerfs]}")" == fuse.peerfs ]] ||
        die "peerfs mount did not appear at ${DIR[peerfs]}"
fi
if has_target bindfs; then
    MOUNTED+=("${DIR[bindfs]}")
    bindfs "$BENCH_DIR/bindfs/backing" "${DIR[bindfs]}"
fi

# ---------------------------------------------------------------- helpers

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# fio_job TARGET OUTPUT_FIELD FIO_ARGS...: run one fio job in TARGET's directory and print
# one field of its terse (v3) output: 7/8 read KiB/s/IOPS, 48/49 write KiB/s/IOPS.
fio_job() {
    local target=$1 field=$2 out
    shift 2
    out=$(cd "${DIR[$target]}" && fio --minimal --ioengine=psync --direct=0 --fallocate=none \
        --randrepeat=1 "$@") || die "fio failed on $target: $*"
    awk -F';' -v f="$field" 'NR == 1 { print $f }' <<<"$out"
}

# peerfs_counter NAME: a counter from `peerfs status --json`, or "" if unavailable.
peerfs_counter() {
    has_target peerfs || return 0
    timeout 10 "$PEERFS" status --config "$BENCH_DIR/peerfs/peerfs.toml" --json 2>/dev/null |
        grep -o "\"$1\"[[:space:]]*:[[:space:]]*[0-9]*" | grep -o '[0-9]*$' | head -n 1 || true
}

# rotate RUN: ORDER = TARGETS rotated by RUN-1, so that no target always goes first (the
# first one after a deletion pays for the disk's discards and the host's writeback).
rotate() {
    local n=${#TARGETS[@]} i
    ORDER=()
    for ((i = 0; i < n; i++)); do
        ORDER+=("${TARGETS[(i + $1 - 1) % n]}")
    done
}

progress() { printf '  %-26s %-8s %s\n' "$1" "$2" "$3" >&2; }

# ---------------------------------------------------------------- workloads

echo "targets: ${TARGETS[*]}; scratch: $BENCH_DIR ($(stat -f -c %T "$BENCH_DIR"))" >&2

declare -A SAMPLES # SAMPLES[test:target] = space-separated measurements
add_sample() { SAMPLES[$1]+="$2 "; }
last_sample() {
    local s=${SAMPLES[$1]% }
    echo "${s##* }"
}
median() {
    tr ' ' '\n' | awk 'NF' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) exit; m = int((NR + 1) / 2); print (NR % 2) ? v[m] : (v[m] + v[m + 1]) / 2 }'
}
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

# with_io_note TEST TARGET COMMAND...: run COMMAND; for peerfs, add how many bytes the daemon
# itself read and wrote meanwhile (from `peerfs status --json`) to the notes.
declare -A IO_READ IO_WRITTEN
with_io_note() {
    local test=$1 target=$2 r0 w0 r1 w1
    shift 2
    [[ $target == peerfs ]] || {
        "$@"
        return
    }
    r0=$(peerfs_counter bytes_read)
    w0=$(peerfs_counter bytes_written)
    "$@"
    r1=$(peerfs_counter bytes_read)
    w1=$(peerfs_counter bytes_written)
    if [[ -n $r0 && -n $r1 && -n $w0 && -n $w1 ]]; then
        IO_READ[$test]=$((${IO_READ[$test]:-0} + r1 - r0))
        IO_WRITTEN[$test]=$((${IO_WRITTEN[$test]:-0} + w1 - w0))
    fi
}

seqwrite() {
    drop_caches
    add_sample "seqwrite:$1" "$(kib_to_mib "$(fio_job "$1" 48 --name=seqwrite --filename=seq.dat \
        --rw=write --bs=1M --size="$SEQ_SIZE" --end_fsync=1)")"
}
seqread() {
    drop_caches
    add_sample "seqread:$1" "$(kib_to_mib "$(fio_job "$1" 7 --name=seqread --filename=seq.dat \
        --rw=read --bs=1M --size="$SEQ_SIZE")")"
}
randread() {
    local iops
    iops=$(fio_job "$1" 8 --name=randread --filename=rand.dat --rw=randread --bs=4k \
        --size="$RAND_SIZE" --invalidate=0 --time_based --runtime="$RAND_RUNTIME")
    add_sample "randread:$1" "${iops%%.*}"
}
randwrite() {
    local iops
    iops=$(fio_job "$1" 49 --name=randwrite --filename=rand.dat --rw=randwrite --bs=4k \
        --size="$RAND_SIZE" --invalidate=0 --time_based --runtime="$RAND_RUNTIME" --end_fsync=1)
    add_sample "randwrite:$1" "${iops%%.*}"
}

for ((run = 1; run <= FIO_RUNS; run++)); do
    rotate "$run"
    for t in "${ORDER[@]}"; do
        with_io_note seqwrite "$t" seqwrite "$t"
        progress "seq write $SEQ_SIZE ($run/$FIO_RUNS)" "$t" "$(last_sample "seqwrite:$t") MiB/s"
    done
    for t in "${ORDER[@]}"; do
        with_io_note seqread "$t" seqread "$t"
        progress "seq read $SEQ_SIZE ($run/$FIO_RUNS)" "$t" "$(last_sample "seqread:$t") MiB/s"
        rm -f "${DIR[$t]}/seq.dat"
    done

    # Random I/O on a hot file: laid out, fsynced and read once through the target first.
    for t in "${ORDER[@]}"; do
        fio_job "$t" 48 --name=layout --filename=rand.dat --rw=write --bs=1M \
            --size="$RAND_SIZE" --end_fsync=1 >/dev/null
        cat "${DIR[$t]}/rand.dat" >/dev/null
    done
    for t in "${ORDER[@]}"; do
        with_io_note randread "$t" randread "$t"
        progress "4k rand read, hot ($run/$FIO_RUNS)" "$t" "$(last_sample "randread:$t") IOPS"
    done
    for t in "${ORDER[@]}"; do
        with_io_note randwrite "$t" randwrite "$t"
        progress "4k rand write, hot ($run/$FIO_RUNS)" "$t" "$(last_sample "randwrite:$t") IOPS"
        rm -f "${DIR[$t]}/rand.dat"
    done
done

# Metadata: untar (+sync), find|cat with cold caches, again hot, rm -rf (+sync).
timed() { # timed KEY COMMAND...: run, add the seconds it took to SAMPLES[KEY]
    local key=$1 t0 t1
    shift
    t0=$(now)
    "$@"
    t1=$(now)
    add_sample "$key" "$(elapsed "$t0" "$t1")"
}
untar() { tar -xf "$TARBALL" -C "$1" && sync; }
catall() { find "$1/tree" -type f -print0 | xargs -0 cat >/dev/null; }
rmtree() { rm -rf "$1/tree" && sync; }

for ((run = 1; run <= META_RUNS; run++)); do
    rotate "$run"
    for t in "${ORDER[@]}"; do
        drop_caches
        timed "untar:$t" untar "${DIR[$t]}"
        drop_caches
        timed "catcold:$t" catall "${DIR[$t]}"
        timed "cathot:$t" catall "${DIR[$t]}"
        timed "rm:$t" rmtree "${DIR[$t]}"
        progress "metadata ($run/$META_RUNS)" "$t" "untar $(last_sample "untar:$t") s, cat cold \
$(last_sample "catcold:$t") s, hot $(last_sample "cathot:$t") s, rm $(last_sample "rm:$t") s"
    done
done

declare -A R # R[test:target] = reported value (median)
for t in "${TARGETS[@]}"; do
    for key in seqwrite seqread randread randwrite untar catcold cathot rm; do
        R[$key:$t]=$(median <<<"${SAMPLES[$key:$t]:-}")
    done
    [[ $META_RUNS -gt 0 ]] || continue
    R[metatotal:$t]=$(awk -v a="${R[untar:$t]}" -v b="${R[catcold:$t]}" -v c="${R[cathot:$t]}" \
        -v d="${R[rm:$t]}" 'BEGIN { printf "%.3f", a + b + c + d }')
done

# ---------------------------------------------------------------- report

# test key | label | unit | kind (tp: throughput, higher is better; time: lower is better) | target
ROWS=(
    "seqwrite|seq write $SEQ_SIZE, 1 MiB blocks, end_fsync|MiB/s|tp|>= 0.9"
    "seqread|seq read $SEQ_SIZE, 1 MiB blocks, cold cache|MiB/s|tp|>= 0.9"
    "randread|4 KiB random read, $RAND_SIZE hot file, ${RAND_RUNTIME}s|IOPS|tp|"
    "randwrite|4 KiB random write, $RAND_SIZE hot file, ${RAND_RUNTIME}s|IOPS|tp|"
    "untar|untar $TREE_COUNT files + sync|s|time|"
    "catcold|find + cat, cold cache|s|time|"
    "cathot|find + cat, hot cache|s|time|"
    "rm|rm -rf + sync|s|time|"
    "metatotal|metadata total|s|time|<= 3.0"
)

ratio() { # ratio VALUE NATIVE
    awk -v v="$1" -v n="$2" 'BEGIN { if (n + 0 == 0) print "-"; else printf "%.2f", v / n }'
}
verdict() { # verdict RATIO TARGET
    [[ -n $2 && $1 != - ]] || return 0
    if awk -v r="$1" -v t="${2#* }" -v op="${2%% *}" \
        'BEGIN { exit !((op == ">=" && r >= t) || (op == "<=" && r <= t)) }'; then
        echo "met"
    else
        echo "MISSED"
    fi
}

label_of() {
    case $1 in
        native) echo native ;;
        peerfs) echo "$PEERFS_LABEL" ;;
        *) echo "$1" ;;
    esac
}

HEADER="| workload | unit | native"
SEP="|---|---|---:"
for t in "${TARGETS[@]:1}"; do
    HEADER+=" | $(label_of "$t") | ×native"
    SEP+="|---:|---:"
done
if has_target peerfs; then
    HEADER+=" | peerfs target"
    SEP+="|---"
fi
MD=("$HEADER |" "$SEP|")
for row in "${ROWS[@]}"; do
    IFS="|" read -r key label unit _ goal <<<"$row"
    [[ -n "${R[$key:native]:-}" ]] || continue
    line="| $label | $unit | ${R[$key:native]}"
    for t in "${TARGETS[@]:1}"; do
        r=$(ratio "${R[$key:$t]}" "${R[$key:native]}")
        line+=" | ${R[$key:$t]} | $r"
        if [[ $t == peerfs ]]; then
            pr=$r
        fi
    done
    if has_target peerfs; then
        v=$(verdict "$pr" "$goal")
        line+=" | ${goal:+$goal × native: $v}"
    fi
    MD+=("$line |")
done

NOTES=(
    "Ratios: throughput rows are target ÷ native (higher is better); time rows (s) are target time ÷ native time (lower is better). fio rows are the median of $FIO_RUNS run(s), metadata rows of $META_RUNS."
)
if has_target peerfs; then
    NOTES+=("peerfs [drive] passthrough = $PASSTHROUGH${PEERFS_DRIVE_TOML:+; extra [drive] settings: $(tr '\n' ' ' <<<"$PEERFS_DRIVE_TOML")}.")
    for key in seqwrite seqread randread randwrite; do
        if [[ -n "${IO_READ[$key]:-}" ]]; then
            NOTES+=("$key on peerfs: the daemon itself read $((IO_READ[$key] / 1048576)) MiB and wrote $((IO_WRITTEN[$key] / 1048576)) MiB, summed over its runs")
        fi
    done
fi

fs_type=$(findmnt -n -o FSTYPE --target "$BENCH_DIR")
fs_src=$(findmnt -n -o SOURCE --target "$BENCH_DIR")
fs_opts=$(findmnt -n -o OPTIONS --target "$BENCH_DIR")
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
rev=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "unknown")
if [[ -n "${PEERFS_BIN:-}" ]]; then
    peerfs_desc="peerfs binary $PEERFS_BIN (source tree at $rev)"
else
    peerfs_desc="peerfs release build of $rev"
fi

echo
echo "## Benchmark $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "- machine: $(nproc) CPUs (${cpu:-unknown}), $mem RAM, kernel $(uname -r)"
echo "- filesystem: $fs_type on $fs_src ($fs_opts), directory $BENCH_DIR"
echo "- tools: $(fio --version), $(bindfs --version 2>/dev/null | head -n 1), $peerfs_desc"
echo "- command: \`$COMMAND\`"
echo
printf '%s\n' "${MD[@]}"
echo
for n in "${NOTES[@]}"; do
    if [[ -n $n ]]; then
        echo "- $n"
    fi
done

# Every sample, so the spread behind each median is visible.
echo
echo "<details><summary>all samples, in run order</summary>"
echo
line="| workload"
sep="|---"
for t in "${TARGETS[@]}"; do
    line+=" | $(label_of "$t")"
    sep+="|---"
done
echo "$line |"
echo "$sep|"
for row in "${ROWS[@]}"; do
    IFS="|" read -r key label _ _ _ <<<"$row"
    [[ -n "${SAMPLES[$key:native]:-}" ]] || continue
    line="| $label"
    for t in "${TARGETS[@]}"; do
        line+=" | ${SAMPLES[$key:$t]% }"
    done
    echo "$line |"
done
echo
echo "</details>"
