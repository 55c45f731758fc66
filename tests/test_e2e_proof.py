"""
The drain proof of issue 4 (item 5): two gates on Redis, a thousand real
L{GateClient}s spread over them (TCP and WebSocket), persistent pushes
flowing to all of them through both gates' push APIs the whole time; gate
A is drained towards gate B. Every client ends on B, each was handed every
persistent push the store numbered for it exactly once and in order (and
that is what the push API acknowledged), and A stops once empty.

The SIGKILL proof is C{KilledGateTests.test_players_resume_elsewhere} in
C{tests/test_e2e_cluster.py}; C{python -m bench.drain} and
C{python -m bench.killgate} run both with the gates in processes of their
own and report the figures (C{docs/performance.md}, "Cluster proofs").

Real sockets, the machine's Redis (skipped without it unless
C{MMOGATE_REQUIRE_SERVICES=1}); the gates are in-process
L{gate.service.GateService}s with their reference backends, the clients
in the test's process too.
"""

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from gate.client.address import parse_address
from gate.cluster import StoreUnavailable
from tests.e2e import HTTP, connect_tcp, until
from tests.proof import (SLOW, Describe, LagMonitor, ProofClient, Pusher,
                         Requester, address_of, check_runs,
                         connect_all, last_seqs, spread, stuck)
from tests.services import redis_prefix, require_redis
from tests.test_cluster import cluster_gate, reachable

#: Clients: half on each gate; every fifth over WebSocket.
CLIENTS = 1000
#: drain.jitter of gate A: the reconnects are spread over it.
JITTER = 5.0
#: The drain's deadline: far above what the drain needs, so that A stopping
#: before it shows it stopped because it was empty.
DEADLINE = 120.0

#: A thousand connections from 127.0.0.1 at once.
OPEN_LIMITS = {"connect_rate": 1e6, "connect_burst": 100000,
               "max_per_ip": 100000}
#: Client listeners with room for the connections of a drain in their
#: accept queue (Twisted's default backlog of 50 drops SYNs when a busy
#: process accepts late, and each drop costs a client a 1 s, then 2 s,
#: retransmission).
LISTEN = {"tcp": "tcp:0:interface=127.0.0.1:backlog=1024",
          "ws": "tcp:0:interface=127.0.0.1:backlog=1024"}


