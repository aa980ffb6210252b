"""Lua scripts for the atomic steps. Every script touches keys of ONE stage tag only,
so each runs in one cluster slot. They check ownership inside the script: an entry
another consumer claimed in the meantime is left alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rex


class Lua:
    """A script run with EVALSHA on the node of its keys, and with EVAL there when that
    node does not have it yet (a restart, a promoted replica). Never SCRIPT LOAD: on a
    cluster redis-py sends that to every master, so one master down would stop the
    scripts of healthy stages too. Called like redis-py's ``register_script``."""

    def __init__(self, client: Any, text: str) -> None:
        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            return await self.client.eval(self.text, len(keys), *keys, *args)


# The deferrals hash (see streams.keys) holds, per pending entry that was ever
# deferred, how many of its deliveries were deferrals: field "<lane>:<entry id>"
# (lane = the stream key's last part, "stream" or "priority"), value an integer. The
# deliveries that count toward max_deliveries are XPENDING's times_delivered minus it.
_LANE = "local lane = string.match(KEYS[1], '([^:]+)$') .. ':'\n"

# KEYS: stream, dlq, deferrals. ARGV: group, consumer, entry id, field, value, ...
# Moves a pending entry of `consumer` to the dead-letter stream, acks it and drops
# its deferral count.
DEAD_LETTER = (
    _LANE
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], lane .. ARGV[3])
return id
"""
)

# KEYS: stream, deferrals. ARGV: group, consumer, entry id.
# Hands an unfinished entry back: re-adds its fields with `attempt` raised by the
# deliveries it spent (times delivered minus deferrals: waiting spends nothing), acks
# the old one and drops its deferral count. Returns the new id, or false.
HAND_BACK = (
    _LANE
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return false end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
local free = tonumber(redis.call('HGET', KEYS[2], lane .. ARGV[3]) or '0') or 0
redis.call('HDEL', KEYS[2], lane .. ARGV[3])
if #e == 0 then return false end
local spent = p[1][4] - free
if spent < 0 then spent = 0 end
local f = e[1][2]
local found = false
for i = 1, #f, 2 do
  if f[i] == 'attempt' then
    f[i + 1] = tostring((tonumber(f[i + 1]) or 0) + spent)
    found = true
  end
end
if not found then
  table.insert(f, 'attempt')
  table.insert(f, tostring(spent))
end
return redis.call('XADD', KEYS[1], '*', unpack(f))
"""
)

# KEYS: stream, deferrals. ARGV: group, consumer, entry id, deferrals, entry id, ...
# Records the deferral counts of entries still pending for `consumer` (a count only
# grows: writing one twice is harmless). Returns how many were recorded.
RECORD_DEFERRALS = (
    _LANE
    + """
local n = 0
for i = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    local field = lane .. ARGV[i]
    local old = tonumber(redis.call('HGET', KEYS[2], field) or '0') or 0
    if tonumber(ARGV[i + 1]) > old then redis.call('HSET', KEYS[2], field, ARGV[i + 1]) end
    n = n + 1
  end
end
return n
"""
)

# KEYS: stream, deferrals. ARGV: group, consumer, entry id, deferrals, entry id, ...
# Sets the deferral counts of entries still pending for `consumer` as given (a count
# presumed for a delivery that then failed goes back down; 0 drops the field).
SET_DEFERRALS = (
    _LANE
    + """
for i = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    if tonumber(ARGV[i + 1]) > 0 then
      redis.call('HSET', KEYS[2], lane .. ARGV[i], ARGV[i + 1])
    else
      redis.call('HDEL', KEYS[2], lane .. ARGV[i])
    end
  end
end
return 1
"""
)

# KEYS: stream, deferrals. ARGV: group, entry id, ... Acks entries and drops their
# deferral counts in one step (used when some of them were deferred before).
ACK_FORGET = (
    _LANE
    + """
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = lane .. ARGV[i] end
redis.call('HDEL', KEYS[2], unpack(fields))
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
"""
)

# KEYS: dlq, redriven set, origin stream. ARGV: dlq entry id, field, value, ...
# Re-adds a dead letter's original fields to its origin, once.
REDRIVE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[3], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

# KEYS: stream, heartbeats. ARGV: group, consumer.
# Deletes a consumer only if it owns no pending entry (DELCONSUMER would drop them).
DELETE_IDLE_CONSUMER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
"""

# KEYS: stream. ARGV: keep_ms. Trims the stream below what every group still needs,
# in one step (no group can read or claim in between): the cut is the smallest
# last-delivered id and oldest pending id over the groups, or now - keep_ms when that
# is older. Returns {cut or '', removed, reason}; a stream without groups is kept.
SAFE_TRIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'', 0, 'no stream'} end
local function key(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = key(a)
  local bm, bs = key(b)
  return am < bm or (am == bm and as < bs)
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {'', 0, 'no consumer groups'} end
local cut = nil
for _, g in ipairs(groups) do
  local name, last, pending
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1] end
  end
  if cut == nil or less(last, cut) then cut = last end
  if pending > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], name)[2]
    if less(oldest, cut) then cut = oldest end
  end
end
local reason = 'oldest unprocessed entry'
local keep = tonumber(ARGV[1])
if keep > 0 then
  local t = redis.call('TIME')
  local horizon = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - keep
  if horizon < key(cut) then
    cut = string.format('%d-0', math.max(horizon, 0))
    reason = 'keep_ms=' .. ARGV[1]
  end
end
if cut == '0-0' then return {'', 0, 'nothing processed yet'} end
return {cut, redis.call('XTRIM', KEYS[1], 'MINID', cut), reason}
"""

# KEYS: heartbeats. ARGV: consumer. Records Redis's own time (unix ms) as the
# consumer's heartbeat, so the hosts' clocks do not matter; returns it.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now)
return now
"""

# KEYS: heartbeats. Returns {now (unix ms by Redis's clock), consumer, beat, ...}.
READ_HEARTBEATS = """
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end
return out
"""

# KEYS: lock, fence. ARGV: token, ttl ms. Returns the fencing number, or false.
ACQUIRE_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
return false
"""

# KEYS: lock. ARGV: token.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: stream. ARGV: n1, f, v, ... (n1 = number of field/value items), n2, f, v, ...
# Appends many entries in order with one command and one reply (the new ids).
XADD_MANY = """
local ids = {}
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return ids
"""
