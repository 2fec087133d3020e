-- promo_restore: builds a code's claim state from the durable record, once: a code Redis
-- never saw, or whose state Redis lost. Each claim is recorded in the store by the claiming
-- process before its grant, so none is missed whatever the worker has persisted yet; one
-- whose grant is not in the ledger is restored pending (the worker's pass grants it).
-- KEYS[1] the code's state hash   KEYS[2] the code's pending claims (see promo_claim.lua)
-- ARGV quadruples: user, n, granted (1 or 0), taken at (ms)
-- Returns 1 when it built the state, 0 when it was already there.
--@keys 2
local state, pending = KEYS[1], KEYS[2]
if redis.call('HGET', state, 'ready') == '1' then return 0 end
local uses, most = 0, {}
for i = 1, #ARGV, 4 do
  local user, n, granted, at = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  if granted == '1' then
    redis.call('HSET', state, 'c:' .. user .. ':' .. n, 'granted')
  else
    redis.call('HSET', state, 'c:' .. user .. ':' .. n, 'pending')
    redis.call('ZADD', pending, at, n .. '|' .. user)
  end
  if n > (most[user] or 0) then most[user] = n end
  uses = uses + 1
end
for user, n in pairs(most) do redis.call('HSET', state, 'u:' .. user, n) end
redis.call('HSET', state, 'uses', uses, 'ready', '1')
return 1
