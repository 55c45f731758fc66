"""
Tests for the session audit log: the bounded in-memory log
(L{gate.audit}), the events the session and player managers record, the
batched PostgreSQL log (L{mmogate_plugins.postgres.PostgresAuditLog}) and
C{GET /v1/history}.
"""

import jwt
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from gate.audit import EVENTS, MemoryAuditLog
from gate.interfaces import IAuditLog
from mmogate_plugins import postgres
from mmogate_plugins.postgres import StoreUnavailable
from tests.e2e import HTTP, connect_tcp, start_gate
from tests.fakes import AUTH_SECRET, GATE_ID, Stack
from tests.test_postgres_store import (postgres_proxy, postgres_schema,
                                       settled, sql, start_store)


def events(records):
    return [(r["event"], r["player_id"], r["reason"]) for r in records]


class MemoryAuditLogTests(SynchronousTestCase):
    def history(self, log, **query):
        return self.successResultOf(log.history(**query))

    def test_interface(self):
        self.assertTrue(verifyObject(IAuditLog, MemoryAuditLog()))

    def test_newest_first_and_filters(self):
        log = MemoryAuditLog()
        log.record("connect", None, "s1", "g", "1.2.3.4:5", None, 1.0)
        log.record("login", "alice", "s1", "g", "1.2.3.4:5", None, 2.0)
        log.record("connect", None, "s2", "g", "1.2.3.4:6", None, 3.0)
        log.record("login", "bob", "s2", "g", "1.2.3.4:6", None, 4.0)
        log.record("kick", "alice", "s1", "g", "1.2.3.4:5", "admin", 5.0)
        self.assertEqual(self.history(log)[0], {
            "event": "kick", "player_id": "alice", "session_id": "s1",
            "gate_id": "g", "peer": "1.2.3.4:5", "reason": "admin",
            "ts": 5.0})
        self.assertEqual([r["ts"] for r in self.history(log)],
                         [5.0, 4.0, 3.0, 2.0, 1.0])
        self.assertEqual([r["ts"] for r in self.history(log, limit=2)],
                         [5.0, 4.0])
        self.assertEqual(events(self.history(log, player_id="alice")),
                         [("kick", "alice", "admin"),
                          ("login", "alice", None)])
        self.assertEqual([r["ts"] for r in self.history(log,
                                                        session_id="s1")],
                         [5.0, 2.0, 1.0])
        self.assertEqual([r["ts"] for r in self.history(
            log, player_id="bob", session_id="s1")], [])
        self.assertEqual(self.history(log, player_id="nobody"), [])

    def test_bounded(self):
        """
        Only the last C{keep} events are kept.
        """
        log = MemoryAuditLog(keep=3)
        for i in range(10):
            log.record("connect", None, f"s{i}", "g", None, None, float(i))
        self.assertEqual(len(log), 3)
        self.assertEqual([r["session_id"] for r in self.history(log)],
                         ["s9", "s8", "s7"])


