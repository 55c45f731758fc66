"""
Tests for L{gate.limits} and the limits sessions and listeners apply:
connections in all and per address and new connections a second per
address (L{ConnectionLimits}, L{ConnectRate}, refused through
L{gate.connection.SessionFactory}), the login timeout, and the rate of a
session's envelopes (L{TokenBucket}), on a L{Clock} and in-memory
transports.
"""

import json
import struct

import txaio
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gate import errors
from gate.framing import frame
from gate.limits import (MAX_CONNECTIONS, MAX_PER_IP, MAX_REFUSING, RATE,
                         REFUSE_TIMEOUT, ConnectionLimits, ConnectRate,
                         TokenBucket, address_key)
from gate.metrics import Metrics
from gate.session import CHEAP_COST
from gate.tcp import GateTCPFactory
from gate.websocket import GateWebSocketFactory

from tests.fakes import Stack


def with_metrics(stack):
    metrics = Metrics("g")
    stack.sessions._metrics = metrics
    return metrics


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0


class AddressKeyTests(SynchronousTestCase):
    def test_ipv4(self):
        self.assertEqual(address_key("10.0.0.1"), "10.0.0.1")

    def test_ipv6_by_64(self):
        """
        One host usually has a whole /64: its addresses count as one.
        """
        self.assertEqual(address_key("2001:db8:1:2:aaaa::1"),
                         address_key("2001:db8:1:2:bbbb::9"))
        self.assertNotEqual(address_key("2001:db8:1:2::1"),
                            address_key("2001:db8:1:3::1"))

    def test_ipv4_mapped(self):
        self.assertEqual(address_key("::ffff:10.0.0.1"), "10.0.0.1")

    def test_no_address(self):
        self.assertIsNone(address_key(None))


class ConnectionLimitsTests(SynchronousTestCase):
    def test_total(self):
        limits = ConnectionLimits(max_connections=3, max_per_ip=10)
        for host in ("1.1.1.1", "2.2.2.2", None):
            self.assertIsNone(limits.admit(host))
        self.assertEqual(limits.admit("3.3.3.3"), MAX_CONNECTIONS)
        self.assertEqual(limits.open, 3)
        limits.release(None)
        self.assertIsNone(limits.admit("3.3.3.3"))

    def test_per_ip(self):
        limits = ConnectionLimits(max_connections=100, max_per_ip=2)
        self.assertIsNone(limits.admit("1.1.1.1"))
        self.assertIsNone(limits.admit("1.1.1.1"))
        self.assertEqual(limits.admit("1.1.1.1"), MAX_PER_IP)
        self.assertIsNone(limits.admit("2.2.2.2"))
        self.assertEqual(limits.from_address("1.1.1.1"), 2)
        limits.release("1.1.1.1")
        self.assertIsNone(limits.admit("1.1.1.1"))
        self.assertEqual(limits.open, 3)

    def test_refused_not_counted(self):
        limits = ConnectionLimits(max_connections=1, max_per_ip=1)
        limits.admit("1.1.1.1")
        for _ in range(5):
            limits.admit("1.1.1.1")
            limits.admit("2.2.2.2")
        self.assertEqual(limits.open, 1)
        limits.release("1.1.1.1")
        self.assertEqual((limits.open, limits.from_address("1.1.1.1")), (0, 0))

    def test_addresses_forgotten(self):
        """
        Nothing is kept for an address with no connection left.
        """
        limits = ConnectionLimits(max_connections=10000, max_per_ip=10)
        for i in range(1000):
            host = f"10.0.{i // 256}.{i % 256}"
            limits.admit(host)
            limits.release(host)
        self.assertEqual(limits._per_key, {})


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        clock = Clock()
        bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
        self.assertEqual([bucket.take() for _ in range(6)],
                         [True] * 5 + [False])
        clock.advance(0.1)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(0.05)
        self.assertFalse(bucket.take())
        clock.advance(0.05)
        self.assertTrue(bucket.take())

    def test_refill_capped_at_burst(self):
        clock = Clock()
        bucket = TokenBucket(rate=100.0, burst=3, clock=clock)
        clock.advance(1000)
        self.assertEqual([bucket.take() for _ in range(4)],
                         [True, True, True, False])

    def test_cost(self):
        clock = Clock()
        bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
        self.assertEqual([bucket.take(0.25) for _ in range(5)],
                         [True] * 4 + [False])
        clock.advance(0.5)
        self.assertFalse(bucket.take(1.0))
        self.assertTrue(bucket.take(0.5))

    def test_now_given(self):
        clock = Clock()
        bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
        bucket.take(now=0)
        self.assertTrue(bucket.take(now=1.0))
        self.assertFalse(bucket.take(now=1.0))


