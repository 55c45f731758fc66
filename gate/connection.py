"""
What the TCP and WebSocket protocols share: flow control towards a client
that reads slowly, and closing a connection that will not drain.
"""

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from gate.limits import MAX_REFUSING, Hangup

_UNCOUNTED = object()

#: Seconds a closing connection may take to write what is queued to it,
#: and its client to close its side, before it is dropped; a client that
#: stopped reading must not keep it.
CLOSE_TIMEOUT = 10.0


class ClosingTimer:
    """
    Aborts a transport that has not closed C{CLOSE_TIMEOUT} seconds after
    it was asked to.
    """

    def __init__(self, clock):
        self._clock = clock
        self._call = None

    def start(self, transport):
        if self._call is None:
            self._call = self._clock.callLater(CLOSE_TIMEOUT,
                                               transport.abortConnection)

    def cancel(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def peer_of(transport):
    address = transport.getPeer()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@implementer(IPushProducer)
class OutputFlow:
    """
    Bounds what one client can make the gate hold for it.

    Registered as the streaming producer of a connection's transport, it is
    paused when the transport's write buffer is full. While paused the gate
    stops reading from that client (so a client that sends but never reads
    cannot pile up answers), and counts what it still has to write (pushes);
    past C{limit} bytes C{overflow} is called once, and the session is
    kicked with C{slow_consumer}. Persistent pushes stay in the mailbox until
    acked, so the client loses none of them by being kicked.
    """

    def __init__(self, transport, limit, overflow, drained,
                 keep_reading=lambda: False):
        self._transport = transport
        self.limit = limit
        self._overflow = overflow
        self._drained = drained
        self._keep_reading = keep_reading
        self.paused = False
        self.reading_paused = False
        self.queued = 0
        self.overflowed = False
        transport.registerProducer(self, True)

    def detach(self):
        """
        Before closing: a transport with a producer registered does not
        close, and one that stopped reading would not notice the client
        leaving.
        """
        self._transport.unregisterProducer()
        self.paused = False
        if self.reading_paused:
            self.reading_paused = False
            self._transport.resumeProducing()

    def wrote(self, size):
        if not self.paused:
            return
        if not self.reading_paused and not self._keep_reading():
            # A replay that kept reading on has ended while still full.
            self.reading_paused = True
            self._transport.pauseProducing()
        self.queued += size
        if self.queued > self.limit and not self.overflowed:
            self.overflowed = True
            self._overflow()

    def pauseProducing(self):
        # Transports call this on every write while their buffer is full:
        # only the first call starts a new count.
        if self.paused:
            return
        self.paused = True
        self.queued = 0
        if not self._keep_reading():
            # While the gate itself fills the buffer (a resume's replay) the
            # client is reading it, and must still be heard (pings, acks).
            self.reading_paused = True
            self._transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        self.queued = 0
        if self.reading_paused:
            self.reading_paused = False
            self._transport.resumeProducing()
        self._drained()

    def stopProducing(self):
        self.paused = False


class SessionFactory:
    """
    What the TCP and WebSocket factories share: the session manager, the
    clock and limits their protocols read, refusing connections while the
    gate does not accept clients (stopping or draining), and counting them
    against C{limits.max_connections} and C{limits.max_per_ip} (the
    session manager's L{gate.limits.ConnectionLimits}, shared by every
    client listener).

    Mixed in before the Twisted or autobahn factory class. Its protocols
    call L{connection_lost} from their C{connectionLost}.
    """

    noisy = False

    def setup(self, sessions, max_frame, clock, max_outbuf):
        self.sessions = sessions
        self.max_frame = max_frame
        self.clock = clock
        self.max_outbuf = max_outbuf

    def buildProtocol(self, addr):
        sessions = self.sessions
        if not sessions.accepting:
            # A stopping or draining gate: hang up (a protocol, not None,
            # which a TLS listener's wrapping factory cannot take).
            protocol = Hangup()
            protocol.factory = self
            return protocol
        host = getattr(addr, "host", None)
        limits = sessions.limits
        refused = limits.admit(host)
        if refused is not None:
            sessions.refused(refused, host)
            protocol = None
            if limits.refusing < MAX_REFUSING:
                protocol = self.refusal(refused)
            if protocol is None:
                protocol = Hangup()
            protocol.factory = self
            return protocol
        protocol = super().buildProtocol(addr)
        if protocol is None:
            limits.release(host)
            return None
        protocol.limited_host = host
        return protocol

    def refusal(self, reason):
        """
        The protocol that tells a refused client why (C{None}: close at
        once, saying nothing); see L{gate.limits.Refusal}.
        """
        return None

    def connection_lost(self, protocol):
        """
        A connection built by L{buildProtocol} is gone: it no longer counts
        (once, however often this is called).
        """
        host = protocol.__dict__.pop("limited_host", _UNCOUNTED)
        if host is not _UNCOUNTED:
            self.sessions.limits.release(host)
