#!/usr/bin/env bash
# A new user's first hour, timed cold: a throwaway clone of HEAD, an empty cargo home
# (every crate downloaded again) and an empty target directory, then
#   demo: the demo's build (scripts/demo.sh's cargo build line) and the demo run
#   ci:   .ci/run, the whole suite (it builds its own)
#
#   scripts/bench-fresh.sh [demo|ci|all]     (default: all; demo first, then ci,
#                                             each from empty)
#
# Prints one line per figure. The system packages (scripts/setup.sh) are installed
# first and are not part of the figures; cargo-nextest stays the one on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
# Each step's whole output is kept here (the clone is removed at the end).
keep=$PWD/target/bench-fresh
mkdir -p "$keep"
scripts/setup.sh --tests >/dev/null
root=$(mktemp -d /tmp/warden-fresh.XXXXXX)
# Readable by others, like a checkout: isolated plugins may run as another user.
chmod 755 "$root"
trap 'rm -rf "$root"' EXIT
git clone -q --no-hardlinks "$PWD" "$root/warden"
cd "$root/warden"
# A cargo home of its own: nothing downloaded or built before counts.
fresh() {
  rm -rf "$root/cargo" target
  mkdir -p "$root/cargo"
  cp "${CARGO_HOME:-$HOME/.cargo}/config.toml" "$root/cargo/" 2>/dev/null || true
}
seconds() {
  local s=$SECONDS ok=0
  "$@" >"$root/out.log" 2>&1 || ok=$?
  cp "$root/out.log" "$keep/$step.log"
  [ $ok = 0 ] || { tail -30 "$root/out.log" >&2; echo "failed; whole output in $keep/$step.log" >&2; return 1; }
  echo $((SECONDS - s))
}
mmss() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }
export CARGO_HOME=$root/cargo
if [[ $what == demo || $what == all ]]; then
  fresh
  step=demo-build
  build=$(seconds cargo build --locked -p warden -p warden-plugin-docker-labels -p warden-plugin-file-services \
    -p warden-plugin-template -p warden-plugin-beanstalk-instances -p warden-plugin-s3-table)
  echo "demo build, cold (downloads included): $(mmss "$build")"
  step=demo-run
  demo=$(seconds scripts/demo.sh)
  echo "demo run after it (warm): $(mmss "$demo")"
fi
if [[ $what == ci || $what == all ]]; then
  fresh
  step=ci
  ci=$(seconds .ci/run)
  echo ".ci/run, cold (downloads included): $(mmss "$ci")"
  # Its parts: the build, each nextest run.
  grep -E "Finished .dev. profile|^\s+Summary \[" "$keep/ci.log" | head -4
fi
