"""
The encrypted-channel listener (C{listen.tcp_secure}, PROTOCOL.md section
8): the length framing of L{gate.tcp} with a handshake first and every
later payload sealed by a L{gate.channel.SecureChannel}.

No session exists until the client's hello has been answered: a connection
that sends anything else first, or nothing within C{session.login_timeout},
is closed without a word and costs the gate no session; the session's login
timeout counts from the connection's accept, not from the hello. Channel
failures
(a bad counter, a frame that does not authenticate) likewise end the
connection without an answer; everything else (bad JSON, oversized
envelopes, kicks) is answered as on plain TCP, sealed.
"""

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gate.channel import OVERHEAD, ChannelError, GateHandshake, raw_public
from gate.connection import ClosingTimer, OutputFlow, SessionFactory, peer_of
from gate.framing import FrameDecoder, FrameTooLarge, frame
from gate.limits import TCPRefusal
from gate.tcp import GateTCPProtocol


#: C{mmogate_bad_input} codes of connections ended by the channel: a bad
#: first frame, no first frame in time, a sealed frame that breaks it.
HELLO = "channel_hello"
TIMEOUT = "channel_timeout"
FRAME = "channel_frame"

#: The first frame may be this long even under a smaller
#: C{session.max_frame}: a client hello is 69 bytes.
MIN_HELLO_LIMIT = 128


