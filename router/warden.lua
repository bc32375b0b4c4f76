-- warden's router: Redx's lookup (host, then longest path prefix first) plus warden's
-- port front-ends, served from the local Redis on every request (no reload for route
-- changes). Loaded by nginx.conf; needs lua-resty-redis (Debian: `nginx.redis`) and
-- lua-resty-core (ngx.balancer).
--
-- Keys: `warden:port:<port>` -> backend (looked up first, by the port the request came
-- in on); `frontend:<host>` or `frontend:<host>/<seg>/.../` -> backend;
-- `backend:<name>` hash of `ip:port` -> score (fields starting with `_` are config).

local ok_redis, redis = pcall(require, "nginx.redis")
if not ok_redis then
  redis = require "resty.redis"
end
local balancer = require "ngx.balancer"

local _M = { redis_host = "127.0.0.1", redis_port = 6379, max_path_length = 3, balance = "random" }

function _M.configure(opts)
  for k, v in pairs(opts or {}) do
    _M[k] = v
  end
end

local function candidates(host, uri)
  local segs = {}
  for seg in string.gmatch(uri, "[^/]+") do
    if #segs >= _M.max_path_length then
      break
    end
    segs[#segs + 1] = seg
  end
  local keys = {}
  for n = #segs, 1, -1 do
    keys[#keys + 1] = "frontend:" .. host .. "/" .. table.concat(segs, "/", 1, n) .. "/"
  end
  keys[#keys + 1] = "frontend:" .. host
  return keys
end

local rr = {}

-- access phase: find the backend and its servers, or go to the fallback.
function _M.route()
  local red = redis:new()
  red:set_timeouts(200, 500, 500)
  local ok, err = red:connect(_M.redis_host, _M.redis_port)
  if not ok then
    ngx.log(ngx.ERR, "warden router: redis unreachable: ", err)
    return ngx.exec("@warden_fallback")
  end
  local backend = red:get("warden:port:" .. ngx.var.server_port)
  if not backend or backend == ngx.null then
    backend = nil
    local host = string.lower(ngx.var.host or "")
    local keys = candidates(host, ngx.var.uri or "/")
    local res = red:mget(unpack(keys))
    if type(res) == "table" then
      for i = 1, #keys do
        if res[i] and res[i] ~= ngx.null then
          backend = res[i]
          break
        end
      end
    end
  end
  if not backend then
    red:set_keepalive(10000, 64)
    return ngx.exec("@warden_fallback")
  end
  local all = red:hgetall("backend:" .. backend)
  red:set_keepalive(10000, 64)
  local servers = {}
  if type(all) == "table" then
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 1) ~= "_" then
        servers[#servers + 1] = all[i]
      end
    end
  end
  if #servers == 0 then
    return ngx.exec("@warden_fallback")
  end
  local start
  if _M.balance == "round-robin" then
    rr[backend] = ((rr[backend] or 0) % #servers) + 1
    start = rr[backend]
  else
    start = math.random(#servers)
  end
  ngx.ctx.warden = { servers = servers, start = start, tries = 0 }
  ngx.var.warden_backend = backend
end

-- balancer phase: the chosen server, then the next ones if it fails.
function _M.balance_peer()
  local st = ngx.ctx.warden
  if not st then
    return ngx.exit(502)
  end
  local n = #st.servers
  local pick = st.servers[((st.start - 1 + st.tries) % n) + 1]
  if st.tries == 0 and n > 1 then
    balancer.set_more_tries(n - 1)
  end
  st.tries = st.tries + 1
  local ip, port = string.match(pick, "^(.+):(%d+)$")
  local ok, err = balancer.set_current_peer(ip, tonumber(port))
  if not ok then
    ngx.log(ngx.ERR, "warden router: bad server ", pick, ": ", err)
    return ngx.exit(502)
  end
end

return _M
