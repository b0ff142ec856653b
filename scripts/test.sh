#!/usr/bin/env bash
# The project's test command: the README and CI (.ci/run) both run exactly this.
# Extra arguments are passed to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace
cargo test --workspace "$@"
