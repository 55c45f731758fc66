"""
Players and the L{PlayerManager} of the seed design: who is bound to which
session, who is offline and for how long, and where a push for a player
goes (its session or its mailbox).
"""

from collections import namedtuple

from twisted.internet.defer import DeferredLock, gatherResults, succeed
from twisted.logger import Logger

from gate import errors
from gate.audit import MemoryAuditLog
from gate.bans import Bans
from gate.envelope import PushTemplate
from gate.errors import GateError

Location = namedtuple("Location", "player_id gate_id session_id since epoch",
                      defaults=(None,))
Location.__doc__ = """
Where a player is: C{session_id} is C{None} while the player is offline,
C{since} is when it last came online or went offline, C{epoch} names its
incarnation.
"""

Claim = namedtuple("Claim", "previous epoch last_seq number previous_number",
                   defaults=(0, 0))
Claim.__doc__ = """
What L{gate.interfaces.IPlayerDirectory.claim} answers: the L{Location}
the player was online at before (or C{None}), its incarnation, and (from a
shared store) the highest seq assigned when the claim was made, the
claim's number (the player's claims are counted) and the number of the
claim that made C{previous}: a kick of that session names it, so that a
newer claim of the same session is not kicked by it.
"""


class Player:
    """
    A player known to this gate: bound to a session, or offline and waiting
    to resume until C{player.idle_timeout} passes.
    """

    __slots__ = ("player_id", "session", "since", "expiry", "lock",
                 "ever_bound", "epoch", "claim_seq", "claim_number",
                 "claim_time")

    def __init__(self, player_id, now):
        self.player_id = player_id
        self.ever_bound = False
        #: Names this incarnation of the player, as the directory (which
        #: owns it) answered the last claim: resume tokens carry it, so a
        #: token from before the player expired cannot resume the new one
        #: (whose seqs started over), on any gate.
        self.epoch = None
        #: The highest seq assigned when the session was claimed (shared
        #: stores): pushes above it were all addressed to that session.
        self.claim_seq = 0
        #: The number of that claim (shared stores; 0 if none), and when
        #: it was made: resume tokens are issued as of then, so a ban
        #: Redis records after the claim revokes them.
        self.claim_number = 0
        self.claim_time = None
        self.session = None
        self.since = now
        self.expiry = None
        self.lock = None

    @property
    def online(self):
        return self.session is not None


class PushResult:
    """
    Counts of one push request, as the push API answers them.
    """

    __slots__ = ("delivered", "queued", "dropped", "unknown")

    def __init__(self):
        self.delivered = 0
        self.queued = 0
        self.dropped = 0
        self.unknown = []

    def as_dict(self):
        return {"delivered": self.delivered, "queued": self.queued,
                "dropped": self.dropped, "unknown": self.unknown}


