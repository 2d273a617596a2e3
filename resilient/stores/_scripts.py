"""The Lua scripts that keep breaker and budget state in Redis, each one atomic and one round trip.

Times are Redis's (``TIME``, in microseconds), so every process reads one clock. Lua numbers
become Redis *integers* when returned, so fractional values travel as strings.

Breaker (``BREAKER``): ``KEYS = [state hash, window, probe claims]``; the window is a hash of time
buckets (fields ``c<i>``, ``f<i>``, ``s<i>``: calls, failures, slow calls; ``head``: the
newest bucket's epoch; ``tc``, ``tf``, ``ts``: the totals) or,
for a count window, a string of one byte per call (``'0' + failed + 2 * slow``) whose totals live
in the state hash. Probe claims are a sorted set: member = claim id, score = lease expiry, so a
process that dies holding a probe frees it when the lease runs out. ``ARGV``:

    1 op: "acquire" | "peek" | "record" | "release" | "reset" | "open"
    2 claim id ("" for a call admitted while closed)
    3 failed (0/1)   4 slow (0/1)
    5 the settings, comma-separated (one argument: fewer to encode on every call):
      failure_rate (-1: none), min_calls, consecutive_failures (0: none),
      slow_call_rate (-1: slow calls not judged), window (µs), buckets,
      window_calls (0: a time window), open_for (µs), open_for_multiplier, max_open_for (µs),
      half_open_probes, probe lease (µs), key ttl (ms)

Reply: ``{state (0 closed, 1 open, 2 half-open), generation, open-until minus now (µs),
opened_for (µs), granted (0/1)}``. The generation counts transitions: a probe claim belongs to one
half-open episode and its outcome moves nothing once the episode is over.

Budget (``BUDGET``): ``KEYS = [bucket hash]``; ``ARGV = [tokens to add, want (0/1), reserve,
ttl (µs), buckets, key ttl (ms)]``. Reply: ``{granted, "balance"}``.
"""

from __future__ import annotations

__all__ = ["BREAKER", "BUDGET"]

