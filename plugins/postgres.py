"""
PostgreSQL (C{store.postgres_dsn}) for what must outlive every gate and
Redis: the durable mailbox and the session audit log.

psycopg2 runs in the threads of an C{adbapi.ConnectionPool}, never on the
reactor thread. With a DSN set and C{store.kind = memory},
L{PostgresMailboxStore} is the mailbox store of the gate; with C{store.kind
= redis} it keeps the durable copy of the mailboxes Redis numbers
(L{PostgresMailboxStore.store_numbered}, L{PostgresMailboxStore.snapshot}).
Either way a push is answered only after its rows committed, so C{queued}
is never claimed for what is not stored.

Writes go through one ordered lane (L{PostgresStore.write}): operations
queued while the lane is busy are committed together in one transaction and
their results fire in the order they were asked for. That keeps pushes to a
player in seq order on their way to its session (results from parallel
threads would arrive in any order) and orders a player's drop before a new
incarnation's first push.

Schema: L{MIGRATIONS}, applied in order under a transaction-scoped advisory
lock, recorded in C{mmogate_schema_version}; tables go to the first schema
of the connection's C{search_path}.
"""

import json
from collections import deque

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gate import errors
from gate.audit import FIELDS, as_record
from gate.config import ConfigError
from gate.errors import GateError
from gate.interfaces import IAuditLog, IMailboxStore
from gate.mailbox import Entry

#: Ordered schema migrations; version N is MIGRATIONS[N - 1]. Append only.
MIGRATIONS = (
    # 1: mailboxes (a counter per player, one row per retained push) and the
    # audit log.
    """
    CREATE TABLE mmogate_mailbox_state (
        player_id text PRIMARY KEY,
        last_seq bigint NOT NULL,
        acked bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE mmogate_mailbox (
        player_id text NOT NULL,
        seq bigint NOT NULL,
        ts double precision NOT NULL,
        route text NOT NULL,
        data text NOT NULL,
        PRIMARY KEY (player_id, seq)
    );
    CREATE INDEX mmogate_mailbox_ts ON mmogate_mailbox (ts);
    CREATE TABLE mmogate_audit (
        id bigserial PRIMARY KEY,
        ts double precision NOT NULL,
        event text NOT NULL,
        player_id text,
        session_id text,
        gate_id text,
        peer text,
        reason text
    );
    CREATE INDEX mmogate_audit_ts ON mmogate_audit (ts, id);
    CREATE INDEX mmogate_audit_player ON mmogate_audit (player_id, ts, id)
        WHERE player_id IS NOT NULL;
    CREATE INDEX mmogate_audit_session ON mmogate_audit (session_id, ts, id)
        WHERE session_id IS NOT NULL;
    """,
    # 2: the durable copy of mailboxes that Redis numbers (store.kind =
    # redis): the player's incarnation, and when its copy was last written
    # (NULL for mailboxes numbered here), so that a copy older than
    # player.idle_timeout counts as expired.
    """
    ALTER TABLE mmogate_mailbox_state ADD COLUMN epoch text;
    ALTER TABLE mmogate_mailbox_state ADD COLUMN touched double precision;
    CREATE INDEX mmogate_mailbox_state_touched
        ON mmogate_mailbox_state (touched) WHERE touched IS NOT NULL;
    """,
)

#: First key of the advisory lock taken while migrating (the second is the
#: schema's name), so gates starting at once migrate one after the other.
LOCK_KEY = 0x6d6d6f67  # "mmog"

#: Connections (and threads) in the pool: one for the write lane, the rest
#: for reads and the audit log.
POOL_SIZE = 4

#: Writes waiting for the lane; beyond it a write fails at once.
MAX_PENDING = 10000

#: Writes committed in one transaction at most.
MAX_GROUP = 500

#: Players whose acks wait to be mirrored (store.kind = redis); acks of
#: more players are dropped (they only trim: a copy restored later may
#: hold pushes the client had acked).
MAX_ACKS = 100000

#: Audit rows are written this often, or as soon as AUDIT_BATCH wait.
AUDIT_INTERVAL = 0.5
AUDIT_BATCH = 500

#: Seconds between sweeps of pushes past player.idle_timeout and audit rows
#: past store.audit_retention; each sweep deletes SWEEP_ROWS at most per
#: table and round, and runs again at once while there is more.
SWEEP_INTERVAL = 60.0
SWEEP_ROWS = 5000

#: libpq settings used unless the DSN sets them: a dead server is noticed in
#: seconds, not at the kernel's TCP timeout.
DSN_DEFAULTS = {"connect_timeout": "5", "keepalives": "1",
                "keepalives_idle": "10", "keepalives_interval": "5",
                "keepalives_count": "3", "tcp_user_timeout": "15000"}


class StoreUnavailable(GateError):
    """
    PostgreSQL cannot be reached (or its schema is not usable); nothing was
    stored. An expected refusal: a client's bind is answered C{internal}, a
    push API call 503 C{unavailable}, both with this message and without a
    logged traceback.
    """

    def __init__(self, msg):
        GateError.__init__(self, errors.INTERNAL, msg)

    def __str__(self):
        return self.msg


class SchemaError(Exception):
    """
    The schema cannot be created or migrated: start-up stops.
    """


class SchemaTooNew(SchemaError):
    """
    The database was migrated by a newer gate than this one.
    """

    def __init__(self, found, known):
        SchemaError.__init__(
            self, f"store.postgres_dsn: the database schema is at version "
                  f"{found}, newer than this gate knows ({known}); run a "
                  f"gate at least as new as the one that migrated it")
        self.found = found
        self.known = known


