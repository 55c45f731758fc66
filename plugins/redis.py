"""
The Redis store (C{store.kind = "redis"}): a player directory, mailboxes and
a bus shared by every gate on the same Redis and C{store.redis_prefix}.

Two connections, each remade with exponential backoff capped by
C{store.retry_max} (L{_Link}): one for commands (pipelined, one Lua script
per step, see L{mmogate_plugins.redis_scripts}), one subscribed to this
gate's channel and the cluster's. A command that finds no connection, or
gets no answer within C{store.timeout}, fails at once with
L{gate.cluster.StoreUnavailable} (the connection is dropped and remade), so
nothing waits on an absent Redis; C{reachable} is false meanwhile and the
receiver is told to resynchronise when both connections are back.

Layout and message format: L{mmogate_plugins.redis_scripts}; guarantees:
C{docs/cluster.md}.
"""

import hashlib
import json
import random
import secrets
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import protocol
from twisted.internet.defer import (Deferred, FirstError, ensureDeferred,
                                    fail, gatherResults, succeed)
from twisted.internet.endpoints import (HostnameEndpoint, UNIXClientEndpoint,
                                        wrapClientTLS)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from gate import errors
from gate.cluster import StoreUnavailable
from gate.envelope import encode, loads
from gate.errors import GateError
from gate.interfaces import IClusterBus, IMailboxStore, IPlayerDirectory
from gate.mailbox import Entry
from gate.player import Claim, Location
from mmogate_plugins import redis_scripts
from mmogate_plugins.postgres import StoreUnavailable as PostgresUnavailable

#: Players per script call of a push or a refresh: a push to more is split,
#: so that one call never holds Redis for long (each player's pushes stay
#: in order: the calls go out in order on one connection).
CHUNK = 1000

#: Seqs and acks beyond this are clamped (Lua numbers are doubles).
MAX_SEQ = 10 ** 13

#: Entries per read of a long mailbox: a replay reads the next page as the
#: client drains the last (L{gate.session.Session.end_replay}).
PAGE = 200

_STATUS = {-1: "unknown", 0: "offline", 1: "delivered"}
_REFRESH = {0: "missing", 1: "ok", 2: "elsewhere", 3: "recreated",
            4: "absent", 5: "adopted", 6: "restored"}

#: What a claim refused by a ban (CLAIM answers -1 and -2) is answered.
BANNED = "player {!r} is banned for now"
REVOKED = ("resume token rejected: resume token was revoked (the player "
           "was kicked with a ban)")


