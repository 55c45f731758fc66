"""
End to end with PostgreSQL (C{store.postgres_dsn}): persistent pushes
outlive the gate that queued them, the audit log records a real session's
life, and a gate whose PostgreSQL goes away answers pushes it cannot store
with 503, says so in C{/ready}, and recovers when the server returns.

Real gates on 127.0.0.1, a real PostgreSQL with a schema per test; the
outage is played by a proxy the test cuts (L{tests.services.TCPProxy}).
"""

from twisted.trial.unittest import TestCase

from tests.e2e import HTTP, connect_tcp, start_gate, stop_gate, until
from tests.services import redis_prefix, require_redis
from tests.test_postgres_store import postgres_proxy, postgres_schema, sql


async def start_durable_gate(test, dsn, gate_id, **sections):
    """
    A gate on C{dsn}, once its schema is in place.
    """
    sections.setdefault("store", {})["postgres_dsn"] = dsn
    gate = start_gate(test, gate={"id": gate_id}, **sections)
    await until(lambda: gate.postgres.reachable,
                f"{gate_id} to reach PostgreSQL")
    return gate


async def offline(test, gate, api, name):
    """
    Log C{name} in and out; return the login C{resp}.
    """
    client = await connect_tcp(test, gate)
    login = await client.login(name)
    await client.close()
    await api.wait_offline(name)
    return login


class DurableMailboxTests(TestCase):
    async def test_survives_a_restart(self):
        """
        Pushes queued on one gate are delivered by a new gate started on
        the same database after the first stopped: a fresh login learns
        the last seq, a resume from 0 gets every push, in order, once.
        """
        dsn, _ = postgres_schema(self)
        first = await start_durable_gate(self, dsn, "durable-1")
        api = HTTP(self, first)
        await offline(self, first, api, "alice")
        for i in range(3):
            self.assertEqual(await api.push(["alice"], "news", {"n": i}),
                             {"delivered": 0, "queued": 1, "dropped": 0,
                              "unknown": []})
        self.assertEqual((await api.player("alice"))["mailbox"], 3)
        await stop_gate(first)

        second = await start_durable_gate(self, dsn, "durable-2")
        api = HTTP(self, second)
        client = await connect_tcp(self, second)
        login = await client.login("alice")
        self.assertEqual(login["last_seq"], 3)
        answer = await client.request({"t": "resume", "player_id": "alice",
                                       "resume_token": login["resume_token"],
                                       "last_seq": 0})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 3))
        for i in range(3):
            push = await client.next()
            self.assertEqual((push["t"], push["seq"], push["route"],
                              push["data"]), ("push", i + 1, "news", {"n": i}))
        # Numbering goes on; an ack trims the durable mailbox.
        self.assertEqual(await api.push(["alice"], "news", {"n": 3}),
                         {"delivered": 1, "queued": 0, "dropped": 0,
                          "unknown": []})
        self.assertEqual((await client.next())["seq"], 4)
        client.send({"t": "ack", "seq": 4})

        async def trimmed():
            return (await api.player("alice"))["mailbox"] == 0

        await until(trimmed, "the ack to trim the mailbox")
        client.send({"t": "ping", "ts": 1})
        self.assertEqual(await client.next(), {"t": "pong", "ts": 1})


class AuditTests(TestCase):
    async def test_session_life(self):
        """
        connect, login, kick, disconnect and expiry rows, with gate, peer
        and reason, in PostgreSQL and through GET /v1/history.
        """
        dsn, _ = postgres_schema(self)
        gate = await start_durable_gate(self, dsn, "audit-gate",
                                        player={"idle_timeout": 0.3})
        api = HTTP(self, gate)
        client = await connect_tcp(self, gate)
        await client.login("bob")
        local = client.transport.getHost()
        peer = f"{local.host}:{local.port}"
        code, _, raw = await api.post("/v1/kick", {"player_id": "bob",
                                                   "reason": "testing"})
        self.assertEqual(code, 200, raw)
        await client.wait_lost()

        async def expired():
            code, answer, _ = await api.get("/v1/history?player_id=bob")
            return answer["events"] if code == 200 and answer["events"] \
                and answer["events"][0]["event"] == "expiry" else None

        found = await until(expired, "bob's expiry in the audit log")
        self.assertEqual([(e["event"], e["reason"]) for e in found],
                         [("expiry", "idle_timeout"), ("disconnect", None),
                          ("kick", "admin"), ("login", None)])
        self.assertEqual({e["gate_id"] for e in found}, {"audit-gate"})
        session_id = found[1]["session_id"]
        self.assertEqual(found[1]["peer"], peer)
        code, answer, _ = await api.get(f"/v1/history?session_id="
                                        f"{session_id}")
        self.assertEqual([e["event"] for e in answer["events"]],
                         ["disconnect", "kick", "login", "connect"])
        self.assertEqual(answer["events"][-1]["peer"], peer)
        # Written for good, not only answered from memory.
        rows = await sql(dsn, "SELECT event, gate_id, peer, reason FROM"
                              " mmogate_audit WHERE session_id = %s"
                              " ORDER BY id", (session_id,))
        self.assertEqual(rows, [
            ("connect", "audit-gate", peer, None),
            ("login", "audit-gate", peer, None),
            ("kick", "audit-gate", peer, "admin"),
            ("disconnect", "audit-gate", peer, None)])
        # The expiry dropped the durable mailbox with the player.
        self.assertEqual(await sql(dsn, "SELECT count(*) FROM"
                                        " mmogate_mailbox_state"), [(0,)])