def lost_connection(error):
    """
    Whether C{error} means the server is unreachable (as opposed to a
    refused statement, which retrying would not fix).
    """
    if isinstance(error, (psycopg2.extensions.TransactionRollbackError,
                          psycopg2.extensions.QueryCanceledError)):
        return False
    return isinstance(error, (psycopg2.OperationalError,
                              psycopg2.InterfaceError, StoreUnavailable,
                              adbapi.ConnectionLost))


def full_dsn(dsn, application_name):
    """
    C{dsn} with L{DSN_DEFAULTS} and an C{application_name} where it sets
    none.
    """
    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise ConfigError(f"store.postgres_dsn: {_first_line(e)}")
    extra = {k: v for k, v in DSN_DEFAULTS.items() if k not in given}
    if "application_name" not in given:
        extra["application_name"] = application_name[:63]
    return psycopg2.extensions.make_dsn(dsn, **extra)


def migrate(cursor, migrations=MIGRATIONS):
    """
    Bring the schema to C{len(migrations)} inside the caller's transaction.

    @return: C{(found, now)} versions.
    @raise SchemaTooNew: when the database is ahead of C{migrations}.
    """
    cursor.execute("SELECT pg_advisory_xact_lock(%s, "
                   "hashtext(coalesce(current_schema(), '')))", (LOCK_KEY,))
    cursor.execute("CREATE TABLE IF NOT EXISTS mmogate_schema_version ("
                   " version integer PRIMARY KEY,"
                   " applied timestamptz NOT NULL DEFAULT now())")
    cursor.execute("SELECT coalesce(max(version), 0) "
                   "FROM mmogate_schema_version")
    found = cursor.fetchone()[0]
    if found > len(migrations):
        raise SchemaTooNew(found, len(migrations))
    for version in range(found + 1, len(migrations) + 1):
        cursor.execute(migrations[version - 1])
        cursor.execute("INSERT INTO mmogate_schema_version (version) "
                       "VALUES (%s)", (version,))
    return found, len(migrations)


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class _Pool(adbapi.ConnectionPool):
    """
    adbapi's pool, run through L{run}: a connection that broke is closed
    and reopened on next use, and once one broke every connection opened
    before is renewed too (they went through the same outage), all without
    the tracebacks adbapi logs for failed rollbacks.
    """

    def __init__(self, *args, **kw):
        adbapi.ConnectionPool.__init__(self, *args, **kw)
        self.generation = 0
        self._born = {}

    def run(self, work, *args):
        """
        C{work(cursor, *args)} in a pool thread, committed; a L{Deferred}.
        """
        return threads.deferToThreadPool(self._reactor, self.threadpool,
                                         self._run, work, *args)

    def _run(self, work, *args):
        tid = self.threadID()
        old = self.connections.get(tid)
        if old is not None and self._born.get(tid, 0) < self.generation:
            self.disconnect(old)
        if tid not in self.connections:
            self._born[tid] = self.generation
        try:
            conn = self.connect()
        except psycopg2.OperationalError:
            # The others went through the same outage.
            self.generation += 1
            raise
        try:
            with conn.cursor() as cursor:
                result = work(cursor, *args)
            conn.commit()
            return result
        except BaseException as e:
            if conn.closed or lost_connection(e):
                self.generation += 1
                self.disconnect(conn)
            else:
                try:
                    conn.rollback()
                except Exception:
                    self.disconnect(conn)
            raise


def _run_group(cursor, ops):
    """
    Several writes in one transaction, in order; consecutive writes of a
    kind that has a C{batch} form (appends, acks) go in one statement.

    @return: the result of each op.
    """
    results = []
    i = 0
    while i < len(ops):
        op, args = ops[i]
        batch = getattr(op, "batch", None)
        if batch is None:
            results.append(op(cursor, *args))
            i += 1
            continue
        j = i + 1
        while j < len(ops) and ops[j][0] is op:
            j += 1
        results.extend(batch(cursor, [args for _, args in ops[i:j]]))
        i = j
    return results


