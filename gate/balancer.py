"""
Several backends behind one gate (C{backend.urls}).

L{BackendSet} is an L{IBackendClient} over several L{HTTPBackend}s: it picks
one per call with a balancing policy, skips a backend whose health probe
failed or whose circuit breaker is open, retries calls of
C{backend.idempotent_routes} on another backend with exponential backoff and
full jitter, and never lets a call outlive C{backend.timeout}. When no backend
is usable it fails at once with C{backend_unavailable}: waiting would only
hold a worker and the client's queue.

Every backend shares one L{HeadCappedPool}: the pool is where the
forwarding CPU goes (PERF-NOTES.md), and one pool keyed by host keeps
C{backend.max_connections} connections to each backend.

Breakers and retries judge a call by what happened on the wire
(L{is_backend_fault}: no connection, timeout, 5xx, an unusable answer), never
by the client's error code: a 4xx answer, whatever code it maps to, is the
backend working, so no client can open breakers by asking for nonsense.

The policies and L{CircuitBreaker} are small plain classes with an injected
clock, so they are tested without a network (L{tests.test_balancer}); the
whole is tested over sockets in L{tests.test_e2e_backends}.
"""

import random
from hashlib import blake2b
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import (Deferred, DeferredList, fail,
                                    gatherResults, succeed)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from zope.interface import implementer

from gate import errors
from gate.backend import (BackendCallError, BackendStatusError,
                          HeadCappedPool, HTTPBackend, _Discard,
                          is_backend_fault)
from gate.errors import GateError
from gate.interfaces import IBackendClient

CLOSED = "closed"
HALF_OPEN = "half_open"
OPEN = "open"

#: The breaker gauge's values.
BREAKER_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

#: The outcome labels of a backend fault (see L{is_backend_fault}): such a
#: call counts against the backend's breaker and is retried on idempotent
#: routes.
FAILURE_CODES = frozenset({errors.BACKEND_UNAVAILABLE, errors.BACKEND_TIMEOUT,
                           errors.BACKEND_ERROR})

#: Outcomes of a call as counted per backend; any answer refusing the call
#: (every 4xx, whatever code the client gets) is C{backend_code}.
OUTCOMES = ("ok", errors.BACKEND_UNAVAILABLE, errors.BACKEND_TIMEOUT,
            errors.BACKEND_ERROR, "backend_code")

POLICIES = ("round_robin", "weighted", "least_outstanding", "player_hash")


class CircuitBreaker:
    """
    Stops sending to a backend that keeps failing, so its calls fail at once
    (or go elsewhere) instead of each waiting for a timeout.

    Closed: calls pass; C{failures} consecutive failures open it. Open:
    nothing passes until C{reset} seconds have gone by, then it is half-open.
    Half-open: one trial call passes; its success closes the breaker, its
    failure opens it for another C{reset} seconds.

    L{acquire} hands each call a ticket that its outcome is reported with.
    A ticket from before the breaker last opened is stale: its call was sent
    to a backend since judged failing, so its late result changes nothing
    (and, above all, cannot free the half-open trial's slot while the trial
    is still in flight).

    @param clock: an L{IReactorTime}.
    @param observer: called as C{observer(old_state, new_state)} on changes.
    """

    def __init__(self, clock, failures, reset, observer=None):
        self._clock = clock
        self.failures = failures
        self.reset = reset
        self._observer = observer
        self._state = CLOSED
        self._count = 0
        self._opened_at = 0.0
        #: Bumped at each opening; tickets carry the one they were taken in.
        self._epoch = 0
        #: The ticket of the half-open trial in flight, or None.
        self._trial = None

    @property
    def state(self):
        if (self._state == OPEN
                and self._clock.seconds() >= self._opened_at + self.reset):
            self._trial = None
            self._set(HALF_OPEN)
        return self._state

    def _set(self, state):
        old, self._state = self._state, state
        if old != state and self._observer is not None:
            self._observer(old, state)

    def available(self):
        """
        Whether a call may be sent now (without taking the trial).
        """
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and self._trial is None)

    def acquire(self):
        """
        Take the right to send one call: in the half-open state only one
        call at a time gets it.

        @return: a ticket to report the call's outcome with (to
            L{succeeded}, L{failed} or L{released}), or C{None} when the
            call may not be sent.
        """
        state = self.state
        if state == CLOSED:
            return _Ticket(self._epoch)
        if state == HALF_OPEN and self._trial is None:
            self._trial = _Ticket(self._epoch)
            return self._trial
        return None

    def _current(self, ticket):
        """
        Whether C{ticket}'s outcome may change the breaker: the trial's
        always; any other only while closed and if taken since the last
        opening.
        """
        if ticket is None:
            return False
        if ticket is self._trial:
            self._trial = None
            return True
        return ticket.epoch == self._epoch and self.state == CLOSED

    def succeeded(self, ticket):
        """
        The call of C{ticket} got an answer: the backend works.
        """
        if self._current(ticket):
            self._count = 0
            self._set(CLOSED)

    def failed(self, ticket):
        """
        The call of C{ticket} failed because of the backend (no connection,
        a timeout, a 5xx or an unusable answer).
        """
        if not self._current(ticket):
            return
        if self._state == HALF_OPEN or self._count + 1 >= self.failures:
            self._count = 0
            self._epoch += 1
            self._opened_at = self._clock.seconds()
            self._set(OPEN)
        else:
            self._count += 1

    def released(self, ticket):
        """
        The call of C{ticket} ended without saying anything about the
        backend (it was never sent, or cancelled): if it was the half-open
        trial, another call may try.
        """
        if ticket is not None and ticket is self._trial:
            self._trial = None


