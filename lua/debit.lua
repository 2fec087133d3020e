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
--@keys 9
--@include lib
local acct, gord, events, ready, opkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local named_hold, gexp, users = KEYS[6], KEYS[8], KEYS[9]
local now, retention, user, op = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
-- amount_text: the amount as given, kept verbatim in the fingerprint and the event.
local amount_text, meta, allow_debt = ARGV[5], ARGV[6], ARGV[7] == '1'
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
if not amount_arg(amount_text, 1) then return {'invalid_amount', '{}'} end
local amount = tonumber(amount_text)
-- A debit that may go into debt is another operation than one that may not: reusing the
-- operation id across the two is a conflict, not a replay.
local fp = 'debit|' .. amount_text .. (allow_debt and '|debt' or '')
local seen = op_replay(opkey, fp) or foreign_record(named_hold)
if seen then return seen end
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
  redis.call('SADD', users, user)  -- an account known by its debt alone is still listed
end
if amount - debt_added > 0 then redis.call('HINCRBY', acct, 'spent', amount - debt_added) end
local g = settle_grants(acct, gord, gexp, user, touched)
local ev = {id = op, t = 'debit', u = user, amt = amount_text, debt_added = fmt(debt_added), g = g, fp = fp,
            x = cjson.decode(meta)}
local res = {amount = amount_text, debt_added = fmt(debt_added)}
local st, out = emit(acct, gord, events, now, ev, res)
op_record(opkey, fp, res, st, retention)
return {'ok', out}
