"""The Lua the bus runs inside Redis: appends that extend the log's hash chain, the fenced,
all-or-nothing commit of a scheduler's decisions, and appends that then wait for replicas.

Each runs as one step in Redis, so concurrent writers cannot fork the chain and a commit lands
whole or not at all. The Python side that builds their arguments is :class:`events.bus.Bus`.
"""

from __future__ import annotations

# Appends to the log go through this: each entry carries ``hash`` = SHA-1 of (the previous entry's
# hash, entry id, fields), computed inside Redis so that concurrent writers cannot fork the chain,
# stored as its 20 bytes in URL-safe base64. The previous hash is not stored again: it is the
# entry before's. The entry id is chosen here (as XADD * would) so that it is hashed too.
CHAIN_LUA = """
local floor = math.floor

local function b64_48(B, n)  -- 48 bits (12 hex digits, exact in a Lua number) in 8 characters
  return B[floor(n / 4398046511104)] .. B[floor(n / 68719476736) % 64] .. B[floor(n / 1073741824) % 64]
    .. B[floor(n / 16777216) % 64] .. B[floor(n / 262144) % 64] .. B[floor(n / 4096) % 64]
    .. B[floor(n / 64) % 64] .. B[n % 64]
end

local function sha1_b64(B, text)
  -- SHA-1 of text: its 20 bytes in URL-safe base64 without padding, 27 characters
  local hex = redis.sha1hex(text)
  local last = tonumber(string.sub(hex, 37, 40), 16) * 4  -- 16 bits and 2 zero bits: 3 characters
  return b64_48(B, tonumber(string.sub(hex, 1, 12), 16)) .. b64_48(B, tonumber(string.sub(hex, 13, 24), 16))
    .. b64_48(B, tonumber(string.sub(hex, 25, 36), 16)) .. B[floor(last / 4096)] .. B[floor(last / 64) % 64]
    .. B[last % 64]
end

local function last_generated(events)
  local info = redis.pcall('XINFO', 'STREAM', events)
  if info.err then return '0-0' end
  for i = 1, #info, 2 do if info[i] == 'last-generated-id' then return info[i + 1] end end
  return '0-0'
end

local function chain_open(events, chain)
  local head = redis.call('HMGET', chain, 'id', 'hash')
  local last_id = head[1] or last_generated(events)
  local t = redis.call('TIME')
  local ms, seq = string.match(last_id, '^(%d+)-(%d+)$')
  -- the base64 alphabet, for the hashes (a table made on each call: here, only for appends)
  local B64 = {[0] = 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O',
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h',
    'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', '0',
    '1', '2', '3', '4', '5', '6', '7', '8', '9', '-', '_'}
  return {events = events, key = chain, prev = head[2] or '', last_ms = tonumber(ms), b64 = B64,
          last_seq = tonumber(seq), now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
end

local function chain_add(c, kind, job_id, data, at)
  -- every entry of ours has four fields, type, job_id, data and at (events.codec.encode_fact)
  if c.now > c.last_ms then
    c.last_ms, c.last_seq, c.ms = c.now, 0, nil
  else
    c.last_seq = c.last_seq + 1
  end
  c.ms = c.ms or string.format('%.0f', c.last_ms)
  local id = c.ms .. '-' .. string.format('%.0f', c.last_seq)
  local hashed = sha1_b64(c.b64, c.prev .. '\\n' .. id .. '\\n4:type=' .. #kind .. ':' .. kind
    .. '\\n6:job_id=' .. #job_id .. ':' .. job_id .. '\\n4:data=' .. #data .. ':' .. data
    .. '\\n2:at=' .. #at .. ':' .. at)
  local ok = redis.pcall('XADD', c.events, id, 'type', kind, 'job_id', job_id, 'data', data, 'at', at,
    'hash', hashed)
  if type(ok) == 'table' and ok.err then
    -- an entry appended outside the chain holds a later id: go on after it
    local ms, seq = string.match(last_generated(c.events), '^(%d+)-(%d+)$')
    c.last_ms, c.last_seq, c.now, c.ms = tonumber(ms), tonumber(seq), 0, nil
    return chain_add(c, kind, job_id, data, at)
  end
  c.prev, c.id, c.count = hashed, id, (c.count or 0) + 1
  return id
end

local function chain_close(c)
  if c.id then redis.call('HSET', c.key, 'id', c.id, 'hash', c.prev) end
end
"""

APPEND_LUA = (
    CHAIN_LUA
    + """
-- KEYS: events, chain; ARGV: per entry: type, job_id, data, at
local c = chain_open(KEYS[1], KEYS[2])
local reply = {}
for i = 1, #ARGV, 4 do
  reply[#reply + 1] = chain_add(c, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
chain_close(c)
return reply
"""
)