def _b(value):
    """
    Bytes for Redis: ids may hold any character JSON can carry, lone
    surrogates included.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode("ascii")
    if isinstance(value, int):
        return b"%d" % value
    return value.encode("utf-8", "surrogatepass")


def _s(value):
    return value.decode("utf-8", "surrogatepass")


def parse_url(url):
    """
    C{redis://[user:password@]host[:port][/db]}, C{rediss://...} (TLS) or
    C{unix:///path?db=N}: a dict of connection settings.
    """
    parts = urlsplit(url)
    db = None
    if parts.scheme == "unix":
        query = parse_qs(parts.query)
        if "db" in query:
            db = int(query["db"][0])
        path = parts.path
    else:
        path = None
        name = parts.path.strip("/")
        if name:
            db = int(name)
    return {"scheme": parts.scheme, "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 6379, "path": path, "db": db,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None}


class _Protocol(txredisapi.BaseRedisProtocol):
    """
    Commands: a reply is C{bytes} or C{int}, never converted.
    """

    def _build_command(self, *args, **kwargs):
        # A push's script call has a few arguments per player: encode them
        # in one pass (txredisapi's own builder costs several times more).
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            if not isinstance(arg, bytes):
                arg = _b(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(parts)


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.link.store._message(message)


class _Factory(protocol.Factory):
    """
    Builds the txredisapi protocol of one L{_Link}.
    """

    noisy = False
    isLazy = False

    def __init__(self, link, protocol_class, settings, timeout):
        self.link = link
        self.protocol_class = protocol_class
        self.settings = settings
        self.timeout = timeout

    def buildProtocol(self, addr):
        settings = self.settings
        p = self.protocol_class(charset=None, replyTimeout=self.timeout,
                                password=settings["password"],
                                dbid=settings["db"], convertNumbers=False,
                                username=settings["username"])
        p.factory = self
        return p

    # What txredisapi's protocol calls when AUTH or SELECT fails.

    def stopTrying(self):
        pass

    def connectionError(self, why):
        self.link.store.log.error("Redis ({name}): {why}",
                                  name=self.link.name, why=why)


class _Link:
    """
    One connection to Redis, remade with exponential backoff (capped by
    C{store.retry_max}) whenever it fails or is lost, including while it
    is being prepared (scripts loaded, channels subscribed).

    @ivar proto: the connected, prepared protocol, or C{None}.
    """

    def __init__(self, store, name, protocol_class, prepare):
        self.store = store
        self.name = name
        self.proto = None
        self._prepare = prepare
        self._factory = _Factory(self, protocol_class, store.settings,
                                 store.timeout)
        self._running = False
        self._failures = 0
        self._attempt = None
        self._retry_call = None
        self._connection = None
        self._gone = []

    @property
    def running(self):
        return self._running

    def start(self):
        if self._running:
            return
        self._running = True
        self._connect()

    def _connect(self):
        self._retry_call = None
        self._attempt = self.store.endpoint().connect(self._factory)
        self._attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, proto):
        self._attempt = None
        self._connection = proto
        proto.whenDisconnected().addCallback(lambda _: self._lost(proto))
        d = proto.whenConnected()
        d.addCallback(lambda _: self._prepare(proto))
        d.addCallbacks(lambda _: self._up(proto),
                       lambda failure: self._not_prepared(failure, proto))

    def _not_prepared(self, failure, proto):
        self.store.log.debug("Redis ({name}) not prepared: {error}",
                             name=self.name,
                             error=failure.getErrorMessage())
        proto.transport.abortConnection()

    def _up(self, proto):
        if not proto.connected or self._connection is not proto:
            return
        self._failures = 0
        self.proto = proto
        self.store._changed()

    def drop(self, proto):
        """
        C{proto} timed out and is being aborted: send nothing more on it
        (its late replies must not answer later commands). Reconnecting
        follows its loss (L{_lost}).
        """
        if self.proto is proto:
            self.proto = None
            self.store._changed(lost=self)

    def _lost(self, proto):
        if self._connection is proto:
            self._connection = None
        if self.proto is proto:
            self.proto = None
            self.store._changed(lost=self)
        self._retry()

    def _failed(self, failure):
        self._attempt = None
        self._retry()

    def _retry(self):
        if not self._running:
            gone, self._gone = self._gone, []
            for d in gone:
                d.callback(None)
            return
        delay = min(self.store.retry_max, 0.05 * 2 ** self._failures)
        self._failures += 1
        delay *= 1 + 0.2 * random.random()
        self._retry_call = self.store.clock.callLater(delay, self._connect)

    def stop(self):
        """
        Stop reconnecting and close the connection.

        @return: L{Deferred} firing once it is closed.
        """
        self._running = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self._connection is None:
            return succeed(None)
        d = Deferred()
        self._gone.append(d)
        self._connection.transport.loseConnection()
        return d


@implementer(IPlayerDirectory, IMailboxStore, IClusterBus)
class RedisStore:
    """
    Player directory, mailboxes and cluster bus in Redis.

    @param clock: the reactor (connections, timeouts, backoff).
    @param url: C{store.redis_url}.
    @param prefix: C{store.redis_prefix}, before every key and channel.
    @param max_entries: C{player.mailbox_max}.
    @param max_age: C{player.idle_timeout}: pushes older are dropped, and
        entries outlive their last refresh by it plus a margin.
    @param retry_max: C{store.retry_max}, the longest reconnect backoff.
    @param timeout: C{store.timeout}, the longest wait for a reply.
    @param gate_ttl: C{store.gate_ttl}, how long a heartbeat keeps a gate
        alive.
    @param time: what tells "now" for retention by age (default: C{clock});
        tests give a L{twisted.internet.task.Clock}.
    """

    shared = True
    log = Logger()
    #: Mailbox reads page by this many entries (L{read_after}'s C{count}).
    page_size = PAGE

    def __init__(self, clock, url, prefix, max_entries, max_age, retry_max,
                 timeout, gate_ttl, time=None):
        self.clock = clock
        self.time = time if time is not None else clock
        self.settings = parse_url(url)
        #: For logs: without the password.
        self.url = url if not self.settings["password"] else \
            url.replace(":" + self.settings["password"] + "@", ":***@", 1)
        self.prefix = _b(prefix)
        self.max_entries = max_entries
        self.max_age = max_age
        self.retry_max = retry_max
        self.timeout = timeout
        self.gate_ttl = gate_ttl
        #: Milliseconds a directory entry and its mailbox outlive the last
        #: claim, release or refresh: past the idle timeout, so the gate's
        #: own expiry (which tells the backend) normally comes first.
        self.key_ttl_ms = int((max_age + max(5.0, max_age / 2)) * 1000)
        self.reachable = False
        #: The durable copy of the mailboxes (L{mmogate_plugins.postgres.
        #: PostgresMailboxStore}) when C{store.postgres_dsn} is set: pushes
        #: are written through to it before they are answered, acks and
        #: drops follow, and a player Redis lost is put back from it
        #: (C{docs/persistence.md}).
        self.durable = None
        self._gate_id = None
        #: This process: in its heartbeat and in the entries it claims, so
        #: that the sessions of an earlier process of the same gate id
        #: count as gone (offline, their pushes queued), not as live.
        self.boot = secrets.token_hex(8)
        self._receiver = None
        self._waiters = []
        self._missed = False
        self._shas = {name: hashlib.sha1(text.encode("utf-8")).hexdigest()
                      for name, text in redis_scripts.ALL.items()}
        self._cmd = _Link(self, "commands", _Protocol, self._load_scripts)
        self._sub = None

    @classmethod
    def from_config(cls, clock, config):
        return cls(clock, config["store.redis_url"],
                   config["store.redis_prefix"], config["player.mailbox_max"],
                   config["player.idle_timeout"], config["store.retry_max"],
                   config["store.timeout"], config["store.gate_ttl"])

    # Connections.

    def endpoint(self):
        settings = self.settings
        if settings["scheme"] == "unix":
            return UNIXClientEndpoint(self.clock, settings["path"],
                                      timeout=self.timeout)
        endpoint = HostnameEndpoint(self.clock, settings["host"],
                                    settings["port"], timeout=self.timeout)
        if settings["scheme"] == "rediss":
            endpoint = wrapClientTLS(optionsForClientTLS(settings["host"]),
                                     endpoint)
        return endpoint

    def start(self):
        """
        Connect (and keep reconnecting); commands fail until connected.
        """
        self._cmd.start()

    def when_reachable(self):
        """
        @return: L{Deferred} firing once the store is reachable.
        """
        if self.reachable:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d

    def _load_scripts(self, proto):
        return gatherResults([proto.execute_command("SCRIPT", "LOAD", text)
                              for text in redis_scripts.ALL.values()],
                             consumeErrors=True)

    def _subscribe(self, proto):
        return proto.subscribe([self._channel(self._gate_id),
                                self.prefix + b"all"])

    def _changed(self, lost=None):
        if lost is self._sub:
            # Messages published until it is back are not seen.
            self._missed = True
        up = self._cmd.proto is not None and (
            self._sub is None or self._sub.proto is not None)
        if up == self.reachable:
            return
        self.reachable = up
        if not up:
            self.log.warn("Redis at {url} unreachable; reconnecting",
                          url=self.url)
            return
        self.log.info("Redis at {url} reachable", url=self.url)
        if self._receiver is not None:
            missed, self._missed = self._missed, False
            # At once, so that the heartbeat is the first command sent.
            try:
                self._receiver.resync(missed)
            except Exception:
                self.log.failure("resynchronising after reconnecting failed")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _channel(self, gate_id):
        return self.prefix + b"c:" + _b(gate_id)

    def _message(self, message):
        try:
            cut = message.index(b"\n")
            header = json.loads(_s(message[:cut]))
            payload = message[cut + 1:]
        except ValueError:
            self.log.error("bad message on the cluster bus: {message!r}",
                           message=message[:200])
            return
        if self._receiver is None:
            return
        try:
            self._receiver.received(header, payload)
        except Exception:
            self.log.failure("handling {op} from the cluster bus failed",
                             op=header.get("op"))

    # Commands.

    def _call(self, *args):
        proto = self._cmd.proto
        if proto is None:
            return fail(StoreUnavailable())
        try:
            d = proto.execute_command(*args)
        except txredisapi.ConnectionError:
            return fail(StoreUnavailable())
        return d.addErrback(self._failed, proto)

    def _eval(self, name, keys, args):
        d = self._call(b"EVALSHA", self._shas[name], len(keys), *keys,
                       *[_b(a) for a in args])

        def missing(failure):
            # Scripts flushed on a live connection: send the text.
            failure.trap(txredisapi.ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self._call(b"EVAL", redis_scripts.ALL[name], len(keys),
                              *keys, *[_b(a) for a in args])

        return d.addErrback(missing)

    def _failed(self, failure, proto=None):
        # Clients and the push API are told the store is away; the log
        # says why (once, as the connection drops).
        if failure.check(txredisapi.TimeoutError) and proto is not None:
            self._cmd.drop(proto)
        if failure.check(txredisapi.ConnectionError):
            raise StoreUnavailable()
        return failure

    def _dir(self, player_id):
        return self.prefix + b"p:" + _b(player_id)

    def _box(self, player_id):
        return self.prefix + b"m:" + _b(player_id)

    def _keys(self, player_id):
        return [self._dir(player_id), self._box(player_id)]

    def _gate_set(self, gate_id):
        return self.prefix + b"s:" + _b(gate_id)

    def _limit(self):
        return self.time.seconds() - self.max_age

    # IPlayerDirectory.

    def _ban_key(self, player_id):
        return self.prefix + b"b:" + _b(player_id)

    def claim(self, player_id, gate_id, session_id, now, epoch=None,
              issued=None):
        """
        One script call, which also refuses a banned player (and, for a
        resume, a token issued before a ban: C{issued} is its C{iat}).
        With a durable copy, a player Redis does not know is first looked
        up there and, if found, put back with its incarnation, seqs and
        retained pushes before it is claimed.
        """
        keys = self._keys(player_id) + [self._ban_key(player_id),
                                        self._gate_set(gate_id)]
        args = [gate_id, session_id, float(now), secrets.token_hex(8),
                epoch or "", self.key_ttl_ms,
                float(issued) if isinstance(issued, (int, float))
                and not isinstance(issued, bool) else "", self.boot,
                self.prefix]
        durable = self.durable
        d = self._eval("claim", keys, args + ["ask" if durable else ""])

        def seed(snapshots):
            return self._eval("claim", keys, args + ["seed"] + _seed_args(
                snapshots.get(player_id), self.max_entries))

        def claimed(reply):
            status = reply[0]
            if status == 2:
                return durable.snapshot([player_id]).addCallback(
                    seed).addCallback(claimed)
            if status == -1:
                raise GateError(errors.AUTH_FAILED,
                                BANNED.format(player_id[:64]))
            if status == -2:
                raise GateError(errors.RESUME_REJECTED, REVOKED)
            if status == 0:
                return None
            current = _s(reply[1])
            previous = None
            previous_number = 0
            if len(reply) > 4:
                previous = Location(player_id, _s(reply[4]), _s(reply[5]),
                                    float(reply[6]), current)
                previous_number = int(reply[7])
            return Claim(previous, current, int(reply[2]), int(reply[3]),
                         previous_number)

        return d.addCallback(claimed)

    def ban(self, player_id, until, now, token_ttl):
        """
        Ban C{player_id} until C{until} and revoke the resume tokens issued
        to it up to C{now}, for every gate (checked by their claims).
        """
        return self._eval("ban", [self._ban_key(player_id),
                                  self._dir(player_id)],
                          [float(until), float(now), float(token_ttl)])

    def release(self, player_id, gate_id, session_id, now):
        return self._eval("release", self._keys(player_id),
                          [gate_id, session_id, float(now),
                           self.key_ttl_ms]).addCallback(bool)

    def lookup(self, player_id):
        d = self._call(b"HMGET", self._dir(player_id), b"g", b"s", b"t",
                       b"e")

        def found(reply):
            gate, session, since, epoch = reply
            if epoch is None:
                return None
            return Location(player_id, _s(gate),
                            _s(session) if session else None, float(since),
                            _s(epoch))

        return d.addCallback(found)

    def forget(self, player_id):
        return self._call(b"DEL", *self._keys(player_id)).addCallback(
            lambda _: None)

    def expire(self, player_id, gate_id, epoch):
        return self._eval("expire", self._keys(player_id)
                          + [self._gate_set(gate_id)],
                          [gate_id, epoch or "", player_id]).addCallback(
            lambda status: status == 1)

    # IMailboxStore.

    def append(self, player_ids, route, data, ts):
        head = _head(route, data, ts)
        d = gatherResults([
            self._eval("append", self._keys(player_id),
                       [player_id, float(ts), head, self.max_entries])
            for player_id in player_ids], consumeErrors=True)
        d.addErrback(_first_error)
        return d.addCallback(lambda seqs: [Entry(int(seq), ts, route, data)
                                           for seq in seqs])

    def read_after(self, player_id, last_seq, count=None):
        """
        L{IMailboxStore.read_after}; with C{count}, at most that many
        entries (a page: see L{gate.session.read_paged}).
        """
        d = self._eval("read", self._keys(player_id),
                       [min(last_seq, MAX_SEQ), self._limit(),
                        count if count else ""])

        def read(reply):
            assigned, acked, raw = int(reply[0]), int(reply[1]), reply[2]
            entries = [_entry(item) for item in raw]
            return _gap(last_seq, acked, assigned, entries), entries

        return d.addCallback(read)

    def ack(self, player_id, seq):
        d = self._eval("ack", self._keys(player_id), [min(seq, MAX_SEQ)])

        def acked(reply):
            seq, epoch = int(reply[0]), _s(reply[1])
            if self.durable is not None and seq > 0 and epoch:
                self.durable.mirror_ack(player_id, seq, epoch)

        def lost(failure):
            # An ack only trims: the client acks again later.
            self.log.debug("ack of {player_id} lost: {error}",
                           player_id=player_id,
                           error=failure.getErrorMessage())

        return d.addCallbacks(acked, lost)

    def last_seq(self, player_id):
        return self._call(b"HGET", self._dir(player_id), b"q").addCallback(
            lambda q: int(q) if q is not None else 0)

    def size(self, player_id):
        return self._eval("size", self._keys(player_id),
                          [self._limit()]).addCallback(int)

    def drop(self, player_id):
        d = self._eval("drop", self._keys(player_id), [])

        def dropped(status):
            # Not when the player lives again (on another gate): its
            # durable copy is its mailbox now.
            if status == 1 and self.durable is not None:
                return self.durable.drop(player_id)

        return d.addCallback(dropped).addCallback(lambda _: None)

    # IClusterBus.

    def listen(self, gate_id, receiver):
        self._gate_id = gate_id
        self._receiver = receiver
        if self._sub is None:
            self._sub = _Link(self, "subscriber", _Subscriber,
                              self._subscribe)
            self.reachable = False
        self.start()
        self._sub.start()
        return succeed(None)

    def place(self, gate_id, player_ids, head, ts, persist):
        durable = self.durable
        if durable is None:
            return self._place_all(player_ids, head, ts, persist, False)
        if persist and not durable.reachable:
            # Refused before Redis takes it: a retry cannot duplicate it.
            return fail(PostgresUnavailable(
                f"PostgreSQL unavailable: {durable.problem}"))
        d = self._place_all(player_ids, head, ts, persist, True)
        d.addCallback(self._place_known, durable, player_ids, head, ts,
                      persist)
        if persist:
            d.addCallback(self._write_through, durable, player_ids, head, ts)
        return d.addCallback(lambda results: [r[:2] for r in results])

    def _place_all(self, player_ids, head, ts, persist, epochs):
        chunks = [player_ids[i:i + CHUNK]
                  for i in range(0, len(player_ids), CHUNK)]
        d = gatherResults([self._place(chunk, head, ts, persist, epochs)
                           for chunk in chunks], consumeErrors=True)
        d.addErrback(_first_error)
        return d.addCallback(lambda parts: [r for part in parts
                                            for r in part])

    def _place(self, player_ids, head, ts, persist, epochs=False):
        epochs = epochs and persist
        keys = []
        for player_id in player_ids:
            keys += self._keys(player_id)
        d = self._eval("place", keys,
                       [(b"2" if epochs else b"1") if persist else b"0",
                        head, float(ts), self.max_entries, self.prefix,
                        *player_ids])
        if epochs:
            return d.addCallback(lambda reply: [
                (_STATUS[reply[i]], int(reply[i + 1]), _s(reply[i + 2]))
                for i in range(0, len(reply), 3)])
        return d.addCallback(lambda reply: [
            (_STATUS[reply[i]], int(reply[i + 1]))
            for i in range(0, len(reply), 2)])

    def _place_known(self, results, durable, player_ids, head, ts, persist):
        """
        Players Redis does not know may be known to the durable copy (Redis
        lost them): a persistent push puts them back (offline, without a
        gate) and is placed for them; a transient one counts them offline.
        """
        unknown = [i for i, r in enumerate(results) if r[0] == "unknown"]
        if not unknown:
            return results
        ids = [player_ids[i] for i in unknown]

        def found(snapshots):
            known = [i for i, player_id in zip(unknown, ids)
                     if player_id in snapshots]
            if not known:
                return results
            if not persist:
                for i in known:
                    results[i] = ("offline", 0, "")
                return results
            now = float(self.time.seconds())
            restores = []
            for i in known:
                player_id = player_ids[i]
                snapshot = snapshots[player_id]
                restores.append(self._eval(
                    "restore", self._keys(player_id),
                    ["", "", now, snapshot[0], 0, self.key_ttl_ms, self.boot,
                     self.prefix] + _seed_args(snapshot, self.max_entries)))
            # On the same connection, so after the restores.
            again = self._place_all([player_ids[i] for i in known], head,
                                    ts, True, True)
            d = gatherResults(restores + [again], consumeErrors=True)
            d.addErrback(_first_error)

            def placed(answers):
                for i, result in zip(known, answers[-1]):
                    results[i] = result
                return results

            return d.addCallback(placed)

        d = durable.snapshot(ids)
        if not persist:
            # Without the copy a transient push counts them unknown.
            d.addErrback(lambda _: {})
        return d.addCallback(found)

    def _write_through(self, results, durable, player_ids, head, ts):
        """
        Write the entries Redis numbered to the durable copy; the push is
        answered once they are committed (a failure answers 503).
        """
        entries = [(player_id, seq, epoch)
                   for player_id, (_, seq, epoch) in zip(player_ids, results)
                   if seq > 0]
        if not entries:
            return results
        push = loads(head + b"}")
        d = durable.store_numbered(entries, ts, push["route"], push["data"])
        return d.addCallback(lambda _: results)

    def send_to_player(self, player_id, op, payload):
        return self._eval("send", [self._dir(player_id)],
                          [self.prefix, op, payload, player_id]).addCallback(
            lambda n: n > 0)

    def send_to_gate(self, gate_id, header, payload):
        message = _b(json.dumps(header)) + b"\n" + payload
        return self._call(b"PUBLISH", self._channel(gate_id),
                          message).addCallback(lambda n: n > 0)

    def broadcast(self, gate_id, payload):
        message = (_b(json.dumps({"op": "broadcast", "from": gate_id}))
                   + b"\n" + payload)
        d = self._eval("broadcast", [], [self.prefix, message, gate_id])
        return d.addCallback(lambda reply: {
            _s(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)})

    def heartbeat(self, gate_id, online):
        """
        @return: L{Deferred} firing with whether the heartbeat was still
            there (if not, the gate counted as gone and pushes for its
            sessions were stored without being sent to it).
        """
        d = self._eval("heartbeat", [], [self.prefix, gate_id, online,
                                         int(self.gate_ttl * 1000),
                                         self.boot])
        d.addCallback(lambda was: was == 1)
        sub = self._sub.proto if self._sub is not None else None
        if sub is not None:
            # A subscriber that stopped answering is dropped (by the reply
            # timeout) and made again.
            sub.ping().addErrback(lambda _: None)
        return d

    def refresh(self, gate_id, players):
        chunks = [players[i:i + CHUNK] for i in range(0, len(players), CHUNK)]
        d = gatherResults([self._refresh(gate_id, chunk) for chunk in chunks],
                          consumeErrors=True)
        d.addErrback(_first_error)
        return d.addCallback(lambda parts: [r for part in parts
                                            for r in part])

    def _refresh(self, gate_id, players):
        keys = []
        durable = self.durable
        now = float(self.time.seconds())
        args = [gate_id, self.key_ttl_ms, now,
                "1" if durable is not None else "0", self.boot, self.prefix]
        for player_id, session_id, epoch, seq in players:
            keys += self._keys(player_id)
            args += [session_id or "", epoch or "", min(seq, MAX_SEQ)]
        d = self._eval("refresh", keys, args).addCallback(
            lambda reply: [_REFRESH[status] for status in reply])
        if durable is not None:
            d.addCallback(self._restore_absent, durable, gate_id, players,
                          now)
        return d

    def _restore_absent(self, statuses, durable, gate_id, players, now):
        """
        Put back the players Redis lost (C{"absent"}), from the durable
        copy: see RESTORE. Without it (PostgreSQL away too), online players
        are put back from what their sessions have, offline ones are left
        to their next claim.
        """
        absent = [i for i, status in enumerate(statuses)
                  if status == "absent"]
        if not absent:
            return statuses

        def found(snapshots, copies=True):
            restores = []
            for i in absent:
                player_id, session_id, epoch, seq = players[i]
                if not copies and not session_id:
                    restores.append(succeed(1))
                    continue
                restores.append(self._eval(
                    "restore", self._keys(player_id),
                    [gate_id, session_id or "", now, epoch or "",
                     min(seq, MAX_SEQ), self.key_ttl_ms, self.boot,
                     self.prefix]
                    + _seed_args(snapshots.get(player_id),
                                 self.max_entries)))
            d = gatherResults(restores, consumeErrors=True)
            d.addErrback(_first_error)

            def restored(replies):
                for i, status in zip(absent, replies):
                    statuses[i] = _REFRESH[status]
                return statuses

            return d.addCallback(restored)

        def without(failure):
            self.log.warn("players missing from Redis not restored from "
                          "PostgreSQL: {error}",
                          error=failure.getErrorMessage())
            return found({}, copies=False)

        d = durable.snapshot([players[i][0] for i in absent])
        return d.addCallbacks(found, without)

    def adopt(self, gate_id, now):
        """
        Take over the entries an earlier process of this gate id left (it
        died, or stopped with players offline on it): online ones are
        released, and all are this process's to expire from now on.

        @return: L{Deferred} firing with C{(player_id, epoch, since,
            session_id or None)} per entry taken over.
        """
        return ensureDeferred(self._adopt(gate_id, now))

    async def _adopt(self, gate_id, now):
        key = self._gate_set(gate_id)
        cursor = b"0"
        found = []
        while True:
            cursor, members = await self._call(b"SSCAN", key, cursor,
                                               b"COUNT", CHUNK)
            if members:
                reply = await self._eval(
                    "adopt", [self._dir(_s(m)) for m in members],
                    [gate_id, self.boot, float(now), self.key_ttl_ms,
                     self.prefix])
                for player, epoch, since, session in reply:
                    found.append((_s(player), _s(epoch), float(since),
                                  _s(session) or None))
            if int(cursor) == 0:
                return found

    def info(self, player_id):
        d = self._eval("info", self._keys(player_id),
                       [self._limit(), self.prefix])

        def found(reply):
            if reply is None:
                return None
            gate, session, since, epoch, last_seq, size, alive = reply
            location = Location(player_id, _s(gate),
                                _s(session) if session else None,
                                float(since), _s(epoch))
            return location, int(last_seq), int(size), alive == 1

        return d.addCallback(found)

    def stop(self, gate_id=None):
        """
        Take this gate's heartbeat down (after everything sent before it is
        answered, releases included), then disconnect.
        """
        if gate_id is not None and self.reachable:
            d = self._eval("leave", [], [self.prefix, gate_id, self.boot])
            d.addErrback(lambda f: self.log.warn(
                "leaving the cluster: {error}", error=f.getErrorMessage()))
        else:
            d = succeed(None)

        def disconnect(_):
            links = [self._cmd] + ([self._sub] if self._sub is not None
                                   else [])
            return gatherResults([link.stop() for link in links],
                                 consumeErrors=True)

        self._receiver = None
        return d.addCallback(disconnect).addCallback(self._stopped)

    def _stopped(self, _):
        self.reachable = False


def _head(route, data, ts):
    """
    The bytes of a push envelope without its closing brace, as
    L{gate.envelope.PushTemplate} makes them.
    """
    return encode({"t": "push", "route": route, "data": data, "ts": ts})[:-1]


def _entry(item):
    entry_id, fields = item
    seq = int(entry_id.split(b"-", 1)[0])
    values = dict(zip(fields[::2], fields[1::2]))
    push = loads(values[b"h"] + b"}")
    return Entry(seq, push["ts"], push["route"], push["data"])


def _gap(last_seq, acked, assigned, entries):
    """
    The C{gap} owed to a client resuming after C{last_seq}, exactly as
    L{gate.mailbox.Mailbox.read_after} computes it.
    """
    first_kept = entries[0].seq if entries else assigned + 1
    start = max(last_seq, acked) + 1
    if start < first_kept and start <= assigned:
        return (start, min(first_kept - 1, assigned))
    return None


def _seed_args(snapshot, max_entries):
    """
    The arguments of CLAIM's and RESTORE's durable copy: epoch (C{""} for
    none), seq, acked, mailbox_max, then (seq, ts, head) per retained push.

    @param snapshot: C{(epoch, last_seq, acked, entries)} from
        L{mmogate_plugins.postgres.PostgresMailboxStore.snapshot}, or
        C{None}.
    """
    if snapshot is None:
        return ["", 0, 0, max_entries]
    epoch, last_seq, acked, entries = snapshot
    args = [epoch, min(last_seq, MAX_SEQ), min(acked, MAX_SEQ), max_entries]
    for entry in entries[-max_entries:]:
        args += [entry.seq, float(entry.ts),
                 _head(entry.route, entry.data, entry.ts)]
    return args


def _first_error(failure):
    """
    The first failure of a L{gatherResults}, unwrapped.
    """
    failure.trap(FirstError)
    return failure.value.subFailure