class HookTests(SynchronousTestCase):
    """
    What the session and player managers record, through a stack of the
    gate's objects.
    """

    def setUp(self):
        self.stack = Stack(player__idle_timeout=100.0)
        self.log = self.stack.sessions.audit
        self.stack.players.audit = self.log

    def history(self, **query):
        return self.successResultOf(self.log.history(**query))

    def test_defaults(self):
        """
        Without a service to wire them, each manager still has a log.
        """
        self.assertTrue(verifyObject(IAuditLog, Stack().sessions.audit))
        self.assertTrue(verifyObject(IAuditLog, Stack().players.audit))

    def test_a_life(self):
        stack = self.stack
        session, _ = stack.connect(peer="10.1.2.3:4567")
        stack.clock.advance(1)
        stack.login("alice", session)
        # Replaced by a login elsewhere.
        other, _ = stack.connect(peer="10.9.9.9:1")
        stack.login("alice", other)
        session.lost()
        # Resumed on a third connection, kicked by an operator.
        resumed, rconn = stack.connect(peer="10.7.7.7:7")
        resume_token = stack.tokens.resume_token(
            "alice", stack.players.get("alice").epoch)
        stack.send(resumed, t="resume", id=1, player_id="alice",
                   resume_token=resume_token, last_seq=0)
        self.assertEqual(rconn.messages[0]["t"], "resp")
        other.lost()
        stack.players.kick("alice", "admin", "cheating")
        resumed.lost()
        stack.clock.advance(100)
        records = list(reversed(self.history()))
        self.assertEqual(
            [(r["event"], r["player_id"], r["session_id"], r["peer"],
              r["reason"]) for r in records],
            [("connect", None, session.id, "10.1.2.3:4567", None),
             ("login", "alice", session.id, "10.1.2.3:4567", None),
             ("connect", None, other.id, "10.9.9.9:1", None),
             ("kick", "alice", session.id, "10.1.2.3:4567", "replaced"),
             ("login", "alice", other.id, "10.9.9.9:1", None),
             ("disconnect", "alice", session.id, "10.1.2.3:4567", None),
             ("connect", None, resumed.id, "10.7.7.7:7", None),
             ("kick", "alice", other.id, "10.9.9.9:1", "replaced"),
             ("resume", "alice", resumed.id, "10.7.7.7:7", None),
             ("disconnect", "alice", other.id, "10.9.9.9:1", None),
             ("kick", "alice", resumed.id, "10.7.7.7:7", "admin"),
             ("disconnect", "alice", resumed.id, "10.7.7.7:7", None),
             ("expiry", "alice", None, None, "idle_timeout")])
        self.assertEqual({r["gate_id"] for r in records}, {GATE_ID})
        self.assertEqual(records[0]["ts"], 0.0)
        self.assertEqual(records[1]["ts"], 1.0)
        self.assertEqual(records[-1]["ts"], 101.0)
        self.assertEqual({r["event"] for r in records}, set(EVENTS))

    def test_auth_is_a_login(self):
        session, connection = self.stack.connect()
        token = jwt.encode({"sub": "carol", "exp": 1000}, AUTH_SECRET,
                           algorithm="HS256")
        self.stack.send(session, t="auth", id=1, token=token)
        self.assertEqual(connection.messages[0]["t"], "resp")
        self.assertEqual(events(self.history(session_id=session.id)),
                         [("login", "carol", None), ("connect", None, None)])

    def test_failed_login_is_not_a_login(self):
        session, connection = self.stack.connect()
        self.stack.send(session, t="auth", id=1, token="not a token")
        self.assertEqual(connection.messages[0]["code"], "auth_failed")
        self.assertEqual(events(self.history()), [("connect", None, None)])


