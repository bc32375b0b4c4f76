#!/usr/bin/env bash
# Runs warden's whole test suite: installs what is missing, builds the workspace once
# (debug, shared by every test), then runs every unit, integration and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --exclude warden-bench --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --exclude warden-bench --locked --no-fail-fast
else
  cargo test --workspace --exclude warden-bench --locked --no-fail-fast
fi
# Doc examples are compiled too (nextest does not run them).
cargo test --workspace --exclude warden-bench --doc --locked
