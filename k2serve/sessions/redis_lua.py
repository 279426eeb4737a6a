"""The Lua scripts of `RedisSessionStore`; each runs atomically inside Redis.

Key layout (<P> is the store's key prefix, default "k2s:"; <SID> a session id; the braces
around <SID> are a Redis hash tag):

    <P>{<SID>}:meta        HASH   owner, model, metadata, ttl_s, created_ms, last_used_ms, turns,
                                  tool_steps, msg_bytes, holder ("" = none), cached, append_id
    <P>{<SID>}:tok         STRING token ids, little-endian uint32, grown with APPEND
    <P>{<SID>}:bh          STRING block-hash chain, little-endian uint64, grown with APPEND
    <P>{<SID>}:msg         LIST   one compact JSON text per message (absent while empty)
    <P>owner:<sha256>      ZSET   the owner's session ids, score = expiry time (unix ms)
    <P>worker:<worker id>  SET    ids of sessions whose holder is that worker (may hold stale ids)

The keys of a session share one expiry time (PEXPIREAT), pushed back to now + ttl_s on each
use; an index key lives at least as long as its longest-lived member. Scripts derive index and
other-session keys from <P> inside Lua, so this layout needs a standalone (or Sentinel) Redis,
not Redis Cluster. Replies start with a status: OK, NOTFOUND, LIMIT name value maximum,
CONFLICT num_tokens, or EXISTS.
"""

from __future__ import annotations

__all__ = ["SCRIPTS"]

_PRELUDE = r"""
local function summary(meta, tok, bh, msg)
  return {redis.call('HGETALL', meta), redis.call('STRLEN', tok), redis.call('STRLEN', bh),
          redis.call('LLEN', msg)}
end
local function extend_ttl(key, ttl)  -- never shortens; 0 would delete the key
  ttl = math.max(ttl, 1)
  local t = redis.call('TTL', key)
  if t ~= -2 and t < ttl then redis.call('EXPIRE', key, ttl) end
end
local function owned(meta, owner)
  return redis.call('HGET', meta, 'owner') == owner
end
local function use(prefix, sid, meta, tok, bh, msg, owner_idx, now)
  local ttl = tonumber(redis.call('HGET', meta, 'ttl_s'))
  redis.call('HSET', meta, 'last_used_ms', now)
  local t = redis.call('TIME')  -- one absolute deadline: the session's keys expire together
  local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 1000 * ttl
  for _, key in ipairs({meta, tok, bh, msg}) do redis.call('PEXPIREAT', key, at) end
  redis.call('ZADD', owner_idx, tonumber(now) + 1000 * ttl, sid)
  extend_ttl(owner_idx, ttl)
  local holder = redis.call('HGET', meta, 'holder')
  if holder ~= '' then extend_ttl(prefix .. 'worker:' .. holder, ttl) end
end
"""

# KEYS meta tok bh msg owner_idx; ARGV prefix sid owner model metadata ttl_s now max_sessions
_CREATE = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return {'EXISTS'} end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[7])
local n = redis.call('ZCARD', KEYS[5])
if n >= tonumber(ARGV[8]) then return {'LIMIT', 'max_sessions_per_owner', n + 1, ARGV[8]} end
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'model', ARGV[4], 'metadata', ARGV[5],
           'ttl_s', ARGV[6], 'created_ms', ARGV[7], 'last_used_ms', ARGV[7], 'turns', 0,
           'tool_steps', 0, 'msg_bytes', 0, 'holder', '', 'cached', 0, 'append_id', '')
redis.call('SET', KEYS[2], '')
redis.call('SET', KEYS[3], '')
use(ARGV[1], ARGV[2], KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[7])
return {'OK', summary(KEYS[1], KEYS[2], KEYS[3], KEYS[4])}
"""

# KEYS meta tok bh msg; ARGV owner with_history("0"|"1")
_GET = r"""
if not owned(KEYS[1], ARGV[1]) then return {'NOTFOUND'} end
local s = summary(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
if ARGV[2] == '1' then
  return {'OK', s, redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3]),
          redis.call('LRANGE', KEYS[4], 0, -1)}
end
return {'OK', s}
"""

# KEYS meta tok bh msg owner_idx; ARGV prefix sid owner now
_TOUCH = r"""
if not owned(KEYS[1], ARGV[3]) then return {'NOTFOUND'} end
use(ARGV[1], ARGV[2], KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4])
return {'OK', summary(KEYS[1], KEYS[2], KEYS[3], KEYS[4])}
"""

# KEYS meta tok bh; ARGV owner block_size -> OK tok_len tail last_hash msg_bytes
_READ_TAIL = r"""
if not owned(KEYS[1], ARGV[1]) then return {'NOTFOUND'} end
local nbh = redis.call('STRLEN', KEYS[3])
local start = (nbh / 8) * tonumber(ARGV[2]) * 4
local last = ''
if nbh > 0 then last = redis.call('GETRANGE', KEYS[3], nbh - 8, nbh - 1) end
return {'OK', redis.call('STRLEN', KEYS[2]), redis.call('GETRANGE', KEYS[2], start, -1), last,
        tonumber(redis.call('HGET', KEYS[1], 'msg_bytes'))}
