-- warden's router: Redx's lookup (host, then longest path prefix first) plus warden's
-- port front-ends, served from a routing table held in each nginx worker's memory.
-- No request waits on Redis: a hung, slow or absent Redis costs no request anything.
--
-- The table is read from Redis as one atomic snapshot (a read-only Lua script run by
-- Redis) and replaced whole, never half updated, when:
--   * warden publishes on `warden:routes` (it does so with every write that changes a
--     route): a subscriber in each worker reloads at once;
--   * `warden:routes:version` differs from the table's (checked every `check_ms`);
--   * another writer (stock Redx's API, redis-cli) changes a `frontend:`, `backend:` or
--     `warden:port:` key: the same subscriber hears Redis's keyspace notifications
--     (warden enables them on its local Redis) and reloads `outside_ms` later, once for a
--     burst, unless the table served was read after the last change (warden's own
--     writes are followed by its publication, which comes after their notifications and
--     reloads at once);
--   * every `full_ms`, whatever the version says: the safety net for a Redis whose
--     notifications are off.
-- When Redis is lost the last table keeps serving (one log line when lost, one when back).
--
-- All routing happens in the balancer phase, which runs without a coroutine of its own:
-- no per-request table, no pattern matching (LuaJIT cannot compile string.match: every
-- server's ip and port are split when the table is loaded). A retry finds the servers
-- already tried in $upstream_addr. A miss goes to the fallback server on a local socket,
-- which answers 404.
-- A snapshot without a version after the table had one means Redis restarted empty: the
-- last table keeps serving until warden has rewritten it (the version is back).
--
-- Keys: `warden:port:<port>` -> backend (looked up first, by the port the request came
-- in on); `frontend:<host>` or `frontend:<host>/<seg>/.../` -> backend;
-- `backend:<name>` hash of `ip:port` -> score (fields starting with `_` are config).
--
-- Debian's lua-resty-redis 0.27 turns any unknown name looked up on a client into a Redis
-- command: call only the methods `CLIENT_METHODS` lists (checked at start) and commands.
--
-- The router trusts only what it can check, whoever wrote Redis (warden, stock Redx's
-- API, redis-cli): a server is routed to only if it is an IPv4 address inside the
-- configured container networks (`networks`, CIDRs); loopback only when a configured
-- network is itself inside 127.0.0.0/8, link-local (169.254.0.0/16, where instance
-- metadata answers), 0.0.0.0/8 and multicast never. A key of the wrong type (a
-- front-end that is not a string, a backend that is not a hash) is skipped with one log
-- line; the rest of the table is served. Refusals are logged once per key or server.
-- Redis is reached over TCP or a unix socket (`unix:/path`), with AUTH when a password
-- is configured.

local ok_redis, redis = pcall(require, "nginx.redis")
if not ok_redis then
  redis = require "resty.redis"
end
local balancer = require "ngx.balancer"

local _M = {
  redis_host = "127.0.0.1",
  redis_port = 6379,
  redis_password = nil,
  -- Comma-separated CIDRs whose addresses may be servers (Docker's default pools).
  networks = "172.16.0.0/12,192.168.0.0/16",
  max_path_length = 3,
  balance = "random",
  check_ms = 1000,
  full_ms = 5000,
  outside_ms = 50,
  timeout_ms = 500,
}

-- The client methods the router calls; anything else would be sent to Redis as a command.
local CLIENT_METHODS = { "new", "set_timeout", "connect", "set_keepalive", "read_reply", "close",
  "get_reused_times" }

-- Parsed `networks`: { base = number, size = number, loopback = bool }.
local allowed = {}
local bad_networks = {}

-- A dotted IPv4 address as a number (exact in a double), or nil.
local function ip4(s)
  local a, b, c, d = string.match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then
    return nil
  end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then
    return nil
  end
  return ((a * 256 + b) * 256 + c) * 256 + d
end
_M.ip4 = ip4

local function within(ip, base, size)
  return ip >= base and ip < base + size
end

local LOOPBACK, LOOPBACK_SIZE = 127 * 2 ^ 24, 2 ^ 24

local function parse_networks(text)
  allowed, bad_networks = {}, {}
  for item in string.gmatch(text or "", "[^,%s]+") do
    local addr, len = string.match(item, "^([%d%.]+)/(%d+)$")
    local ip = addr and ip4(addr)
    len = tonumber(len)
    if ip and len and len >= 0 and len <= 32 then
      local size = 2 ^ (32 - len)
      local base = math.floor(ip / size) * size
      allowed[#allowed + 1] = { base = base, size = size,
        loopback = within(base, LOOPBACK, LOOPBACK_SIZE) and len >= 8 }
    else
      bad_networks[#bad_networks + 1] = item
    end
  end
end

-- Why a server address may not be routed to (nil: it may).
function _M.refuse_server(addr_ip)
  local ip = ip4(addr_ip)
  if not ip then
    return "not an IPv4 address"
  end
  if within(ip, 169 * 2 ^ 24 + 254 * 2 ^ 16, 2 ^ 16) then
    return "link-local (instance metadata answers there)"
  end
  if ip < 2 ^ 24 or ip >= 224 * 2 ^ 24 then
    return "not a unicast address"
  end
  local loopback = within(ip, LOOPBACK, LOOPBACK_SIZE)
  for _, n in ipairs(allowed) do
    if within(ip, n.base, n.size) and (n.loopback or not loopback) then
      return nil
    end
  end
  if loopback then
    return "loopback (allowed only when a configured network is inside 127.0.0.0/8)"
  end
  return "outside the router's networks (" .. _M.networks .. ")"
end

function _M.configure(opts)
  for k, v in pairs(opts or {}) do
    _M[k] = v
  end
  parse_networks(_M.networks)
end

-- Said once per key or server and worker (bounded), so a hostile writer cannot flood the
-- log or grow the table.
local said, said_count = {}, 0
local function say_once(key, ...)
  if said[key] then
    return
  end
  if said_count >= 1000 then
    return
  end
  said[key] = true
  said_count = said_count + 1
  ngx.log(ngx.WARN, ...)
end

-- The table this worker serves: nil until the first snapshot.
local routes = nil
local rr = {}
local redis_lost = false

-- Returns version (or false), then a flat list: n keys skipped (wrong type), those keys,
-- n frontends, key/value pairs, then per backend: name, n servers, servers.
local SNAPSHOT = [[
local out = {}
local v = redis.pcall('GET', 'warden:routes:version')
if type(v) == 'table' then v = false end
out[1] = v or ''
local skipped = {}
local keys = {}
for _, pattern in ipairs({'frontend:*', 'warden:port:*'}) do
  local cursor = '0'
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = r[1]
    for _, k in ipairs(r[2]) do keys[#keys + 1] = k end
  until cursor == '0'
end
local pairs_out = {}
local backends = {}
for _, k in ipairs(keys) do
  local b = redis.pcall('GET', k)
  if type(b) == 'table' then
    skipped[#skipped + 1] = k
  else
    pairs_out[#pairs_out + 1] = k
    pairs_out[#pairs_out + 1] = b or ''
    if b then backends[b] = true end
  end
end
local per_backend = {}
for b in pairs(backends) do
  local fields = redis.pcall('HKEYS', 'backend:' .. b)
  if fields.err then
    skipped[#skipped + 1] = 'backend:' .. b
    fields = {}
  end
  per_backend[#per_backend + 1] = { b, fields }
end
out[#out + 1] = #skipped
for _, k in ipairs(skipped) do out[#out + 1] = k end
out[#out + 1] = #pairs_out / 2
for _, x in ipairs(pairs_out) do out[#out + 1] = x end
for _, bf in ipairs(per_backend) do
  local b, fields = bf[1], bf[2]
  local servers = {}
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 1) ~= '_' then servers[#servers + 1] = f end
  end
  out[#out + 1] = b
  out[#out + 1] = #servers
  for _, s in ipairs(servers) do out[#out + 1] = s end
end
return out
]]

local function connect(timeout_ms)
  local red = redis:new()
  red:set_timeout(timeout_ms)
  local ok, err
  if string.sub(_M.redis_host, 1, 5) == "unix:" then
    ok, err = red:connect(_M.redis_host)
  else
    ok, err = red:connect(_M.redis_host, _M.redis_port)
  end
  if not ok then
    return nil, err
  end
  local password = _M.redis_password
  if password and password ~= "" and red:get_reused_times() == 0 then
    local authed, aerr = red:auth(password)
    if not authed then
      red:close()
      return nil, "AUTH refused: " .. tostring(aerr)
    end
  end
  return red
end

local function lost(err)
  if not redis_lost and not ngx.worker.exiting() then
    redis_lost = true
    ngx.log(ngx.WARN, "warden router: redis ", _M.redis_host, ":", _M.redis_port,
      " lost (", tostring(err), "); serving the last routing table from memory")
  end
end

local function back()
  if redis_lost then
    redis_lost = false
    ngx.log(ngx.WARN, "warden router: redis ", _M.redis_host, ":", _M.redis_port,
      " answering again; routing table reloaded")
  end
end

-- Builds a table from a snapshot reply.
local function build(res)
  local t = { version = res[1], frontends = {}, paths = {}, ports = {}, backends = {} }
  local i = 2
  local skipped = tonumber(res[i])
  i = i + 1
  for _ = 1, skipped do
    say_once("type " .. res[i], "warden router: key ", res[i], " is not of Redx's type ",
      "(a front-end must be a string, a backend a hash); skipped")
    i = i + 1
  end
  local n = tonumber(res[i])
  i = i + 1
  for _ = 1, n do
    local k, b = res[i], res[i + 1]
    i = i + 2
    if b ~= "" then
      local port = string.match(k, "^warden:port:(%d+)$")
      if port then
        t.ports[port] = b
      else
        local f = string.sub(k, 10)
        t.frontends[f] = b
        local host = string.match(f, "^([^/]+)/")
        if host then
          t.paths[host] = true
        end
      end
    end
  end
  while i <= #res do
    local b, count = res[i], tonumber(res[i + 1])
    i = i + 2
    local servers = {}
    for j = 1, count do
      local addr = res[i + j - 1]
      local ip, port = string.match(addr, "^(.+):(%d+)$")
      port = tonumber(port)
      local why = not ip and "not ip:port" or _M.refuse_server(ip)
      if not why and (port < 1 or port > 65535) then
        why = "not a port"
      end
      if why then
        say_once("server " .. b .. " " .. addr, "warden router: server ", addr, " of backend ", b,
          " refused: ", why)
      else
        servers[#servers + 1] = { addr = addr, ip = ip, port = port }
      end
    end
    i = i + count
    t.backends[b] = servers
  end
  return t
end

local function count(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  return n
end

-- Reads a snapshot and swaps it in. Returns true when a table is in place and current.
-- Other writers' changes heard (keyspace notifications), and how many of them the table
-- now served had been heard when its snapshot was taken.
local events, loaded_events = 0, 0

function _M.reload(why)
  local upto = events
  local red, err = connect(_M.timeout_ms)
  if not red then
    lost(err)
    return false
  end
  local res, eerr = red:eval(SNAPSHOT, 0)
  if not res or type(res) ~= "table" then
    red:close()
    lost(eerr or "bad snapshot")
    return false
  end
  red:set_keepalive(60000, 4)
  back()
  local t = build(res)
  if t.version == "" and routes and routes.version ~= "" then
    -- Redis restarted empty (or lost warden's keys): keep serving until warden rewrites.
    if not routes.waiting then
      routes.waiting = true
      ngx.log(ngx.WARN, "warden router: redis holds no routes version (restarted empty?);",
        " serving the last table until warden has rewritten it")
    end
    return false
  end
  routes = t
  loaded_events = upto
  ngx.log(ngx.INFO, "warden router: routing table v", t.version, " loaded (", why, "): ",
    count(t.frontends), " front-ends, ", count(t.ports), " port front-ends")
  return true
end

-- The version now in Redis, or nil if Redis did not answer.
local function version()
  local red, err = connect(_M.timeout_ms)
  if not red then
    lost(err)
    return nil
  end
  local v, gerr = red:get("warden:routes:version")
  if not v then
    red:close()
    lost(gerr)
    return nil
  end
  red:set_keepalive(60000, 4)
  back()
  if v == ngx.null then
    v = ""
  end
  return v
end

-- Keyspace notifications of the keys the router reads, in any database.
local OUTSIDE_PATTERNS = {
  "__keyspace@*__:frontend:*",
  "__keyspace@*__:backend:*",
  "__keyspace@*__:warden:port:*",
}

-- Follows warden's publications and other writers' changes; reconnects with backoff.
local function subscriber(premature)
  local delay = 0.1
  while not premature and not ngx.worker.exiting() do
    local red, err = connect(_M.timeout_ms)
    if red then
      local res, serr = red:subscribe("warden:routes")
      for _, p in ipairs(OUTSIDE_PATTERNS) do
        if res then
          res, serr = red:psubscribe(p)
        end
      end
      if res then
        delay = 0.1
        -- Catch up on whatever changed while not subscribed.
        _M.reload("subscribed")
        red:set_timeout(1000)
        local pending = false
        while not ngx.worker.exiting() do
          local msg, rerr = red:read_reply()
          if msg then
            if msg[1] == "message" then
              _M.reload("published")
            elseif msg[1] == "pmessage" then
              -- A change by anyone (warden's own come with its publication, after
              -- them): one reload for a burst, unless a snapshot taken since the last
              -- change is served already.
              events = events + 1
              if not pending then
                pending = true
                ngx.timer.at(_M.outside_ms / 1000, function(premature)
                  pending = false
                  if not premature and loaded_events < events then
                    _M.reload("written by another")
                  end
                end)
              end
            end
          elseif rerr ~= "timeout" then
            lost(rerr)
            break
          end
        end
      else
        lost(serr)
      end
      red:close()
    else
      lost(err)
    end
    ngx.sleep(delay)
    delay = math.min(delay * 2, 5)
  end
end

local last_full = 0

local function check(premature)
  if premature then
    return
  end
  local now = ngx.now() * 1000
  if not routes or now - last_full >= _M.full_ms then
    last_full = now
    _M.reload(routes and "safety net" or "start")
    return
  end
  local v = version()
  if v and v ~= routes.version and not (v == "" and routes.waiting) then
    _M.reload("version " .. v)
  end
end

-- init_worker phase: check the client methods, load the table, start the timers.
function _M.init_worker()
  for _, m in ipairs(CLIENT_METHODS) do
    if type(rawget(redis, m)) ~= "function" then
      ngx.log(ngx.ERR, "warden router: the redis client module has no method ", m,
        "; calling it would send a Redis command instead")
    end
  end
  if #bad_networks > 0 and ngx.worker.id() == 0 then
    ngx.log(ngx.ERR, "warden router: networks entries not understood (CIDRs such as ",
      "172.16.0.0/12 expected), ignored: ", table.concat(bad_networks, ", "))
  end
  math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
  ngx.timer.at(0, subscriber)
  ngx.timer.at(0, check)
  ngx.timer.every(_M.check_ms / 1000, check)
end

local function lookup(t)
  if next(t.ports) then
    local backend = t.ports[ngx.var.server_port]
    if backend then
      return backend
    end
  end
  -- nginx's $host is lower-cased, without the port.
  local host = ngx.var.host or ""
  local frontends = t.frontends
  if not t.paths[host] then
    return frontends[host]
  end
  local uri = ngx.var.uri or "/"
  local segs, n = {}, 0
  for seg in string.gmatch(uri, "[^/]+") do
    if n >= _M.max_path_length then
      break
    end
    n = n + 1
    segs[n] = seg
  end
  for k = n, 1, -1 do
    local b = frontends[host .. "/" .. table.concat(segs, "/", 1, k) .. "/"]
    if b then
      return b
    end
  end
  return frontends[host]
end

-- balancer phase: route from memory. The first attempt picks a server (random or
-- round-robin); a retry takes the next server not yet tried, read from $upstream_addr
-- (no per-request state). A miss goes to the fallback server on a local socket.
function _M.balance_peer()
  local t = routes
  local backend = t and lookup(t)
  local servers = backend and t.backends[backend]
  local n = servers and #servers or 0
  if n == 0 then
    local ok, err = balancer.set_current_peer(_M.fallback)
    if not ok then
      ngx.log(ngx.ERR, "warden router: fallback: ", err)
      return ngx.exit(502)
    end
    return
  end
  local pick
  local state = balancer.get_last_failure()
  if not state then
    if n > 1 then
      balancer.set_more_tries(n - 1)
    end
    if _M.balance == "round-robin" then
      rr[backend] = ((rr[backend] or 0) % n) + 1
      pick = servers[rr[backend]]
    else
      pick = servers[math.random(n)]
    end
  else
    local tried = ngx.var.upstream_addr or ""
    local last = 0
    for i = 1, n do
      if string.find(tried, servers[i].addr, 1, true) then
        last = i
      end
    end
    for k = 1, n do
      local s = servers[((last - 1 + k) % n) + 1]
      if not string.find(tried, s.addr, 1, true) then
        pick = s
        break
      end
    end
    if not pick then
      return ngx.exit(502)
    end
  end
  local ok, err = balancer.set_current_peer(pick.ip, pick.port)
  if not ok then
    ngx.log(ngx.ERR, "warden router: bad server ", pick.addr, ": ", err)
    return ngx.exit(502)
  end
end

return _M
