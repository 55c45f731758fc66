"""
The real services some tests need: Redis at 127.0.0.1:6379 and
PostgreSQL at 127.0.0.1:5432.

A test of a Redis or PostgreSQL part runs against the real server and is
skipped (with the reason) when it is unreachable, unless the environment
sets C{MMOGATE_REQUIRE_SERVICES=1} (as C{.ci/run} does): then it fails.
Call L{require_redis} or L{require_postgres} first thing in C{setUp}.

Also here: unique Redis key prefixes cleaned up after each test
(L{redis_prefix}), and L{TCPProxy}, a proxy a test can cut and restore to
play an outage without touching the machine's Redis.
"""

import os
import secrets
import socket

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import FailTest, SkipTest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432

#: How long the reachability probe may take.
PROBE_TIMEOUT = 2.0


def services_required():
    return os.environ.get("MMOGATE_REQUIRE_SERVICES") == "1"


def _absent(name, why):
    """
    Skip (or, when services are required, fail) for a missing service.
    """
    reason = f"{name} is not reachable ({why})"
    if services_required():
        raise FailTest(f"{reason}, and MMOGATE_REQUIRE_SERVICES=1")
    raise SkipTest(reason)


def _probe(host, port, hello=None, expect=None):
    """
    C{None} if C{host:port} accepts a connection (and answers C{hello}
    with bytes starting with C{expect}), else why not.
    """
    try:
        with socket.create_connection((host, port),
                                      timeout=PROBE_TIMEOUT) as s:
            if hello is None:
                return None
            s.sendall(hello)
            answer = s.recv(64)
    except OSError as e:
        return f"{host}:{port}: {e}"
    if not answer.startswith(expect):
        return f"{host}:{port} answered {answer[:32]!r}"
    return None


def require_redis():
    """
    Skip the test unless Redis answers at 127.0.0.1:6379 (fail instead
    when C{MMOGATE_REQUIRE_SERVICES=1}).
    """
    why = _probe(REDIS_HOST, REDIS_PORT, b"PING\r\n", b"+PONG")
    if why is not None:
        _absent("Redis", why)


def require_postgres():
    """
    Skip the test unless PostgreSQL accepts connections at 127.0.0.1:5432
    (fail instead when C{MMOGATE_REQUIRE_SERVICES=1}).
    """
    why = _probe(POSTGRES_HOST, POSTGRES_PORT)
    if why is not None:
        _absent("PostgreSQL", why)


# Redis keys of one test.

def redis_prefix(test):
    """
    A key prefix no other test (or test run) uses; every key under it is
    deleted in C{test}'s cleanups.
    """
    prefix = f"mmogate-test-{secrets.token_hex(6)}:"
    test.addCleanup(delete_keys, prefix)
    return prefix


def redis_keys(prefix):
    """
    Every key under C{prefix} (SCAN, so never a blocking KEYS): a
    L{Deferred}.
    """
    return ensureDeferred(_redis_keys(prefix))


async def _redis_keys(prefix):
    redis = await txredisapi.Connection(REDIS_HOST, REDIS_PORT,
                                        reconnect=False, charset=None,
                                        convertNumbers=False)
    try:
        found = []
        cursor = 0
        while True:
            cursor, keys = await redis.scan(cursor, prefix + "*", 500)
            found.extend(keys)
            if int(cursor) == 0:
                return sorted(set(found))
    finally:
        await redis.disconnect()


def redis_command(*args):
    """
    One command on a connection of its own: a L{Deferred} of its answer.
    """
    return ensureDeferred(_redis_command(*args))


async def _redis_command(*args):
    redis = await txredisapi.Connection(REDIS_HOST, REDIS_PORT,
                                        reconnect=False, charset=None,
                                        convertNumbers=False)
    try:
        return await redis.execute_command(*args)
    finally:
        await redis.disconnect()


async def delete_keys(prefix):
    keys = await redis_keys(prefix)
    for i in range(0, len(keys), 500):
        await redis_command("DEL", *keys[i:i + 500])


# An outage on demand.

class _Outbound(Protocol):
    def __init__(self, inbound):
        self.inbound = inbound

    def connectionMade(self):
        self.inbound.outbound = self
        if self.inbound.pending:
            self.transport.write(b"".join(self.inbound.pending))
            self.inbound.pending = []
        if self.inbound.gone:
            self.transport.loseConnection()

    def dataReceived(self, data):
        if not self.inbound.proxy.stalled:
            self.inbound.transport.write(data)

    def connectionLost(self, reason):
        self.inbound.transport.loseConnection()


class _Inbound(Protocol):
    def __init__(self, proxy):
        self.proxy = proxy
        self.outbound = None
        self.pending = []
        self.gone = False

    def connectionMade(self):
        proxy = self.proxy
        if proxy.down:
            self.transport.abortConnection()
            return
        proxy.connections.add(self)
        endpoint = TCP4ClientEndpoint(reactor, proxy.host, proxy.port,
                                      timeout=5)
        connectProtocol(endpoint, _Outbound(self)).addErrback(
            lambda _: self.transport.loseConnection())

    def dataReceived(self, data):
        if self.proxy.stalled:
            return
        if self.outbound is None:
            self.pending.append(data)
        else:
            self.outbound.transport.write(data)

    def connectionLost(self, reason):
        self.gone = True
        self.proxy.connections.discard(self)
        if self.outbound is not None:
            self.outbound.transport.loseConnection()
        self.proxy._check_empty()


class TCPProxy:
    """
    A TCP proxy on 127.0.0.1 (port chosen by the OS) to C{host:port} that a
    test can L{cut} (every connection dropped, new ones refused),
    L{restore}, or L{stall} (connections stay open, nothing passes).
    """

    def __init__(self, host=REDIS_HOST, port=REDIS_PORT):
        self.host = host
        self.port = port
        self.down = False
        self.stalled = False
        self.connections = set()
        self._listening = None
        self._empty = []

    async def start(self, test):
        factory = Factory.forProtocol(lambda: _Inbound(self))
        factory.noisy = False
        self._listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        test.addCleanup(self.stop)
        return self

    @property
    def url(self):
        return f"redis://127.0.0.1:{self._listening.getHost().port}/0"

    def cut(self):
        """
        Drop every connection and refuse new ones: Redis is gone.
        """
        self.down = True
        for inbound in list(self.connections):
            inbound.transport.abortConnection()

    def stall(self):
        """
        Keep connections open but pass nothing: Redis hangs.
        """
        self.stalled = True

    def restore(self):
        self.down = False
        self.stalled = False

    def _check_empty(self):
        if not self.connections:
            waiters, self._empty = self._empty, []
            for d in waiters:
                d.callback(None)

    def _wait_empty(self):
        if not self.connections:
            return succeed(None)
        d = Deferred()
        self._empty.append(d)
        return d

    async def stop(self):
        self.cut()
        await self._wait_empty()
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
