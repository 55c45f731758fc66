"""
Tests for L{gate.balancer}: the circuit breaker and the balancing policies
on a L{Clock}, and L{BackendSet} over scripted backends (retries, backoff,
deadline, health probes, metrics) without a network. Over real sockets:
L{tests.test_e2e_backends}.
"""

import json

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from backend.reference import ReferenceBackend
from gate import errors
from gate.backend import (BackendCallError, BackendStatusError,
                          HeadCappedPool, HTTPBackend)
from gate.balancer import (CLOSED, HALF_OPEN, OPEN, BackendSet,
                           CircuitBreaker, LeastOutstanding, Member,
                           PlayerHash, RegistrationFailed, RoundRobin,
                           Weighted, labels_for, make_policy)
from gate.errors import GateError
from gate.interfaces import IBackendClient
from gate.metrics import Metrics
from gate.service import GateService

from tests.fakes import make_config


class BreakerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.changes = []
        self.breaker = CircuitBreaker(self.clock, 3, 10.0,
                                      lambda old, new:
                                      self.changes.append((old, new)))

    def open(self):
        for _ in range(3):
            ticket = self.breaker.acquire()
            self.assertIsNotNone(ticket)
            self.breaker.failed(ticket)
        self.assertEqual(self.breaker.state, OPEN)

    def test_opens_after_consecutive_failures(self):
        b = self.breaker
        b.failed(b.acquire())
        b.failed(b.acquire())
        self.assertEqual(b.state, CLOSED)
        b.succeeded(b.acquire())  # the count restarts
        b.failed(b.acquire())
        b.failed(b.acquire())
        self.assertEqual(b.state, CLOSED)
        self.assertTrue(b.available())
        b.failed(b.acquire())
        self.assertEqual(b.state, OPEN)
        self.assertFalse(b.available())
        self.assertIsNone(b.acquire())
        self.assertEqual(self.changes, [(CLOSED, OPEN)])

    def test_half_open_after_reset_lets_one_trial(self):
        self.open()
        self.clock.advance(9.99)
        self.assertEqual(self.breaker.state, OPEN)
        self.assertIsNone(self.breaker.acquire())
        self.clock.advance(0.01)
        self.assertEqual(self.breaker.state, HALF_OPEN)
        self.assertTrue(self.breaker.available())
        trial = self.breaker.acquire()
        self.assertIsNotNone(trial)
        # One trial at a time.
        self.assertFalse(self.breaker.available())
        self.assertIsNone(self.breaker.acquire())
        self.breaker.succeeded(trial)
        self.assertEqual(self.breaker.state, CLOSED)
        self.assertIsNotNone(self.breaker.acquire())
        self.assertEqual(self.changes, [(CLOSED, OPEN), (OPEN, HALF_OPEN),
                                        (HALF_OPEN, CLOSED)])

    def test_failed_trial_opens_again(self):
        self.open()
        self.clock.advance(10)
        trial = self.breaker.acquire()
        self.clock.advance(2)
        self.breaker.failed(trial)
        self.assertEqual(self.breaker.state, OPEN)
        # A full reset period from the failed trial.
        self.clock.advance(9.99)
        self.assertEqual(self.breaker.state, OPEN)
        self.clock.advance(0.01)
        self.assertEqual(self.breaker.state, HALF_OPEN)

    def test_released_trial_frees_the_slot(self):
        self.open()
        self.clock.advance(10)
        self.breaker.released(self.breaker.acquire())
        self.assertEqual(self.breaker.state, HALF_OPEN)
        self.assertIsNotNone(self.breaker.acquire())

    def test_late_failure_while_open_keeps_the_period(self):
        b = self.breaker
        late = b.acquire()
        self.open()
        self.clock.advance(5)
        b.failed(late)
        self.clock.advance(5)
        self.assertEqual(b.state, HALF_OPEN)

    def test_late_results_cannot_free_the_trial(self):
        """
        Calls A and B are sent while closed; the breaker opens, goes
        half-open and trial C is sent. A's late failure and B's late release
        must not free the trial slot while C is in flight: no trial D.
        """
        b = self.breaker
        late_a, late_b = b.acquire(), b.acquire()
        self.open()
        self.clock.advance(10)
        trial_c = b.acquire()
        self.assertIsNotNone(trial_c)
        b.failed(late_a)
        self.assertEqual(b.state, HALF_OPEN)
        self.assertIsNone(b.acquire())
        b.released(late_b)
        self.assertFalse(b.available())
        self.assertIsNone(b.acquire())
        # A late success says nothing either: C decides.
        b.succeeded(late_b)
        self.assertEqual(b.state, HALF_OPEN)
        b.failed(trial_c)
        self.assertEqual(b.state, OPEN)
        self.clock.advance(10)
        trial_d = b.acquire()
        self.assertIsNotNone(trial_d)
        b.succeeded(trial_d)
        self.assertEqual(b.state, CLOSED)

    def test_stale_tickets_ignored_after_reclosing(self):
        """
        A ticket from before the last opening does not count once the
        breaker has closed again either.
        """
        b = self.breaker
        stale = [b.acquire() for _ in range(3)]
        self.open()
        self.clock.advance(10)
        b.succeeded(b.acquire())
        self.assertEqual(b.state, CLOSED)
        for ticket in stale:
            b.failed(ticket)
        self.assertEqual(b.state, CLOSED)
        b.failed(b.acquire())
        b.failed(b.acquire())
        self.assertEqual(b.state, CLOSED)
        b.failed(b.acquire())
        self.assertEqual(b.state, OPEN)


