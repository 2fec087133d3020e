-- expire: the sweeper's batch for one account: expires its holds past their timeout and
-- its grants past their expiry date. One event per hold or grant that expires.
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] unused (op slot)        KEYS[6] unused (hold slot)
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- KEYS[10..9+n] the hold hashes named in ARGV[5..4+n]
-- ARGV[1] now (ms)  ARGV[2] retention of resolved-hold keys (s)  ARGV[3] user id
-- ARGV[4] n, the number of hold ids that follow  ARGV[5..4+n] hold ids due
-- ARGV[5+n..] grant sequence numbers due
-- Entries that are already resolved or gone are dropped from the expiry sets.
-- Returns {code, JSON}:
--   ok          {holds, grants, credits}: how many holds and grants expired, and how many
--               micro-credits of free grant remainder expired with them
--   state_lost  the partition has not been rebuilt since Redis lost its data
--@keys 9+
--@include lib
local acct, gord, events, ready, hexp, gexp = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[7], KEYS[8]
local now, retention, user, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
-- Hold i (0-based) of the n: its id is ARGV[FIRST_HOLD_ID + i], its hash KEYS[FIRST_HOLD_KEY + i].
local FIRST_HOLD_ID, FIRST_HOLD_KEY = 5, 10
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
local holds, grants, credits = 0, 0, 0

local A = {acct = acct, gord = gord, events = events, hexp = hexp, gexp = gexp,
           now = now, user = user, retention = retention}
for i = 0, n - 1 do
  local hid, hkey = ARGV[FIRST_HOLD_ID + i], KEYS[FIRST_HOLD_KEY + i]
  local hold = redis.call('HMGET', hkey, unpack(HOLD_FIELDS))
  if hold[3] == 'open' and now >= tonumber(hold[2]) then
    resolve_hold(A, hkey, hid, hold, 0, 'expired', '!expire:' .. hid, nil, nil, nil)
    holds = holds + 1
  elseif hold[3] ~= 'open' then
    redis.call('ZREM', hexp, user .. '|' .. hid)
  end
end

for i = FIRST_HOLD_ID + n, #ARGV do
  local seq = ARGV[i]
  local v = redis.call('HMGET', acct, 'r:' .. seq, 'e:' .. seq, 'x:' .. seq)
  if not v[1] then
    redis.call('ZREM', gexp, user .. '|' .. seq)
  elseif expired_at(num(v[3]), now) then
    redis.call('ZREM', gexp, user .. '|' .. seq)
    local free = num(v[1])
    if free > 0 then
      redis.call('HSET', acct, 'r:' .. seq, '0')
      redis.call('HINCRBY', acct, 'expired', free)
      local g = settle_grants(acct, gord, gexp, user, {[seq] = true})
      emit(acct, gord, events, now, {id = '!gexpire:' .. seq, t = 'grant_expired', u = user,
                                     seq = seq, amt = fmt(free), g = g})
      grants = grants + 1
      credits = credits + free
    end
  end
end
return {'ok', cjson.encode({holds = holds, grants = grants, credits = fmt(credits)})}
