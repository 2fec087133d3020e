-- plan_trim: expires a subscription's earlier plan credit beyond what may roll over into a
-- new period (the cap), oldest grant first; with a cap of 0 (the subscription ends) all of
-- it, and credit held by open requests expires when their holds resolve. One
-- grant_expired event per grant trimmed.
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key
-- KEYS[6] the hold hash named by the operation id (see "Operation records" in lib.lua)
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- ARGV[1] now (ms)  ARGV[2] retention of op keys (s)  ARGV[3] user id  ARGV[4] operation id
-- ARGV[5] subscription id: the grants trimmed are those whose metadata names it...
-- ARGV[6] ...and a period before this one
-- ARGV[7] cap (micro-credits >= 0): what may be left of them
-- Returns {code, JSON}:
--   ok           {grants, credits}: how many grants were trimmed, and by how much in all
--   exists       the first answer, for a replay with the same fields
--   op_conflict  the operation id was used with other fields
--   invalid_amount  the cap or period is not a whole number in range
--   state_lost   the partition has not been rebuilt since Redis lost its data
--@keys 9
--@include lib
local acct, gord, events, ready, opkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local named_hold, gexp = KEYS[6], KEYS[8]
local now_text, retention, user, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local sub, period_text, cap_text = ARGV[5], ARGV[6], ARGV[7]
local now = tonumber(now_text)
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
if not amount_arg(cap_text, 0) or not tonumber(period_text) then return {'invalid_amount', '{}'} end
local cap, period = tonumber(cap_text), tonumber(period_text)
local fp = 'trim|' .. sub .. '|' .. period_text .. '|' .. cap_text
local seen = op_replay(opkey, fp) or foreign_record(named_hold)
if seen then return seen end

-- The subscription's earlier grants, oldest first (the sequence numbers are zero-padded).
local mine, total = {}, 0
for _, seq in ipairs(redis.call('ZRANGE', gord, 0, -1)) do
  local v = redis.call('HMGET', acct, 'm:' .. seq, 'r:' .. seq)
  local ok, m = pcall(cjson.decode, v[1] or '')
  local x = ok and type(m) == 'table' and type(m.x) == 'table' and m.x or {}
  if x.subscription == sub and tonumber(x.period) and tonumber(x.period) < period then
    mine[#mine + 1] = {seq = seq, free = num(v[2])}
    total = total + num(v[2])
  end
end
table.sort(mine, function(a, b) return a.seq < b.seq end)

local excess, grants, trimmed = math.max(total - cap, 0), 0, 0
for _, g in ipairs(mine) do
  if cap == 0 then
    -- Ended: what returns from open holds to these grants expires then, not later.
    redis.call('HSET', acct, 'x:' .. g.seq, now_text)
  end
  local take = math.min(g.free, excess)
  if take > 0 then
    excess = excess - take
    redis.call('HINCRBY', acct, 'r:' .. g.seq, -take)
    redis.call('HINCRBY', acct, 'expired', take)
    local touched = settle_grants(acct, gord, gexp, user, {[g.seq] = true})
    emit(acct, gord, events, now, {id = op .. ':' .. g.seq, t = 'grant_expired', u = user,
                                   seq = g.seq, amt = fmt(take), g = touched})
    grants = grants + 1
    trimmed = trimmed + take
  end
end
local res = {grants = grants, credits = fmt(trimmed)}
op_record(opkey, fp, res, acct_state(acct, gord, now), retention)
return {'ok', cjson.encode(res)}
