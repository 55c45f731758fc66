"""
The Lua scripts of the Redis store (L{mmogate_plugins.redis}).

Each script is one atomic step in Redis: a claim that returns where the
player was, a push numbered for all its recipients and handed to their
gates, an expiry that checks the player is still offline here. Layout (P is
C{store.redis_prefix}):

  - C{P p:<player>}: hash C{g} gate, C{s} session (C{""} offline), C{t}
    since, C{e} epoch (incarnation), C{q} last seq assigned, C{a} acked,
    C{c} claims made, C{b} the boot id of the gate process that claimed
    it;
  - C{P m:<player>}: stream of retained pushes, entry id C{<seq>-0},
    fields C{t} (ts) and C{h} (the push envelope without its closing brace);
  - C{P g:<gate>}: the gate's heartbeat C{"<online count>:<boot id>"},
    with a TTL of C{store.gate_ttl}; C{P gates}: set of gate ids seen;
  - C{P s:<gate>}: set of the players whose entry names the gate (some
    may have left since; pruned when the gate reads it, at start);
  - C{P b:<player>}: a ban, hash C{u} its end, C{r} the time up to which
    resume tokens are revoked (checked by CLAIM);
  - channels C{P c:<gate>} (one gate) and C{P all} (every gate).

A message on a channel is a JSON header line, C{"\\n"}, then a payload.
"""

#: Shared by scripts that read a mailbox: drop entries whose ts is at or
#: below the limit, from the oldest on (as L{gate.mailbox.Mailbox.expire}).
_TRIM_AGE = """
local function trim_age(mk, limit)
  limit = tonumber(limit)
  local cut = nil
  local start = '-'
  while true do
    local batch = redis.call('XRANGE', mk, start, '+', 'COUNT', 64)
    local newer = false
    for _, e in ipairs(batch) do
      if tonumber(e[2][2]) <= limit then cut = e[1] else newer = true; break end
    end
    if newer or #batch < 64 then break end
    start = '(' .. cut
  end
  if cut then
    local seq = tonumber(string.match(cut, '^(%d+)'))
    redis.call('XTRIM', mk, 'MINID', string.format('%d-0', seq + 1))
  end
end
"""

#: Shared by scripts that check a gate is alive: the process id (boot) in
#: its heartbeat C{"<online>:<boot>"}, or nil when there is none.
_BOOT = """
local function boot_of(heartbeat)
  if not heartbeat then return nil end
  return string.match(heartbeat, ':(.*)$')
end
"""

#: Shared by scripts that make a player's entry: a fresh directory hash
#: (gate, session, since, epoch, seq, acked) and, from C{first} on in ARGV,
#: retained pushes as (seq, ts, head) triples in seq order (a durable copy
#: restored into a Redis that lost it).
_CREATE = """
local function create(dk, mk, g, s, t, e, q, a, ttl, maxlen, first)
  redis.call('DEL', dk, mk)
  redis.call('HSET', dk, 'g', g, 's', s, 't', t, 'e', e, 'q', q, 'a', a)
  redis.call('PEXPIRE', dk, ttl)
  if first then
    local n = 0
    for i = first, #ARGV - 2, 3 do
      redis.call('XADD', mk, 'MAXLEN', maxlen, ARGV[i] .. '-0',
                 't', ARGV[i + 1], 'h', ARGV[i + 2])
      n = n + 1
    end
    if n > 0 then redis.call('PEXPIRE', mk, ttl) end
  end
end
"""