class PostgresStore(Service):
    """
    One gate's PostgreSQL: the pool, the schema, reachability, and the two
    stores built on them (L{mailboxes}, L{audit}).

    @param reactor: for the pool's threads.
    @param config: a L{gate.config.Config} (C{store.*}, C{player.*},
        C{gate.id}).
    @param registry: a prometheus C{CollectorRegistry} for its metrics.
    @param clock: for timestamps, retention and timers (default: C{reactor}).

    @ivar reachable: whether the last attempt reached PostgreSQL with a
        usable schema; C{/ready} reports it.
    @ivar problem: why not, for people.
    """

    log = Logger()

    def __init__(self, reactor, config, registry=None, clock=None):
        self.setName("postgres")
        self._reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.dsn = full_dsn(config["store.postgres_dsn"],
                            f"mmogate {config['gate.id']}")
        self.retry_max = config["store.retry_max"]
        self.audit_retention = config["store.audit_retention"]
        self.max_age = config["player.idle_timeout"]
        #: How long a stop may take to write what is buffered.
        self.stop_timeout = max(config["shutdown.grace"], 1.0)
        self.reachable = False
        self.problem = "not started"
        self.migrated = False
        self._pool = None
        self._migrating = None
        self._probe_call = None
        self._delay = 0.5
        self._pending = deque()
        self._writing = False
        self._solo = 0
        self._drained = []
        self._sweeper = None
        self._sweep_again = None
        self._up = None
        if registry is not None:
            self._up = Gauge("mmogate_postgres_reachable", "1 while "
                             "PostgreSQL answers with a usable schema",
                             registry=registry)
            self._up.set(0)
            Gauge("mmogate_postgres_write_queue", "Writes waiting for "
                  "PostgreSQL", registry=registry).set_function(
                      lambda: len(self._pending))
        self.mailboxes = PostgresMailboxStore(
            self, config["player.mailbox_max"], self.max_age)
        self.audit = PostgresAuditLog(self, config["store.audit_max"],
                                      config["gate.id"], registry)

    # Starting and stopping.

    def privilegedStartService(self):
        """
        Migrate synchronously before the reactor runs (twistd calls this
        first): a schema newer than this gate stops start-up here. An
        unreachable server does not: the gate starts, not ready, and keeps
        trying.
        """
        Service.privilegedStartService(self)
        if self.migrated:
            return
        try:
            conn = psycopg2.connect(self.dsn)
        except psycopg2.OperationalError as e:
            self._unreachable(e)
            return
        try:
            with conn:
                with conn.cursor() as cursor:
                    self._migrated(migrate(cursor))
        except psycopg2.OperationalError as e:
            self._unreachable(e)
        except psycopg2.Error as e:
            raise SchemaError(f"store.postgres_dsn: cannot create or "
                              f"migrate the schema: {_first_line(e)}")
        finally:
            conn.close()

    def startService(self):
        Service.startService(self)
        self._pool = _Pool("psycopg2", self.dsn, cp_min=1, cp_max=POOL_SIZE,
                           cp_noisy=False, cp_reactor=self._reactor)
        self._pool.start()
        if not self.migrated:
            self._ensure_schema().addErrback(lambda _: None)
        self.audit.start()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_INTERVAL, now=False)

    def stopService(self):
        """
        Write what is buffered (within C{shutdown.grace}, at least a
        second), then close the pool.
        """
        Service.stopService(self)
        return self.stop(self.stop_timeout)

    def stop(self, timeout):
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._sweep_again is not None and self._sweep_again.active():
            self._sweep_again.cancel()
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        if self._pool is None:
            return succeed(None)
        done = Deferred()
        timer = self.clock.callLater(timeout, lambda: done.called
                                     or done.callback(None))

        def flushed(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        self.audit.stop().addBoth(lambda _: self.wait_written()) \
            .addBoth(flushed)

        def close(_):
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()
            # Whatever still waits will not be written by this gate.
            pending, self._pending = self._pending, deque()
            for _, _, waiter in pending:
                waiter.errback(StoreUnavailable("the gate stopped"))

        return done.addCallback(close)

    def wait_written(self):
        """
        @return: L{Deferred} firing once the write lane is empty.
        """
        if not self._writing and not self._pending:
            return succeed(None)
        d = Deferred()
        self._drained.append(d)
        return d

    # Schema and reachability.

    def _migrated(self, versions):
        found, now = versions
        if found != now:
            self.log.info("PostgreSQL schema migrated from version {found} "
                          "to {now}", found=found, now=now)
        self.migrated = True
        self._reachable()

    def _ensure_schema(self):
        """
        @return: L{Deferred} firing once the schema is in place; one
            migration attempt at a time, shared by whoever waits for it.
        """
        if self.migrated:
            return succeed(None)
        waiter = Deferred()
        if self._migrating is not None:
            self._migrating.append(waiter)
            return waiter
        self._migrating = [waiter]
        d = self._pool.run(migrate)
        d.addCallbacks(self._migrated, self._not_migrated)
        d.addBoth(self._schema_settled)
        return waiter

    def _schema_settled(self, _):
        waiters, self._migrating = self._migrating, None
        for waiter in waiters:
            if self.migrated:
                waiter.callback(None)
            else:
                waiter.errback(StoreUnavailable(
                    f"PostgreSQL unavailable: {self.problem}"))

    def _not_migrated(self, failure):
        if failure.check(SchemaTooNew):
            self.reachable = False
            self.problem = str(failure.value)
            if self._up is not None:
                self._up.set(0)
            self.log.critical("{problem}", problem=self.problem)
            self._schedule_probe()
            return None
        self._unreachable(failure.value)
        return None

    def _unreachable(self, error):
        problem = _first_line(error)
        if self.reachable or self.problem != problem:
            self.log.warn("PostgreSQL unreachable: {problem}",
                          problem=problem)
        self.reachable = False
        self.problem = problem
        if self._up is not None:
            self._up.set(0)
        self._schedule_probe()

    def _reachable(self):
        if not self.reachable:
            if self.problem != "not started":
                self.log.info("PostgreSQL reachable again")
            self.reachable = True
            self.problem = None
            if self._up is not None:
                self._up.set(1)
        self._delay = 0.5
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None

    def _schedule_probe(self):
        if not self.running or (self._probe_call is not None
                                and self._probe_call.active()):
            return
        delay, self._delay = self._delay, min(self._delay * 2,
                                              self.retry_max)
        self._probe_call = self.clock.callLater(delay, self._probe)

    def _probe(self):
        self._probe_call = None
        self.run(lambda cursor: cursor.execute("SELECT 1")) \
            .addErrback(lambda _: None)

    # Running statements.

    def run(self, work, *args):
        """
        C{work(cursor, *args)} in a pool thread, in its own transaction,
        once the schema is in place.

        @return: L{Deferred} with its result; a lost server fails with
            L{StoreUnavailable}.
        """
        if self._pool is None:
            return fail(StoreUnavailable("PostgreSQL store is not running"))
        d = self._ensure_schema()
        d.addCallback(self._run_now, work, args)
        return d.addCallbacks(self._succeeded, self._failed)

    def _run_now(self, _, work, args):
        if self._pool is None:
            raise StoreUnavailable("PostgreSQL store is not running")
        return self._pool.run(work, *args)

    def _succeeded(self, result):
        if not self.reachable:
            self._reachable()
        return result

    def _failed(self, failure):
        if lost_connection(failure.value):
            if not failure.check(StoreUnavailable):
                self._unreachable(failure.value)
                raise StoreUnavailable(
                    f"PostgreSQL unavailable: {_first_line(failure.value)}")
            self._schedule_probe()
        return failure

    def write(self, op, *args):
        """
        C{op(cursor, *args)} through the ordered write lane.

        @return: L{Deferred} with its result; the Deferreds of writes fire
            in the order the writes were asked for, each once its
            transaction committed.
        """
        if len(self._pending) >= MAX_PENDING:
            return fail(StoreUnavailable(
                f"PostgreSQL: {MAX_PENDING} writes are waiting already"))
        d = Deferred()
        self._pending.append((op, args, d))
        if not self._writing:
            self._write_next()
        return d

    def _write_next(self):
        pending = self._pending
        if not pending:
            self._writing = False
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
            return
        self._writing = True
        if self._solo:
            self._solo -= 1
            size = 1
        else:
            size = min(len(pending), MAX_GROUP)
        group = [pending.popleft() for _ in range(size)]
        d = self.run(_run_group, [(op, args) for op, args, _ in group])

        def done(results):
            for (_, _, waiter), result in zip(group, results):
                waiter.callback(result)

        def failed(failure):
            if len(group) > 1 and not lost_connection(failure.value):
                # A refused statement (or a deadlock) rolled the group back:
                # write its ops again one per transaction, so that only the
                # refused one fails.
                pending.extendleft(reversed(group))
                self._solo = len(group)
                return
            for _, _, waiter in group:
                waiter.errback(failure)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._write_next())

    # Retention.

    def sweep(self):
        """
        Delete pushes older than C{player.idle_timeout} (reads skip them
        already) and audit rows older than C{store.audit_retention}, a
        bounded number per round.

        @return: L{Deferred} firing with the rows deleted in this round.
        """
        if not self.reachable:
            return succeed(0)
        now = self.clock.seconds()
        d = self.run(_sweep, now - self.max_age,
                     now - self.audit_retention if self.audit_retention > 0
                     else None)

        def again(deleted):
            if deleted >= SWEEP_ROWS and self.running:
                self._sweep_again = self.clock.callLater(0, self.sweep)
            return deleted

        return d.addCallbacks(again, lambda _: 0)


