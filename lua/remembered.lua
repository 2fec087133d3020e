-- remembered: what Redis keeps of an operation id to answer its replays (no change).
-- KEYS[1] operation-id key
-- KEYS[2] the hold hash that may keep the record instead (see "Operation records" in
--         lib.lua): the hold's for "!settle:<hold id>" / "!release:<hold id>", else the
--         one named by the operation id (a reserve under its default id)
-- ARGV[1] the hold id of KEYS[2]   ARGV[2] the kind of record kept there: settle, release
--         or reserve
-- Returns {code, JSON}:
--   ok    {fp, answer}: the operation's fingerprint and its answer (JSON text)
--   none  Redis keeps nothing of it (never seen, or past the retention)
--@keys 2
--@include lib
local opkey, hkey = KEYS[1], KEYS[2]
local hid, kind = ARGV[1], ARGV[2]
local fp, answer = op_read(opkey)
if not fp then
  local h = redis.call('HMGET', hkey, unpack(HOLD_FIELDS))
  local f, a, s = h[10], h[11], h[12]
  if kind == 'reserve' then f, a, s = h[7], h[8], h[9] end
  if f and string.match(f, '^%a+') == kind then fp, answer = hold_record(hid, f, a, s) end
end
if not fp then return {'none', '{}'} end
return {'ok', cjson.encode({fp = fp, answer = answer})}
