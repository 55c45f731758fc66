"""
Many gates as one: the routing between a gate's L{PlayerManager} and an
L{IClusterBus} shared with other gates (the Redis store).

A gate alone has no L{Cluster}: its player manager routes everything
itself. With a shared store every push, broadcast, kick, reconnect and
player lookup goes through the store, which knows the players of every
gate, and each gate carries out what reaches its channel for its own
sessions:

  - C{push}: a push numbered and stored in the store, for sessions here
    (by session id, so a session whose claim is still being answered gets
    it too, held until its bind is answered);
  - C{broadcast}: a transient push for every session here;
  - C{kick}, C{reconnect}: for the player's session here;
  - C{kick_session}: the player was claimed on another gate; the session
    here is kicked C{replaced} without going offline (the player lives on
    there), unless it has claimed the player again since (the kick names
    the claim it replaced, by number).

The cluster also keeps this gate's heartbeat (with its online count) and
its players' entries alive, and resynchronises after an outage of the
store: releases and expiries that failed are done again, every entry of a
player here is checked (re-claimed, put back if the store lost it, or let
go if the player was claimed elsewhere meanwhile), and sessions are sent the
pushes they may have missed while the bus was down (or while the gate's
heartbeat had lapsed): then, or as soon as a push with a later seq than a
session expects reaches it, whichever comes first. Once, when the store is
first reachable, it takes over the players an earlier process of the same
gate id left there. With a durable copy in PostgreSQL the store puts
back what Redis lost from it, and sessions are sent what the copy held
beyond what they had. What this guarantees: C{docs/cluster.md},
C{docs/persistence.md}.
"""

import json

from twisted.internet.defer import fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gate import errors
from gate.envelope import Outgoing, PushTemplate, encode
from gate.errors import GateError
from gate.player import PushResult
from gate.session import read_paged

#: What clients and the push API are told while the store is away.
UNREACHABLE = "the shared player store is unreachable; try again shortly"
#: What the push API is told once the gate is leaving the cluster.
STOPPING = "the gate is stopping; nothing was sent: use another gate"

#: Longest wait before a failed read of pushes a session missed is tried
#: again (the wait doubles from 0.1 s; live pushes are held meanwhile).
READ_RETRY_MAX = 5.0


class StoreUnavailable(GateError):
    """
    The shared store did not answer: a client's login, auth or resume is
    answered C{internal}, a push API call C{503 unavailable}, both with
    this message.
    """

    def __init__(self, msg=UNREACHABLE):
        GateError.__init__(self, errors.INTERNAL, msg)

    def __str__(self):
        return self.msg


class Missed:
    """
    A session's reads of pushes it missed (L{gate.session.Session.missed}):
    one read at a time; C{again} when another is owed once the hold under
    way ends; C{floor}, the highest seq a finished read covered (so that a
    push the mailbox no longer has, acked or trimmed, is not read for
    forever); C{target}, what the read under way covers.
    """

    __slots__ = ("reading", "again", "floor", "target", "claim", "failures")

    def __init__(self):
        self.reading = False
        self.again = False
        self.floor = 0
        self.target = 0
        self.claim = None
        self.failures = 0


