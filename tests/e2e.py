"""
Shared helpers of the end-to-end tests (C{tests/test_e2e_*.py}).

A real gate (L{gate.service.GateService} with its in-process reference
backend) runs on the real reactor with every listener on 127.0.0.1 and a
port chosen by the OS; the clients here know nothing of the gate's code,
only PROTOCOL.md: a raw TCP client (4-byte big-endian length framing), a
WebSocket client (autobahn, path C{/ws}), raw byte pushers for bad input,
and treq for the push API and the metrics listener.

Every wait is for an event, bounded by a reactor timeout that fails the
test; everything started here is stopped by the test's cleanups, so trial
finds a clean reactor.
"""

import itertools
import json
import socket
import struct
import time
from inspect import isawaitable

import jwt
import treq
from autobahn.twisted.websocket import (WebSocketClientFactory,
                                        WebSocketClientProtocol)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import FailTest
from twisted.web.client import HTTPConnectionPool

from gate.config import from_mapping
from gate.service import GateService

LOOPBACK = "tcp:0:interface=127.0.0.1"
API_KEY = "e2e-api-key"
#: 32 bytes or more: the gate and PyJWT refuse shorter HMAC keys.
AUTH_SECRET = "e2e-auth-secret-0123456789abcdef0123456789"

#: Bound on anything that should happen "at once" (a reply, a close): far
#: above what a loaded machine needs, far below a hung test.
TIMEOUT = 5.0

#: Bound on stopping a gate in a cleanup.
STOP_TIMEOUT = 15.0


# Waiting.

def within(d, timeout, what):
    """
    C{d}, failing the test with a message naming C{what} when it has not
    fired after C{timeout} seconds of reactor time.

    @param what: a string, or a callable returning one, called only on a
        timeout (a message costly to build).
    """
    d.addTimeout(timeout, reactor)

    def timed_out(failure):
        failure.trap(TimeoutError)
        text = what() if callable(what) else what
        raise FailTest(f"timed out after {timeout:g}s waiting for {text}")

    return d.addErrback(timed_out)


async def until(condition, what, timeout=TIMEOUT, interval=0.01):
    """
    Wait until C{condition()} (or the awaitable it returns) is true; return
    that value. Fails the test after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = condition()
        if isawaitable(value):
            value = await value
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise FailTest(f"timed out after {timeout:g}s waiting for "
                           f"{what}")
        await deferLater(reactor, interval, lambda: None)


# Gates.

def _merge(base, overrides):
    for name, value in overrides.items():
        if isinstance(value, dict):
            _merge(base.setdefault(name, {}), value)
        else:
            base[name] = value
    return base


def gate_table(**sections):
    """
    The nested configuration of a test gate, with C{sections} (such as
    C{session={"heartbeat_ttl": 0.4}}) merged over the defaults.
    """
    table = {
        "gate": {"id": "e2e-gate"},
        "listen": {"tcp": LOOPBACK, "ws": LOOPBACK, "api": LOOPBACK,
                   "metrics": LOOPBACK},
        "api": {"key": API_KEY},
        "auth": {"secret": AUTH_SECRET},
        "backend": {"register_interval": 0.0},
        "shutdown": {"grace": 3.0},
    }
    return _merge(table, sections)


def start_gate(test, **sections):
    """
    Start a gate with the in-process reference backend (unless
    C{backend={"url": ...}} is given); stopped by C{test}'s cleanups.

    @return: the running L{GateService}.
    """
    gate = GateService(from_mapping(gate_table(**sections)), reactor)
    gate.startService()
    test.addCleanup(stop_gate, gate)
    return gate


def stop_gate(gate):
    """
    Stop C{gate} (once); a Deferred bounded by L{STOP_TIMEOUT}.
    """
    return within(gate.stopService(), STOP_TIMEOUT, "the gate to stop")


def closed_port():
    """
    A loopback port number nothing listens on: bound, read and closed.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_token(player_id, secret=AUTH_SECRET, lifetime=300, **claims):
    """
    An HS256 JWT as a studio login service would mint it.
    """
    payload = {"sub": player_id, "exp": int(time.time()) + lifetime}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def events_of(backend, player_id, event=None):
    """
    The lifecycle event bodies a reference backend (or a gate's in-process
    one) got for C{player_id}, optionally only those of kind C{event}.
    """
    backend = getattr(backend, "reference", None) or backend
    return [e for e in backend.events
            if e["player_id"] == player_id
            and (event is None or e["event"] == event)]


# Clients.