def members(clock, *weights, urls=None):
    urls = urls or [f"http://b{i}.test" for i in range(len(weights))]
    return [Member(i, url, None, w, CircuitBreaker(clock, 1, 1.0), url)
            for i, (url, w) in enumerate(zip(urls, weights))]


class PolicyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def picks(self, policy, candidates, n, key=None):
        return [policy.pick(candidates, key).index for _ in range(n)]

    def test_round_robin(self):
        ms = members(self.clock, 1, 1, 1)
        policy = RoundRobin()
        self.assertEqual(self.picks(policy, ms, 7), [0, 1, 2, 0, 1, 2, 0])
        # Member 1 out: the turn goes on among the others.
        self.assertEqual(self.picks(policy, [ms[0], ms[2]], 4), [2, 0, 2, 0])
        self.assertEqual(self.picks(policy, ms, 3), [1, 2, 0])

    def test_weighted_smooth_cycle(self):
        """
        Weights 5, 1, 1 give nginx's smooth sequence a a b a c a a, and
        exactly the weights' counts in every cycle.
        """
        ms = members(self.clock, 5, 1, 1)
        policy = Weighted(3)
        cycle = self.picks(policy, ms, 7)
        self.assertEqual(cycle, [0, 0, 1, 0, 2, 0, 0])
        for _ in range(10):
            again = self.picks(policy, ms, 7)
            self.assertEqual(again, cycle)

    def test_weighted_exact_counts(self):
        ms = members(self.clock, 3, 2, 0, 4)
        policy = Weighted(4)
        picks = self.picks(policy, ms, 9 * 5)
        self.assertEqual([picks.count(i) for i in range(4)], [15, 10, 0, 20])
        # Never three in a row of one member with these weights: smooth.
        self.assertFalse(any(picks[i] == picks[i + 1] == picks[i + 2]
                             for i in range(len(picks) - 2)))

    def test_weighted_zero_is_standby(self):
        ms = members(self.clock, 2, 0)
        policy = Weighted(2)
        self.assertEqual(self.picks(policy, ms, 4), [0, 0, 0, 0])
        self.assertEqual(self.picks(policy, [ms[1]], 2), [1, 1])

    def test_least_outstanding(self):
        ms = members(self.clock, 1, 1, 1)
        for m, n in zip(ms, (3, 1, 2)):
            m.outstanding = n
        policy = LeastOutstanding()
        self.assertEqual(self.picks(policy, ms, 5), [1] * 5)
        ms[1].outstanding = 5
        self.assertEqual(self.picks(policy, ms, 2), [2, 2])

    def test_least_outstanding_ties_rotate(self):
        ms = members(self.clock, 1, 1, 1)
        policy = LeastOutstanding()
        self.assertEqual(sorted(self.picks(policy, ms, 3)), [0, 1, 2])

    def test_player_hash_sticky_and_spread(self):
        ms = members(self.clock, 1, 1, 1)
        policy = PlayerHash()
        keys = [f"player-{i}" for i in range(3000)]
        placed = {k: policy.pick(ms, k).index for k in keys}
        for k in keys[:100]:
            self.assertEqual(policy.pick(ms, k).index, placed[k])
        counts = [list(placed.values()).count(i) for i in range(3)]
        for n in counts:
            self.assertTrue(800 < n < 1200, counts)

    def test_player_hash_minimal_movement(self):
        """
        Taking a member out moves only its players, each to some other
        member; bringing it back returns exactly them.
        """
        ms = members(self.clock, 1, 1, 1, 1)
        policy = PlayerHash()
        keys = [f"p{i}" for i in range(2000)]
        before = {k: policy.pick(ms, k).index for k in keys}
        without = [m for m in ms if m.index != 2]
        after = {k: policy.pick(without, k).index for k in keys}
        for k in keys:
            if before[k] == 2:
                self.assertNotEqual(after[k], 2)
            else:
                self.assertEqual(after[k], before[k])
        self.assertEqual({k: policy.pick(ms, k).index for k in keys}, before)

    def test_player_hash_follows_urls_not_order(self):
        urls = [f"http://b{i}.test:8000" for i in range(3)]
        a = members(self.clock, 1, 1, 1, urls=urls)
        b = members(self.clock, 1, 1, 1, urls=list(reversed(urls)))
        policy = PlayerHash()
        for i in range(200):
            key = f"k{i}"
            self.assertEqual(policy.pick(a, key).url, policy.pick(b, key).url)

    def test_player_hash_without_key_goes_round(self):
        ms = members(self.clock, 1, 1)
        self.assertEqual(self.picks(PlayerHash(), ms, 4), [0, 1, 0, 1])

    def test_make_policy(self):
        for name, kind in (("round_robin", RoundRobin), ("weighted", Weighted),
                           ("least_outstanding", LeastOutstanding),
                           ("player_hash", PlayerHash)):
            self.assertIsInstance(make_policy(name, 2), kind)
        self.assertRaises(ValueError, make_policy, "random", 2)

    def test_labels(self):
        self.assertEqual(labels_for(["http://a:80", "https://b/game/",
                                     "http://a:80", "http://u:pw@c:81",
                                     "http://[::1]:82"]),
                         ["a:80", "b/game", "a:80#2", "c:81", "[::1]:82"])


