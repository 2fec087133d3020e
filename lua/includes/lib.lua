-- Shared helpers, inlined by the script registry wherever a script says `--@include lib`.
-- Amounts are integer micro-credits held in Lua doubles: every amount stays below 2^53,
-- and numbers are turned into strings with string.format('%d') (tostring would print
-- 1.2345678901234e+14 and lose digits).
--
-- Account hash fields (KEYS[1] of every account script):
--   v        version, +1 on every state change
--   seq      last grant sequence number
--   held     sum of open holds        debt     charges no grant could cover
--   granted  / spent / expired        running totals, for the conservation check
--   r:<seq>  grant's free remainder   e:<seq>  grant's earmarked (held) amount
--   x:<seq>  grant's expiry (ms, 0 = never)   m:<seq>  grant's metadata (JSON)
--   o:<hid>  open hold "<amount>:<expires_ms>"

local function fmt(n) return string.format('%d', n) end
local function num(x) return tonumber(x) or 0 end

-- Operation records: an operation's answer, kept for the retention so that a replay with
-- the same fields answers it again (the state included: the state right after it). Kept
-- compact: the answer's fields of its kind (ANSWER_FIELDS; the hold id is left out, it is
-- in the fingerprint) comma-separated, and the state's fields (STATE_FIELDS) likewise.
-- Where:
--   the operation-id key  "<fp>\n<answer>\n<state>", for grants, debits, and hold
--                         operations under an id of the caller's; a rebuilt Redis writes
--                         "<fp>\n<JSON answer>" there (recovery.rehydrate), answered as is;
--   the hold hash         for a hold operation under its default id (reserve: the hold id;
--                         settle / release: "!settle:<hold>" / "!release:<hold>"): fields
--                         rf, ra, rs (the reserve) and qf, qa, qs (what resolved the hold),
--                         the fingerprint without its "|<hold id>" part. No key of its own:
--                         that saves a Redis key per operation.
-- An id of the caller's may name a hold whose reserve kept its record there: every script
-- that takes one also checks that hold hash (`foreign_record`), so that id conflicts.
local STATE_FIELDS = {'v', 'available', 'held', 'debt', 'granted', 'spent', 'expired', 'seq', 'debt_total'}
local ANSWER_FIELDS = {
  reserve = {'amount', 'expires_at'},
  settle = {'status', 'charged', 'held_amount', 'returned', 'lapsed', 'debt_added', 'debt_repaid'},
  release = {'status', 'charged', 'held_amount', 'returned', 'lapsed', 'debt_added', 'debt_repaid'},
  grant = {'grant_seq', 'amount', 'debt_repaid', 'expires_at'},
  debit = {'amount', 'debt_added'},
  trim = {'grants', 'credits'},
}
local HOLD_KINDS = {reserve = true, settle = true, release = true}
local CONFLICT = {'op_conflict', cjson.encode({reason = 'operation id already used with other fields'})}

-- A field the answer does not have is an empty value, and stays absent.
local function csv(t, fields)
  local out = {}
  for i, f in ipairs(fields) do out[i] = t[f] or '' end
  return table.concat(out, ',')
end

local function from_csv(s, fields, into)
  local i, pos = 1, 1
  while true do
    local sep = string.find(s, ',', pos, true)
    local v = string.sub(s, pos, (sep or 0) - 1)
    if v ~= '' then into[fields[i]] = v end
    if not sep then return into end
    i, pos = i + 1, sep + 1
  end
end

-- The answer (JSON) of a record: `fp` is the full fingerprint "<kind>|<hold id>|...".
local function record_answer(fp, answer, state)
  local kind, hid = string.match(fp, '^(%a+)|?([^|]*)')
  local res = from_csv(answer, ANSWER_FIELDS[kind], {})
  if HOLD_KINDS[kind] then res.hold_id = hid end
  res.state = from_csv(state, STATE_FIELDS, {})
  return cjson.encode(res)
end

-- What an operation-id key keeps: the fingerprint and the answer (JSON), or nil.
local function op_read(opkey)
  local prev = redis.call('GET', opkey)
  if not prev then return nil end
  local sep = string.find(prev, '\n', 1, true)
  local fp = string.sub(prev, 1, sep - 1)
  local sep2 = string.find(prev, '\n', sep + 1, true)
  if not sep2 then return fp, string.sub(prev, sep + 1) end  -- JSON, from a rebuild
  return fp, record_answer(fp, string.sub(prev, sep + 1, sep2 - 1), string.sub(prev, sep2 + 1))
end

-- The same operation id seen before (in its key): the stored answer when the fields
-- match, op_conflict when they do not, nil for a new operation.
local function op_replay(opkey, fp)
  local seen, answer = op_read(opkey)
  if not seen then return nil end
  if seen ~= fp then return CONFLICT end
  return {'exists', answer}
end