def _sweep(cursor, mailbox_cutoff, audit_cutoff):
    deleted = 0
    cursor.execute(
        "DELETE FROM mmogate_mailbox WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM mmogate_mailbox WHERE ts <= %s LIMIT %s))",
        (mailbox_cutoff, SWEEP_ROWS))
    deleted = max(deleted, cursor.rowcount)
    # Durable copies (store.kind = redis) not written for idle_timeout:
    # expired with their Redis entries.
    cursor.execute(
        "DELETE FROM mmogate_mailbox_state WHERE player_id = ANY(ARRAY("
        " SELECT s.player_id FROM mmogate_mailbox_state s"
        " WHERE s.touched <= %s AND NOT EXISTS (SELECT 1 FROM"
        " mmogate_mailbox m WHERE m.player_id = s.player_id) LIMIT %s))",
        (mailbox_cutoff, SWEEP_ROWS))
    deleted = max(deleted, cursor.rowcount)
    if audit_cutoff is not None:
        cursor.execute(
            "DELETE FROM mmogate_audit WHERE id = ANY(ARRAY("
            " SELECT id FROM mmogate_audit WHERE ts <= %s ORDER BY ts"
            " LIMIT %s))", (audit_cutoff, SWEEP_ROWS))
        deleted = max(deleted, cursor.rowcount)
    return deleted


# The mailbox.

_APPEND = """
WITH ops AS (
    SELECT * FROM unnest(%(op)s::int[], %(ts)s::float8[], %(route)s::text[],
                         %(data)s::text[]) AS o(op, ts, route, data)
), req AS (
    SELECT * FROM unnest(%(req_op)s::int[], %(req_pos)s::int[],
                         %(req_player)s::text[]) AS r(op, pos, player_id)
), counts AS (
    SELECT player_id, count(*) AS n FROM req GROUP BY player_id
), bumped AS (
    INSERT INTO mmogate_mailbox_state AS s (player_id, last_seq)
    SELECT player_id, n FROM counts ORDER BY player_id
    ON CONFLICT (player_id)
        DO UPDATE SET last_seq = s.last_seq + excluded.last_seq
    RETURNING s.player_id, s.last_seq
), numbered AS (
    SELECT r.op, r.pos, r.player_id, b.last_seq AS top,
           b.last_seq - c.n + row_number() OVER (
               PARTITION BY r.player_id ORDER BY r.op, r.pos) AS seq
    FROM req r JOIN counts c USING (player_id) JOIN bumped b USING (player_id)
), stored AS (
    INSERT INTO mmogate_mailbox (player_id, seq, ts, route, data)
    SELECT n.player_id, n.seq, o.ts, o.route, o.data
    FROM numbered n JOIN ops o USING (op)
    WHERE n.seq > n.top - %(max)s
), trimmed AS (
    DELETE FROM mmogate_mailbox m USING bumped b
    WHERE m.player_id = b.player_id AND m.seq <= b.last_seq - %(max)s
)
SELECT op, pos, seq FROM numbered
"""


