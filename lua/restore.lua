-- restore: rebuilds one account from the durable store after Redis lost it (rehydrate).
-- Writes no event: it recreates a state the store already holds.
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] unused (events)
-- KEYS[4] unused (marker)     KEYS[5] unused (op slot)             KEYS[6] unused (hold slot)
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- KEYS[10..] hold hashes: the store's open holds first (ARGV[5] of them), then any hold
--            Redis still lists as open that the store does not know (they are deleted)
-- ARGV[1] now (ms)  ARGV[2] retention (s)  ARGV[3] user id  ARGV[4] store version
-- ARGV[5] number of store holds among KEYS[10..]
-- ARGV[6] state (JSON): {seq, held, debt, debt_total, granted, spent, expired,
--         grants: [{seq, r, e, x, pri, m}], holds: [{id, amt, exp, ear, at, op, x}]}
-- Returns {code, JSON}:
--   ok       {v}: Redis now holds the store's state
--   skipped  {v}: Redis already holds this version or a newer one
--@keys 9+
--@include lib
local acct, gord, hexp, gexp, users = KEYS[1], KEYS[2], KEYS[7], KEYS[8], KEYS[9]
local FIRST_HOLD_KEY = 10
local user, version, n_store_holds, state = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local have = num(redis.call('HGET', acct, 'v'))
if have >= tonumber(version) and redis.call('EXISTS', acct) == 1 then
  return {'skipped', cjson.encode({v = fmt(have)})}
end
-- Clear what Redis has of this account (a stale tail after a partial loss).
for _, seq in ipairs(redis.call('ZRANGE', gord, 0, -1)) do
  redis.call('ZREM', gexp, user .. '|' .. seq)
end
local flat = redis.call('HGETALL', acct)
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 2) == 'o:' then
    redis.call('ZREM', hexp, user .. '|' .. string.sub(flat[i], 3))
  end
end
redis.call('DEL', acct, gord)
for i = FIRST_HOLD_KEY + n_store_holds, #KEYS do redis.call('DEL', KEYS[i]) end

local s = cjson.decode(state)
redis.call('HSET', acct, 'v', version, 'seq', s.seq, 'held', s.held, 'debt', s.debt,
           'debt_total', s.debt_total, 'granted', s.granted, 'spent', s.spent, 'expired', s.expired)
for _, g in ipairs(s.grants) do
  redis.call('HSET', acct, 'r:' .. g.seq, g.r, 'e:' .. g.seq, g.e, 'x:' .. g.seq, g.x, 'm:' .. g.seq, g.m)
  local x = tonumber(g.x)
  redis.call('ZADD', gord, spend_score(x, tonumber(g.pri)), g.seq)
  if x ~= 0 then redis.call('ZADD', gexp, x, user .. '|' .. g.seq) end
end
for i, h in ipairs(s.holds) do
  local hkey = KEYS[FIRST_HOLD_KEY + i - 1]
  redis.call('DEL', hkey)
  redis.call('HSET', hkey, 'amt', h.amt, 'exp', h.exp, 'st', 'open', 'ear', h.ear,
             'at', h.at, 'op', h.op, 'x', h.x)
  redis.call('HSET', acct, 'o:' .. h.id, h.amt .. ':' .. h.exp)
  redis.call('ZADD', hexp, tonumber(h.exp), user .. '|' .. h.id)
end
redis.call('SADD', users, user)
return {'ok', cjson.encode({v = version})}
