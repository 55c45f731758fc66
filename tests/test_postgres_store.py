"""
Tests for L{mmogate_plugins.postgres}: the mailbox contract against a real
PostgreSQL (one schema per test), the versioned schema and its migration
under a lock, durability across store instances, and what happens when the
server goes away and comes back (through a proxy the test cuts).
"""

import uuid
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
from prometheus_client import CollectorRegistry
from twisted.internet import reactor, threads
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gate.config import ConfigError, from_mapping
from gate.mailbox import Entry
from mmogate_plugins import postgres
from mmogate_plugins.postgres import (MIGRATIONS, PostgresStore, SchemaError,
                                      SchemaTooNew, StoreUnavailable, migrate)
from tests.e2e import within
from tests.mailbox_contract import MailboxStoreContract
from tests.services import (POSTGRES_HOST, POSTGRES_PORT, TCPProxy,
                            require_postgres)

#: The machine's PostgreSQL (trust authentication).
POSTGRES_DSN = (f"host={POSTGRES_HOST} port={POSTGRES_PORT} dbname=test "
                f"user=postgres")

#: Bound on a store operation against the local server.
OP_TIMEOUT = 10.0


def postgres_schema(test):
    """
    A schema of C{test}'s own (skipped without PostgreSQL), dropped with
    everything in it by the test's cleanups.

    @return: C{(dsn, schema)}: a DSN whose connections create and find
        their tables in that schema.
    """
    require_postgres()
    schema = f"mmogate_test_{uuid.uuid4().hex[:12]}"

    def execute(statement):
        conn = psycopg2.connect(POSTGRES_DSN, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    execute(f"CREATE SCHEMA {schema}")
    test.addCleanup(execute, f"DROP SCHEMA {schema} CASCADE")
    return (psycopg2.extensions.make_dsn(
        POSTGRES_DSN, options=f"-c search_path={schema}"), schema)


async def postgres_proxy(test, dsn):
    """
    A L{TCPProxy} in front of the machine's PostgreSQL, that C{test} cuts
    and restores (stopped by its cleanups).

    @return: C{(proxy, dsn)}: C{dsn} through the proxy.
    """
    proxy = await TCPProxy(POSTGRES_HOST, POSTGRES_PORT).start(test)
    return proxy, psycopg2.extensions.make_dsn(
        dsn, host="127.0.0.1", port=urlsplit(proxy.url).port)


def store_config(dsn, **changes):
    table = {"gate": {"id": "pg-test"},
             "store": {"postgres_dsn": dsn, "retry_max": 1.0},
             "player": {"mailbox_max": 100, "idle_timeout": 1000.0}}
    config = from_mapping(table, from_file=False)
    return config.replace(**changes) if changes else config


def sql(dsn, statement, args=()):
    """
    Run one statement on a connection of its own (in a thread); a Deferred
    with the rows, if any.
    """
    def run():
        conn = psycopg2.connect(dsn)
        try:
            with conn, conn.cursor() as cursor:
                cursor.execute(statement, args)
                return cursor.fetchall() if cursor.description else None
        finally:
            conn.close()
    return within(threads.deferToThread(run), OP_TIMEOUT, statement)


class Failed:
    """
    A failure as a value, so a test can await it and look at it.
    """

    def __init__(self, failure):
        self.failure = failure
        self.value = failure.value

    def check(self, *types):
        return self.failure.check(*types)

    def __repr__(self):
        return f"Failed({self.value!r})"


def settled(d, what="a store operation"):
    """
    C{d}'s result, or a L{Failed}; bounded by L{OP_TIMEOUT}.
    """
    return within(d.addErrback(Failed), OP_TIMEOUT, what)


async def start_store(test, dsn, clock=None, registry=None, **changes):
    """
    A started L{PostgresStore} with its schema in place, stopped by the
    test's cleanups.
    """
    store = PostgresStore(reactor, store_config(dsn, **changes), registry,
                          clock=clock)
    store.startService()
    test.addCleanup(lambda: within(store.stopService(), OP_TIMEOUT,
                                   "the store to stop"))
    await within(store.run(lambda cursor: None), OP_TIMEOUT,
                 "the schema to be migrated")
    return store


class PostgresMailboxContractTests(MailboxStoreContract, TestCase):
    """
    The mailbox contract, against PostgreSQL.
    """

    def setUp(self):
        self.clock = Clock()

    async def make_store(self, max_entries, max_age):
        dsn, _ = postgres_schema(self)
        store = await start_store(self, dsn, self.clock,
                                  player__mailbox_max=max_entries,
                                  player__idle_timeout=max_age)
        return store.mailboxes


class SchemaTests(TestCase):
    async def versions(self, dsn):
        return [row[0] for row in await sql(
            dsn, "SELECT version FROM mmogate_schema_version ORDER BY 1")]

    async def test_created_and_versioned(self):
        dsn, _ = postgres_schema(self)
        store = await start_store(self, dsn)
        self.assertTrue(store.migrated)
        self.assertTrue(store.reachable)
        self.assertEqual(await self.versions(dsn),
                         list(range(1, len(MIGRATIONS) + 1)))
        tables = {row[0] for row in await sql(
            dsn, "SELECT table_name FROM information_schema.tables"
                 " WHERE table_schema = current_schema()")}
        self.assertEqual(tables, {"mmogate_schema_version", "mmogate_mailbox",
                                  "mmogate_mailbox_state", "mmogate_audit"})
        # A second gate on the same database migrates nothing more.
        await start_store(self, dsn)
        self.assertEqual(await self.versions(dsn),
                         list(range(1, len(MIGRATIONS) + 1)))

    async def test_concurrent_start(self):
        """
        Gates starting at once on an empty database: one migrates, the
        others wait for its lock and find the schema done.
        """
        dsn, _ = postgres_schema(self)
        stores = [PostgresStore(reactor, store_config(dsn), None)
                  for _ in range(4)]
        for store in stores:
            store.startService()
            self.addCleanup(store.stopService)
        await within(gatherResults([s.run(lambda c: None) for s in stores]),
                     OP_TIMEOUT, "four stores to start")
        self.assertTrue(all(s.reachable for s in stores))
        self.assertEqual(await self.versions(dsn),
                         list(range(1, len(MIGRATIONS) + 1)))

    async def test_migrations_apply_in_order(self):
        """
        Only the migrations after the database's version run, each in
        order, each recorded.
        """
        dsn, _ = postgres_schema(self)
        first = ("CREATE TABLE t1 (a int)",)
        second = first + ("ALTER TABLE t1 ADD COLUMN b int;"
                          " CREATE TABLE t2 (c int)",)

        def run(migrations):
            conn = psycopg2.connect(dsn)
            try:
                with conn, conn.cursor() as cursor:
                    return migrate(cursor, migrations)
            finally:
                conn.close()

        self.assertEqual(await threads.deferToThread(run, first), (0, 1))
        self.assertEqual(await threads.deferToThread(run, second), (1, 2))
        self.assertEqual(await threads.deferToThread(run, second), (2, 2))
        self.assertEqual(await self.versions(dsn), [1, 2])
        await sql(dsn, "INSERT INTO t1 (a, b) VALUES (1, 2)")

    async def test_newer_schema_stops_start(self):
        """
        A database migrated by a newer gate stops start-up (twistd calls
        privilegedStartService before the reactor runs) with a message
        saying so.
        """
        dsn, _ = postgres_schema(self)
        await start_store(self, dsn)
        newer = len(MIGRATIONS) + 1
        await sql(dsn, "INSERT INTO mmogate_schema_version (version)"
                       " VALUES (%s)", (newer,))
        store = PostgresStore(reactor, store_config(dsn), None)
        e = self.assertRaises(SchemaTooNew, store.privilegedStartService)
        self.assertIn(f"version {newer}, newer than this gate knows "
                      f"({len(MIGRATIONS)})", str(e))
        self.assertIn("store.postgres_dsn", str(e))
        self.assertFalse(store.reachable)

    async def test_newer_schema_after_start(self):
        """
        Started without the privileged step (an embedded gate), a schema
        too new leaves the store unusable and saying why, not half-working.
        """
        dsn, _ = postgres_schema(self)
        await start_store(self, dsn)
        await sql(dsn, "INSERT INTO mmogate_schema_version (version)"
                       " VALUES (%s)", (len(MIGRATIONS) + 1,))
        store = PostgresStore(reactor, store_config(dsn), None,
                              clock=Clock())
        store.startService()
        self.addCleanup(store.stopService)
        failure = await settled(store.mailboxes.append(["a"], "r", 1, 0.0))
        self.assertTrue(failure.check(StoreUnavailable))
        self.assertIn("newer than this gate knows", str(failure.value))
        self.assertFalse(store.reachable)
        self.assertIn("newer than this gate knows", store.problem)

    async def test_unusable_schema_stops_start(self):
        """
        A schema the gate may not create tables in stops start-up with the
        server's reason.
        """
        dsn, schema = postgres_schema(self)
        dsn = psycopg2.extensions.make_dsn(
            dsn, options=f"-c search_path={schema}_missing")
        store = PostgresStore(reactor, store_config(dsn), None)
        e = self.assertRaises(SchemaError, store.privilegedStartService)
        self.assertIn("store.postgres_dsn: cannot create or migrate", str(e))

    def test_bad_dsn(self):
        e = self.assertRaises(ConfigError, PostgresStore, reactor,
                              store_config("host=127.0.0.1 dbname"), None)
        self.assertIn("store.postgres_dsn", str(e))

    def test_unreachable_at_start(self):
        """
        A server that is not there does not stop start-up: the gate starts
        unready and keeps trying.
        """
        from tests.e2e import closed_port
        store = PostgresStore(reactor, store_config(
            f"host=127.0.0.1 port={closed_port()} dbname=test user=postgres"),
            None)
        store.privilegedStartService()
        self.assertFalse(store.reachable)
        self.assertFalse(store.migrated)
        self.assertIn("127.0.0.1", store.problem)


class DurabilityTests(TestCase):
    def setUp(self):
        self.clock = Clock()

    async def test_survives_a_new_store(self):
        """
        What one store instance (a gate) wrote, another started later on
        the same database reads, and numbering continues.
        """
        dsn, _ = postgres_schema(self)
        first = await start_store(self, dsn, self.clock)
        await first.mailboxes.append(["a", "b"], "r", {"n": 1}, 1.0)
        await first.mailboxes.append(["a"], "r", {"n": 2}, 2.0)
        await first.mailboxes.ack("b", 1)
        await first.stopService()
        second = await start_store(self, dsn, self.clock)
        self.assertEqual(await second.mailboxes.read_after("a", 0),
                         (None, [Entry(1, 1.0, "r", {"n": 1}),
                                 Entry(2, 2.0, "r", {"n": 2})]))
        self.assertEqual(await second.mailboxes.size("b"), 0)
        self.assertEqual(await second.mailboxes.last_seq("b"), 1)
        [entry] = await second.mailboxes.append(["a"], "r", None, 3.0)
        self.assertEqual(entry.seq, 3)

    async def test_gates_share_numbering(self):
        """
        Two gates pushing to the same players at once: every seq is given
        once, with no hole.
        """
        dsn, _ = postgres_schema(self)
        one = await start_store(self, dsn, self.clock)
        two = await start_store(self, dsn, self.clock)
        ds = [store.mailboxes.append(["x", "y"], "r", i, 0.0)
              for i in range(40) for store in (one, two)]
        results = await within(gatherResults(ds), OP_TIMEOUT, "80 appends")
        for column in (0, 1):
            self.assertEqual(sorted(r[column].seq for r in results),
                             list(range(1, 81)))
        gap, entries = await one.mailboxes.read_after("x", 0)
        self.assertEqual(len(entries), 80)

    async def test_many_recipients(self):
        """
        A push to many players is numbered for all of them at once; one it
        cannot store (PostgreSQL text holds no NUL) is refused whole,
        before anything is written.
        """
        dsn, _ = postgres_schema(self)
        store = await start_store(self, dsn, self.clock)
        players = [f"p{i}" for i in range(200)]
        entries = await store.mailboxes.append(players, "r", "all", 5.0)
        self.assertEqual({e.seq for e in entries}, {1})
        self.assertEqual(await store.mailboxes.last_seq("p199"), 1)
        for ids, route in ((players + ["bad\x00id"], "r"), (players, "r\x00")):
            failure = await settled(store.mailboxes.append(ids, route, "no",
                                                           5.0))
            self.assertTrue(failure.check(ValueError))
        self.assertEqual(await store.mailboxes.last_seq("p0"), 1)
        self.assertEqual(await store.mailboxes.size("p0"), 1)

    async def test_refused_write_fails_alone(self):
        """
        Writes waiting together are committed together; one the server
        refuses rolls them back, and they are written again one by one, so
        that only it fails, and in order.
        """
        dsn, _ = postgres_schema(self)
        store = await start_store(self, dsn, self.clock)
        mailboxes = store.mailboxes
        first = mailboxes.append(["a"], "r", 0, 0.0)    # written alone
        ds = [mailboxes.append(["a"], "r", 1, 0.0),
              store.write(lambda cursor: cursor.execute("SELECT 1/0")),
              mailboxes.append(["a"], "r", 2, 0.0),
              mailboxes.ack("a", 1)]
        outcomes = await gatherResults([settled(d) for d in [first] + ds])
        self.assertEqual(outcomes[1][0].seq, 2)
        self.assertTrue(outcomes[2].check(psycopg2.DataError))
        self.assertEqual(outcomes[3][0].seq, 3)
        self.assertIsNone(outcomes[4])
        self.assertTrue(store.reachable)
        self.assertEqual([e.data for e in
                          (await mailboxes.read_after("a", 0))[1]], [1, 2])

    async def test_sweep(self):
        """
        The sweep deletes pushes older than player.idle_timeout and audit
        rows older than store.audit_retention.
        """
        dsn, _ = postgres_schema(self)
        clock = Clock()
        clock.advance(10000)
        store = await start_store(self, dsn, clock,
                                  player__idle_timeout=100.0,
                                  store__audit_retention=1000.0)
        await store.mailboxes.append(["a"], "r", "old", 9899.0)
        await store.mailboxes.append(["a"], "r", "new", 9950.0)
        store.audit.record("connect", None, "s1", "g", "p", None, 8999.0)
        store.audit.record("connect", None, "s2", "g", "p", None, 9001.0)
        await store.audit.flush()
        await store.sweep()
        self.assertEqual(await sql(dsn, "SELECT data FROM mmogate_mailbox"),
                         [('"new"',)])
        self.assertEqual(await sql(dsn, "SELECT session_id FROM"
                                        " mmogate_audit"), [("s2",)])
        self.assertEqual(await store.mailboxes.last_seq("a"), 2)


class DurableCopyTests(TestCase):
    """
    The durable copy of mailboxes Redis numbers (store.kind = redis):
    entries written with their seqs, acks mirrored, snapshots to restore
    Redis from, a copy of another incarnation starting over.
    """

    async def store(self, **changes):
        dsn, _ = postgres_schema(self)
        self.dsn = dsn
        self.clock = Clock()
        self.clock.advance(1000)
        store = await start_store(self, dsn, self.clock, **changes)
        return store.mailboxes

    async def test_written_with_given_seqs(self):
        mailboxes = await self.store(player__mailbox_max=3)
        # Two gates' writes may commit out of seq order.
        await mailboxes.store_numbered([("a", 2, "E"), ("b", 7, "F")], 990.0,
                                       "r", {"n": 2})
        await mailboxes.store_numbered([("a", 1, "E")], 989.0, "r", {"n": 1})
        found = await mailboxes.snapshot(["a", "b", "ghost"])
        self.assertEqual(found, {
            "a": ("E", 2, 0, [Entry(1, 989.0, "r", {"n": 1}),
                              Entry(2, 990.0, "r", {"n": 2})]),
            "b": ("F", 7, 0, [Entry(7, 990.0, "r", {"n": 2})])})
        # mailbox_max counts back from the highest seq.
        for seq in (3, 4, 5):
            await mailboxes.store_numbered([("a", seq, "E")], 991.0, "r",
                                           seq)
        self.assertEqual([e.seq for e in
                          (await mailboxes.snapshot(["a"]))["a"][3]],
                         [3, 4, 5])
        self.assertEqual(await mailboxes.last_seq("a"), 5)
        # Rows beyond it are deleted every TRIM_EVERY seqs.
        for seq in range(6, postgres.TRIM_EVERY + 1):
            await mailboxes.store_numbered([("a", seq, "E")], 991.0, "r",
                                           seq)
        self.assertEqual(await sql(self.dsn, "SELECT count(*) FROM"
                                             " mmogate_mailbox WHERE"
                                             " player_id = 'a'"), [(3,)])

    async def test_acks_mirrored(self):
        mailboxes = await self.store()
        await mailboxes.store_numbered([("a", 1, "E"), ("b", 1, "F")], 990.0,
                                       "r", 1)
        await mailboxes.store_numbered([("a", 2, "E")], 990.0, "r", 2)
        mailboxes.mirror_ack("a", 1, "E")
        mailboxes.mirror_ack("a", 2, "E")
        mailboxes.mirror_ack("b", 1, "F")
        await within(mailboxes.acks_written(), OP_TIMEOUT, "acks")
        found = await mailboxes.snapshot(["a", "b"])
        self.assertEqual(found, {"a": ("E", 2, 2, []), "b": ("F", 1, 1, [])})
        self.assertEqual(await sql(self.dsn, "SELECT count(*) FROM"
                                             " mmogate_mailbox"), [(0,)])
        # An ack that overtook its push's write: the push stays acked.
        mailboxes.mirror_ack("a", 3, "E")
        await within(mailboxes.acks_written(), OP_TIMEOUT, "acks")
        await mailboxes.store_numbered([("a", 3, "E")], 990.0, "r", 3)
        self.assertEqual(await mailboxes.snapshot(["a"]),
                         {"a": ("E", 3, 3, [])})

    async def test_new_incarnation_starts_over(self):
        mailboxes = await self.store()
        await mailboxes.store_numbered([("a", 5, "OLD")], 990.0, "r", "old")
        await mailboxes.store_numbered([("a", 1, "NEW")], 991.0, "r", "new")
        self.assertEqual(await mailboxes.snapshot(["a"]), {
            "a": ("NEW", 1, 0, [Entry(1, 991.0, "r", "new")])})

    async def test_expired_copies(self):
        """
        A copy not written for player.idle_timeout is no copy: snapshots
        skip it and the sweep deletes it with its pushes.
        """
        mailboxes = await self.store(player__idle_timeout=100.0)
        await mailboxes.store_numbered([("a", 1, "E")], 1000.0, "r", 1)
        self.clock.advance(50)
        await mailboxes.store_numbered([("b", 1, "F")], 1050.0, "r", 1)
        self.clock.advance(60)
        self.assertEqual(list(await mailboxes.snapshot(["a", "b"])), ["b"])
        await mailboxes._db.sweep()
        self.assertEqual(await sql(self.dsn, "SELECT player_id FROM"
                                             " mmogate_mailbox_state"),
                         [("b",)])
        # Mailboxes numbered by PostgreSQL itself have no such lifetime.
        await mailboxes.append(["c"], "r", 1, 1110.0)
        self.clock.advance(1000)
        await mailboxes._db.sweep()
        self.assertEqual(await mailboxes.last_seq("c"), 1)


class OutageTests(TestCase):
    """
    PostgreSQL going away and coming back, played by a proxy the test cuts.
    """

    async def start(self):
        dsn, self.schema = postgres_schema(self)
        self.direct = dsn
        self.proxy, proxied = await postgres_proxy(self, dsn)
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.store = await start_store(self, proxied, self.clock,
                                       self.registry)
        return self.store

    def metric(self, name):
        return self.registry.get_sample_value(name)

    def outcome(self, d):
        return settled(d)

    async def test_cut_and_restore(self):
        store = await self.start()
        mailboxes = store.mailboxes
        await mailboxes.append(["a"], "r", "before", 0.0)
        self.assertEqual(self.metric("mmogate_postgres_reachable"), 1.0)
        self.proxy.cut()
        failure = await self.outcome(mailboxes.append(["a"], "r", "lost",
                                                      0.0))
        self.assertTrue(failure.check(StoreUnavailable), failure)
        self.assertIn("PostgreSQL unavailable", str(failure.value))
        self.assertFalse(store.reachable)
        self.assertTrue(mailboxes.reachable is False)
        self.assertEqual(self.metric("mmogate_postgres_reachable"), 0.0)
        # Reads fail the same way; acks and drops (nobody waits for them)
        # do not raise.
        self.assertTrue((await self.outcome(mailboxes.read_after("a", 0)))
                        .check(StoreUnavailable))
        self.assertIsNone(await self.outcome(mailboxes.ack("a", 1)))
        self.assertIsNone(await self.outcome(mailboxes.drop("zz")))
        # Still away: the probe fails and backs off.
        self.clock.advance(0.5)
        await self.outcome(store.run(lambda c: None))
        self.assertFalse(store.reachable)
        self.proxy.restore()
        # The probe notices the return without any traffic.
        for _ in range(10):
            self.clock.advance(1.0)
            if store.reachable:
                break
            await self.outcome(store.run(lambda c: None))
        self.assertTrue(store.reachable)
        self.assertEqual(self.metric("mmogate_postgres_reachable"), 1.0)
        # The failed push took no seq; the one before is still there.
        [entry] = await self.outcome(mailboxes.append(["a"], "r", "after",
                                                      0.0))
        self.assertEqual(entry.seq, 2)
        self.assertEqual([e.data for e in
                          (await mailboxes.read_after("a", 0))[1]],
                         ["before", "after"])

    async def test_acks_mirrored_wait_for_return(self):
        """
        Acks mirrored while PostgreSQL is away wait (coalesced) and are
        written with the next ack once it is back.
        """
        store = await self.start()
        mailboxes = store.mailboxes
        await mailboxes.store_numbered([("a", 1, "E"), ("a", 2, "E"),
                                        ("b", 1, "F")], 0.0, "r", 1)
        self.proxy.cut()
        await self.outcome(store.run(lambda c: None))
        mailboxes.mirror_ack("a", 1, "E")
        await within(mailboxes.acks_written(), OP_TIMEOUT, "acks")
        mailboxes.mirror_ack("a", 2, "E")
        await within(mailboxes.acks_written(), OP_TIMEOUT, "acks")
        self.assertEqual(mailboxes._acks, {"a": (2, "E")})
        self.proxy.restore()
        for _ in range(10):
            self.clock.advance(1.0)
            if store.reachable:
                break
            await self.outcome(store.run(lambda c: None))
        mailboxes.mirror_ack("b", 1, "F")
        await within(mailboxes.acks_written(), OP_TIMEOUT, "acks")
        self.assertEqual(await sql(self.direct, "SELECT player_id, acked FROM"
                                                " mmogate_mailbox_state"
                                                " ORDER BY 1"),
                         [("a", 2), ("b", 1)])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_first_use_after_return_works(self):
        """
        Every pooled connection went through the outage: none of them is
        used again, so the first operations after the server returns
        succeed instead of failing on a dead connection.
        """
        store = await self.start()
        # Open several pooled connections.
        await gatherResults([store.mailboxes.last_seq(f"p{i}")
                             for i in range(8)])
        self.proxy.cut()
        await self.outcome(store.mailboxes.last_seq("a"))
        self.proxy.restore()
        results = await gatherResults([
            self.outcome(store.mailboxes.last_seq(f"p{i}"))
            for i in range(8)])
        self.assertEqual(results, [0] * 8)
        self.assertTrue(store.reachable)

    async def test_unreachable_at_start_then_recovers(self):
        dsn, _ = postgres_schema(self)
        proxy, proxied = await postgres_proxy(self, dsn)
        proxy.cut()
        clock = Clock()
        store = PostgresStore(reactor, store_config(proxied), None,
                              clock=clock)
        store.privilegedStartService()
        store.startService()
        self.addCleanup(store.stopService)
        self.assertFalse(store.reachable)
        failure = await settled(store.mailboxes.append(["a"], "r", 1, 0.0))
        self.assertTrue(failure.check(StoreUnavailable))
        proxy.restore()
        [entry] = await settled(store.mailboxes.append(["a"], "r", 1, 0.0))
        self.assertEqual(entry.seq, 1)
        self.assertTrue(store.migrated and store.reachable)

    async def test_waiting_writes_are_bounded(self):
        store = await self.start()
        self.patch(postgres, "MAX_PENDING", 3)
        ds = [store.mailboxes.append(["a"], "r", i, 0.0) for i in range(5)]
        outcomes = await gatherResults([self.outcome(d) for d in ds])
        # One is being written, three wait, the fifth is refused at once.
        self.assertTrue(outcomes[4].check(StoreUnavailable))
        self.assertEqual([o[0].seq for o in outcomes[:4]], [1, 2, 3, 4])