local function op_record(opkey, fp, res, st, retention)
  redis.call('SET', opkey, fp .. '\n' .. csv(res, ANSWER_FIELDS[string.match(fp, '^%a+')]) .. '\n' ..
             csv(st, STATE_FIELDS), 'EX', retention)
end

-- A record kept in the hash of hold `hid` (f: its fingerprint without "|<hold id>"):
-- the full fingerprint and the answer (JSON).
local function hold_record(hid, f, a, s)
  local kind, rest = string.match(f, '^(%a+)(.*)$')
  local fp = kind .. '|' .. hid .. rest
  return fp, record_answer(fp, a, s)
end

-- The replay or the conflict for the operation of fingerprint `fp` on hold `hid`, when the
-- hold hash keeps a record (f, a, s) of an operation of the same kind; else nil.
local function hold_replay(hid, f, a, s, fp)
  if not f or string.match(f, '^%a+') ~= string.match(fp, '^%a+') then return nil end
  local seen, answer = hold_record(hid, f, a, s)
  if seen ~= fp then return CONFLICT end
  return {'exists', answer}
end

-- An id of the caller's that is also a hold id whose reserve kept its record in the hold
-- hash `hkey` (nil: no such key passed): op_conflict, as if that record were in its key.
local function foreign_record(hkey)
  if hkey and redis.call('HEXISTS', hkey, 'rf') == 1 then return CONFLICT end
  return nil
end

-- Hold hash fields (KEYS[6] of reserve / settle / release): while open amt, exp (ms),
-- st = 'open', ear (earmarks "seq=amt,..." in spend order), at, op, x (caller metadata,
-- JSON), tk, tki (tokens the reserve counted, ms per token), and the reserve's record; once
-- resolved only st ('settled' | 'released' | 'expired') and the records. A give-back's void
-- marker: st = 'void'.
-- The fields every script reads of a hold hash, in this order: hold[1..12].
local HOLD_FIELDS = {'amt', 'exp', 'st', 'ear', 'tk', 'tki', 'rf', 'ra', 'rs', 'qf', 'qa', 'qs'}

local function expired_at(x, now) return x > 0 and now >= x end

-- Unexpired grants in spend order (expires first, then priority, then oldest).
local function live_grants(acct, gord, now)
  local seqs = redis.call('ZRANGE', gord, 0, -1)
  local out = {}
  if #seqs == 0 then return out end
  local fields = {}
  for i, s in ipairs(seqs) do
    fields[2 * i - 1] = 'r:' .. s
    fields[2 * i] = 'x:' .. s
  end
  local vals = redis.call('HMGET', acct, unpack(fields))
  for i, s in ipairs(seqs) do
    local free = num(vals[2 * i - 1])
    if free > 0 and not expired_at(num(vals[2 * i]), now) then
      out[#out + 1] = {seq = s, free = free}
    end
  end
  return out
end

-- A grant's place in the spend order: expiry (ms; never = 2^43-1, after any expiry the
-- engine accepts), then priority (0..1000, lower first); equal scores fall back to the
-- member, the zero-padded sequence (oldest first). The score stays below 2^53.
local NEVER_MS = 8796093022207
local function spend_score(expires_ms, priority)
  return (expires_ms == 0 and NEVER_MS or expires_ms) * 1024 + priority
end

-- An amount argument: a whole number of micro-credits in [min, 2^53). Checked before any
-- write, so a bad argument never leaves a half-done change.
local function amount_arg(x, min)
  local n = tonumber(x)
  if not n or n ~= math.floor(n) or n < min or n >= 9007199254740992 then return nil end
  return n
end

local function sum_free(grants)
  local t = 0
  for _, g in ipairs(grants) do t = t + g.free end
  return t
end

