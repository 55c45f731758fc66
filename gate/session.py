"""
Sessions and the L{SessionManager} of the seed design.

A L{Session} is one client connection's state: its ordered lane of
requests, its heartbeat, and the delivery of pushes (held back while a
resume replays the mailbox, so nothing is sent twice or out of order). The
L{SessionManager} creates sessions for connections and carries out what
their envelopes ask, through the worker pool and the backend client.
"""

import secrets
from collections import deque

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from gate import envelope, errors
from gate.audit import MemoryAuditLog
from gate.errors import GateError, ProtocolViolation
from gate.limits import ConnectionLimits, TokenBucket
from gate.tokens import TokenError

#: What a C{ping}, C{pong} or C{ack} costs of a session's rate allowance,
#: in requests: they are cheap to serve, but not free.
CHEAP_COST = 0.125

#: Strikes (rate_limited answers) forgiven per second: sending over the
#: rate for long enough closes a session, a burst now and then does not.
STRIKE_DECAY = 1.0

#: Longest wait before reading the next page of a replay again after the
#: store failed to answer (the wait doubles from 0.1 s).
PAGE_RETRY_MAX = 5.0


def read_paged(mailboxes, player_id, after):
    """
    Read C{player_id}'s mailbox after seq C{after}, a page at a time when
    the store pages (its C{page_size}; the in-memory store holds every
    entry anyway and answers all at once).

    @return: L{Deferred} firing with C{(gap, entries, more)}: C{more} is
        C{None} after the last page, else a callable of the last seq read
        that reads the next page the same way (see L{Session.end_replay}).
    """
    size = getattr(mailboxes, "page_size", None)
    if not size:
        return mailboxes.read_after(player_id, after).addCallback(
            lambda found: (found[0], found[1], None))

    def paged(found):
        gap, entries = found
        more = None
        if len(entries) >= size:
            def more(last):
                return read_paged(mailboxes, player_id, last)
        return gap, entries, more

    return mailboxes.read_after(player_id, after, size).addCallback(paged)


