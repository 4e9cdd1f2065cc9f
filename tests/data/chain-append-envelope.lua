-- The append of facts to the log as the release before compact entries had it (events/bus.py at
-- commit a44564c), verbatim: envelope entries chained with prev and hash, both hex.
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
  return {events = events, key = chain, prev = head[2] or '', last_ms = tonumber(ms),
          last_seq = tonumber(seq), now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
end

local function chain_add(c, kind, job_id, data)
  -- every entry of ours has three fields: type, job_id and data
  if c.now > c.last_ms then
    c.last_ms, c.last_seq, c.ms = c.now, 0, nil
  else
    c.last_seq = c.last_seq + 1
  end
  c.ms = c.ms or string.format('%.0f', c.last_ms)
  local id = c.ms .. '-' .. string.format('%.0f', c.last_seq)
  local hashed = redis.sha1hex(c.prev .. '\n' .. id .. '\n4:type=' .. #kind .. ':' .. kind
    .. '\n6:job_id=' .. #job_id .. ':' .. job_id .. '\n4:data=' .. #data .. ':' .. data)
  local ok = redis.pcall('XADD', c.events, id, 'type', kind, 'job_id', job_id, 'data', data,
    'prev', c.prev, 'hash', hashed)
  if type(ok) == 'table' and ok.err then
    -- an entry appended outside the chain holds a later id: go on after it
    local ms, seq = string.match(last_generated(c.events), '^(%d+)-(%d+)$')
    c.last_ms, c.last_seq, c.now, c.ms = tonumber(ms), tonumber(seq), 0, nil
    return chain_add(c, kind, job_id, data)
  end
  c.prev, c.id, c.count = hashed, id, (c.count or 0) + 1
  return id
end

local function chain_close(c)
  if c.id then redis.call('HSET', c.key, 'id', c.id, 'hash', c.prev) end
end

-- KEYS: events, chain; ARGV: per entry: type, job_id, data
local c = chain_open(KEYS[1], KEYS[2])
local reply = {}
for i = 1, #ARGV, 3 do
  reply[#reply + 1] = chain_add(c, ARGV[i], ARGV[i + 1], ARGV[i + 2])
end
chain_close(c)
return reply