BREAKER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h, w, z = KEYS[1], KEYS[2], KEYS[3]
local op, claim = ARGV[1], ARGV[2]
local failed, slow = tonumber(ARGV[3]), tonumber(ARGV[4])
local c = {}
for v in string.gmatch(ARGV[5], '[^,]+') do c[#c + 1] = tonumber(v) end
local rate, min_calls, consec_max, slow_rate = c[1], c[2], c[3], c[4]
local span, n, size = c[5], c[6], c[7]
local open_for, mult, max_open = c[8], c[9], c[10]
local k, lease, ttl = c[11], c[12], c[13]

local s = redis.call('HMGET', h, 'state', 'gen', 'until', 'opened', 'streak', 'consec', 'succ')
local state = tonumber(s[1]) or 0
-- A missing key (never written, expired, or Redis restarted empty) starts its generation at the
-- time: above any generation the old key reached, so processes that cached one take the new
-- key's replies rather than drop them as late.
local gen = tonumber(s[2])
local dirty = false
if gen == nil then
  gen = now
  dirty = true
end
local until_ = tonumber(s[3]) or 0
local opened = tonumber(s[4]) or 0
local streak = tonumber(s[5]) or 0
local consec = tonumber(s[6]) or 0
local succ = tonumber(s[7]) or 0
local granted = 0

local function move(new)
  if state ~= new then
    state = new
    gen = gen + 1
    succ = 0
    redis.call('DEL', z)
  end
end

local function trip()
  if state == 2 then streak = streak + 1 else streak = 0 end
  opened = math.min(max_open, open_for * mult ^ streak)
  until_ = now + opened
  move(1)
end

local function close()
  redis.call('DEL', w)
  if size > 0 then redis.call('HSET', h, 'rc', 0, 'rf', 0, 'rs', 0, 'ri', 0) end
  consec = 0
  streak = 0
  move(0)
end

-- Add one outcome to the window; true when the window now says "open".
local function record()
  local calls, fails, slows
  if size > 0 then
    local r = redis.call('HMGET', h, 'rc', 'rf', 'rs', 'ri')
    calls, fails, slows = tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0
    local i = tonumber(r[4]) or 0
    if calls < size then
      calls = calls + 1
    else
      local old = (string.byte(redis.call('GETRANGE', w, i, i)) or 48) - 48
      fails = fails - old % 2
      slows = slows - math.floor(old / 2)
    end
    redis.call('SETRANGE', w, i, string.char(48 + failed + 2 * slow))
    fails = fails + failed
    slows = slows + slow
    redis.call('HSET', h, 'rc', calls, 'rf', fails, 'rs', slows, 'ri', (i + 1) % size)
  else
    -- A ring of buckets with running totals, advanced as the local TimeWindow is.
    local epoch = math.floor(now / (span / n))
    local r = redis.call('HMGET', w, 'head', 'tc', 'tf', 'ts')
    local head = tonumber(r[1])
    calls, fails, slows = tonumber(r[2]) or 0, tonumber(r[3]) or 0, tonumber(r[4]) or 0
    if head == nil or epoch - head >= n then
      redis.call('DEL', w)
      calls, fails, slows, head = 0, 0, 0, epoch
    elseif epoch > head then
      for e = head + 1, epoch do
        local j = e % n
        local b = redis.call('HMGET', w, 'c' .. j, 'f' .. j, 's' .. j)
        calls = calls - (tonumber(b[1]) or 0)
        fails = fails - (tonumber(b[2]) or 0)
        slows = slows - (tonumber(b[3]) or 0)
        redis.call('HDEL', w, 'c' .. j, 'f' .. j, 's' .. j)
      end
      head = epoch
    end
    local i = head % n
    redis.call('HINCRBY', w, 'c' .. i, 1)
    if failed == 1 then redis.call('HINCRBY', w, 'f' .. i, 1) end
    if slow == 1 then redis.call('HINCRBY', w, 's' .. i, 1) end
    calls, fails, slows = calls + 1, fails + failed, slows + slow
    redis.call('HSET', w, 'head', head, 'tc', calls, 'tf', fails, 'ts', slows)
  end
  if calls < min_calls then return false end
  if failed == 1 and rate >= 0 and fails >= rate * calls then return true end
  return slow == 1 and slow_rate >= 0 and slows >= slow_rate * calls
end

if op == 'acquire' then
  if state == 1 and now >= until_ then
    move(2)
    dirty = true
  end
  if state == 2 then
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    if redis.call('ZCARD', z) + succ < k then
      redis.call('ZADD', z, now + lease, claim)
      redis.call('PEXPIRE', z, ttl)
      granted = 1
      dirty = true
    end
  elseif state == 0 then
    granted = 1
  end
elseif op == 'record' then
  if claim ~= '' then
    if state == 2 and redis.call('ZREM', z, claim) == 1 then
      dirty = true
      if failed == 1 or slow == 1 then
        trip()
      else
        succ = succ + 1
        if succ >= k then close() end
      end
    end
  elseif state == 0 then
    dirty = true
    if failed == 1 then consec = consec + 1 else consec = 0 end
    local tripped = record()
    if tripped or (failed == 1 and consec_max > 0 and consec >= consec_max) then trip() end
  end
elseif op == 'release' then
  if state == 2 and claim ~= '' then redis.call('ZREM', z, claim) end
elseif op == 'reset' then
  close()
  dirty = true
elseif op == 'open' then
  trip()
  dirty = true
end

if dirty then
  redis.call('HSET', h, 'state', state, 'gen', gen, 'until', until_, 'opened', opened,
             'streak', streak, 'consec', consec, 'succ', succ)
  redis.call('PEXPIRE', h, ttl)
  redis.call('PEXPIRE', w, ttl)
end
local left = 0
if state == 1 then left = until_ - now end
return {state, gen, left, opened, granted}
"""

BUDGET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = KEYS[1]
local tokens, want, reserve = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local span, n, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local width = span / n
local epoch = math.floor(now / width)
local idx = epoch % n
local fields = {}
for j = 0, n - 1 do
  fields[#fields + 1] = 'e' .. j
  fields[#fields + 1] = 't' .. j
end
local v = redis.call('HMGET', h, unpack(fields))
local total, cur = 0, 0
for j = 0, n - 1 do
  local e = tonumber(v[2 * j + 1])
  if e and e > epoch - n and e <= epoch then
    local tj = tonumber(v[2 * j + 2]) or 0
    total = total + tj
    if j == idx then cur = tj end
  end
end
cur = cur + tokens
total = total + tokens
local granted = 0
if want == 1 and total + reserve >= 1 then
  cur = cur - 1
  total = total - 1
  granted = 1
end
if tokens ~= 0 or granted == 1 then
  redis.call('HSET', h, 'e' .. idx, epoch, 't' .. idx, string.format('%.17g', cur))
  redis.call('PEXPIRE', h, ttl)
end
return {granted, string.format('%.17g', total + reserve)}
"""
