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
--@keys 9
--@include lib
local acct, gord, events, ready, opkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local named_hold, gexp, users = KEYS[6], KEYS[8], KEYS[9]
local now_text, retention, user, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = tonumber(now_text)
-- The *_text arguments go verbatim into the fingerprint, the grant's metadata and the event.
local amount_text, exp_text, pri_text, src, meta = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
if not amount_arg(amount_text, 1) then return {'invalid_amount', '{}'} end
local amount, exp, pri = tonumber(amount_text), tonumber(exp_text), tonumber(pri_text)
local fp = 'grant|' .. amount_text .. '|' .. exp_text .. '|' .. pri_text .. '|' .. src
local seen = op_replay(opkey, fp) or foreign_record(named_hold)
if seen then return seen end
if exp ~= 0 and (exp <= now or exp >= NEVER_MS) then return {'invalid_expiry', '{}'} end

local seq = string.format('%012d', redis.call('HINCRBY', acct, 'seq', 1))
redis.call('HINCRBY', acct, 'granted', amount)
local debt = num(redis.call('HGET', acct, 'debt'))
local repaid = math.min(debt, amount)
if repaid > 0 then
  redis.call('HINCRBY', acct, 'debt', -repaid)
  redis.call('HINCRBY', acct, 'spent', repaid)
end
local grant_meta = {id = op, src = src, amt = amount_text, exp = exp_text, pri = pri_text, at = now_text,
                    x = cjson.decode(meta)}
local g = {}
local left = amount - repaid
if left > 0 then
  redis.call('HSET', acct, 'r:' .. seq, fmt(left), 'e:' .. seq, '0', 'x:' .. seq, exp_text,
             'm:' .. seq, cjson.encode(grant_meta))
  redis.call('ZADD', gord, spend_score(exp, pri), seq)
  if exp ~= 0 then redis.call('ZADD', gexp, exp, user .. '|' .. seq) end
  g[seq] = {r = fmt(left), e = '0'}
else
  g[seq] = 'gone'
end
redis.call('SADD', users, user)
local ev = {id = op, t = 'grant', u = user, amt = amount_text, seq = seq, debt_repaid = fmt(repaid),
            g = g, gm = {[seq] = grant_meta}, fp = fp}
local res = {grant_seq = seq, amount = amount_text, debt_repaid = fmt(repaid), expires_at = exp_text}
local st, out = emit(acct, gord, events, now, ev, res)
op_record(opkey, fp, res, st, retention)
return {'ok', out}
