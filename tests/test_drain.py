"""
Tests for moving clients to another gate: L{gate.drain} (address checks, the
jitter L{Spread}, the L{Drainer}), L{gate.session.Session.send_reconnect}
(lane finished and output flushed before C{reconnect}, closed after
C{drain.close_after}), L{gate.player.PlayerManager.reconnect}, and the
C{/v1/reconnect} and C{/v1/drain} calls of the API (PROTOCOL.md sections 2
and 5). All on a L{Clock}; end to end in C{tests/test_e2e_drain.py}.
"""

import json
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gate.api import APIResource, APISite
from gate.drain import (Drainer, NotRunning, Spread, address_for, check_addr,
                        check_deadline, check_target)
from gate.metrics import Metrics

from tests.fakes import API_KEY, Stack, http_request


def kinds(messages):
    return [m["t"] for m in messages]


def drain_calls(clock):
    """
    The timers of drainers and spreads pending on C{clock}.
    """
    return [c for c in clock.getDelayedCalls()
            if isinstance(getattr(c.func, "__self__", None),
                          (Drainer, Spread))]


class Sequence:
    """
    A random source that answers the given values in turn.
    """

    def __init__(self, *values):
        self._values = list(values)

    def __call__(self):
        return self._values.pop(0)


class AddressTests(SynchronousTestCase):
    def test_accepted(self):
        for addr in ("b.example:8080", "127.0.0.1:1", "[::1]:65535",
                     "ws://b.example:8081/ws", "wss://b.example/ws",
                     "WS://b:1/ws?x=1"):
            self.assertEqual(check_addr(addr), addr)

    def test_refused(self):
        for addr in (None, 5, "", "b", "b:", "b:0", "b:65536", "b:x",
                     ":8080", "tcp://b:1", "tls://b:1", "http://b/",
                     "b:1/path", "b:1?q", " b:1", "b :1", "b:1\n",
                     "ws://:80/ws", "b:" + "1" * 600, ["b:1"]):
            with self.assertRaises(ValueError, msg=repr(addr)) as e:
                check_addr(addr)
            self.assertIn("'addr'", str(e.exception))

    def test_target(self):
        self.assertEqual(check_target("b:1"), "b:1")
        self.assertEqual(check_target("b:1", None), "b:1")
        target = check_target("b:1", {"ws": "ws://b:2/ws"})
        self.assertEqual(target, {"*": "b:1", "ws": "ws://b:2/ws"})
        self.assertEqual(address_for(target, "ws"), "ws://b:2/ws")
        self.assertEqual(address_for(target, "tcp"), "b:1")
        self.assertEqual(address_for("b:1", "ws"), "b:1")

    def test_target_refused(self):
        for addr, addrs, words in (
                (None, None, "'addr'"),
                ("b:1", ["ws://b:2/ws"], "'addrs'"),
                ("b:1", {"ws": "http://b"}, "'addrs.ws'"),
                ("b:1", {"": "b:2"}, "transport name"),
                ("b:1", {"*": "b:2"}, "transport name"),
                ("b:1", {"t" * 40: "b:2"}, "transport name"),
                ("b:1", {f"t{i}": "b:2" for i in range(17)}, "'addrs'")):
            with self.assertRaises(ValueError) as e:
                check_target(addr, addrs)
            self.assertIn(words, str(e.exception))

    def test_deadline(self):
        self.assertEqual(check_deadline(0), 0.0)
        self.assertEqual(check_deadline(2.5), 2.5)
        for bad in (-1, -0.1, True, "5", None, float("inf"), float("nan")):
            with self.assertRaises(ValueError, msg=repr(bad)):
                check_deadline(bad)


