-- restore_ops: writes what Redis keeps of operation ids to answer their replays, from the
-- store's records, after Redis lost its data (rehydrate). Writes no event. Never over what
-- Redis remembers already (an operation made since the partition re-opened).
-- KEYS[2i-1] operation i's operation-id key
-- KEYS[2i]   the hold hash that keeps the record of an operation under its default id (see
--            "Operation records" in lib.lua): the hold's for "!settle:<hold id>" /
--            "!release:<hold id>", else the one named by the operation id
--            (all keys of one partition)
-- ARGV[1] JSON array, one [operation id, fingerprint, answer (JSON, state included),
--         seconds to keep it] per operation
-- Returns how many were written (the others were remembered already).
--@keys 2+
--@include lib
local record_keys, ops = KEYS, cjson.decode(ARGV[1])
local written = 0
for i, o in ipairs(ops) do
  local opkey, hkey = record_keys[2 * i - 1], record_keys[2 * i]
  local op, fp, ttl = o[1], o[2], tonumber(o[4])
  if redis.call('EXISTS', opkey) == 0 then
    local kind, hid = string.match(fp, '^(%a+)|?([^|]*)')
    local res = cjson.decode(o[3])
    local st = res.state or {}
    local slot = nil
    if kind == 'reserve' and op == hid then
      slot = 'r'
    elseif (kind == 'settle' or kind == 'release') and op == '!' .. kind .. ':' .. hid then
      slot = 'q'
    end
    if not slot then
      op_record(opkey, fp, res, st, ttl)
      written = written + 1
    elseif redis.call('HEXISTS', hkey, slot .. 'f') == 0 then
      redis.call('HSET', hkey, slot .. 'f', kind .. string.sub(fp, #kind + #hid + 2),
                 slot .. 'a', csv(res, ANSWER_FIELDS[kind]), slot .. 's', csv(st, STATE_FIELDS))
      local status = redis.call('HGET', hkey, 'st')
      if not status and slot == 'q' then
        status = kind == 'settle' and 'settled' or 'released'
        redis.call('HSET', hkey, 'st', status)
      end
      -- An open hold keeps its hash; any other is kept for the retention, as when it resolved.
      if status ~= 'open' and redis.call('TTL', hkey) < ttl then redis.call('EXPIRE', hkey, ttl) end
      written = written + 1
    end
  end
end
return written