"""

# KEYS meta tok bh msg owner_idx; ARGV prefix sid owner expected_tok_len tokens hashes now
#   tool_steps user_turns msg_bytes max_tokens max_messages_bytes append_id message...
_APPEND = r"""
if not owned(KEYS[1], ARGV[3]) then return {'NOTFOUND'} end
if redis.call('HGET', KEYS[1], 'append_id') == ARGV[13] then  -- a retried, already applied call
  return {'OK', summary(KEYS[1], KEYS[2], KEYS[3], KEYS[4])}
end
local len = redis.call('STRLEN', KEYS[2])
if len ~= tonumber(ARGV[4]) then return {'CONFLICT', len / 4} end
local ntok = (len + #ARGV[5]) / 4
if ntok > tonumber(ARGV[11]) then return {'LIMIT', 'max_tokens', ntok, ARGV[11]} end
local mb = tonumber(redis.call('HGET', KEYS[1], 'msg_bytes')) + tonumber(ARGV[10])
if mb > tonumber(ARGV[12]) then return {'LIMIT', 'max_messages_bytes', mb, ARGV[12]} end
redis.call('APPEND', KEYS[2], ARGV[5])
redis.call('APPEND', KEYS[3], ARGV[6])
for i = 14, #ARGV do redis.call('RPUSH', KEYS[4], ARGV[i]) end
redis.call('HINCRBY', KEYS[1], 'tool_steps', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'turns', ARGV[9])
redis.call('HINCRBY', KEYS[1], 'msg_bytes', ARGV[10])
redis.call('HSET', KEYS[1], 'append_id', ARGV[13])
use(ARGV[1], ARGV[2], KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[7])
return {'OK', summary(KEYS[1], KEYS[2], KEYS[3], KEYS[4])}
"""

# KEYS meta tok bh msg; ARGV prefix sid worker("" clears) cached
_SET_HOLDER = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND'} end
local ntok = redis.call('STRLEN', KEYS[2]) / 4
if tonumber(ARGV[4]) > ntok then return {'LIMIT', 'num_tokens', ARGV[4], ntok} end
local old = redis.call('HGET', KEYS[1], 'holder')
if old ~= '' and old ~= ARGV[3] then redis.call('SREM', ARGV[1] .. 'worker:' .. old, ARGV[2]) end
redis.call('HSET', KEYS[1], 'holder', ARGV[3], 'cached', ARGV[4])
if ARGV[3] ~= '' then
  local w = ARGV[1] .. 'worker:' .. ARGV[3]
  redis.call('SADD', w, ARGV[2])
  extend_ttl(w, redis.call('TTL', KEYS[1]))
end
return {'OK', summary(KEYS[1], KEYS[2], KEYS[3], KEYS[4])}
"""

# KEYS worker_set; ARGV prefix worker -> number of sessions cleared
_CLEAR_WORKER = r"""
local n = 0
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local meta = ARGV[1] .. '{' .. sid .. '}:meta'
  if redis.call('HGET', meta, 'holder') == ARGV[2] then
    redis.call('HSET', meta, 'holder', '', 'cached', 0)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""

# KEYS meta tok bh msg owner_idx; ARGV prefix sid owner -> 1 deleted | 0 not found
_DELETE = r"""
if not owned(KEYS[1], ARGV[3]) then return 0 end
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder ~= '' then redis.call('SREM', ARGV[1] .. 'worker:' .. holder, ARGV[2]) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[2])
return 1
"""

# KEYS owner_idx; ARGV prefix now -> {{sid, summary}, ...}
_LIST = r"""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local k = ARGV[1] .. '{' .. sid .. '}:'
  if redis.call('EXISTS', k .. 'meta') == 1 then
    out[#out + 1] = {sid, summary(k .. 'meta', k .. 'tok', k .. 'bh', k .. 'msg')}
  else
    redis.call('ZREM', KEYS[1], sid)
  end
end
return out
"""

SCRIPTS: dict[str, str] = {
    name: _PRELUDE + body
    for name, body in {
        "create": _CREATE,
        "get": _GET,
        "touch": _TOUCH,
        "read_tail": _READ_TAIL,
        "append": _APPEND,
        "set_holder": _SET_HOLDER,
        "clear_worker": _CLEAR_WORKER,
        "delete": _DELETE,
        "list": _LIST,
    }.items()
}
"""Script name -> full Lua source (the shared prelude of helper functions, then the body)."""
