-- release: voids an open hold; every earmarked unit returns to the grant it came from
-- (or expires, if that grant expired meanwhile).
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key        KEYS[6] hold hash
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- KEYS[10] unused (rate-limit overrides)   KEYS[11] account rate state (optional)
-- KEYS[12] (only when the operation id is not "!release:<hold id>") the hold hash named by
--          the operation id (see "Operation records" in lib.lua)
-- ARGV[1] now (ms)  ARGV[2] retention of op and resolved-hold keys (s)  ARGV[3] user id
-- ARGV[4] operation id
-- ARGV[5] hold id  ARGV[6] extra metadata (JSON object, carried in the event)
-- ARGV[7] '1': the hold may not exist yet (the give-back of a reserve whose answer was
--         lost); if it does not, leave a void marker so that reserve, should it still
--         arrive, finds the hold id taken and does nothing
-- Returns {code, JSON}:
--   ok                {hold_id, status, charged=0, held_amount, returned, lapsed, debt_added=0,
--                      debt_repaid (when > 0), state...}
--   exists            the first answer, for a replay with the same fields
--   op_conflict       the operation id was used with other fields
--   hold_not_found    no such hold on this account
--   already_settled / already_released   the hold was resolved before
--   hold_expired      the hold passed its timeout (it is expired now if it was not yet)
--   state_lost        the partition has not been rebuilt since Redis lost its data
--@keys 11-12
--@include lib
local acct, gord, events, ready, opkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local hkey, hexp, gexp, rates, named_hold = KEYS[6], KEYS[7], KEYS[8], KEYS[11], KEYS[12]
local now, retention, user, op = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local hid, meta, void_if_unknown = ARGV[5], ARGV[6], ARGV[7] == '1'
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
local fp = 'release|' .. hid
local own = op == '!release:' .. hid  -- the default id: the record lives in the hold hash
local seen = op_replay(opkey, fp) or foreign_record(named_hold)
if seen then return seen end
local hold = redis.call('HMGET', hkey, unpack(HOLD_FIELDS))
if own then
  seen = hold_replay(hid, hold[10], hold[11], hold[12], fp)
  if seen then return seen end
end
if not hold[3] and void_if_unknown then
  redis.call('HSET', hkey, 'st', 'void')
  redis.call('EXPIRE', hkey, retention)
  return {'hold_not_found', '{}'}
end
local A = {acct = acct, gord = gord, events = events, hexp = hexp, gexp = gexp,
           now = now, user = user, retention = retention}
if not hold[1] or hold[3] ~= 'open' or now >= tonumber(hold[2]) then
  return hold_not_open(A, hkey, hid, hold)
end
local out, res, st = resolve_hold(A, hkey, hid, hold, 0, 'released', op, fp, own and 'release' or nil,
                                  cjson.decode(meta))
-- Nothing was produced: the tokens the reserve counted come back (the request still counts).
if hold[5] then rate_adjust(rates, now, -tonumber(hold[5]), tonumber(hold[6])) end
if not own then op_record(opkey, fp, res, st, retention) end
return {'ok', out}
