-- promo_claim: the first of a promo claim's two steps, on the code's own slot: takes one
-- use of the code for the user, within the global and the per-user limits, and leaves the
-- claim pending until its grant (on the user's partition: another slot) is made.
-- KEYS[1] the code's state hash: "uses" (claims taken), "ready" (1 once built from the
--         store), "u:<user>" (the user's claims), "c:<user>:<n>" (pending | granted)
-- KEYS[2] the code's pending claims (zset, score = ms taken, member = "<n>|<user>")
-- ARGV[1] user  ARGV[2] global maximum uses (0 = none)  ARGV[3] maximum per user
-- ARGV[4] now (ms)
-- Returns {code, n}:
--   ok               the n-th claim of this user was taken (pending)
--   resume           the user's last claim (n) is still pending: its grant is to be made
--   already_claimed  the user has used the code as often as allowed (n = their claims)
--   exhausted        the code has no uses left
--   not_ready        the state is not built (Redis lost it): build it from the store first
--@keys 2
local state, pending = KEYS[1], KEYS[2]
local user, max_uses, per_user, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('HGET', state, 'ready') ~= '1' then return {'not_ready', 0} end
local mine = tonumber(redis.call('HGET', state, 'u:' .. user) or '0')
if mine > 0 and redis.call('HGET', state, 'c:' .. user .. ':' .. mine) == 'pending' then
  return {'resume', mine}
end
if mine >= per_user then return {'already_claimed', mine} end
if max_uses > 0 and tonumber(redis.call('HGET', state, 'uses') or '0') >= max_uses then
  return {'exhausted', 0}
end
redis.call('HINCRBY', state, 'uses', 1)
local n = redis.call('HINCRBY', state, 'u:' .. user, 1)
redis.call('HSET', state, 'c:' .. user .. ':' .. n, 'pending')
redis.call('ZADD', pending, now, n .. '|' .. user)
return {'ok', n}