class ClientMixin:
    """
    What both client transports share: envelopes received, in order, in a
    L{DeferredQueue}, and the helpers tests wait with.

    @ivar received: every envelope received so far, in order.
    @ivar lost: fires when the connection is gone.
    """

    name = "client"

    def _setup(self):
        self.queue = DeferredQueue()
        self.received = []
        self.lost = Deferred()
        self.is_lost = False
        self._next_id = 0

    def _got(self, payload):
        env = json.loads(payload)
        self.received.append(env)
        self.queue.put(env)

    def _gone(self):
        if not self.is_lost:
            self.is_lost = True
            self.lost.callback(None)

    def next(self, timeout=TIMEOUT):
        """
        The next envelope received (strictly the next one).
        """
        # The message is built on a timeout only: the repr of everything
        # received, on every call, made reading long replays quadratic.
        return within(self.queue.get(), timeout,
                      lambda: f"an envelope on {self.name} (received so "
                              f"far: {self.received!r})")

    async def expect(self, predicate, timeout=TIMEOUT):
        """
        The first envelope from now on for which C{predicate} is true,
        skipping others; fails after C{timeout} seconds.
        """
        deadline = reactor.seconds() + timeout
        while True:
            left = max(0.0, deadline - reactor.seconds())
            env = await self.next(left)
            if predicate(env):
                return env

    def assert_nothing_pending(self):
        """
        Fail if an envelope arrived that no test step read.
        """
        pending = list(self.queue.pending)
        if pending:
            raise FailTest(f"unexpected envelopes on {self.name}: "
                           f"{pending!r}")

    def new_id(self):
        self._next_id += 1
        return self._next_id

    def send(self, envelope):
        self.send_payload(json.dumps(envelope).encode("utf-8"))

    async def request(self, envelope, timeout=TIMEOUT):
        """
        Send a request envelope (given an C{id} if it has none) and return
        the C{resp} or C{err} that answers it.
        """
        envelope = dict(envelope)
        envelope.setdefault("id", self.new_id())
        self.send(envelope)
        return await self.expect(
            lambda e: e.get("t") in ("resp", "err")
            and e.get("id") == envelope["id"], timeout)

    async def login(self, name):
        """
        Log in as C{name} through the reference backend; return the C{resp}.
        """
        answer = await self.request({"t": "login", "data": {"name": name}})
        if answer["t"] != "resp":
            raise FailTest(f"login of {name!r} failed: {answer!r}")
        return answer

    def wait_lost(self, timeout=TIMEOUT):
        """
        Fires when the connection is gone (the gate closed it).
        """
        d = Deferred()
        self.lost.addBoth(lambda r: (d.called or d.callback(None), r)[1])
        return within(d, timeout, f"{self.name} to be closed by the gate")

    def close(self):
        """
        Close from the client side (also a cleanup): a bounded Deferred.
        """
        if not self.is_lost:
            self._hang_up()
        return self.wait_lost(STOP_TIMEOUT)

    def abort(self):
        """
        Drop the connection abruptly, as a lost network would.
        """
        if not self.is_lost:
            self.transport.abortConnection()
        return self.wait_lost(STOP_TIMEOUT)


class TCPClient(Protocol, ClientMixin):
    """
    A game client on the TCP listener: 4-byte big-endian length, payload.
    """

    name = "tcp client"

    def __init__(self):
        self._setup()
        self._buffer = b""

    def dataReceived(self, data):
        buffer = self._buffer = self._buffer + data
        offset = 0
        while len(buffer) - offset >= 4:
            (size,) = struct.unpack_from(">I", buffer, offset)
            if len(buffer) - offset < 4 + size:
                break
            self._got(buffer[offset + 4:offset + 4 + size])
            offset += 4 + size
        self._buffer = buffer[offset:]

    def connectionLost(self, reason):
        self._gone()

    def send_payload(self, payload):
        self.transport.write(struct.pack(">I", len(payload)) + payload)

    def send_raw(self, data):
        self.transport.write(data)

    def _hang_up(self):
        self.transport.loseConnection()


class WSClient(WebSocketClientProtocol, ClientMixin):
    """
    A game client on the WebSocket listener, path C{/ws}.
    """

    name = "ws client"

    def __init__(self):
        WebSocketClientProtocol.__init__(self)
        self._setup()
        self.opened = Deferred()
        self.close_code = None

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self._got(payload)

    def onClose(self, wasClean, code, reason):
        self.close_code = code

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        if not self.opened.called:
            self.opened.errback(ConnectionError(
                f"WebSocket closed before the handshake finished "
                f"(close code {self.close_code})"))
        self._gone()

    def send_payload(self, payload, binary=False):
        self.sendMessage(payload, isBinary=binary)

    def _hang_up(self):
        self.transport.loseConnection()


class RawClient(Protocol):
    """
    Bytes in, bytes out: for garbage sent to any listener.
    """

    def __init__(self):
        self.data = b""
        self.lost = Deferred()
        self.is_lost = False

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.is_lost = True
        self.lost.callback(None)

    def wait_lost(self, timeout=TIMEOUT):
        d = Deferred()
        self.lost.addBoth(lambda r: (d.called or d.callback(None), r)[1])
        return within(d, timeout, f"the gate to close a raw connection "
                                  f"(received {self.data[:200]!r})")

    def close(self):
        if not self.is_lost:
            self.transport.loseConnection()
        return self.wait_lost(STOP_TIMEOUT)


class Addresses:
    """
    Stands in for a gate where only its listeners' ports are known (a gate
    in another process): C{Addresses(tcp=8080, ...).address("tcp")}.
    """

    def __init__(self, **ports):
        self._ports = ports

    def address(self, name):
        return ("127.0.0.1", self._ports[name])


