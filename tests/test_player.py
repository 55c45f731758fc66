"""
Tests for L{gate.player}: binding sessions to players (one session per
player), offline players and their expiry, and where pushes go
(PROTOCOL.md section 3); and for the in-memory L{IPlayerDirectory}.
"""

import json

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gate.interfaces import IPlayerDirectory
from gate.metrics import Metrics
from gate.player import Location, PlayerManager, PushResult
from mmogate_plugins.memory import MemoryPlayerDirectory

from tests.fakes import (GATE_ID, FailingMailboxStore, RecordingEvents,
                         Stack)


class MemoryDirectoryTests(SynchronousTestCase):
    def setUp(self):
        self.directory = MemoryPlayerDirectory()

    def result(self, d):
        return self.successResultOf(d)

    def test_interface(self):
        self.assertTrue(verifyObject(IPlayerDirectory, self.directory))

    def test_claim_new(self):
        """
        The first claim makes the player's incarnation, kept by later
        claims while the player lives.
        """
        claim = self.result(self.directory.claim("a", "g", "s1", 1.0))
        self.assertIsNone(claim.previous)
        self.assertTrue(claim.epoch)
        self.assertEqual(self.result(self.directory.lookup("a")),
                         Location("a", "g", "s1", 1.0, claim.epoch))
        again = self.result(self.directory.claim("a", "g", "s2", 2.0))
        self.assertEqual(again.epoch, claim.epoch)

    def test_claim_online_returns_previous(self):
        epoch = self.result(self.directory.claim("a", "g1", "s1", 1.0)).epoch
        self.assertEqual(
            self.result(self.directory.claim("a", "g2", "s2", 2.0)).previous,
            Location("a", "g1", "s1", 1.0, epoch))
        self.assertEqual(self.result(self.directory.lookup("a")).session_id, "s2")

    def test_claim_offline_returns_none(self):
        self.directory.claim("a", "g", "s1", 1.0)
        self.directory.release("a", "g", "s1", 2.0)
        self.assertIsNone(
            self.result(self.directory.claim("a", "g", "s2", 3.0)).previous)

    def test_claim_with_epoch(self):
        """
        A resume's claim names the incarnation: it never creates a player
        and fails for another incarnation.
        """
        self.assertIsNone(self.result(
            self.directory.claim("a", "g", "s1", 1.0, "e0")))
        self.assertIsNone(self.result(self.directory.lookup("a")))
        epoch = self.result(self.directory.claim("a", "g", "s1", 1.0)).epoch
        self.assertIsNone(self.result(
            self.directory.claim("a", "g", "s2", 2.0, "other")))
        self.assertEqual(self.result(self.directory.lookup("a")).session_id,
                         "s1")
        claim = self.result(self.directory.claim("a", "g", "s2", 2.0, epoch))
        self.assertEqual(claim.epoch, epoch)

    def test_release(self):
        epoch = self.result(self.directory.claim("a", "g", "s1", 1.0)).epoch
        self.assertFalse(self.result(self.directory.release("a", "g", "s0", 2.0)))
        self.assertFalse(self.result(self.directory.release("a", "h", "s1", 2.0)))
        self.assertFalse(self.result(self.directory.release("b", "g", "s1", 2.0)))
        self.assertTrue(self.result(self.directory.release("a", "g", "s1", 2.0)))
        self.assertEqual(self.result(self.directory.lookup("a")),
                         Location("a", "g", None, 2.0, epoch))
        self.assertFalse(self.result(self.directory.release("a", "g", "s1", 3.0)))

    def test_forget(self):
        self.directory.claim("a", "g", "s1", 1.0)
        self.directory.forget("a")
        self.assertIsNone(self.result(self.directory.lookup("a")))
        self.result(self.directory.forget("never"))

    def test_expire(self):
        """
        Only a player still offline, last on that gate and of that
        incarnation is removed.
        """
        epoch = self.result(self.directory.claim("a", "g", "s1", 1.0)).epoch
        self.assertFalse(self.result(self.directory.expire("a", "g", epoch)))
        self.directory.release("a", "g", "s1", 2.0)
        self.assertFalse(self.result(self.directory.expire("a", "h", epoch)))
        self.assertFalse(self.result(self.directory.expire("a", "g", "old")))
        self.assertTrue(self.result(self.directory.expire("a", "g", epoch)))
        self.assertIsNone(self.result(self.directory.lookup("a")))
        self.assertFalse(self.result(self.directory.expire("a", "g", epoch)))