class _Ticket:
    """
    A breaker's permission for one call; its identity marks the trial.
    """

    __slots__ = ("epoch",)

    def __init__(self, epoch):
        self.epoch = epoch


# Policies: each picks one of a non-empty list of usable members, given in
# configuration order; C{key} is the player id (the session id for a login).

class RoundRobin:
    """
    Each usable backend in turn.
    """

    def __init__(self):
        self._next = 0

    def pick(self, candidates, key=None):
        chosen = candidates[0]
        for member in candidates:
            if member.index >= self._next:
                chosen = member
                break
        self._next = chosen.index + 1
        return chosen


class Weighted:
    """
    Smooth weighted round robin, as nginx does it: every pick adds each
    candidate's weight to its current weight, takes the highest and subtracts
    the total from it, so weights 5, 1, 1 give C{a a b a c a a}: exact
    proportions over each cycle of C{sum(weights)} picks, interleaved rather
    than in bursts.

    A backend of weight 0 is a standby: it is picked only while no backend
    of positive weight is usable.
    """

    def __init__(self, size):
        self._current = [0] * size

    def pick(self, candidates, key=None):
        weighted = [m for m in candidates if m.weight > 0] or candidates
        current = self._current
        total = 0
        best = None
        for member in weighted:
            weight = member.weight or 1
            current[member.index] += weight
            total += weight
            if best is None or current[member.index] > current[best.index]:
                best = member
        current[best.index] -= total
        return best


class LeastOutstanding:
    """
    The backend with the fewest calls in flight from this gate; ties are
    broken in turn, so an idle set is still spread evenly.
    """

    def __init__(self):
        self._turn = 0

    def pick(self, candidates, key=None):
        n = len(candidates)
        start = self._turn % n
        self._turn += 1
        best = candidates[start]
        for i in range(1, n):
            member = candidates[(start + i) % n]
            if member.outstanding < best.outstanding:
                best = member
        return best


class PlayerHash:
    """
    Sticky: rendezvous (highest random weight) hashing of the key over each
    backend's URL. A player stays on one backend while it is usable; when a
    backend goes, only its players move (each to its next-ranked backend),
    and they come back with it. The URL, not the position in the list, names
    a backend, so reordering C{backend.urls} moves nobody. Calls without a
    key go round robin.
    """

    def __init__(self):
        self._fallback = RoundRobin()

    def pick(self, candidates, key=None):
        if key is None:
            return self._fallback.pick(candidates)
        data = key.encode("utf-8", "surrogatepass")
        best = None
        best_score = -1
        for member in candidates:
            score = int.from_bytes(
                blake2b(data, digest_size=8, key=member.hash_key).digest(),
                "big")
            if score > best_score:
                best, best_score = member, score
        return best


def make_policy(name, size):
    """
    The policy called C{name} (C{backend.balance}) for C{size} backends.
    """
    if name == "round_robin":
        return RoundRobin()
    if name == "weighted":
        return Weighted(size)
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "player_hash":
        return PlayerHash()
    raise ValueError(f"backend.balance: unknown policy {name!r}")


def labels_for(urls):
    """
    A short, distinct metric label per URL: C{host:port} (with the path when
    there is one; never the URL's user or password); a repeated URL gets
    C{#index}.
    """
    labels = []
    for index, url in enumerate(urls):
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        label = host + parts.path.rstrip("/")
        if label in labels:
            label = f"{label}#{index}"
        labels.append(label)
    return labels