def _endpoint(gate, listener):
    host, port = gate.address(listener)
    return TCP4ClientEndpoint(reactor, host, port, timeout=TIMEOUT)


async def connect_tcp(test, gate):
    """
    A L{TCPClient} connected to C{gate}'s TCP listener, closed on cleanup.
    """
    client = await within(connectProtocol(_endpoint(gate, "tcp"),
                                          TCPClient()),
                          TIMEOUT, "a TCP connection")
    test.addCleanup(client.close)
    return client


async def connect_ws(test, gate, path="/ws"):
    """
    A L{WSClient} with its handshake done, closed on cleanup.
    """
    host, port = gate.address("ws")
    factory = WebSocketClientFactory(f"ws://{host}:{port}{path}")
    factory.protocol = WSClient
    factory.setProtocolOptions(openHandshakeTimeout=TIMEOUT,
                               closeHandshakeTimeout=1)
    client = await within(_endpoint(gate, "ws").connect(factory), TIMEOUT,
                          "a WebSocket TCP connection")
    test.addCleanup(client.close)
    await within(client.opened, TIMEOUT, "the WebSocket handshake")
    return client


async def connect_raw(test, gate, listener):
    """
    A L{RawClient} connected to the listener C{listener}.
    """
    client = await within(connectProtocol(_endpoint(gate, listener),
                                          RawClient()),
                          TIMEOUT, f"a TCP connection to {listener}")
    test.addCleanup(client.close)
    return client


CONNECTORS = {"tcp": connect_tcp, "ws": connect_ws}


# HTTP: the push API and the metrics listener.

class HTTP:
    """
    treq on a non-persistent pool, closed on cleanup.

    @param gate: a L{GateService} or L{Addresses}.
    @param listener: C{"api"} or C{"metrics"}.
    """

    def __init__(self, test, gate, listener="api", key=API_KEY):
        host, port = gate.address(listener)
        self.base = f"http://{host}:{port}"
        self.key = key
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        #: An Agent to send through instead (HTTPS), sharing the pool.
        self.agent = None
        test.addCleanup(self.pool.closeCachedConnections)

    async def call(self, method, path, body=None, *, data=None, key=None,
                   headers=None):
        """
        @param body: JSON-encoded as the request body.
        @param data: raw request body bytes instead.
        @param key: the API key (default: the right one; C{""} sends no
            C{Authorization} header).
        @return: C{(status, parsed JSON or None, raw bytes)}.
        """
        key = self.key if key is None else key
        all_headers = {}
        if key:
            all_headers[b"Authorization"] = [b"Bearer " + key.encode()]
        if body is not None:
            data = json.dumps(body).encode("utf-8")
        if data is not None:
            all_headers[b"Content-Type"] = [b"application/json"]
        all_headers.update(headers or {})
        route = ({"agent": self.agent} if self.agent is not None
                 else {"pool": self.pool})
        response = await within(
            treq.request(method, self.base + path, data=data,
                         headers=all_headers, **route),
            TIMEOUT, f"an answer to {method} {path}")
        raw = await within(treq.content(response), TIMEOUT,
                           f"the body of {method} {path}")
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return response.code, parsed, raw

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, body, **kw)

    async def push(self, players, route, data, **extra):
        """
        C{POST /v1/push}, which must answer 200; return its answer.
        """
        body = {"players": players, "route": route, "data": data}
        body.update(extra)
        code, answer, raw = await self.post("/v1/push", body)
        if code != 200:
            raise FailTest(f"push answered {code}: {raw!r}")
        return answer

    async def player(self, player_id):
        code, answer, raw = await self.get(f"/v1/players/{player_id}")
        if code != 200:
            raise FailTest(f"GET /v1/players/{player_id} answered "
                           f"{code}: {raw!r}")
        return answer

    async def wait_offline(self, player_id):
        """
        Until the gate has seen C{player_id}'s session go.
        """
        async def offline():
            return not (await self.player(player_id))["online"]
        await until(offline, f"{player_id} to be offline on the gate")


_healthy = itertools.count()


async def assert_healthy(test, gate, transport="tcp"):
    """
    The gate still serves: C{/health} and C{/ready} answer 200 and a fresh
    client logs in, echoes and gets C{pong}.
    """
    metrics = HTTP(test, gate, "metrics")
    code, _, raw = await metrics.get("/health")
    test.assertEqual((code, raw), (200, b"ok\n"))
    code, _, raw = await metrics.get("/ready")
    test.assertEqual((code, raw), (200, b"ready\n"))
    client = await CONNECTORS[transport](test, gate)
    name = f"h{next(_healthy)}"
    await client.login(name)
    answer = await client.request({"t": "req", "route": "echo",
                                   "data": {"still": "alive"}})
    test.assertEqual(answer["t"], "resp", answer)
    test.assertEqual(answer["data"], {"still": "alive"})
    client.send({"t": "ping", "ts": 7})
    test.assertEqual(await client.next(), {"t": "pong", "ts": 7})
    await client.close()
