#!/usr/bin/env bash
# Starts warden's router (Debian nginx + Lua) on this machine.
#   router/start.sh PREFIX PORT REDIS_HOST REDIS_PORT [random|round-robin]
# PREFIX is a directory for nginx's files; warden writes PREFIX/ports.conf (set
# registrar.router_ports_file = PREFIX/ports.conf and router_pid_file = PREFIX/nginx.pid).
# REDIS_HOST is an address, or unix:/path/to/redis.sock (REDIS_PORT is then ignored).
# Environment:
#   WARDEN_ROUTER_WORKERS     nginx worker processes (default 1; `auto`: one a core)
#   WARDEN_ROUTER_ACCESS_LOG  access log path, or `off` (default PREFIX/access.log,
#                             written in 64 kB buffers flushed every second)
#   WARDEN_ROUTER_NETWORKS    comma-separated CIDRs servers may be in (default Docker's
#                             pools, 172.16.0.0/12,192.168.0.0/16); anything else in a
#                             backend (loopback, 169.254.169.254, another subnet) is refused
#   WARDEN_ROUTER_FULL_RELOAD_MS  the safety net: a full reload this often (default
#                             5000; other writers' changes are heard at once through
#                             keyspace notifications, which warden enables)
#   WARDEN_ROUTER_REDIS_PASSWORD       the local Redis's password (AUTH), or
#   WARDEN_ROUTER_REDIS_PASSWORD_FILE  a file holding it (kept out of nginx.conf)
set -euo pipefail
prefix=$(realpath -m "$1"); port=$2; redis_host=${3:-127.0.0.1}; redis_port=${4:-6379}; balance=${5:-random}
workers=${WARDEN_ROUTER_WORKERS:-1}
networks=${WARDEN_ROUTER_NETWORKS:-172.16.0.0/12,192.168.0.0/16}
full_ms=${WARDEN_ROUTER_FULL_RELOAD_MS:-5000}
case "$full_ms" in ''|*[!0-9]*) echo "start.sh: WARDEN_ROUTER_FULL_RELOAD_MS must be a number of milliseconds, not $full_ms" >&2; exit 2;; esac
case "$networks" in *[!0-9./,\ ]*) echo "start.sh: WARDEN_ROUTER_NETWORKS must be CIDRs (such as 172.16.0.0/12), not $networks" >&2; exit 2;; esac
if [ -n "${WARDEN_ROUTER_REDIS_PASSWORD_FILE:-}" ]; then
  WARDEN_ROUTER_REDIS_PASSWORD=$(cat "$WARDEN_ROUTER_REDIS_PASSWORD_FILE")
  export WARDEN_ROUTER_REDIS_PASSWORD
fi
case "$redis_host" in unix:*) redis_port=0;; esac
access=${WARDEN_ROUTER_ACCESS_LOG:-$prefix/access.log}
case "$balance" in random|round-robin) ;; *) echo "start.sh: balance must be random or round-robin, not $balance" >&2; exit 2;; esac
if [ "$access" = off ]; then
  access_log="access_log off;"
else
  access_log="access_log $access combined buffer=64k flush=1s;"
fi
dir=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$prefix/logs" "$prefix/tmp"
[ -f "$prefix/ports.conf" ] || echo "# no port front-ends yet" > "$prefix/ports.conf"
sed -e "s#@PREFIX@#$prefix#g" -e "s#@ROUTER_DIR@#$dir#g" -e "s#@PORT@#$port#g" \
    -e "s#@REDIS_HOST@#$redis_host#g" -e "s#@REDIS_PORT@#$redis_port#g" -e "s#@BALANCE@#$balance#g" \
    -e "s#@WORKERS@#$workers#g" -e "s#@ACCESS_LOG@#$access_log#g" -e "s#@NETWORKS@#$networks#g" -e "s#@FULL_MS@#$full_ms#g" \
    "$dir/nginx.conf.template" > "$prefix/nginx.conf"
exec nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log" -g 'daemon off;'