class ConnectRateTests(SynchronousTestCase):
    """
    New connections per address: C{limits.connect_rate} a second,
    C{limits.connect_burst} at once, in a table of bounded size.
    """

    def limits(self, rate=2.0, burst=3, **kw):
        self.clock = Clock()
        return ConnectionLimits(max_connections=10000, max_per_ip=1000,
                                connect_rate=rate, connect_burst=burst,
                                clock=self.clock, **kw)

    def test_burst_then_rate(self):
        limits = self.limits()
        self.assertEqual([limits.admit("10.0.0.1") for _ in range(4)],
                         [None] * 3 + [RATE])
        self.assertEqual(limits.open, 3)
        self.clock.advance(0.4)
        self.assertEqual(limits.admit("10.0.0.1"), RATE)
        self.clock.advance(0.1)
        self.assertEqual([limits.admit("10.0.0.1") for _ in range(2)],
                         [None, RATE])
        # Closing connections gives no tokens back.
        for _ in range(4):
            limits.release("10.0.0.1")
        self.assertEqual(limits.admit("10.0.0.1"), RATE)

    def test_per_address(self):
        """
        Each address (an IPv6 /64 as one) has its own bucket; connections
        without an address are not rate limited.
        """
        limits = self.limits(burst=1)
        self.assertIsNone(limits.admit("10.0.0.1"))
        self.assertEqual(limits.admit("10.0.0.1"), RATE)
        self.assertIsNone(limits.admit("10.0.0.2"))
        self.assertIsNone(limits.admit("2001:db8:1:2::1"))
        self.assertEqual(limits.admit("2001:db8:1:2::ffff"), RATE)
        self.assertEqual(limits.admit("::ffff:10.0.0.2"), RATE)
        for _ in range(5):
            self.assertIsNone(limits.admit(None))

    def test_other_limits_first(self):
        """
        A connection refused by max_per_ip or max_connections spends no
        token: a client waiting for a free slot is let in when one frees.
        """
        self.clock = Clock()
        limits = ConnectionLimits(max_connections=100, max_per_ip=1,
                                  connect_rate=1.0, connect_burst=2,
                                  clock=self.clock)
        self.assertIsNone(limits.admit("10.0.0.1"))
        for _ in range(10):
            self.assertEqual(limits.admit("10.0.0.1"), MAX_PER_IP)
        limits.release("10.0.0.1")
        self.assertIsNone(limits.admit("10.0.0.1"))

    def test_off_without_rate(self):
        limits = ConnectionLimits(max_connections=1000, max_per_ip=1000)
        self.assertEqual([limits.admit("10.0.0.1") for _ in range(500)],
                         [None] * 500)

    def test_full_buckets_forgotten(self):
        """
        An address whose bucket has refilled is dropped from the table as
        new connections come: a steady trickle from ever new addresses
        keeps it at about what refills in burst / rate seconds.
        """
        limits = self.limits(rate=2.0, burst=3)
        table = limits.connect_rate
        for i in range(10000):
            limits.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
            self.clock.advance(0.01)
        # A bucket with one token spent is full 0.5 s later: 50 addresses.
        self.assertLessEqual(len(table), 52)
        self.clock.advance(10)
        limits.admit("10.200.0.1")
        limits.admit("10.200.0.2")
        self.assertLessEqual(len(table), 50)

    def test_table_capped(self):
        """
        At C{max_entries} addresses the one seen least recently is
        forgotten (it may start again with a full burst): memory stays
        bounded whatever the flood.
        """
        clock = Clock()
        rate = ConnectRate(rate=0.001, burst=1, clock=clock, max_entries=100)
        for i in range(1000):
            self.assertTrue(rate.take(f"10.0.{i // 256}.{i % 256}"))
        self.assertEqual(len(rate), 100)
        self.assertFalse(rate.take("10.0.3.231"))  # the last one seen
        self.assertTrue(rate.take("10.0.0.0"))  # forgotten long ago
        self.assertEqual(len(rate), 100)