class Session:
    """
    One client connection, bound to a player after login.

    @param connection: the L{IClientConnection} under it.
    """

    log = Logger()

    def __init__(self, manager, connection, session_id, clock):
        self.manager = manager
        self.connection = connection
        self.id = session_id
        self._clock = clock
        self._player = None
        #: The player this session was last bound to, kept for logs after
        #: it is unbound.
        self.last_player_id = None
        self.closed = False
        # Set once a kick or a protocol error was sent: nothing else goes
        # out, nothing more is read, the connection is closing.
        self.closing = False
        self.since = clock.seconds()
        self.last_recv = self.since
        self._lane = deque()
        self._running = False
        # Highest persistent seq written to this connection: a push at or
        # below it is a duplicate (a live push also read by a resume).
        self.delivered_seq = 0
        self._replaying = False
        # Holds begun (begin_replay) and not yet ended (end_replay); the
        # replays ended meanwhile, written one after the other; the page
        # being written, its next (see read_paged) and the last seq read.
        self._holds = 0
        self._sources = deque()
        self._replay = None
        self._more = None
        self._last_read = 0
        self._fetching = False
        self._page_failures = 0
        self._page_retry = None
        self._held = []
        self._held_bytes = 0
        #: What a shared store's L{gate.cluster.Cluster} knows of pushes
        #: this session may have missed (its reads of the mailbox).
        self.missed = None
        # Acks: the highest the store recorded, the one in flight, the
        # highest waiting for it (at most one ack is sent at a time).
        self._acked = 0
        self._ack_flight = None
        self._ack_next = None
        self._heartbeat = None
        self._pinged_for = None
        self._login_timer = None
        self._bucket = TokenBucket(manager.rate, manager.burst, clock)
        self._strikes = 0
        self._strike_time = 0.0
        # send_reconnect: (addr, reason) from the moment the session is told
        # to move; _moved once the envelope is out; _leave_call closes it
        # drain.close_after seconds later.
        self._moving = None
        self._moved = False
        self._leave_call = None

    @property
    def transport_name(self):
        return self.connection.transport_name

    @property
    def peer(self):
        return self.connection.peer

    @property
    def player(self):
        return self._player

    @player.setter
    def player(self, player):
        self._player = player
        if player is not None:
            self.last_player_id = player.player_id
            self._stop_login_timer()

    @property
    def player_id(self):
        return self._player.player_id if self._player is not None else None

    # From the connection.

    def receive(self, payload):
        """
        One payload from the client.
        """
        if self.closed or self.closing:
            return
        now = self.last_recv = self._clock.seconds()
        try:
            env = envelope.parse(payload, self.manager.max_depth)
        except ProtocolViolation as e:
            self.manager.bad_input(self, e.code)
            self.fail(e.code, e.msg)
            return
        except GateError as e:
            rid = getattr(e, "id", None)
            if not self._bucket.take(1.0, now):
                self._rate_limited(rid, True)
                return
            self.manager.bad_input(self, e.code)
            self.send(envelope.err(rid, e.code, e.msg))
            return
        kind = env.type
        if not self._bucket.take(1.0 if kind in envelope.REQUEST_TYPES
                                 else CHEAP_COST, now):
            self._rate_limited(env.id, kind != "ack" and kind != "pong")
            return
        if kind == "ping":
            self.send(envelope.message({"t": "pong", "ts": env["ts"]}))
        elif kind == "pong":
            pass
        elif kind == "ack":
            if self.player is not None:
                self._ack(env["seq"])
        else:
            if self._moving is not None:
                # Its lane must empty for the reconnect to go out.
                self.send(envelope.err(env.id, errors.BUSY,
                                       "this session is moving to another "
                                       "gate (reconnect); send it there"))
                return
            if len(self._lane) + self._running >= self.manager.max_inflight:
                self.send(envelope.err(env.id, errors.BUSY,
                                       "too many requests in flight on this "
                                       "connection"))
                return
            self._lane.append(env)
            if not self._running:
                self._next()

    def _rate_limited(self, rid, answer):
        """
        An envelope found the session's allowance (C{session.rate},
        C{session.burst}) used up: answer C{rate_limited} (unless C{answer}
        is false: an C{ack} or C{pong} over the rate is dropped) and count a
        strike. Strikes fade by L{STRIKE_DECAY} a second, so a client that
        keeps sending over the rate reaches C{session.rate_strikes} and is
        closed, however many of its envelopes are served in between, while
        one that bursts now and then is not.
        """
        now = self._clock.seconds()
        # Whole strikes fade, so that N strikes in quick succession are N.
        faded = int((now - self._strike_time) * STRIKE_DECAY)
        if faded >= self._strikes:
            self._strikes, self._strike_time = 0, now
        else:
            self._strikes -= faded
            self._strike_time += faded / STRIKE_DECAY
        self._strikes += 1
        manager = self.manager
        manager.bad_input(self, errors.RATE_LIMITED)
        if self._strikes >= manager.rate_strikes:
            manager.limited(self, "rate_limited")
            self.fail(errors.RATE_LIMITED,
                      f"too many envelopes over the rate of "
                      f"{manager.rate:g} a second; closing")
        elif answer:
            self.send(envelope.err(rid, errors.RATE_LIMITED,
                                   f"over the rate of {manager.rate:g} "
                                   f"requests a second; slow down"))

    def _ack(self, seq):
        """
        The client has every push up to C{seq}: record it, unless it moves
        nothing (at or below what was recorded, or is on its way); at most
        one ack goes to the store at a time, those sent meanwhile are
        folded into the highest.
        """
        if seq <= max(self._acked, self._ack_flight or 0,
                      self._ack_next or 0):
            return
        if self._ack_flight is not None:
            self._ack_next = seq
            return
        self._send_ack(seq)

    def _send_ack(self, seq):
        self._ack_flight = seq
        player = self.player
        d = self.manager.players.ack(player, seq)
        d.addCallbacks(self._ack_answered, self._ack_failed,
                       callbackArgs=(player, seq), errbackArgs=(player,))

    def _ack_answered(self, _, player, seq=None):
        self._ack_flight = None
        if player is not self.player:
            return
        if seq is not None and seq > self._acked:
            self._acked = seq
        waiting, self._ack_next = self._ack_next, None
        if waiting is not None and waiting > self._acked \
                and not self.closed:
            self._send_ack(waiting)

    def _ack_failed(self, failure, player):
        self.log.debug("ack of session {session_id} failed: {error}",
                       session_id=self.id, error=failure.getErrorMessage())
        self._ack_answered(None, player)

    def consumed(self):
        """
        The connection read a frame it handled itself (an encrypted
        channel's C{rekey}): it costs what a C{ping} does of the allowance,
        and over it counts a strike, unanswered, so a flood of them is
        closed like any other.
        """
        if self.closed or self.closing:
            return
        now = self.last_recv = self._clock.seconds()
        if not self._bucket.take(CHEAP_COST, now):
            self._rate_limited(None, False)

    def frame_too_large(self, size, limit):
        self.manager.bad_input(self, errors.FRAME_TOO_LARGE)
        self.fail(errors.FRAME_TOO_LARGE,
                  f"frame of {size} bytes is over the limit of {limit}")

    def lost(self):
        """
        The connection is gone.
        """
        if self.closed:
            return
        self.closed = True
        self._lane.clear()
        self._held = []
        self._replay = None
        self._sources.clear()
        self._more = None
        if self._page_retry is not None and self._page_retry.active():
            self._page_retry.cancel()
        self._page_retry = None
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        self._stop_login_timer()
        if self._leave_call is not None and self._leave_call.active():
            self._leave_call.cancel()
        self._leave_call = None
        self.manager.closed(self)

    # The request lane: one request of a session at a time, in order.

    def _next(self):
        while self._lane and not self._running and not self.closed:
            env = self._lane.popleft()
            self._running = True
            d = maybeDeferred(self.manager.handle, self, env)
            d.addErrback(self._failed, env)
            d.addBoth(self._done)

    def _failed(self, failure, env):
        if failure.check(GateError):
            e = failure.value
            self.send(envelope.err(env.id, e.code, e.msg))
        else:
            self.log.failure("request {kind} {id} of session {session_id} "
                             "failed", failure, kind=env.type, id=env.id,
                             session_id=self.id)
            self.send(envelope.err(env.id, errors.INTERNAL,
                                   "internal error in the gate"))

    def _done(self, _):
        self._running = False
        self._next()
        if self._moving is not None:
            self._move_when_idle()

    # To the client.

    def send(self, outgoing):
        if not (self.closed or self.closing):
            self.connection.send(outgoing)

    def push(self, outgoing):
        """
        Deliver a push: persistent ones at most once per connection and,
        during a resume, only after the replayed mailbox.
        """
        if self.closed or self.closing:
            return
        if self._replaying:
            self._held.append(outgoing)
            self._held_bytes += len(outgoing.payload)
            if self._held_bytes > self.manager.max_outbuf:
                # The replay is not being read fast enough to catch up with
                # live pushes; persistent ones stay in the mailbox.
                self.slow_consumer()
            return
        seq = outgoing.seq
        if seq is not None:
            if seq <= self.delivered_seq:
                return
            self.delivered_seq = seq
        self.connection.send(outgoing)

    @property
    def holding(self):
        """
        Whether live pushes are held back: a bind or its replay is under
        way.
        """
        return self._replaying

    @property
    def replaying(self):
        """
        Whether a resume's mailbox is being written.
        """
        return self._replay is not None

    def switch_player(self):
        """
        The session is about to be bound to another player.
        """
        self.delivered_seq = 0
        self._held = []
        self._held_bytes = 0
        self._acked = 0
        self._ack_next = None

    @property
    def holds(self):
        """
        How many holds (L{begin_replay}) have not ended yet.
        """
        return self._holds

    def begin_replay(self):
        """
        Hold live pushes until L{end_replay} has written the mailbox (and
        every other hold begun meanwhile has ended).
        """
        self._holds += 1
        self._replaying = True

    def end_replay(self, gap, entries, more=None):
        """
        Send a resume's gap notice and mailbox, then what was held, each
        persistent push once and in seq order.

        The mailbox is written as fast as the client reads it (see
        L{writable}), not all at once, and read a page at a time when the
        store pages it (C{more}, from L{read_paged}): a long mailbox costs
        no more memory than a page. A replay ended while another is being
        written follows it.
        """
        if self._holds > 0:
            self._holds -= 1
        if self.closed or self.closing:
            self._finish_replay()
            return
        self._sources.append((gap, entries, more))
        if self._replay is None:
            self._next_source()

    def _next_source(self):
        gap, entries, more = self._sources.popleft()
        if gap is not None:
            self.connection.send(envelope.message(
                {"t": "gap", "from": gap[0], "to": gap[1]}))
        self._replay = deque(entries)
        self._more = more
        self._last_read = entries[-1].seq if entries else 0
        self.writable()

    def writable(self):
        """
        The connection can take more: go on with a replay in progress.
        """
        replay = self._replay
        if replay is None:
            if self._moving is not None:
                self._move_when_idle()
            return
        connection = self.connection
        while replay and not connection.paused:
            if self.closed or self.closing:
                break
            entry = replay.popleft()
            if entry.seq > self.delivered_seq:
                self.delivered_seq = entry.seq
                connection.send(envelope.Outgoing(
                    envelope.encode(entry.as_dict()), seq=entry.seq))
        if self.closed or self.closing:
            self._finish_replay()
            return
        if replay:
            return
        if self._more is not None:
            # The next page once the client has read this one.
            if not self._fetching and not connection.paused:
                self._fetch()
            return
        if self._sources:
            self._next_source()
            return
        self._finish_replay()

    def _fetch(self):
        if self._page_retry is not None and self._page_retry.active():
            return
        self._page_retry = None
        self._fetching = True
        self._more(self._last_read).addCallbacks(self._page, self._no_page)

    def _page(self, found):
        self._fetching = False
        if self.closed or self._replay is None:
            return
        self._page_failures = 0
        gap, entries, self._more = found
        if gap is not None and not self.closing:
            self.connection.send(envelope.message(
                {"t": "gap", "from": gap[0], "to": gap[1]}))
        self._replay.extend(entries)
        if entries:
            self._last_read = entries[-1].seq
        self.writable()

    def _no_page(self, failure):
        """
        The store did not answer for the next page: ask again, after a
        wait that doubles; live pushes stay held meanwhile (within
        C{session.max_outbuf}).
        """
        self._fetching = False
        if self.closed or self._replay is None:
            return
        self.log.warn("reading the mailbox of session {session_id} failed "
                      "({error}); trying again", session_id=self.id,
                      error=failure.getErrorMessage())
        delay = min(PAGE_RETRY_MAX, 0.1 * 2 ** self._page_failures)
        self._page_failures += 1
        self._page_retry = self._clock.callLater(delay, self._retry_page)

    def _retry_page(self):
        self._page_retry = None
        self.writable()

    def _finish_replay(self):
        self._replay = None
        self._more = None
        if not (self.closed or self.closing):
            if self._holds > 0:
                # Another hold (a bind under way) ends it.
                return
            cluster = self.manager.players.cluster
            if cluster is not None and cluster.hold_ending(self, self._held):
                # It reads what the session missed first (then ends).
                return
        self._sources.clear()
        self._holds = 0
        self._replaying = False
        held, self._held = self._held, []
        self._held_bytes = 0
        for outgoing in held:
            self.push(outgoing)
        if self._moving is not None:
            self._move_when_idle()

    # Moving to another gate (PROTOCOL.md section 2, reconnect).

    @property
    def moving(self):
        """
        Whether the session was told (or is about to be told) to reconnect.
        """
        return self._moving is not None

    def send_reconnect(self, addr, reason):
        """
        Move the client to C{addr}: the requests already in its lane are
        answered, what is queued for it is written, then C{reconnect} goes
        out; the session is closed when the client leaves, or
        C{drain.close_after} seconds after that. Requests it sends from now
        on are answered C{busy}; pushes are still delivered (persistent ones
        stay in the mailbox until acked, so a client that resumes elsewhere
        with its C{last_seq} loses none).

        @param addr: C{host:port} or a C{ws://}/C{wss://} URL, or a dict of
            transport name to address with C{"*"} for the other transports
            (see L{gate.drain.check_target}).
        @return: whether this call told the session (not when it is closing,
            closed, or already moving).
        """
        if self.closed or self.closing or self._moving is not None:
            return False
        if isinstance(addr, dict):
            addr = addr.get(self.transport_name) or addr["*"]
        self._moving = (addr, reason)
        self._move_when_idle()
        return True

    def _move_when_idle(self):
        if self._moved or self.closed or self.closing:
            return
        if self._running or self._lane or self._replaying \
                or self.connection.paused:
            return
        addr, reason = self._moving
        self._moved = True
        self.connection.send(envelope.message(
            {"t": "reconnect", "addr": addr, "reason": reason}))
        self.manager.reconnect_sent(self, addr, reason)
        self._leave_call = self._clock.callLater(self.manager.close_after,
                                                 self._leave)

    def _leave(self):
        """
        C{drain.close_after} passed since C{reconnect}: close quietly (the
        client was told where to go).
        """
        self._leave_call = None
        if self.closed or self.closing:
            return
        self.closing = True
        self.manager.left(self)
        self.manager.players.unbind(self)
        self.connection.close()

    def kick(self, reason, msg):
        """
        Send C{kick} and close once it is written.
        """
        if self.closed or self.closing:
            return
        self.closing = True
        self.manager.kicked(self, reason)
        self.manager.players.unbind(self)
        self.connection.send(envelope.message(
            {"t": "kick", "reason": reason, "msg": msg}))
        self.connection.close()

    def slow_consumer(self):
        """
        The client reads too slowly: more than C{session.max_outbuf} bytes
        wait for it.
        """
        self.kick("slow_consumer", "the client does not read fast enough")

    def fail(self, code, msg):
        """
        Answer a protocol violation with an C{err} and close.
        """
        if self.closed or self.closing:
            return
        self.closing = True
        self.manager.players.unbind(self)
        self.connection.send(envelope.err(None, code, msg))
        self.connection.close()

    # Login timeout: a connection must bind (login, auth or resume) in time.

    def start_login_timer(self, timeout, delay=None):
        """
        Close the session unless bound within C{delay} seconds (default
        C{timeout}, the C{session.login_timeout} its message names).
        """
        self._login_timer = self._clock.callLater(
            timeout if delay is None else delay, self._login_expired, timeout)

    def _stop_login_timer(self):
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _login_expired(self, timeout):
        self._login_timer = None
        if self.closed or self.closing or self._player is not None:
            return
        self.manager.limited(self, "login_timeout")
        self.fail(errors.NOT_AUTHENTICATED,
                  f"not logged in (login, auth or resume) within "
                  f"{timeout:g} seconds; closing")

    # Heartbeat: ping a quiet client at half the TTL, close it at the TTL.

    def start_heartbeat(self, ttl):
        self._ttl = ttl
        self._heartbeat = self._clock.callLater(ttl / 2, self._check_heartbeat)

    def _check_heartbeat(self):
        self._heartbeat = None
        if self.closed:
            return
        ttl = self._ttl
        now = self._clock.seconds()
        last = self.last_recv
        silent = now - last
        if silent >= ttl:
            self.kick("idle", f"nothing received for {ttl:g} seconds")
            return
        if silent >= ttl / 2:
            if self._pinged_for != last:
                self._pinged_for = last
                self.send(envelope.message({"t": "ping", "ts": now}))
            delay = last + ttl - now
        else:
            delay = last + ttl / 2 - now
        self._heartbeat = self._clock.callLater(max(delay, 0.0),
                                                self._check_heartbeat)


