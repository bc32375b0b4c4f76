#!/usr/bin/env bash
# Runs warden's whole test suite: installs what is missing, builds the workspace once
# (debug, shared by every test), then runs every unit, integration and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
# Here the end-to-end tier always runs: a missing tool fails its tests (tests/build.rs
# ignores them only where this is unset, for a plain `cargo test` on a laptop).
export WARDEN_E2E=1
cargo build --workspace --exclude warden-bench --all-targets --locked
# Each end-to-end test's moto_server leaves here the AWS actions warden sent it; the IAM
# policy check reads them after the suite.
rm -rf target/aws-actions
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --exclude warden-bench --locked --no-fail-fast
  # The one ignored test; the same package selection as above, so nothing is rebuilt.
  cargo nextest run --workspace --exclude warden-bench --locked --run-ignored only
else
  cargo test --workspace --exclude warden-bench --locked --no-fail-fast
  cargo test --workspace --exclude warden-bench --locked -- --ignored
fi
# Doc examples are compiled too (nextest does not run them).
cargo test --workspace --exclude warden-bench --doc --locked
