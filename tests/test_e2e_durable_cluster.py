"""
End to end: gates on Redis (C{store.kind = redis}) with PostgreSQL
(C{store.postgres_dsn}) keep every persistent push through the loss of
Redis's data, whether every gate stopped with it or kept running.

Real gates on 127.0.0.1, the machine's Redis (a key prefix per test) and
PostgreSQL (a schema per test). "Redis restarted without persistence" is
played by deleting every key of the test's prefix; PostgreSQL going away by
a proxy the test cuts. What is checked is what C{docs/persistence.md}
promises for this mode.
"""

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from gate.client import GateClient
from tests.e2e import HTTP, TIMEOUT, connect_tcp, stop_gate, until, within
from tests.services import (delete_keys, redis_command, redis_keys,
                            redis_prefix, require_redis)
from tests.test_cluster import cluster_gate, reachable
from tests.test_postgres_store import (postgres_proxy, postgres_schema,
                                       settled, sql)


def pushes(messages):
    return [(m["seq"], m["data"]) for m in messages]


async def replay(client, count):
    """
    The next C{count} envelopes, which must be pushes, then a ping answered
    at once: nothing else (no duplicate) came in between.
    """
    got = [await client.next() for _ in range(count)]
    client.send({"t": "ping", "ts": 99})
    barrier = await client.next()
    if barrier != {"t": "pong", "ts": 99} or any(m["t"] != "push"
                                                 for m in got):
        raise AssertionError(f"expected {count} pushes then pong, got "
                             f"{got + [barrier]!r}")
    return got


class DurableClusterCase(TestCase):
    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)
        self.dsn, _ = postgres_schema(self)

    def gate(self, gate_id, dsn=None, **sections):
        store = sections.pop("store", {})
        store.setdefault("postgres_dsn", dsn or self.dsn)
        return cluster_gate(self, gate_id, self.prefix, store=store,
                            **sections)

    async def started(self, *gates):
        await reachable(*gates)
        for gate in gates:
            await until(lambda: gate.postgres.reachable,
                        f"{gate.gate_id} to reach PostgreSQL")

    async def offline(self, gate, name):
        """
        Log C{name} in on C{gate} and out again; return the login C{resp}.
        """
        client = await connect_tcp(self, gate)
        login = await client.login(name)
        await client.close()
        await HTTP(self, gate).wait_offline(name)
        return login

    async def flush_redis(self):
        await delete_keys(self.prefix)
        self.assertEqual(await redis_keys(self.prefix), [])

    async def acked_in_postgres(self, player_id, seq):
        async def mirrored():
            rows = await sql(self.dsn, "SELECT acked FROM"
                                       " mmogate_mailbox_state WHERE"
                                       " player_id = %s", (player_id,))
            return rows == [(seq,)]
        await until(mirrored, f"{player_id}'s ack of {seq} in PostgreSQL")


