"""Metering inside Envoy: a Lua filter counts the tokens a response reports as it streams, and
Envoy's gRPC access-log service hands the processor one entry per request, in batches.

The Lua filter runs on the response path of metered routes only. It reads each body chunk
as it passes (``bodyChunks``: nothing is held or delayed), follows the JSON structure (SSE
``event:``/``data:`` lines; strings, depth and keys inside the JSON), and writes what the
provider reported into the stream's dynamic metadata (namespace ``USAGE_NAMESPACE``) the
moment it is seen, so a cut stream keeps what came before the cut. Both access logs read
it: the JSON line (the token fields) and the gRPC entry the processor turns into a
``UsageRecord``. A Lua error is caught, marked (``error``) and never fails the response.
"""

from __future__ import annotations

from extproc.config.model import METADATA_NAMESPACE, GatewayConfig
from extproc.render.common import (
    ACCESSLOG_CLUSTER,
    METERING_FILTER,
    Json,
    seconds,
    typed,
)

USAGE_NAMESPACE = "credential_gateway.usage"
SESSION_HEADER = "x-claude-code-session-id"
ACCESSLOG_NAME = "credential_gateway"  # the identifier's log_name in every stream
ROUTE_SOURCE_TAG = "route_credential_source"  # the route's credential_source, as a custom tag
# The usage fields of the JSON access-log line, from the Lua filter's metadata.
USAGE_LOG_FIELDS = {
    "model": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:model)%",
    "input_tokens": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:input)%",
    "output_tokens": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:output)%",
    "cache_read_tokens": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:cache_read)%",
    "cache_5m_tokens": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:cache_5m)%",
    "cache_1h_tokens": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:cache_1h)%",
    "usage_partial": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:partial)%",
}
_BUFFER_BYTES = 65536  # Envoy's batch for one stream: flushed when full, or every flush_ms