class PostgresAuditLogTests(TestCase):
    """
    The PostgreSQL audit log, on a real server (one schema per test).
    """

    async def start(self, proxied=False, **changes):
        dsn, _ = postgres_schema(self)
        self.dsn = dsn
        self.proxy = None
        if proxied:
            self.proxy, dsn = await postgres_proxy(self, dsn)
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.store = await start_store(self, dsn, self.clock, self.registry,
                                       **changes)
        self.log = self.store.audit
        return self.log

    async def rows(self):
        return await sql(self.dsn, "SELECT event, player_id, session_id,"
                                   " gate_id, peer, reason, ts FROM"
                                   " mmogate_audit ORDER BY id")

    def record(self, n, start=0, player_id="p"):
        for i in range(start, start + n):
            self.log.record("connect", player_id, f"s{i}", "g", "peer:1",
                            None, float(i))

    async def test_interface(self):
        log = await self.start()
        self.assertTrue(verifyObject(IAuditLog, log))

    async def test_written_in_batches(self):
        """
        Recording writes nothing at once; the timer writes what gathered in
        one batch.
        """
        log = await self.start()
        log.record("login", "alice", "s1", "g1", "10.0.0.1:5", None, 7.5)
        log.record("kick", "alice", "s1", "g1", "10.0.0.1:5", "admin", 8.0)
        self.assertEqual(len(log), 2)
        self.assertEqual(await self.rows(), [])
        self.clock.advance(postgres.AUDIT_INTERVAL)
        await log.flush()   # the write the timer started
        self.assertEqual(await self.rows(), [
            ("login", "alice", "s1", "g1", "10.0.0.1:5", None, 7.5),
            ("kick", "alice", "s1", "g1", "10.0.0.1:5", "admin", 8.0)])
        self.assertEqual(len(log), 0)

    async def test_full_batch_goes_at_once(self):
        log = await self.start()
        self.record(postgres.AUDIT_BATCH)
        self.clock.advance(0)
        await log.flush()
        self.assertEqual(len(await self.rows()), postgres.AUDIT_BATCH)

    async def test_history(self):
        """
        Newest first, filtered, limited; events still buffered are written
        first, so a history asked right after an event includes it.
        """
        log = await self.start()
        log.record("connect", None, "s1", "g", "h:1", None, 1.0)
        log.record("login", "alice", "s1", "g", "h:1", None, 2.0)
        log.record("connect", None, "s2", "g", "h:2", None, 3.0)
        log.record("login", "bob", "s2", "g", "h:2", None, 4.0)
        log.record("kick", "alice", "s1", "g", "h:1", "replaced", 5.0)
        found = await log.history()
        self.assertEqual([r["ts"] for r in found], [5.0, 4.0, 3.0, 2.0, 1.0])
        self.assertEqual(found[0], {
            "event": "kick", "player_id": "alice", "session_id": "s1",
            "gate_id": "g", "peer": "h:1", "reason": "replaced", "ts": 5.0})
        self.assertEqual(events(await log.history(player_id="alice")),
                         [("kick", "alice", "replaced"),
                          ("login", "alice", None)])
        self.assertEqual([r["ts"] for r in await log.history(
            session_id="s2")], [4.0, 3.0])
        self.assertEqual([r["ts"] for r in await log.history(
            player_id="alice", session_id="s1", limit=1)], [5.0])
        self.assertEqual(await log.history(player_id="nobody"), [])

    async def test_nul_does_not_block(self):
        log = await self.start()
        log.record("login", "bad\x00id", "s1", "g", "h:1", "x\x00", 1.0)
        await log.flush()
        [row] = await self.rows()
        self.assertEqual(row[1], "bad\ufffdid")

    async def test_bounded_while_away(self):
        """
        While PostgreSQL is away, at most store.audit_max events wait, the
        oldest are dropped and counted, nothing raises; once it is back the
        rest are written.
        """
        log = await self.start(proxied=True, store__audit_max=50)
        self.record(10)
        await log.flush()
        self.proxy.cut()
        self.record(30, start=10)
        await log.flush()       # fails: the rows stay
        self.assertEqual(len(log), 30)
        self.record(40, start=40)
        self.assertEqual(len(log), 50)
        self.assertEqual(log.dropped, 20)
        self.assertEqual(self.registry.get_sample_value(
            "mmogate_audit_dropped_total"), 20.0)
        self.assertEqual(self.registry.get_sample_value(
            "mmogate_audit_buffered"), 50.0)
        failure = await settled(log.history())
        self.assertTrue(failure.check(StoreUnavailable))
        # The timer backs off rather than hammering a server that is away.
        self.clock.advance(postgres.AUDIT_INTERVAL)
        self.assertFalse(log._writing)
        self.proxy.restore()
        for _ in range(20):
            self.clock.advance(1.0)
            await log.flush()
            if not len(log):
                break
        sessions = [row[2] for row in await self.rows()]
        self.assertEqual(sessions, [f"s{i}" for i in list(range(10))
                                    + list(range(30, 80))])

    async def test_stop_writes_the_rest(self):
        log = await self.start()
        self.record(3)
        await self.store.stopService()
        self.assertEqual(len(await self.rows()), 3)
        # Recording after the stop still does not raise.
        self.record(1)


class HistoryAPITests(TestCase):
    """
    C{GET /v1/history} on a real gate (the in-memory audit log).
    """

    async def test_history(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        client = await connect_tcp(self, gate)
        login = await client.login("alice")
        code, answer, raw = await api.post("/v1/kick", {"player_id": "alice",
                                                        "reason": "test"})
        self.assertEqual(code, 200, raw)
        await client.wait_lost()
        code, answer, raw = await api.get("/v1/history?player_id=alice")
        self.assertEqual(code, 200, raw)
        found = answer["events"]
        self.assertEqual(events(found), [("disconnect", "alice", None),
                                         ("kick", "alice", "admin"),
                                         ("login", "alice", None)])
        session_id = found[0]["session_id"]
        self.assertEqual(found[0]["gate_id"], "e2e-gate")
        self.assertTrue(found[0]["peer"].startswith("127.0.0.1:"))
        self.assertNotIn("resume_token", found[0])
        self.assertEqual(login["player_id"], "alice")
        code, answer, _ = await api.get(
            f"/v1/history?session_id={session_id}&limit=2")
        self.assertEqual(events(answer["events"]),
                         [("disconnect", "alice", None),
                          ("kick", "alice", "admin")])
        code, answer, _ = await api.get("/v1/history?limit=100000")
        self.assertEqual((code, answer["events"][-1]["event"]),
                         (200, "connect"))

    async def test_bad_queries(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        for query in ("limit=0", "limit=-1", "limit=x", "limit=1.5",
                      "player_id=", "player_id=" + "x" * 257,
                      "player_id=a&player_id=b", "session_id=%ff"):
            code, answer, raw = await api.get(f"/v1/history?{query}")
            self.assertEqual((code, answer["error"]["code"]),
                             (400, "bad_request"), (query, raw))
        code, answer, _ = await api.post("/v1/history", {})
        self.assertEqual(code, 405)
        code, _, _ = await api.get("/v1/history", key="wrong")
        self.assertEqual(code, 401)