class RestartTests(DurableClusterCase):
    async def test_every_gate_and_redis_restart(self):
        """
        Pushes queued through two gates survive both gates stopping and
        Redis losing every key: a new gate delivers each once, in order,
        with the same seqs (old resume tokens still work: the incarnation
        is kept too), numbering goes on, and acked pushes stay acked.
        """
        a, b = self.gate("A"), self.gate("B")
        await self.started(a, b)
        api_a, api_b = HTTP(self, a), HTTP(self, b)
        alice = await self.offline(a, "alice")
        await self.offline(b, "carol")
        await self.offline(a, "erin")
        bob = await connect_tcp(self, b)
        bob_login = await bob.login("bob")
        for i in range(4):
            api = (api_a, api_b)[i % 2]
            self.assertEqual(await api.push(["alice", "carol", "bob"], "news",
                                            {"n": i}),
                             {"delivered": 1, "queued": 2, "dropped": 0,
                              "unknown": []})
        self.assertEqual((await api_b.push(["erin"], "mail", "e1"))["queued"],
                         1)
        self.assertEqual([m["seq"] for m in await replay(bob, 4)],
                         [1, 2, 3, 4])
        bob.send({"t": "ack", "seq": 2})
        await self.acked_in_postgres("bob", 2)
        await bob.close()
        await stop_gate(a)
        await stop_gate(b)
        await self.flush_redis()

        c = self.gate("C")
        await self.started(c)
        api_c = HTTP(self, c)
        # Known only to PostgreSQL: a push puts erin back and is queued.
        self.assertEqual(await api_c.push(["erin", "ghost"], "mail", "e2"),
                         {"delivered": 0, "queued": 1, "dropped": 0,
                          "unknown": ["ghost"]})
        # An old token resumes: the whole durable mailbox, same seqs.
        client = await connect_tcp(self, c)
        answer = await client.request({
            "t": "resume", "player_id": "alice", "last_seq": 0,
            "resume_token": alice["resume_token"]})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 4))
        self.assertEqual(pushes(await replay(client, 4)),
                         [(i + 1, {"n": i}) for i in range(4)])
        # A fresh login learns the last seq; a resume from 0 replays.
        carol = await connect_tcp(self, c)
        login = await carol.login("carol")
        self.assertEqual(login["last_seq"], 4)
        answer = await carol.request({
            "t": "resume", "player_id": "carol", "last_seq": 0,
            "resume_token": login["resume_token"]})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 4))
        self.assertEqual(pushes(await replay(carol, 4)),
                         [(i + 1, {"n": i}) for i in range(4)])
        # What bob acked before the loss stays acked.
        bob = await connect_tcp(self, c)
        answer = await bob.request({
            "t": "resume", "player_id": "bob", "last_seq": 0,
            "resume_token": bob_login["resume_token"]})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 4))
        self.assertEqual(pushes(await replay(bob, 2)),
                         [(3, {"n": 2}), (4, {"n": 3})])
        erin = await connect_tcp(self, c)
        login = await erin.login("erin")
        self.assertEqual(login["last_seq"], 2)
        # Numbering goes on from where it was.
        self.assertEqual(await api_c.push(["alice", "carol", "bob"], "news",
                                          "next"),
                         {"delivered": 3, "queued": 0, "dropped": 0,
                          "unknown": []})
        for who in (client, carol, bob):
            push = await who.next()
            self.assertEqual((push["seq"], push["data"]), (5, "next"))
        rows = await sql(self.dsn, "SELECT player_id, last_seq FROM"
                                   " mmogate_mailbox_state ORDER BY 1")
        self.assertEqual(rows, [("alice", 5), ("bob", 5), ("carol", 5),
                                ("erin", 2)])

    async def test_postgres_away(self):
        """
        Without PostgreSQL a persistent push cannot be made durable: 503
        (it may have been placed in Redis: at least once), and the gate is
        not ready; transient pushes and sessions go on. The audit log still
        goes to PostgreSQL when it is there.
        """
        proxy, proxied = await postgres_proxy(self, self.dsn)
        a = self.gate("A", dsn=proxied)
        await self.started(a)
        api = HTTP(self, a)
        frank = await connect_tcp(self, a)
        await frank.login("frank")
        self.assertEqual((await api.push(["frank"], "r", 1))["delivered"], 1)
        self.assertEqual((await frank.next())["seq"], 1)
        code, answer, _ = await api.get("/v1/history?player_id=frank")
        self.assertEqual([e["event"] for e in answer["events"]], ["login"])
        proxy.cut()
        await settled(a.postgres.run(lambda c: c.execute("SELECT 1")))
        self.assertFalse(a.postgres.reachable)
        # Known to be away: refused before Redis takes it (a push whose
        # durable write fails after Redis took it is answered 503 too,
        # though delivered:
        # tests/test_redis_store.py DurableCopyTests).
        code, answer, raw = await api.post("/v1/push", {
            "players": ["frank"], "route": "r", "data": "refused"})
        self.assertEqual((code, answer["error"]["code"]),
                         (503, "unavailable"), raw)
        self.assertIn("PostgreSQL", answer["error"]["msg"])
        code, _, raw = await HTTP(self, a, "metrics").get("/ready")
        self.assertEqual(code, 503)
        self.assertIn(b"PostgreSQL unreachable", raw)
        self.assertEqual((await api.push(["frank"], "r", "blip",
                                         persist=False))["delivered"], 1)
        answer = await frank.request({"t": "req", "route": "echo",
                                      "data": 1})
        self.assertEqual(answer["data"], 1)
        proxy.restore()

        async def ready():
            code, _, _ = await HTTP(self, a, "metrics").get("/ready")
            return code == 200

        await until(ready, "the gate to be ready again", timeout=10.0)
        self.assertEqual((await api.push(["frank"], "r", 2))["delivered"], 1)
        self.assertEqual((await frank.next())["seq"], 2)
        self.assertEqual([(m.get("seq"), m["data"]) for m in frank.received
                          if m["t"] == "push"],
                         [(1, 1), (None, "blip"), (2, 2)])
        self.assertEqual(self.flushLoggedErrors(), [])


