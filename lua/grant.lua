-- grant: adds a grant of credits to an account. Repays debt first.
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key
-- KEYS[6] the hold hash named by the operation id (see "Operation records" in lib.lua)
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- ARGV[1] now (ms)  ARGV[2] retention of op keys (s)  ARGV[3] user id  ARGV[4] operation id
-- ARGV[5] amount (micro-credits > 0)  ARGV[6] expires_at (ms, 0 = never)  ARGV[7] priority
-- ARGV[8] source (payment|plan|promo|admin|refund)  ARGV[9] extra metadata (JSON object)
-- Returns {code, JSON}:
--   ok           {grant_seq, amount, debt_repaid, expires_at, state...}
--   exists       the first answer, for a replay with the same fields
--   op_conflict  the operation id was used with other fields
--   invalid_expiry  expires_at is not in the future
--   invalid_amount        the amount is not a whole number of micro-credits in range
--   state_lost   the partition has not been rebuilt since Redis lost its data
--@include lib
if redis.call('EXISTS', KEYS[4]) == 0 then return {'state_lost', '{}'} end
if not amount_arg(ARGV[5], 1) then return {'invalid_amount', '{}'} end
local now, retention, user, op = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local amount, exp, pri, src = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local fp = 'grant|' .. ARGV[5] .. '|' .. ARGV[6] .. '|' .. ARGV[7] .. '|' .. src
local seen = op_replay(KEYS[5], fp) or foreign_record(KEYS[6])
if seen then return seen end
if exp ~= 0 and (exp <= now or exp >= NEVER_MS) then return {'invalid_expiry', '{}'} end

local acct, gord = KEYS[1], KEYS[2]
local seq = string.format('%012d', redis.call('HINCRBY', acct, 'seq', 1))
redis.call('HINCRBY', acct, 'granted', amount)
local debt = num(redis.call('HGET', acct, 'debt'))
local repaid = math.min(debt, amount)
if repaid > 0 then
  redis.call('HINCRBY', acct, 'debt', -repaid)
  redis.call('HINCRBY', acct, 'spent', repaid)
end
local meta = {id = op, src = src, amt = ARGV[5], exp = ARGV[6], pri = ARGV[7], at = ARGV[1],
              x = cjson.decode(ARGV[9])}
local g = {}
local left = amount - repaid
if left > 0 then
  redis.call('HSET', acct, 'r:' .. seq, fmt(left), 'e:' .. seq, '0', 'x:' .. seq, ARGV[6],
             'm:' .. seq, cjson.encode(meta))
  redis.call('ZADD', gord, spend_score(exp, pri), seq)
  if exp ~= 0 then redis.call('ZADD', KEYS[8], exp, user .. '|' .. seq) end
  g[seq] = {r = fmt(left), e = '0'}
else
  g[seq] = 'gone'
end
redis.call('SADD', KEYS[9], user)
local ev = {id = op, t = 'grant', u = user, amt = ARGV[5], seq = seq, debt_repaid = fmt(repaid),
            g = g, gm = {[seq] = meta}, fp = fp}
local res = {grant_seq = seq, amount = ARGV[5], debt_repaid = fmt(repaid), expires_at = ARGV[6]}
local st, out = emit(acct, gord, KEYS[3], now, ev, res)
op_record(KEYS[5], fp, res, st, retention)
return {'ok', out}