COMMIT_LUA = (
    CHAIN_LUA
    + """
-- KEYS: fence, events, chain, then one key per dedupe id, then each stream acknowledged in or
--       appended to (once each)
-- ARGV: token, expected_last, dedupe_ttl, n_dedupe, reader_group, maxlens, acks, appends, body,
--       tolerated, touched, most
--   maxlens: per stream, its cap (0: none), space-separated
--   acks:    per run of acknowledgements, 'stream group id id ...', runs separated by ';'
--   appends: per entry 'stream n_type n_job_id n_data n_at', space-separated; the four fields
--            follow each other in body, their lengths in bytes (a stream is its position among the
--            KEYS); at is empty, and not written, for a stream other than the log
--   tolerated, touched, most: with expected_last, entries appended after it are passed over
--            (not a conflict) when there are at most ``most``, each of a type in ``tolerated``
--            and of a job not in ``touched`` (both space-separated); the reply carries them
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the fencing token moved on: this scheduler is no longer the leader')
end
local passed = {}
if ARGV[2] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local last_id = '0-0'
  if #last > 0 then last_id = last[1][1] end
  if last_id ~= ARGV[2] then
    -- Entries appended since may be passed over when each is of a type the committer tolerates
    -- and about a job its decisions do not touch; they are returned, to be folded first.
    if ARGV[10] == '' then return {'CONFLICT', last_id} end
    local tolerated, touched = {}, {}
    for word in string.gmatch(ARGV[10], '%S+') do tolerated[word] = true end
    for word in string.gmatch(ARGV[11], '%S+') do touched[word] = true end
    local most = tonumber(ARGV[12])
    passed = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2], '+', 'COUNT', most + 1)
    if #passed > most then return {'CONFLICT', last_id} end
    for p = 1, #passed do
      local kind, job_id = nil, nil
      local f = passed[p][2]
      for j = 1, #f, 2 do
        if f[j] == 'type' then kind = f[j + 1] elseif f[j] == 'job_id' then job_id = f[j + 1] end
      end
      if not kind or not tolerated[kind] or not job_id or job_id == '' or touched[job_id] then
        return {'CONFLICT', last_id}
      end
    end
  end
end
local n_dedupe = tonumber(ARGV[4])
local streams_from = 3 + n_dedupe
local function ack_all()
  for run in string.gmatch(ARGV[7], '[^;]+') do
    local words = {}
    for word in string.gmatch(run, '%S+') do words[#words + 1] = word end
    local stream = KEYS[streams_from + tonumber(words[1])]
    for from = 3, #words, 1000 do
      redis.call('XACK', stream, words[2], unpack(words, from, math.min(#words, from + 999)))
    end
  end
end
if n_dedupe > 0 then
  local seen = {}
  for d = 1, n_dedupe do
    if redis.call('EXISTS', KEYS[3 + d]) == 1 then seen[#seen + 1] = d - 1 end
  end
  if #seen == n_dedupe then
    ack_all()
    return {'DUPLICATE'}
  end
  if #seen > 0 then return {'SOME_DUPLICATE', unpack(seen)} end
  for d = 1, n_dedupe do redis.call('SET', KEYS[3 + d], '1', 'EX', ARGV[3]) end
end
local maxlens = {}
for cap in string.gmatch(ARGV[6], '%d+') do maxlens[#maxlens + 1] = cap end
local reply = {'OK', 0, passed}
local chain = nil
local body, at = ARGV[9], 1
for target, n_kind, n_job, n_data, n_at in string.gmatch(ARGV[8], '(%d+) (%d+) (%d+) (%d+) (%d+)') do
  local kind = string.sub(body, at, at + n_kind - 1)
  at = at + n_kind
  local job_id = string.sub(body, at, at + n_job - 1)
  at = at + n_job
  local data = string.sub(body, at, at + n_data - 1)
  at = at + n_data
  local time = string.sub(body, at, at + n_at - 1)
  at = at + n_at
  local t = tonumber(target)
  local stream = KEYS[streams_from + t]
  if stream == KEYS[2] then
    if chain == nil then chain = chain_open(KEYS[2], KEYS[3]) end
    reply[#reply + 1] = chain_add(chain, kind, job_id, data, time)
  elseif maxlens[t] ~= '0' then
    reply[#reply + 1] = redis.call('XADD', stream, 'MAXLEN', '~', maxlens[t], '*',
      'type', kind, 'job_id', job_id, 'data', data)
  else
    reply[#reply + 1] = redis.call('XADD', stream, '*', 'type', kind, 'job_id', job_id, 'data', data)
  end
end
if chain ~= nil then chain_close(chain) end
ack_all()
-- The committer's own group need not read back what it appended: when that group had been
-- given everything up to the expected last entry, move it past the appended facts.
if ARGV[5] ~= '' and ARGV[2] ~= '' and chain ~= nil and #passed == 0 then
  local groups = redis.call('XINFO', 'GROUPS', KEYS[2])
  for g = 1, #groups do
    local info = {}
    for f = 1, #groups[g], 2 do info[groups[g][f]] = groups[g][f + 1] end
    if info['name'] == ARGV[5] and info['last-delivered-id'] == ARGV[2] then
      if type(info['entries-read']) == 'number' then
        redis.call('XGROUP', 'SETID', KEYS[2], ARGV[5], chain.id, 'ENTRIESREAD', info['entries-read'] + chain.count)
      else
        redis.call('XGROUP', 'SETID', KEYS[2], ARGV[5], chain.id)
      end
      reply[2] = 1
    end
  end
end
return reply
"""
)


# Commands appended in one step, when they must then wait for replicas (a transaction's WAIT
# would not wait). KEYS[1]: the stream; ARGV: per entry, its number of fields, then field, value...
XADD_ALL_LUA = """
local ids, i = {}, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
end
return ids
"""
