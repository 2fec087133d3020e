-- reserve: places a hold (a pending charge) on an account's credit, with a timeout.
-- KEYS[1] account hash        KEYS[2] account grant order (zset)   KEYS[3] partition events stream
-- KEYS[4] partition ready marker   KEYS[5] operation-id key        KEYS[6] hold hash
-- KEYS[7] partition hold expiry zset  KEYS[8] partition grant expiry zset  KEYS[9] partition users set
-- KEYS[10] account limits (hash: rpm, tpm the admin's overrides; prpm, ptpm the plan's;
--          models, the plan's allowed models as |a|b|)   KEYS[11] account rate state (hash)
-- KEYS[12] (only when the operation id is not the hold id) the hold hash named by the
--         operation id (see "Operation records" in lib.lua)
-- ARGV[1] now (ms)  ARGV[2] retention of op and resolved-hold keys (s)  ARGV[3] user id
-- ARGV[4] operation id
-- ARGV[5] hold id  ARGV[6] amount (micro-credits > 0)  ARGV[7] timeout (ms > 0)
-- ARGV[8] extra metadata (JSON object, kept on the hold and in the event)
-- ARGV[9] default requests per minute  ARGV[10] default tokens per minute (0 = no limit;
--         the account's overrides win)  ARGV[11] tokens this call may use ('' = not rate limited)
-- ARGV[12] the partition stream's backlog limit, in entries (0 = none): at it, new holds
--         are refused until the worker has persisted and trimmed the stream
-- ARGV[13] the model asked for ('' = not checked): refused unless the account's plan allows it
-- Returns {code, JSON}:
--   ok                    {hold_id, amount, expires_at, state...}
--   exists                the first answer, for a replay with the same fields
--   op_conflict           the operation id was used with other fields
--   hold_exists           the hold id is already taken (by another operation)
--   backlog_full          {backlog, limit}: the partition stream holds ARGV[12] entries the
--                         worker has not persisted yet; nothing changes (retry later)
--   model_not_allowed     {model}: the account's plan does not include the model; nothing changes
--   in_debt               the account owes credits and cannot reserve until repaid {debt}
--   insufficient_credits  {available}; nothing changes
--   rate_limited          {limit, value, retry_after_ms}; retry_after_ms -1: the call's tokens
--                         exceed the limit itself and it can never pass; nothing changes
--   invalid_amount        the amount or timeout is not a whole number in range
--   state_lost            the partition has not been rebuilt since Redis lost its data
--@keys 11-12
--@include lib
local acct, gord, events, ready, opkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local hkey, hexp, gexp = KEYS[6], KEYS[7], KEYS[8]
local limits, rates, named_hold = KEYS[10], KEYS[11], KEYS[12]
local now_text, retention, user, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = tonumber(now_text)
-- The *_text arguments go verbatim into the fingerprint, the hold and the event.
local hid, amount_text, ttl_text, meta = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local default_rpm, default_tpm, call_tokens, max_backlog = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local model = ARGV[13] or ''
if redis.call('EXISTS', ready) == 0 then return {'state_lost', '{}'} end
if not amount_arg(amount_text, 1) then return {'invalid_amount', '{}'} end
local amount, ttl = tonumber(amount_text), tonumber(ttl_text)
if not amount_arg(ttl_text, 1) then return {'invalid_amount', '{}'} end
local tail = '|' .. amount_text .. '|' .. ttl_text
local fp = 'reserve|' .. hid .. tail
local seen = op_replay(opkey, fp) or foreign_record(named_hold)
if seen then return seen end
if redis.call('EXISTS', hkey) == 1 then
  if op == hid then
    local r = redis.call('HMGET', hkey, 'rf', 'ra', 'rs')
    seen = hold_replay(hid, r[1], r[2], r[3], fp)
    if seen then return seen end
  end
  return {'hold_exists', '{}'}
end
local limit = tonumber(max_backlog) or 0
if limit > 0 then
  local backlog = redis.call('XLEN', events)
  if backlog >= limit then
    return {'backlog_full', cjson.encode({backlog = backlog, limit = limit})}
  end
end

local rated = call_tokens and call_tokens ~= ''
local lim
if rated or model ~= '' then lim = redis.call('HMGET', limits, 'rpm', 'tpm', 'prpm', 'ptpm', 'models') end
if model ~= '' and lim[5] and not string.find(lim[5], '|' .. model .. '|', 1, true) then
  return {'model_not_allowed', cjson.encode({model = model})}
end

local debt = num(redis.call('HGET', acct, 'debt'))
if debt > 0 then return {'in_debt', cjson.encode({debt = fmt(debt)})} end

-- Rate limits are checked before credit, and take effect only with the hold. The admin's
-- override beats the plan's limit, which beats the gateway's default.
local rq, tk, tokens, tk_interval = nil, nil, 0, 0
if rated then
  tokens = tonumber(call_tokens) or 0
  local rpm = tonumber(lim[1]) or tonumber(lim[3]) or num(default_rpm)
  local tpm = tonumber(lim[2]) or tonumber(lim[4]) or num(default_tpm)
  local tat = redis.call('HMGET', rates, 'rq', 'tk')
  local wait
  if rpm > 0 then
    rq, wait = gcra(num(tat[1]), now, 1, rpm)
    if wait > 0 then
      return {'rate_limited', cjson.encode({limit = 'requests_per_minute', value = fmt(rpm),
                                            retry_after_ms = fmt(math.ceil(wait))})}
    end
  end
  if tpm > 0 and tokens > 0 then
    if tokens > tpm then
      return {'rate_limited', cjson.encode({limit = 'tokens_per_minute', value = fmt(tpm), retry_after_ms = '-1'})}
    end
    tk, wait = gcra(num(tat[2]), now, tokens, tpm)
    if wait > 0 then
      return {'rate_limited', cjson.encode({limit = 'tokens_per_minute', value = fmt(tpm),
                                            retry_after_ms = fmt(math.ceil(wait))})}
    end
    tk_interval = RATE_WINDOW_MS / tpm
  end
end

local grants = live_grants(acct, gord, now)
local avail = sum_free(grants)
if avail < amount then return {'insufficient_credits', cjson.encode({available = fmt(avail)})} end
if rq or tk then rate_store(rates, now, rq, tk) end

local touched, parts = {}, {}
draw(acct, grants, amount, touched, true, parts)
local exp = now + ttl
local ear = table.concat(parts, ',')
redis.call('HINCRBY', acct, 'held', amount)
redis.call('HSET', acct, 'o:' .. hid, amount_text .. ':' .. fmt(exp))
redis.call('ZADD', hexp, exp, user .. '|' .. hid)
local g = settle_grants(acct, gord, gexp, user, touched)
local ev = {id = op, t = 'hold_open', u = user, hold = hid, amt = amount_text, g = g, fp = fp,
            h = {id = hid, st = 'open', amt = amount_text, exp = fmt(exp), ear = ear, at = now_text, op = op},
            x = cjson.decode(meta)}
local res = {hold_id = hid, amount = amount_text, expires_at = fmt(exp)}
local st, out = emit(acct, gord, events, now, ev, res)
local h = {'amt', amount_text, 'exp', fmt(exp), 'st', 'open', 'ear', ear, 'at', now_text, 'op', op, 'x', meta}
if tk then
  h[15], h[16], h[17], h[18] = 'tk', fmt(tokens), 'tki', string.format('%.6f', tk_interval)
end
if op == hid then
  local n = #h
  h[n + 1], h[n + 2] = 'rf', 'reserve' .. tail
  h[n + 3], h[n + 4] = 'ra', csv(res, ANSWER_FIELDS.reserve)
  h[n + 5], h[n + 6] = 'rs', csv(st, STATE_FIELDS)
else
  op_record(opkey, fp, res, st, retention)
end
redis.call('HSET', hkey, unpack(h))
return {'ok', out}
