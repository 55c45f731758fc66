"""
What the cluster proofs share (C{tests/test_e2e_proof.py}, the drain, and
the SIGKILL test of C{tests/test_e2e_cluster.py}; issue 4, item 5):

  - L{ProofClient}: a real L{GateClient} that records what it was handed
    (persistent seqs, gaps, kicks, states with their times) and, per
    connection, whether the gate ever wrote a persistent push out of order
    or twice on it;
  - L{Pusher}: persistent pushes kept flowing to batches of players through
    the push APIs of several gates, counting per player what the API
    acknowledged (C{delivered} or C{queued}) and which calls may or may not
    have been carried out (an answer lost with a stopping gate);
  - L{check_runs}: every client was handed exactly C{1..last_seq}, where
    C{last_seq} is what the store numbered (C{GET /v1/players/{id}}) and
    lies between the pushes acknowledged and those plus the uncertain ones.

The clients live in the test's process, on the real reactor, over real
sockets.
"""

import itertools
import json
from collections import Counter

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from gate.client import GateClient, GateError
from tests.e2e import API_KEY, HTTP, within

#: Bound on connecting and binding one client, and on one push API call,
#: with a thousand clients and two gates sharing the test's process.
SLOW = 30.0


class ProofClient(GateClient):
    """
    A L{GateClient} logged in as C{name} that keeps what a proof checks.

    @ivar seqs: persistent seqs in the order handed to the application.
    @ivar times: state name -> reactor times it was reported.
    @ivar wire_disorder: persistent pushes the gate wrote on one connection
        at or below a seq it had already written there (PROTOCOL.md: each
        once per connection, in order).
    @ivar overlap: persistent pushes received that the application already
        had (the old and the new gate during a move, or a replay): dropped
        by the client, counted for information.
    """

    def __init__(self, addr, name, **kwargs):
        self.name = name
        self.seqs = []
        self.gaps = []
        self.kicks = []
        self.states = []
        self.errors = []
        self.times = {}
        self.wire_disorder = 0
        self.overlap = 0
        self._per_link = {}
        kwargs.setdefault("connect_timeout", SLOW)
        GateClient.__init__(self, reactor, addr, login={"name": name},
                            on_push=self._handed, on_gap=self._gap,
                            on_kick=self._kick, on_state=self._state,
                            **kwargs)

    def _gotPush(self, link, obj):
        # The only place that sees pushes per connection, before the
        # client's own dedupe.
        seq = obj.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self._per_link.get(link, 0):
                self.wire_disorder += 1
            else:
                self._per_link[link] = seq
            if seq <= self.last_seq:
                self.overlap += 1
        GateClient._gotPush(self, link, obj)

    def _handed(self, push):
        if push.seq is not None:
            self.seqs.append(push.seq)

    def _gap(self, first, last):
        self.gaps.append((first, last))

    def _kick(self, reason, msg):
        self.kicks.append(reason)

    def _state(self, state, info):
        self.states.append(state)
        if "code" in info:
            self.errors.append((state, info["code"], info.get("msg")))
        self.times.setdefault(state, []).append(reactor.seconds())

    def first(self, state, after=0.0):
        """
        The first time C{state} was reported at or after C{after}, or
        C{None}.
        """
        return next((t for t in self.times.get(state, ()) if t >= after),
                    None)


class Describe:
    """
    A message built only when shown (C{until} formats its C{what} on a
    timeout): C{Describe(lambda: ...)}.
    """

    def __init__(self, make):
        self._make = make

    def __str__(self):
        return self._make()


def stuck(clients, state, after):
    """
    Text about the clients that have not reported C{state} since C{after}.
    """
    late = [c for c in clients if c.first(state, after) is None]
    return (f"{len(late)} clients not {state}; e.g. "
            + "; ".join(f"{c.name} at {c.address}: {c.states[-6:]} "
                        f"kicks {c.kicks} errors {c.errors[-3:]}"
                        for c in late[:5]))


