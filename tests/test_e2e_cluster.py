"""
End-to-end tests of gates sharing Redis when things go wrong: Redis going
away from one gate (played by a proxy the test cuts, never by stopping the
machine's Redis) and a gate killed with SIGKILL (a child C{twistd mmogate}
process). Real sockets, real Redis; skipped without Redis unless
C{MMOGATE_REQUIRE_SERVICES=1}.

What is checked is what C{docs/cluster.md} promises during and after an
outage.
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from backend.reference import ReferenceBackend
from gate.client.address import parse_address
from tests.e2e import (API_KEY, AUTH_SECRET, HTTP, LOOPBACK, Addresses,
                       connect_tcp, events_of, until)
from tests.proof import (SLOW, Describe, ProofClient, Pusher, address_of,
                         check_runs, connect_all, last_seqs, spread, stuck)
from tests.services import TCPProxy, redis_prefix, require_redis, REDIS_URL
from tests.test_cluster import cluster_gate, reachable
from tests.test_e2e_shutdown import (CHECKOUT, EXIT_TIMEOUT, START_TIMEOUT,
                                     TrackingSite, TwistdProcess, free_ports)

#: Players on the gate the SIGKILL proof kills.
KILLED_PLAYERS = 200
#: Many connections from 127.0.0.1 at once.
OPEN_LIMITS = {"connect_rate": 1e6, "connect_burst": 100000,
               "max_per_ip": 100000}


class OutageTests(TestCase):
    """
    Gate A reaches Redis through a proxy; gate B directly.
    """

    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)

    async def gates(self, **sections):
        self.proxy = await TCPProxy().start(self)
        a = cluster_gate(self, "A", self.prefix, url=self.proxy.url,
                         **sections)
        b = cluster_gate(self, "B", self.prefix, **sections)
        await reachable(a, b)
        return a, b

    async def cut(self, gate):
        self.proxy.cut()
        await until(lambda: not gate.store.reachable,
                    "the gate to notice Redis is gone")

    async def restore(self, gate):
        self.proxy.restore()
        await until(lambda: gate.store.reachable,
                    "the gate to reach Redis again")

    async def test_during_and_after(self):
        a, b = await self.gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        api_a, api_b = HTTP(self, a), HTTP(self, b)
        await self.cut(a)
        # Not ready, and says why.
        code, _, raw = await HTTP(self, a, "metrics").get("/ready")
        self.assertEqual((code, raw), (503, b"not ready: store unreachable\n"))
        # Its sessions keep being served.
        answer = await alice.request({"t": "req", "route": "echo",
                                      "data": {"still": 1}})
        self.assertEqual((answer["t"], answer["data"]), ("resp", {"still": 1}))
        # What needs the store is refused, clearly.
        for path, body in (("/v1/push", {"players": ["alice"], "route": "r"}),
                           ("/v1/broadcast", {"route": "r"}),
                           ("/v1/kick", {"player_id": "bob"})):
            code, answer, _ = await api_a.post(path, body)
            self.assertEqual((code, answer["error"]["code"]),
                             (503, "unavailable"), path)
        code, _, _ = await api_a.get("/v1/players/alice")
        self.assertEqual(code, 503)
        carol = await connect_tcp(self, a)
        answer = await carol.request({"t": "login", "data": {"name": "carol"}})
        self.assertEqual((answer["t"], answer["code"], answer["msg"]),
                         ("err", "internal", "the shared player store is "
                          "unreachable; try again shortly"))
        # A push from B while A does not listen is kept, not delivered.
        self.assertEqual((await api_b.push(["alice"], "n", 1))["queued"], 1)
        self.assertEqual((await api_b.push(["alice"], "n", 2))["queued"], 1)
        await self.restore(a)
        code, _, _ = await HTTP(self, a, "metrics").get("/ready")
        self.assertEqual(code, 200)
        # Alice gets what she missed, in order, then live pushes.
        first = await alice.expect(lambda m: m["t"] == "push")
        second = await alice.next()
        self.assertEqual([(first["seq"], first["data"]),
                          (second["seq"], second["data"])], [(1, 1), (2, 2)])
        self.assertEqual((await api_b.push(["alice"], "n", 3))["delivered"], 1)
        third = await alice.next()
        self.assertEqual((third["seq"], third["data"]), (3, 3))
        answer = await carol.request({"t": "login", "data": {"name": "carol"}})
        self.assertEqual(answer["t"], "resp")

    async def test_claimed_elsewhere_meanwhile(self):
        """
        A player that logs in on B while A cannot hear of it: when A is
        back, its session is kicked C{replaced}, without an C{offline}.
        """
        a, b = await self.gates()
        on_a = await connect_tcp(self, a)
        await on_a.login("alice")
        await self.cut(a)
        on_b = await connect_tcp(self, b)
        await on_b.login("alice")
        await self.restore(a)
        kick = await on_a.expect(lambda m: m["t"] == "kick")
        self.assertEqual(kick["reason"], "replaced")
        await on_a.wait_lost()
        self.assertNotIn("offline",
                         [e["event"] for e in events_of(a, "alice")])
        record = await HTTP(self, a).player("alice")
        self.assertEqual((record["gate_id"], record["online"]), ("B", True))
        self.assertEqual((await HTTP(self, a).push(["alice"], "n", 1))[
            "delivered"], 1)
        push = await on_b.expect(lambda m: m["t"] == "push")
        self.assertEqual(push["seq"], 1)

    async def test_release_and_expiry_done_when_back(self):
        """
        A session that closed and a player that expired while Redis was
        away are released and expired once it is back (and the backend is
        told C{expired}).
        """
        a, b = await self.gates(player={"idle_timeout": 0.5})
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        await self.cut(a)
        await alice.close()
        await until(lambda: a.players.get("alice") is None,
                    "A's idle timer for alice to run out")
        self.assertEqual(len(a.cluster.expiries), 1)
        # B still sees her online on A, whose heartbeat has not lapsed.
        await self.restore(a)
        await until(lambda: [e["event"] for e in events_of(a, "alice")]
                    == ["online", "offline", "expired"],
                    "A to expire alice once Redis is back")
        code, _, _ = await HTTP(self, b).get("/v1/players/alice")
        self.assertEqual(code, 404)
        self.assertEqual((a.cluster.releases, a.cluster.expiries),
                         (set(), {}))


def config_toml(ports, backend_url, prefix, extra=""):
    tcp, ws, api, metrics = ports
    return f"""