# The scanner. Carry: at most one unfinished SSE line (MAX_LINE); a longer line is skipped
# (usage events are small). Capture: the usage object only (MAX_CAPTURE). Strings are kept
# only at the depth being read, and only while short (MAX_STRING, split by a chunk boundary
# or not): keys and the model. Cost (bench/README): the reader walks a chunk byte by byte with
# its state in locals (a loop LuaJIT compiles; string.find with a character class runs in the
# interpreter, ~4x slower), and each event's or body's counts are written with one metadata
# fetch.
LUA_SCRIPT = r"""
local NS = "credential_gateway.usage"
local MAX_LINE, MAX_CAPTURE, MAX_STRING = 65536, 8192, 256
local find, sub, byte, match = string.find, string.sub, string.byte, string.match
local concat, tonumber = table.concat, tonumber

-- `"key"` then `:` and digits, anchored where the key ends: a plain find first (cheap when
-- the key is absent), the pattern only there.
local function count(u, quoted)
  local at = 1
  while true do
    local _, e = find(u, quoted, at, true)
    if not e then return nil end
    local v = match(u, "^%s*:%s*(%d+)", e + 1)
    if v then return tonumber(v) end
    at = e + 1
  end
end

-- Everything one event or body reported, written at once: no yield happens inside one chunk's
-- work, so the metadata object fetched here is valid for all of its writes (fetched again for
-- every event: objects taken before a yield of bodyChunks go stale).
local function report(handle, state, u, model, partial)
  local meta = handle:streamInfo():dynamicMetadata()
  if model then meta:set(NS, "model", model) end
  if u then
    local prompt = count(u, '"prompt_tokens"')
    if prompt then -- OpenAI: cached tokens are part of the prompt
      local cached = count(u, '"cached_tokens"')
      if cached and cached > prompt then cached = prompt end
      meta:set(NS, "input", prompt - (cached or 0))
      if cached then meta:set(NS, "cache_read", cached) end
      local out = count(u, '"completion_tokens"')
      if out then meta:set(NS, "output", out) end
    else
      local v = count(u, '"input_tokens"')
      if v then meta:set(NS, "input", v) end
      v = count(u, '"output_tokens"')
      if v then meta:set(NS, "output", v) end
      v = count(u, '"cache_read_input_tokens"')
      if v then meta:set(NS, "cache_read", v) end
      local m5 = count(u, '"ephemeral_5m_input_tokens"')
      local h1 = count(u, '"ephemeral_1h_input_tokens"')
      if m5 or h1 then
        state.split = true
        meta:set(NS, "cache_5m", m5 or 0)
        meta:set(NS, "cache_1h", h1 or 0)
      elseif not state.split then -- no split reported: the default cache lifetime, 5 minutes
        v = count(u, '"cache_creation_input_tokens"')
        if v then meta:set(NS, "cache_5m", v) end
      end
    end
    if partial ~= nil then meta:set(NS, "partial", partial) end
  end
end

-- A JSON reader fed in pieces: finds "usage" (an object) and "model" (a string) as keys
-- of the objects at depth `level`, never inside strings or deeper values. Its state lives in
-- locals while a piece is read; only what spans pieces is kept in the table.
local function reader(level)
  return {level = level, depth = 0, instr = false, esc = false, keep = false, parts = nil,
          size = 0, key = false, value = false, cap = nil, capsize = 0, capdepth = 0}
end

local function scan(j, s)
  local n, level = #s, j.level
  local depth, instr, esc, keep, key, value = j.depth, j.instr, j.esc, j.keep, j.key, j.value
  local cap, model = j.cap, nil
  local start, from = 1, 1 -- start: a kept string's text in this piece; from: the capture's
  -- One byte at a time: LuaJIT compiles this loop (string.find with a pattern it does not).
  for i = 1, n do
    local c = byte(s, i)
    if instr then
      if esc then
        esc = false
      elseif c == 92 then
        esc = true
      elseif c == 34 then
        instr = false
        if depth == level then
          local text = nil
          if keep then
            if j.size + i - start <= MAX_STRING then
              text = sub(s, start, i - 1)
              if j.parts then
                j.parts[#j.parts + 1] = text
                text = concat(j.parts)
              end
            end
            j.parts = nil
          end
          if value then
            if key == "model" and text then model = text end
            value = false
          elseif text then
            key = text
          end
        end
      end
    elseif c == 34 then
      instr = true
      if depth == level then keep, start, j.size, j.parts = true, i + 1, 0, nil end
    elseif c == 123 or c == 91 then
      if depth == level then
        if c == 123 and value and key == "usage" and not j.done then
          cap, from, j.capsize, j.capdepth = {}, i, 0, depth
        end
        value = false
      end
      depth = depth + 1
      if depth == level then key, value = false, false end
    elseif c == 125 or c == 93 then
      depth = depth - 1
      if cap and depth == j.capdepth then
        cap[#cap + 1] = sub(s, from, i)
        j.usage, cap, j.done = concat(cap), nil, true
      end
    elseif depth == level and (c == 58 or c == 44) then
      if c == 58 then value = true else key, value = false, false end
    end
  end
  if instr and keep then -- a string at the depth read goes on in the next piece
    j.size = j.size + n - start + 1
    if j.size > MAX_STRING then
      keep, j.parts = false, nil
    else
      local parts = j.parts or {}
      parts[#parts + 1] = sub(s, start)
      j.parts = parts
    end
  end
  if cap then
    j.capsize = j.capsize + n - from + 1
    if j.capsize > MAX_CAPTURE then cap = nil else cap[#cap + 1] = sub(s, from) end
  end
  j.depth, j.instr, j.esc, j.keep, j.key, j.value, j.cap = depth, instr, esc, keep, key, value, cap
  if model then j.model = model end
end

local function event_data(handle, state, line, level, partial)
  local j = reader(level)
  scan(j, line)
  if j.model or j.usage then report(handle, state, j.usage, j.model, partial) end
end

local function on_line(handle, state, buf, a, b)
  if b >= a and byte(buf, b) == 13 then b = b - 1 end
  if b < a then state.event = nil return end -- a blank line ends the event
  local c = byte(buf, a)
  if c == 101 and sub(buf, a, a + 5) == "event:" then
    state.event = match(sub(buf, a + 6, b), "^%s*(.-)%s*$")
  elseif c == 100 and sub(buf, a, a + 4) == "data:" then
    local event = state.event
    if event == "message_start" then
      event_data(handle, state, sub(buf, a + 5, b), 2, true)
    elseif event == "message_delta" then
      event_data(handle, state, sub(buf, a + 5, b), 1, false)
    elseif event == nil then -- OpenAI: no event names; a usage object only in the last
      local u = state.next_usage
      if u < a then
        u = find(buf, '"usage"%s*:%s*{', a) or (#buf + 1)
        state.next_usage = u
      end
      if u <= b then event_data(handle, state, sub(buf, a + 5, b), 1, nil) end
    end
  end
end

local function sse(handle, state, chunk)
  local buf = chunk
  if state.carry then buf = state.carry .. chunk end
  state.carry = nil
  -- Where the next usage object starts, found when needed: data lines before it are skipped.
  state.next_usage = 0
  local pos = 1
  while true do
    local nl = find(buf, "\n", pos, true)
    if not nl then break end
    if state.skip then state.skip = false else on_line(handle, state, buf, pos, nl - 1) end
    pos = nl + 1
  end
  if pos <= #buf and not state.skip then
    if #buf - pos + 1 > MAX_LINE then state.skip = true else state.carry = sub(buf, pos) end
  end
end

local function json(handle, state, chunk)
  local j = state.json
  if j.done then return end
  scan(j, chunk)
  if j.usage then report(handle, state, j.usage, j.model, nil) end
end

local function start(handle)
  local headers = handle:headers()
  local coding = headers:get("content-encoding")
  if headers:get(":status") ~= "200" or (coding and coding ~= "identity") then return nil end
  local kind = headers:get("content-type") or ""
  if find(kind, "text/event-stream", 1, true) then return {feed = sse} end
  if find(kind, "json", 1, true) then return {feed = json, json = reader(1)} end
  return nil
end

local function feed(handle, state, chunk)
  state.feed(handle, state, chunk:getBytes(0, chunk:length()))
end

local function failed(handle)
  pcall(function() handle:streamInfo():dynamicMetadata():set(NS, "error", true) end)
end

function envoy_on_response(handle)
  local ok, state = pcall(start, handle)
  if not ok then failed(handle) return end
  if state == nil then return end
  for chunk in handle:bodyChunks() do
    if not pcall(feed, handle, state, chunk) then failed(handle) return end
  end
end
"""


