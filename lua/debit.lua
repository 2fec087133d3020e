-- debit: an admin charge, drawn at once from free credit (grant that expires first).
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key
-- KEYS[6] the hold hash named by the operation id (see "Operation records" in lib.lua)
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- ARGV[1] now (ms)  ARGV[2] retention of op and resolved-hold keys (s)  ARGV[3] user id
-- ARGV[4] operation id
-- ARGV[5] amount (micro-credits > 0)  ARGV[6] extra metadata (JSON object)
-- Returns {code, JSON}:
--   ok                    {amount, state...}
--   exists                the first answer, for a replay with the same fields
--   op_conflict           the operation id was used with other fields
--   insufficient_credits  {available}; nothing changes
--   invalid_amount        the amount is not a whole number of micro-credits in range
--   state_lost            the partition has not been rebuilt since Redis lost its data
--@include lib
if redis.call('EXISTS', KEYS[4]) == 0 then return {'state_lost', '{}'} end
if not amount_arg(ARGV[5], 1) then return {'invalid_amount', '{}'} end
local now, user, op, amount = tonumber(ARGV[1]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local fp = 'debit|' .. ARGV[5]
local seen = op_replay(KEYS[5], fp) or foreign_record(KEYS[6])
if seen then return seen end
local acct, gord = KEYS[1], KEYS[2]
local grants = live_grants(acct, gord, now)
local avail = sum_free(grants)
if avail < amount then return {'insufficient_credits', cjson.encode({available = fmt(avail)})} end
local touched = {}
draw(acct, grants, amount, touched, false, nil)
redis.call('HINCRBY', acct, 'spent', amount)
local g = settle_grants(acct, gord, KEYS[8], user, touched)
local ev = {id = op, t = 'debit', u = user, amt = ARGV[5], g = g, fp = fp, x = cjson.decode(ARGV[6])}
local res = {amount = ARGV[5]}
local st, out = emit(acct, gord, KEYS[3], now, ev, res)
op_record(KEYS[5], fp, res, st, ARGV[2])
return {'ok', out}
