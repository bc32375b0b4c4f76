#!/usr/bin/env bash
# warden's demo: installs what is missing, builds warden and its plugins (release),
# lists the plugins, and shows warden checking a plugin, a foreign library and a config.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --locked
bin=target/release/warden
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Plugins must sit in a directory that only root/warden can write.
plugins=$(mktemp -d /tmp/warden-demo-plugins.XXXXXX)
chmod 755 "$plugins"
install -m 644 target/release/libwarden_plugin_file_services.so target/release/libwarden_plugin_template.so "$plugins/"

say "warden plugins list --dir $plugins"
"$bin" plugins list --dir "$plugins"

say "warden plugins check (the template plugin, with a config)"
"$bin" plugins check "$plugins/libwarden_plugin_template.so" --config '{"value": 3}'

say "warden plugins check (a shared library that is not a plugin)"
"$bin" plugins check /lib/x86_64-linux-gnu/libz.so.1 || echo "(exit code $?)"

say "warden check --config examples/warden.toml"
cp examples/services.toml /tmp/warden-demo-services.toml
sed -e "s#/usr/lib/warden/plugins#$plugins#" -e "s#/etc/warden/services.toml#/tmp/warden-demo-services.toml#" \
  examples/warden.toml >/tmp/warden-demo.toml
"$bin" check --config /tmp/warden-demo.toml

say "warden check on a config with a mistake"
sed -e 's/value = 3.0/value = "three"/' /tmp/warden-demo.toml >/tmp/warden-demo-bad.toml
"$bin" check --config /tmp/warden-demo-bad.toml || echo "(exit code $?)"

say "warden run (2 s, then SIGTERM)"
"$bin" run --config /tmp/warden-demo.toml &
pid=$!
sleep 2
kill -TERM "$pid"
wait "$pid"
echo "warden exited with $?"
