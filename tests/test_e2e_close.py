"""
Closing a client connection without losing its last frame (PROTOCOL.md
sections 1 and 2: a C{kick} or a closing C{err} is the last thing a client
gets before the gate hangs up).

Closing a socket whose received data is still unread makes the kernel send
a reset and throw away what it has not yet sent: the C{kick} of a client
that does not keep up, or the C{err} of one that keeps sending. So the
gate half-closes plain TCP (the final frame, then FIN) and reads on,
discarding, until the client closes; TLS does the same with its
close_notify. Either way the session is over once its final frame is
sent, so a client that never closes cannot hold up a stopping gate, and
the connection is dropped after C{CLOSE_TIMEOUT} at the latest.

In memory: L{GateTCPProtocol} over a half-closeable L{StringTransport}.
Over real sockets (L{tests.e2e}): clients that flood without reading, on
TCP and on TLS (L{tests.certs}).
"""

import json
import struct

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (TCP4ClientEndpoint, connectProtocol,
                                        wrapClientTLS)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (IHalfCloseableDescriptor,
                                         IHalfCloseableProtocol,
                                         ISSLTransport)
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import alsoProvides, implementer

from gate.client.address import load_trust_root
from gate.connection import CLOSE_TIMEOUT
from gate.framing import frame
from gate.tcp import GateTCPFactory
from tests.certs import make_pki
from tests.e2e import (HTTP, STOP_TIMEOUT, TIMEOUT, TCPClient, start_gate,
                       until, within)
from tests.fakes import Stack


class HalfCloseableTransport(StringTransport):
    """
    A L{StringTransport} that half-closes as a TCP socket does.
    """

    def __init__(self, **kw):
        StringTransport.__init__(self, **kw)
        alsoProvides(self, IHalfCloseableDescriptor)
        self.write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class TLSTransport(HalfCloseableTransport):
    """
    Stands in for Twisted's TLS wrapper, which claims the interfaces of the
    socket under it (half-closing included) besides L{ISSLTransport}.
    """

    def __init__(self, **kw):
        HalfCloseableTransport.__init__(self, **kw)
        alsoProvides(self, ISSLTransport)