class OutageTests(TestCase):
    async def test_postgres_goes_away_and_returns(self):
        """
        With its PostgreSQL gone, a gate answers persistent pushes 503
        (never "queued"), is not ready, still serves transient pushes and
        its sessions; when the server is back it recovers by itself, and
        nothing claimed was lost.
        """
        dsn, _ = postgres_schema(self)
        proxy, proxied = await postgres_proxy(self, dsn)
        gate = await start_durable_gate(self, proxied, "outage-gate",
                                        store={"retry_max": 0.2})
        api = HTTP(self, gate)
        metrics = HTTP(self, gate, "metrics")
        login = await offline(self, gate, api, "carol")
        watcher = await connect_tcp(self, gate)
        await watcher.login("dave")
        self.assertEqual((await api.push(["carol"], "r", "kept-1"))["queued"],
                         1)

        proxy.cut()
        code, answer, raw = await api.post("/v1/push", {
            "players": ["carol", "dave"], "route": "r", "data": "lost"})
        self.assertEqual((code, answer["error"]["code"]),
                         (503, "unavailable"), raw)
        self.assertIn("PostgreSQL", answer["error"]["msg"])
        code, _, raw = await metrics.get("/ready")
        self.assertEqual(code, 503)
        self.assertIn(b"PostgreSQL unreachable", raw)
        # Transient pushes and the sessions go on.
        self.assertEqual(await api.push(["carol", "dave"], "r", "blip",
                                        persist=False),
                         {"delivered": 1, "queued": 0, "dropped": 1,
                          "unknown": []})
        self.assertEqual((await watcher.next())["data"], "blip")
        answer = await watcher.request({"t": "req", "route": "echo",
                                        "data": 1})
        self.assertEqual(answer["data"], 1)
        # A bind reads the mailbox's last seq: it is answered err.
        late = await connect_tcp(self, gate)
        answer = await late.request({"t": "login", "data": {"name": "erin"}})
        self.assertEqual((answer["t"], answer["code"]), ("err", "internal"))
        self.assertIn("PostgreSQL unavailable", answer["msg"])

        proxy.restore()

        async def ready():
            code, _, _ = await metrics.get("/ready")
            return code == 200

        await until(ready, "the gate to be ready again", timeout=10.0)
        self.assertEqual((await api.push(["carol"], "r", "kept-2"))["queued"],
                         1)
        client = await connect_tcp(self, gate)
        answer = await client.request({"t": "resume", "player_id": "carol",
                                       "resume_token": login["resume_token"],
                                       "last_seq": 0})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 2))
        pushes = [await client.next(), await client.next()]
        self.assertEqual([(p["seq"], p["data"]) for p in pushes],
                         [(1, "kept-1"), (2, "kept-2")])
        # Expected refusals, logged without tracebacks.
        self.assertEqual(self.flushLoggedErrors(), [])


class RedisStoreTests(TestCase):
    async def test_audit_with_redis(self):
        """
        With store.kind = redis the Redis store numbers and routes pushes
        (docs/cluster.md) and PostgreSQL keeps their durable copy (more in
        tests/test_e2e_durable_cluster.py) and the audit log.
        """
        require_redis()
        prefix = redis_prefix(self)
        dsn, _ = postgres_schema(self)
        gate = await start_durable_gate(
            self, dsn, "redis-gate",
            store={"kind": "redis", "redis_prefix": prefix})
        self.assertIs(gate.players.mailboxes, gate.store)
        self.assertIs(gate.store.durable, gate.postgres.mailboxes)
        api = HTTP(self, gate)
        client = await connect_tcp(self, gate)
        await client.login("frank")
        self.assertEqual((await api.push(["frank"], "r", 1))["delivered"], 1)
        await client.close()
        code, answer, _ = await api.get("/v1/history?player_id=frank")
        self.assertEqual([e["event"] for e in answer["events"]],
                         ["disconnect", "login"])
        rows = await sql(dsn, "SELECT count(*) FROM mmogate_audit"
                              " WHERE player_id = 'frank'")
        self.assertEqual(rows, [(2,)])
        rows = await sql(dsn, "SELECT seq, data FROM mmogate_mailbox"
                              " WHERE player_id = 'frank'")
        self.assertEqual(rows, [(1, "1")])