class PushResultTests(SynchronousTestCase):
    def test_as_dict(self):
        self.assertEqual(PushResult().as_dict(),
                         {"delivered": 0, "queued": 0, "dropped": 0,
                          "unknown": []})


class BindTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack()
        self.players = self.stack.players

    def test_login_binds(self):
        session, connection, answer = self.stack.login("alice")
        player = self.players.get("alice")
        self.assertIs(player.session, session)
        self.assertIs(session.player, player)
        self.assertTrue(player.online)
        self.assertEqual((self.players.online, self.players.offline), (1, 0))
        self.assertEqual(self.stack.events.of("alice"), [("online", session.id)])
        location = self.successResultOf(self.stack.directory.lookup("alice"))
        self.assertEqual((location.gate_id, location.session_id),
                         (GATE_ID, session.id))

    def test_unbind(self):
        session, connection, _ = self.stack.login("alice")
        self.stack.clock.advance(5)
        session.lost()
        player = self.players.get("alice")
        self.assertIsNone(player.session)
        self.assertIsNone(session.player)
        self.assertEqual(player.since, 5)
        self.assertEqual((self.players.online, self.players.offline), (0, 1))
        self.assertEqual(self.stack.events.of("alice"),
                         [("online", session.id), ("offline", session.id)])
        location = self.successResultOf(self.stack.directory.lookup("alice"))
        self.assertIsNone(location.session_id)

    def test_one_session_per_player(self):
        """
        A second login of a player kicks the first session (C{replaced}).
        """
        s1, c1, _ = self.stack.login("alice")
        s2, c2, _ = self.stack.login("alice")
        player = self.players.get("alice")
        self.assertIs(player.session, s2)
        self.assertIsNone(s1.player)
        self.assertEqual(c1.messages[-1]["t"], "kick")
        self.assertEqual(c1.messages[-1]["reason"], "replaced")
        self.assertTrue(c1.closed)
        self.assertFalse(c2.closed)
        self.assertEqual(self.players.online, 1)
        # The replaced connection going away does not take the player
        # offline.
        s1.lost()
        self.assertIs(player.session, s2)
        self.assertEqual(self.players.online, 1)
        self.assertEqual(self.stack.events.of("alice"),
                         [("online", s1.id), ("online", s2.id)])

    def test_relogin_same_session(self):
        s1, c1, _ = self.stack.login("alice")
        self.stack.login("alice", session=s1)
        self.assertIs(self.players.get("alice").session, s1)
        self.assertFalse(c1.closed)
        self.assertEqual(self.players.online, 1)
        self.assertEqual(self.stack.events.of("alice"), [("online", s1.id)])

    def test_switch_player_on_one_session(self):
        """
        Logging in as someone else on the same session takes the first
        player offline.
        """
        s1, c1, _ = self.stack.login("alice")
        self.stack.login("bob", session=s1)
        self.assertIsNone(self.players.get("alice").session)
        self.assertIs(self.players.get("bob").session, s1)
        self.assertEqual(self.players.online, 1)
        self.assertEqual(self.players.offline, 1)
        self.assertEqual(self.stack.events.of("alice"),
                         [("online", s1.id), ("offline", s1.id)])

    def test_racing_binds_end_with_one_session(self):
        """
        Two logins of one player whose directory claims answer late: the
        claims run one at a time and exactly one session stays bound.
        """
        stack = Stack(hold_directory=("claim",))
        s1, c1 = stack.connect()
        s2, c2 = stack.connect()
        stack.send(s1, t="login", id=1, data={"name": "alice"})
        stack.send(s2, t="login", id=1, data={"name": "alice"})
        self.assertEqual(len(stack.directory.waiting("claim")), 1)
        stack.directory.fire("claim")
        self.assertEqual(len(stack.directory.waiting("claim")), 1)
        stack.directory.fire("claim")
        self.assertEqual(stack.directory.waiting(), [])
        player = stack.players.get("alice")
        self.assertIs(player.session, s2)
        self.assertIs(s2.player, player)
        self.assertIsNone(s1.player)
        self.assertEqual(stack.players.online, 1)
        self.assertEqual([m["t"] for m in c1.messages], ["resp", "kick"])
        self.assertEqual(c1.messages[1]["reason"], "replaced")
        self.assertEqual([m["t"] for m in c2.messages], ["resp"])
        location = self.successResultOf(stack.memory_directory.lookup("alice"))
        self.assertEqual(location.session_id, s2.id)

    def test_many_racing_binds(self):
        stack = Stack(hold_directory=("claim",))
        sessions = [stack.connect() for _ in range(5)]
        for session, _ in sessions:
            stack.send(session, t="login", id=1, data={"name": "alice"})
        while stack.directory.waiting("claim"):
            self.assertEqual(len(stack.directory.waiting("claim")), 1)
            stack.directory.fire("claim")
        bound = [s for s, _ in sessions if s.player is not None]
        self.assertEqual(bound, [sessions[-1][0]])
        self.assertEqual(stack.players.online, 1)
        kicked = [c for _, c in sessions if c.closed]
        self.assertEqual(len(kicked), 4)
        self.assertIsNone(stack.players.get("alice").lock)

    def test_session_closed_during_claim(self):
        """
        A session that goes away while its claim is answered is not bound,
        and its claim is given back.
        """
        stack = Stack(hold_directory=("claim",))
        s1, c1 = stack.connect()
        stack.send(s1, t="login", id=1, data={"name": "alice"})
        s1.lost()
        stack.directory.fire("claim")
        # Never online: forgotten as if never seen (a push is 'unknown').
        self.assertIsNone(stack.players.get("alice"))
        self.assertIsNone(s1.player)
        self.assertEqual(stack.players.online, 0)
        self.assertEqual(c1.messages, [])
        location = self.successResultOf(stack.memory_directory.lookup("alice"))
        self.assertIsNone(location.session_id)


