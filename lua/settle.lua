-- settle: posts an open hold at the real cost. Up to the hold, the rest returns to the
-- grants it came from; above it, the overage is drawn from free credit and what is still
-- missing is recorded as debt (the account cannot reserve until it is repaid).
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key        KEYS[6] hold hash
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- KEYS[10] unused (rate-limit overrides)   KEYS[11] account rate state (optional)
-- KEYS[12] (only when the operation id is not "!settle:<hold id>") the hold hash named by
--          the operation id (see "Operation records" in lib.lua)
-- ARGV[1] now (ms)  ARGV[2] retention of op and resolved-hold keys (s)  ARGV[3] user id
-- ARGV[4] operation id
-- ARGV[5] hold id  ARGV[6] amount to charge (micro-credits >= 0)
-- ARGV[7] extra metadata (JSON object, carried in the event: request id, usage...)
-- ARGV[8] tokens the call really used ('' = unknown): corrects the tokens-per-minute
--         count the reserve charged with its worst case
-- Returns {code, JSON}:
--   ok                {hold_id, status, charged, held_amount, returned, lapsed, debt_added,
--                      debt_repaid (when > 0), state...}
--   exists            the first answer, for a replay with the same fields
--   op_conflict       the operation id was used with other fields
--   hold_not_found    no such hold on this account
--   already_settled / already_released   the hold was resolved before
--   hold_expired      the hold passed its timeout (it is expired now if it was not yet)
--   invalid_amount        the amount is not a whole number of micro-credits in range
--   state_lost        the partition has not been rebuilt since Redis lost its data
--@keys 11-12
--@include lib
local acct, gord, events, ready, opkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local hkey, hexp, gexp, rates, named_hold = KEYS[6], KEYS[7], KEYS[8], KEYS[11], KEYS[12]
local now, retention, user, op = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
-- charge_text: the amount as given, kept verbatim in the fingerprint.
local hid, charge_text, meta, used_tokens = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
if not amount_arg(charge_text, 0) then return {'invalid_amount', '{}'} end
local tail = '|' .. charge_text
local fp = 'settle|' .. hid .. tail
local own = op == '!settle:' .. hid  -- the default id: the record lives in the hold hash
local seen = op_replay(opkey, fp) or foreign_record(named_hold)
if seen then return seen end
local hold = redis.call('HMGET', hkey, unpack(HOLD_FIELDS))
if own then
  seen = hold_replay(hid, hold[10], hold[11], hold[12], fp)
  if seen then return seen end
end
local A = {acct = acct, gord = gord, events = events, hexp = hexp, gexp = gexp,
           now = now, user = user, retention = retention}
if not hold[1] or hold[3] ~= 'open' or now >= tonumber(hold[2]) then
  return hold_not_open(A, hkey, hid, hold)
end
local out, res, st = resolve_hold(A, hkey, hid, hold, tonumber(charge_text), 'settled', op, fp,
                                  own and 'settle' .. tail or nil, cjson.decode(meta))
if hold[5] and used_tokens and used_tokens ~= '' then
  rate_adjust(rates, now, (tonumber(used_tokens) or 0) - tonumber(hold[5]), tonumber(hold[6]))
end
if not own then op_record(opkey, fp, res, st, retention) end
return {'ok', out}
