-- account: reads an account's state (no change, no event).
-- KEYS[1] account hash   KEYS[2] account grant order (zset)   KEYS[3] partition ready marker
-- ARGV[1] now (ms)   ARGV[2] '1' for the detail (grants and open holds), '0' for totals only
-- ARGV[3] '1': read even when the partition is lost (the rebuild reads what Redis still has)
-- Returns {code, JSON}:
--   ok  {v, available, held, debt, granted, spent, expired, seq, debt_total,
--        grants: [{seq, free, earmarked, expires_at, expired, meta}] in spend order,
--        holds: [{hold_id, amount, expires_at}]}
--   an account never seen answers ok with zeros.
--   state_lost  the partition has not been rebuilt since Redis lost its data (its zeros
--               would not be the account's)
--@keys 3
--@include lib
local acct, gord, ready = KEYS[1], KEYS[2], KEYS[3]
local now, detail, rebuilding = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3] == '1'
if not rebuilding and redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
local st = acct_state(acct, gord, now)
if detail then
  local grants, holds = {}, {}
  for _, seq in ipairs(redis.call('ZRANGE', gord, 0, -1)) do
    local v = redis.call('HMGET', acct, 'r:' .. seq, 'e:' .. seq, 'x:' .. seq, 'm:' .. seq)
    grants[#grants + 1] = {seq = seq, free = v[1], earmarked = v[2], expires_at = v[3],
                           expired = expired_at(num(v[3]), now), meta = v[4]}
  end
  local flat = redis.call('HGETALL', acct)
  for i = 1, #flat, 2 do
    local f = flat[i]
    if string.sub(f, 1, 2) == 'o:' then
      local amt, exp = string.match(flat[i + 1], '^(%d+):(%d+)$')
      holds[#holds + 1] = {hold_id = string.sub(f, 3), amount = amt, expires_at = exp}
    end
  end
  st.grants = grants
  st.holds = holds
end
return {'ok', cjson.encode(st)}
