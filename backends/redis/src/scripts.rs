//! Lua scripts: each runs atomically on the server, so any number of workers may run them at once.

use redis::Script;
use std::sync::LazyLock;

/// Moves due messages of one queue into its stream. KEYS[1] = the queue's delay set, KEYS[2] =
/// its stream, KEYS[3..] = the hashes of the members ARGV[2..] (read as due just before);
/// ARGV[1] = now (ms). A member moves only if it is still in the set, still due, and this script
/// removes it, so none is promoted twice, or early, by workers racing. Every key is passed in,
/// and all share the stream's cluster slot. Returns `{ moved, earliest due ms left or -1 }`.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = tonumber(ARGV[1])
local moved = 0
for i = 2, #ARGV do
  local hkey = KEYS[i + 1]
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= now then
    redis.call('ZREM', KEYS[1], ARGV[i])
    local fields = redis.call('HGETALL', hkey)
    if #fields > 0 then
      redis.call('XADD', KEYS[2], '*', unpack(fields))
      moved = moved + 1
    end
    redis.call('DEL', hkey)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local due = -1
if #nxt == 2 then due = tonumber(nxt[2]) end
return { moved, due }
"#,
    )
});

/// The delay layout before per-queue sets (one server only; it names keys it was not passed, so
/// it never runs on a cluster): moves up to ARGV[2] due messages (score ≤ ARGV[1]) from the
/// global delay set into their streams. KEYS[1] = global delay zset. ARGV[3] = message hash key
/// prefix, ARGV[4] = per-queue zset prefix. A member is removed in the same script that re-adds
/// it, so it can never be promoted twice.
pub(crate) static PROMOTE_LEGACY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do
  local hkey = ARGV[3] .. member
  local fields = redis.call('HGETALL', hkey)
  local stream, queue
  local args = {}
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == '_stream' then stream = fields[i + 1]
    elseif f == '_queue' then queue = fields[i + 1]
    else
      args[#args + 1] = f
      args[#args + 1] = fields[i + 1]
    end
  end
  if stream and #args > 0 then
    redis.call('XADD', stream, '*', unpack(args))
    moved = moved + 1
  end
  redis.call('DEL', hkey)
  redis.call('ZREM', KEYS[1], member)
  if queue then redis.call('ZREM', ARGV[4] .. queue, member) end
end
return moved
"#,
    )
});

/// Renews the lease on one entry if this consumer still owns it: resets its idle time without
/// counting a delivery. KEYS[1] = stream; ARGV = group, consumer, id. Returns 1, or 0 if lost.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#,
    )
});

/// Gives entries back: each one this consumer owns is re-added at the end of the stream (ready for
/// anyone at once) carrying its delivery count so far, and the old entry is acked and deleted.
/// With `uncount` 1 this hand-out is not counted (the next delivery has the same count).
/// KEYS[1] = stream; ARGV = group, consumer, uncount (0 or 1), ids... Returns how many were
/// released.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
local uncount = tonumber(ARGV[3]) or 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #p == 1 and p[1][2] == ARGV[2] and #e == 1 then
    local fields = e[1][2]
    local args = {}
    local before = 0
    local has_id = false
    for j = 1, #fields, 2 do
      local f = fields[j]
      if f == 'stevedore-redeliveries' then before = tonumber(fields[j + 1]) or 0
      else
        if f == 'stevedore-id' or string.sub(f, 1, 12) == 'stevedore/1 ' then has_id = true end
        args[#args + 1] = f
        args[#args + 1] = fields[j + 1]
      end
    end
    if not has_id then
      args[#args + 1] = 'stevedore-id'
      args[#args + 1] = id
    end
    args[#args + 1] = 'stevedore-redeliveries'
    args[#args + 1] = tostring(math.max(before + p[1][4] - uncount, 0))
    redis.call('XADD', KEYS[1], '*', unpack(args))
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    n = n + 1
  end
end
return n
"#,
    )
});

/// Trims acknowledged entries: everything older than both the group's oldest pending entry and its
/// last delivered entry has been acked, so it goes; nothing unacked or undelivered is touched.
/// KEYS[1] = stream; ARGV[1] = group. Returns entries removed.
pub(crate) static TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local last
for _, g in ipairs(groups) do
  local name, ld
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then ld = g[i + 1] end
  end
  if name == ARGV[1] then last = ld end
end
if not last then return 0 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
local minid = last
if p[1] > 0 and p[2] then minid = p[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
"#,
    )
});

/// Removes this consumer from the group, and its lease record, only if it holds no pending entries
/// (deleting a consumer drops its pending entries, which would lose them; its lease record tells
/// others when they may take them over). KEYS[1] = stream, KEYS[2] = lease hash; ARGV = group,
/// consumer.
pub(crate) static FORGET_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
for _, c in ipairs(consumers) do
  local name, pending
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
  end
  if name == ARGV[2] then
    if pending == 0 then
      redis.call('HDEL', KEYS[2], ARGV[2])
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    end
    return 0
  end
end
return 0
"#,
    )
});