class Member:
    """
    One backend of a set and what the set knows of it.

    @ivar healthy: whether its last health probe passed (true until one
        fails).
    @ivar outstanding: calls from this gate in flight to it.
    """

    def __init__(self, index, url, backend, weight, breaker, label):
        self.index = index
        self.url = url.rstrip("/")
        self.backend = backend
        self.weight = weight
        self.breaker = breaker
        self.label = label
        self.healthy = True
        self.outstanding = 0
        self.probe = None
        self.counters = None
        self.hash_key = blake2b(self.url.encode("utf-8"),
                                digest_size=16).digest()

    def usable(self):
        return self.healthy and self.breaker.available()

    def __repr__(self):
        return f"<Member {self.label} {self.breaker.state}" \
               f"{'' if self.healthy else ' unhealthy'}>"


class RegistrationFailed(Exception):
    """
    Some backends did not take a registration; the message names them.
    """


def _outcome(result):
    """
    How a call's result counts: C{"ok"}, one of L{FAILURE_CODES} for a
    backend fault (L{is_backend_fault}), C{"backend_code"} for any other
    answer or code (the backend answered, refusing), or C{None} when nothing
    was learnt of the backend.
    """
    if not isinstance(result, Failure):
        return "ok"
    error = result.value
    if is_backend_fault(error):
        code = getattr(error, "code", None)
        return code if code in FAILURE_CODES else errors.BACKEND_ERROR
    if isinstance(error, (GateError, BackendStatusError)):
        return "backend_code"
    return None


class _Call:
    """
    One call to the set: its attempts, the backoff between them and the
    deadline over all of them.
    """

    __slots__ = ("owner", "key", "retries", "send", "deadline", "tried",
                 "pending", "cancelled", "result")

    def __init__(self, owner, key, retries, send):
        self.owner = owner
        self.key = key
        self.retries = retries
        self.send = send
        self.deadline = owner._clock.seconds() + owner.timeout
        self.tried = []
        self.pending = None
        self.cancelled = False
        self.result = Deferred(self._cancel)

    def start(self):
        self._attempt(None)
        return self.result

    def _attempt(self, last):
        self.pending = None
        owner = self.owner
        member, ticket = owner._choose(self.key, self.tried)
        if member is None:
            self.result.errback(last or Failure(owner._none_usable()))
            return
        self.tried.append(member)
        d = owner._send_to(member, ticket, self.send, self.deadline, self)
        self.pending = d
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, value):
        self.pending = None
        if not self.cancelled:
            self.result.callback(value)

    def _failed(self, failure):
        self.pending = None
        if self.cancelled:
            return None
        owner = self.owner
        n = len(self.tried)
        if n <= self.retries and is_backend_fault(failure.value):
            # Full jitter: anywhere up to the exponential step, so retries
            # of many sessions after one outage do not arrive together.
            delay = owner._random() * owner.retry_backoff * 2 ** (n - 1)
            if owner._clock.seconds() + delay < self.deadline:
                owner._count_retry()
                self.pending = owner._clock.callLater(delay, self._attempt,
                                                      failure)
                return None
        self.result.errback(failure)
        return None

    def _cancel(self, _):
        self.cancelled = True
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()


