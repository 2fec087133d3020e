-- restore_holds: writes back the status of holds that resolved within the retention
-- window, after Redis lost its data (rehydrate), so that a settle or release of one answers
-- already_settled / already_released / hold_expired (not hold_not_found) and its id stays
-- taken. Writes no event. Never over a hold Redis holds a status for already.
-- KEYS[1..n] hold hashes, all of one partition
-- ARGV[1] JSON array of n [status, seconds to keep it] pairs
-- Returns how many were written.
--@keys 1+
local hold_keys, holds = KEYS, cjson.decode(ARGV[1])
local written = 0
for i, key in ipairs(hold_keys) do
  local h = holds[i]
  if redis.call('HSETNX', key, 'st', h[1]) == 1 then
    written = written + 1
    if redis.call('TTL', key) < tonumber(h[2]) then redis.call('EXPIRE', key, h[2]) end
  end
end
return written