class TCPCloseTests(SynchronousTestCase):
    """
    L{GateTCPProtocol.close}: half-close, read on, end the session when the
    final frame is sent.
    """

    def connect(self, transport_class=HalfCloseableTransport):
        self.stack = Stack()
        factory = GateTCPFactory(self.stack.sessions,
                                 self.stack.config["session.max_frame"],
                                 self.stack.clock)
        address = IPv4Address("TCP", "10.1.2.3", 999)
        protocol = factory.buildProtocol(address)
        transport = transport_class(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_kick_half_closes(self):
        """
        A kick is written, then the write side is closed; the connection
        reads on, and the session ends once the FIN is sent.
        """
        protocol, transport = self.connect()
        session = protocol.session
        session.kick("admin", "bye")
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        self.assertIn(b'"kick"', transport.value())
        self.assertIn(session.id, self.stack.sessions.sessions)
        protocol.writeConnectionLost()
        self.assertTrue(session.closed)
        self.assertEqual(self.stack.sessions.sessions, {})

    def test_reads_on_and_discards(self):
        """
        What the client sends after the gate closed is read and dropped:
        not parsed, not answered.
        """
        protocol, transport = self.connect()
        protocol.session.kick("admin", "bye")
        transport.clear()
        protocol.dataReceived(frame(b'{"t": "ping"}') +
                              struct.pack(">I", 2 ** 31))
        self.assertEqual(transport.value(), b"")

    def test_client_closes(self):
        """
        The client's FIN after the gate's ends the connection.
        """
        protocol, transport = self.connect()
        protocol.session.kick("admin", "bye")
        protocol.writeConnectionLost()
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(ConnectionDone())
        self.stack.clock.advance(CLOSE_TIMEOUT)
        self.assertFalse(transport.disconnected)

    def test_client_never_closes(self):
        """
        A client that does not close is dropped C{CLOSE_TIMEOUT} seconds
        after the gate closed.
        """
        protocol, transport = self.connect()
        protocol.session.kick("admin", "bye")
        protocol.writeConnectionLost()
        self.stack.clock.advance(CLOSE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnected)
        self.stack.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_client_finishes_first(self):
        """
        A client that ends its stream while the session is open is closed
        once what is queued for it is written, within C{CLOSE_TIMEOUT}.
        """
        protocol, transport = self.connect()
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.stack.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(transport.disconnected)

    def test_tls_is_not_half_closed_below(self):
        """
        Over TLS the close goes through the TLS layer (close_notify after
        the queued data): a FIN on the socket under it would cut the TLS
        stream. It does not report when its last bytes leave, so the
        session ends at once.
        """
        protocol, transport = self.connect(TLSTransport)
        self.assertEqual(protocol.transport_name, "tcp+tls")
        session = protocol.session
        session.kick("admin", "bye")
        self.assertFalse(transport.write_closed)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(session.closed)
        self.assertEqual(self.stack.sessions.sessions, {})


# Over real sockets.

class RecordingClient(TCPClient):
    """
    A TCP client that notes how its connection ended.
    """

    reason = None

    def connectionLost(self, reason):
        self.reason = reason
        TCPClient.connectionLost(self, reason)


#: A ping whose pong is about as large: floods fill buffers fast.
BIG_PING = frame(json.dumps({"t": "ping", "ts": "x" * 2000}).encode())


def session_of(gate, player_id):
    """
    The session of C{player_id} on the in-process C{gate}.
    """
    (session,) = [s for s in gate.sessions.sessions.values()
                  if s.player_id == player_id]
    return session


class ClosingUnderLoadMixin:
    """
    The same tests over plain TCP and over TLS (L{connect}).
    """

    def start(self):
        # No rate limit: the flood is of pings.
        return start_gate(self, session={
            "max_outbuf": 4096, "rate": 1e9, "burst": 10 ** 9},
            **self.listeners())

    def listeners(self):
        return {}

    async def connect(self, gate):
        """
        A L{RecordingClient} connected to C{gate} over the subclass's
        transport (plain TCP or TLS).
        """
        raise NotImplementedError("each transport's test class connects")

    async def _connect(self, endpoint):
        client = await within(connectProtocol(endpoint, RecordingClient()),
                              TIMEOUT, "a connection")
        self.addCleanup(client.close)
        return client

    async def read_to_end(self, client, connection):
        """
        Read everything the gate sends until it closes; fail unless it
        closed cleanly (a reset is what loses the last frame). The gate's
        side of the connection (C{connection}) then closes too.
        """
        client.transport.resumeProducing()
        await client.wait_lost(STOP_TIMEOUT)
        await until(lambda: not connection.transport.connected,
                    "the gate to close its side")
        self.assertTrue(client.reason.check(ConnectionDone),
                        f"the gate reset the connection instead of closing "
                        f"it: {client.reason.value!r}; last envelopes "
                        f"received: {[e['t'] for e in client.received[-3:]]}")

    async def test_slow_consumer_gets_its_kick(self):
        """
        A client floods pings without reading; the gate stops reading from
        it, and its answers and pushes pile up past C{session.max_outbuf}.
        Its kick C{slow_consumer} still arrives, after everything sent
        before it, when the client finally reads, while its unread pings
        are still on their way to the gate.
        """
        gate = self.start()
        api = HTTP(self, gate)
        client = await self.connect(gate)
        await client.login("flood")
        session = session_of(gate, "flood")
        client.transport.pauseProducing()
        pushed = []

        async def kicked():
            if session.closing:
                return True
            if session.connection.paused:
                await api.push(["flood"], "news", {"n": len(pushed),
                                                   "pad": "p" * 500})
                pushed.append(True)
            else:
                client.send_raw(BIG_PING * 64)
            return False

        await until(kicked, "the gate to kick the flood", interval=0.001)
        # More pings the gate will not read before it closes.
        client.send_raw(BIG_PING * 64)
        await self.read_to_end(client, session.connection)
        last = client.received[-1]
        self.assertEqual((last["t"], last["reason"]),
                         ("kick", "slow_consumer"))
        pushes = [e["data"]["n"] for e in client.received
                  if e["t"] == "push"]
        self.assertEqual(pushes, list(range(len(pushes))))
        self.assertFalse((await api.player("flood"))["online"])

    async def test_err_reaches_a_client_that_keeps_sending(self):
        """
        An oversized frame is answered C{frame_too_large} and the
        connection closed while the client is still sending its body.
        """
        gate = self.start()
        client = await self.connect(gate)
        (session,) = gate.sessions.sessions.values()
        client.send_raw(struct.pack(">I", 2 ** 30) + b"z" * (4 << 20))
        await self.read_to_end(client, session.connection)
        self.assertEqual([(e["t"], e["code"]) for e in client.received],
                         [("err", "frame_too_large")])


class TCPClosingTests(ClosingUnderLoadMixin, TestCase):
    async def connect(self, gate):
        host, port = gate.address("tcp")
        return await self._connect(
            TCP4ClientEndpoint(reactor, host, port, timeout=TIMEOUT))


class TLSClosingTests(ClosingUnderLoadMixin, TestCase):
    def listeners(self):
        self.pki = make_pki(self.mktemp())
        return {"listen": {"tcp": self.pki.endpoint()}}

    async def connect(self, gate):
        host, port = gate.address("tcp")
        options = optionsForClientTLS(
            "127.0.0.1", trustRoot=load_trust_root(self.pki.ca_file))
        return await self._connect(wrapClientTLS(
            options, TCP4ClientEndpoint(reactor, host, port,
                                        timeout=TIMEOUT)))


class ShutdownNotHeldTests(TestCase):
    async def test_client_that_never_closes(self):
        """
        A stopping gate does not wait for a client that reads its kick but
        never closes its side: the session ends when the kick is sent.
        """
        gate = start_gate(self)
        host, port = gate.address("tcp")
        client = await within(connectProtocol(
            TCP4ClientEndpoint(reactor, host, port, timeout=TIMEOUT),
            StubbornClient()), TIMEOUT, "a connection")
        self.addCleanup(client.close)
        await client.login("stubborn")
        connection = session_of(gate, "stubborn").connection
        started = reactor.seconds()
        await within(gate.stopService(), TIMEOUT, "the gate to stop")
        self.assertLess(reactor.seconds() - started, 2.0)
        kick = await client.expect(lambda e: e["t"] == "kick")
        self.assertEqual(kick["reason"], "shutdown")
        await within(client.eof, TIMEOUT, "the gate's FIN")
        self.assertTrue(connection.transport.connected)
        await client.close()
        await until(lambda: not connection.transport.connected,
                    "the gate to close its side")


@implementer(IHalfCloseableProtocol)
class StubbornClient(RecordingClient):
    """
    Reads to the end of the gate's stream but keeps its own side open until
    the test closes it.
    """

    def __init__(self):
        RecordingClient.__init__(self)
        self.eof = Deferred()

    def readConnectionLost(self):
        self.eof.callback(None)

    def writeConnectionLost(self):
        pass

