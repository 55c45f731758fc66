"""
Tests for L{gate.events.EventSender}: lifecycle events delivered at least
once, with exponential backoff and a bounded backlog (PROTOCOL.md
section 4).
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gate.events import EventSender
from gate.metrics import Metrics

from tests.fakes import FakeBackend, advance_in_steps


class Unreachable(Exception):
    pass


class EventSenderTests(SynchronousTestCase):
    def sender(self, max_backlog=100, retry_max=8.0, jitter=1.0, metrics=None):
        self.clock = Clock()
        self.clock.advance(1000)
        self.backend = FakeBackend()
        return EventSender(self.clock, self.backend, "g1", max_backlog,
                           retry_max, metrics=metrics, random=lambda: jitter)

    def delivered(self):
        """
        Bodies of the event calls that succeeded.
        """
        return [p.args[0] for p in self.backend.events if p.outcome == "ok"]

    def attempts(self):
        return [(p.args[0]["event"], p.args[0]["player_id"])
                for p in self.backend.events]

    def test_body(self):
        sender = self.sender()
        sender.emit("online", "alice", "s1")
        self.assertEqual(self.backend.events[0].args[0],
                         {"event": "online", "player_id": "alice",
                          "gate_id": "g1", "session_id": "s1", "ts": 1000.0})
        sender.emit("expired", "alice", None)
        self.assertIsNone(self.backend.events[1].args[0]["session_id"])
        self.assertEqual(sender.pending, 0)

    def test_retry_with_exponential_backoff(self):
        """
        A failed event is sent again after 0.5, 1, 2, 4 ... seconds, capped
        at C{retry_max}, until it gets through; the delay starts over after a
        success.
        """
        sender = self.sender(retry_max=3.0)
        self.backend.event_outcomes = [Unreachable()] * 5 + [None]
        sender.emit("offline", "alice", "s1")
        self.assertEqual(len(self.backend.events), 1)
        self.assertEqual(sender.pending, 1)
        for delay in (0.5, 1.0, 2.0, 3.0, 3.0):
            attempts = len(self.backend.events)
            self.clock.advance(delay - 0.001)
            self.assertEqual(len(self.backend.events), attempts, delay)
            self.clock.advance(0.001)
            self.assertEqual(len(self.backend.events), attempts + 1, delay)
        self.assertEqual(sender.pending, 0)
        self.assertEqual(self.attempts(), [("offline", "alice")] * 6)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Backoff starts over.
        self.backend.event_outcomes = [Unreachable()]
        sender.emit("online", "alice", "s2")
        self.clock.advance(0.5)
        self.assertEqual(sender.pending, 0)

    def test_jitter(self):
        """
        The delay is between half and all of the backoff step.
        """
        sender = self.sender(jitter=0.0)
        self.backend.event_outcomes = [Unreachable(), Unreachable()]
        sender.emit("offline", "alice", "s1")
        self.clock.advance(0.25)
        self.assertEqual(len(self.backend.events), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(self.backend.events), 3)
        self.assertEqual(sender.pending, 0)

    def test_same_body_resent(self):
        sender = self.sender()
        self.backend.event_outcomes = [Unreachable()]
        sender.emit("offline", "alice", "s1")
        self.clock.advance(10)
        first, second = (p.args[0] for p in self.backend.events)
        self.assertEqual(first, second)

    def test_no_sending_while_backing_off(self):
        """
        Events emitted while a retry is pending wait for it, then all go,
        the failed one first.
        """
        sender = self.sender()
        self.backend.event_outcomes = [Unreachable()]
        sender.emit("online", "a", "s1")
        sender.emit("online", "b", "s2")
        sender.emit("online", "c", "s3")
        self.assertEqual(len(self.backend.events), 1)
        self.assertEqual(sender.pending, 3)
        self.clock.advance(0.5)
        self.assertEqual(self.attempts(), [("online", "a"), ("online", "a"),
                                           ("online", "b"), ("online", "c")])
        self.assertEqual(sender.pending, 0)

    def test_every_event_delivered_at_least_once(self):
        sender = self.sender()
        self.backend.event_outcomes = [Unreachable(), None, Unreachable(),
                                       Unreachable(), None, None]
        for i in range(4):
            sender.emit("offline", f"p{i}", f"s{i}")
            self.clock.advance(0.1)
        advance_in_steps(self.clock, 100)
        delivered = {body["player_id"] for body in self.delivered()}
        self.assertEqual(delivered, {"p0", "p1", "p2", "p3"})
        self.assertEqual(sender.pending, 0)

    def test_bounded_backlog_drops_oldest(self):
        metrics = Metrics("g1")
        sender = self.sender(max_backlog=2, metrics=metrics)
        self.backend.event_outcomes = [Unreachable()]
        sender.emit("offline", "p0", "s0")   # fails, back in the queue
        sender.emit("offline", "p1", "s1")
        sender.emit("offline", "p2", "s2")   # p0 dropped
        sender.emit("offline", "p3", "s3")   # p1 dropped
        self.assertEqual(sender.dropped, 2)
        self.assertEqual(sender.pending, 2)
        self.clock.advance(0.5)
        self.assertEqual([b["player_id"] for b in self.delivered()],
                         ["p2", "p3"])
        self.assertEqual(metrics.registry.get_sample_value(
            "mmogate_lifecycle_events_total", {"outcome": "dropped"}), 2)
        self.assertEqual(metrics.registry.get_sample_value(
            "mmogate_lifecycle_events_total", {"outcome": "sent"}), 2)
        self.assertEqual(metrics.registry.get_sample_value(
            "mmogate_lifecycle_events_total", {"outcome": "retried"}), 1)

    def test_concurrency_limit(self):
        sender = self.sender()
        self.backend.event_outcomes = ["pending"] * 20
        for i in range(20):
            sender.emit("online", f"p{i}", "s")
        self.assertEqual(len(self.backend.events), sender.concurrency)
        self.assertEqual(sender.pending, 20)
        self.backend.events[0].d.callback(None)
        self.assertEqual(len(self.backend.events), sender.concurrency + 1)

    def test_flush_idle(self):
        self.successResultOf(self.sender().flush())

    def test_flush_waits_for_in_flight(self):
        sender = self.sender()
        self.backend.event_outcomes = ["pending"]
        sender.emit("online", "a", "s")
        d = sender.flush()
        self.assertNoResult(d)
        self.backend.events[0].d.callback(None)
        self.successResultOf(d)

    def test_flush_brings_retry_forward(self):
        """
        A pending retry is sent at once by C{flush}, which fires when every
        event got through.
        """
        sender = self.sender(retry_max=60)
        self.backend.event_outcomes = [Unreachable()] * 4
        sender.emit("offline", "a", "s")
        for delay in (0.5, 1, 2):
            self.clock.advance(delay)
        self.assertEqual(len(self.backend.events), 4)
        d = sender.flush()
        self.assertEqual(len(self.backend.events), 5)
        self.successResultOf(d)
        self.assertEqual(sender.pending, 0)

    def test_flush_brings_retry_forward_async(self):
        sender = self.sender(retry_max=60)
        self.backend.event_outcomes = [Unreachable(), "pending"]
        sender.emit("offline", "a", "s")
        d = sender.flush()
        self.assertEqual(len(self.backend.events), 2)
        self.assertNoResult(d)
        self.backend.events[1].d.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_then_failure_retries(self):
        sender = self.sender()
        self.backend.event_outcomes = [Unreachable(), Unreachable()]
        sender.emit("offline", "a", "s")
        d = sender.flush()
        self.assertEqual(len(self.backend.events), 2)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.successResultOf(d)

    def test_stop_cancels_retry(self):
        sender = self.sender()
        self.backend.event_outcomes = [Unreachable()]
        sender.emit("offline", "a", "s")
        sender.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(sender.pending, 1)


class OrderAndRejectionTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.backend = FakeBackend()
        self.sender = EventSender(self.clock, self.backend, "g1", 100, 8.0,
                                  random=lambda: 1.0)

    def attempts(self):
        return [(p.args[0]["event"], p.args[0]["player_id"])
                for p in self.backend.events]

    def test_one_event_in_flight_per_player(self):
        """
        A player's events go one at a time, in order; other players' events
        pass them meanwhile.
        """
        self.backend.event_outcomes = ["pending"] * 4
        self.sender.emit("online", "alice", "s1")
        self.sender.emit("offline", "alice", "s1")
        self.sender.emit("online", "bob", "s2")
        self.sender.emit("online", "alice", "s3")
        self.assertEqual(self.attempts(),
                         [("online", "alice"), ("online", "bob")])
        self.backend.events[0].d.callback(None)
        self.assertEqual(self.attempts()[2:], [("offline", "alice")])
        self.backend.events[2].d.callback(None)
        self.assertEqual(self.attempts()[3:], [("online", "alice")])

    def test_failed_event_keeps_its_place(self):
        """
        An event that failed is retried before the later events of its
        player.
        """
        self.backend.event_outcomes = [Unreachable()]
        self.sender.emit("online", "alice", "s1")
        self.sender.emit("offline", "alice", "s1")
        self.clock.advance(0.5)
        self.assertEqual(self.attempts(), [("online", "alice"),
                                           ("online", "alice"),
                                           ("offline", "alice")])
        self.assertEqual(self.sender.pending, 0)

    def test_rejected_event_dropped(self):
        """
        An event the backend refuses for good (400) is dropped and logged,
        and does not hold up the events behind it; a 503 or 429 is retried.
        """
        from gate.backend import BackendStatusError
        metrics = Metrics("g1")
        sender = EventSender(self.clock, self.backend, "g1", 100, 8.0,
                             metrics=metrics, random=lambda: 1.0)
        self.backend.event_outcomes = [BackendStatusError(400), None,
                                       BackendStatusError(503),
                                       BackendStatusError(429)]
        sender.emit("online", "alice", "s1")
        sender.emit("offline", "alice", "s1")
        self.assertEqual(self.attempts(), [("online", "alice"),
                                           ("offline", "alice")])
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.assertEqual(metrics.registry.get_sample_value(
            "mmogate_lifecycle_events_total", {"outcome": "rejected"}), 1)
        sender.emit("online", "bob", "s2")
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.assertEqual(self.attempts()[2:], [("online", "bob")] * 3)
        self.assertEqual(sender.pending, 0)
