#!/usr/bin/env bash
# Call time of each catalog metric plugin against its real server, through
# `warden plugins call --repeat N` (the daemon's client: schema check once, then each
# call with its task, timeout, panic guard and decode), release build.
# Usage: bench/catalog.sh [N]   (prints a markdown table; servers on loopback)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
# The same package selection as the demo's build, so that one release build serves both.
cargo build --release --workspace --exclude warden-bench --locked -q
bin=target/release/warden
so() { echo "target/release/libwarden_plugin_$1.so"; }
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

rp=$(port); redis-server --port "$rp" --save '' --appendonly no >/dev/null & pids+=($!); wait_port "$rp"
redis-cli -p "$rp" rpush jobs a b c >/dev/null
hp=$(port); mkdir -p "$work/www"; echo '{"queues":{"jobs":{"depth":12}}}' >"$work/www/index.html"
printf 'jobs_waiting 7\n' >"$work/www/metrics"
busybox httpd -f -p "127.0.0.1:$hp" -h "$work/www" & pids+=($!); wait_port "$hp"
pp=$(port)
printf 'global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: e\n    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' "$hp" >"$work/prom.yml"
prometheus --config.file="$work/prom.yml" --storage.tsdb.path="$work/tsdb" --web.listen-address="127.0.0.1:$pp" >/dev/null 2>&1 & pids+=($!)
wait_port "$pp"
mp=$(port); python3 tests/fixtures/moto_server.py -H 127.0.0.1 -p "$mp" >/dev/null 2>&1 & pids+=($!); wait_port "$mp"
export AWS_ENDPOINT_URL=http://127.0.0.1:$mp AWS_REGION=eu-west-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true
python3 tests/fixtures/aws.py "$AWS_ENDPOINT_URL" sqs-setup jobs 3 >/dev/null
python3 tests/fixtures/aws.py "$AWS_ENDPOINT_URL" cw-put App Depth Queue=jobs 7 30 >/dev/null
# Prometheus needs its first scrape.
for _ in $(seq 50); do
  "$bin" plugins call "$(so prometheus)" --config "{\"url\":\"http://127.0.0.1:$pp\",\"query\":\"sum(jobs_waiting)\"}" >/dev/null 2>&1 && break
  sleep 0.2
done

row() {
  local name=$1 plugin=$2 config=$3 server=$4
  local out; out=$("$bin" plugins call "$(so "$plugin")" --config "$config" --repeat "$n" || true)
  python3 - "$out" "$name" "$server" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
t = d["took_ms"]
value = (d["answer"] or {}).get("value")
print(f"| {sys.argv[2]} | {sys.argv[3]} | {value} | {t['median']:.3f} | {t['max']:.3f} | {d['failures']} |")
PY
}
echo "| plugin | server | value | median ms | max ms | failures (of $n) |"
echo "|---|---|---|---|---|---|"
row template template '{"value":3}' "none (in-memory)"
row redis-metric redis_metric "{\"url\":\"redis://127.0.0.1:$rp\",\"key\":\"jobs\"}" "redis-server $(redis-server --version | awk '{print $3}')"
row http-json http_json "{\"url\":\"http://127.0.0.1:$hp/\",\"pointer\":\"/queues/jobs/depth\"}" "busybox httpd"
row prometheus prometheus "{\"url\":\"http://127.0.0.1:$pp\",\"query\":\"sum(jobs_waiting)\"}" "Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}')"
row sqs-queue sqs_queue '{"queue":"jobs"}' "moto_server (SQS)"
row cloudwatch cloudwatch '{"namespace":"App","metric_name":"Depth","dimensions":{"Queue":"jobs"}}' "moto_server (CloudWatch)"