def _append_batch(cursor, calls):
    """
    Number and store several pushes, each for its players, in one
    statement: each player's counter is bumped once by the number of its
    pushes, which are numbered in the order given. Pushes that retention
    (C{player.mailbox_max}) would drop at once are numbered but not stored.

    @param calls: C{(player_ids, ts, route, data, encoded, max_entries)}
        per push.
    @return: the L{Entry}s of each push, in the order of its player ids.
    """
    op, ts, route, data = [], [], [], []
    req_op, req_pos, req_player = [], [], []
    for index, (player_ids, when, name, _, encoded, _) in enumerate(calls):
        op.append(index)
        ts.append(when)
        route.append(name)
        data.append(encoded)
        for pos, player_id in enumerate(player_ids):
            req_op.append(index)
            req_pos.append(pos)
            req_player.append(player_id)
    cursor.execute(_APPEND, {"op": op, "ts": ts, "route": route,
                             "data": data, "req_op": req_op,
                             "req_pos": req_pos, "req_player": req_player,
                             "max": calls[0][5]})
    results = [[None] * len(call[0]) for call in calls]
    for index, pos, seq in cursor.fetchall():
        _, when, name, value, _, _ = calls[index]
        results[index][pos] = Entry(seq, when, name, value)
    return results


def _append(cursor, *call):
    return _append_batch(cursor, [call])[0]


_append.batch = _append_batch


def _read_after(cursor, player_id, last_seq, cutoff):
    cursor.execute(
        "SELECT s.last_seq, s.acked, m.seq, m.ts, m.route, m.data"
        " FROM mmogate_mailbox_state s LEFT JOIN mmogate_mailbox m"
        " ON m.player_id = s.player_id AND m.seq > %s AND m.ts > %s"
        " WHERE s.player_id = %s ORDER BY m.seq", (last_seq, cutoff,
                                                   player_id))
    rows = cursor.fetchall()
    if not rows:
        return None, []
    assigned, acked = rows[0][0], rows[0][1]
    entries = [Entry(seq, ts, route, json.loads(data))
               for _, _, seq, ts, route, data in rows if seq is not None]
    return gap_of(last_seq, acked, assigned, entries), entries


def gap_of(last_seq, acked, assigned, entries):
    """
    The C{gap} of L{gate.mailbox.Mailbox.read_after}: pushes after
    C{max(last_seq, acked)} that retention dropped, or C{None}.
    """
    first_kept = entries[0].seq if entries else assigned + 1
    start = max(last_seq, acked) + 1
    if start < first_kept and start <= assigned:
        return (start, min(first_kept - 1, assigned))
    return None


def _ack_batch(cursor, calls):
    """
    Several acks in one statement; the highest seq per player counts.
    """
    highest = {}
    for player_id, seq in calls:
        highest[player_id] = max(seq, highest.get(player_id, seq))
    players = sorted(highest)
    cursor.execute(
        "WITH a AS (SELECT * FROM unnest(%s::text[], %s::bigint[])"
        " AS a(player_id, seq)),"
        " s AS (UPDATE mmogate_mailbox_state st"
        " SET acked = greatest(st.acked, least(a.seq, st.last_seq))"
        " FROM a WHERE st.player_id = a.player_id"
        " RETURNING st.player_id, st.acked)"
        " DELETE FROM mmogate_mailbox m USING s"
        " WHERE m.player_id = s.player_id AND m.seq <= s.acked",
        (players, [highest[p] for p in players]))
    return [None] * len(calls)


def _ack(cursor, player_id, seq):
    _ack_batch(cursor, [(player_id, seq)])


_ack.batch = _ack_batch


def _drop(cursor, player_id):
    cursor.execute("DELETE FROM mmogate_mailbox WHERE player_id = %s",
                   (player_id,))
    cursor.execute("DELETE FROM mmogate_mailbox_state WHERE player_id = %s",
                   (player_id,))


# The durable copy of mailboxes numbered by Redis (store.kind = redis).

#: The counter and incarnation of copies, raised (never lowered) by each
#: write; a copy of another incarnation starts over. Answers each player's
#: counters after the write and whether its copy was of another
#: incarnation (read before, without a lock: only a racing change of
#: incarnation could be missed). C{%(rows)s} is a statement that may use
#: C{up}, the counters after the write.
_UPSERT_COPY = """
WITH req AS (
    SELECT * FROM unnest(%%(player)s::text[], %%(seq)s::bigint[],
                         %%(acked)s::bigint[], %%(epoch)s::text[])
        AS r(player_id, seq, acked, epoch)
), old AS (
    SELECT s.player_id, s.epoch FROM mmogate_mailbox_state s
    JOIN req r USING (player_id)
), up AS (
    INSERT INTO mmogate_mailbox_state AS s (player_id, last_seq, acked,
                                            epoch, touched)
    SELECT player_id, seq, acked, epoch, %%(now)s FROM req ORDER BY player_id
    ON CONFLICT (player_id) DO UPDATE SET
        last_seq = CASE WHEN s.epoch IS DISTINCT FROM excluded.epoch
                   THEN excluded.last_seq
                   ELSE greatest(s.last_seq, excluded.last_seq) END,
        acked = CASE WHEN s.epoch IS DISTINCT FROM excluded.epoch
                THEN excluded.acked
                ELSE greatest(s.acked, excluded.acked) END,
        epoch = excluded.epoch,
        touched = greatest(s.touched, excluded.touched)
    RETURNING s.player_id, s.last_seq, s.acked
), rows AS (
    %(rows)s
)
SELECT up.player_id, up.last_seq, up.acked,
       old.player_id IS NOT NULL AND old.epoch IS DISTINCT FROM r.epoch
FROM up JOIN req r USING (player_id) LEFT JOIN old USING (player_id)
"""