def lua_filter() -> Json:
    """The Lua filter in the chain; routes that are not metered turn it off."""
    config = typed(
        "envoy.extensions.filters.http.lua.v3.Lua",
        default_source_code={"inline_string": LUA_SCRIPT},
        stat_prefix="metering",
    )
    return {"name": METERING_FILTER, "typed_config": config}


def disabled() -> Json:
    return typed("envoy.extensions.filters.http.lua.v3.LuaPerRoute", disabled=True)


def grpc_access_log(config: GatewayConfig) -> Json:
    """One entry per request to the processor's AccessLogService, batched.

    Envoy keeps one stream per worker thread and drops an entry (``logs_dropped``) when the
    stream is backed up; the JSON line of the same request still has the counts. The route's
    ``credential_source`` (``client`` on the fast path, where no decision is made) goes along
    as a custom tag (entries carry dynamic metadata, not the route's).
    """
    route_source = {
        "tag": ROUTE_SOURCE_TAG,
        "metadata": {
            "kind": {"route": {}},
            "metadata_key": {"key": METADATA_NAMESPACE, "path": [{"key": "credential_source"}]},
        },
    }
    common = {
        "log_name": ACCESSLOG_NAME,
        "grpc_service": {"envoy_grpc": {"cluster_name": ACCESSLOG_CLUSTER}},
        "transport_api_version": "V3",
        "buffer_flush_interval": seconds(config.metering_flush_ms / 1000),
        "buffer_size_bytes": _BUFFER_BYTES,
        "custom_tags": [route_source],
    }
    logger = typed(
        "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        common_config=common,
        additional_request_headers_to_log=[SESSION_HEADER],
    )
    return {"name": "envoy.access_loggers.http_grpc", "typed_config": logger}


def identity_upstream(routes: list[Json]) -> None:
    """Metered routes ask their upstream for identity encoding: a gzipped body hides usage.

    (A response that comes compressed anyway is not read: its usage is unknown.)
    """
    for route in routes:
        if "route" in route and METERING_FILTER not in route.get("typed_per_filter_config", {}):
            route.setdefault("request_headers_to_remove", []).append("accept-encoding")
