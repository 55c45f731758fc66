"""
The transports a client speaks: length-framed TCP and WebSocket.

Both protocol classes only move payloads (the UTF-8 bytes of one envelope).
Everything about envelopes lives in a plain L{IPayloadReceiver}, one per
connection, so the same logic runs over either transport and is tested
without either.
"""

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from gate.client.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameTooLarge, frame


class IPayloadSender(Interface):
    """
    One open connection to a gate, seen from the envelope logic.
    """

    def sendPayload(payload):
        """
        Send the bytes of one envelope.
        """

    def loseConnection():
        """
        Close after what was sent is flushed.
        """

    def abortConnection():
        """
        Close now, discarding anything unsent.
        """


class IPayloadReceiver(Interface):
    """
    What a transport tells the envelope logic about its connection.
    """

    def payloadConnected(sender):
        """
        The connection can carry payloads (for WebSocket: the handshake is
        done); C{sender} provides L{IPayloadSender}.
        """

    def payloadReceived(payload):
        """
        One complete payload arrived.
        """

    def payloadLost(reason):
        """
        The connection is gone (or never opened), with a L{Failure}.
        """


@implementer(IPayloadSender)
class FramedProtocol(Protocol):
    """
    Length-prefixed frames over a byte stream (TCP or TLS).

    An oversized frame header ends the connection at once: the peer is not
    a gate, or is broken, and buffering its frame would let it grow memory.
    """

    log = Logger()

    def __init__(self, receiver, max_frame=DEFAULT_MAX_FRAME):
        self.receiver = receiver
        self._decoder = FrameDecoder(max_frame)
        self._error = None

    def connectionMade(self):
        self.receiver.payloadConnected(self)

    def dataReceived(self, data):
        if self._error is not None:
            return
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as e:
            self.log.warn("gate sent an oversized frame ({size} bytes, limit "
                          "{limit}); dropping the connection",
                          size=e.size, limit=e.limit)
            self._error = e
            self.transport.abortConnection()
            payloads = e.payloads
        for payload in payloads:
            self.receiver.payloadReceived(payload)

    def connectionLost(self, reason):
        if self._error is not None:
            reason = Failure(self._error)
        self.receiver.payloadLost(reason)

    def sendPayload(self, payload):
        self.transport.write(frame(payload))

    def loseConnection(self):
        self.transport.loseConnection()

    def abortConnection(self):
        self.transport.abortConnection()


class FramedFactory(Factory):
    """
    Builds the one L{FramedProtocol} of a connection attempt.
    """

    def __init__(self, receiver, max_frame=DEFAULT_MAX_FRAME):
        self.receiver = receiver
        self.max_frame = max_frame

    def buildProtocol(self, addr):
        protocol = FramedProtocol(self.receiver, self.max_frame)
        protocol.factory = self
        return protocol


@implementer(IPayloadSender)
class WebSocketPayloadProtocol(WebSocketClientProtocol):
    """
    One envelope per WebSocket message; sent as text, accepted as either.
    """

    def onOpen(self):
        self.factory.receiver.payloadConnected(self)

    def onMessage(self, payload, isBinary):
        self.factory.receiver.payloadReceived(payload)

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        self.factory.receiver.payloadLost(reason)

    def sendPayload(self, payload):
        # Once either side began the close handshake autobahn refuses to
        # send (it raises); what is lost then is lost, as with a framed
        # transport whose connection is going.
        if self.state == self.STATE_OPEN:
            self.sendMessage(payload, isBinary=False)

    def loseConnection(self):
        # A close handshake tells the gate this was deliberate; autobahn
        # drops the TCP connection itself if the gate never answers it.
        if self.state == self.STATE_OPEN:
            self.sendClose(code=1000)
        else:
            self.transport.loseConnection()

    def abortConnection(self):
        self.transport.abortConnection()


def websocket_factory(reactor, url, receiver, max_frame=DEFAULT_MAX_FRAME,
                      timeout=30.0):
    """
    A WebSocket client factory for one connection attempt to C{url}.

    Messages over C{max_frame} fail the connection inside autobahn, before
    they are buffered whole.
    """
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = WebSocketPayloadProtocol
    factory.receiver = receiver
    factory.setProtocolOptions(
        maxFramePayloadSize=max_frame,
        maxMessagePayloadSize=max_frame,
        openHandshakeTimeout=timeout,
        closeHandshakeTimeout=5,
        autoPingInterval=0,
    )
    return factory