#: Writes the rows of pushes, but none at or below the acked seq or
#: beyond player.mailbox_max.
_STORE_ROWS = _UPSERT_COPY % {"rows": """
    INSERT INTO mmogate_mailbox (player_id, seq, ts, route, data)
    SELECT x.player_id, x.seq, x.ts, x.route, x.data
    FROM unnest(%(r_player)s::text[], %(r_seq)s::bigint[],
                %(r_ts)s::float8[], %(r_route)s::text[], %(r_data)s::text[])
        AS x(player_id, seq, ts, route, data)
    JOIN up USING (player_id)
    WHERE x.seq > up.acked AND x.seq > up.last_seq - %(max)s
    ON CONFLICT (player_id, seq) DO UPDATE SET ts = excluded.ts,
        route = excluded.route, data = excluded.data
"""}

#: Deletes the rows acked.
_ACK_ROWS = _UPSERT_COPY % {"rows": """
    DELETE FROM mmogate_mailbox m USING up
    WHERE m.player_id = up.player_id AND m.seq <= up.acked
"""}

#: A player's copy is trimmed to player.mailbox_max when a write brings
#: one of its seqs to a multiple of this: so at most this many pushes
#: beyond it are kept meanwhile (snapshots read no more than the limit).
TRIM_EVERY = 32


def _write_copy(cursor, statement, args, players, keep):
    """
    Run C{statement} (L{_STORE_ROWS} or L{_ACK_ROWS}), then empty the
    copies that were of another incarnation but for the rows C{keep} (a
    dict of player id to the seqs just written).

    @return: C{{player_id: (last_seq, acked)}} after the write.
    """
    cursor.execute(statement, args)
    state, changed = {}, []
    for player_id, last_seq, done, other in cursor.fetchall():
        state[player_id] = (last_seq, done)
        if other:
            changed.append(player_id)
    for player_id in changed:
        # Redis made the player anew: its seqs started over.
        cursor.execute("DELETE FROM mmogate_mailbox WHERE player_id = %s"
                       " AND NOT seq = ANY(%s)",
                       (player_id, keep.get(player_id, [])))
    return state


def _store_numbered_batch(cursor, calls):
    """
    Write the entries of several pushes, numbered by Redis, in one
    statement for all of them: each player's counter raised to at least
    its highest seq, and rows with the given seqs (a row written again is
    replaced) except those at or below the acked seq or beyond
    C{player.mailbox_max}.

    @param calls: C{(entries, ts, route, encoded, max_entries, now)} per
        push, C{entries} a list of C{(player_id, seq, epoch)}.
    """
    epochs, top, rows = {}, {}, {}
    trim = set()
    now = 0.0
    maximum = calls[0][4]
    for entries, ts, route, encoded, _, when in calls:
        now = max(now, when)
        value = (ts, route, encoded)
        for player_id, seq, epoch in entries:
            epochs[player_id] = epoch
            if seq > top.get(player_id, 0):
                top[player_id] = seq
            rows[(player_id, seq)] = value
            if seq % TRIM_EVERY == 0 and seq > maximum:
                trim.add(player_id)
    players = sorted(epochs)
    keys = sorted(rows)
    keep = {}
    for player_id, seq in keys:
        keep.setdefault(player_id, []).append(seq)
    state = _write_copy(cursor, _STORE_ROWS, {
        "player": players, "seq": [top[p] for p in players],
        "acked": [0] * len(players), "epoch": [epochs[p] for p in players],
        "now": now, "max": maximum,
        "r_player": [p for p, _ in keys], "r_seq": [q for _, q in keys],
        "r_ts": [rows[k][0] for k in keys],
        "r_route": [rows[k][1] for k in keys],
        "r_data": [rows[k][2] for k in keys]}, players, keep)
    if trim:
        trimmed = sorted(trim)
        cursor.execute(
            "DELETE FROM mmogate_mailbox m USING unnest(%s::text[],"
            " %s::bigint[]) AS c(player_id, cut)"
            " WHERE m.player_id = c.player_id AND m.seq <= c.cut",
            (trimmed, [state[p][0] - maximum for p in trimmed]))
    return [None] * len(calls)


def _store_numbered(cursor, *call):
    _store_numbered_batch(cursor, [call])


_store_numbered.batch = _store_numbered_batch


def _mirror_acks(cursor, acks, now):
    """
    Acks Redis recorded, in one statement: C{acks} maps player id to
    C{(seq, epoch)}.
    """
    players = sorted(acks)
    seqs = [acks[p][0] for p in players]
    _write_copy(cursor, _ACK_ROWS, {
        "player": players, "seq": seqs, "acked": seqs,
        "epoch": [acks[p][1] for p in players], "now": now}, players, {})


def _snapshot(cursor, player_ids, cutoff, max_entries):
    cursor.execute(
        "SELECT s.player_id, s.epoch, s.last_seq, s.acked, m.seq, m.ts,"
        " m.route, m.data"
        " FROM mmogate_mailbox_state s LEFT JOIN mmogate_mailbox m"
        " ON m.player_id = s.player_id AND m.seq > s.acked AND m.ts > %s"
        " AND m.seq > s.last_seq - %s"
        " WHERE s.player_id = ANY(%s) AND s.epoch IS NOT NULL"
        " AND s.touched > %s ORDER BY s.player_id, m.seq",
        (cutoff, max_entries, list(player_ids), cutoff))
    found = {}
    for player_id, epoch, last_seq, acked, seq, ts, route, data \
            in cursor.fetchall():
        snapshot = found.get(player_id)
        if snapshot is None:
            snapshot = found[player_id] = (epoch, last_seq, acked, [])
        if seq is not None:
            snapshot[3].append(Entry(seq, ts, route, json.loads(data)))
    return found