#: KEYS dir, mailbox, ban, the claiming gate's players (C{P s:<gate>});
#: ARGV gate, session, now, new epoch, expected epoch ("" for none: a
#: login or auth), ttl ms, the resume token's iat ("" for none), boot (the
#: claiming gate process), prefix, mode: "" makes a missing player anew,
#: "ask" reports it missing, "seed" makes it from what follows (the
#: durable copy): epoch ("" when there is none), seq, acked, mailbox_max,
#: then (seq, ts, head) per retained push.
#: Returns {-1} (banned), {-2} (token revoked by a ban), {0} (epoch
#: mismatch), {2} (missing, mode "ask") or {1, epoch, seq, claim [,
#: previous gate, previous session, previous since, previous claim]}:
#: C{claim} counts the player's claims (field C{c}), so a gate told to
#: kick the session of an older claim can tell it from a newer claim of
#: the same session.
CLAIM = _CREATE + """
local b = redis.call('HMGET', KEYS[3], 'u', 'r')
if b[1] then
  if tonumber(b[1]) > tonumber(ARGV[3]) then return {-1} end
  if ARGV[5] ~= '' then
    local iat = tonumber(ARGV[7])
    if not iat or iat <= tonumber(b[2]) then return {-2} end
  end
end
local d = redis.call('HMGET', KEYS[1], 'g', 's', 't', 'e', 'q', 'c')
local player = string.sub(KEYS[1], #ARGV[9] + 3)
local function claimed()
  local c = tonumber(d[6] or '0') + 1
  redis.call('HSET', KEYS[1], 'c', c, 'b', ARGV[8])
  redis.call('SADD', KEYS[4], player)
  if d[1] and d[1] ~= '' and d[1] ~= ARGV[1] then
    redis.call('SREM', ARGV[9] .. 's:' .. d[1], player)
  end
  return c
end
if not d[4] then
  local mode = ARGV[10]
  if mode == 'ask' then return {2} end
  if mode == 'seed' and ARGV[11] ~= '' and
      (ARGV[5] == '' or ARGV[5] == ARGV[11]) then
    create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[11], ARGV[12],
           ARGV[13], ARGV[6], ARGV[14], 15)
    return {1, ARGV[11], tonumber(ARGV[12]), claimed()}
  end
  if ARGV[5] ~= '' then return {0} end
  create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 0, 0,
         ARGV[6], 0, nil)
  return {1, ARGV[4], 0, claimed()}
end
if ARGV[5] ~= '' and ARGV[5] ~= d[4] then return {0} end
redis.call('HSET', KEYS[1], 'g', ARGV[1], 's', ARGV[2], 't', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
local q = tonumber(d[5] or '0')
local c = claimed()
if d[2] ~= '' then
  return {1, d[4], q, c, d[1], d[2], d[3], tonumber(d[6] or '0')}
end
return {1, d[4], q, c}
"""

#: KEYS dir, mailbox; ARGV gate ("" for none), session ("" offline), now,
#: epoch, seq (what the gate's session has), ttl ms, boot (the gate
#: process), prefix, then the durable copy: epoch ("" none), seq, acked,
#: mailbox_max, (seq, ts, head) per push.
#: Puts back a player Redis lost, unless it is there again: an online one
#: with its epoch, numbered on from the higher seq (with the copy's
#: pushes when it is of the same incarnation); an offline one only from a
#: copy of its incarnation. An entry a push put back meanwhile (without a
#: gate, same incarnation) is taken over. Returns 1 (there already), 3
#: (online one put back), 5 (online one taken over), 6 (offline one put
#: back or taken over) or 0 (no copy: gone).
RESTORE = _CREATE + """
local function mine()
  if ARGV[1] ~= '' then
    redis.call('HSET', KEYS[1], 'b', ARGV[7])
    redis.call('SADD', ARGV[8] .. 's:' .. ARGV[1],
               string.sub(KEYS[1], #ARGV[8] + 3))
  end
end
local d = redis.call('HMGET', KEYS[1], 'g', 's', 'e')
if d[3] then
  if ARGV[1] == '' or d[1] ~= '' or d[2] ~= '' or d[3] ~= ARGV[4] then
    return 1
  end
  redis.call('HSET', KEYS[1], 'g', ARGV[1], 's', ARGV[2])
  mine()
  if ARGV[2] == '' then return 6 end
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
  end
  return 5
end
local same = ARGV[9] ~= '' and ARGV[9] == ARGV[4]
if ARGV[2] ~= '' then
  local q, a, first = tonumber(ARGV[5]), 0, nil
  if same then
    q = math.max(q, tonumber(ARGV[10]))
    a = ARGV[11]
    first = 13
  end
  create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], q, a,
         ARGV[6], ARGV[12], first)
  mine()
  return 3
end
if not same then return 0 end
create(KEYS[1], KEYS[2], ARGV[1], '', ARGV[3], ARGV[4], ARGV[10], ARGV[11],
       ARGV[6], ARGV[12], 13)
mine()
return 6
"""

