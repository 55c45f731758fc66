"""
Tests for L{gate.deadline}: an API or metrics request must arrive whole
within C{api.request_timeout} of its first byte, however it trickles in;
idle keep-alive connections and slow answers are not its business.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gate.api import APISite
from gate.deadline import DeadlineChannel

GET = b"GET /x HTTP/1.1\r\nHost: gate\r\n\r\n"


class Slow(Resource):
    """
    Answers each request when the test fires its Deferred.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.pending = []

    def render(self, request):
        d = Deferred()
        d.addCallback(lambda _: (request.write(b"ok"), request.finish()))
        self.pending.append(d)
        return NOT_DONE_YET


class DeadlineTests(SynchronousTestCase):
    def connect(self, timeout=30.0):
        self.clock = Clock()
        self.resource = Slow()
        site = APISite(self.resource, 1000, timeout)
        site.reactor = self.clock
        self.channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        self.assertIsInstance(self.channel, DeadlineChannel)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost,
                        Failure(ConnectionDone()))

    def trickle(self, data, every):
        for i in range(len(data)):
            self.channel.dataReceived(data[i:i + 1])
            self.clock.advance(every)

    def test_trickled_request_dropped(self):
        """
        A byte every second keeps twisted.web's idle timer from firing, but
        not the deadline: the connection goes 30 s after the first byte.
        """
        self.connect()
        self.trickle(GET[:29], 1.0)
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(GET[29:30])
        self.clock.advance(1.0)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.resource.pending, [])

    def test_whole_request_in_time(self):
        """
        A request that arrives in time is served, however long its answer
        takes; the next request has a deadline of its own.
        """
        self.connect()
        self.trickle(GET, 0.5)
        self.assertEqual(len(self.resource.pending), 1)
        self.clock.advance(100)  # the handler is slow: not the client's fault
        self.assertFalse(self.transport.disconnecting)
        self.resource.pending[0].callback(None)
        self.assertIn(b"200 OK", self.transport.value())
        self.clock.advance(45)  # idle between requests: under twisted's 60 s
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(GET[:5])
        self.clock.advance(30)
        self.assertTrue(self.transport.disconnecting)

    def test_pipelined_request(self):
        """
        A request sent while the one before is handled gets its deadline
        once it is read.
        """
        self.connect()
        self.channel.dataReceived(GET + GET[:10])
        self.clock.advance(40)
        self.assertFalse(self.transport.disconnecting)
        self.resource.pending[0].callback(None)
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_body_counts(self):
        """
        The body is part of the request: a trickled one is cut off too.
        """
        self.connect(timeout=5.0)
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: g\r\n"
                                  b"Content-Length: 100\r\n\r\n")
        self.trickle(b"y" * 10, 0.5)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.resource.pending, [])

    def test_no_deadline(self):
        self.connect(timeout=None)
        self.trickle(GET[:10], 10.0)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.deadlines(), [])

    def test_timer_gone_with_connection(self):
        self.connect()
        self.channel.dataReceived(GET[:5])
        self.assertEqual(len(self.deadlines()), 1)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.deadlines(), [])

    def deadlines(self):
        return [c for c in self.clock.getDelayedCalls()
                if c.func == self.channel._too_slow]