def _scalar(cursor, query, args, default):
    cursor.execute(query, args)
    row = cursor.fetchone()
    return row[0] if row is not None else default


@implementer(IMailboxStore)
class PostgresMailboxStore:
    """
    Mailboxes in PostgreSQL, shared by every gate on the DSN: C{seq} comes
    from a per-player counter row, bumped for all recipients of a push in
    one statement.

    Retention is that of L{gate.mailbox.Mailbox}: each append deletes what
    is beyond C{player.mailbox_max} for its players (an index range, usually
    one row); pushes older than C{player.idle_timeout} are skipped by reads
    and deleted by the store's periodic sweep.
    """

    log = Logger()

    def __init__(self, db, max_entries, max_age):
        self._db = db
        self._max_entries = max_entries
        self._max_age = max_age
        self._acks = {}
        self._acks_writing = False
        self._acks_failing = False
        self._acks_dropped = 0

    @property
    def reachable(self):
        return self._db.reachable

    @property
    def problem(self):
        return self._db.problem

    def _cutoff(self):
        return self._db.clock.seconds() - self._max_age

    def append(self, player_ids, route, data, ts):
        player_ids = list(player_ids)
        if not player_ids:
            return succeed([])
        if "\x00" in route or any("\x00" in p for p in player_ids):
            return fail(ValueError("PostgreSQL cannot store a player id or "
                                   "route containing NUL"))
        encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False)
        return self._db.write(_append, player_ids, ts, route, data, encoded,
                              self._max_entries)

    def read_after(self, player_id, last_seq):
        return self._db.run(_read_after, player_id, last_seq, self._cutoff())

    def ack(self, player_id, seq):
        # Nobody waits for an ack: a failure is logged, not raised.
        return self._db.write(_ack, player_id, seq).addErrback(
            self._lost, "ack", player_id)

    def last_seq(self, player_id):
        return self._db.run(
            _scalar, "SELECT last_seq FROM mmogate_mailbox_state"
            " WHERE player_id = %s", (player_id,), 0)

    def size(self, player_id):
        return self._db.run(
            _scalar, "SELECT count(*) FROM mmogate_mailbox"
            " WHERE player_id = %s AND ts > %s",
            (player_id, self._cutoff()), 0)

    def drop(self, player_id):
        return self._db.write(_drop, player_id).addErrback(
            self._lost, "drop", player_id)

    # The durable copy of mailboxes Redis numbers (store.kind = redis).

    def store_numbered(self, entries, ts, route, data):
        """
        Write one push as Redis numbered it: C{entries} holds C{(player_id,
        seq, epoch)} per recipient. Through the ordered write lane, all
        recipients in one transaction (with the writes queued beside it);
        a player whose copy is of another incarnation starts over.

        @return: L{Deferred} firing once committed.
        """
        if "\x00" in route or any("\x00" in e[0] for e in entries):
            return fail(ValueError("PostgreSQL cannot store a player id or "
                                   "route containing NUL"))
        encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False)
        return self._db.write(_store_numbered, entries, ts, route, encoded,
                              self._max_entries, self._db.clock.seconds())

    def mirror_ack(self, player_id, seq, epoch):
        """
        Record an ack Redis took: off the session's path, coalesced per
        player (the highest seq counts) and written in one statement for
        all the players whose acks came while the last write ran. While
        PostgreSQL is away they wait (the next ack tries again). At most
        L{MAX_ACKS} players wait; beyond that acks are dropped (logged).
        """
        if "\x00" in player_id:
            return
        self._keep_ack(player_id, seq, epoch)
        if not self._acks_writing:
            self._write_acks()

    def _keep_ack(self, player_id, seq, epoch):
        acks = self._acks
        current = acks.get(player_id)
        if current is not None and current[1] == epoch:
            if seq > current[0]:
                acks[player_id] = (seq, epoch)
        elif current is None and len(acks) >= MAX_ACKS:
            self._acks_dropped += 1
            if self._acks_dropped in (1, 1000) or \
                    self._acks_dropped % 100000 == 0:
                self.log.warn("{n} acks not mirrored to PostgreSQL: too "
                              "many waiting", n=self._acks_dropped)
        else:
            acks[player_id] = (seq, epoch)

    def _write_acks(self):
        acks, self._acks = self._acks, {}
        if not acks:
            self._acks_writing = False
            return
        self._acks_writing = True
        d = self._db.write(_mirror_acks, acks, self._db.clock.seconds())

        def written(_):
            self._acks_failing = False
            self._write_acks()

        def failed(failure):
            self._acks_writing = False
            if lost_connection(failure.value):
                # Back in the buffer (newer acks kept); the next ack
                # tries again.
                for player_id, (seq, epoch) in acks.items():
                    if player_id not in self._acks:
                        self._keep_ack(player_id, seq, epoch)
                if not self._acks_failing:
                    self._acks_failing = True
                    self._lost(failure, "ack mirror", next(iter(acks)))
            else:
                self.log.failure("acks refused by PostgreSQL", failure)

        d.addCallbacks(written, failed)

    def acks_written(self):
        """
        @return: L{Deferred} firing once no mirrored ack waits (tests).
        """
        if not self._acks_writing:
            return succeed(None)
        return self._db.wait_written().addCallback(
            lambda _: self.acks_written())

    def snapshot(self, player_ids):
        """
        The durable copies of C{player_ids} that are not expired (written
        within C{player.idle_timeout}): through the write lane, so after
        this gate's writes before it.

        @return: L{Deferred} firing with C{{player_id: (epoch, last_seq,
            acked, entries)}}, C{entries} the retained pushes after the
            acked seq, oldest first.
        """
        return self._db.write(_snapshot, list(player_ids), self._cutoff(),
                              self._max_entries)

    def _lost(self, failure, what, player_id):
        self.log.warn("PostgreSQL mailbox {what} for player {player_id} "
                      "failed: {problem}", what=what, player_id=player_id,
                      problem=failure.getErrorMessage())