#: KEYS ban, dir; ARGV until, now, token ttl (seconds). Records a ban until
#: C{until} (replacing the end of an earlier one) and revokes the tokens
#: issued up to now, and up to the player's last claim or release (its
#: C{t}): a token is issued at its claim's time, so one made by a claim
#: Redis ran before this ban is revoked even if that claim was sent after
#: the ban was; the key lives until both the ban and the tokens it
#: revoked are over.
BAN = """
local now = tonumber(ARGV[2])
local r = ARGV[2]
local old = redis.call('HGET', KEYS[1], 'r')
if old and tonumber(old) > now then r = old end
local t = redis.call('HGET', KEYS[2], 't')
if t and tonumber(t) > tonumber(r) then r = t end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'r', r)
local ttl = math.ceil((math.max(tonumber(ARGV[1]), now + tonumber(ARGV[3]))
                       - now) * 1000)
if ttl < 1 then ttl = 1 end
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

#: KEYS dir, mailbox; ARGV gate, session, now, ttl ms. 1 if released.
RELEASE = """
local d = redis.call('HMGET', KEYS[1], 'g', 's')
if d[1] ~= ARGV[1] or d[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 's', '', 't', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1
"""

#: KEYS dir, mailbox, the gate's players; ARGV gate, epoch, player. 1
#: removed, 0 not (online, on another gate, another incarnation), 2
#: already gone.
EXPIRE = """
local d = redis.call('HMGET', KEYS[1], 'g', 's', 'e')
if not d[3] then
  redis.call('SREM', KEYS[3], ARGV[3])
  return 2
end
if d[1] ~= ARGV[1] or d[2] ~= '' or d[3] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
return 1
"""

#: KEYS dir1, mailbox1, dir2, ...; ARGV persist ("1", "0", or "2":
#: persistent, answering each player's epoch too, for the durable copy),
#: head, ts, mailbox_max, prefix, then the player ids. Numbers and stores
#: the push for each known player, then publishes one message per live
#: gate listing its recipients, so a gate gets its players' pushes in seq
#: order. Returns {status, seq [, epoch]} per player: -1 unknown, 0 not
#: handed to a gate, 1 handed to a live gate that listens. A session
#: counts as on a live gate only while the gate's heartbeat names the
#: process that claimed it (C{b}): the sessions of a gate that restarted
#: under the same id are gone.
PLACE = _BOOT + """
local persist = ARGV[1] ~= '0'
local w = 2
if ARGV[1] == '2' then w = 3 end
local head, ts, maxlen, prefix = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {}
local sessions = {}
local boots = {}
local by_gate = {}
local order = {}
for i = 1, #KEYS / 2 do
  local dk = KEYS[2 * i - 1]
  local d = redis.call('HMGET', dk, 'g', 's', 'e', 'b')
  local o = w * (i - 1)
  if not d[3] then
    out[o + 1] = -1
    out[o + 2] = 0
    if w == 3 then out[o + 3] = '' end
  else
    local seq = 0
    if persist then
      local mk = KEYS[2 * i]
      seq = redis.call('HINCRBY', dk, 'q', 1)
      redis.call('XADD', mk, 'MAXLEN', maxlen, string.format('%d-0', seq),
                 't', ts, 'h', head)
      if redis.call('PTTL', mk) == -1 then
        local ttl = redis.call('PTTL', dk)
        if ttl > 0 then redis.call('PEXPIRE', mk, ttl) end
      end
    end
    out[o + 1] = 0
    out[o + 2] = seq
    if w == 3 then out[o + 3] = d[3] end
    if d[2] ~= '' then
      sessions[i] = d[2]
      boots[i] = d[4]
      local list = by_gate[d[1]]
      if not list then
        list = {}
        by_gate[d[1]] = list
        order[#order + 1] = d[1]
      end
      list[#list + 1] = i
    end
  end
end
for _, g in ipairs(order) do
  local boot = boot_of(redis.call('GET', prefix .. 'g:' .. g))
  local to = {}
  local live = {}
  for _, i in ipairs(by_gate[g]) do
    if boot and boots[i] == boot then
      to[#to + 1] = {ARGV[5 + i], sessions[i], out[w * (i - 1) + 2]}
      live[#live + 1] = i
    end
  end
  if #to > 0 then
    local msg = '{"op":"push","to":' .. cjson.encode(to) .. '}\\n' .. head
    if redis.call('PUBLISH', prefix .. 'c:' .. g, msg) > 0 then
      for _, i in ipairs(live) do out[w * (i - 1) + 1] = 1 end
    end
  end
end
return out
"""

#: KEYS dir, mailbox; ARGV player id, ts, head, mailbox_max. Appends one
#: push whether or not the player is in the directory (the plain
#: IMailboxStore.append). Returns the seq.
APPEND = """
local seq = redis.call('HINCRBY', KEYS[1], 'q', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], string.format('%d-0', seq),
           't', ARGV[2], 'h', ARGV[3])
return seq
"""

#: KEYS dir, mailbox; ARGV last_seq, age limit, at most this many entries
#: ("" for all). Returns {last seq, acked, entries after last_seq}.
READ = _TRIM_AGE + """
local d = redis.call('HMGET', KEYS[1], 'q', 'a')
if not d[1] then return {0, 0, {}} end
trim_age(KEYS[2], ARGV[2])
local q = tonumber(d[1])
local after = tonumber(ARGV[1])
local entries = {}
if after < q then
  local first = string.format('%d-0', after + 1)
  if ARGV[3] and ARGV[3] ~= '' then
    entries = redis.call('XRANGE', KEYS[2], first, '+', 'COUNT', ARGV[3])
  else
    entries = redis.call('XRANGE', KEYS[2], first, '+')
  end
end
return {q, tonumber(d[2] or '0'), entries}
"""

#: KEYS dir, mailbox; ARGV seq. Returns {the seq acknowledged, epoch}.
ACK = """
local d = redis.call('HMGET', KEYS[1], 'q', 'a', 'e')
if not d[1] then return {0, ''} end
local seq = math.min(tonumber(ARGV[1]), tonumber(d[1]))
if seq > tonumber(d[2] or '0') then redis.call('HSET', KEYS[1], 'a', seq) end
if seq >= 1 then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', seq + 1))
end
return {seq, d[3] or ''}
"""

#: KEYS dir, mailbox; ARGV age limit. Retained pushes.
SIZE = _TRIM_AGE + """
trim_age(KEYS[2], ARGV[1])
return redis.call('XLEN', KEYS[2])
"""

#: KEYS dir, mailbox. Drops the mailbox unless the player lives (a new
#: incarnation's mailbox is never dropped by a late expiry).
DROP = """
if redis.call('HEXISTS', KEYS[1], 'e') == 1 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

#: KEYS dir, mailbox; ARGV age limit, prefix. nil for an unknown player,
#: else {gate, session, since, epoch, last seq, mailbox size, gate alive}
#: (alive: the gate's heartbeat names the process that claimed it).
INFO = _TRIM_AGE + _BOOT + """
local d = redis.call('HMGET', KEYS[1], 'g', 's', 't', 'e', 'q', 'b')
if not d[4] then return false end
trim_age(KEYS[2], ARGV[1])
local alive = 0
local boot = boot_of(redis.call('GET', ARGV[2] .. 'g:' .. d[1]))
if boot and boot == d[6] then alive = 1 end
return {d[1], d[2], d[3], d[4], tonumber(d[5] or '0'),
        redis.call('XLEN', KEYS[2]), alive}
"""

#: KEYS dir; ARGV prefix, op, payload, player id. Hands the op to the gate
#: where the player is online, if that gate is alive. Returns the number of
#: gates that got it (0 or 1).
SEND = _BOOT + """
local d = redis.call('HMGET', KEYS[1], 'g', 's', 'b')
if not d[1] or d[2] == '' then return 0 end
local boot = boot_of(redis.call('GET', ARGV[1] .. 'g:' .. d[1]))
if not boot or boot ~= d[3] then return 0 end
local header = cjson.encode({op = ARGV[2], p = ARGV[4], s = d[2]})
return redis.call('PUBLISH', ARGV[1] .. 'c:' .. d[1], header .. '\\n' .. ARGV[3])
"""

#: ARGV prefix, message, this gate. Publishes to every gate, then returns
#: {gate, online, ...} of the other live gates (forgetting dead ones).
BROADCAST = """
redis.call('PUBLISH', ARGV[1] .. 'all', ARGV[2])
local out = {}
for _, g in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'gates')) do
  local v = redis.call('GET', ARGV[1] .. 'g:' .. g)
  if not v then
    redis.call('SREM', ARGV[1] .. 'gates', g)
  elseif g ~= ARGV[3] then
    out[#out + 1] = g
    out[#out + 1] = tonumber(string.match(v, '^(%d+)')) or 0
  end
end
return out
"""

#: ARGV prefix, gate, online count, ttl ms, boot (this process). The
#: heartbeat is C{"<online>:<boot>"}. Returns 0 when it had lapsed (or was
#: deleted, or was another process's): pushes meanwhile were stored, not
#: sent.
HEARTBEAT = _BOOT + """
local key = ARGV[1] .. 'g:' .. ARGV[2]
local was = 0
if boot_of(redis.call('GET', key)) == ARGV[5] then was = 1 end
redis.call('SET', key, ARGV[3] .. ':' .. ARGV[5], 'PX', ARGV[4])
redis.call('SADD', ARGV[1] .. 'gates', ARGV[2])
return was
"""

#: KEYS dir1, mailbox1, ...; ARGV gate, ttl ms, now, durable ("1" when
#: a durable copy may put back what is missing), boot (this process),
#: prefix, then per player: session ("" offline), epoch, seq. Per player: 1 ok (TTL refreshed for an online
#: one), 0 missing (offline player gone), 3 recreated (online player put
#: back with its epoch, numbered on from seq), 2 elsewhere (another gate,
#: session or incarnation), 4 absent (missing, and durable: see RESTORE),
#: 5 adopted (an online player's entry put back from the durable copy by a
#: push, without a gate, taken over).
REFRESH = """
local out = {}
local durable = ARGV[4] == '1'
local function mine(dk)
  redis.call('HSET', dk, 'b', ARGV[5])
  redis.call('SADD', ARGV[6] .. 's:' .. ARGV[1],
             string.sub(dk, #ARGV[6] + 3))
end
for i = 1, #KEYS / 2 do
  local dk, mk = KEYS[2 * i - 1], KEYS[2 * i]
  local sid, ep, seq = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  local d = redis.call('HMGET', dk, 'g', 's', 'e')
  local status = 2
  if not d[3] then
    if durable then
      status = 4
    elseif sid ~= '' then
      redis.call('DEL', dk, mk)
      redis.call('HSET', dk, 'g', ARGV[1], 's', sid, 't', ARGV[3], 'e', ep,
                 'q', seq, 'a', 0)
      redis.call('PEXPIRE', dk, ARGV[2])
      mine(dk)
      status = 3
    else
      status = 0
    end
  elseif d[1] == '' and d[2] == '' and d[3] == ep then
    redis.call('HSET', dk, 'g', ARGV[1], 's', sid)
    mine(dk)
    status = 1
    if sid ~= '' then
      status = 5
      redis.call('PEXPIRE', dk, ARGV[2])
      if redis.call('EXISTS', mk) == 1 then redis.call('PEXPIRE', mk, ARGV[2]) end
    end
  elseif d[1] == ARGV[1] and d[3] == ep then
    if d[2] == sid then
      status = 1
    elseif d[2] == '' and sid ~= '' then
      redis.call('HSET', dk, 's', sid, 'b', ARGV[5])
      status = 1
    end
    if status == 1 and sid ~= '' then
      redis.call('PEXPIRE', dk, ARGV[2])
      if redis.call('EXISTS', mk) == 1 then redis.call('PEXPIRE', mk, ARGV[2]) end
    end
  end
  out[i] = status
end
return out
"""

#: ARGV prefix, gate, boot. Removes the gate's heartbeat, if this
#: process's.
LEAVE = _BOOT + """
local key = ARGV[1] .. 'g:' .. ARGV[2]
if boot_of(redis.call('GET', key)) ~= ARGV[3] then return 0 end
redis.call('DEL', key)
redis.call('SREM', ARGV[1] .. 'gates', ARGV[2])
return 1
"""

#: KEYS dir1, dir2, ... (members of C{P s:<gate>}); ARGV gate, boot, now,
#: ttl ms, prefix. Takes over the entries that name this gate but an
#: earlier process of it (which died or stopped without letting go of
#: them): an online one is released (offline since now), and each is
#: marked this process's, so that this process expires it. Members whose
#: entry is gone or names another gate leave the set. Returns {player,
#: epoch, since, the session it had ("" if offline)} per entry taken over.
ADOPT = """
local set = ARGV[5] .. 's:' .. ARGV[1]
local out = {}
for i = 1, #KEYS do
  local dk = KEYS[i]
  local player = string.sub(dk, #ARGV[5] + 3)
  local d = redis.call('HMGET', dk, 'g', 's', 't', 'e', 'b')
  if not d[4] or d[1] ~= ARGV[1] then
    redis.call('SREM', set, player)
  elseif d[5] ~= ARGV[2] then
    local since = d[3]
    if d[2] ~= '' then
      since = ARGV[3]
      redis.call('HSET', dk, 's', '', 't', since)
      redis.call('PEXPIRE', dk, ARGV[4])
      local mk = ARGV[5] .. 'm:' .. player
      if redis.call('EXISTS', mk) == 1 then
        redis.call('PEXPIRE', mk, ARGV[4])
      end
    end
    redis.call('HSET', dk, 'b', ARGV[2])
    out[#out + 1] = {player, d[4], since, d[2]}
  end
end
return out
"""

ALL = {
    "claim": CLAIM, "release": RELEASE, "expire": EXPIRE, "place": PLACE,
    "append": APPEND, "read": READ, "ack": ACK, "size": SIZE, "drop": DROP,
    "info": INFO, "send": SEND, "broadcast": BROADCAST,
    "heartbeat": HEARTBEAT, "refresh": REFRESH, "leave": LEAVE,
    "restore": RESTORE, "ban": BAN, "adopt": ADOPT,
}