def read_frames(data):
    out = []
    while data:
        (size,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4:4 + size]))
        data = data[4 + size:]
    return out


class TCPListenerLimitTests(SynchronousTestCase):
    """
    The TCP factory counts connections and refuses those over a limit
    with an C{err} C{busy} and no session.
    """

    def setUp(self):
        self.stack = Stack(limits__max_connections=3, limits__max_per_ip=2)
        self.metrics = with_metrics(self.stack)
        self.factory = GateTCPFactory(self.stack.sessions, 1000,
                                      self.stack.clock)

    def connect(self, host="10.0.0.1", factory=None):
        factory = factory or self.factory
        address = IPv4Address("TCP", host, 1234)
        protocol = factory.buildProtocol(address)
        if protocol is None:
            return None, None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def lose(self, protocol):
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_per_ip_refused_with_busy(self):
        self.connect()
        self.connect()
        protocol, transport = self.connect()
        (message,) = read_frames(transport.value())
        self.assertEqual((message["t"], message["code"], "id" in message),
                         ("err", errors.BUSY, False))
        self.assertIn("your address", message["msg"])
        self.assertEqual(len(self.stack.sessions.sessions), 2)
        self.assertFalse(transport.disconnecting)
        # Closed once what the client sent first is read.
        protocol.dataReceived(frame(b'{"t":"login","id":1}'))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sample(self.metrics,
                                "mmogate_connections_refused_total",
                                reason=MAX_PER_IP), 1)

    def test_connect_rate_refused_with_busy(self):
        """
        Past limits.connect_burst new connections from one address (over
        every client listener) the next is refused C{busy}, reason
        C{rate}, and gets no session; limits.connect_rate later one more
        is let in.
        """
        stack = Stack(limits__connect_rate=2.0, limits__connect_burst=2)
        metrics = with_metrics(stack)
        tcp = GateTCPFactory(stack.sessions, 1000, stack.clock)
        ws = GateWebSocketFactory(stack.sessions, 1000, stack.clock)
        self.assertIsNotNone(tcp.buildProtocol(
            IPv4Address("TCP", "10.0.0.1", 1)).limited_host)
        self.assertIsNotNone(ws.buildProtocol(
            IPv4Address("TCP", "10.0.0.1", 2)).limited_host)
        protocol, transport = self.connect(factory=tcp)
        (message,) = read_frames(transport.value())
        self.assertEqual((message["t"], message["code"]), ("err", errors.BUSY))
        self.assertIn("new connections", message["msg"])
        self.assertIsNone(getattr(protocol, "session", None))
        self.assertEqual(stack.sessions.limits.open, 2)
        self.assertEqual(sample(metrics, "mmogate_connections_refused_total",
                                reason=RATE), 1)
        refused = ws.buildProtocol(IPv4Address("TCP", "10.0.0.1", 3))
        self.assertEqual(refused.reason, RATE)
        stack.clock.advance(0.5)
        protocol, transport = self.connect(factory=tcp)
        self.assertIsNotNone(protocol.session)

    def test_total_refused(self):
        self.connect("10.0.0.1")
        self.connect("10.0.0.2")
        self.connect("10.0.0.3")
        protocol, transport = self.connect("10.0.0.4")
        (message,) = read_frames(transport.value())
        self.assertEqual(message["code"], errors.BUSY)
        self.assertIn("too many connections", message["msg"])
        self.assertEqual(sample(self.metrics,
                                "mmogate_connections_refused_total",
                                reason=MAX_CONNECTIONS), 1)

    def test_refusal_dropped_after_timeout(self):
        self.connect()
        self.connect()
        protocol, transport = self.connect()
        self.stack.clock.advance(REFUSE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        self.stack.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)
        self.assertEqual(self.stack.sessions.limits.refusing, 0)

    def test_released_on_close(self):
        first, _ = self.connect()
        second, _ = self.connect()
        self.lose(first)
        # Twice lost (a transport may say so twice) releases once.
        self.lose(first)
        protocol, transport = self.connect()
        self.assertIsNotNone(protocol.session)
        self.assertEqual(self.stack.sessions.limits.open, 2)
        self.lose(second)
        self.lose(protocol)
        self.assertEqual(self.stack.sessions.limits.open, 0)

    def test_shared_by_listeners(self):
        """
        Two client listeners of one gate count against one limit.
        """
        other = GateTCPFactory(self.stack.sessions, 1000, self.stack.clock)
        self.connect("10.0.0.1")
        self.connect("10.0.0.2", factory=other)
        self.connect("10.0.0.3", factory=other)
        protocol, transport = self.connect("10.0.0.4")
        self.assertIsNone(getattr(protocol, "session", None))
        self.assertEqual(read_frames(transport.value())[0]["code"], errors.BUSY)

    def test_refusals_bounded(self):
        """
        Past L{MAX_REFUSING} refusals in progress, more are closed at once
        without an answer.
        """
        self.connect()
        self.connect()
        refusing = [self.connect() for _ in range(MAX_REFUSING)]
        self.assertEqual(self.stack.sessions.limits.refusing, MAX_REFUSING)
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.stack.sessions.limits.refusing, MAX_REFUSING)
        self.lose(refusing[0][0])
        protocol, transport = self.connect()
        self.assertEqual(read_frames(transport.value())[0]["code"],
                         errors.BUSY)

    def test_refused_under_tls(self):
        """
        A TLS listener wraps the factory: a refusal, even past
        L{MAX_REFUSING}, is a protocol it can wrap.
        """
        tls = TLSMemoryBIOFactory(CertificateOptions(), False, self.factory)
        self.connect()
        self.connect()
        self.stack.sessions.limits.refusing = MAX_REFUSING
        protocol = tls.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnected)

    def test_unix_address(self):
        """
        A transport without an IP address counts in the total only.
        """
        protocol = self.factory.buildProtocol(UNIXAddress(b"/tmp/sock"))
        self.assertIsNotNone(protocol)
        self.assertEqual(self.stack.sessions.limits.open, 1)

    def test_ipv6(self):
        protocol = self.factory.buildProtocol(
            IPv6Address("TCP", "2001:db8::1", 1))
        self.factory.buildProtocol(IPv6Address("TCP", "2001:db8::2", 1))
        refused = self.factory.buildProtocol(
            IPv6Address("TCP", "2001:db8::3", 1))
        self.assertIsNotNone(protocol)
        self.assertEqual(refused.reason, MAX_PER_IP)