class Cluster:
    """
    Routes through a shared store for one gate, and serves what other gates
    send it.

    @param bus: the L{IClusterBus} (a shared one).
    @param players: the gate's L{gate.player.PlayerManager}.
    @param sessions: the gate's L{gate.session.SessionManager}.
    @param idle_timeout: C{player.idle_timeout}: entries of online players
        are refreshed every quarter of it (at least every minute).
    @param gate_ttl: C{store.gate_ttl}: the heartbeat goes every third.
    """

    log = Logger()

    def __init__(self, clock, gate_id, bus, players, sessions, idle_timeout,
                 gate_ttl):
        self._clock = clock
        self.gate_id = gate_id
        self.bus = bus
        self.players = players
        self.sessions = sessions
        players.cluster = self
        self.heartbeat_interval = gate_ttl / 3
        self.refresh_interval = min(60.0, max(0.5, idle_timeout / 4))
        #: Releases and expiries the store did not confirm: done again when
        #: it is back.
        self.releases = set()
        self.expiries = {}
        #: Whether the players an earlier process of this gate id left in
        #: the store were taken over (once, when it is first reachable).
        self.adopted = False
        self._loops = []
        #: Set by L{stop}: pushes and broadcasts are refused from then on,
        #: so that none is sent after the store's last answer is awaited
        #: (one sent then could be applied with its answer lost: a 503 for
        #: a push made).
        self.leaving = False

    def start(self):
        self.bus.listen(self.gate_id, self)
        for interval, work in ((self.heartbeat_interval, self.heartbeat),
                               (self.refresh_interval, self.refresh)):
            loop = LoopingCall(self._quietly, work)
            loop.clock = self._clock
            loop.start(interval, now=False)
            self._loops.append(loop)

    def stop(self):
        """
        Leave the cluster once what was sent (the releases of the sessions
        that closed) is answered; disconnect.
        """
        self.leaving = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        return self.bus.stop(self.gate_id)

    def _quietly(self, work):
        if not self.bus.reachable:
            return None
        return work().addErrback(self._warn, work.__name__)

    def _warn(self, failure, what):
        self.log.warn("cluster {what} failed: {error}", what=what,
                      error=failure.getErrorMessage())

    def _unreachable(self):
        return fail(StoreUnavailable())

    # What this gate asks of the others.

    def push(self, player_ids, route, data, persist):
        """
        L{gate.player.PlayerManager.push} for a shared store.
        """
        if self.leaving:
            return fail(StoreUnavailable(STOPPING))
        if not self.bus.reachable:
            return self._unreachable()
        ts = self._clock.seconds()
        ids = list(dict.fromkeys(player_ids))
        if not ids:
            return succeed(PushResult())
        head = PushTemplate(route, data, ts).head
        d = self.bus.place(self.gate_id, ids, head, ts, persist)

        def placed(outcomes):
            result = PushResult()
            for player_id, (outcome, _) in zip(ids, outcomes):
                if outcome == "delivered":
                    result.delivered += 1
                elif outcome == "unknown":
                    result.unknown.append(player_id)
                elif persist:
                    result.queued += 1
                else:
                    result.dropped += 1
            return result

        return d.addCallback(placed)

    def broadcast(self, message):
        """
        Send the transient L{Outgoing} C{message} to every gate.

        @return: L{Deferred} firing with the sessions here plus the online
            players the other live gates last reported.
        """
        if self.leaving:
            return fail(StoreUnavailable(STOPPING))
        if not self.bus.reachable:
            return self._unreachable()
        d = self.bus.broadcast(self.gate_id, message.payload)
        return d.addCallback(lambda others: self.players.broadcast_here(
            message) + sum(others.values()))

    def kick(self, player_id, reason, msg):
        if not self.bus.reachable:
            return self._unreachable()
        return self.bus.send_to_player(player_id, "kick", encode(
            {"reason": reason, "msg": msg}))

    def reconnect(self, player_id, addr, reason):
        if not self.bus.reachable:
            return self._unreachable()
        return self.bus.send_to_player(player_id, "reconnect", encode(
            {"addr": addr, "reason": reason}))

    def kick_session(self, location, reason, msg, claim=0):
        """
        Kick the session at C{location} (a L{gate.player.Location}), here or
        on its gate.

        @param claim: the number of the claim that put the session there
            (L{gate.player.Claim.previous_number}): a session that claimed
            the player again since is not kicked.
        """
        header = {"op": "kick_session", "p": location.player_id,
                  "s": location.session_id, "c": claim}
        payload = encode({"reason": reason, "msg": msg})
        if location.gate_id == self.gate_id:
            self.received(header, payload)
            return
        d = self.bus.send_to_gate(location.gate_id, header, payload)
        # Lost with the store: that gate's next refresh finds the player
        # claimed here and kicks its session then.
        d.addErrback(self._warn, "kick of a replaced session")

    def info(self, player_id):
        """
        The push API's player record from the shared directory.
        """
        if not self.bus.reachable:
            return self._unreachable()

        def record(found):
            if found is None:
                return None
            location, last_seq, size, alive = found
            online = location.session_id is not None and alive
            return {"player_id": player_id, "online": online,
                    "gate_id": location.gate_id,
                    "session_id": location.session_id if online else None,
                    "last_seq": last_seq, "mailbox": size}

        return self.bus.info(player_id).addCallback(record)

    # What failed while the store was away, done again when it is back.

    def release_failed(self, failure, player_id, session_id):
        self._warn(failure, "release")
        self.releases.add((player_id, session_id))

    def release_later(self, player_id, session_id):
        """
        A claim failed and may have been made anyway: give it back.
        """
        self.releases.add((player_id, session_id))
        if self.bus.reachable:
            self._clock.callLater(0, self._release_pending)

    def expire_later(self, player):
        self.expiries[player.player_id] = player

    def _release_pending(self):
        pending, self.releases = self.releases, set()
        directory = self.players.directory
        for player_id, session_id in pending:
            if self._session(player_id, session_id) is not None:
                # Claimed again since (a retried login on the same
                # connection), or being claimed: releasing would take a
                # live session offline; a claim that fails again is given
                # back then.
                continue
            directory.release(player_id, self.gate_id, session_id,
                              self._clock.seconds()).addErrback(
                self.release_failed, player_id, session_id)

    def _expire_pending(self):
        pending, self.expiries = self.expiries, {}
        for player_id, player in pending.items():
            if self.players.get(player_id) is None:
                self.players.expire_in_store(player)

    # Serving what reaches this gate.

    def received(self, header, payload):
        """
        One message from the bus (see L{IClusterBus.listen}).
        """
        op = header.get("op")
        if op == "push":
            self._deliver(header["to"], payload)
        elif op == "broadcast":
            if header.get("from") != self.gate_id:
                self.players.broadcast_here(Outgoing(payload))
        elif op in ("kick", "kick_session", "reconnect"):
            session = self._session(header.get("p"), header.get("s"))
            if session is None:
                return
            body = json.loads(payload)
            if op == "reconnect":
                if session.player is not None:
                    self.players.reconnect(session.player_id, body["addr"],
                                           body["reason"])
            elif op == "kick_session" and body["reason"] == "replaced":
                self._replaced(session, header.get("p"), header.get("c"),
                               body["msg"])
            else:
                session.kick(body["reason"], body["msg"])
        else:
            self.log.warn("unknown op {op!r} on the cluster bus", op=op)

    def _session(self, player_id, session_id):
        """
        The session C{session_id} here if it is (or is being) bound to
        C{player_id}.
        """
        session = self.sessions.sessions.get(session_id)
        if session is None:
            return None
        if session.player_id == player_id \
                or self.players.binding.get(session_id) == player_id:
            return session
        return None

    def _replaced(self, session, player_id, claim, msg):
        """
        The claim C{claim} of C{session} was replaced on another gate.
        """
        players = self.players
        if not isinstance(claim, int) or isinstance(claim, bool):
            claim = 0
        if players.binding.get(session.id) == player_id:
            # Its claim is being answered: the kick applies unless that
            # claim is newer (decided when it is answered).
            players.kicks[session.id] = (claim, msg)
            return
        player = session.player
        if claim and player is not None and player.session is session \
                and player.claim_number > claim:
            # For an earlier claim of this session; it claimed the player
            # again since (a second login on the same connection).
            return
        players.replaced_elsewhere(session, "replaced", msg)

    def _deliver(self, to, head):
        push = PushTemplate.from_head(head)
        sessions = self.sessions.sessions
        binding = self.players.binding
        for player_id, session_id, seq in to:
            session = sessions.get(session_id)
            if session is None or (session.player_id != player_id
                                   and binding.get(session_id) != player_id):
                # Gone or moved on: a persistent push stays in the mailbox
                # (the player's next session reads it).
                continue
            if not seq:
                session.push(push.transient())
                continue
            player = session.player
            if not session.holding and player is not None \
                    and player.session is session \
                    and player.player_id == player_id \
                    and seq > max(session.delivered_seq, player.claim_seq) + 1:
                # Pushes before it went by while this gate did not listen
                # (its subscription or heartbeat was down): read them from
                # the mailbox, holding this one and the next meanwhile.
                self._read(player, session, session.missed or Missed(),
                           seq - 1)
            session.push(push.with_seq(seq))

    # Keeping this gate's part of the store alive.

    def heartbeat(self):
        d = self.bus.heartbeat(self.gate_id, self.players.online)

        def beaten(was_alive):
            if was_alive is False:
                # Counted as gone meanwhile (the heartbeat lapsed, or the
                # store lost it): pushes for sessions here were stored but
                # not sent here.
                self._replay_missed()

        return d.addCallback(beaten)

    def refresh(self, offline=False):
        """
        Refresh the entries of the players online here (and with
        C{offline}, check those offline here), acting on what changed.
        """
        players = [p for p in list(self.players.players.values())
                   if p.epoch is not None
                   and (offline or p.session is not None)]
        if not players:
            return succeed(None)
        sessions = [p.session for p in players]
        items = [(p.player_id, s.id if s is not None else "", p.epoch,
                  max(s.delivered_seq, p.claim_seq) if s is not None else 0)
                 for p, s in zip(players, sessions)]
        d = self.bus.refresh(self.gate_id, items)
        return d.addCallback(self._refreshed, players, sessions)

    def _refreshed(self, statuses, players, sessions):
        manager = self.players
        for player, session, status in zip(players, sessions, statuses):
            if status == "ok":
                continue
            if status == "restored":
                # Offline here, lost by the store, put back from its
                # durable copy.
                continue
            if status in ("recreated", "adopted"):
                if status == "recreated":
                    self.log.warn("player {player_id} was missing from the "
                                  "store; put back as online here",
                                  player_id=player.player_id)
                if session is not None and player.session is session:
                    # Its durable copy may hold pushes it has not had.
                    self.catch_up(player, session)
                continue
            if session is not None:
                if status == "elsewhere" and player.session is session \
                        and manager.binding.get(session.id) is None:
                    # (A claim of the session under way decides instead.)
                    self.log.info("player {player_id} was claimed on "
                                  "another gate meanwhile",
                                  player_id=player.player_id)
                    manager.replaced_elsewhere(
                        session, "replaced",
                        "logged in from another connection")
            elif player.session is None and player.lock is None \
                    and manager.get(player.player_id) is player:
                # Offline here: gone from the store (expired with it), or
                # living on another gate now.
                manager.forget_here(player, expired=status == "missing")

    def resync(self, missed):
        """
        The store is reachable again (or for the first time).

        @param missed: whether pushes for sessions here may have been
            published while this gate was not listening.
        """
        self.log.info("resynchronising with the shared store "
                      "(missed messages: {missed})", missed=missed)
        self.heartbeat().addErrback(self._warn, "heartbeat")
        if not self.adopted:
            self._adopt()
        self._release_pending()
        self._expire_pending()
        d = self.refresh(offline=True)
        d.addErrback(self._warn, "refresh")
        if missed:
            d.addCallback(lambda _: self._replay_missed())
        return d

    def _adopt(self):
        """
        Take over the players an earlier process of this gate id left in
        the store (it died, or stopped with players offline here): they
        expire from here, with C{expired}, like players that went offline
        here. Once; again at the next resync if it failed.
        """
        d = self.bus.adopt(self.gate_id, self._clock.seconds())

        def adopted(found):
            self.adopted = True
            for player_id, epoch, since, session_id in found:
                self.players.adopt(player_id, epoch, since, session_id)
            if found:
                self.log.info("took over {n} players an earlier process of "
                              "gate {gate_id} left", n=len(found),
                              gate_id=self.gate_id)

        d.addCallbacks(adopted, self._warn, errbackArgs=("adoption",))

    def _replay_missed(self):
        """
        Send each session here the pushes placed while the bus was down,
        after what it had and before anything new.
        """
        for player in list(self.players.players.values()):
            session = player.session
            if session is not None:
                self.catch_up(player, session)
        sessions = self.sessions.sessions
        for session_id in list(self.players.binding):
            # Being bound: read once the bind is answered (hold_ending).
            session = sessions.get(session_id)
            if session is not None:
                if session.missed is None:
                    session.missed = Missed()
                session.missed.again = True

    def catch_up(self, player, session):
        """
        Send C{session} the pushes of its player's mailbox after what it
        has, before anything new: now, or once the hold under way (a bind,
        or a read of this kind) ends.
        """
        if session.closing or session.closed:
            return
        if session.holding:
            if session.missed is None:
                session.missed = Missed()
            session.missed.again = True
            return
        self._read(player, session, session.missed or Missed(), 0)

    def _read(self, player, session, missed, known):
        """
        Hold live pushes to C{session} and read its mailbox after what it
        has; C{known}: every seq up to it was placed before this read.
        """
        session.missed = missed
        session.begin_replay()
        missed.again = False
        missed.target = max(missed.floor, known)
        self._issue(player, session, missed)

    def _issue(self, player, session, missed):
        missed.reading = True
        missed.claim = player.claim_number
        after = max(session.delivered_seq, player.claim_seq, missed.floor)
        d = read_paged(self.players.mailboxes, player.player_id, after)
        d.addCallbacks(self._read_done, self._read_failed,
                       callbackArgs=(player, session, missed),
                       errbackArgs=(player, session, missed))

    def _current(self, player, session, missed):
        """
        Whether what was read for C{session} is still its to send: the
        same claim of the same player, and no bind under way.
        """
        return (not (session.closed or session.closing)
                and session.player is player and player.session is session
                and player.claim_number == missed.claim
                and session.holds == 1)

    def _read_done(self, found, player, session, missed):
        missed.reading = False
        missed.failures = 0
        if not self._current(player, session, missed):
            # Claimed again meanwhile: read again once that is done.
            missed.again = True
            session.end_replay(None, [])
            return
        missed.floor = max(missed.floor, missed.target)
        session.end_replay(*found)

    def _read_failed(self, failure, player, session, missed):
        missed.reading = False
        if session.closed or session.closing:
            session.end_replay(None, [])
            return
        self._warn(failure, "read of missed pushes")
        delay = min(READ_RETRY_MAX, 0.1 * 2 ** missed.failures)
        missed.failures += 1
        self._clock.callLater(delay, self._retry, player, session, missed)

    def _retry(self, player, session, missed):
        if self._current(player, session, missed):
            self._issue(player, session, missed)
            return
        missed.again = True
        session.end_replay(None, [])

    def hold_ending(self, session, held):
        """
        C{session}'s holds all ended (L{gate.session.Session.
        _finish_replay}); it is about to write C{held}, the live pushes it
        held. Pushes it missed are read first if a read is owed, or if
        C{held} skips seqs (some went by while the gate did not listen).

        @return: whether a read was started (it ends the hold).
        """
        missed = session.missed
        player = session.player
        if player is None or player.session is not session:
            session.missed = None
            return False
        floor = missed.floor if missed is not None else 0
        expect = max(session.delivered_seq, player.claim_seq, floor) + 1
        want = missed is not None and missed.again
        last = 0
        for outgoing in held:
            seq = outgoing.seq
            if seq is None:
                continue
            last = max(last, seq)
            if seq > expect:
                want = True
            elif seq == expect:
                expect += 1
        if not want:
            session.missed = None
            return False
        self._read(player, session, missed or Missed(), last - 1)
        return True
