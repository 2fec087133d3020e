-- rebuild_lease: one process at a time rebuilds a partition (gateway/core/recovery.py).
-- The lease lives on the partition's own node, so Redis losing the partition loses the
-- lease with it: a rebuild that sees its lease gone knows its writes may be gone too.
-- KEYS[1] partition rebuild lease   KEYS[2] partition ready marker
-- ARGV[1] 'take' | 'renew' | 'done' | 'drop'   ARGV[2] the rebuilder's token
-- ARGV[3] lease time (ms)   ARGV[4] take only: '1' to rebuild a partition that is ready
-- Returns an integer:
--   take   1 taken; 0 another process holds it; 2 the partition is ready (nothing to do)
--   renew  1 extended; 0 the lease is no longer ours
--   done   1 the ready marker is set (and the lease dropped); 0 the lease is no longer
--          ours, so the marker is not set: the partition is rebuilt again
--   drop   1 dropped; 0 it was not ours
--@keys 2
local lease, ready = KEYS[1], KEYS[2]
local op, token, lease_ms, even_if_ready = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
if op == 'take' then
  if not even_if_ready and redis.call('EXISTS', ready) == 1 then return 2 end
  if redis.call('SET', lease, token, 'NX', 'PX', lease_ms) then return 1 end
  return 0
end
if redis.call('GET', lease) ~= token then return 0 end
if op == 'renew' then
  redis.call('PEXPIRE', lease, lease_ms)
elseif op == 'done' then
  redis.call('SET', ready, '1')
  redis.call('DEL', lease)
elseif op == 'drop' then
  redis.call('DEL', lease)
else
  return redis.error_reply('unknown rebuild_lease op ' .. tostring(op))
end
return 1