class _WSTransport(StringTransport):
    def unregisterProducer(self):
        self.producer = None


class WebSocketListenerLimitTests(SynchronousTestCase):
    HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: gate\r\n"
                 b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")

    def setUp(self):
        self.stack = Stack(limits__max_connections=1)
        self.metrics = with_metrics(self.stack)
        self.patch(txaio.config, "loop", self.stack.clock)
        self.factory = GateWebSocketFactory(self.stack.sessions, 1024,
                                            self.stack.clock)
        self.factory.reactor = self.stack.clock

    def open(self, host):
        address = IPv4Address("TCP", host, 77)
        protocol = self.factory.buildProtocol(address)
        transport = _WSTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(self.HANDSHAKE)
        return protocol, transport

    def test_refused_with_503(self):
        protocol, transport = self.open("10.0.0.1")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"))
        refused, transport = self.open("10.0.0.2")
        head = transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"too many connections", head)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.stack.sessions.sessions), 1)
        self.assertEqual(sample(self.metrics,
                                "mmogate_connections_refused_total",
                                reason=MAX_CONNECTIONS), 1)

    def test_503_waits_for_the_whole_head(self):
        self.open("10.0.0.1")
        refused = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1))
        transport = StringTransport()
        refused.makeConnection(transport)
        refused.dataReceived(self.HANDSHAKE[:20])
        self.assertEqual(transport.value(), b"")
        refused.dataReceived(self.HANDSHAKE[20:])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))

    def test_released_on_close(self):
        protocol, transport = self.open("10.0.0.1")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.stack.sessions.limits.open, 0)
        protocol, transport = self.open("10.0.0.2")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"))

    def test_released_without_handshake(self):
        """
        A connection that never finished its handshake (no session) counted
        too, and is released.
        """
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "1.2.3.4", 1))
        protocol.makeConnection(_WSTransport())
        self.assertEqual(self.stack.sessions.limits.open, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.stack.sessions.limits.open, 0)

    def test_login_timeout_counts_from_accept(self):
        """
        The login timeout runs from the TCP accept, not from the end of a
        slow opening handshake.
        """
        stack = Stack(session__login_timeout=5, session__heartbeat_ttl=1000)
        self.patch(txaio.config, "loop", stack.clock)
        factory = GateWebSocketFactory(stack.sessions, 1024, stack.clock,
                                       handshake_timeout=5)
        factory.reactor = stack.clock
        address = IPv4Address("TCP", "10.0.0.9", 77)
        protocol = factory.buildProtocol(address)
        transport = _WSTransport(peerAddress=address)
        protocol.makeConnection(transport)
        stack.clock.advance(4.5)
        protocol.dataReceived(self.HANDSHAKE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101"))
        [session] = stack.sessions.sessions.values()
        stack.clock.advance(0.49)
        self.assertFalse(session.closing)
        stack.clock.advance(0.01)
        self.assertTrue(session.closing)


class LoginTimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack(session__login_timeout=10,
                           session__heartbeat_ttl=1000)
        self.metrics = with_metrics(self.stack)

    def test_closed_when_not_bound(self):
        session, connection = self.stack.connect()
        self.stack.send(session, t="ping", ts=1)
        self.stack.clock.advance(9.9)
        self.assertFalse(connection.closed)
        self.stack.clock.advance(0.1)
        self.assertTrue(connection.closed)
        message = connection.messages[-1]
        self.assertEqual((message["t"], message["code"], "id" in message),
                         ("err", errors.NOT_AUTHENTICATED, False))
        self.assertIn("10 seconds", message["msg"])
        self.assertEqual(sample(self.metrics, "mmogate_sessions_limited_total",
                                reason="login_timeout"), 1)

    def test_bound_in_time(self):
        session, connection, _ = self.stack.login("alice")
        self.stack.clock.advance(100)
        self.assertFalse(connection.closed)
        self.assertEqual([c for c in self.stack.clock.getDelayedCalls()
                          if c.func == session._login_expired], [])

    def test_login_in_progress_too_late(self):
        """
        A login the backend has not answered by the timeout does not keep
        the connection.
        """
        self.stack.backend.auto_login = False
        session, connection = self.stack.connect()
        self.stack.send(session, t="login", id=1, data={"name": "a"})
        self.stack.clock.advance(10)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.messages[-1]["code"],
                         errors.NOT_AUTHENTICATED)

    def test_lost_cancels(self):
        session, connection = self.stack.connect()
        session.lost()
        self.assertEqual([c for c in self.stack.clock.getDelayedCalls()
                          if c.func == session._login_expired], [])


