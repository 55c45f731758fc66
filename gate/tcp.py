"""
The length-framed TCP transport: a thin protocol between the socket and a
L{gate.session.Session}.
"""

from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from gate.connection import (ClosingTimer, OutputFlow, SessionFactory,
                             peer_of)
from gate.framing import FrameDecoder, FrameTooLarge
from gate.interfaces import IClientConnection


@implementer(IClientConnection)
class GateTCPProtocol(Protocol):
    transport_name = "tcp"
    session = None

    def connectionMade(self):
        self.peer = peer_of(self.transport)
        self._decoder = FrameDecoder(self.factory.max_frame)
        self._closer = ClosingTimer(self.factory.clock)
        self.session = self.factory.sessions.open(self)
        self._flow = OutputFlow(self.transport, self.factory.max_outbuf,
                                self.session.slow_consumer,
                                self.session.writable,
                                lambda: self.session.replaying)

    def dataReceived(self, data):
        session = self.session
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as e:
            self._deliver(session, e.payloads)
            session.frame_too_large(e.size, e.limit)
            return
        self._deliver(session, payloads)

    @staticmethod
    def _deliver(session, payloads):
        for payload in payloads:
            if session.closing or session.closed:
                break
            session.receive(payload)

    def connectionLost(self, reason):
        self._closer.cancel()
        if self.session is not None:
            self.session.lost()

    # IClientConnection

    @property
    def paused(self):
        return self._flow.paused

    def send(self, outgoing):
        data = outgoing.framed
        self.transport.write(data)
        self._flow.wrote(len(data))

    def close(self):
        self._flow.detach()
        self.transport.loseConnection()
        self._closer.start(self.transport)

    def abort(self):
        self.transport.abortConnection()


class GateTCPFactory(SessionFactory, Factory):
    """
    @param sessions: the L{gate.session.SessionManager}.
    """

    protocol = GateTCPProtocol

    def __init__(self, sessions, max_frame, clock, max_outbuf=1 << 20):
        self.setup(sessions, max_frame, clock, max_outbuf)