class SessionManager:
    """
    Creates sessions for connections and serves their requests.

    @param players: the L{gate.player.PlayerManager}.
    @param pool: the L{gate.workers.WorkerPool} that runs backend calls.
    @param backend: an L{IBackendClient}.
    @param tokens: a L{gate.tokens.Tokens}.
    """

    log = Logger()

    def __init__(self, clock, config, players, pool, backend, tokens,
                 metrics=None):
        self._clock = clock
        self.gate_id = config["gate.id"]
        self.max_inflight = config["session.max_inflight"]
        self.max_outbuf = config["session.max_outbuf"]
        self.heartbeat_ttl = config["session.heartbeat_ttl"]
        self.login_timeout = config["session.login_timeout"]
        self.rate = config["session.rate"]
        self.burst = config["session.burst"]
        self.rate_strikes = config["session.rate_strikes"]
        self.max_depth = config["session.max_depth"]
        self.close_after = config["drain.close_after"]
        #: Client connections of every client listener of this gate.
        self.limits = ConnectionLimits(config["limits.max_connections"],
                                       config["limits.max_per_ip"],
                                       config["limits.connect_rate"],
                                       config["limits.connect_burst"], clock)
        self.players = players
        self.pool = pool
        self.backend = backend
        self.tokens = tokens
        self._metrics = metrics
        self.sessions = {}
        #: The session audit log (an L{IAuditLog}); the service sets the
        #: one it shares with the player manager.
        self.audit = MemoryAuditLog()
        self.accepting = True
        self._empty_waiters = []

    def open(self, connection, accepted=None):
        """
        A client connected.

        @param accepted: when the connection was accepted, if before now
            (an encrypted channel's handshake came first): the login
            timeout counts from then.
        @return: its L{Session}.
        """
        session_id = secrets.token_hex(8)
        session = Session(self, connection, session_id, self._clock)
        self.sessions[session_id] = session
        self._audit("connect", session, None)
        session.start_heartbeat(self.heartbeat_ttl)
        delay = self.login_timeout
        if accepted is not None:
            delay = max(0.0, accepted + delay - self._clock.seconds())
        session.start_login_timer(self.login_timeout, delay)
        if self._metrics is not None:
            self._metrics.session_opened(connection.transport_name)
        self.log.debug("session {session_id} opened from {peer} over "
                       "{transport}", session_id=session_id,
                       peer=connection.peer,
                       transport=connection.transport_name)
        return session

    def closed(self, session):
        self.sessions.pop(session.id, None)
        self._audit("disconnect", session, session.last_player_id)
        if self._metrics is not None:
            self._metrics.session_closed(session.transport_name)
        self.log.debug("session {session_id} of player {player_id} closed",
                       session_id=session.id,
                       player_id=session.last_player_id)
        self.players.unbind(session)
        if not self.sessions and self._empty_waiters:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)

    def _audit(self, event, session, player_id, reason=None):
        self.audit.record(event, player_id, session.id, self.gate_id,
                          session.peer, reason, self._clock.seconds())

    def kicked(self, session, reason):
        self._audit("kick", session, session.last_player_id, reason)
        if self._metrics is not None:
            self._metrics.kicked(reason)
        self.log.info("session {session_id} of player {player_id} kicked: "
                      "{reason}", session_id=session.id,
                      player_id=session.last_player_id, reason=reason)

    def bad_input(self, session, code):
        if self._metrics is not None:
            self._metrics.bad_input(code)

    def limited(self, session, reason):
        """
        C{session} is closed by a limit (C{login_timeout}, C{rate_limited}).
        """
        if self._metrics is not None:
            self._metrics.session_limited(reason)
        self.log.info("session {session_id} from {peer} closed: {reason}",
                      session_id=session.id, peer=session.peer, reason=reason)

    def reconnect_sent(self, session, addr, reason):
        if self._metrics is not None:
            self._metrics.reconnect_sent(reason)
        self.log.info("session {session_id} of player {player_id} told to "
                      "reconnect to {addr} ({reason})", session_id=session.id,
                      player_id=session.last_player_id, addr=addr,
                      reason=reason)

    def left(self, session):
        self.log.info("session {session_id} of player {player_id} closed: "
                      "still here drain.close_after seconds after reconnect",
                      session_id=session.id, player_id=session.last_player_id)

    def refused(self, reason, host):
        """
        A connection from C{host} was refused by L{ConnectionLimits}.
        """
        if self._metrics is not None:
            self._metrics.connection_refused(reason)
        self.log.debug("connection from {host} refused: {reason}", host=host,
                       reason=reason)

    # Serving envelopes.

    def handle(self, session, env):
        """
        Serve one request envelope of C{session}; answers are sent to the
        session directly, failures are L{GateError}s.
        """
        return getattr(self, "_" + env.type)(session, env)

    def _login(self, session, env):
        started = self._clock.seconds()
        d = self.pool.submit(self.backend.login, session.id, env["data"])

        def logged_in(result):
            player_id, data = result
            self._refuse_banned(player_id)
            self._observe("login", "ok", started)
            return self._bind(session, env.id, player_id, data)

        def failed(failure):
            code = failure.value.code if failure.check(GateError) else "internal"
            self._observe("login", code, started)
            return failure

        return d.addCallbacks(logged_in, failed)

    def _auth(self, session, env):
        try:
            player_id = self.tokens.player_of_auth_token(env["token"])
        except TokenError as e:
            raise GateError(errors.AUTH_FAILED, f"token rejected: {e}")
        self._refuse_banned(player_id)
        return self._bind(session, env.id, player_id, None)

    def _resume(self, session, env):
        player_id = env["player_id"]
        self._refuse_banned(player_id)
        try:
            claims = self.tokens.check_resume_token(
                env["resume_token"], player_id,
                revoked_before=self.players.bans.revoked_before(player_id))
        except TokenError as e:
            raise GateError(errors.RESUME_REJECTED, f"resume token rejected: {e}")
        epoch = claims.get("ep")
        if not epoch:
            raise GateError(errors.RESUME_REJECTED,
                            "the token names no incarnation of the player")
        # The directory checks the incarnation as it claims (on any gate):
        # a player expired or never seen is rejected there (and, with bans
        # shared through it, a token issued before a ban).
        return self._bind(session, env.id, player_id, None,
                          replay_after=env["last_seq"], epoch=epoch,
                          issued=claims.get("iat"))

    def _refuse_banned(self, player_id):
        if self.players.bans.banned(player_id):
            raise GateError(errors.AUTH_FAILED,
                            f"player {player_id[:64]!r} is banned for now")

    def _bind(self, session, rid, player_id, data, replay_after=None,
              epoch=None, issued=None):
        """
        Bind, answer C{resp}, and for a resume send the mailbox after
        C{replay_after}; live pushes wait until all of that is written.
        """
        session.begin_replay()
        mailboxes = self.players.mailboxes
        d = self.players.bind(session, player_id, epoch, issued)

        def bound(player):
            if player is None:
                return (None, [])
            if self.players.bans.banned(player_id):
                # Banned while the bind was under way.
                self.players.unbind(session)
                self._refuse_banned(player_id)
            self._audit("login" if replay_after is None else "resume",
                        session, player_id)
            if self.players.cluster is not None:
                # The seq assigned when the claim was made: every push
                # after it is this session's (and held until now), those
                # up to it are not (a login's stay in the mailbox).
                last = succeed(player.claim_seq)
            else:
                last = mailboxes.last_seq(player_id)

            def answer(last_seq):
                # Issued as of the claim: a ban Redis records after the
                # claim revokes it (see BAN in the Redis scripts).
                session.send(envelope.resp(
                    rid, data, player_id=player_id,
                    resume_token=self.tokens.resume_token(
                        player_id, player.epoch, issued=player.claim_time),
                    last_seq=last_seq))

            last.addCallback(answer)
            if replay_after is None:
                return last.addCallback(lambda _: (None, [], None))
            return last.addCallback(
                lambda _: read_paged(mailboxes, player_id, replay_after))

        def replay(found):
            session.end_replay(*found)

        def failed(failure):
            session.end_replay(None, [])
            return failure

        return d.addCallback(bound).addCallbacks(replay, failed)

    def _req(self, session, env):
        player = session.player
        if player is None:
            raise GateError(errors.NOT_AUTHENTICATED,
                            "log in (login, auth or resume) before requests")
        route = env["route"]
        started = self._clock.seconds()
        d = self.pool.submit(self.backend.call, session.id, player.player_id,
                             env.id, route, env["data"])

        def answered(data):
            self._observe(route, "ok", started)
            session.send(envelope.resp(env.id, data))

        def failed(failure):
            code = failure.value.code if failure.check(GateError) else "internal"
            self._observe(route, code, started)
            return failure

        return d.addCallbacks(answered, failed)

    def _observe(self, route, outcome, started):
        if self._metrics is not None:
            self._metrics.request(route, outcome,
                                  self._clock.seconds() - started)

    # Stopping.

    def kick_all(self, reason, msg):
        for session in list(self.sessions.values()):
            session.kick(reason, msg)

    def wait_empty(self):
        """
        @return: L{Deferred} firing once no session is left.
        """
        if not self.sessions:
            return succeed(None)
        d = Deferred()
        self._empty_waiters.append(d)
        return d