[gate]
id = "K"

[listen]
tcp = "tcp:{tcp}:interface=127.0.0.1"
ws = "tcp:{ws}:interface=127.0.0.1"
api = "tcp:{api}:interface=127.0.0.1"
metrics = "tcp:{metrics}:interface=127.0.0.1"

[backend]
url = "{backend_url}"
register_interval = 0.0

[api]
key = "{API_KEY}"

[auth]
secret = "{AUTH_SECRET}"

[store]
kind = "redis"
redis_url = "{REDIS_URL}"
redis_prefix = "{prefix}"
gate_ttl = 1.5
retry_max = 0.2
""" + extra


class KilledGateTests(TestCase):
    """
    A child gate on Redis killed with SIGKILL: its players' pushes are
    kept, and they resume on another gate with their mailboxes.
    """

    log = Logger()

    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)

    async def start_backend(self):
        backend = ReferenceBackend(reactor, api_key=API_KEY)
        site = TrackingSite(backend.resource())
        port = await serverFromString(reactor, LOOPBACK).listen(site)

        async def stop():
            await port.stopListening()
            await backend.close()
            await until(lambda: not site.connections,
                        "the child gate's backend connections to close")

        self.addCleanup(stop)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def spawn_gate(self, backend_url, extra=""):
        ports = free_ports(4)
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(config_toml(ports, backend_url, self.prefix, extra))
        process = TwistdProcess()
        reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-c",
             "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "mmogate", "--config", path],
            env=dict(os.environ, PYTHONUNBUFFERED="1"), path=CHECKOUT)
        self.addCleanup(process.kill)
        child = Addresses(tcp=ports[0], ws=ports[1], api=ports[2],
                          metrics=ports[3])
        metrics = HTTP(self, child, "metrics")

        async def ready():
            if not process.running:
                self.fail("the child gate exited:\n"
                          + process.output.decode("utf-8", "replace"))
            try:
                code, _, _ = await metrics.get("/ready")
            except Exception:
                return False
            return code == 200

        await until(ready, "the child gate to be ready",
                    timeout=START_TIMEOUT, interval=0.05)
        return process, child

    async def test_sigkill(self):
        backend_url = await self.start_backend()
        process, child = await self.spawn_gate(backend_url)
        b = cluster_gate(self, "B", self.prefix)
        await reachable(b)
        api_b = HTTP(self, b)
        players = ["p0", "p1", "p2"]
        clients = {}
        for name in players:
            client = await connect_tcp(self, child)
            clients[name] = (client, await client.login(name))
        self.assertEqual((await api_b.push(players, "n", 1))["delivered"], 3)
        for client, _ in clients.values():
            push = await client.expect(lambda m: m["t"] == "push")
            self.assertEqual(push["seq"], 1)
        process.transport.signalProcess("KILL")
        await process.wait_ended(EXIT_TIMEOUT)
        for client, _ in clients.values():
            await client.wait_lost()
        # Kept for them: the dead gate does not listen any more.
        self.assertEqual(await api_b.push(players, "n", 2),
                         {"delivered": 0, "queued": 3, "dropped": 0,
                          "unknown": []})
        self.assertEqual((await api_b.push(players, "n", 3))["queued"], 3)
        # They resume on B, with the token from the dead gate.
        for name in players:
            _, login = clients[name]
            client = await connect_tcp(self, b)
            answer = await client.request({
                "t": "resume", "player_id": name,
                "resume_token": login["resume_token"], "last_seq": 1})
            self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 3))
            got = [await client.next(), await client.next()]
            self.assertEqual([(m["seq"], m["data"]) for m in got],
                             [(2, 2), (3, 3)])
            record = await api_b.player(name)
            self.assertEqual((record["gate_id"], record["online"]),
                             ("B", True))

    async def test_players_resume_elsewhere(self):
        """
        The SIGKILL proof of issue 4: many players on the child gate (TCP
        and WebSocket), persistent pushes flowing through B's push API the
        whole time; the child is killed. Each player's L{GateClient},
        given both gates' addresses, fails to reach the dead one, moves on
        to B and resumes there; every push the API acknowledged
        (C{delivered} or C{queued}) is handed to it exactly once and in
        order, those answered C{queued} while it was between gates too.
        """
        backend_url = await self.start_backend()
        process, child = await self.spawn_gate(
            backend_url, "\n[limits]\nconnect_rate = 1000000.0\n"
            "connect_burst = 100000\nmax_per_ip = 100000\n")
        b = cluster_gate(self, "B", self.prefix, limits=OPEN_LIMITS)
        await reachable(b)
        names = [f"k{i}" for i in range(KILLED_PLAYERS)]

        def make(name):
            transport = "ws" if int(name[1:]) % 5 == 4 else "tcp"
            client = ProofClient([address_of(child, transport),
                                  address_of(b, transport)], name,
                                 max_backoff=1.0)
            client.b_address = parse_address(address_of(b, transport))
            return client

        clients = await connect_all(self, make, names)
        pusher = Pusher(self, {"B": HTTP(self, b).base}, names, batch=50,
                        interval=0.02)
        pusher.start()
        await until(lambda: pusher.calls >= 10, "pushes to flow", SLOW)
        self.assertEqual(pusher.answers["queued"], 0)
        killed_at = reactor.seconds()
        process.transport.signalProcess("KILL")
        await process.wait_ended(EXIT_TIMEOUT)

        def resumed():
            return all(c.first("resumed", killed_at) is not None
                       for c in clients)

        await until(resumed, Describe(lambda: "every player to resume on B: "
                                      + stuck(clients, "resumed",
                                              killed_at)), SLOW)
        recovered = max(c.first("resumed", killed_at) for c in clients)
        calls = pusher.calls
        await until(lambda: pusher.calls >= calls + 10,
                    "pushes after the players resumed", SLOW)
        await pusher.stop()

        records = await last_seqs(self, b, names)

        def handed_all():
            return all(len(c.seqs) >= records[c.name]["last_seq"]
                       for c in clients)

        await until(handed_all, "every client to be handed its pushes", SLOW)
        self.assertEqual(check_runs(clients, records, pusher), [])
        self.assertEqual(pusher.bad, [])
        # Some pushes found the players between gates, and were kept.
        self.assertGreater(pusher.answers["queued"], 0)
        for client in clients:
            self.assertTrue(client.connected, client.name)
            self.assertEqual(client.address, client.b_address, client.name)
            self.assertEqual(client.states.count("logged_in"), 1,
                             client.name)
            self.assertNotIn("resume_failed", client.states, client.name)
            self.assertEqual(records[client.name]["gate_id"], "B")
        self.log.info(
            "SIGKILL proof: {n} players resumed on B within {took:.2f} s "
            "of the kill (each: min/p50/p90/max {each}); {calls} push "
            "calls ({delivered} delivered, {queued} queued)",
            n=len(clients), took=recovered - killed_at,
            each="/".join(f"{v:.2f}" for v in spread(
                [c.first("resumed", killed_at) - killed_at
                 for c in clients])),
            calls=pusher.calls, delivered=pusher.answers["delivered"],
            queued=pusher.answers["queued"])

