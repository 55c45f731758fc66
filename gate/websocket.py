"""
The WebSocket transport (autobahn) on path C{/ws}: one message, text or
binary, is one payload. Thin like the TCP protocol; the session holds the
logic.
"""

from autobahn.twisted.websocket import (WebSocketServerFactory,
                                        WebSocketServerProtocol)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import ISSLTransport
from zope.interface import implementer

from gate.connection import (ClosingTimer, OutputFlow, SessionFactory,
                             peer_of)
from gate.interfaces import IClientConnection
from gate.limits import HTTPRefusal

WS_PATH = "/ws"

#: Largest WebSocket opening handshake (request line and headers) accepted.
MAX_HANDSHAKE = 16384


@implementer(IClientConnection)
class GateWebSocketProtocol(WebSocketServerProtocol):
    transport_name = "ws"
    session = None
    _handshake_call = None

    def connectionMade(self):
        WebSocketServerProtocol.connectionMade(self)
        self._accepted = self.factory.clock.seconds()
        # The opening handshake must be done this long after connecting,
        # however slowly it trickles in. Not autobahn's openHandshakeTimeout:
        # that rounds to whole seconds of the wall clock.
        self._handshake_call = self.factory.clock.callLater(
            self.factory.handshake_timeout, self._handshake_expired)

    def _handshake_expired(self):
        self._handshake_call = None
        if self.state == self.STATE_CONNECTING:
            self.factory.sessions.bad_input(None, "handshake_timeout")
            self.transport.abortConnection()

    def _cancel_handshake_timer(self):
        call, self._handshake_call = self._handshake_call, None
        if call is not None and call.active():
            call.cancel()

    def dataReceived(self, data):
        # autobahn buffers the opening handshake without a limit and
        # searches all of it on every read: cap it, as any HTTP server
        # caps its request head.
        if self.state == self.STATE_CONNECTING and \
                len(self.data) + len(data) > MAX_HANDSHAKE:
            self.factory.sessions.bad_input(None, "handshake_too_large")
            self.transport.abortConnection()
            return
        WebSocketServerProtocol.dataReceived(self, data)

    def onConnect(self, request):
        if request.path != WS_PATH:
            raise ConnectionDeny(404, f"WebSocket path is {WS_PATH}")
        return None

    def onOpen(self):
        self._cancel_handshake_timer()
        if ISSLTransport.providedBy(self.transport):
            self.transport_name = "ws+tls"
        self.peer = peer_of(self.transport)
        self._closer = ClosingTimer(self.factory.clock)
        # The login timeout counts from the connection, not the handshake.
        self.session = self.factory.sessions.open(self,
                                                  accepted=self._accepted)
        self._flow = OutputFlow(self.transport, self.factory.max_outbuf,
                                self.session.slow_consumer,
                                self.session.writable,
                                lambda: self.session.replaying)

    def onMessage(self, payload, isBinary):
        session = self.session
        if session is not None:
            session.receive(payload)

    def connectionLost(self, reason):
        # autobahn leaves its close-handshake timer running when the TCP
        # connection goes first; it would fire later on a dead protocol.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None
        self._cancel_handshake_timer()
        self.factory.connection_lost(self)
        WebSocketServerProtocol.connectionLost(self, reason)

    def onClose(self, wasClean, code, reason):
        if self.session is not None:
            self._closer.cancel()
            self.session.lost()

    def _max_message_size_exceeded(self, msg_size, max_msg_size, reason):
        # Tell the client why, as the TCP transport does for an oversized
        # frame, and close once that is written (autobahn would drop the
        # connection with the answer unsent).
        if self.session is None:
            WebSocketServerProtocol._max_message_size_exceeded(
                self, msg_size, max_msg_size, reason)
            return
        self.failedByMe = True
        self.wasClean = False
        self.wasNotCleanReason = reason
        self.session.frame_too_large(msg_size, max_msg_size)
        self._flow.detach()
        self.dropConnection(abort=False)
        self._closer.start(self.transport)

    # IClientConnection

    @property
    def paused(self):
        return self._flow.paused

    def send(self, outgoing):
        if self.state != self.STATE_OPEN:
            return
        prepared = outgoing.ws
        if prepared is None:
            prepared = outgoing.ws = self.factory.prepareMessage(
                outgoing.payload, isBinary=False)
        if self._perMessageCompress is None and not self.send_queue:
            # The prepared frame as it is: autobahn's sendData spends a
            # quarter of a send formatting debug arguments (PERF-NOTES.md).
            self.transport.write(prepared.payloadHybi)
        else:
            self.sendPreparedMessage(prepared)
        self._flow.wrote(len(prepared.payloadHybi))

    def close(self):
        self._flow.detach()
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        self._closer.start(self.transport)

    def abort(self):
        self.transport.abortConnection()


class GateWebSocketFactory(SessionFactory, WebSocketServerFactory):
    """
    @param sessions: the L{gate.session.SessionManager}.
    @param handshake_timeout: seconds the opening handshake may take
        (the gate passes C{session.login_timeout}, at most 10).
    """

    protocol = GateWebSocketProtocol

    def __init__(self, sessions, max_frame, clock, max_outbuf=1 << 20,
                 handshake_timeout=10.0):
        WebSocketServerFactory.__init__(self, server="mmogate")
        self.setup(sessions, max_frame, clock, max_outbuf)
        self.handshake_timeout = handshake_timeout
        self.setProtocolOptions(maxMessagePayloadSize=max_frame,
                                maxFramePayloadSize=max_frame,
                                # The protocol keeps its own (see
                                # GateWebSocketProtocol.connectionMade).
                                openHandshakeTimeout=0,
                                # No HTML status page for plain HTTP GETs.
                                webStatus=False,
                                closeHandshakeTimeout=5)

    def refusal(self, reason):
        return HTTPRefusal(self.sessions.limits, self.clock, reason)