class FlushTests(DurableClusterCase):
    async def test_redis_flushed_while_running(self):
        """
        Redis loses every key while the gates run: a push to a player it
        lost is queued (put back from PostgreSQL), the gate of an online
        session takes the entry back and sends it what it missed, numbering
        goes on, an offline player's old token resumes its whole mailbox.
        """
        a, b = self.gate("A"), self.gate("B")
        await self.started(a, b)
        api_b = HTTP(self, b)
        alice = await self.offline(b, "alice")
        bob = await connect_tcp(self, a)
        await bob.login("bob")
        carol = await connect_tcp(self, b)
        await carol.login("carol")
        for i in range(2):
            self.assertEqual(await api_b.push(["alice", "bob"], "n", i),
                             {"delivered": 1, "queued": 1, "dropped": 0,
                              "unknown": []})
        self.assertEqual([m["seq"] for m in await replay(bob, 2)], [1, 2])
        bob.send({"t": "ack", "seq": 1})
        await self.acked_in_postgres("bob", 1)
        await self.flush_redis()

        self.assertEqual(await api_b.push(["alice", "bob", "ghost"], "n", 2),
                         {"delivered": 0, "queued": 2, "dropped": 0,
                          "unknown": ["ghost"]})
        # A's refresh (every player.idle_timeout / 4 at most a minute; run
        # here at once) takes bob's entry back and replays what he missed.
        await a.cluster.refresh()
        push = await bob.next()
        self.assertEqual((push["seq"], push["data"]), (3, 2))
        # carol had no persistent push: nothing durable, put back by B's
        # refresh from her session.
        await b.cluster.refresh()
        await a.cluster.heartbeat()
        await b.cluster.heartbeat()
        self.assertEqual(await api_b.push(["bob", "carol"], "n", 3),
                         {"delivered": 2, "queued": 0, "dropped": 0,
                          "unknown": []})
        self.assertEqual(pushes(await replay(bob, 1)), [(4, 3)])
        self.assertEqual(pushes(await replay(carol, 1)), [(1, 3)])
        self.assertEqual((await HTTP(self, a).player("bob"))["mailbox"], 3)
        client = await connect_tcp(self, a)
        answer = await client.request({
            "t": "resume", "player_id": "alice", "last_seq": 0,
            "resume_token": alice["resume_token"]})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 3))
        self.assertEqual(pushes(await replay(client, 3)),
                         [(1, 0), (2, 1), (3, 2)])
        self.assertEqual(await redis_command(
            "HGET", self.prefix + "p:alice", "g"), b"A")


class ClientLibraryTests(DurableClusterCase):
    async def test_client_resumes_through_a_redis_loss(self):
        """
        The Python client, whose connection drops while Redis loses its
        data, resumes by itself with its token and gets what was queued
        meanwhile, once each, in order: no fresh login.
        """
        a = self.gate("A")
        await self.started(a)
        api = HTTP(self, a)
        host, port = a.address("tcp")
        pushes, states = [], []
        client = GateClient(reactor, f"tcp://{host}:{port}",
                            login={"name": "alice"}, on_push=pushes.append,
                            on_state=lambda state, info: states.append(state),
                            max_backoff=0.5)
        self.addCleanup(lambda: within(client.close(), TIMEOUT,
                                       "the client to close"))
        await within(client.connect(), TIMEOUT, "alice to log in")
        for n in (1, 2):
            self.assertEqual((await api.push(["alice"], "n", n))["delivered"],
                             1)
        await until(lambda: len(pushes) == 2, "two live pushes")
        await self.acked_in_postgres("alice", 2)
        a.players.get("alice").session.connection.abort()
        await until(lambda: a.players.get("alice").session is None,
                    "the gate to see the drop")
        await self.flush_redis()
        for n in (3, 4):
            self.assertEqual((await api.push(["alice"], "n", n))["queued"],
                             1)
        await until(lambda: len(pushes) == 4, "the queued pushes")
        self.assertEqual([(p.seq, p.data) for p in pushes],
                         [(n, n) for n in range(1, 5)])
        self.assertEqual(states.count("logged_in"), 1)
        self.assertIn("resumed", states)