@implementer(IBackendClient)
class BackendSet(Service):
    """
    An L{IBackendClient} over several backends; a service, so that its
    health probes run while the gate does.

    @param clock: an L{IReactorTime}.
    @param backends: one L{IBackendClient} per URL, each with a C{url}.
    @param http: a treq-like client whose C{get} the health probes use
        (C{None}: no probes).
    @param pool: the shared L{HTTPConnectionPool} that L{close} closes.
    @param metrics: a L{gate.metrics.Metrics} or C{None}.
    @param random: returns floats in [0, 1), for the backoff's jitter.
    """

    log = Logger()

    def __init__(self, clock, backends, *, weights=(), balance="round_robin",
                 idempotent_routes=(), retries=2, retry_backoff=0.05,
                 timeout=10.0, health_path="/health", health_interval=5.0,
                 breaker_failures=5, breaker_reset=10.0, gate_id="",
                 http=None, pool=None, metrics=None, random=random.random):
        if not backends:
            raise ValueError("a backend set needs at least one backend")
        self._clock = clock
        self.idempotent_routes = frozenset(idempotent_routes)
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.health_path = "/" + health_path.lstrip("/")
        self.health_interval = health_interval
        self._http = http
        self._pool = pool
        self._metrics = metrics
        self._random = random
        self._probe_headers = {b"X-Mmogate-Gate": [gate_id.encode("utf-8")]}
        self._loop = None
        self._closed = None
        weights = list(weights) or [1] * len(backends)
        urls = [b.url for b in backends]
        self.members = []
        for index, (backend, label) in enumerate(zip(backends,
                                                     labels_for(urls))):
            breaker = CircuitBreaker(clock, breaker_failures, breaker_reset)
            member = Member(index, backend.url, backend, weights[index],
                            breaker, label)
            breaker._observer = self._breaker_observer(member)
            if metrics is not None:
                member.counters = metrics.watch_backend(
                    label, lambda b=breaker: BREAKER_VALUES[b.state],
                    lambda m=member: 1 if m.healthy else 0, OUTCOMES)
            self.members.append(member)
        self.policy = make_policy(balance, len(self.members))

    @classmethod
    def from_config(cls, reactor, config, gate_id, metrics=None):
        """
        The set of C{backend.urls}, every backend on one shared pool.
        """
        pool = HeadCappedPool(reactor, config["backend.max_connections"],
                              config["backend.max_head"])
        http = HTTPClient(Agent(reactor, pool=pool))
        backends = [HTTPBackend(reactor, url, gate_id,
                                config["backend.timeout"],
                                config["backend.secret"], http=http,
                                max_body=config["backend.max_body"])
                    for url in config["backend.urls"]]
        return cls(reactor, backends,
                   weights=config["backend.weights"],
                   balance=config["backend.balance"],
                   idempotent_routes=config["backend.idempotent_routes"],
                   retries=config["backend.retries"],
                   retry_backoff=config["backend.retry_backoff"],
                   timeout=config["backend.timeout"],
                   health_path=config["backend.health_path"],
                   health_interval=config["backend.health_interval"],
                   breaker_failures=config["backend.breaker_failures"],
                   breaker_reset=config["backend.breaker_reset"],
                   gate_id=gate_id, http=http, pool=pool, metrics=metrics)

    def _breaker_observer(self, member):
        def changed(old, new):
            log = self.log.warn if new == OPEN else self.log.info
            log("backend {backend}: circuit breaker {old} -> {new}",
                backend=member.label, old=old, new=new)
        return changed

    # Choosing.

    @property
    def reachable(self):
        """
        Whether any backend is usable (C{/ready} says so).
        """
        return any(m.healthy and m.breaker.state != OPEN
                   for m in self.members)

    def _choose(self, key, tried=()):
        """
        C{(member, ticket)}: a usable member by the policy, preferring one
        not in C{tried}, and its breaker's ticket for the call;
        C{(None, None)} when none is usable.
        """
        usable = [m for m in self.members if m.usable()]
        candidates = [m for m in usable if m not in tried] if tried else usable
        if not candidates:
            if not usable:
                return None, None
            candidates = usable
        member = self.policy.pick(candidates, key)
        return member, member.breaker.acquire()

    def member_for(self, key):
        """
        With C{player_hash}, the member a call keyed by C{key} would go to
        now (nothing is sent); otherwise, or when none is usable, C{None}.
        """
        usable = [m for m in self.members if m.usable()]
        if not usable or not isinstance(self.policy, PlayerHash):
            return None
        return self.policy.pick(usable, key)

    def _none_usable(self):
        down = sum(1 for m in self.members if not m.healthy)
        return GateError(errors.BACKEND_UNAVAILABLE,
                         f"no backend is available ({len(self.members)} "
                         f"configured: {down} failing health probes, the "
                         f"others' circuit breakers open)")

    def _send_to(self, member, ticket, send, deadline, call=None):
        """
        One attempt, C{send(member.backend)}, bounded by what is left until
        C{deadline}, counted in the member's breaker (under C{ticket}) and
        metrics.

        @param call: the L{_Call} it belongs to, if it may be retried.
        """
        member.outstanding += 1
        try:
            d = send(member.backend)
        except Exception:
            # Refused before sending (an invalid route, say): nothing learnt.
            member.outstanding -= 1
            member.breaker.released(ticket)
            return fail()
        clock = self._clock
        remaining = deadline - clock.seconds()
        own = getattr(member.backend, "timeout", None)
        timer = None
        if own is None or remaining < own - 0.001:
            timer = clock.callLater(max(0.0, remaining), d.cancel)

        def settled(result):
            member.outstanding -= 1
            if timer is not None:
                if timer.active():
                    timer.cancel()
                elif isinstance(result, Failure):
                    result = Failure(BackendCallError(
                        errors.BACKEND_TIMEOUT,
                        f"the backend did not answer within "
                        f"{self.timeout:g}s", transport_failure=True))
            if call is not None and call.cancelled:
                outcome = None
            else:
                outcome = _outcome(result)
            if outcome is None:
                member.breaker.released(ticket)
            elif outcome in FAILURE_CODES:
                member.breaker.failed(ticket)
            else:
                member.breaker.succeeded(ticket)
            if outcome is not None and member.counters is not None:
                member.counters[outcome].inc()
            return result

        return d.addBoth(settled)

    def _once(self, key, send):
        """
        A call without retries: one attempt, without the bookkeeping of a
        L{_Call} (a Deferred and a callback chain less per call).
        """
        member, ticket = self._choose(key)
        if member is None:
            return fail(self._none_usable())
        return self._send_to(member, ticket, send,
                             self._clock.seconds() + self.timeout)

    def _count_retry(self):
        if self._metrics is not None:
            self._metrics.backend_retried()

    # IBackendClient.

    def login(self, session_id, data):
        # Never retried: a login may create state the gate cannot see (a
        # new character, a session row), and the client can send it again.
        return self._once(session_id, lambda b: b.login(session_id, data))

    def call(self, session_id, player_id, request_id, route, data):
        def send(backend):
            return backend.call(session_id, player_id, request_id, route,
                                data)

        if self.retries and route in self.idempotent_routes:
            return _Call(self, player_id, self.retries, send).start()
        return self._once(player_id, send)

    def event(self, body):
        # One backend, by the policy (the player's own with player_hash);
        # the event sender retries with its own backoff.
        return self._once(body.get("player_id"), lambda b: b.event(body))

    def register(self, body):
        """
        To every backend, usable or not: each should know the gate, and one
        that comes back learns of it at the next interval.
        """
        members = self.members
        sent = []
        for member in members:
            try:
                sent.append(member.backend.register(body))
            except Exception:
                sent.append(fail())

        def check(results):
            failed = [f"{m.label}: {r.getErrorMessage()}"
                      for m, (ok, r) in zip(members, results) if not ok]
            if failed:
                raise RegistrationFailed(
                    f"{len(failed)} of {len(members)} backends did not take "
                    f"it ({'; '.join(failed)})")
            return None

        return DeferredList(sent, consumeErrors=True).addCallback(check)

    def close(self):
        self._stop_probes()
        if self._closed is None:
            closing = [m.backend.close() for m in self.members]
            if self._pool is not None:
                closing.append(self._pool.closeCachedConnections())
            self._closed = gatherResults(closing, consumeErrors=True)
            self._closed.addErrback(lambda f: self.log.failure(
                "closing the backends' connections", f))
        d = Deferred()
        self._closed.addCallback(lambda _: d.callback(None))
        return d

    # Health probes.

    def startService(self):
        Service.startService(self)
        if self.health_interval > 0 and self._http is not None \
                and self._loop is None:
            self._loop = LoopingCall(self.probe_all)
            self._loop.clock = self._clock
            self._loop.start(self.health_interval, now=True)

    def stopService(self):
        Service.stopService(self)
        self._stop_probes()
        return succeed(None)

    def _stop_probes(self):
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        for member in self.members:
            probe, member.probe = member.probe, None
            if probe is not None:
                probe.cancel()

    def probe_all(self):
        """
        Probe every backend that has no probe in flight.
        """
        for member in self.members:
            if member.probe is None:
                self._probe(member)

    def _probe(self, member):
        """
        C{GET {url}{health_path}}: any answer below 500 within
        C{backend.timeout} is healthy.
        """
        try:
            d = self._http.get(member.url + self.health_path,
                               headers=self._probe_headers,
                               allow_redirects=False)
        except Exception:
            d = fail()
        member.probe = d
        timer = self._clock.callLater(self.timeout, d.cancel)

        def answered(response):
            response.deliverBody(_Discard())
            return response.code

        def done(result):
            if timer.active():
                timer.cancel()
            if member.probe is not d:
                return None  # stopped meanwhile
            member.probe = None
            if isinstance(result, Failure):
                why = ("no answer within "
                       f"{self.timeout:g}s" if timer.called
                       else result.getErrorMessage())
                self._health(member, False, why)
            elif result >= 500:
                self._health(member, False, f"HTTP {result}")
            else:
                self._health(member, True, f"HTTP {result}")
            return None

        d.addCallback(answered).addBoth(done)

    def _health(self, member, healthy, why):
        if member.healthy == healthy:
            return
        member.healthy = healthy
        if healthy:
            self.log.info("backend {backend} passed its health probe "
                          "({why}): back in", backend=member.label, why=why)
        else:
            self.log.warn("backend {backend} failed its health probe "
                          "({why}): taken out", backend=member.label, why=why)
