-- lease_drop: ends a lease taken with SET NX PX (gateway/payments/lock.py) if it is still
-- the caller's: one that lapsed and was taken by another process is left to that one.
-- KEYS[1] the lease   ARGV[1] the caller's token
-- Returns 1 dropped, 0 not ours (or gone).
--@keys 1
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