class DepthTests(SynchronousTestCase):
    def test_session_uses_max_depth(self):
        stack = Stack(session__max_depth=4)
        session, connection, _ = stack.login("alice")
        stack.send(session, t="req", id=1, route="r", data=[[[1]]])
        self.assertEqual(stack.backend.calls[0].args[-1], [[[1]]])
        stack.send(session, t="req", id=2, route="r", data=[[[[1]]]])
        message = connection.messages[-1]
        self.assertEqual((message["t"], message["code"]),
                         ("err", errors.BAD_JSON))
        self.assertTrue(connection.closed)


class RateTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack(session__rate=2.0, session__burst=3,
                           session__rate_strikes=4)
        self.metrics = with_metrics(self.stack)
        self.session, self.connection, _ = self.stack.login("alice")
        self.stack.clock.advance(10)
        self.connection.take()

    def req(self, rid):
        self.stack.send(self.session, t="req", id=rid, route="r")

    def test_over_burst_rate_limited(self):
        # The login spent one; ten seconds refilled the bucket to 3.
        for rid in range(1, 5):
            self.req(rid)
        self.assertEqual(len(self.stack.backend.calls), 1)
        (message,) = self.connection.take()
        self.assertEqual((message["t"], message["id"], message["code"]),
                         ("err", 4, errors.RATE_LIMITED))
        self.assertFalse(self.connection.closed)
        self.assertEqual(sample(self.metrics, "mmogate_bad_input_total",
                                code=errors.RATE_LIMITED), 1)

    def test_rate_refills(self):
        for rid in range(1, 4):
            self.req(rid)
        self.req(4)
        self.stack.clock.advance(0.5)
        self.req(5)
        messages = self.connection.take()
        self.assertEqual([m["id"] for m in messages], [4])
        self.assertEqual(len(self.stack.backend.calls), 1)
        self.assertEqual(len(self.session._lane), 3)

    def test_login_auth_resume_count(self):
        stack = Stack(session__rate=1.0, session__burst=2)
        session, connection = stack.connect()
        stack.send(session, t="auth", id=1, token="bad")
        stack.send(session, t="resume", id=2, player_id="a",
                   resume_token="bad", last_seq=0)
        stack.send(session, t="login", id=3, data={"name": "a"})
        codes = [m["code"] for m in connection.messages]
        self.assertEqual(codes, [errors.AUTH_FAILED, errors.RESUME_REJECTED,
                                 errors.RATE_LIMITED])
        self.assertEqual(stack.backend.logins, [])

    def test_bad_envelopes_count(self):
        for _ in range(3):
            self.stack.send(self.session, t="nonsense", id=1)
        self.stack.send(self.session, t="nonsense", id=1)
        codes = [m["code"] for m in self.connection.take()]
        self.assertEqual(codes, [errors.UNKNOWN_TYPE] * 3
                         + [errors.RATE_LIMITED])

    def test_cheap_envelopes(self):
        """
        C{ping}, C{pong} and C{ack} cost a fraction of a request; over the
        rate a ping is answered C{rate_limited} (no C{id}), an ack or pong
        is dropped.
        """
        cheap = int(3 / CHEAP_COST)
        for i in range(cheap):
            self.stack.send(self.session, t="ping", ts=i)
        self.assertEqual(len(self.connection.take()), cheap)
        self.stack.send(self.session, t="ping", ts="over")
        (message,) = self.connection.take()
        self.assertEqual((message["code"], "id" in message),
                         (errors.RATE_LIMITED, False))
        self.stack.send(self.session, t="ack", seq=0)
        self.stack.send(self.session, t="pong")
        self.assertEqual(self.connection.take(), [])

    def test_closed_after_strikes(self):
        for rid in range(1, 4):
            self.req(rid)
        for rid in range(4, 7):
            self.req(rid)
        self.assertFalse(self.connection.closed)
        self.req(7)
        self.assertTrue(self.connection.closed)
        messages = self.connection.take()
        self.assertEqual([(m.get("id"), m["code"]) for m in messages],
                         [(4, errors.RATE_LIMITED), (5, errors.RATE_LIMITED),
                          (6, errors.RATE_LIMITED),
                          (None, errors.RATE_LIMITED)])
        self.assertEqual(sample(self.metrics, "mmogate_sessions_limited_total",
                                reason="rate_limited"), 1)
        self.assertIsNone(self.stack.players.get("alice").session)

    def test_strikes_fade_with_time(self):
        for rid in range(1, 4):
            self.req(rid)
        for rid in range(4, 7):
            self.req(rid)
        # Three strikes; two seconds take two away: three more to go.
        self.stack.clock.advance(2)
        for rid in range(7, 12):
            self.req(rid)
        self.assertFalse(self.connection.closed)
        self.req(12)
        self.assertTrue(self.connection.closed)

    def test_served_envelopes_do_not_forgive(self):
        """
        A client sending under twice the rate has envelopes served between
        its strikes; sustained, it is still closed.
        """
        stack = Stack(session__rate=20.0, session__burst=20,
                      session__rate_strikes=100)
        session, connection, _ = stack.login("carol")
        rid = 0
        for tick in range(38 * 20):
            stack.clock.advance(1 / 38)
            rid += 1
            stack.send(session, t="req", id=rid, route="r")
            if connection.closed:
                break
        self.assertTrue(connection.closed)
        self.assertLess(stack.clock.seconds(), 10)

    def test_sustained_flood_closed(self):
        """
        A client sending three times the rate, on and on, is closed; one at
        the rate is not.
        """
        for tick in range(200):
            self.stack.clock.advance(0.5)
            for _ in range(int(3 / CHEAP_COST)):
                self.stack.send(self.session, t="ping")
            if self.connection.closed:
                break
        self.assertTrue(self.connection.closed)
        stack = Stack(session__rate=2.0, session__burst=3,
                      session__rate_strikes=4)
        session, connection, _ = stack.login("bob")
        for tick in range(1000):
            stack.clock.advance(0.5)
            stack.send(session, t="req", id=tick, route="r")
            if tick % 10 == 0:
                # Now and then one too many, answered rate_limited.
                stack.send(session, t="req", id=tick, route="r")
                stack.send(session, t="req", id=tick, route="r")
        self.assertFalse(connection.closed)