class PlayerManager:
    """
    Binds sessions to players, keeps offline players until they expire, and
    routes pushes.

    @param directory: an L{IPlayerDirectory}.
    @param mailboxes: an L{IMailboxStore}.
    @param events: an L{gate.events.EventSender}.
    @param clock: an L{IReactorTime}.
    @param bans: the L{gate.bans.Bans} that L{kick} records bans in and
        binds check (default: this gate's own, revoking tokens for
        C{token_ttl} seconds).
    """

    log = Logger()

    def __init__(self, clock, gate_id, directory, mailboxes, events,
                 idle_timeout, metrics=None, bans=None,
                 token_ttl=7 * 86400.0):
        self._clock = clock
        self.bans = bans if bans is not None else Bans(clock, token_ttl)
        self.gate_id = gate_id
        self.directory = directory
        self.mailboxes = mailboxes
        self._events = events
        self.idle_timeout = idle_timeout
        self._metrics = metrics
        self.players = {}
        self.online = 0
        #: The session audit log (an L{IAuditLog}), for expiries.
        self.audit = MemoryAuditLog()
        #: The L{gate.cluster.Cluster} when the store is shared with other
        #: gates; C{None} for a gate alone, whose routing stays here.
        self.cluster = None
        #: Session id to the player id it is being claimed for, from the
        #: claim until its answer: pushes and kicks for that player reach
        #: the session from then on, even before the answer is read.
        self.binding = {}
        #: Session id to C{(claim number, msg)} of a C{replaced} kick that
        #: reached it while its claim was being answered: it applies only
        #: if that claim is not newer (L{gate.cluster.Cluster}).
        self.kicks = {}

    def get(self, player_id):
        return self.players.get(player_id)

    @property
    def offline(self):
        return len(self.players) - self.online

    def _report(self):
        if self._metrics is not None:
            self._metrics.players(self.online, len(self.players) - self.online)

    def bind(self, session, player_id, epoch=None, issued=None):
        """
        Bind C{session} to C{player_id}, replacing any session the player
        has; binds of one player run one at a time, so two racing logins end
        with exactly one session.

        @param epoch: for a resume, the incarnation named by its token; the
            bind fails with C{resume_rejected} unless the player lives with
            that incarnation.
        @param issued: for a resume, its token's C{iat} (a shared directory
            checks it against bans).
        @return: L{Deferred} firing with the L{Player}, or with C{None} if the
            session closed meanwhile.
        """
        player = self.players.get(player_id)
        if player is None:
            player = self.players[player_id] = Player(player_id,
                                                      self._clock.seconds())
            self._report()
        if player.lock is None:
            player.lock = DeferredLock()
        # No expiry while a bind is under way: a resume that started in time
        # must not find its player (and mailbox) gone when its claim returns.
        if player.expiry is not None and player.expiry.active():
            player.expiry.cancel()
        player.expiry = None
        d = player.lock.run(self._bind, session, player, epoch, issued)
        d.addBoth(self._after_bind, player)
        return d

    def _after_bind(self, result, player):
        if player.session is None and player.lock is None \
                and self.players.get(player.player_id) is player:
            if not player.ever_bound:
                # Never came online (its first bind failed): forget it
                # quietly, as if never seen.
                del self.players[player.player_id]
                self._report()
            elif player.expiry is None:
                # A failed bind (a rejected resume, say) does not make an
                # offline player live longer.
                left = player.since + self.idle_timeout - self._clock.seconds()
                player.expiry = self._clock.callLater(max(0.0, left),
                                                      self._expire, player)
        return result

    def _bind(self, session, player, epoch=None, issued=None):
        if session.closed or session.closing:
            return succeed(None)
        if session.player is not None and session.player is not player:
            # The connection changes player: seqs start over, and pushes held
            # for the old player stay in its mailbox, not on this connection.
            self.unbind(session)
            session.switch_player()
        now = self._clock.seconds()
        self.binding[session.id] = player.player_id
        d = self.directory.claim(player.player_id, self.gate_id, session.id,
                                 now, epoch, issued)

        def claimed(claim):
            self.binding.pop(session.id, None)
            kick = self.kicks.pop(session.id, None)
            if claim is None:
                raise GateError(errors.RESUME_REJECTED,
                                "no such player (expired or never seen), or "
                                "the token is of an earlier incarnation")
            if session.closed or session.closing:
                # Lost (or kicked from another gate) while the directory
                # answered: give the claim back.
                self._release(player.player_id, session.id)
                return None
            player.epoch = claim.epoch
            player.claim_seq = claim.last_seq
            player.claim_number = claim.number
            player.claim_time = now
            old = player.session
            if old is not None and old is not session:
                old.player = None
                old.kick("replaced", "logged in from another connection")
                self._went_offline(player, old, emit=False)
            previous = claim.previous
            if previous is not None and self.cluster is not None \
                    and previous.session_id != session.id \
                    and (old is None or previous.session_id != old.id):
                # Online on another gate (or a session here the directory
                # still names): that gate kicks it, found by session id.
                self.cluster.kick_session(previous, "replaced",
                                          "logged in from another connection",
                                          claim.previous_number)
            if kick is not None and (not kick[0] or claim.number <= kick[0]):
                # Claimed again elsewhere while this claim was answered:
                # the player lives on there.
                if player.session is session:
                    self.replaced_elsewhere(session, "replaced", kick[1])
                else:
                    self._release(player.player_id, session.id)
                    session.kick("replaced", kick[1])
                return None
            if player.session is not session:
                if player.expiry is not None and player.expiry.active():
                    player.expiry.cancel()
                player.expiry = None
                player.session = session
                player.ever_bound = True
                player.since = self._clock.seconds()
                session.player = player
                self.online += 1
                self._report()
                self._events.emit("online", player.player_id, session.id)
                self.log.info("session {session_id} from {peer} bound to "
                              "player {player_id}", session_id=session.id,
                              peer=session.peer, player_id=player.player_id)
            return player

        def failed(failure):
            self.binding.pop(session.id, None)
            self.kicks.pop(session.id, None)
            if self.cluster is not None:
                # The claim may have been made with its answer lost.
                self.cluster.release_later(player.player_id, session.id)
            return failure

        d.addCallbacks(claimed, failed)
        d.addBoth(self._unlock_when_idle, player)
        return d

    def _unlock_when_idle(self, result, player):
        if player.lock is not None and not player.lock.waiting:
            # Drop the lock with its last user so idle players cost less.
            player.lock = None
        return result

    def unbind(self, session):
        """
        C{session} is gone: its player (if still its) goes offline.
        """
        player = session.player
        session.player = None
        if player is None or player.session is not session:
            return
        self._went_offline(player, session, emit=True)
        self._release(player.player_id, session.id)

    def _release(self, player_id, session_id):
        d = self.directory.release(player_id, self.gate_id, session_id,
                                   self._clock.seconds())
        if self.cluster is not None:
            d.addErrback(self.cluster.release_failed, player_id, session_id)

    def replaced_elsewhere(self, session, reason, msg):
        """
        C{session}'s player was claimed on another gate: kick the session
        without taking the player offline here (no C{offline} event, no
        expiry: the player lives on over there).

        The session's claim is given back all the same: the release only
        takes effect if the directory still names this session (the kick
        was for a claim the directory no longer holds), and then the
        player did go offline here after all.
        """
        player = session.player
        if player is not None and player.session is session:
            player.session = None
            session.player = None
            self.online -= 1
            if player.expiry is not None and player.expiry.active():
                player.expiry.cancel()
            player.expiry = None
            if player.lock is None \
                    and self.players.get(player.player_id) is player:
                del self.players[player.player_id]
            self._report()
            now = self._clock.seconds()
            d = self.directory.release(player.player_id, self.gate_id,
                                       session.id, now)
            d.addCallback(self._released_after_all, player, session.id, now)
            if self.cluster is not None:
                d.addErrback(self.cluster.release_failed, player.player_id,
                             session.id)
        session.kick(reason, msg)

    def _released_after_all(self, released, player, session_id, now):
        if not released or player.session is not None:
            return
        if self.players.get(player.player_id) is None:
            self.players[player.player_id] = player
            self._report()
        elif self.players[player.player_id] is not player:
            return
        player.since = now
        if player.expiry is None or not player.expiry.active():
            left = now + self.idle_timeout - self._clock.seconds()
            player.expiry = self._clock.callLater(max(0.0, left),
                                                  self._expire, player)
        self._events.emit("offline", player.player_id, session_id)

    def adopt(self, player_id, epoch, since, session_id=None):
        """
        A player an earlier process of this gate id left in the shared
        store (L{gate.interfaces.IClusterBus.adopt}): offline here since
        C{since}, expired from here like any other (and the backend told
        C{offline} for the session it still had).
        """
        if player_id in self.players:
            return
        player = self.players[player_id] = Player(player_id, since)
        player.epoch = epoch
        player.ever_bound = True
        left = since + self.idle_timeout - self._clock.seconds()
        player.expiry = self._clock.callLater(max(0.0, left), self._expire,
                                              player)
        self._report()
        if session_id is not None:
            self._events.emit("offline", player_id, session_id)

    def _went_offline(self, player, session, emit):
        player.session = None
        player.since = self._clock.seconds()
        self.online -= 1
        if player.expiry is None or not player.expiry.active():
            player.expiry = self._clock.callLater(self.idle_timeout,
                                                  self._expire, player)
        self._report()
        if emit:
            self._events.emit("offline", player.player_id, session.id)

    def _expire(self, player):
        """
        Remove a player that had no session for C{player.idle_timeout}.
        """
        player.expiry = None
        if player.session is not None or self.players.get(
                player.player_id) is not player:
            return
        if player.lock is not None:
            # A bind is under way; _after_bind re-arms the timer if it fails.
            return
        del self.players[player.player_id]
        self._report()
        self.expire_in_store(player)

    def expire_in_store(self, player):
        """
        Remove the expired C{player} from the directory and its mailbox,
        only if it is still offline and last here: a shared directory may
        know it came back on another gate meanwhile.
        """
        d = self.directory.expire(player.player_id, self.gate_id,
                                  player.epoch)
        d.addCallbacks(self._expired, self._expire_failed,
                       callbackArgs=(player,), errbackArgs=(player,))

    def _expired(self, removed, player):
        if not removed:
            return
        self.mailboxes.drop(player.player_id)
        self.audit.record("expiry", player.player_id, None, self.gate_id,
                          None, "idle_timeout", self._clock.seconds())
        self._events.emit("expired", player.player_id, None)
        self.log.info("player {player_id} expired after {idle}s offline",
                      player_id=player.player_id, idle=self.idle_timeout)

    def _expire_failed(self, failure, player):
        self.log.warn("expiry of player {player_id} not confirmed by the "
                      "store ({error}); tried again when it is back",
                      player_id=player.player_id,
                      error=failure.getErrorMessage())
        if self.cluster is not None:
            self.cluster.expire_later(player)

    def forget_here(self, player, expired):
        """
        Drop an offline C{player} this gate holds but the shared store does
        not: C{expired} (the store lost it; the backend is told) or living
        on another gate.
        """
        if player.expiry is not None and player.expiry.active():
            player.expiry.cancel()
        player.expiry = None
        if self.players.get(player.player_id) is player:
            del self.players[player.player_id]
            self._report()
        if expired:
            self._events.emit("expired", player.player_id, None)

    def ack(self, player, seq):
        return self.mailboxes.ack(player.player_id, seq)

    def push(self, player_ids, route, data, persist=True):
        """
        Send a push to players: persistent pushes are numbered and stored
        for resume, transient ones go only to online players.

        @return: L{Deferred} firing with a L{PushResult}.
        """
        if self.cluster is not None:
            # Counted wherever the players are, through the shared store.
            return self.cluster.push(player_ids, route, data,
                                     persist).addCallback(self._counted)
        template = PushTemplate(route, data, self._clock.seconds())
        result = PushResult()
        players = []
        seen = set()
        for player_id in player_ids:
            if player_id in seen:
                continue
            seen.add(player_id)
            player = self.players.get(player_id)
            if player is None:
                result.unknown.append(player_id)
            elif persist:
                players.append(player)
            elif player.session is not None:
                player.session.push(template.transient())
                result.delivered += 1
            else:
                result.dropped += 1
        if not players:
            self._count(result)
            return succeed(result)
        d = self.mailboxes.append([p.player_id for p in players], route,
                                  data, template.ts)

        def stored(entries):
            for player, entry in zip(players, entries):
                session = player.session
                if session is not None:
                    session.push(template.with_seq(entry.seq))
                    result.delivered += 1
                else:
                    result.queued += 1
            self._count(result)
            return result

        return d.addCallback(stored)

    def _count(self, result):
        if self._metrics is not None:
            self._metrics.pushed(result)

    def _counted(self, result):
        self._count(result)
        return result

    def broadcast(self, route, data):
        """
        A transient push to every online player, encoded once.

        @return: how many sessions it went to (with a shared store, a
            L{Deferred} firing with that count over all gates).
        """
        message = PushTemplate(route, data, self._clock.seconds()).transient()
        if self.cluster is not None:
            return self.cluster.broadcast(message)
        return self.broadcast_here(message)

    def broadcast_here(self, message):
        """
        Send the L{gate.envelope.Outgoing} C{message} to every player online
        on this gate.

        @return: how many sessions it went to.
        """
        n = 0
        for player in self.players.values():
            if player.session is not None:
                player.session.push(message)
                n += 1
        if self._metrics is not None:
            self._metrics.broadcast(n)
        return n

    def kick(self, player_id, reason, msg, ban_seconds=None):
        """
        @param ban_seconds: when given, also ban the player for that long
            and revoke its resume tokens (see L{gate.bans.Bans}), whether
            or not it has a session here.
        @return: whether the player had a session here to kick (with a
            shared store, for a player not online here: a L{Deferred} firing
            with whether its gate got the kick).
        """
        if ban_seconds is not None:
            recorded = self.bans.ban(player_id,
                                     self._clock.seconds() + ban_seconds)
            self.log.info("player {player_id} banned for {seconds}s",
                          player_id=player_id, seconds=ban_seconds)
            if recorded is not None:
                # Shared bans (gate.bans.SharedBans): kick once every
                # gate's claims refuse the player.
                return recorded.addCallback(
                    lambda _: self._kick(player_id, reason, msg))
        return self._kick(player_id, reason, msg)

    def _kick(self, player_id, reason, msg):
        player = self.players.get(player_id)
        if player is None or player.session is None:
            if self.cluster is not None:
                return self.cluster.kick(player_id, reason, msg)
            return False
        player.session.kick(reason, msg)
        return True

    def reconnect(self, player_id, addr, reason):
        """
        Tell the player's session on this gate to reconnect to C{addr} (see
        L{gate.session.Session.send_reconnect}); at once, one player needs
        no jitter.

        @param addr: an address, or a dict of transport name to address
            with C{"*"} for the others (L{gate.drain.check_target}).
        @return: whether a session on this gate got it (not when the player
            is offline, unknown here, or its session is already moving);
            with a shared store, for a player not online here, a
            L{Deferred} firing with whether its gate got it.
        """
        player = self.players.get(player_id)
        if player is None or player.session is None:
            if self.cluster is not None:
                return self.cluster.reconnect(player_id, addr, reason)
            return False
        return player.session.send_reconnect(addr, reason)

    def info(self, player_id):
        """
        @return: L{Deferred} firing with the push API's player record or
            C{None}.
        """
        if self.cluster is not None:
            # The shared directory knows players of every gate.
            return self.cluster.info(player_id)
        player = self.players.get(player_id)
        if player is None:
            return succeed(None)
        d = gatherResults([self.mailboxes.last_seq(player_id),
                           self.mailboxes.size(player_id)],
                          consumeErrors=True)

        def record(results):
            last_seq, size = results
            session = player.session
            return {"player_id": player_id, "online": session is not None,
                    "gate_id": self.gate_id,
                    "session_id": session.id if session is not None else None,
                    "last_seq": last_seq, "mailbox": size}

        return d.addCallback(record)

    def stop(self):
        """
        Cancel expiry timers; the players' state goes with the process (or
        stays in a shared store).
        """
        for player in self.players.values():
            if player.expiry is not None and player.expiry.active():
                player.expiry.cancel()
            player.expiry = None
