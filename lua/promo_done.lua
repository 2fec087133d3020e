-- promo_done: the last step of a promo claim: its grant is made, the claim is no longer
-- pending. Idempotent.
-- KEYS[1] the code's state hash   KEYS[2] the code's pending claims (see promo_claim.lua)
-- ARGV[1] user  ARGV[2] the claim's number n
-- Returns 1 when it was pending, 0 otherwise.
--@keys 2
local state, pending = KEYS[1], KEYS[2]
local user, n = ARGV[1], ARGV[2]
redis.call('ZREM', pending, n .. '|' .. user)
if redis.call('HGET', state, 'c:' .. user .. ':' .. n) == 'pending' then
  redis.call('HSET', state, 'c:' .. user .. ':' .. n, 'granted')
  return 1
end
return 0
