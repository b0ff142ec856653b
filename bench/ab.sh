#!/usr/bin/env bash
# Compares peerfs builds on the initial sync of bench/reconcile.sh, in alternated runs: one
# repetition of each binary in turn, N rounds, then each binary's mean. Machines here are
# noisy from minute to minute; alternating puts every build under the same noise.
#
#   bench/ab.sh N BIN_A BIN_B [BIN...]
#
# Each run is `RECON_REPS=1 RECON_CASES=initial bench/reconcile.sh` with PEERFS_BIN set (rsync
# runs too; its time is printed beside). RECON_BENCH_DIR defaults to /var/tmp/peerfs-ab-bench,
# RECON_RSYNC_FSYNC to 0; other RECON_* settings pass through. Needs root, like bench/reconcile.sh.
set -euo pipefail
(($# >= 3)) || { echo "usage: $0 ROUNDS BIN_A BIN_B [BIN...]" >&2; exit 2; }
rounds=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
for b in "$@"; do
    [[ -x $b ]] || { echo "$0: not an executable: $b" >&2; exit 2; }
done
export RECON_BENCH_DIR=${RECON_BENCH_DIR:-/var/tmp/peerfs-ab-bench}
# rsync --fsync (5 s a run here) compares nothing between builds.
export RECON_RSYNC_FSYNC=${RECON_RSYNC_FSYNC:-0}
bins=("$@")
sums=()
for ((i = 1; i <= rounds; i++)); do
    for k in "${!bins[@]}"; do
        b=${bins[$k]}
        out=$(PEERFS_BIN=$b RECON_REPS=1 RECON_CASES=initial bash "$here/reconcile.sh" 2>&1) || {
            echo "$out" | tail -20 >&2
            echo "$0: bench/reconcile.sh failed with $b" >&2
            exit 1
        }
        p=$(grep -o "tree on B [0-9.]* s after B connected" <<<"$out" | awk '{print $4}')
        r=$(grep -o "rsync  rep 1: [0-9,]* B, [0-9.]* s" <<<"$out" | awk '{print $6}')
        [[ -n $p ]] || { echo "$0: no peerfs time in the output ($b)" >&2; exit 1; }
        echo "round $i  $b  peerfs ${p} s  rsync ${r:-?} s"
        sums[k]=$(awk -v a="${sums[k]:-0}" -v x="$p" 'BEGIN{print a + x}')
    done
done
for k in "${!bins[@]}"; do
    awk -v s="${sums[k]}" -v n="$rounds" -v b="${bins[$k]}" 'BEGIN{printf "mean %.3f s  %s\n", s / n, b}'
done