class DrainProofTests(TestCase):
    log = Logger()

    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)

    async def test_drain_under_pushes(self):
        # The gates' heartbeats live 10 s (store.gate_ttl): a busy process
        # must not make B count A as dead meanwhile.
        store = {"gate_ttl": 10.0, "timeout": 5.0}
        lag = LagMonitor(self)
        a = cluster_gate(self, "A", self.prefix, store=store,
                         limits=OPEN_LIMITS, listen=LISTEN,
                         drain={"jitter": JITTER, "close_after": 30.0})
        b = cluster_gate(self, "B", self.prefix, store=store,
                         limits=OPEN_LIMITS, listen=LISTEN)
        await reachable(a, b)
        stopped_at = []
        stop_a = a.when_drained

        def drained():
            stopped_at.append((reactor.seconds(), len(a.sessions.sessions)))
            return stop_a()

        a.when_drained = drained

        names = [f"p{i}" for i in range(CLIENTS)]

        def make(name):
            i = int(name[1:])
            gate = a if i % 2 == 0 else b
            transport = "ws" if i % 5 == 4 else "tcp"
            client = ProofClient(address_of(gate, transport), name,
                                 max_backoff=1.0)
            client.transport = transport
            return client

        clients = await connect_all(self, make, names)
        on_a = [c for c in clients if c.address.port in
                (a.address("tcp")[1], a.address("ws")[1])]
        self.assertEqual(len(on_a), CLIENTS // 2)
        self.assertEqual(len(a.sessions.sessions), CLIENTS // 2)

        # About a push a second per player (pushes are not what is tested
        # here; a process holding both gates and every client has one core).
        pusher = Pusher(self, {"A": HTTP(self, a).base,
                               "B": HTTP(self, b).base}, names,
                        interval=0.1)
        pusher.start()
        # Some clients of A keep making requests through their move.
        requester = Requester(on_a[:20])
        requester.start()
        await until(lambda: pusher.calls >= 20, "pushes to flow", SLOW)

        b_tcp = "127.0.0.1:%d" % b.address("tcp")[1]
        b_ws = "ws://127.0.0.1:%d/ws" % b.address("ws")[1]
        a_calls_before = pusher.outcomes["A", "ok"]
        drain_at = reactor.seconds()
        code, answer, _ = await HTTP(self, a).post("/v1/drain", {
            "addr": b_tcp, "addrs": {"ws": b_ws}, "deadline": DEADLINE})
        self.assertEqual((code, answer), (200, {"draining": True}))

        def moved():
            return all(c.first("resumed", drain_at) is not None
                       for c in on_a)

        await until(moved, Describe(lambda: "every client of A to resume "
                                    "on B: " + stuck(on_a, "resumed",
                                                     drain_at)),
                    JITTER + SLOW)
        await until(lambda: a._stopping is not None and a._stopping.called,
                    "A to stop", SLOW)
        # Pushes go on through B alone for a moment, then stop.
        calls = pusher.calls
        await until(lambda: pusher.calls >= calls + 10,
                    "pushes after A stopped", SLOW)
        await pusher.stop()
        ok_before_stop = requester.outcomes["ok"]
        await until(lambda: requester.outcomes["ok"] >= ok_before_stop + 20,
                    "requests answered on B", SLOW)
        await requester.stop()

        # A stopped because it was empty, long before its deadline.
        (stop_time, left), = stopped_at
        self.assertEqual(left, 0)
        self.assertLess(stop_time - drain_at, DEADLINE / 2)
        # Every client is on B.
        b_addresses = {"tcp": parse_address(b_tcp),
                       "ws": parse_address(b_ws)}
        for client in clients:
            self.assertTrue(client.connected, client.name)
            if client in on_a:
                self.assertEqual(client.address,
                                 b_addresses[client.transport], client.name)
                self.assertNotIn("resume_failed", client.states, client.name)
                self.assertEqual(client.states.count("logged_in"), 1,
                                 client.name)
            self.assertEqual(client.kicks, [], client.name)
        self.assertEqual(len(b.sessions.sessions), CLIENTS)

        # Nothing lost, nothing twice: each client's run against the store
        # and the API's answers.
        records = await last_seqs(self, b, names)

        def handed_all():
            return all(len(c.seqs) >= records[c.name]["last_seq"]
                       for c in clients)

        await until(handed_all, "every client to be handed its pushes", SLOW)
        for record in records.values():
            self.assertEqual((record["gate_id"], record["online"]),
                             ("B", True))
        self.assertEqual(check_runs(clients, records, pusher), [])
        self.assertEqual(pusher.bad, [])
        # Every request was answered, or failed as a move may make it.
        self.assertEqual(requester.wrong, [])
        self.assertLessEqual(set(requester.outcomes), Requester.EXPECTED,
                             requester.outcomes)
        # Pushes flowed through A's API during the drain, not only before.
        self.assertGreater(pusher.outcomes["A", "ok"], a_calls_before)
        moves = [(c.first("migrating", drain_at), c.first("resumed",
                                                          drain_at))
                 for c in on_a]
        self.assertTrue(all(m is not None and m <= r for m, r in moves))
        self.log.info(
            "drain proof: {n} clients moved, {calls} push calls "
            "({delivered} delivered, {queued} queued, {uncertain} "
            "uncertain); A stopped {stop:.2f} s after the drain call; "
            "reconnect received (min/p50/p90/max) {told}; resumed on B "
            "{resumed}; each move took {took}; requests {requests}; "
            "states of the slowest "
            "{slowest}; pushes seen on both connections {overlap}; "
            "reactor late by up to {lag:.2f} s",
            n=len(on_a), calls=pusher.calls,
            delivered=pusher.answers["delivered"],
            queued=pusher.answers["queued"],
            uncertain=sum(n for (_, o), n in pusher.outcomes.items()
                          if o == "uncertain"),
            stop=stop_time - drain_at,
            told=_fmt(spread([m - drain_at for m, _ in moves])),
            resumed=_fmt(spread([r - drain_at for _, r in moves])),
            took=_fmt(spread([r - m for m, r in moves])),
            slowest=max(on_a, key=lambda c: c.first("resumed", drain_at)
                        - c.first("migrating", drain_at)).states,
            requests=dict(requester.outcomes),
            overlap=sum(c.overlap for c in clients), lag=lag.worst)


def _fmt(values):
    return "/".join("-" if v is None else f"{v:.2f}" for v in values)


class LeavingTests(TestCase):
    """
    Found by the drain proof: a push through the API of a gate that is
    leaving the cluster (stopping) was sent to Redis after the gate's last
    command, and its answer lost with the connection: answered 503 (which
    says nothing was sent) although Redis had numbered and stored it.
    """

    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)

    async def test_no_push_sent_while_leaving(self):
        a = cluster_gate(self, "A", self.prefix)
        b = cluster_gate(self, "B", self.prefix)
        await reachable(a, b)
        client = await connect_tcp(self, b)
        await client.login("alice")
        leaving = a.cluster.stop()
        self.assertTrue(a.store.reachable)  # still connected: it waits
        pushed = a.players.push(["alice"], "r", 1)
        failure = self.failureResultOf(pushed, StoreUnavailable)
        self.assertIn("stopping", failure.value.msg)
        broadcast = a.players.broadcast("r", 1)
        self.failureResultOf(broadcast, StoreUnavailable)
        await leaving
        self.assertEqual((await HTTP(self, b).player("alice"))["last_seq"], 0)
        client.assert_nothing_pending()
