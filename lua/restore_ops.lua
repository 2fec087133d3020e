-- restore_ops: writes operation ids back after Redis lost them (rehydrate), so that a replay
-- answers what the first call answered. Never over a key that is there (an operation made
-- since the partition re-opened): SET NX.
-- KEYS[1..n] operation-id keys, all of one partition
-- ARGV[1] JSON array of n [ttl (s), value] pairs, value = "<fingerprint>\n<answer>"
-- Returns how many keys were written (the others were there already).
local pairs_ = cjson.decode(ARGV[1])
local n = 0
for i, key in ipairs(KEYS) do
  local p = pairs_[i]
  if redis.call('SET', key, p[2], 'NX', 'EX', p[1]) then n = n + 1 end
end
return n
