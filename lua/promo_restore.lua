-- promo_restore: builds a code's claim state from the durable record (the ledger's promo
-- grants), once: a code Redis never saw, or whose state Redis lost. Claims that were
-- pending when it was lost had no grant, so they are not taken (their users may claim).
-- KEYS[1] the code's state hash (see promo_claim.lua)
-- ARGV pairs: user, n (each a granted claim)
-- Returns 1 when it built the state, 0 when it was already there.
--@keys 1
local state = KEYS[1]
if redis.call('HGET', state, 'ready') == '1' then return 0 end
local uses, most = 0, {}
for i = 1, #ARGV, 2 do
  local user, n = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', state, 'c:' .. user .. ':' .. n, 'granted')
  if n > (most[user] or 0) then most[user] = n end
  uses = uses + 1
end
for user, n in pairs(most) do redis.call('HSET', state, 'u:' .. user, n) end
redis.call('HSET', state, 'uses', uses, 'ready', '1')
return 1