class LagMonitor:
    """
    How late the reactor runs a timer due every C{interval} seconds: the
    longest lateness says how long the busy test process kept every gate
    and client in it waiting.
    """

    def __init__(self, test, interval=0.05):
        self.interval = interval
        self.worst = 0.0
        self._due = reactor.seconds() + interval
        self._call = reactor.callLater(interval, self._tick)
        test.addCleanup(self.stop)

    def _tick(self):
        now = reactor.seconds()
        self.worst = max(self.worst, now - self._due)
        self._due = now + self.interval
        self._call = reactor.callLater(self.interval, self._tick)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def address_of(gate, transport):
    host, port = gate.address(transport)
    return f"tcp://{host}:{port}" if transport == "tcp" \
        else f"ws://{host}:{port}/ws"


async def connect_all(test, make, names, concurrency=50):
    """
    C{make(name)} for each of C{names} (a L{ProofClient}), connected and
    logged in, C{concurrency} at a time; all closed on C{test}'s cleanup.
    """
    clients = []

    async def close_all():
        await within(gatherResults([c.close() for c in clients]), SLOW,
                     "the proof's clients to close")

    test.addCleanup(close_all)
    for start in range(0, len(names), concurrency):
        batch = [make(name) for name in names[start:start + concurrency]]
        clients.extend(batch)
        await within(gatherResults([c.connect() for c in batch]), SLOW,
                     f"clients {start}..{start + len(batch) - 1} to log in")
    return clients


class Pusher:
    """
    Persistent pushes to C{batch} players at a time (going round
    C{players}) through each of C{apis} (name -> API base URL), one call in
    flight per API and a pause of C{interval} seconds after each answer,
    until L{stop}.

    @ivar acked: player -> pushes the API answered 200 for, counting the
        player C{delivered} or C{queued}.
    @ivar uncertain: player -> calls whose answer was lost (carried out or
        not: a gate stopping under the call).
    @ivar outcomes: C{(api, outcome)} -> calls: C{ok}, C{refused} (the
        gate is gone; nothing sent), C{unavailable} (503: nothing sent),
        C{uncertain}, C{bad_answer} (200 but not every player counted).
    """

    def __init__(self, test, apis, players, batch=100, interval=0.05):
        self.apis = dict(apis)
        self.players = list(players)
        self.batch = batch
        self.interval = interval
        self.acked = Counter()
        self.uncertain = Counter()
        self.answers = Counter()
        self.outcomes = Counter()
        self.bad = []
        self.running = False
        self._cursor = itertools.count()
        self._loops = []
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        self.pool.retryAutomatically = False
        test.addCleanup(self.pool.closeCachedConnections)
        test.addCleanup(self.stop)

    def start(self):
        self.running = True
        self._loops = [ensureDeferred(self._loop(name, url))
                       for name, url in self.apis.items()]

    def stop(self):
        """
        Send no more calls; fires once none is in flight.
        """
        self.running = False
        loops, self._loops = self._loops, []
        return within(gatherResults(loops), SLOW + 5,
                      "the push loops to finish")

    @property
    def calls(self):
        return sum(n for (_, outcome), n in self.outcomes.items()
                   if outcome == "ok")

    def _next_batch(self):
        n = len(self.players)
        first = next(self._cursor) * self.batch % n
        return [self.players[(first + i) % n]
                for i in range(min(self.batch, n))]

    async def _loop(self, name, url):
        headers = {b"Authorization": [b"Bearer " + API_KEY.encode()],
                   b"Content-Type": [b"application/json"]}
        while self.running:
            players = self._next_batch()
            body = json.dumps({"players": players, "route": "proof",
                               "data": {"via": name}}).encode()
            try:
                d = treq.post(url + "/v1/push", data=body, headers=headers,
                              pool=self.pool)
                d.addTimeout(SLOW, reactor)
                response = await d
                raw = await treq.content(response).addTimeout(SLOW, reactor)
            except ConnectionRefusedError:
                # That gate has stopped: nothing was sent; go on without it.
                self.outcomes[name, "refused"] += 1
                return
            except Exception:
                self.outcomes[name, "uncertain"] += 1
                self.uncertain.update(players)
                continue
            if response.code == 503:
                self.outcomes[name, "unavailable"] += 1
            elif response.code != 200:
                self.outcomes[name, "uncertain"] += 1
                self.uncertain.update(players)
            else:
                answer = json.loads(raw)
                if answer["unknown"] or answer["dropped"] \
                        or answer["delivered"] + answer["queued"] \
                        != len(players):
                    self.outcomes[name, "bad_answer"] += 1
                    self.bad.append(answer)
                    self.uncertain.update(players)
                else:
                    self.outcomes[name, "ok"] += 1
                    self.acked.update(players)
                    self.answers["delivered"] += answer["delivered"]
                    self.answers["queued"] += answer["queued"]
            await deferLater(reactor, self.interval, lambda: None)


