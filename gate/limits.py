"""
Limits on what clients may make the gate do: connections open at once (in
all and per address), the rate of a session's envelopes, and how a refused
connection is told so, at the least cost to the gate.

Tests: C{tests/test_limits.py}, C{tests/test_e2e_limits.py}.
"""

import ipaddress

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from gate import envelope, errors

#: Seconds a refused connection may take to send what the gate waits for
#: (a WebSocket client's request head, a TCP client's first bytes) before
#: it is closed.
REFUSE_TIMEOUT = 2.0

#: Refused connections waiting to be answered at once; past it more are
#: closed without an answer, so a flood costs no more than this many.
MAX_REFUSING = 256

#: Largest request head a refused WebSocket client may send before its 503.
MAX_REFUSED_HEAD = 16384

#: Reasons a connection is refused, as metrics label them.
MAX_CONNECTIONS = "max_connections"
MAX_PER_IP = "max_per_ip"


def address_key(host):
    """
    What the per-address limit counts by: the IP address, an IPv4-mapped
    IPv6 address as its IPv4 address, and an IPv6 address by its /64 (one
    host usually holds a whole /64, so counting single addresses would not
    limit it).
    """
    if host is None or ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class ConnectionLimits:
    """
    Counts the client connections of one gate, over all its client
    listeners, against C{limits.max_connections} and C{limits.max_per_ip}.

    L{admit} before a connection gets a protocol; L{release} once for each
    admitted connection when it is gone.
    """

    def __init__(self, max_connections, max_per_ip):
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.open = 0
        self._per_key = {}
        #: Refused connections still being answered (see L{Refusal}).
        self.refusing = 0

    def admit(self, host):
        """
        Count a new connection from C{host} (an IP address, or C{None} when
        the transport has none) unless it is over a limit.

        @return: C{None} when admitted, else the reason it is refused
            (L{MAX_CONNECTIONS} or L{MAX_PER_IP}).
        """
        if self.open >= self.max_connections:
            return MAX_CONNECTIONS
        key = address_key(host)
        if key is not None:
            n = self._per_key.get(key, 0)
            if n >= self.max_per_ip:
                return MAX_PER_IP
            self._per_key[key] = n + 1
        self.open += 1
        return None

    def release(self, host):
        """
        An admitted connection from C{host} is gone.
        """
        self.open -= 1
        key = address_key(host)
        if key is not None:
            n = self._per_key.get(key, 0) - 1
            if n > 0:
                self._per_key[key] = n
            else:
                self._per_key.pop(key, None)

    def from_address(self, host):
        """
        Connections open from C{host}'s address (or network, see
        L{address_key}).
        """
        return self._per_key.get(address_key(host), 0)


class TokenBucket:
    """
    C{rate} tokens a second, at most C{burst} kept; one session's
    allowance of envelopes (C{session.rate}, C{session.burst}).

    Refilled lazily from the clock on each L{take}: no timer per session.
    It starts full.
    """

    __slots__ = ("rate", "burst", "tokens", "_stamp", "_clock")

    def __init__(self, rate, burst, clock):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock.seconds()

    def take(self, cost=1.0, now=None):
        """
        Spend C{cost} tokens if there are that many.

        @param now: the clock's time, when the caller has it already.
        @return: whether they were there (and are now spent).
        """
        if now is None:
            now = self._clock.seconds()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._stamp = now
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else float(self.burst)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class Hangup(Protocol):
    """
    Closes its connection at once, without a word: a refusal past
    L{MAX_REFUSING}. A protocol rather than C{None} from C{buildProtocol},
    which a TLS listener's wrapping factory cannot take.
    """

    def connectionMade(self):
        self.transport.abortConnection()


class Refusal(Protocol):
    """
    A refused connection: answered in a few bytes and closed, with no
    session. It reads (and discards) what the client sends first, so that
    closing does not reset the connection before the answer arrives; it is
    closed after L{REFUSE_TIMEOUT} seconds in any case (the answer is a few
    bytes: the close does not wait for a client that does not read).

    @param limits: the L{ConnectionLimits} counting refusals in progress.
    """

    log = Logger()

    def __init__(self, limits, clock, reason):
        self._limits = limits
        self._clock = clock
        self.reason = reason
        self._timer = None
        self._done = False

    def connectionMade(self):
        self._limits.refusing += 1
        self._timer = self._clock.callLater(REFUSE_TIMEOUT, self.finish)
        self.greet()

    def greet(self):
        """
        Write what the client is told before it sends anything.
        """

    def finish(self, answer=b""):
        if self._done:
            return
        self._done = True
        if answer:
            self.transport.write(answer)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._limits.refusing -= 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def refusal_message(reason):
    if reason == MAX_PER_IP:
        return "too many connections from your address; try again later"
    return "the gate has too many connections; try again later"


class TCPRefusal(Refusal):
    """
    A refused length-framed TCP connection: an C{err} C{busy} (no C{id}),
    then the gate closes once the client's first bytes are read (or at
    once when it sends nothing).
    """

    def greet(self):
        self.transport.write(envelope.err(None, errors.BUSY,
                                          refusal_message(self.reason)).framed)

    def dataReceived(self, data):
        self.finish()


class HTTPRefusal(Refusal):
    """
    A refused WebSocket connection: its opening handshake is answered
    C{503 Service Unavailable} and the connection closed.
    """

    def __init__(self, limits, clock, reason):
        Refusal.__init__(self, limits, clock, reason)
        self._head = b""

    def dataReceived(self, data):
        if self._done:
            return
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) > MAX_REFUSED_HEAD:
            body = (refusal_message(self.reason) + "\n").encode("utf-8")
            self.finish(b"HTTP/1.1 503 Service Unavailable\r\n"
                        b"Content-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Length: %d\r\n"
                        b"Retry-After: 5\r\n"
                        b"Connection: close\r\n\r\n%s" % (len(body), body))
            self._head = b""