@implementer(IBackendClient)
class ScriptedBackend:
    """
    An L{IBackendClient} whose every call waits for the test to answer
    (C{sent[i][2]}), or answers with C{auto(kind, args)} when set.
    """

    def __init__(self, url, timeout=10.0):
        self.url = url
        self.timeout = timeout
        self.sent = []
        self.auto = None
        self.closed = False

    def _record(self, kind, *args):
        if self.auto is not None:
            self.sent.append((kind, args, None))
            return self.auto(kind, args)
        d = Deferred()
        self.sent.append((kind, args, d))
        return d

    def login(self, session_id, data):
        return self._record("login", session_id, data)

    def call(self, session_id, player_id, request_id, route, data):
        if route == "bad route":
            raise GateError(errors.BAD_REQUEST, "invalid route")
        return self._record("call", session_id, player_id, request_id,
                            route, data)

    def event(self, body):
        return self._record("event", body)

    def register(self, body):
        return self._record("register", body)

    def close(self):
        self.closed = True
        return succeed(None)

    def kinds(self):
        return [kind for kind, _, _ in self.sent]


def unavailable():
    return BackendCallError(errors.BACKEND_UNAVAILABLE, "cannot be reached",
                            transport_failure=True)


def http_error(status, code=errors.BACKEND_ERROR):
    """
    What L{HTTPBackend} raises for an answer of C{status} mapped to C{code}.
    """
    return BackendCallError(code, f"HTTP {status}", status=status)


class FakeResponse:
    def __init__(self, code):
        self.code = code
        self.bodies = []

    def deliverBody(self, protocol):
        self.bodies.append(protocol)


class FakeHTTP:
    """
    A treq-like C{get} for health probes: each waits for the test.
    """

    def __init__(self):
        self.gets = []

    def get(self, url, headers=None, allow_redirects=True):
        assert allow_redirects is False
        d = Deferred()
        self.gets.append((url, headers, d))
        return d

    def pending(self):
        return [(url, d) for url, _, d in self.gets if not d.called]


class BackendSetTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics("g")
        self.rolls = []

    def make(self, n=2, random=0.5, **kw):
        self.backends = [ScriptedBackend(f"http://b{i}.test")
                         for i in range(n)]
        kw.setdefault("timeout", 10.0)
        kw.setdefault("breaker_failures", 100)

        def roll():
            value = random() if callable(random) else random
            self.rolls.append(value)
            return value

        self.set = BackendSet(self.clock, self.backends, metrics=self.metrics,
                              random=roll, gate_id="g", **kw)
        return self.set

    def call(self, route="echo", player="alice", data=None):
        return self.set.call("s1", player, 1, route, data)

    def sample(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_interface(self):
        self.assertTrue(verifyObject(IBackendClient, self.make()))

    def test_needs_a_backend(self):
        self.assertRaises(ValueError, BackendSet, self.clock, [])

    def test_round_robin_and_results(self):
        self.make(3)
        results = [self.call(data=i) for i in range(6)]
        self.assertEqual([len(b.sent) for b in self.backends], [2, 2, 2])
        for b in self.backends:
            for kind, args, d in b.sent:
                self.assertEqual(kind, "call")
                self.assertEqual(args[:4], ("s1", "alice", 1, "echo"))
                d.callback({"echo": args[4]})
        self.assertEqual([self.successResultOf(d) for d in results],
                         [{"echo": i} for i in range(6)])
        self.assertEqual([m.outstanding for m in self.set.members], [0, 0, 0])
        self.assertEqual(self.sample("mmogate_backend_requests_total",
                                     backend="b1.test", outcome="ok"), 2.0)

    def test_errors_pass_through(self):
        self.make(1)
        d = self.call()
        self.backends[0].sent[0][2].errback(GateError("no_gold", "poor"))
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "no_gold")
        self.assertEqual(self.sample("mmogate_backend_requests_total",
                                     backend="b0.test",
                                     outcome="backend_code"), 1.0)

    def test_no_usable_backend_fails_at_once(self):
        self.make(2)
        for m in self.set.members:
            m.healthy = False
        for d in (self.call(), self.set.login("s1", {}),
                  self.set.event({"player_id": "p"})):
            error = self.failureResultOf(d, GateError).value
            self.assertEqual(error.code, errors.BACKEND_UNAVAILABLE)
        self.assertEqual([b.sent for b in self.backends], [[], []])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.set.reachable)

    def test_reachable(self):
        self.make(2, breaker_failures=1)
        self.assertTrue(self.set.reachable)
        self.set.members[0].healthy = False
        self.assertTrue(self.set.reachable)
        breaker = self.set.members[1].breaker
        breaker.failed(breaker.acquire())
        self.assertFalse(self.set.reachable)
        self.set.members[0].healthy = True
        self.assertTrue(self.set.reachable)

    def test_breaker_takes_a_backend_out_and_back(self):
        self.make(2, breaker_failures=2, breaker_reset=5.0)
        b0, b1 = self.backends
        b0.auto = lambda kind, args: fail(unavailable())
        b1.auto = lambda kind, args: succeed("ok")
        outcomes = [self.call() for _ in range(4)]
        self.assertEqual([self.failureResultOf(d, GateError).value.code
                          for d in outcomes[::2]],
                         [errors.BACKEND_UNAVAILABLE] * 2)
        self.assertEqual(len(b0.sent), 2)
        self.assertEqual(self.set.members[0].breaker.state, OPEN)
        self.assertEqual(self.sample("mmogate_backend_breaker",
                                     backend="b0.test"), 2.0)
        for _ in range(4):
            self.successResultOf(self.call())
        self.assertEqual((len(b0.sent), len(b1.sent)), (2, 6))
        # After the reset one trial goes to b0; it works again.
        self.clock.advance(5.0)
        self.assertEqual(self.sample("mmogate_backend_breaker",
                                     backend="b0.test"), 1.0)
        b0.auto = lambda kind, args: succeed("back")
        answers = [self.successResultOf(self.call()) for _ in range(4)]
        self.assertIn("back", answers)
        self.assertEqual(self.set.members[0].breaker.state, CLOSED)
        self.assertEqual(answers.count("back"), 2)

    def test_breaker_counts_backend_faults_only(self):
        self.make(1, breaker_failures=2)
        b0 = self.backends[0]
        b0.auto = lambda kind, args: fail(GateError("no_gold", "poor"))
        for _ in range(5):
            self.failureResultOf(self.call())
        self.assertEqual(self.set.members[0].breaker.state, CLOSED)
        b0.auto = lambda kind, args: fail(http_error(500))
        for _ in range(2):
            self.failureResultOf(self.call())
        self.assertEqual(self.set.members[0].breaker.state, OPEN)

    def test_4xx_answers_are_never_faults(self):
        """
        However a 4xx answer maps for the client (an unknown path's HTML 404
        is backend_error; a backend may answer its own code backend_error),
        it is the backend working: no breaker counts it, no retry follows.
        """
        self.make(2, breaker_failures=1, idempotent_routes=["get"])
        answers = [(http_error(404), errors.BACKEND_ERROR),
                   (http_error(409, "backend_error"), errors.BACKEND_ERROR),
                   (http_error(401, errors.AUTH_FAILED), errors.AUTH_FAILED),
                   (http_error(429, "slow_down"), "slow_down"),
                   (BackendStatusError(404), None)]
        for error, code in answers:
            for b in self.backends:
                b.auto = lambda kind, args, error=error: fail(error)
            if code is None:
                self.failureResultOf(self.set.event({"player_id": "p"}),
                                     BackendStatusError)
                continue
            for _ in range(3):
                d = self.call("get")
                self.clock.advance(1)
                self.assertEqual(
                    self.failureResultOf(d, GateError).value.code, code)
        self.assertEqual([m.breaker.state for m in self.set.members],
                         [CLOSED, CLOSED])
        self.assertEqual(sum(len(b.sent) for b in self.backends), 13)
        self.assertEqual(self.sample("mmogate_backend_retries_total"), 0.0)
        self.assertEqual(sum(self.sample("mmogate_backend_requests_total",
                                         backend=f"b{i}.test",
                                         outcome="backend_code")
                             for i in range(2)), 13)
        self.assertTrue(self.set.reachable)

    def test_unusable_200_is_a_fault(self):
        """
        A 200 the gate cannot use (not JSON) is a fault: counted and retried.
        """
        self.make(2, breaker_failures=1, idempotent_routes=["get"],
                  random=0.0)
        b0, b1 = self.backends
        b0.auto = lambda kind, args: fail(http_error(200))
        b1.auto = lambda kind, args: succeed("fine")
        d = self.call("get")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), "fine")
        self.assertEqual(self.set.members[0].breaker.state, OPEN)
        self.assertEqual(self.sample("mmogate_backend_requests_total",
                                     backend="b0.test",
                                     outcome=errors.BACKEND_ERROR), 1.0)

    def test_late_result_does_not_allow_a_second_trial(self):
        """
        A call sent before the breaker opened ends while trial C is in
        flight: no trial D goes to the backend meanwhile.
        """
        self.make(1, breaker_failures=1, breaker_reset=5.0)
        (b0,) = self.backends
        late = self.call()
        opener = self.call()
        b0.sent[1][2].errback(unavailable())
        self.failureResultOf(opener, GateError)
        self.assertEqual(self.set.members[0].breaker.state, OPEN)
        self.clock.advance(5.0)
        trial_c = self.call()
        self.assertEqual(len(b0.sent), 3)
        b0.sent[0][2].errback(unavailable())
        self.failureResultOf(late, GateError)
        trial_d = self.call()
        self.assertEqual(
            self.failureResultOf(trial_d, GateError).value.code,
            errors.BACKEND_UNAVAILABLE)
        self.assertEqual(len(b0.sent), 3)
        b0.sent[2][2].callback("back")
        self.assertEqual(self.successResultOf(trial_c), "back")
        self.assertEqual(self.set.members[0].breaker.state, CLOSED)

    def test_refused_before_sending(self):
        """
        A call the member refuses before sending (an invalid route) costs
        nothing and says nothing about the backend.
        """
        self.make(1, breaker_failures=1)
        error = self.failureResultOf(self.call("bad route"), GateError).value
        self.assertEqual(error.code, errors.BAD_REQUEST)
        member = self.set.members[0]
        self.assertEqual((member.outstanding, member.breaker.state),
                         (0, CLOSED))

    def test_outstanding(self):
        self.make(2, balance="least_outstanding")
        b0, b1 = self.backends
        first = self.call()
        second = self.call()
        self.assertEqual([m.outstanding for m in self.set.members], [1, 1])
        busy = b0 if b0.sent else b1
        idle = b1 if busy is b0 else b0
        self.assertEqual(len(idle.sent), 1)
        busy.sent[0][2].callback(1)
        # The freed one takes the next two calls.
        self.call()
        self.assertEqual(len(busy.sent), 2)
        self.successResultOf(first if busy is b0 else second)

    # Retries.

    def test_idempotent_route_retried_on_another_backend(self):
        self.make(2, idempotent_routes=["get"], retry_backoff=0.1)
        b0, b1 = self.backends
        d = self.call("get")
        self.assertEqual((len(b0.sent), len(b1.sent)), (1, 0))
        b0.sent[0][2].errback(unavailable())
        self.assertNoResult(d)
        # Full jitter: 0.5 of the first step (0.1 s).
        self.clock.advance(0.0499)
        self.assertEqual(len(b1.sent), 0)
        self.clock.advance(0.0001)
        self.assertEqual(len(b1.sent), 1)
        b1.sent[0][2].callback("fine")
        self.assertEqual(self.successResultOf(d), "fine")
        self.assertEqual(self.sample("mmogate_backend_retries_total"), 1.0)
        self.assertEqual(self.sample("mmogate_backend_requests_total",
                                     backend="b0.test",
                                     outcome="backend_unavailable"), 1.0)

    def test_other_routes_not_retried(self):
        self.make(2, idempotent_routes=["get"])
        d = self.call("buy")
        self.backends[0].sent[0][2].errback(unavailable())
        error = self.failureResultOf(d, GateError).value
        self.assertEqual(error.code, errors.BACKEND_UNAVAILABLE)
        self.clock.advance(1)
        self.assertEqual(len(self.backends[1].sent), 0)

    def test_login_and_events_not_retried(self):
        self.make(2, idempotent_routes=["get", "login"])
        d = self.set.login("s1", {"name": "a"})
        self.backends[0].sent[0][2].errback(unavailable())
        self.failureResultOf(d, GateError)
        d = self.set.event({"player_id": "p"})
        self.backends[1].sent[0][2].errback(BackendStatusError(503))
        self.failureResultOf(d, BackendStatusError)
        self.clock.advance(1)
        self.assertEqual([len(b.sent) for b in self.backends], [1, 1])

    def test_backend_code_not_retried(self):
        self.make(2, idempotent_routes=["get"])
        d = self.call("get")
        self.backends[0].sent[0][2].errback(GateError("no_such_item", "?"))
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "no_such_item")
        self.assertEqual(len(self.backends[1].sent), 0)

    def test_retries_bounded(self):
        self.make(4, idempotent_routes=["get"], retries=2, random=0.0)
        for b in self.backends:
            b.auto = lambda kind, args: fail(http_error(502))
        d = self.call("get")
        self.clock.advance(0)
        self.clock.advance(0)
        error = self.failureResultOf(d, GateError).value
        self.assertEqual(error.code, errors.BACKEND_ERROR)
        # Three attempts, each on a different backend.
        self.assertEqual(sorted(len(b.sent) for b in self.backends),
                         [0, 1, 1, 1])

    def test_retry_reuses_the_only_backend(self):
        self.make(1, idempotent_routes=["get"], random=0.0)
        b0 = self.backends[0]
        d = self.call("get")
        b0.sent[0][2].errback(unavailable())
        self.clock.advance(0)
        b0.sent[1][2].callback("second time")
        self.assertEqual(self.successResultOf(d), "second time")

    def test_backoff_exponential_with_full_jitter(self):
        """
        The n-th retry waits C{random() * retry_backoff * 2 ** (n - 1)}:
        between 0 and the exponential step.
        """
        for roll in (0.0, 0.25, 0.999):
            self.clock = Clock()
            self.make(3, idempotent_routes=["get"], retries=2,
                      retry_backoff=0.2, random=roll)
            d = self.call("get")
            started = self.clock.seconds()
            sent_at = []
            for attempt in range(3):
                backend = next(b for b in self.backends
                               if len(b.sent) == 1 and not b.sent[0][2].called)
                sent_at.append(self.clock.seconds() - started)
                backend.sent[0][2].errback(unavailable())
                if attempt < 2:
                    step = 0.2 * 2 ** attempt
                    self.clock.advance(roll * step)
            self.failureResultOf(d, GateError)
            self.assertAlmostEqual(sent_at[1], roll * 0.2)
            self.assertAlmostEqual(sent_at[2], roll * 0.2 + roll * 0.4)
            self.assertTrue(0 <= sent_at[1] < 0.2)
            self.assertTrue(0 <= sent_at[2] - sent_at[1] < 0.4)

    def test_no_retry_past_the_deadline(self):
        self.make(2, idempotent_routes=["get"], timeout=1.0,
                  retry_backoff=1.0, random=0.9)
        d = self.call("get")
        self.clock.advance(0.5)
        self.backends[0].sent[0][2].errback(unavailable())
        # A 0.9 s wait would end past the 1 s budget: fail now instead.
        error = self.failureResultOf(d, GateError).value
        self.assertEqual(error.code, errors.BACKEND_UNAVAILABLE)
        self.assertEqual(len(self.backends[1].sent), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_bounded_by_the_deadline(self):
        """
        A retry gets only what is left of C{backend.timeout}: the call as a
        whole answers C{backend_timeout} at the deadline.
        """
        self.make(2, idempotent_routes=["get"], timeout=1.0,
                  retry_backoff=0.5, random=0.9)
        d = self.call("get")
        self.clock.advance(0.2)
        self.backends[0].sent[0][2].errback(unavailable())
        self.clock.advance(0.45)
        (kind, args, attempt), = self.backends[1].sent
        self.clock.advance(0.3499)
        self.assertNoResult(d)
        self.clock.advance(0.0001)
        error = self.failureResultOf(d, GateError).value
        self.assertEqual(error.code, errors.BACKEND_TIMEOUT)
        self.assertTrue(attempt.called)  # cancelled, not left hanging
        self.assertEqual(self.set.members[1].outstanding, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self):
        self.make(2, idempotent_routes=["get"], random=0.5)
        d = self.call("get")
        self.backends[0].sent[0][2].errback(unavailable())
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.backends[1].sent), 0)

    # Routing by player, events, registration.

    def test_player_hash_routes(self):
        self.make(3, balance="player_hash")
        for b in self.backends:
            b.auto = lambda kind, args: succeed(None)
        for player in ("alice", "bob", "carol", "dave"):
            for i in range(3):
                self.call(player=player)
            self.set.event({"player_id": player, "event": "online"})
            target = self.set.member_for(player).backend
            self.assertEqual(
                [args[1] if kind == "call" else args[0]["player_id"]
                 for kind, args, _ in target.sent].count(player), 4)
        # A login has no player yet: it goes by session id.
        self.set.login("session-9", {})
        target = self.set.member_for("session-9").backend
        self.assertEqual(target.sent[-1][:2], ("login", ("session-9", {})))

    def test_member_for_only_with_player_hash(self):
        self.make(2)
        self.assertIsNone(self.set.member_for("alice"))

    def test_event_goes_to_one_backend(self):
        self.make(3)
        d = self.set.event({"player_id": "p", "event": "online"})
        self.assertEqual(sum(len(b.sent) for b in self.backends), 1)
        next(b for b in self.backends if b.sent).sent[0][2].callback(None)
        self.successResultOf(d)

    def test_register_goes_to_every_backend(self):
        self.make(3)
        self.set.members[2].healthy = False
        body = {"gate_id": "g", "state": "up"}
        d = self.set.register(body)
        self.assertEqual([b.sent[0][:2] for b in self.backends],
                         [("register", (body,))] * 3)
        self.backends[0].sent[0][2].callback(None)
        self.backends[1].sent[0][2].errback(unavailable())
        self.assertNoResult(d)
        self.backends[2].sent[0][2].callback(None)
        error = self.failureResultOf(d, RegistrationFailed).value
        self.assertIn("1 of 3", str(error))
        self.assertIn("b1.test", str(error))
        d = self.set.register(body)
        for b in self.backends:
            b.sent[1][2].callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_close(self):
        self.make(2)
        self.successResultOf(self.set.close())
        self.assertTrue(all(b.closed for b in self.backends))
        self.successResultOf(self.set.close())

    # Health probes.

    def probed(self, **kw):
        self.http = FakeHTTP()
        kw.setdefault("health_interval", 5.0)
        self.make(2, http=self.http, **kw)
        self.set.startService()
        self.addCleanup(self.set.stopService)

    def test_probes(self):
        self.probed(health_path="status")
        self.assertEqual([url for url, _ in self.http.pending()],
                         ["http://b0.test/status", "http://b1.test/status"])
        self.assertEqual(self.http.gets[0][1], {b"X-Mmogate-Gate": [b"g"]})
        (_, d0), (_, d1) = self.http.pending()
        response = FakeResponse(500)
        d0.callback(response)
        d1.callback(FakeResponse(404))  # below 500: healthy
        self.assertEqual(len(response.bodies), 1)  # body discarded
        self.assertEqual([m.healthy for m in self.set.members], [False, True])
        self.assertEqual(self.sample("mmogate_backend_healthy",
                                     backend="b0.test"), 0.0)
        # Taken out: every call goes to b1.
        for _ in range(3):
            self.call()
        self.assertEqual([len(b.sent) for b in self.backends], [0, 3])
        # The next probe passes: back in.
        self.clock.advance(5.0)
        for _, d in self.http.pending():
            d.callback(FakeResponse(200))
        self.assertEqual([m.healthy for m in self.set.members], [True, True])
        self.assertEqual(self.sample("mmogate_backend_healthy",
                                     backend="b0.test"), 1.0)
        self.call()
        self.assertEqual([len(b.sent) for b in self.backends], [1, 3])

    def test_unreachable_probe_fails(self):
        self.probed()
        (_, d0), (_, d1) = self.http.pending()
        d0.errback(ConnectionRefusedError())
        d1.callback(FakeResponse(200))
        self.assertEqual([m.healthy for m in self.set.members], [False, True])

    def test_probe_bounded_by_timeout_and_not_doubled(self):
        self.probed(timeout=8.0)
        self.assertEqual(len(self.http.gets), 2)
        self.http.gets[1][2].callback(FakeResponse(200))
        self.clock.advance(5.0)
        # b0's probe still in flight: only b1 is probed again.
        self.assertEqual([u for u, _, _ in self.http.gets[2:]],
                         ["http://b1.test/health"])
        self.assertTrue(self.set.members[0].healthy)
        self.clock.advance(3.0)
        self.assertTrue(self.http.gets[0][2].called)  # cancelled
        self.assertFalse(self.set.members[0].healthy)

    def test_stop_stops_probes(self):
        self.probed()
        self.set.stopService()
        self.assertTrue(all(d.called for _, _, d in self.http.gets))
        self.assertEqual([m.healthy for m in self.set.members], [True, True])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(len(self.http.gets), 2)

    def test_no_probes_when_interval_zero(self):
        self.probed(health_interval=0.0)
        self.assertEqual(self.http.gets, [])


