"""
Tests for L{gate.client}: framing, addresses, the envelope state machine of
L{GateClient} (driven by a C{task.Clock} and in-memory transports playing
the gate) and, over real loopback sockets, TCP and WebSocket end to end.
"""

import datetime
import ipaddress
import json

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from gate.client import Address, GateClient, GateError, Push, parse_address
from gate.client import connection
from gate.client.address import load_trust_root
from gate.client.framing import FrameDecoder, FrameTooLarge, frame
from gate.client.protocol import (FramedProtocol, IPayloadReceiver, IPayloadSender,
                                  WebSocketPayloadProtocol)


def encode(obj):
    return json.dumps(obj).encode("utf-8")


# In-memory gate


class FakeGate:
    """
    The gate's side of one in-memory connection: reads what the client
    wrote, answers with frames, and drops the connection when told.
    """

    def __init__(self, address, protocol):
        self.address = address
        self.protocol = protocol
        self.transport = StringTransport()
        self.decoder = FrameDecoder()
        protocol.makeConnection(self.transport)

    def received(self):
        """
        The envelopes the client sent since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        return [json.loads(p) for p in self.decoder.feed(data)]

    def send(self, obj):
        self.protocol.dataReceived(frame(encode(obj)))

    @property
    def closing(self):
        return self.transport.disconnecting

    def lose(self, reason=ConnectionLost):
        self.protocol.connectionLost(Failure(reason()))


class FakeEndpoints:
    """
    An C{endpoint_factory} whose endpoints connect in memory at once, or are
    refused, or hang, as the test says.
    """

    def __init__(self):
        self.gates = []
        self.dials = []
        self.mode = "accept"

    def __call__(self, reactor, address):
        self.dials.append(address)
        return _FakeEndpoint(self, address)

    @property
    def gate(self):
        return self.gates[-1]


class _FakeEndpoint:
    def __init__(self, endpoints, address):
        self.endpoints = endpoints
        self.address = address

    def connect(self, factory):
        mode = self.endpoints.mode
        if mode == "refuse":
            return fail(ConnectionRefusedError())
        if mode == "hang":
            return Deferred()
        if mode == "record":
            self.endpoints.gates.append((self.address, factory))
            return Deferred()
        protocol = factory.buildProtocol(None)
        self.endpoints.gates.append(FakeGate(self.address, protocol))
        return succeed(protocol)


class ClientHarness:
    """
    A L{GateClient} wired to L{FakeEndpoints} and a L{Clock}, recording
    every callback.
    """

    def __init__(self, addr="tcp://gate.example:4000", **kwargs):
        self.clock = Clock()
        self.endpoints = FakeEndpoints()
        self.pushes = []
        self.gaps = []
        self.kicks = []
        self.states = []
        kwargs.setdefault("login", {"name": "alice"})
        self.client = GateClient(
            MemoryReactorClock(), addr, clock=self.clock,
            endpoint_factory=self.endpoints,
            on_push=self.pushes.append,
            on_gap=lambda a, b: self.gaps.append((a, b)),
            on_kick=lambda r, m: self.kicks.append((r, m)),
            on_state=lambda s, i: self.states.append((s, i)),
            **kwargs)

    @property
    def gate(self):
        return self.endpoints.gate

    def state_names(self):
        return [s for s, _ in self.states]

    def bind(self, last_seq=0, player_id="alice", token="rt-1"):
        """
        Answer the bind envelope the client just sent; return it.
        """
        (bind,) = self.gate.received()
        self.gate.send({"t": "resp", "id": bind["id"], "data": {"hi": 1},
                        "player_id": player_id, "resume_token": token,
                        "last_seq": last_seq})
        return bind

    def connect(self, **kwargs):
        d = self.client.connect()
        self.bind(**kwargs)
        return d

    def push(self, seq=None, route="chat", data=None, gate=None):
        obj = {"t": "push", "route": route, "data": data, "ts": 1.5}
        if seq is not None:
            obj["seq"] = seq
        (gate or self.gate).send(obj)

    def drop(self):
        """
        Lose the current connection and let the backoff run out.
        """
        self.gate.lose()
        self.clock.advance(self.client._max_backoff)


# Framing


class FramingTests(SynchronousTestCase):
    payloads = [b"", b"a", encode({"t": "ping"}), b"x" * 300]

    def stream(self):
        return b"".join(frame(p) for p in self.payloads)

    def test_every_split(self):
        """
        However the stream is cut in two, the same payloads come out.
        """
        data = self.stream()
        for cut in range(len(data) + 1):
            decoder = FrameDecoder()
            out = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
            self.assertEqual(out, self.payloads, cut)
            self.assertEqual(decoder.buffered, 0)

    def test_byte_by_byte(self):
        decoder = FrameDecoder()
        out = []
        for i in range(len(self.stream())):
            out += decoder.feed(self.stream()[i:i + 1])
        self.assertEqual(out, self.payloads)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=8),
           st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    def test_any_split(self, payloads, cuts):
        data = b"".join(frame(p) for p in payloads)
        bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        decoder = FrameDecoder()
        out = []
        for start, end in zip(bounds, bounds[1:]):
            out += decoder.feed(data[start:end])
        self.assertEqual(out, payloads)

    def test_oversize_refused_before_buffering(self):
        """
        A header announcing more than C{max_frame} raises at once, without
        waiting for (or keeping) the payload.
        """
        decoder = FrameDecoder(max_frame=10)
        self.assertEqual(decoder.feed(frame(b"x" * 10)), [b"x" * 10])
        e = self.assertRaises(FrameTooLarge, decoder.feed, b"\x00\x00\x00\x0b")
        self.assertEqual((e.size, e.limit), (11, 10))
        self.assertEqual(decoder.buffered, 0)

    def test_default_limit(self):
        decoder = FrameDecoder()
        self.assertRaises(FrameTooLarge, decoder.feed,
                          (16 * 1024 * 1024 + 1).to_bytes(4, "big"))

    def test_protocol_drops_oversize(self):
        """
        L{FramedProtocol} aborts on an oversized frame and reports it as the
        reason the connection was lost.
        """
        events = []

        class Receiver:
            def payloadConnected(self, sender):
                events.append("up")

            def payloadReceived(self, payload):
                events.append(payload)

            def payloadLost(self, reason):
                events.append(reason)

        protocol = FramedProtocol(Receiver(), max_frame=4)
        verifyObject(IPayloadSender, protocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(b"ok") + b"\x00\x00\x00\x05abc")
        protocol.dataReceived(b"more")
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(events[:2], ["up", b"ok"])
        self.assertTrue(events[2].check(FrameTooLarge))
        self.assertEqual(len(events), 3)


# Addresses


class AddressTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(parse_address("tcp://h:1"), Address("tcp", "h", 1))
        self.assertEqual(parse_address("tls://h:2"), Address("tls", "h", 2))
        self.assertEqual(parse_address("h:3"), Address("tcp", "h", 3))
        self.assertEqual(parse_address("ws://h:4/ws"), Address("ws", "h", 4, "/ws"))
        self.assertEqual(parse_address("ws://h:4"), Address("ws", "h", 4, "/ws"))
        self.assertEqual(parse_address("wss://h/x?a=1"),
                         Address("wss", "h", 443, "/x?a=1"))
        self.assertEqual(parse_address("tcp://[::1]:5").host, "::1")
        self.assertEqual(parse_address("tcp://[::1]:5").url, "tcp://[::1]:5")
        self.assertEqual(parse_address("ws://h:4/ws").url, "ws://h:4/ws")

    def test_relative(self):
        """
        A bare C{host:port} keeps the scheme and path of the address in use.
        """
        wss = parse_address("wss://a:1/ws")
        self.assertEqual(parse_address("b:2", wss), Address("wss", "b", 2, "/ws"))
        tls = parse_address("tls://a:1")
        self.assertEqual(parse_address("b:2", tls), Address("tls", "b", 2))
        self.assertEqual(parse_address("ws://c:3/ws", tls).scheme, "ws")

    def test_bad(self):
        for text in ["", "http://h:1", "tcp://h", "h", "tcp://h:1/path",
                     "tcp://:1", "h:notaport", None, "tcp://h:99999"]:
            self.assertRaises(ValueError, parse_address, text)


class DefaultEndpointTests(SynchronousTestCase):
    def test_tcp(self):
        """
        Without an C{endpoint_factory} the client connects with Twisted's
        own endpoints.
        """
        reactor = MemoryReactorClock()
        client = GateClient(reactor, "tcp://127.0.0.1:4000", login={})
        client.connect()
        [(host, port, factory, _, _)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 4000))

    def test_tls(self):
        reactor = MemoryReactorClock()
        client = GateClient(reactor, "tls://127.0.0.1:4001", login={})
        client.connect()
        [(host, port, factory, _, _)] = reactor.tcpClients
        self.assertEqual(port, 4001)
        self.assertTrue(_has_tls(factory))

    def test_plain_tcp_has_no_tls(self):
        reactor = MemoryReactorClock()
        GateClient(reactor, "tcp://127.0.0.1:4000", login={}).connect()
        self.assertFalse(_has_tls(reactor.tcpClients[0][2]))

    def test_trust_root(self):
        """
        A CA file may hold several certificates; one without any is refused
        when the client is made, not when it first connects.
        """
        ca, _ = make_ca()
        other, _ = make_ca()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ca + other)
        load_trust_root(path)
        GateClient(MemoryReactorClock(), "tls://h:1", login={}, ca_file=path)
        with open(path, "wb") as f:
            f.write(b"nothing here")
        self.assertRaises(ValueError, load_trust_root, path)
        self.assertRaises(OSError, GateClient, MemoryReactorClock(),
                          "tls://h:1", login={}, ca_file=path + ".missing")

    def test_arguments(self):
        reactor = MemoryReactorClock()
        self.assertRaises(ValueError, GateClient, reactor, "tcp://h:1")
        self.assertRaises(ValueError, GateClient, reactor, "tcp://h:1",
                          login={}, token="t")
        self.assertRaises(ValueError, GateClient, reactor, "bogus", login={})
        client = GateClient(reactor, "tcp://h:1", login={})
        client.connect()
        self.assertRaises(RuntimeError, client.connect)


def _has_tls(factory):
    """
    Whether a TLS layer sits somewhere in the chain of wrapped factories
    that HostnameEndpoint hands the reactor.
    """
    seen = set()
    while factory is not None and id(factory) not in seen:
        seen.add(id(factory))
        if isinstance(factory, TLSMemoryBIOFactory):
            return True
        factory = (getattr(factory, "wrappedFactory", None)
                   or getattr(factory, "_wrappedFactory", None)
                   or getattr(factory, "_factory", None))
    return False


# The envelope state machine


class BindTests(SynchronousTestCase):
    def test_login(self):
        h = ClientHarness()
        d = h.client.connect()
        self.assertEqual(h.state_names(), ["connecting"])
        (login,) = h.gate.received()
        self.assertEqual(login, {"t": "login", "id": 1, "data": {"name": "alice"}})
        self.assertNoResult(d)
        self.assertFalse(h.client.connected)
        h.gate.send({"t": "resp", "id": 1, "data": {"hi": 1},
                     "player_id": "alice", "resume_token": "rt", "last_seq": 7})
        resp = self.successResultOf(d)
        self.assertEqual(resp["data"], {"hi": 1})
        self.assertEqual(h.client.player_id, "alice")
        self.assertTrue(h.client.connected)
        # A fresh login replays nothing, so nothing is assumed seen.
        self.assertEqual(h.client.last_seq, 0)
        self.assertEqual(h.state_names(), ["connecting", "logged_in"])

    def test_auth(self):
        h = ClientHarness(login=None, token="jwt")
        d = h.client.connect()
        (auth,) = h.gate.received()
        self.assertEqual(auth, {"t": "auth", "id": 1, "token": "jwt"})
        h.gate.send({"t": "resp", "id": 1, "data": None, "player_id": "p9",
                     "resume_token": "rt", "last_seq": 0})
        self.successResultOf(d)
        self.assertEqual(h.client.player_id, "p9")

    def test_login_refused(self):
        """
        A refused login fails connect() with the gate's code and is not
        retried.
        """
        h = ClientHarness()
        d = h.client.connect()
        h.gate.received()
        h.gate.send({"t": "err", "id": 1, "code": "auth_failed", "msg": "no"})
        e = self.failureResultOf(d, GateError).value
        self.assertEqual((e.code, e.msg), ("auth_failed", "no"))
        self.assertTrue(h.gate.closing)
        h.gate.lose()
        h.clock.advance(1000)
        self.assertEqual(len(h.endpoints.dials), 1)
        self.assertEqual(h.state_names()[-1], "closed")
        self.assertFalse(h.clock.getDelayedCalls())

    def test_refused_connection(self):
        h = ClientHarness()
        h.endpoints.mode = "refuse"
        e = self.failureResultOf(h.client.connect(), GateError).value
        self.assertEqual(e.code, "connect_failed")
        h.clock.advance(1000)
        self.assertEqual(len(h.endpoints.dials), 1)
        self.assertFalse(h.clock.getDelayedCalls())

    def test_connect_timeout(self):
        h = ClientHarness(connect_timeout=5)
        h.endpoints.mode = "hang"
        d = h.client.connect()
        h.clock.advance(4.9)
        self.assertNoResult(d)
        h.clock.advance(0.1)
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "connect_failed")

    def test_bind_timeout(self):
        """
        A gate that accepts the connection but never answers the login is
        given up on after C{connect_timeout}.
        """
        h = ClientHarness(connect_timeout=5)
        d = h.client.connect()
        h.clock.advance(5)
        self.assertTrue(h.gate.closing)
        h.gate.lose()
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "connect_failed")

    def test_cancel_connect(self):
        h = ClientHarness()
        d = h.client.connect()
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(h.gate.closing)
        self.assertEqual(h.state_names()[-1], "closed")


class RequestTests(SynchronousTestCase):
    def setUp(self):
        self.h = ClientHarness()
        self.successResultOf(self.h.connect())

    def test_replies(self):
        """
        Requests get increasing ids; each reply fires its own Deferred.
        """
        h = self.h
        d1 = h.client.request("echo", {"a": 1})
        d2 = h.client.request("move", [1, 2])
        sent = h.gate.received()
        self.assertEqual(sent, [
            {"t": "req", "id": 2, "route": "echo", "data": {"a": 1}},
            {"t": "req", "id": 3, "route": "move", "data": [1, 2]},
        ])
        h.gate.send({"t": "resp", "id": 2, "data": {"a": 1}})
        self.assertEqual(self.successResultOf(d1), {"a": 1})
        self.assertNoResult(d2)
        h.gate.send({"t": "err", "id": 3, "code": "rate_limited", "msg": "slow"})
        e = self.failureResultOf(d2, GateError).value
        self.assertEqual((e.code, e.msg), ("rate_limited", "slow"))
        self.assertEqual(str(e), "rate_limited: slow")

    def test_unknown_reply_ignored(self):
        self.h.gate.send({"t": "resp", "id": 99, "data": 1})
        self.h.gate.send({"t": "err", "code": "busy", "msg": "no id"})
        self.h.gate.send({"t": "future_thing", "x": 1})
        self.assertTrue(self.h.client.connected)

    def test_connection_lost(self):
        """
        Requests in flight fail with C{connection_lost} when the connection
        drops; none are re-sent on the next connection.
        """
        h = self.h
        d = h.client.request("buy", {"item": 1})
        h.gate.lose()
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "connection_lost")
        e = self.failureResultOf(h.client.request("buy", {}), GateError).value
        self.assertEqual(e.code, "not_connected")
        h.clock.advance(30)
        (resume,) = h.gate.received()
        self.assertEqual(resume["t"], "resume")

    def test_cancel(self):
        d = self.h.client.request("slow")
        d.cancel()
        self.failureResultOf(d)
        self.h.gate.send({"t": "resp", "id": 2, "data": 1})

    def test_bad_arguments(self):
        self.failureResultOf(self.h.client.request("echo", object()), TypeError)
        self.failureResultOf(self.h.client.request("echo", float("nan")),
                             ValueError)
        self.failureResultOf(self.h.client.request(None), TypeError)
        self.assertEqual(self.h.gate.received(), [])

    def test_not_connected_before_bind(self):
        h = ClientHarness()
        h.client.connect()
        e = self.failureResultOf(h.client.request("echo"), GateError).value
        self.assertEqual(e.code, "not_connected")


class PushTests(SynchronousTestCase):
    def setUp(self):
        self.h = ClientHarness()
        self.successResultOf(self.h.connect())
        self.h.gate.received()

    def test_persistent_and_transient(self):
        h = self.h
        h.push(1, data="a")
        h.push(None, data="t")
        h.push(2, data="b")
        self.assertEqual(h.pushes, [Push("chat", "a", 1.5, 1),
                                    Push("chat", "t", 1.5, None),
                                    Push("chat", "b", 1.5, 2)])
        self.assertTrue(h.pushes[0].persistent)
        self.assertFalse(h.pushes[1].persistent)
        self.assertEqual(h.client.last_seq, 2)

    def test_duplicates_dropped(self):
        h = self.h
        for seq in (1, 2, 2, 1, 3):
            h.push(seq)
        self.assertEqual([p.seq for p in h.pushes], [1, 2, 3])

    def test_transient_never_deduplicated(self):
        self.h.push(None, data=1)
        self.h.push(None, data=1)
        self.assertEqual(len(self.h.pushes), 2)

    def test_bad_seq_ignored(self):
        self.h.push("7")
        self.h.push(0)
        self.assertEqual(self.h.pushes, [])

    def test_coalesced_acks(self):
        """
        Pushes handed together are acked once, for the highest seq, after
        L{connection.ACK_DELAY}; transient pushes are never acked.
        """
        h = self.h
        for seq in (1, 2, 3):
            h.push(seq)
        h.push(None)
        self.assertEqual(h.gate.received(), [])
        h.clock.advance(connection.ACK_DELAY)
        self.assertEqual(h.gate.received(), [{"t": "ack", "seq": 3}])
        h.push(None)
        h.clock.advance(connection.ACK_DELAY)
        self.assertEqual(h.gate.received(), [])
        h.push(4)
        h.clock.advance(connection.ACK_DELAY)
        self.assertEqual(h.gate.received(), [{"t": "ack", "seq": 4}])

    def test_gap(self):
        h = self.h
        h.push(1)
        h.gate.send({"t": "gap", "from": 2, "to": 5})
        self.assertEqual(h.gaps, [(2, 5)])
        self.assertEqual(h.client.last_seq, 5)
        h.push(4)
        h.push(6)
        self.assertEqual([p.seq for p in h.pushes], [1, 6])
        h.clock.advance(connection.ACK_DELAY)
        self.assertEqual(h.gate.received(), [{"t": "ack", "seq": 6}])

    def test_gap_overlapping_what_was_seen(self):
        """
        Only the part of a gap past what the application has is reported.
        """
        h = self.h
        h.push(1)
        h.push(2)
        h.gate.send({"t": "gap", "from": 1, "to": 2})
        h.gate.send({"t": "gap", "from": 2, "to": 4})
        h.gate.send({"t": "gap", "from": 9, "to": "x"})
        self.assertEqual(h.gaps, [(3, 4)])

    def test_callback_errors_logged(self):
        h = self.h

        def boom(push):
            raise RuntimeError("app bug")

        h.client._on_push = boom
        h.push(1)
        h.push(2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(h.client.last_seq, 2)
        self.assertTrue(h.client.connected)


class HeartbeatTests(SynchronousTestCase):
    def test_answers_ping(self):
        h = ClientHarness()
        self.successResultOf(h.connect())
        h.gate.send({"t": "ping", "ts": 12.5})
        h.gate.send({"t": "ping"})
        h.gate.send({"t": "pong", "ts": 1})
        self.assertEqual(h.gate.received(),
                         [{"t": "pong", "ts": 12.5}, {"t": "pong"}])

    def test_sends_ping(self):
        h = ClientHarness(ping_interval=10)
        self.successResultOf(h.connect())
        h.clock.advance(9.9)
        self.assertEqual(h.gate.received(), [])
        h.clock.advance(0.1)
        self.assertEqual(h.gate.received(), [{"t": "ping", "ts": 10.0}])
        h.gate.send({"t": "pong", "ts": 10.0})
        h.clock.advance(10)
        self.assertEqual(h.gate.received(), [{"t": "ping", "ts": 20.0}])

    def test_silent_gate_dropped(self):
        """
        A connection on which the gate has said nothing for
        L{connection.SILENT_INTERVALS} ping intervals is dropped and made
        again.
        """
        h = ClientHarness(ping_interval=10)
        self.successResultOf(h.connect())
        h.clock.advance(20)
        self.assertFalse(h.gate.closing)
        h.clock.advance(10)
        self.assertTrue(h.gate.closing)
        h.gate.lose()
        self.assertEqual(h.state_names()[-2:], ["disconnected", "reconnecting"])

    def test_no_ping(self):
        h = ClientHarness(ping_interval=0)
        self.successResultOf(h.connect())
        self.assertFalse(h.clock.getDelayedCalls())


class ReconnectTests(SynchronousTestCase):
    def setUp(self):
        self.h = ClientHarness()
        self.successResultOf(self.h.connect(token="rt-1"))
        self.h.gate.received()

    def test_resume_after_drop(self):
        """
        After a drop the client reconnects with backoff and resumes from the
        highest seq handed to the application; pushes the gate replays are
        not handed again.
        """
        h = self.h
        first = h.gate
        h.push(1)
        h.push(2)
        first.lose()
        self.assertFalse(h.client.connected)
        self.assertEqual(h.state_names()[-2:], ["disconnected", "reconnecting"])
        delay = h.states[-1][1]["delay"]
        self.assertTrue(connection.INITIAL_BACKOFF / 2 <= delay
                        <= connection.INITIAL_BACKOFF)
        h.clock.advance(delay - 0.001)
        self.assertEqual(len(h.endpoints.dials), 1)
        h.clock.advance(0.001)
        self.assertEqual(len(h.endpoints.dials), 2)
        self.assertIsNot(h.gate, first)
        (resume,) = h.gate.received()
        self.assertEqual(resume, {"t": "resume", "id": resume["id"],
                                  "player_id": "alice", "resume_token": "rt-1",
                                  "last_seq": 2})
        h.gate.send({"t": "resp", "id": resume["id"], "data": None,
                     "player_id": "alice", "resume_token": "rt-2",
                     "last_seq": 4})
        self.assertEqual(h.state_names()[-1], "resumed")
        self.assertTrue(h.client.connected)
        for seq in (2, 3, 4):
            h.push(seq)
        self.assertEqual([p.seq for p in h.pushes], [1, 2, 3, 4])
        h.clock.advance(connection.ACK_DELAY)
        self.assertEqual(h.gate.received(), [{"t": "ack", "seq": 4}])
        # The newest resume token is used next time.
        h.drop()
        self.assertEqual(h.gate.received()[0]["resume_token"], "rt-2")

    def test_ack_after_resume(self):
        """
        Pushes handed but not yet acked when the connection dropped are
        acked on the resumed connection.
        """
        h = self.h
        h.push(1)
        h.gate.lose()
        h.clock.advance(30)
        self.assertEqual(h.bind(token="rt-2", last_seq=1)["last_seq"], 1)
        h.clock.advance(connection.ACK_DELAY)
        self.assertEqual(h.gate.received(), [{"t": "ack", "seq": 1}])

    def test_resume_into_a_new_incarnation(self):
        """
        A resume answered with a C{last_seq} below what the application was
        handed means the player began again at the gate: the client starts
        a new stream (state C{logged_in}) instead of hiding the new pushes
        as duplicates.
        """
        h = self.h
        for seq in (1, 2, 3):
            h.push(seq)
        h.gate.lose()
        h.clock.advance(30)
        h.bind(token="rt-2", last_seq=1)
        self.assertEqual(h.state_names()[-1], "logged_in")
        self.assertEqual(h.client.last_seq, 0)
        h.push(2)
        self.assertEqual([p.seq for p in h.pushes][-1], 2)

    def test_backoff(self):
        """
        Failed attempts double the delay, with jitter in its upper half,
        up to C{max_backoff}; a bind resets it.
        """
        h = self.h
        h.endpoints.mode = "refuse"
        h.gate.lose()
        for _ in range(9):
            h.clock.advance(h.states[-1][1]["delay"])
        delays = [i["delay"] for s, i in h.states if s == "reconnecting"]
        ceilings = [min(30.0, 0.5 * 2 ** n) for n in range(len(delays))]
        for delay, ceiling in zip(delays, ceilings):
            self.assertTrue(ceiling / 2 <= delay <= ceiling, (delay, ceiling))
        self.assertEqual(ceilings[-1], 30.0)
        h.endpoints.mode = "accept"
        h.clock.advance(h.states[-1][1]["delay"])
        h.bind()
        h.gate.lose()
        self.assertLessEqual(h.states[-1][1]["delay"], 0.5)

    def test_failover_to_next_address(self):
        """
        With several addresses, a failed reconnect attempt moves on to the
        next one (the first dial after a drop retries the same gate), and
        the session resumes there: how the players of a killed gate reach
        another gate of the cluster.
        """
        h = ClientHarness(["tcp://a.example:1", "tcp://b.example:2",
                           "tcp://c.example:3"])
        self.successResultOf(h.connect())
        h.gate.received()
        h.push(1)
        h.endpoints.mode = "refuse"
        h.gate.lose()
        h.clock.advance(h.states[-1][1]["delay"])
        h.endpoints.mode = "accept"
        h.clock.advance(h.states[-1][1]["delay"])
        self.assertEqual([a.host for a in h.endpoints.dials],
                         ["a.example", "a.example", "b.example"])
        (resume,) = h.gate.received()
        self.assertEqual((resume["t"], resume["last_seq"]), ("resume", 1))
        h.gate.send({"t": "resp", "id": resume["id"], "data": None,
                     "player_id": "alice", "resume_token": "rt-2",
                     "last_seq": 1})
        self.assertEqual(h.state_names()[-1], "resumed")
        self.assertEqual(h.client.address.host, "b.example")
        # Round the list: c, then a again.
        h.endpoints.mode = "refuse"
        h.gate.lose()
        for _ in range(3):
            h.clock.advance(h.states[-1][1]["delay"])
        self.assertEqual([a.host for a in h.endpoints.dials[3:]],
                         ["b.example", "c.example", "a.example"])

    def test_failover_after_reconnect_target(self):
        """
        An address a gate's C{reconnect} named that then fails is left for
        the first of the addresses given.
        """
        h = ClientHarness(["tcp://a.example:1", "tcp://b.example:2"])
        self.successResultOf(h.connect())
        h.gate.received()
        h.gate.send({"t": "reconnect", "addr": "z.example:9"})
        h.bind()
        h.endpoints.mode = "refuse"
        h.gate.lose()
        h.clock.advance(h.states[-1][1]["delay"])
        h.endpoints.mode = "accept"
        h.clock.advance(h.states[-1][1]["delay"])
        self.assertEqual([a.host for a in h.endpoints.dials],
                         ["a.example", "z.example", "z.example", "a.example"])

    def test_addresses_checked(self):
        with self.assertRaises(ValueError):
            GateClient(MemoryReactorClock(), [], login={})
        with self.assertRaises(ValueError):
            GateClient(MemoryReactorClock(), ["tcp://a:1", "http://b/"],
                       login={})
        with self.assertRaisesRegex(ValueError, "for tcp\\+enc"):
            GateClient(MemoryReactorClock(), ["tcp+enc://a:1", "tcp://b:2"],
                       login={}, gate_key="AAAA")

    def test_resume_rejected_falls_back_to_login(self):
        h = self.h
        h.push(5)
        h.gate.lose()
        h.clock.advance(30)
        (resume,) = h.gate.received()
        h.gate.send({"t": "err", "id": resume["id"], "code": "resume_rejected",
                     "msg": "expired"})
        self.assertEqual(h.states[-1], ("resume_failed",
                                        {"code": "resume_rejected",
                                         "msg": "expired"}))
        (login,) = h.gate.received()
        self.assertEqual(login["t"], "login")
        self.assertEqual(login["data"], {"name": "alice"})
        h.gate.send({"t": "resp", "id": login["id"], "data": None,
                     "player_id": "alice", "resume_token": "rt-9",
                     "last_seq": 0})
        self.assertEqual(h.state_names()[-1], "logged_in")
        # The player's seqs restarted: seq 1 is new, not a duplicate.
        self.assertEqual(h.client.last_seq, 0)
        h.push(1)
        self.assertEqual([p.seq for p in h.pushes], [5, 1])

    def test_resume_rejected_then_connection_closed(self):
        """
        If the gate hangs up after refusing the resume, the next attempt
        logs in.
        """
        h = self.h
        h.gate.lose()
        h.clock.advance(30)
        (resume,) = h.gate.received()
        h.gate.send({"t": "err", "id": resume["id"], "code": "auth_failed",
                     "msg": ""})
        h.gate.received()
        h.gate.lose()
        h.clock.advance(30)
        self.assertEqual(h.gate.received()[0]["t"], "login")

    def test_resume_busy_retried(self):
        h = self.h
        h.gate.lose()
        h.clock.advance(30)
        (resume,) = h.gate.received()
        h.gate.send({"t": "err", "id": resume["id"], "code": "busy", "msg": ""})
        self.assertTrue(h.gate.closing)
        h.gate.lose()
        self.assertEqual(h.state_names()[-1], "reconnecting")
        h.clock.advance(30)
        self.assertEqual(h.gate.received()[0]["t"], "resume")

    def test_relogin_refused_is_final(self):
        h = self.h
        h.gate.lose()
        h.clock.advance(30)
        (resume,) = h.gate.received()
        h.gate.send({"t": "err", "id": resume["id"], "code": "resume_rejected",
                     "msg": ""})
        (login,) = h.gate.received()
        h.gate.send({"t": "err", "id": login["id"], "code": "auth_failed",
                     "msg": "banned"})
        self.assertEqual(h.states[-1], ("closed", {"code": "auth_failed",
                                                   "msg": "banned"}))
        h.gate.lose()
        h.clock.advance(100)
        self.assertEqual(len(h.endpoints.dials), 2)

    def test_kick_shutdown_reconnects(self):
        h = self.h
        h.gate.send({"t": "kick", "reason": "shutdown", "msg": "bye"})
        h.gate.lose(ConnectionDone)
        self.assertEqual(h.kicks, [("shutdown", "bye")])
        h.clock.advance(30)
        self.assertEqual(len(h.endpoints.dials), 2)

    def test_kick_replaced_is_final(self):
        for reason in ("replaced", "admin"):
            h = ClientHarness()
            self.successResultOf(h.connect())
            h.gate.send({"t": "kick", "reason": reason, "msg": "x"})
            h.gate.lose(ConnectionDone)
            self.assertEqual(h.kicks, [(reason, "x")])
            self.assertEqual(h.states[-1], ("closed", {"code": "kicked",
                                                       "msg": reason + ": x"}))
            h.clock.advance(100)
            self.assertEqual(len(h.endpoints.dials), 1)
            self.assertFalse(h.clock.getDelayedCalls())

    def test_no_reconnect(self):
        h = ClientHarness(reconnect=False)
        self.successResultOf(h.connect())
        h.gate.lose()
        self.assertEqual(h.state_names()[-1], "closed")
        h.clock.advance(100)
        self.assertEqual(len(h.endpoints.dials), 1)

    def test_bad_payload_reconnects(self):
        h = self.h
        h.gate.protocol.dataReceived(frame(b"[1, 2]"))
        self.assertTrue(h.gate.closing)
        h.gate.lose()
        self.assertEqual(h.states[-2][1]["code"], "protocol_error")
        h.clock.advance(30)
        self.assertEqual(len(h.endpoints.dials), 2)


class MigrationTests(SynchronousTestCase):
    def setUp(self):
        self.h = ClientHarness()
        self.successResultOf(self.h.connect())
        self.h.gate.received()

    def test_follow_reconnect(self):
        """
        C{reconnect} with C{host:port} moves the session to that address,
        same scheme: the client resumes there, then closes the old
        connection.
        """
        h = self.h
        old = h.gate
        h.push(1, gate=old)
        old.send({"t": "reconnect", "addr": "other.example:4100",
                  "reason": "drain"})
        self.assertEqual(h.endpoints.dials[-1],
                         Address("tcp", "other.example", 4100))
        new = h.gate
        self.assertIsNot(new, old)
        (resume,) = new.received()
        self.assertEqual(resume["t"], "resume")
        self.assertEqual(resume["last_seq"], 1)
        # The old connection still works meanwhile.
        self.assertTrue(h.client.connected)
        d = h.client.request("echo", 1)
        self.assertEqual(old.received()[0]["route"], "echo")
        h.push(2, gate=old)
        # Our own resume replaces the old session; that is no reason to stop.
        old.send({"t": "kick", "reason": "replaced", "msg": ""})
        self.assertEqual(h.kicks, [])
        new.send({"t": "resp", "id": resume["id"], "data": None,
                  "player_id": "alice", "resume_token": "rt-n", "last_seq": 2})
        self.assertTrue(old.closing)
        old.lose(ConnectionDone)
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "connection_lost")
        h.push(2, gate=new)
        h.push(3, gate=new)
        self.assertEqual([p.seq for p in h.pushes], [1, 2, 3])
        self.assertTrue(h.client.connected)
        self.assertEqual(h.client.address, Address("tcp", "other.example", 4100))
        self.assertIn("migrating", h.state_names())
        self.assertEqual(h.state_names()[-1], "resumed")
        # Later drops reconnect to the new address.
        h.drop()
        self.assertEqual(h.endpoints.dials[-1].host, "other.example")

    def test_old_dropped_first(self):
        """
        If the old gate hangs up before the new one answers, the session
        waits for the new one rather than reconnecting elsewhere.
        """
        h = self.h
        old = h.gate
        old.send({"t": "reconnect", "addr": "b:2"})
        new = h.gate
        old.lose()
        self.assertFalse(h.client.connected)
        self.assertNotIn("reconnecting", h.state_names())
        h.bind()
        self.assertTrue(h.client.connected)
        self.assertEqual(len(h.endpoints.dials), 2)
        self.assertIs(h.gate, new)

    def test_websocket_url(self):
        h = self.h
        h.endpoints.mode = "record"
        h.gate.send({"t": "reconnect", "addr": "ws://c:8081/ws"})
        address, factory = h.endpoints.gates[-1]
        self.assertEqual(address, Address("ws", "c", 8081, "/ws"))
        self.assertEqual(factory.url, "ws://c:8081/ws")

    def test_migration_fails(self):
        """
        A move that fails leaves the session on the old gate and is tried
        again after the backoff delay.
        """
        h = self.h
        old = h.gate
        h.endpoints.mode = "refuse"
        old.send({"t": "reconnect", "addr": "b:2"})
        self.assertEqual(h.state_names()[-1], "migration_failed")
        self.assertTrue(h.client.connected)
        self.assertFalse(old.closing)
        h.endpoints.mode = "accept"
        h.clock.advance(h.states[-1][1]["delay"])
        self.assertEqual(h.endpoints.dials[-1], Address("tcp", "b", 2))
        self.assertEqual(h.bind()["t"], "resume")
        self.assertTrue(old.closing)
        self.assertEqual(h.state_names()[-1], "resumed")

    def test_move_refused_by_a_slow_store(self):
        """
        The new gate answers the resume C{internal} (its store timed out)
        although the claim held, and the old gate then kicks the old
        connection C{replaced}: that is the client's own move, not another
        device; it goes on to the new gate and resumes there.
        """
        h = self.h
        old = h.gate
        h.push(1, gate=old)
        old.send({"t": "reconnect", "addr": "b:2", "reason": "drain"})
        new = h.gate
        (resume,) = new.received()
        new.send({"t": "err", "id": resume["id"], "code": "internal",
                  "msg": "the shared player store is unreachable"})
        new.lose()
        self.assertEqual(h.state_names()[-1], "migration_failed")
        old.send({"t": "kick", "reason": "replaced", "msg": ""})
        old.lose(ConnectionDone)
        self.assertEqual(h.kicks, [])
        self.assertNotIn("closed", h.state_names())
        h.clock.advance(h.states[-2][1]["delay"])
        self.assertIsNot(h.gate, new)
        (again,) = h.gate.received()
        self.assertEqual((again["t"], again["last_seq"]), ("resume", 1))
        self.assertEqual(h.endpoints.dials[-1], Address("tcp", "b", 2))
        h.gate.send({"t": "resp", "id": again["id"], "data": None,
                     "player_id": "alice", "resume_token": "rt-3",
                     "last_seq": 1})
        self.assertEqual(h.state_names()[-1], "resumed")
        self.assertTrue(h.client.connected)

    def test_replaced_without_a_move_is_final(self):
        """
        Without a C{reconnect}, C{replaced} still means another device took
        the player: the client stops.
        """
        h = self.h
        h.gate.send({"t": "kick", "reason": "replaced", "msg": "x"})
        h.gate.lose(ConnectionDone)
        self.assertEqual(h.state_names()[-1], "closed")

    def test_bad_address_ignored(self):
        self.h.gate.send({"t": "reconnect", "addr": "http://x/"})
        self.assertEqual(len(self.h.endpoints.dials), 1)
        self.assertTrue(self.h.client.connected)


class CloseTests(SynchronousTestCase):
    def test_close(self):
        """
        close() acks what was handed, closes the connection, fails what is
        in flight and leaves no timer behind.
        """
        h = ClientHarness()
        self.successResultOf(h.connect())
        h.gate.received()
        h.push(3)
        req = h.client.request("echo")
        d = h.client.close()
        self.assertEqual(h.gate.received(),
                         [{"t": "req", "id": 2, "route": "echo", "data": None},
                          {"t": "ack", "seq": 3}])
        self.assertTrue(h.gate.closing)
        self.assertNoResult(d)
        self.assertFalse(h.client.connected)
        h.gate.lose(ConnectionDone)
        self.successResultOf(d)
        self.assertEqual(self.failureResultOf(req, GateError).value.code,
                         "connection_lost")
        self.assertEqual(h.states[-1][0], "closed")
        self.assertEqual(h.states[-1][1]["code"], "closed")
        self.assertFalse(h.clock.getDelayedCalls())
        self.successResultOf(h.client.close())

    def test_close_while_waiting(self):
        h = ClientHarness()
        self.successResultOf(h.connect())
        h.gate.lose()
        self.assertTrue(h.clock.getDelayedCalls())
        self.successResultOf(h.client.close())
        self.assertFalse(h.clock.getDelayedCalls())
        h.clock.advance(100)
        self.assertEqual(len(h.endpoints.dials), 1)

    def test_close_while_connecting(self):
        h = ClientHarness()
        h.endpoints.mode = "hang"
        d = h.client.connect()
        self.successResultOf(h.client.close())
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         "closed")
        self.assertFalse(h.clock.getDelayedCalls())

    def test_link_provides_receiver(self):
        h = ClientHarness()
        h.client.connect()
        verifyObject(IPayloadReceiver, h.gate.protocol.receiver)


# Real sockets


class EchoGate:
    """
    Just enough of a gate for the real-socket tests: logs anyone in, echoes
    requests, sends one persistent push after login and records acks.
    """

    def __init__(self):
        self.acked = Deferred()
        self.connections = []

    def handle(self, conn, env):
        t = env.get("t")
        if t == "login":
            conn.send({"t": "resp", "id": env["id"], "data": {"ok": True},
                       "player_id": env["data"]["name"], "resume_token": "rt",
                       "last_seq": 0})
            conn.send({"t": "push", "route": "hello", "data": "welcome",
                       "ts": 1.0, "seq": 1})
        elif t == "req":
            if env["route"] == "echo":
                conn.send({"t": "resp", "id": env["id"], "data": env["data"]})
            else:
                conn.send({"t": "err", "id": env["id"],
                           "code": "route_not_found", "msg": env["route"]})
        elif t == "ack" and not self.acked.called:
            self.acked.callback(env["seq"])
        elif t == "ping":
            conn.send({"t": "pong", "ts": env.get("ts")})


class TCPGateProtocol(Protocol):
    def connectionMade(self):
        self.decoder = FrameDecoder(65536)
        self.lost = Deferred()
        self.factory.gate.connections.append(self)

    def dataReceived(self, data):
        for payload in self.decoder.feed(data):
            self.factory.gate.handle(self, json.loads(payload))

    def send(self, obj):
        self.transport.write(frame(encode(obj)))

    def connectionLost(self, reason):
        self.lost.callback(None)


class WSGateProtocol(WebSocketServerProtocol):
    def onOpen(self):
        self.lost = Deferred()
        self.factory.gate.connections.append(self)

    def onMessage(self, payload, isBinary):
        self.factory.gate.handle(self, json.loads(payload))

    def send(self, obj):
        self.sendMessage(encode(obj), isBinary=False)

    def connectionLost(self, reason):
        WebSocketServerProtocol.connectionLost(self, reason)
        if hasattr(self, "lost"):
            self.lost.callback(None)


def listen_tcp_gate(gate):
    factory = Factory.forProtocol(TCPGateProtocol)
    factory.gate = gate
    return global_reactor.listenTCP(0, factory, interface="127.0.0.1")


def make_ca():
    """
    A throwaway CA: its certificate (PEM) and a function issuing a server
    certificate and key (PEM) for 127.0.0.1.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + day)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))

    def issue():
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = (x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(
                      NameOID.COMMON_NAME, "127.0.0.1")]))
                  .issuer_name(name).public_key(server_key.public_key())
                  .serial_number(x509.random_serial_number())
                  .not_valid_before(now - day).not_valid_after(now + day)
                  .add_extension(x509.SubjectAlternativeName([
                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
                  .sign(key, hashes.SHA256()))
        return (server.public_bytes(serialization.Encoding.PEM),
                server_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))

    return cert.public_bytes(serialization.Encoding.PEM), issue


def listen_tls_gate(gate, issue):
    cert_pem, key_pem = issue()
    options = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    factory = Factory.forProtocol(TCPGateProtocol)
    factory.gate = gate
    return global_reactor.listenSSL(0, factory, options, interface="127.0.0.1")


def listen_ws_gate(gate):
    factory = WebSocketServerFactory()
    factory.protocol = WSGateProtocol
    factory.gate = gate
    return global_reactor.listenTCP(0, factory, interface="127.0.0.1")


class WebSocketSendTests(SynchronousTestCase):
    def test_send_while_closing(self):
        """
        A payload sent (an ack or ping timer) once the close handshake has
        begun is dropped, as on a closing TCP connection; autobahn would
        raise out of the client's timer.
        """
        protocol = WebSocketPayloadProtocol()
        for state in (protocol.STATE_CLOSING, protocol.STATE_CLOSED):
            protocol.state = state
            protocol.sendPayload(b'{"t":"ack","seq":1}')


class RealSocketTests(TestCase):
    timeout = 20

    async def check(self, listen, scheme, **kwargs):
        gate = EchoGate()
        port = listen(gate)
        self.addCleanup(port.stopListening)
        pushes = []
        got_push = Deferred()

        def on_push(push):
            pushes.append(push)
            if not got_push.called:
                got_push.callback(None)

        path = "/ws" if scheme == "ws" else ""
        client = GateClient(global_reactor,
                            f"{scheme}://127.0.0.1:{port.getHost().port}{path}",
                            login={"name": "bob"}, on_push=on_push,
                            ping_interval=60, **kwargs)
        resp = await client.connect()
        self.assertEqual(resp["player_id"], "bob")
        self.assertEqual(await client.request("echo", {"x": [1, "é"]}),
                         {"x": [1, "é"]})
        with self.assertRaises(GateError) as cm:
            await client.request("nope", None)
        self.assertEqual(cm.exception.code, "route_not_found")
        await got_push
        self.assertEqual(pushes, [Push("hello", "welcome", 1.0, 1)])
        self.assertEqual(await gate.acked, 1)
        await client.close()
        await gatherResults([c.lost for c in gate.connections])
        self.assertFalse(client.connected)

    def test_tcp(self):
        return Deferred.fromCoroutine(self.check(listen_tcp_gate, "tcp"))

    async def test_tls(self):
        """
        C{tls://} verifies the gate's certificate against a pinned CA.
        """
        ca, issue = make_ca()
        ca_file = self.mktemp()
        with open(ca_file, "wb") as f:
            f.write(ca)
        await self.check(lambda gate: listen_tls_gate(gate, issue), "tls",
                         ca_file=ca_file)

    async def test_tls_untrusted(self):
        """
        Without the CA pinned, the platform's trust store does not vouch
        for the gate, and the connection fails.
        """
        gate = EchoGate()
        _, issue = make_ca()
        port = listen_tls_gate(gate, issue)
        self.addCleanup(port.stopListening)
        client = GateClient(global_reactor,
                            f"tls://127.0.0.1:{port.getHost().port}",
                            login={"name": "x"})
        with self.assertRaises(GateError) as cm:
            await client.connect()
        self.assertEqual(cm.exception.code, "connect_failed")
        await gatherResults([c.lost for c in gate.connections])

    def test_websocket(self):
        return Deferred.fromCoroutine(self.check(listen_ws_gate, "ws"))

    async def test_refused(self):
        port = listen_tcp_gate(EchoGate())
        number = port.getHost().port
        await port.stopListening()
        client = GateClient(global_reactor, f"tcp://127.0.0.1:{number}",
                            login={"name": "x"})
        with self.assertRaises(GateError) as cm:
            await client.connect()
        self.assertEqual(cm.exception.code, "connect_failed")
