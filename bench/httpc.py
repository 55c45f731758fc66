"""
A minimal keep-alive HTTP/1.1 client for the benchmark's publisher and its
readiness checks: one request at a time per connection, C{Content-Length}
or chunked answers, a deadline per request. Far cheaper per call than
C{Agent}/treq (PERF-NOTES.md), so the publisher is not what limits a push
benchmark.
"""

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

#: Largest answer accepted; bounds what a misbehaving server can cost.
MAX_RESPONSE = 16 << 20


class HTTPError(Exception):
    """
    The connection failed, timed out or answered something unparseable.
    """


class HTTPConnection(Protocol):
    """
    One persistent connection to C{host}; L{request} may be called again
    once the previous request's L{Deferred} has fired.
    """

    def __init__(self, clock, host, timeout=30.0):
        self._clock = clock
        self._host = host.encode("ascii")
        self._timeout = timeout
        self._buffer = bytearray()
        self._waiting = None
        self._timer = None
        self.lost = False

    @property
    def busy(self):
        return self._waiting is not None

    def request(self, method, path, body=b"", headers=()):
        """
        @return: L{Deferred} firing with C{(status, body bytes)}, or failing
            with L{HTTPError}.
        """
        if self._waiting is not None:
            raise RuntimeError("one request at a time per connection")
        if self.lost:
            raise HTTPError("connection lost")
        lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"),
                                      path.encode("ascii")),
                 b"Host: " + self._host,
                 b"Content-Length: %d" % (len(body),)]
        lines.extend(headers)
        self._waiting = Deferred()
        self._timer = self._clock.callLater(self._timeout, self._timed_out)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        return self._waiting

    def _timed_out(self):
        self._timer = None
        self._fail(HTTPError(f"no answer within {self._timeout:g}s"))
        self.transport.abortConnection()

    def _fail(self, error):
        d, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if d is not None:
            d.errback(error)

    def dataReceived(self, data):
        self._buffer += data
        if len(self._buffer) > MAX_RESPONSE:
            self._fail(HTTPError("answer too large"))
            self.transport.abortConnection()
            return
        if self._waiting is None:
            return
        try:
            parsed = _parse(self._buffer)
        except (ValueError, IndexError) as e:
            self._fail(HTTPError(f"bad answer: {e}"))
            self.transport.abortConnection()
            return
        if parsed is None:
            return
        status, body, used, close = parsed
        del self._buffer[:used]
        d, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if close:
            self.lost = True
            self.transport.loseConnection()
        d.callback((status, bytes(body)))

    def connectionLost(self, reason):
        self.lost = True
        self._fail(HTTPError(f"connection lost: {reason.getErrorMessage()}"))

    def close(self):
        self.lost = True
        if self.transport is not None:
            self.transport.loseConnection()


def _parse(buffer):
    """
    C{(status, body, bytes used, server closes)} of the first complete
    answer in C{buffer}, or C{None} while it is incomplete.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).split(b"\r\n")
    status = int(head[0].split(b" ", 2)[1])
    length = None
    chunked = False
    close = False
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = value.lower() == b"close"
    pos = end + 4
    if chunked:
        body = bytearray()
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buffer[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                # No trailers are sent by twisted.web: just the final CRLF.
                if len(buffer) < pos + 2:
                    return None
                return status, body, pos + 2, close
            if len(buffer) < pos + size + 2:
                return None
            body += buffer[pos:pos + size]
            pos += size + 2
    if length is None:
        length = 0
    if len(buffer) < pos + length:
        return None
    return status, buffer[pos:pos + length], pos + length, close


def connect(reactor, host, port, timeout=30.0):
    """
    @return: L{Deferred} firing with a connected L{HTTPConnection}.
    """
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=10)
    return connectProtocol(endpoint, HTTPConnection(reactor, host, timeout))