class SpreadTests(SynchronousTestCase):
    def test_uniform_over_window(self):
        """
        A thousand sends over ten seconds come about a hundred a second,
        none after the window, with one timer at a time.
        """
        clock = Clock()
        sent = []
        spread = Spread(clock, range(1000), 10.0,
                        lambda n: sent.append((clock.seconds(), n)),
                        random.Random(7).random)
        self.assertEqual((sent, spread.pending), ([], 1000))
        per_second = []
        for _ in range(10):
            self.assertEqual(len(clock.getDelayedCalls()), 1)
            before = len(sent)
            clock.advance(1.0)
            per_second.append(len(sent) - before)
        self.assertEqual(len(sent), 1000)
        self.assertEqual(sorted(n for _, n in sent), list(range(1000)))
        for count in per_second:
            self.assertTrue(60 <= count <= 140, per_second)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.successResultOf(spread.done)

    def test_exact_moments(self):
        clock = Clock()
        clock.advance(100)
        sent = []
        Spread(clock, "abc", 10.0, lambda x: sent.append((x, clock.seconds())),
               Sequence(0.5, 0.1, 0.9))
        clock.advance(1.0)
        self.assertEqual(sent, [("b", 101.0)])
        clock.advance(4.0)
        clock.advance(4.0)
        self.assertEqual(sent, [("b", 101.0), ("a", 105.0), ("c", 109.0)])

    def test_same_moment_sent_together(self):
        clock = Clock()
        sent = []
        Spread(clock, "abc", 0.0, sent.append, random.random)
        self.assertEqual(sent, [])
        clock.advance(0)
        self.assertEqual(sent, ["a", "b", "c"])

    def test_nothing_to_send(self):
        clock = Clock()
        spread = Spread(clock, [], 10.0, None, random.random)
        self.successResultOf(spread.done)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self):
        clock = Clock()
        sent = []
        spread = Spread(clock, "ab", 10.0, sent.append, Sequence(0.1, 0.5))
        clock.advance(2)
        spread.cancel()
        clock.advance(20)
        self.assertEqual((sent, spread.pending), (["a"], 0))
        self.assertEqual(clock.getDelayedCalls(), [])


class SendReconnectTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack(drain__close_after=30.0,
                           session__heartbeat_ttl=600.0)
        self.stack.sessions._metrics = self.metrics = Metrics("g")
        self.session, self.connection, _ = self.stack.login("alice")
        self.connection.take()

    def reconnects(self, reason="drain"):
        return self.metrics.registry.get_sample_value(
            "mmogate_reconnects_total", {"reason": reason}) or 0

    def test_idle_session_told_at_once(self):
        self.assertTrue(self.session.send_reconnect("b:8080", "drain"))
        self.assertEqual(self.connection.take(),
                         [{"t": "reconnect", "addr": "b:8080",
                           "reason": "drain"}])
        self.assertTrue(self.session.moving)
        self.assertFalse(self.connection.closed)
        self.assertEqual(self.reconnects(), 1)
        # Once only.
        self.assertFalse(self.session.send_reconnect("c:1", "drain"))
        self.assertEqual(self.connection.take(), [])
        self.assertEqual(self.reconnects(), 1)

    def test_lane_finished_first(self):
        """
        Requests already in the lane are answered, in order, before
        C{reconnect}; requests sent after are answered C{busy} at once.
        """
        stack, session = self.stack, self.session
        stack.send(session, t="req", id=1, route="r")
        stack.send(session, t="req", id=2, route="r")
        session.send_reconnect("b:8080", "drain")
        self.assertEqual(self.connection.take(), [])
        stack.send(session, t="req", id=3, route="r")
        (busy,) = self.connection.take()
        self.assertEqual((busy["t"], busy["id"], busy["code"]),
                         ("err", 3, "busy"))
        self.assertIn("reconnect", busy["msg"])
        calls = stack.backend.calls
        self.assertEqual(len(calls), 1)
        calls[0].d.callback("one")
        self.assertEqual(self.connection.take(),
                         [{"t": "resp", "id": 1, "data": "one"}])
        self.assertEqual(len(calls), 2)
        calls[1].d.callback("two")
        self.assertEqual(self.connection.take(),
                         [{"t": "resp", "id": 2, "data": "two"},
                          {"t": "reconnect", "addr": "b:8080",
                           "reason": "drain"}])
        self.assertEqual(len(calls), 2)

    def test_pings_and_acks_still_served(self):
        self.session.send_reconnect("b:8080", "drain")
        self.connection.take()
        self.stack.send(self.session, t="ping", ts=3)
        self.assertEqual(self.connection.take(), [{"t": "pong", "ts": 3}])

    def test_output_flushed_first(self):
        """
        While the client does not read (its connection is paused) the
        reconnect waits; it goes once the connection drains.
        """
        self.connection.paused = True
        self.session.send_reconnect("b:8080", "drain")
        self.assertEqual(self.connection.take(), [])
        self.session.writable()
        self.assertEqual(self.connection.take(), [])
        self.connection.paused = False
        self.session.writable()
        self.assertEqual(kinds(self.connection.take()), ["reconnect"])

    def test_replay_written_first(self):
        """
        A resume's mailbox, written as the client reads, goes out before the
        C{reconnect}.
        """
        stack = self.stack
        self.stack.clock.advance(1)
        token = stack.login("bob")[2]["resume_token"]
        stack.players.get("bob").session.lost()
        for n in range(3):
            stack.push(["bob"], "note", n)
        session, connection = stack.connect()
        connection.paused = True
        stack.send(session, t="resume", id=9, player_id="bob",
                   resume_token=token, last_seq=0)
        self.assertEqual(kinds(connection.take()), ["resp"])
        self.assertTrue(session.replaying)
        session.send_reconnect("b:8080", "drain")
        self.assertEqual(connection.take(), [])
        connection.paused = False
        session.writable()
        self.assertEqual(kinds(connection.take()),
                         ["push", "push", "push", "reconnect"])

    def test_pushes_still_delivered(self):
        """
        Until the client goes, pushes reach it; persistent ones also stay
        in the mailbox until acked, for its resume elsewhere.
        """
        self.session.send_reconnect("b:8080", "drain")
        self.connection.take()
        self.stack.push(["alice"], "note", 1)
        self.stack.push(["alice"], "fx", 2, persist=False)
        self.assertEqual([(m["t"], m["data"], m.get("seq"))
                          for m in self.connection.take()],
                         [("push", 1, 1), ("push", 2, None)])
        self.assertEqual(
            self.successResultOf(self.stack.mailboxes.size("alice")), 1)

    def test_closed_after_close_after(self):
        stack = self.stack
        self.session.send_reconnect("b:8080", "drain")
        stack.push(["alice"], "note", 1)
        stack.clock.advance(29.9)
        self.assertFalse(self.connection.closed)
        stack.clock.advance(0.1)
        self.assertTrue(self.connection.closed)
        self.assertEqual(kinds(self.connection.take()), ["reconnect", "push"])
        # Closed quietly: the reconnect said why; no kick.
        self.assertTrue(self.session.closing)
        self.assertEqual(stack.players.online, 0)
        self.assertEqual(stack.events.of("alice")[-1],
                         ("offline", self.session.id))
        # Unacked pushes wait for the resume elsewhere.
        self.assertEqual(self.successResultOf(stack.mailboxes.size("alice")),
                         1)
        self.session.lost()
        self.assertEqual(stack.sessions.sessions, {})

    def test_close_after_counts_from_reconnect(self):
        stack = self.stack
        stack.send(self.session, t="req", id=1, route="r")
        self.session.send_reconnect("b:8080", "drain")
        stack.clock.advance(25)
        stack.backend.calls[0].d.callback("late")
        stack.clock.advance(29.9)
        self.assertFalse(self.connection.closed)
        stack.clock.advance(0.1)
        self.assertTrue(self.connection.closed)

    def test_client_leaves_first(self):
        self.session.send_reconnect("b:8080", "drain")
        self.session.lost()
        self.assertEqual([c for c in self.stack.clock.getDelayedCalls()
                          if c.func == self.session._leave], [])
        self.assertFalse(self.connection.closed)

    def test_not_told_when_closing(self):
        self.session.kick("admin", "bye")
        self.connection.take()
        self.assertFalse(self.session.send_reconnect("b:1", "drain"))
        session, connection = self.stack.connect()
        session.lost()
        self.assertFalse(session.send_reconnect("b:1", "drain"))
        self.assertEqual(connection.take(), [])

    def test_target_per_transport(self):
        target = {"*": "b:8080", "ws": "ws://b:8081/ws"}
        session, connection = self.stack.connect("ws")
        self.assertTrue(session.send_reconnect(target, "admin"))
        self.assertEqual(connection.take()[0]["addr"], "ws://b:8081/ws")
        self.assertTrue(self.session.send_reconnect(target, "admin"))
        self.assertEqual(self.connection.take()[0]["addr"], "b:8080")
        self.assertEqual(self.reconnects("admin"), 2)

    def test_unbound_session_told_too(self):
        session, connection = self.stack.connect()
        self.assertTrue(session.send_reconnect("b:1", "drain"))
        self.assertEqual(kinds(connection.take()), ["reconnect"])


class PlayerReconnectTests(SynchronousTestCase):
    def test_reconnect(self):
        stack = Stack()
        _, connection, _ = stack.login("alice")
        connection.take()
        self.assertIs(stack.players.reconnect("nobody", "b:1", "admin"),
                      False)
        self.assertIs(stack.players.reconnect("alice", "b:1", "admin"), True)
        self.assertEqual(connection.take(),
                         [{"t": "reconnect", "addr": "b:1",
                           "reason": "admin"}])
        self.assertIs(stack.players.reconnect("alice", "b:1", "admin"),
                      False)

    def test_offline(self):
        stack = Stack()
        session, _, _ = stack.login("alice")
        session.lost()
        self.assertIs(stack.players.reconnect("alice", "b:1", "admin"),
                      False)


class DrainerTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack(drain__close_after=5.0)
        self.clock = self.stack.clock
        self.clients = [self.stack.login(name)[:2]
                        for name in ("a", "b", "c")]
        self.anonymous = self.stack.connect()
        for _, connection in self.clients + [self.anonymous]:
            connection.take()

    def drainer(self, *values, jitter=10.0):
        return Drainer(self.clock, self.stack.sessions, jitter,
                       random=Sequence(*values))

    def told(self):
        return [[m for m in c.messages if m["t"] == "reconnect"]
                for _, c in self.clients + [self.anonymous]]

    def test_reconnect_all_spread(self):
        drainer = self.drainer(0.1, 0.5, 0.9, 0.3)
        self.assertEqual(drainer.reconnect_all("b:1", "admin"), 4)
        self.assertTrue(self.stack.sessions.accepting)
        self.clock.advance(1.0)
        self.assertEqual([len(t) for t in self.told()], [1, 0, 0, 0])
        self.clock.advance(2.0)
        self.assertEqual([len(t) for t in self.told()], [1, 0, 0, 1])
        self.clock.advance(6.0)
        self.assertEqual([len(t) for t in self.told()], [1, 1, 1, 1])
        self.assertEqual(self.told()[0][0],
                         {"t": "reconnect", "addr": "b:1", "reason": "admin"})

    def test_reconnect_all_skips_moving(self):
        drainer = self.drainer(0.0, 0.0, 0.0)
        self.clients[0][0].send_reconnect("x:1", "admin")
        self.assertEqual(drainer.reconnect_all("b:1", "admin"), 3)
        self.clock.advance(0)
        self.assertEqual([t[0]["addr"] for t in self.told()],
                         ["x:1", "b:1", "b:1", "b:1"])

    def test_session_gone_before_its_turn(self):
        drainer = self.drainer(0.5, 0.1, 0.1, 0.1)
        drainer.reconnect_all("b:1", "admin")
        self.clients[0][0].lost()
        self.clock.advance(10)
        self.assertEqual(self.told()[0], [])

    def drain(self, deadline=60.0, jitter=10.0):
        drainer = self.drainer(0.1, 0.2, 0.3, 0.4, jitter=jitter)
        results = []
        drainer.drain("b:1", deadline).addCallback(results.append)
        return drainer, results

    def test_drain_ends_when_empty(self):
        drainer, results = self.drain()
        self.assertTrue(drainer.draining)
        self.assertFalse(self.stack.sessions.accepting)
        self.clock.advance(4.0)
        self.assertTrue(all(self.told()))
        self.assertNotEqual(drain_calls(self.clock), [])
        for session, _ in self.clients + [self.anonymous]:
            self.assertEqual(results, [])
            session.lost()
        self.assertEqual(results, ["empty"])
        self.assertEqual(drain_calls(self.clock), [])

    def test_drain_sessions_closed_after_close_after(self):
        drainer, results = self.drain(deadline=60.0)
        self.clock.advance(4.0)
        self.clock.advance(5.0)
        # The fake connections do not report the close: play the transport.
        for session, connection in self.clients + [self.anonymous]:
            self.assertTrue(connection.closed)
            session.lost()
        self.assertEqual(results, ["empty"])

    def test_drain_deadline(self):
        drainer, results = self.drain(deadline=60.0)
        self.clock.advance(59.9)
        self.assertEqual(results, [])
        self.clock.advance(0.1)
        self.assertEqual(results, ["deadline"])
        self.assertTrue(drainer.draining)

    def test_window_within_deadline(self):
        """
        Every session is told before the deadline, however long
        C{drain.jitter} is.
        """
        drainer = self.drainer(0.99, 0.99, 0.99, 0.99, jitter=100.0)
        results = []
        drainer.drain("b:1", 2.0).addCallback(results.append)
        self.clock.advance(1.97)
        self.assertEqual([len(t) for t in self.told()], [0, 0, 0, 0])
        self.clock.advance(0.02)
        self.assertEqual([len(t) for t in self.told()], [1, 1, 1, 1])
        self.clock.advance(0.01)
        self.assertEqual(results, ["deadline"])

    def test_drain_empty_gate(self):
        for session, _ in self.clients + [self.anonymous]:
            session.lost()
        drainer, results = self.drain()
        self.assertEqual(results, ["empty"])
        self.assertEqual(drain_calls(self.clock), [])

    def test_drain_once(self):
        drainer, _ = self.drain()
        self.assertRaises(RuntimeError, drainer.drain, "b:1", 5.0)

    def test_stop(self):
        drainer, results = self.drain()
        self.clock.advance(1.5)
        drainer.stop()
        self.clock.advance(100)
        self.assertEqual(results, [])
        self.assertEqual([len(t) for t in self.told()], [1, 0, 0, 0])
        self.assertEqual(drain_calls(self.clock), [])