-- Draws `amount` from live grants in order; returns what it could not cover.
-- `earmark` moves the drawn amounts to e:<seq> (a hold) instead of spending them.
local function draw(acct, grants, amount, touched, earmark, parts)
  local left = amount
  for _, g in ipairs(grants) do
    if left <= 0 then break end
    local take = math.min(g.free, left)
    if take > 0 then
      redis.call('HINCRBY', acct, 'r:' .. g.seq, -take)
      if earmark then redis.call('HINCRBY', acct, 'e:' .. g.seq, take) end
      if parts then parts[#parts + 1] = g.seq .. '=' .. fmt(take) end
      touched[g.seq] = true
      left = left - take
    end
  end
  return left
end

-- A grant with nothing free and nothing earmarked is gone from Redis (the store keeps it).
-- Returns the touched grants' new state for the event: {seq = {r, e}} or {seq = 'gone'}.
local function settle_grants(acct, gord, gexp, user, touched)
  local out = {}
  for seq, _ in pairs(touched) do
    local v = redis.call('HMGET', acct, 'r:' .. seq, 'e:' .. seq)
    local r, e = num(v[1]), num(v[2])
    if r <= 0 and e <= 0 then
      redis.call('HDEL', acct, 'r:' .. seq, 'e:' .. seq, 'x:' .. seq, 'm:' .. seq)
      redis.call('ZREM', gord, seq)
      redis.call('ZREM', gexp, user .. '|' .. seq)
      out[seq] = 'gone'
    else
      out[seq] = {r = fmt(r), e = fmt(e)}
    end
  end
  return out
end

-- Returns a hold's earmarks ("seq=amt,...", in spend order): the first `charge` units are
-- spent, the rest go back to their grants, or to `expired` when the grant has expired.
-- Returns spent, returned, expired.
local function resolve_earmarks(acct, ear, charge, now, touched)
  local spent, back, lapsed = 0, 0, 0
  for seq, amt in string.gmatch(ear or '', '([^=,]+)=(%d+)') do
    amt = tonumber(amt)
    local use = math.min(amt, charge - spent)
    local rest = amt - use
    spent = spent + use
    redis.call('HINCRBY', acct, 'e:' .. seq, -amt)
    if rest > 0 then
      if expired_at(num(redis.call('HGET', acct, 'x:' .. seq)), now) then
        lapsed = lapsed + rest
      else
        redis.call('HINCRBY', acct, 'r:' .. seq, rest)
        back = back + rest
      end
    end
    touched[seq] = true
  end
  return spent, back, lapsed
end

-- The account's state after a change, as carried by every event and answer.
local function acct_state(acct, gord, now)
  local h = redis.call('HMGET', acct, 'v', 'held', 'debt', 'granted', 'spent', 'expired', 'seq', 'debt_total')
  return {
    v = fmt(num(h[1])), available = fmt(sum_free(live_grants(acct, gord, now))),
    held = fmt(num(h[2])), debt = fmt(num(h[3])), granted = fmt(num(h[4])),
    spent = fmt(num(h[5])), expired = fmt(num(h[6])), seq = fmt(num(h[7])), debt_total = fmt(num(h[8])),
  }
end

-- Bumps the version and appends the one event of this change to the partition stream.
-- `res` (optional) is the operation's answer. It travels in the event too (without the
-- state, which is the event's `a`), so a rebuilt Redis can answer a replay the same way.
-- Returns the state and the answer as JSON (state included).
local function emit(acct, gord, events, now, ev, res)
  redis.call('HINCRBY', acct, 'v', 1)
  local st = acct_state(acct, gord, now)
  ev.v = st.v
  ev.a = st
  ev.ts = fmt(now)
  ev.res = res
  redis.call('XADD', events, '*', 'e', cjson.encode(ev))
  local out = nil
  if res then
    res.state = st
    out = cjson.encode(res)
  end
  return st, out
end

-- Resolves an open hold (settle with `charge`, or release / expire with 0) and emits the
-- event. Overage (charge above the hold) is drawn from free credit; what is still missing
-- becomes debt. Credit that returns to the grants repays debt first (the account can
-- reserve again as soon as it owes nothing). `hold` is HMGET(hold key, HOLD_FIELDS).
-- `sfp`: the short fingerprint when the operation runs under its default id (its record
-- is then kept in the hold hash), else nil. Returns the answer (JSON), the answer table
-- and the state (nil, nil, state for an expiry).
-- The resolved hold hash keeps only what later calls read: its status (already_settled...)
-- and the records of the reserve and of this resolution, for replays; it is rewritten so
-- that Redis stores it small (listpack) again, and kept for the retention.
-- `A`: the call's account: {acct, gord, events, hexp, gexp} (its keys: account hash, grant
-- order, partition stream, hold and grant expiry zsets), now (ms), user, and retention (s),
-- how long the resolved hold hash is kept. `hkey`: the hold hash of hold `hid`.
local function resolve_hold(A, hkey, hid, hold, charge, state, op, fp, sfp, extra)
  local acct, gord, now, user = A.acct, A.gord, A.now, A.user
  local amt = num(hold[1])
  local touched = {}
  local spent, back, lapsed = resolve_earmarks(acct, hold[4], charge, now, touched)
  local over, debt_added, repaid = charge - spent, 0, 0
  if over > 0 then
    debt_added = draw(acct, live_grants(acct, gord, now), over, touched, false, nil)
    if debt_added > 0 then
      redis.call('HINCRBY', acct, 'debt', debt_added)
      redis.call('HINCRBY', acct, 'debt_total', debt_added)
    end
  elseif back > 0 then
    local debt = num(redis.call('HGET', acct, 'debt'))
    if debt > 0 then
      -- In debt, the account had no free credit left: what is drawn here is what just returned.
      repaid = math.min(debt, back)
      draw(acct, live_grants(acct, gord, now), repaid, touched, false, nil)
      redis.call('HINCRBY', acct, 'debt', -repaid)
    end
  end
  redis.call('HINCRBY', acct, 'held', -amt)
  if charge - debt_added + repaid > 0 then redis.call('HINCRBY', acct, 'spent', charge - debt_added + repaid) end
  if lapsed > 0 then redis.call('HINCRBY', acct, 'expired', lapsed) end
  redis.call('HDEL', acct, 'o:' .. hid)
  redis.call('ZREM', A.hexp, user .. '|' .. hid)
  local g = settle_grants(acct, gord, A.gexp, user, touched)
  local ev = {
    id = op, t = 'hold_' .. state, u = user, hold = hid, amt = fmt(charge),
    held_amt = fmt(amt), returned = fmt(back), lapsed = fmt(lapsed),
    debt_added = fmt(debt_added), g = g, fp = fp,
    h = {id = hid, st = state, amt = fmt(amt), fin = fmt(charge), exp = hold[2]},
  }
  if extra then ev.x = extra end
  local res = nil
  if fp then
    res = {hold_id = hid, status = state, charged = fmt(charge), held_amount = fmt(amt),
           returned = fmt(back), lapsed = fmt(lapsed), debt_added = fmt(debt_added)}
  end
  -- debt_repaid only when there was debt to repay (absent = 0): a settle's event is about
  -- 1 KB, and a few bytes more cost a quarter more stream memory (docs/sizing.md).
  if repaid > 0 then
    ev.debt_repaid = fmt(repaid)
    if res then res.debt_repaid = ev.debt_repaid end
  end
  local st, out = emit(acct, gord, A.events, now, ev, res)
  local keep = {'st', state}
  if hold[7] then
    keep[3], keep[4], keep[5], keep[6], keep[7], keep[8] = 'rf', hold[7], 'ra', hold[8], 'rs', hold[9]
  end
  if sfp then
    local n = #keep
    keep[n + 1], keep[n + 2] = 'qf', sfp
    keep[n + 3], keep[n + 4] = 'qa', csv(res, ANSWER_FIELDS[state == 'settled' and 'settle' or 'release'])
    keep[n + 5], keep[n + 6] = 'qs', csv(st, STATE_FIELDS)
  end
  redis.call('DEL', hkey)
  redis.call('HSET', hkey, unpack(keep))
  redis.call('EXPIRE', hkey, A.retention)
  return out, res, st
