"""
The length-framed TCP transport: a thin protocol between the socket and a
L{gate.session.Session}.
"""

from twisted.internet.interfaces import (IHalfCloseableDescriptor,
                                         IHalfCloseableProtocol, ISSLTransport)
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from gate.connection import (ClosingTimer, OutputFlow, SessionFactory,
                             peer_of)
from gate.framing import FrameDecoder, FrameTooLarge
from gate.interfaces import IClientConnection
from gate.limits import TCPRefusal


@implementer(IClientConnection, IHalfCloseableProtocol)
class GateTCPProtocol(Protocol):
    transport_name = "tcp"
    session = None
    _tls = False

    def connectionMade(self):
        # The TLS wrapper also claims its socket's interfaces, and passes
        # calls it does not know (loseWriteConnection) to the socket.
        if ISSLTransport.providedBy(self.transport):
            self._tls = True
            self.transport_name = "tcp+tls"
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
        if session.closing or session.closed:
            # Read on and discard: see close().
            return
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

    def readConnectionLost(self):
        # The client has finished sending; after our half-close, it has
        # read everything and closed.
        self._closer.start(self.transport)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        # The final frame and the FIN are with the kernel: the session is
        # over, though the connection reads on until the client closes.
        if self.session is not None:
            self.session.lost()

    def connectionLost(self, reason):
        self.factory.connection_lost(self)
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
        """
        Send what is queued, then end the stream but read on (discarding)
        until the client closes, for at most C{CLOSE_TIMEOUT} seconds:
        closing a socket with unread data resets the connection, and the
        reset destroys the kick or err still on its way. The session ends
        once the last bytes are sent, not when the client closes.
        """
        self._flow.detach()
        self._closer.start(self.transport)
        if self._tls:
            # TLS sends close_notify after what is queued and reads on
            # until the client answers; it does not tell when its last
            # bytes have left, so the session ends now.
            self.transport.loseConnection()
            self.session.lost()
        elif IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def abort(self):
        self.transport.abortConnection()


class GateTCPFactory(SessionFactory, Factory):
    """
    @param sessions: the L{gate.session.SessionManager}.
    """

    protocol = GateTCPProtocol

    def __init__(self, sessions, max_frame, clock, max_outbuf=1 << 20):
        self.setup(sessions, max_frame, clock, max_outbuf)

    def refusal(self, reason):
        return TCPRefusal(self.sessions.limits, self.clock, reason)
