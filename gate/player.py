"""
Players and the L{PlayerManager} of the seed design: who is bound to which
session, who is offline and for how long, and where a push for a player
goes (its session or its mailbox).
"""

import secrets
from collections import namedtuple

from twisted.internet.defer import DeferredLock, gatherResults, succeed
from twisted.logger import Logger

from gate.envelope import PushTemplate

Location = namedtuple("Location", "player_id gate_id session_id since")
Location.__doc__ = """
Where a player is: C{session_id} is C{None} while the player is offline,
C{since} is when it last came online or went offline.
"""


class Player:
    """
    A player known to this gate: bound to a session, or offline and waiting
    to resume until C{player.idle_timeout} passes.
    """

    __slots__ = ("player_id", "session", "since", "expiry", "lock",
                 "ever_bound", "epoch")

    def __init__(self, player_id, now):
        self.player_id = player_id
        self.ever_bound = False
        #: Names this incarnation of the player: resume tokens carry it, so
        #: a token from before the player expired cannot resume the new one
        #: (whose seqs started over).
        self.epoch = secrets.token_hex(8)
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
    """

    log = Logger()

    def __init__(self, clock, gate_id, directory, mailboxes, events,
                 idle_timeout, metrics=None):
        self._clock = clock
        self.gate_id = gate_id
        self.directory = directory
        self.mailboxes = mailboxes
        self._events = events
        self.idle_timeout = idle_timeout
        self._metrics = metrics
        self.players = {}
        self.online = 0

    def get(self, player_id):
        return self.players.get(player_id)

    @property
    def offline(self):
        return len(self.players) - self.online

    def _report(self):
        if self._metrics is not None:
            self._metrics.players(self.online, len(self.players) - self.online)

    def bind(self, session, player_id):
        """
        Bind C{session} to C{player_id}, replacing any session the player
        has; binds of one player run one at a time, so two racing logins end
        with exactly one session.

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
        d = player.lock.run(self._bind, session, player)
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
                player.expiry = self._clock.callLater(self.idle_timeout,
                                                      self._expire, player)
        return result

    def _bind(self, session, player):
        if session.closed:
            return succeed(None)
        if session.player is not None and session.player is not player:
            # The connection changes player: seqs start over, and pushes held
            # for the old player stay in its mailbox, not on this connection.
            self.unbind(session)
            session.switch_player()
        now = self._clock.seconds()
        d = self.directory.claim(player.player_id, self.gate_id, session.id, now)

        def claimed(previous):
            if session.closed:
                # Lost while the directory answered: give the claim back.
                self.directory.release(player.player_id, self.gate_id,
                                       session.id, self._clock.seconds())
                return None
            old = player.session
            if old is not None and old is not session:
                old.player = None
                old.kick("replaced", "logged in from another connection")
                self._went_offline(player, old, emit=False)
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

        d.addCallback(claimed)
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
        self.directory.release(player.player_id, self.gate_id, session.id,
                               self._clock.seconds())

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
        self.mailboxes.drop(player.player_id)
        self.directory.forget(player.player_id)
        self._events.emit("expired", player.player_id, None)
        self.log.info("player {player_id} expired after {idle}s offline",
                      player_id=player.player_id, idle=self.idle_timeout)

    def ack(self, player, seq):
        return self.mailboxes.ack(player.player_id, seq)

    def push(self, player_ids, route, data, persist=True):
        """
        Send a push to players: persistent pushes are numbered and stored
        for resume, transient ones go only to online players.

        @return: L{Deferred} firing with a L{PushResult}.
        """
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

    def broadcast(self, route, data):
        """
        A transient push to every online player, encoded once.

        @return: how many sessions it went to.
        """
        message = PushTemplate(route, data, self._clock.seconds()).transient()
        n = 0
        for player in self.players.values():
            if player.session is not None:
                player.session.push(message)
                n += 1
        if self._metrics is not None:
            self._metrics.broadcast(n)
        return n

    def kick(self, player_id, reason, msg):
        """
        @return: whether the player had a session here to kick.
        """
        player = self.players.get(player_id)
        if player is None or player.session is None:
            return False
        player.session.kick(reason, msg)
        return True

    def info(self, player_id):
        """
        @return: L{Deferred} firing with the push API's player record or
            C{None}.
        """
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