end

-- Settle / release of a hold that is not open: a named answer. A hold past its timeout
-- that the sweeper has not reached yet is expired here, so a late settle never posts.
-- `A`, `hkey`: as for resolve_hold.
local function hold_not_open(A, hkey, hid, hold)
  local st = hold[3]
  if not st or st == 'void' then return {'hold_not_found', '{}'} end
  if st == 'open' then
    resolve_hold(A, hkey, hid, hold, 0, 'expired', '!expire:' .. hid, nil, nil, nil)
    return {'hold_expired', '{}'}
  end
  local names = {settled = 'already_settled', released = 'already_released', expired = 'hold_expired'}
  return {names[st] or 'hold_not_found', cjson.encode({status = st})}
end

-- Rate limits: GCRA (the generic cell rate algorithm) over one minute. The rate hash keeps
-- one "theoretical arrival time" (ms) per limit: rq for requests, tk for tokens. A limit of
-- L per minute lets a minute's worth through at once, then one unit every 60000/L ms.
-- Returns the new time, and how long (ms) the caller must wait when it is > 0.
local RATE_WINDOW_MS = 60000
local function gcra(tat, now, cost, per_min)
  local new = math.max(tat, now) + cost * RATE_WINDOW_MS / per_min
  return new, new - now - RATE_WINDOW_MS
end

-- Writes rate times and keeps the hash only as long as one of them is in the future.
local function rate_store(rkey, now, rq, tk)
  if rq then redis.call('HSET', rkey, 'rq', string.format('%.3f', rq)) end
  if tk then redis.call('HSET', rkey, 'tk', string.format('%.3f', tk)) end
  local t = redis.call('HMGET', rkey, 'rq', 'tk')
  local last = math.max(num(t[1]), num(t[2]))
  redis.call('PEXPIRE', rkey, math.max(math.ceil(last - now), 0) + 1000)
end

-- Moves the tokens time by `delta` tokens of `interval` ms each: a settle replaces the
-- reserved worst case with the real count, a release gives all of it back.
local function rate_adjust(rkey, now, delta, interval)
  if not rkey or delta == 0 or not interval or interval <= 0 then return end
  local tat = num(redis.call('HGET', rkey, 'tk'))
  if delta > 0 then
    tat = math.max(tat, now) + delta * interval
  else
    if tat <= now then return end  -- already refilled: nothing to give back
    tat = math.max(tat + delta * interval, now)
  end
  rate_store(rkey, now, nil, tat)
end