# The audit log.

def _insert_audit(cursor, rows):
    psycopg2.extras.execute_values(
        cursor, "INSERT INTO mmogate_audit (event, player_id, session_id,"
        " gate_id, peer, reason, ts) VALUES %s", rows, page_size=1000)


def _history(cursor, player_id, session_id, limit):
    where, args = [], []
    if player_id is not None:
        where.append("player_id = %s")
        args.append(player_id)
    if session_id is not None:
        where.append("session_id = %s")
        args.append(session_id)
    cursor.execute(
        f"SELECT {', '.join(FIELDS)} FROM mmogate_audit"
        f"{' WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY ts DESC, id DESC LIMIT %s", args + [limit])
    return [as_record(row) for row in cursor.fetchall()]


def _clean(value):
    # PostgreSQL text cannot hold NUL; one such id must not block the batch.
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


@implementer(IAuditLog)
class PostgresAuditLog:
    """
    Audit events written in batches (every L{AUDIT_INTERVAL} seconds, or
    at L{AUDIT_BATCH} rows) off the session's path. While PostgreSQL is
    away at most C{max_buffer} rows wait, the oldest are dropped beyond
    that (C{mmogate_audit_dropped}), and writing backs off up to
    C{store.retry_max}.
    """

    log = Logger()

    def __init__(self, db, max_buffer, gate_id, registry=None):
        self._db = db
        self.max_buffer = max_buffer
        self._buffer = deque()
        self._writing = False
        self._waiters = []
        self._loop = None
        self._retry_at = 0.0
        self._delay = AUDIT_INTERVAL
        self._soon = None
        self.dropped = 0
        self._dropped_metric = None
        if registry is not None:
            self._dropped_metric = Counter(
                "mmogate_audit_dropped", "Audit events dropped because "
                "PostgreSQL could not take them in time", registry=registry)
            Gauge("mmogate_audit_buffered", "Audit events waiting for "
                  "PostgreSQL", registry=registry).set_function(
                      lambda: len(self._buffer))

    def record(self, event, player_id, session_id, gate_id, peer, reason, ts):
        buffer = self._buffer
        if len(buffer) >= self.max_buffer:
            buffer.popleft()
            self._count_dropped(1)
        buffer.append((event, _clean(player_id), _clean(session_id),
                       _clean(gate_id), _clean(peer), _clean(reason), ts))
        if (len(buffer) >= AUDIT_BATCH and not self._writing
                and self._soon is None and self._db.running):
            self._soon = self._db.clock.callLater(0, self._write_soon)

    def _count_dropped(self, n):
        self.dropped += n
        if self._dropped_metric is not None:
            self._dropped_metric.inc(n)

    def _write_soon(self):
        self._soon = None
        self._tick()

    def start(self):
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._db.clock
        self._loop.start(AUDIT_INTERVAL, now=False)

    def _tick(self):
        if (self._buffer and not self._writing
                and self._db.clock.seconds() >= self._retry_at):
            self._write()

    def _write(self):
        buffer = self._buffer
        rows = [buffer.popleft() for _ in range(min(len(buffer),
                                                    self.max_buffer))]
        self._writing = True
        d = self._db.run(_insert_audit, rows)

        def written(_):
            self._delay = AUDIT_INTERVAL
            self._retry_at = 0.0

        def failed(failure):
            # Back in front, newest kept when over the bound.
            buffer.extendleft(reversed(rows))
            over = len(buffer) - self.max_buffer
            if over > 0:
                for _ in range(over):
                    buffer.popleft()
                self._count_dropped(over)
            self._retry_at = self._db.clock.seconds() + self._delay
            self._delay = min(self._delay * 2, self._db.retry_max)
            if not failure.check(StoreUnavailable):
                self.log.failure("audit rows refused by PostgreSQL", failure)

        def finished(_):
            self._writing = False
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
            if len(buffer) >= AUDIT_BATCH and self._retry_at == 0.0:
                self._tick()

        return d.addCallbacks(written, failed).addBoth(finished)

    def flush(self):
        """
        Write what is buffered now (after a write in flight).

        @return: L{Deferred} firing when done; it never fails (the rows
            stay buffered when PostgreSQL is away).
        """
        if self._writing:
            d = Deferred()
            self._waiters.append(d)
            return d.addCallback(lambda _: self.flush())
        if not self._buffer:
            return succeed(None)
        return self._write()

    def stop(self):
        """
        Stop the timer and write everything still buffered, while that
        succeeds.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None

        def more(_):
            if self._buffer and self._retry_at == 0.0:
                return self.flush().addCallback(more)
            if self._buffer:
                self.log.warn("{n} audit events not written: PostgreSQL "
                              "is away", n=len(self._buffer))
            return None

        self._retry_at = 0.0
        return self.flush().addCallback(more)

    def history(self, player_id=None, session_id=None, limit=100):
        """
        Events written so far and those buffered when asked (written
        first): fails with L{StoreUnavailable} while PostgreSQL is away.
        """
        d = self.flush()
        return d.addCallback(lambda _: self._db.run(_history, player_id,
                                                    session_id, limit))

    def __len__(self):
        return len(self._buffer)