class FakeGate:
    """
    What the API uses of a L{gate.service.GateService} for these calls.
    """

    def __init__(self, stack):
        self.players = stack.players
        self.sessions = stack.sessions
        self.drainer = Drainer(stack.clock, stack.sessions, 0.0)
        self.drains = []
        self.running = True

    def drain(self, target, deadline=None):
        if not self.running:
            raise NotRunning("the gate is stopping")
        self.drains.append((target, deadline))
        return True


class APITests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack()
        self.gate = FakeGate(self.stack)
        self.site = APISite(APIResource(self.gate, API_KEY), 10000)

    def post(self, path, body):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        status, _, content = http_request(
            self.site, "POST", path, body,
            {"Authorization": "Bearer " + API_KEY}, clock=self.stack.clock)
        return status, json.loads(content)

    def assertBadRequest(self, path, body, words):
        status, answer = self.post(path, body)
        self.assertEqual((status, answer["error"]["code"]),
                         (400, "bad_request"), (body, answer))
        self.assertIn(words, answer["error"]["msg"])

    def test_reconnect_player(self):
        _, connection, _ = self.stack.login("alice")
        connection.take()
        self.assertEqual(self.post("/v1/reconnect",
                                   {"player_id": "alice", "addr": "b:1"}),
                         (200, {"sent": 1}))
        self.assertEqual(connection.take(),
                         [{"t": "reconnect", "addr": "b:1",
                           "reason": "admin"}])
        self.assertEqual(self.post("/v1/reconnect",
                                   {"player_id": "nobody", "addr": "b:1"}),
                         (200, {"sent": 0}))

    def test_reconnect_all(self):
        connections = [self.stack.login(n)[1] for n in ("a", "b")]
        self.stack.connect()
        self.assertEqual(self.post("/v1/reconnect",
                                   {"all": True, "addr": "b:1",
                                    "addrs": {"ws": "ws://b:2/ws"}}),
                         (200, {"sent": 3}))
        self.stack.clock.advance(0)
        for connection in connections:
            self.assertEqual(connection.messages[-1]["t"], "reconnect")

    def test_reconnect_bad_bodies(self):
        for body, words in (
                ([], "JSON object"),
                ({"player_id": "a"}, "'addr'"),
                ({"player_id": "a", "addr": 5}, "'addr'"),
                ({"player_id": "a", "addr": "http://b/"}, "'addr'"),
                ({"player_id": "a", "addr": "b:1", "addrs": 1}, "'addrs'"),
                ({"addr": "b:1"}, "'player_id'"),
                ({"addr": "b:1", "all": False}, "'player_id'"),
                ({"addr": "b:1", "all": True, "player_id": "a"}, "either"),
                ({"addr": "b:1", "all": "yes"}, "'all'"),
                ({"addr": "b:1", "player_id": ""}, "'player_id'"),
                ({"addr": "b:1", "player_id": 7}, "'player_id'")):
            self.assertBadRequest("/v1/reconnect", body, words)

    def test_drain(self):
        self.assertEqual(self.post("/v1/drain", {"addr": "b:1"}),
                         (200, {"draining": True}))
        self.assertEqual(self.post("/v1/drain", {"addr": "b:1",
                                                 "deadline": 5}),
                         (200, {"draining": True}))
        self.assertEqual(self.post("/v1/drain", {
            "addr": "b:1", "addrs": {"ws": "wss://b/ws"}, "deadline": 0.5}),
            (200, {"draining": True}))
        self.assertEqual(self.gate.drains,
                         [("b:1", None), ("b:1", 5.0),
                          ({"*": "b:1", "ws": "wss://b/ws"}, 0.5)])

    def test_drain_bad_bodies(self):
        for body, words in (
                ([], "JSON object"),
                ({}, "'addr'"),
                ({"addr": ""}, "'addr'"),
                ({"addr": "b:1", "deadline": -1}, "'deadline'"),
                ({"addr": "b:1", "deadline": "5"}, "'deadline'"),
                ({"addr": "b:1", "deadline": True}, "'deadline'"),
                (b'{"addr": "b:1", "deadline": 1e999}', "out of range")):
            self.assertBadRequest("/v1/drain", body, words)
        self.assertEqual(self.gate.drains, [])

    def test_drain_while_stopping(self):
        self.gate.running = False
        status, answer = self.post("/v1/drain", {"addr": "b:1"})
        self.assertEqual((status, answer["error"]["code"]),
                         (503, "unavailable"))
