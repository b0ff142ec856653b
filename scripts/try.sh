#!/usr/bin/env bash
# Builds peerfs and runs `peerfs demo` in the foreground: two peers on this machine, each with its
# own drive, connected to each other over loopback; it prints where the drives are and commands
# to try. Ctrl-C unmounts every drive and stops the peers.
#   scripts/try.sh [DIR] [--peers N]
# With DIR (`peerfs demo --dir DIR`) the peers' folders are made there and kept; without it they
# live in a temporary folder under /tmp, removed at exit. Other arguments go to `peerfs demo`.
set -euo pipefail

if [[ $# -gt 0 && $1 != -* ]]; then
    dir=$(realpath -m -- "$1") # before the cd below: DIR is relative to the caller's folder
    shift
    set -- --dir "$dir" "$@"
fi
cd "$(dirname "$0")/.."

cargo build --release -p peerfs-cli
exec target/release/peerfs demo "$@"