class GateSecureTCPProtocol(GateTCPProtocol):
    """
    One encrypted-channel connection; an L{IClientConnection} once its
    handshake is done.

    The gate rotates its sending key (a sealed C{rekey}) before the frame
    that would exceed C{encrypt.rekey_frames} under one key, and when a key
    that has carried anything is C{encrypt.rekey_seconds} old.
    """

    transport_name = "tcp+enc"
    log = Logger()
    channel = None

    def connectionMade(self):
        factory = self.factory
        # Over TLS too if an operator wants both (see GateTCPProtocol.close).
        self._tls = ISSLTransport.providedBy(self.transport)
        self.peer = peer_of(self.transport)
        # The limit every frame has, but never too small for a hello.
        self._decoder = FrameDecoder(max(factory.max_frame, MIN_HELLO_LIMIT))
        self._closer = ClosingTimer(factory.clock)
        self._handshake = GateHandshake(factory.signing_key,
                                        public=factory.signing_public)
        self._rekey_call = None
        self._ended = False
        self._accepted = factory.clock.seconds()
        self._handshake_call = factory.clock.callLater(
            factory.handshake_timeout, self._handshake_timed_out)

    def dataReceived(self, data):
        if self._ended:
            return
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as e:
            if self.channel is None:
                self._violation(HELLO, f"first frame of {e.size} bytes")
                return
            self._open_all(e.payloads)
            if not self._ended and self.session is not None:
                self.session.frame_too_large(e.size - OVERHEAD,
                                             self.factory.max_frame)
            return
        if self.channel is None and payloads:
            first = payloads.pop(0)
            if not self._complete_handshake(first):
                return
        self._open_all(payloads)

    def _complete_handshake(self, hello):
        factory = self.factory
        self._cancel(self._handshake_call)
        self._handshake_call = None
        try:
            reply, channel = self._handshake.receive(hello)
        except ChannelError as e:
            self._violation(HELLO, str(e))
            return False
        self._handshake = None
        if not factory.sessions.accepting:
            # Stopping or draining since the connection was accepted.
            self._end()
            return False
        self.channel = channel
        self._decoder.max_frame = factory.max_frame + OVERHEAD
        self.transport.write(frame(reply))
        self._rekey_call = factory.clock.callLater(factory.rekey_seconds,
                                                   self._rekey_timer)
        # One login timeout from the accept: the hello's wait is part of it.
        self.session = session = factory.sessions.open(
            self, accepted=self._accepted)
        self._flow = OutputFlow(self.transport, factory.max_outbuf,
                                session.slow_consumer, session.writable,
                                lambda: session.replaying)
        return True

    def _open_all(self, payloads):
        channel = self.channel
        for sealed in payloads:
            session = self.session
            if self._ended or session.closing or session.closed:
                break
            try:
                plain = channel.open(sealed)
            except ChannelError as e:
                self._violation(FRAME, str(e))
                break
            if plain is not None:
                session.receive(plain)
            else:
                # A client's rekey costs work too: it is rate limited.
                session.consumed()

    def _violation(self, code, why):
        # Debug only: a flood of garbage must not become a flood of logs.
        self.log.debug("encrypted channel from {peer} ended ({code}): {why}",
                       peer=self.peer, code=code, why=why)
        self.factory.sessions.bad_input(self.session, code)
        self._end()

    def _handshake_timed_out(self):
        self._handshake_call = None
        self._violation(TIMEOUT, f"no hello within "
                                 f"{self.factory.handshake_timeout:g} s")

    def _end(self):
        """
        Close without another byte: nothing more is sent or read.
        """
        if self._ended:
            return
        self._ended = True
        self._stop_timers()
        flow = getattr(self, "_flow", None)
        if flow is not None:
            flow.detach()
        self.transport.loseConnection()
        self._closer.start(self.transport)

    @staticmethod
    def _cancel(call):
        if call is not None and call.active():
            call.cancel()

    def _stop_timers(self):
        self._cancel(self._handshake_call)
        self._cancel(self._rekey_call)
        self._handshake_call = self._rekey_call = None

    def _rekey_timer(self):
        self._rekey_call = None
        if self._ended:
            return
        if self.channel.send_counter:
            self._write(self.channel.rekey_framed())
            if self._ended:
                return  # the write overflowed: kicked slow_consumer
        self._rekey_call = self.factory.clock.callLater(
            self.factory.rekey_seconds, self._rekey_timer)

    def _write(self, data):
        self.transport.write(data)
        self._flow.wrote(len(data))

    def connectionLost(self, reason):
        self._ended = True
        self._stop_timers()
        GateTCPProtocol.connectionLost(self, reason)

    # IClientConnection

    def send(self, outgoing):
        if self._ended:
            return
        channel = self.channel
        if channel.rekey_due(self.factory.rekey_frames):
            self._write(channel.rekey_framed())
            if self._ended:
                # That write overflowed session.max_outbuf and the kick it
                # caused is out, closing: nothing may follow it.
                return
            if self._rekey_call is not None:
                self._rekey_call.reset(self.factory.rekey_seconds)
        self._write(channel.seal_framed(outgoing.payload))

    def close(self):
        self._ended = True
        self._stop_timers()
        GateTCPProtocol.close(self)


class GateSecureTCPFactory(SessionFactory, Factory):
    """
    @param sessions: the L{gate.session.SessionManager}.
    @param signing_key: the gate's L{Ed25519PrivateKey} (L{gate.keys}).
    @param handshake_timeout: seconds a connection may take to send its
        hello (C{session.login_timeout}).
    """

    protocol = GateSecureTCPProtocol

    def __init__(self, sessions, max_frame, clock, signing_key, *,
                 max_outbuf=1 << 20, rekey_frames=100000,
                 rekey_seconds=3600.0, handshake_timeout=30.0):
        self.setup(sessions, max_frame, clock, max_outbuf)
        self.signing_key = signing_key
        #: Its raw public key, for every handshake's hello.
        self.signing_public = raw_public(signing_key)
        self.rekey_frames = rekey_frames
        self.rekey_seconds = rekey_seconds
        self.handshake_timeout = handshake_timeout

    def refusal(self, reason):
        # Over limits: the plain TCP answer, an unsealed err busy in place
        # of the gate's hello (there is no channel yet to seal it with).
        return TCPRefusal(self.sessions.limits, self.clock, reason)
