-- restore_op: writes what Redis keeps of one operation id to answer its replays, from the
-- store's record, after Redis lost its data (rehydrate). Writes no event.
-- KEYS[1] operation-id key
-- KEYS[2] the hold hash that keeps the record of an operation under its default id (see
--         "Operation records" in lib.lua): the hold's for "!settle:<hold id>" /
--         "!release:<hold id>", else the one named by the operation id
-- ARGV[1] operation id  ARGV[2] fingerprint  ARGV[3] the answer (JSON, state included)
-- ARGV[4] how long to keep it (s)
-- Returns {code, JSON}:
--   ok       {}: written where the engine keeps it, in its compact form
--   skipped  {}: Redis remembers that operation already
--@include lib
local op, fp, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 1 then return {'skipped', '{}'} end
local kind, hid = string.match(fp, '^(%a+)|?([^|]*)')
local res = cjson.decode(ARGV[3])
local st = res.state or {}
local slot = nil
if kind == 'reserve' and op == hid then
  slot = 'r'
elseif (kind == 'settle' or kind == 'release') and op == '!' .. kind .. ':' .. hid then
  slot = 'q'
end
if not slot then
  op_record(KEYS[1], fp, res, st, ttl)
  return {'ok', '{}'}
end
if redis.call('HEXISTS', KEYS[2], slot .. 'f') == 1 then return {'skipped', '{}'} end
redis.call('HSET', KEYS[2], slot .. 'f', kind .. string.sub(fp, #kind + #hid + 2),
           slot .. 'a', csv(res, ANSWER_FIELDS[kind]), slot .. 's', csv(st, STATE_FIELDS))
local status = redis.call('HGET', KEYS[2], 'st')
if not status and slot == 'q' then
  status = kind == 'settle' and 'settled' or 'released'
  redis.call('HSET', KEYS[2], 'st', status)
end
-- An open hold keeps its hash; any other is kept for the retention, as when it resolved.
if status ~= 'open' and redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return {'ok', '{}'}
