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
--@include lib
if redis.call('EXISTS', KEYS[4]) == 0 then return {'state_lost', '{}'} end
local now, user, op, hid = tonumber(ARGV[1]), ARGV[3], ARGV[4], ARGV[5]
local fp = 'release|' .. hid
local own = op == '!release:' .. hid  -- the default id: the record lives in the hold hash
local seen = op_replay(KEYS[5], fp) or foreign_record(KEYS[12])
if seen then return seen end
local hold = redis.call('HMGET', KEYS[6], unpack(HOLD_FIELDS))
if own then
  seen = hold_replay(hid, hold[10], hold[11], hold[12], fp)
  if seen then return seen end
end
if not hold[3] and ARGV[7] == '1' then
  redis.call('HSET', KEYS[6], 'st', 'void')
  redis.call('EXPIRE', KEYS[6], ARGV[2])
  return {'hold_not_found', '{}'}
end
if not hold[1] or hold[3] ~= 'open' or now >= tonumber(hold[2]) then
  return hold_not_open(KEYS, now, user, hid, hold)
end
local out, res, st = resolve_hold(KEYS, now, user, hid, hold, 0, 'released', op, fp, own and 'release' or nil,
                                  cjson.decode(ARGV[6]))
-- Nothing was produced: the tokens the reserve counted come back (the request still counts).
if hold[5] then rate_adjust(KEYS[11], now, -tonumber(hold[5]), tonumber(hold[6])) end
if not own then op_record(KEYS[5], fp, res, st, ARGV[2]) end
return {'ok', out}
