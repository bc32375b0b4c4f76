#!/usr/bin/env bash
# Idle memory of the shipped build: a registrar with the package's default plugin set
# (docker-labels in the plugin directory, the config of examples/deploy/warden.toml with
# test paths), no container routed, read 5 s after "registrar ready" from
# /proc/PID/status and smaps_rollup; the binary's size beside it.
#
#   scripts/bench-rss.sh [profile]      (default: dist, the .deb's profile)
#
# Prints one line per figure. Needs redis-server and a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dist}
cargo build --locked --profile "$profile" -p warden -p warden-plugin-docker-labels >&2
dir=target/$profile
work=$(mktemp -d /tmp/warden-rss.XXXXXX)
chmod 755 "$work"
mkdir -m 755 "$work/plugins"
install -m 644 "$dir/libwarden_plugin_docker_labels.so" "$work/plugins/"
port=$((20000 + RANDOM % 20000))
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
redis=$!
warden=
cleanup() { kill $redis ${warden:+$warden} 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cat >"$work/warden.toml" <<EOF
[host]
instance_id = "i-rss"
[plugins]
dirs = ["$work/plugins"]
in_process_dirs = ["$work/plugins"]
[http]
listen = "127.0.0.1:0"
[registrar]
local_redis = "redis://127.0.0.1:$port"
router_ports_file = "$work/ports.conf"
router_pid_file = "$work/nginx.pid"
reserved_ports = [80, 443]
# No container of this engine is routed: the figure is warden idle.
require_label = "warden-rss.none=1"
EOF
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
"$dir/warden" run --config "$work/warden.toml" >"$work/warden.log" 2>&1 &
warden=$!
for _ in $(seq 300); do grep -q "registrar ready" "$work/warden.log" && break; sleep 0.1; done
grep -q "registrar ready" "$work/warden.log" || { cat "$work/warden.log" >&2; echo "warden never became ready" >&2; exit 1; }
sleep 5
kb() { awk -v k="$1" '$1 == k":" {print $2}' "$2"; }
rss=$(kb VmRSS /proc/$warden/status)
anon=$(kb Anonymous /proc/$warden/smaps_rollup)
file=$(awk '$1=="Rss:"{r=$2} END{print r}' /proc/$warden/smaps_rollup)
exe=$(awk -v bin="$(readlink -f "$dir/warden")" '
  /^[0-9a-f]+-[0-9a-f]+ / {cur = ($6 == bin)}
  cur && $1 == "Rss:" {sum += $2}
  END {print sum}' /proc/$warden/smaps)
size=$(stat -c %s "$dir/warden")
printf 'profile %s: binary %.1f MB; idle VmRSS %.1f MB (executable pages %.1f MB, anonymous %.1f MB; smaps Rss %.1f MB)\n' \
  "$profile" "$(echo "$size/1000000" | bc -l)" "$(echo "$rss/1024" | bc -l)" "$(echo "$exe/1024" | bc -l)" \
  "$(echo "$anon/1024" | bc -l)" "$(echo "$file/1024" | bc -l)"