class Requester:
    """
    Requests (C{echo}) from C{clients}, each sending the next one
    C{interval} seconds after the last was answered, until L{stop}: a
    client moving between gates must answer every request, with the
    reply, C{busy} (sent on the old connection once the gate said
    C{reconnect}), C{connection_lost} (the old connection closed under
    it) or C{not_connected} (between connections); never leave it
    hanging.

    @ivar outcomes: C{ok} or the error code -> requests.
    """

    #: What a request may end with while its client moves.
    EXPECTED = frozenset({"ok", "busy", "connection_lost", "not_connected"})

    def __init__(self, clients, interval=0.25):
        self.clients = clients
        self.interval = interval
        self.outcomes = Counter()
        self.wrong = []
        self.running = False
        self._loops = []

    def start(self):
        self.running = True
        self._loops = [ensureDeferred(self._loop(c)) for c in self.clients]

    def stop(self):
        self.running = False
        loops, self._loops = self._loops, []
        return within(gatherResults(loops), SLOW + 5,
                      "the request loops to finish")

    async def _loop(self, client):
        n = 0
        while self.running:
            n += 1
            data = f"{client.name}-{n}"
            try:
                answer = await within(client.request("echo", data), SLOW,
                                      f"{client.name}'s request {n}")
            except GateError as e:
                self.outcomes[e.code] += 1
            else:
                self.outcomes["ok"] += 1
                if answer != data:
                    self.wrong.append((client.name, data, answer))
            await deferLater(reactor, self.interval, lambda: None)


async def last_seqs(test, gate, names, concurrency=20):
    """
    C{GET /v1/players/{id}} of each of C{names} on C{gate}: name -> record.
    """
    api = HTTP(test, gate)
    records = {}
    queue = iter(names)

    async def worker():
        for name in queue:
            records[name] = await api.player(name)

    await gatherResults([ensureDeferred(worker())
                         for _ in range(concurrency)])
    return records


def check_runs(clients, records, pusher):
    """
    What the proofs require of every client, as a list of problems (empty
    when all is well): handed exactly C{1..last_seq} of the store, once
    each, no gap notice, never a push out of order or twice on one
    connection; and C{last_seq} no lower than what the push API
    acknowledged nor higher than that plus the uncertain calls.
    """
    problems = []
    for client in clients:
        name = client.name
        last = records[name]["last_seq"]
        low = pusher.acked[name]
        high = low + pusher.uncertain[name]
        if not low <= last <= high:
            problems.append(f"{name}: the store numbered {last} pushes, the "
                            f"API acknowledged {low} (+{high - low} "
                            f"uncertain)")
        if client.seqs != list(range(1, last + 1)):
            seen = Counter(client.seqs)
            missing = sorted(set(range(1, last + 1)) - set(seen))
            twice = sorted(s for s, n in seen.items() if n > 1)
            problems.append(f"{name}: handed {len(client.seqs)} pushes for "
                            f"1..{last}; missing {missing[:10]}, twice "
                            f"{twice[:10]}, in order "
                            f"{client.seqs == sorted(client.seqs)}")
        if client.gaps:
            problems.append(f"{name}: gap notices {client.gaps}")
        if client.wire_disorder:
            problems.append(f"{name}: {client.wire_disorder} pushes written "
                            f"again or out of order on one connection")
    return problems


def spread(values):
    """
    C{(min, p50, p90, max)} of C{values} (seconds), or C{None}s.
    """
    values = sorted(values)
    if not values:
        return (None,) * 4

    def at(q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return values[0], at(0.5), at(0.9), values[-1]
