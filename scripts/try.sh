#!/usr/bin/env bash
# Mounts a peerfs drive on a ready default, in the foreground: a backing folder, a mount point
# and a state folder under DIR (default /tmp/peerfs-try), created if missing. Ctrl-C unmounts.
#   scripts/try.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-/tmp/peerfs-try}
mkdir -p "$dir/backing" "$dir/drive" "$dir/state"
cat > "$dir/peerfs.toml" <<TOML
# Written by scripts/try.sh; every key is described in docs/CONFIGURATION.md.
name = "try"
backing = "backing"
mountpoint = "drive"
state = "state"
TOML

cargo build --release -p peerfs-cli
echo
echo "peerfs: serving $dir/backing at $dir/drive (config $dir/peerfs.toml)."
echo "        Try it from another terminal:  ls -la $dir/drive"
echo "        Status:                        target/release/peerfs status --config $dir/peerfs.toml"
echo "        Ctrl-C here unmounts."
echo
exec target/release/peerfs mount --config "$dir/peerfs.toml"