class ExpiryTests(SynchronousTestCase):
    def setUp(self):
        # Sessions are kept alive (no idle kick) while the clock runs ahead.
        self.stack = Stack(player__idle_timeout=100,
                           session__heartbeat_ttl=100000)
        self.players = self.stack.players

    def test_expires_after_idle_timeout(self):
        session, _, _ = self.stack.login("alice")
        self.stack.push(["alice"])
        session.lost()
        self.stack.push(["alice"])
        self.stack.clock.advance(99.9)
        self.assertIsNotNone(self.players.get("alice"))
        self.stack.clock.advance(0.1)
        self.assertIsNone(self.players.get("alice"))
        self.assertEqual(self.players.offline, 0)
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.last_seq("alice")), 0)
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("alice")), 0)
        self.assertIsNone(self.successResultOf(
            self.stack.directory.lookup("alice")))
        self.assertEqual(self.stack.events.of("alice"),
                         [("online", session.id), ("offline", session.id),
                          ("expired", None)])
        self.assertEqual(self.stack.push(["alice"]).unknown, ["alice"])

    def test_lifecycle_events_reach_backend(self):
        """
        With the real event sender, the backend is told C{online},
        C{offline} and C{expired} with the fields of PROTOCOL.md section 4.
        """
        from gate.events import EventSender
        stack = Stack(player__idle_timeout=100)
        stack.players._events = EventSender(stack.clock, stack.backend,
                                            GATE_ID, 100, 10)
        session, _, _ = stack.login("alice")
        stack.clock.advance(1)
        session.lost()
        stack.clock.advance(100)
        bodies = [p.args[0] for p in stack.backend.events]
        self.assertEqual(bodies, [
            {"event": "online", "player_id": "alice", "gate_id": GATE_ID,
             "session_id": session.id, "ts": 0.0},
            {"event": "offline", "player_id": "alice", "gate_id": GATE_ID,
             "session_id": session.id, "ts": 1.0},
            {"event": "expired", "player_id": "alice", "gate_id": GATE_ID,
             "session_id": None, "ts": 101.0}])

    def test_online_player_does_not_expire(self):
        self.stack.login("alice")
        self.stack.clock.advance(1000)
        self.assertIsNotNone(self.players.get("alice"))
        self.assertEqual([c for c in self.stack.clock.getDelayedCalls()
                          if c.func == self.players._expire], [])

    def test_return_cancels_expiry(self):
        s1, _, _ = self.stack.login("alice")
        s1.lost()
        self.stack.clock.advance(60)
        s2, _, _ = self.stack.login("alice")
        self.stack.clock.advance(60)
        self.assertIs(self.players.get("alice").session, s2)
        s2.lost()
        self.stack.clock.advance(99)
        self.assertIsNotNone(self.players.get("alice"))
        self.stack.clock.advance(1)
        self.assertIsNone(self.players.get("alice"))
        self.assertEqual([e for e, _ in self.stack.events.of("alice")],
                         ["online", "offline", "online", "offline", "expired"])

    def test_replaced_player_does_not_expire(self):
        """
        Being replaced is not going offline: no expiry starts.
        """
        s1, _, _ = self.stack.login("alice")
        s2, _, _ = self.stack.login("alice")
        s1.lost()
        self.stack.clock.advance(1000)
        self.assertIs(self.players.get("alice").session, s2)

    def test_no_expiry_while_binding(self):
        """
        A player whose resume started before C{idle_timeout} ran out is not
        expired while the directory answers the claim: it ends bound, known,
        and with its mailbox.
        """
        stack = Stack(hold_directory=("claim",), player__idle_timeout=100)
        stack.directory.hold = set()
        session, _, answer = stack.login("alice")
        session.lost()
        stack.clock.advance(50)
        stack.push(["alice"], "note", "kept")
        stack.directory.hold = {"claim"}
        stack.clock.advance(49)
        resumed, connection = stack.connect()
        stack.send(resumed, t="resume", id=1, player_id="alice",
                   resume_token=answer["resume_token"], last_seq=0)
        stack.clock.advance(1)
        stack.directory.fire("claim")
        player = stack.players.get("alice")
        self.assertIsNotNone(player)
        self.assertIs(player.session, resumed)
        self.assertEqual([(m["t"], m.get("seq")) for m in connection.messages],
                         [("resp", None), ("push", 1)])
        self.assertNotIn(("expired", None), stack.events.of("alice"))
        self.assertEqual(stack.push(["alice"]).delivered, 1)

    def test_stop_cancels_timers(self):
        s1, _, _ = self.stack.login("alice")
        s1.lost()
        self.players.stop()
        self.stack.clock.advance(1000)
        self.assertIsNotNone(self.players.get("alice"))


class PushTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack()
        self.players = self.stack.players

    def pushes(self, connection):
        return [m for m in connection.messages if m["t"] == "push"]

    def test_unknown(self):
        result = self.stack.push(["ghost", "ghost", "nobody"])
        self.assertEqual(result.as_dict(), {"delivered": 0, "queued": 0,
                                            "dropped": 0,
                                            "unknown": ["ghost", "nobody"]})

    def test_persistent_online(self):
        session, connection, _ = self.stack.login("alice")
        self.stack.clock.advance(7.5)
        result = self.stack.push(["alice"], "chat", {"m": 1})
        self.assertEqual(result.as_dict(), {"delivered": 1, "queued": 0,
                                            "dropped": 0, "unknown": []})
        self.assertEqual(self.pushes(connection),
                         [{"t": "push", "route": "chat", "data": {"m": 1},
                           "ts": 7.5, "seq": 1}])
        # Kept until acked.
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("alice")), 1)

    def test_persistent_offline_queued(self):
        session, connection, _ = self.stack.login("alice")
        session.lost()
        result = self.stack.push(["alice"], "chat", 1)
        self.assertEqual((result.delivered, result.queued), (0, 1))
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("alice")), 1)

    def test_transient(self):
        """
        Transient pushes go to online players without a seq, are dropped for
        offline ones, and are never stored.
        """
        s1, c1, _ = self.stack.login("alice")
        s2, c2, _ = self.stack.login("bob")
        s2.lost()
        result = self.stack.push(["alice", "bob", "ghost"], "fx", [1],
                                 persist=False)
        self.assertEqual(result.as_dict(), {"delivered": 1, "queued": 0,
                                            "dropped": 1,
                                            "unknown": ["ghost"]})
        self.assertEqual(self.pushes(c1), [{"t": "push", "route": "fx",
                                            "data": [1], "ts": 0.0}])
        for player in ("alice", "bob"):
            self.assertEqual(self.successResultOf(
                self.stack.mailboxes.size(player)), 0)
            self.assertEqual(self.successResultOf(
                self.stack.mailboxes.last_seq(player)), 0)

    def test_mixed_counts(self):
        s1, c1, _ = self.stack.login("a")
        s2, c2, _ = self.stack.login("b")
        s2.lost()
        result = self.stack.push(["a", "b", "x", "a"])
        self.assertEqual(result.as_dict(), {"delivered": 1, "queued": 1,
                                            "dropped": 0, "unknown": ["x"]})
        self.assertEqual(len(self.pushes(c1)), 1)

    def test_seq_continues_across_reconnects(self):
        s1, c1, _ = self.stack.login("alice")
        self.stack.push(["alice"])
        self.stack.push(["alice"])
        s1.lost()
        self.stack.push(["alice"])
        s2, c2, answer = self.stack.login("alice")
        self.assertEqual(answer["last_seq"], 3)
        self.stack.push(["alice"])
        self.assertEqual([m["seq"] for m in self.pushes(c1)], [1, 2])
        self.assertEqual([m["seq"] for m in self.pushes(c2)], [4])

    def test_seq_per_player(self):
        s1, c1, _ = self.stack.login("a")
        s2, c2, _ = self.stack.login("b")
        self.stack.push(["a"])
        self.stack.push(["a", "b"])
        self.assertEqual([m["seq"] for m in self.pushes(c1)], [1, 2])
        self.assertEqual([m["seq"] for m in self.pushes(c2)], [1])

    def test_store_failure_fails_push(self):
        stack = Stack()
        stack.players.mailboxes = FailingMailboxStore(stack.clock, 10, 10)
        stack.login("alice")
        self.failureResultOf(stack.players.push(["alice"], "r", 1),
                             RuntimeError)

    def test_broadcast(self):
        s1, c1, _ = self.stack.login("a")
        s2, c2, _ = self.stack.login("b")
        s3, c3, _ = self.stack.login("c")
        s3.lost()
        self.assertEqual(self.players.broadcast("news", {"x": 1}), 2)
        for connection in (c1, c2):
            self.assertEqual(self.pushes(connection),
                             [{"t": "push", "route": "news", "data": {"x": 1},
                               "ts": 0.0}])
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("c")), 0)
        self.assertIs(c1.sent[-1], c2.sent[-1])

    def test_kick(self):
        s1, c1, _ = self.stack.login("alice")
        self.assertTrue(self.players.kick("alice", "admin", "bye"))
        self.assertEqual(c1.messages[-1], {"t": "kick", "reason": "admin",
                                           "msg": "bye"})
        self.assertTrue(c1.closed)
        self.assertFalse(self.players.kick("ghost", "admin", "bye"))
        s1.lost()
        self.assertFalse(self.players.kick("alice", "admin", "bye"))

    def test_kicked_player_is_offline_at_once(self):
        """
        A kicked session's player goes offline when the kick is sent, not
        when the connection finally closes: a push in between is queued for
        resume, not counted as delivered to a session that sends no more.
        """
        s1, c1, _ = self.stack.login("alice")
        self.players.kick("alice", "admin", "bye")
        before = len(c1.sent)
        result = self.stack.push(["alice"])
        self.assertEqual((result.delivered, result.queued), (0, 1))
        self.assertEqual(len(c1.sent), before)
        self.assertEqual(self.players.online, 0)
        self.assertEqual([e for e, _ in self.stack.events.of("alice")],
                         ["online", "offline"])
        s1.lost()
        self.assertEqual([e for e, _ in self.stack.events.of("alice")],
                         ["online", "offline"])

    def test_info(self):
        self.assertIsNone(self.successResultOf(self.players.info("ghost")))
        s1, c1, _ = self.stack.login("alice")
        self.stack.push(["alice"])
        self.stack.push(["alice"])
        self.players.ack(self.players.get("alice"), 1)
        self.assertEqual(self.successResultOf(self.players.info("alice")),
                         {"player_id": "alice", "online": True,
                          "gate_id": GATE_ID, "session_id": s1.id,
                          "last_seq": 2, "mailbox": 1})
        s1.lost()
        info = self.successResultOf(self.players.info("alice"))
        self.assertEqual((info["online"], info["session_id"]), (False, None))

    def test_metrics(self):
        stack = Stack()
        metrics = Metrics(GATE_ID)
        players = PlayerManager(stack.clock, GATE_ID, stack.directory,
                                stack.mailboxes, RecordingEvents(), 100,
                                metrics)
        stack.sessions.players = players
        s1, _, _ = stack.login("a")
        s2, _, _ = stack.login("b")
        s2.lost()
        sample = metrics.registry.get_sample_value
        self.assertEqual(sample("mmogate_players", {"state": "online"}), 1)
        self.assertEqual(sample("mmogate_players", {"state": "offline"}), 1)
        players.push(["a", "b", "x"], "r", None)
        players.push(["a", "b"], "r", None, persist=False)
        self.assertEqual(sample("mmogate_pushes_total",
                                {"outcome": "delivered"}), 2)
        self.assertEqual(sample("mmogate_pushes_total", {"outcome": "queued"}), 1)
        self.assertEqual(sample("mmogate_pushes_total", {"outcome": "dropped"}), 1)
        self.assertEqual(sample("mmogate_pushes_total", {"outcome": "unknown"}), 1)

    def test_push_bytes_shared(self):
        """
        A transient push to many players is encoded once.
        """
        s1, c1, _ = self.stack.login("a")
        s2, c2, _ = self.stack.login("b")
        self.stack.push(["a", "b"], "r", {"big": "x" * 100}, persist=False)
        self.assertIs(c1.sent[-1], c2.sent[-1])
        self.assertEqual(json.loads(c1.sent[-1].payload)["data"],
                         {"big": "x" * 100})