/// Acks entries this consumer still holds; an entry whose lease was taken over by another consumer
/// (or acked already) is left alone and counted as lost. KEYS[1] = stream; ARGV = group, consumer,
/// ids... Returns how many were lost.
pub(crate) static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local mine = {}
local lost = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] else lost = lost + 1 end
end
if #mine > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(mine)) end
return lost
"#,
    )
});

/// Takes over entries whose holder's lease ran out. Each consumer's lease is recorded in a hash
/// (KEYS[2]: consumer → `lease ms:registered at ms`; a plain `lease ms` is read too), since
/// Redis keeps no lease per entry: an entry is claimed only when its idle time reaches the lease
/// of the consumer holding it. Registers the caller's lease, stamped with the server's time.
/// KEYS[1] = stream; ARGV = group, consumer, lease ms, count, forget ms.
///
/// Hygiene, when forget ms > 0: then removes from the group, and from the lease hash, every
/// other consumer that holds nothing (pending 0), has not read for forget ms and for twice its
/// lease, and has not registered its lease for as long (a worker that crashed: its entries were
/// taken over, its name stayed). A worker that is alive but has not read that long (its slots
/// busy with other queues, say) may be removed too, which costs nothing: every receive looks
/// for expired leases, registering its lease, before it reads once a quarter of a lease has
/// passed, and its read creates the consumer again; the registration's stamp keeps it from
/// being removed between the two.
/// Returns `{ shortest lease ms, { {id, fields, delivery_count}, ... }, consumers removed }`.
pub(crate) static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local mine = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ':' .. now)
local leases = redis.call('HGETALL', KEYS[2])
local lease_of = {}
local seen_of = {}
local min = mine
for i = 1, #leases, 2 do
  local v = leases[i + 1]
  local l = tonumber(string.match(v, '^(%d+)'))
  if l then
    lease_of[leases[i]] = l
    seen_of[leases[i]] = tonumber(string.match(v, ':(%d+)$'))
    if l < min then min = l end
  end
end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', min, '-', '+', want * 4)
local ids = {}
local counts = {}
for _, e in ipairs(p) do
  local lease = lease_of[e[2]] or mine
  if e[3] >= lease and #ids < want then
    ids[#ids + 1] = e[1]
    counts[e[1]] = e[4] + 1
  end
end
local out = {}
if #ids > 0 then
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))
  for _, e in ipairs(claimed) do
    if e and e[1] then out[#out + 1] = { e[1], e[2], counts[e[1]] or 2 } end
  end
end
local forget = tonumber(ARGV[5]) or 0
local removed = 0
if forget > 0 then
  local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
  for _, c in ipairs(consumers) do
    local name, pending, idle
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1]
      elseif c[i] == 'pending' then pending = c[i + 1]
      elseif c[i] == 'idle' then idle = c[i + 1] end
    end
    local after = math.max(forget, 2 * (lease_of[name] or mine))
    local seen = seen_of[name]
    local quiet = (not seen) or (now - seen >= after)
    if name and name ~= ARGV[2] and pending == 0 and idle and idle >= after and quiet then
      redis.call('HDEL', KEYS[2], name)
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
      removed = removed + 1
    end
  end
end
return { min, out, removed }
"#,
    )
});
