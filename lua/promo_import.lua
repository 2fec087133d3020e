-- promo_import: counts claims made (and granted) in the system a code was imported from,
-- when the code's state is built already; a state not built yet is built from the store,
-- where the importer recorded them first (promo_restore.lua). Idempotent per claim.
-- KEYS[1] the code's state hash   KEYS[2] the code's pending claims (see promo_claim.lua)
-- ARGV pairs: user, n (the user's n-th claim)
-- Returns how many claims it counted.
--@keys 2
local state = KEYS[1]
if redis.call('HGET', state, 'ready') ~= '1' then return 0 end
local added = 0
for i = 1, #ARGV, 2 do
  local user, n = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('HSETNX', state, 'c:' .. user .. ':' .. n, 'granted') == 1 then
    redis.call('HINCRBY', state, 'uses', 1)
    if n > tonumber(redis.call('HGET', state, 'u:' .. user) or '0') then
      redis.call('HSET', state, 'u:' .. user, n)
    end
    added = added + 1
  end
end
return added
