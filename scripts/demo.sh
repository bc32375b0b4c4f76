#!/usr/bin/env bash
# warden's demo: installs what is missing, builds warden and the five plugins it loads
# (the debug build the tests share: the demo shows behaviour, not speed; the shipped
# package is the release profile's fat-LTO build), then
#  1. lists and checks plugins;
#  2. starts Redis, the router (nginx + Lua), moto_server (AWS) and three labelled
#     containers, runs warden, and shows requests answered by different containers
#     through the router, the host joining the service's classic ELB and ELBv2 target
#     group, then one container stopped and the traffic moving to the others.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked -p warden -p warden-plugin-docker-labels -p warden-plugin-file-services \
  -p warden-plugin-template -p warden-plugin-beanstalk-instances -p warden-plugin-s3-table
bin=$PWD/target/debug/warden
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
work=$(mktemp -d /tmp/warden-demo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  docker rm -f $(docker ps -aq --filter label=warden-demo) >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- plugins ---------------------------------------------------------------
mkdir -m 755 "$work/plugins"
install -m 644 target/debug/libwarden_plugin_docker_labels.so target/debug/libwarden_plugin_file_services.so \
  target/debug/libwarden_plugin_template.so target/debug/libwarden_plugin_beanstalk_instances.so \
  target/debug/libwarden_plugin_s3_table.so "$work/plugins/"
say "warden plugins list --dir $work/plugins"
"$bin" plugins list --dir "$work/plugins"
say "warden plugins check (the template plugin, with a config)"
"$bin" plugins check "$work/plugins/libwarden_plugin_template.so" --config '{"value": 3}'
say "warden plugins check (a shared library that is not a plugin)"
"$bin" plugins check /lib/x86_64-linux-gnu/libz.so.1 || echo "(exit code $?)"

# --- the parts -------------------------------------------------------------
redis_port=16379 router_port=18080 service_port=18001 moto_port=15000 http_port=19798
redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
router/start.sh "$work/router" $router_port 127.0.0.1 $redis_port >"$work/nginx.out" 2>&1 &
pids+=($!)
python3 tests/fixtures/moto_server.py -H 127.0.0.1 -p $moto_port >"$work/moto.log" 2>&1 &
pids+=($!)
export AWS_ENDPOINT_URL=http://127.0.0.1:$moto_port AWS_REGION=eu-west-1 AWS_DEFAULT_REGION=eu-west-1 \
  AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_EC2_METADATA_DISABLED=true
for p in $redis_port $router_port $moto_port; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
elb() { python3 - "$@" <<'PY'
import sys, boto3
elb = boto3.client("elb")
if sys.argv[1] == "create":
    elb.create_load_balancer(LoadBalancerName="demo-elb", AvailabilityZones=["eu-west-1a"],
        Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstanceProtocol": "HTTP", "InstancePort": 18001}])
else:
    d = elb.describe_load_balancers(LoadBalancerNames=["demo-elb"])["LoadBalancerDescriptions"][0]
    print("demo-elb instances:", [i["InstanceId"] for i in d["Instances"]])
PY
}
elb create
aws() { python3 tests/fixtures/aws.py "$AWS_ENDPOINT_URL" "$@"; }
# This host as an EC2 instance, and an instance target group for the service.
instance=$(aws ec2-instance)
tg_arn=$(aws tg-setup demo-tg instance 2)
tg() { echo "demo-tg targets [id, port, state]: $(aws tg-targets "$tg_arn")"; }
tests/image/build.sh

# For the manager: an ECS cluster with room, a Beanstalk environment with 2 instances,
# and the seed's mapping table in S3 (instances -> tasks).
aws ecs-setup demo worker 3
aws eb-instances upstream-prod 2
aws s3-put demo-tables worker.csv $'min,tasks\n0,1\n2,3\n4,5\n6,8\n'

cat >"$work/warden.toml" <<TOML
[host]
instance_id = "$instance"
availability_zone = "eu-west-1a"
[plugins]
dirs = ["$work/plugins"]
# The package's own plugins run in warden's process (as /usr/lib/warden/plugins does by
# default); a plugin from anywhere else gets a process of its own and only the
# environment its instance names (metrics.<name>.env), so no AWS settings.
in_process_dirs = ["$work/plugins"]
[registrar]
local_redis = "redis://127.0.0.1:$redis_port"
router_ports_file = "$work/router/ports.conf"
router_pid_file = "$work/router/nginx.pid"
# The router's own port: no container may take it.
reserved_ports = [$router_port]
# What container labels may claim (nothing by default).
[grants]
frontends = ["*.local"]
frontend_ports = ["18000-18099"]
load_balancers = ["demo-*"]
target_groups = ["demo-*"]
[manager]
central_redis = "redis://127.0.0.1:$redis_port"
loop_secs = 2
[http]
listen = "127.0.0.1:$http_port"
[metrics.upstream]
plugin = "beanstalk-instances"
config = { environment = "upstream-prod" }
[metrics.table]
plugin = "s3-table"
config = { bucket = "demo-tables", key = "worker.csv", refresh_secs = 2 }
[[manager.services]]
name = "worker"
cluster = "demo"
task_definition = "worker"
metric = "upstream"
mapping = { plugin = "table" }
policy = { min = 1, max = 10, scale_down_window_secs = 0 }
TOML
say "warden check --config $work/warden.toml"
"$bin" check --config "$work/warden.toml"
"$bin" run --config "$work/warden.toml" 2>"$work/warden.log" &
pids+=($!)

say "three containers labelled warden.service=demo, warden.frontend-port=$service_port, warden.elb=demo-elb, warden.target-group=demo-tg"
for i in 1 2 3; do
  docker run -d --name demo-web$i -l warden-demo=1 -e NAME=demo-web$i \
    -l warden.service=demo -l warden.frontend=demo.local -l warden.frontend-port=$service_port \
    -l warden.elb=demo-elb -l warden.target-group=demo-tg -l warden.drain=2 warden-test/busybox >/dev/null
done
for _ in $(seq 100); do
  [ "$(redis-cli -p $redis_port hlen backend:demo)" = 3 ] && (exec 3<>/dev/tcp/127.0.0.1/$service_port) 2>/dev/null && break
  sleep 0.1
done
if [ "$(redis-cli -p $redis_port hlen backend:demo)" != 3 ]; then
  echo "demo: warden did not route the three containers within 10 s; the end of its log ($work/warden.log):" >&2
  tail -n 20 "$work/warden.log" >&2
  exit 1
fi
say "redis: the routes warden wrote"
redis-cli -p $redis_port --raw get frontend:demo.local | sed 's/^/frontend:demo.local -> /'
redis-cli -p $redis_port --raw get warden:port:$service_port | sed "s/^/warden:port:$service_port -> /"
redis-cli -p $redis_port --raw hkeys backend:demo | sed 's/^/backend:demo server /'
say "9 requests to the service port $service_port, and 3 to Host: demo.local on the router's port $router_port"
for _ in $(seq 9); do curl -s http://127.0.0.1:$service_port/; done | sort | uniq -c
for _ in $(seq 3); do curl -s -H 'Host: demo.local' http://127.0.0.1:$router_port/; done | sort | uniq -c
sleep 1
elb describe
tg
say "warden routes: this host's table as the router sees it"
"$bin" routes --config "$work/warden.toml"
say "curl http://127.0.0.1:$http_port/readyz and an excerpt of /metrics"
curl -s http://127.0.0.1:$http_port/readyz
curl -s http://127.0.0.1:$http_port/metrics | grep -E '^warden_(servers|routes|docker_events_total|reconciles_total|redis_writes_total|elb_calls_total|leader|dependency_up)[{ ]'

say "docker stop demo-web1 (warden drops it at the kill, before it exits)"
docker stop -t 3 demo-web1 >/dev/null &
stopping=$!
sleep 0.5
redis-cli -p $redis_port --raw hkeys backend:demo | sed 's/^/backend:demo server /'
for _ in $(seq 9); do curl -s http://127.0.0.1:$service_port/; done | sort | uniq -c
wait "$stopping" || true

say "all stopped: the routes go, and after the 2 s drain the host leaves demo-elb and demo-tg"
docker stop -t 1 demo-web2 demo-web3 >/dev/null
sleep 3.5
redis-cli -p $redis_port --raw keys '*demo*' | sed 's/^/key left: /'
code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$service_port/ || true)
[ "$code" = 000 ] && echo "service port $service_port: closed (no service defines it now; nginx was reloaded)" || echo "service port $service_port: HTTP $code"
elb describe
tg
say "manager: Beanstalk env upstream-prod has 2 instances; table maps 2 -> 3 tasks"
tasks() { python3 tests/fixtures/aws.py "$AWS_ENDPOINT_URL" ecs-count demo worker warden-worker; }
for _ in $(seq 40); do [ "$(tasks)" = 3 ] && break; sleep 0.5; done
echo "ECS tasks of worker started by warden: $(tasks)"
"$bin" status --config "$work/warden.toml"

say "the environment grows to 6 instances: the table maps 6 -> 8 tasks"
aws eb-instances upstream-prod 6
for _ in $(seq 40); do [ "$(tasks)" = 8 ] && break; sleep 0.5; done
echo "ECS tasks of worker started by warden: $(tasks)"
"$bin" status --config "$work/warden.toml"

say "the manager's metrics: leadership, decisions, ECS calls, metric and task counts"
curl -s http://127.0.0.1:$http_port/metrics | grep -E '^warden_(leader|leader_epoch|decisions_total|ecs_calls_total|metric_value|desired_tasks|running_tasks|plugin_calls_total)[{ ]'

say "warden's log (last lines)"
tail -n 8 "$work/warden.log"