class FromConfigTests(SynchronousTestCase):
    URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000/game"]

    def config(self, **changes):
        return make_config(backend__url="", backend__urls=self.URLS,
                           backend__max_connections=77,
                           backend__max_head=2048, **changes)

    def test_shared_pool(self):
        reactor = MemoryReactorClock()
        backends = BackendSet.from_config(reactor, self.config(), "g")
        self.assertTrue(verifyObject(IBackendClient, backends))
        first, second = (m.backend for m in backends.members)
        self.assertIsInstance(first, HTTPBackend)
        self.assertEqual((first.url, second.url), tuple(self.URLS))
        self.assertIs(first._http, second._http)
        self.assertIs(first._http._agent._pool, backends._pool)
        self.assertEqual(backends._pool.maxPersistentPerHost, 77)
        self.assertIsInstance(backends._pool, HeadCappedPool)
        self.assertEqual(backends._pool.max_head, 2048)
        self.assertEqual([m.label for m in backends.members],
                         ["10.0.0.1:8000", "10.0.0.2:8000/game"])
        self.successResultOf(backends.close())

    def test_gate_builds_a_set(self):
        reactor = MemoryReactorClock()
        gate = GateService(self.config(backend__balance="player_hash"),
                           reactor=reactor)
        self.assertIsInstance(gate.backend, BackendSet)
        self.assertIsInstance(gate.backend.policy, PlayerHash)
        self.assertIs(gate.backend.parent, gate)
        # No in-process reference backend with backend.urls.
        self.assertNotIn("backend", gate.listeners)
        self.assertIsNone(gate.reference)

    def test_gate_keeps_one_backend(self):
        gate = GateService(make_config(), reactor=MemoryReactorClock())
        self.assertIsInstance(gate.backend, HTTPBackend)


class ReferenceHealthTests(SynchronousTestCase):
    def test_reference_backend_health(self):
        clock = Clock()
        stub = StubTreq(ReferenceBackend(clock, api_key="k",
                                         secret="s").resource())
        response = self.successResultOf(stub.get("http://b.test/health"))
        self.assertEqual(response.code, 200)
        body = self.successResultOf(stub.content(response))
        self.assertEqual(json.loads(body), {"ok": True})
        # Other GETs are still refused.
        response = self.successResultOf(stub.get("http://b.test/login"))
        self.assertEqual(response.code, 405)
