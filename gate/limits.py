"""
Limits on what clients may make the gate do: connections open at once (in
all and per address), new connections a second per address, the rate of a
session's envelopes, and how a refused connection is told so, at the least
cost to the gate.

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
RATE = "rate"

#: Addresses whose connection rate is tracked at once. Past it the address
#: seen least recently is forgotten (it starts again with a full burst), so
#: a flood from many addresses costs bounded memory.
MAX_RATE_ENTRIES = 65536

#: Least recently seen entries checked (and dropped once full again) on
#: each new connection: the table sheds idle addresses as it goes, without
#: a timer or a sweep.
PRUNE_PER_ADMIT = 2


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


class ConnectRate:
    """
    A token bucket per address (L{address_key}) on new connections:
    C{limits.connect_rate} a second, C{limits.connect_burst} at once. A
    handshake costs the gate far more than refusing, so one address must
    not be able to make it do many a second.

    An address absent from the table has a full bucket, so an entry is
    dropped as soon as its bucket has refilled; the table is kept in the
    order addresses were last seen, its oldest entries are dropped when
    full again, and it never holds more than C{max_entries}.
    """

    def __init__(self, rate, burst, clock, max_entries=MAX_RATE_ENTRIES):
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._clock = clock
        #: key -> (tokens, when), least recently seen first.
        self._buckets = {}

    def __len__(self):
        return len(self._buckets)

    def take(self, key):
        """
        Spend one of C{key}'s tokens.

        @return: whether there was one.
        """
        now = self._clock.seconds()
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            tokens = self.burst
        else:
            tokens = min(self.burst,
                         entry[0] + (now - entry[1]) * self.rate)
        self._prune(now)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if len(buckets) >= self.max_entries:
            # Forget the address seen least recently.
            del buckets[next(iter(buckets))]
        buckets[key] = (tokens, now)
        return allowed

    def _prune(self, now):
        buckets = self._buckets
        for _ in range(PRUNE_PER_ADMIT):
            if not buckets:
                return
            key = next(iter(buckets))
            tokens, when = buckets[key]
            if tokens + (now - when) * self.rate < self.burst:
                return
            del buckets[key]


class ConnectionLimits:
    """
    Counts the client connections of one gate, over all its client
    listeners, against C{limits.max_connections}, C{limits.max_per_ip} and
    (with C{connect_rate}) C{limits.connect_rate} / C{limits.connect_burst}.

    L{admit} before a connection gets a protocol; L{release} once for each
    admitted connection when it is gone.

    @param connect_rate: new connections a second one address may open
        (C{None}: no limit); C{connect_burst} at once, on C{clock}.
    """

    def __init__(self, max_connections, max_per_ip, connect_rate=None,
                 connect_burst=None, clock=None):
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.open = 0
        self._per_key = {}
        #: The L{ConnectRate} of new connections, or C{None}.
        self.connect_rate = None
        if connect_rate is not None:
            self.connect_rate = ConnectRate(connect_rate, connect_burst,
                                            clock)
        #: Refused connections still being answered (see L{Refusal}).
        self.refusing = 0

    def admit(self, host):
        """
        Count a new connection from C{host} (an IP address, or C{None} when
        the transport has none) unless it is over a limit.

        Only a connection within the other limits spends a token of its
        address's connect rate: refusing costs little, and a client at
        C{max_per_ip} that waits for a slot is not also held back by it.

        @return: C{None} when admitted, else the reason it is refused
            (L{MAX_CONNECTIONS}, L{MAX_PER_IP} or L{RATE}).
        """
        if self.open >= self.max_connections:
            return MAX_CONNECTIONS
        key = address_key(host)
        if key is not None:
            n = self._per_key.get(key, 0)
            if n >= self.max_per_ip:
                return MAX_PER_IP
            rate = self.connect_rate
            if rate is not None and not rate.take(key):
                return RATE
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
    if reason == RATE:
        return ("too many new connections from your address; try again "
                "later")
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
