-- debit: a charge drawn at once from free credit (grant that expires first). Without
-- allow_debt (the admin debit) it is refused when free credit is short. With allow_debt
-- (usage reported after its request settled) free credit covers what it can and the rest
-- is recorded as debt, as a settle's overage is; the account then cannot reserve until
-- the debt is repaid.
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key
-- KEYS[6] the hold hash named by the operation id (see "Operation records" in lib.lua)
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- ARGV[1] now (ms)  ARGV[2] retention of op and resolved-hold keys (s)  ARGV[3] user id
-- ARGV[4] operation id
-- ARGV[5] amount (micro-credits > 0)  ARGV[6] extra metadata (JSON object)
-- ARGV[7] allow_debt (optional): '1' = what free credit cannot cover becomes debt;
--         '' or absent = refuse when free credit is short
-- Returns {code, JSON}:
--   ok                    {amount, debt_added, state...}
--   exists                the first answer, for a replay with the same fields
--   op_conflict           the operation id was used with other fields
--   insufficient_credits  {available}; nothing changes (never with allow_debt)
--   invalid_amount        the amount is not a whole number of micro-credits in range
--   state_lost            the partition has not been rebuilt since Redis lost its data
--@include lib
if redis.call('EXISTS', KEYS[4]) == 0 then return {'state_lost', '{}'} end
if not amount_arg(ARGV[5], 1) then return {'invalid_amount', '{}'} end
local now, user, op, amount = tonumber(ARGV[1]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local allow_debt = ARGV[7] == '1'
-- A debit that may go into debt is another operation than one that may not: reusing the
-- operation id across the two is a conflict, not a replay.
local fp = 'debit|' .. ARGV[5] .. (allow_debt and '|debt' or '')
local seen = op_replay(KEYS[5], fp) or foreign_record(KEYS[6])
if seen then return seen end
local acct, gord = KEYS[1], KEYS[2]
local grants = live_grants(acct, gord, now)
local avail = sum_free(grants)
if avail < amount and not allow_debt then
  return {'insufficient_credits', cjson.encode({available = fmt(avail)})}
end
local touched = {}
local debt_added = draw(acct, grants, amount, touched, false, nil)
if debt_added > 0 then
  redis.call('HINCRBY', acct, 'debt', debt_added)
  redis.call('HINCRBY', acct, 'debt_total', debt_added)
  redis.call('SADD', KEYS[9], user)  -- an account known by its debt alone is still listed
end
if amount - debt_added > 0 then redis.call('HINCRBY', acct, 'spent', amount - debt_added) end
local g = settle_grants(acct, gord, KEYS[8], user, touched)
local ev = {id = op, t = 'debit', u = user, amt = ARGV[5], debt_added = fmt(debt_added), g = g, fp = fp,
            x = cjson.decode(ARGV[6])}
local res = {amount = ARGV[5], debt_added = fmt(debt_added)}
local st, out = emit(acct, gord, KEYS[3], now, ev, res)
op_record(KEYS[5], fp, res, st, ARGV[2])
return {'ok', out}
