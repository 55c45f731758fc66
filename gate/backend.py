"""
The gate's HTTP client for its game backend (PROTOCOL.md section 4).

One persistent connection pool serves every call (Twisted's default of two
connections per host costs about twice the CPU per call, PERF-NOTES.md);
each call has one overall deadline covering connect, headers and body, and
the answer's head and body are bounded in size; every way a call can fail
becomes the error code the client is owed, raised as a L{BackendCallError}
that also says whether the backend itself is at fault (L{is_backend_fault}:
what a circuit breaker and retries judge by, never the code).
"""


import treq
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, TimeoutError, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (Agent, HTTPConnectionPool, ResponseFailed,
                                _HTTP11ClientFactory)
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web._newclient import (HEADER, STATUS, HTTP11ClientProtocol,
                                    ResponseNeverReceived)
from zope.interface import implementer

from backend.signing import sign

from gate import errors
from gate.envelope import encode, loads, valid_route
from gate.errors import GateError
from gate.interfaces import IBackendClient

_UNREACHABLE = (neterror.ConnectError, neterror.DNSLookupError,
                neterror.ConnectionLost, neterror.ConnectionDone,
                ResponseFailed, ResponseNeverReceived)


class BodyTooLarge(Exception):
    def __init__(self, limit, status=None):
        Exception.__init__(self, f"the backend's answer is over "
                                 f"backend.max_body ({limit} bytes)")
        self.status = status


class HeadTooLarge(Exception):
    """
    The status line and headers of an answer went on past
    C{backend.max_head} bytes: the connection is dropped.
    """

    def __init__(self, limit):
        Exception.__init__(self, f"the backend's answer headers are over "
                                 f"backend.max_head ({limit} bytes)")


class BackendCallError(GateError):
    """
    A failed backend call: the client's code, and what it says of the
    backend. A backend may answer any code itself (even C{backend_error}),
    so whether it is failing is read off these, never off C{code}.

    @ivar status: the HTTP status of the answer; C{None} when there was none.
    @ivar transport_failure: no usable answer came at all: no connection, a
        timeout, a lost connection, a head over C{backend.max_head}.
    """

    def __init__(self, code, msg, status=None, transport_failure=False):
        GateError.__init__(self, code, msg)
        self.status = status
        self.transport_failure = transport_failure


def is_backend_fault(error):
    """
    Whether C{error}, from a backend call, says the backend itself is
    failing: a transport failure, a 5xx, or an answer outside 4xx the gate
    cannot use (a 200 that is not a JSON object or is over
    C{backend.max_body}, an unexpected 1xx/3xx). Any 4xx is the backend
    refusing one call (an unknown path's HTML 404, 401/403, 429 too): it
    works, so that is no fault; nor is any other exception (say a plain
    L{GateError}), which says nothing of the backend.
    """
    if isinstance(error, BackendCallError):
        status = error.status
        return error.transport_failure or (status is not None
                                           and not 400 <= status < 500)
    if isinstance(error, BackendStatusError):
        return not 400 <= error.status < 500
    return False


class _HeadCappedProtocol(HTTP11ClientProtocol):
    """
    An L{HTTP11ClientProtocol} that gives up on an answer whose head (status
    line and headers) goes past C{max_head} bytes. Twisted bounds each header
    line but not their number, so a backend sending headers forever would
    otherwise grow the gate's memory until C{backend.timeout}.
    """

    max_head = 64 << 10
    _head = 0

    def request(self, request):
        self._head = 0
        return HTTP11ClientProtocol.request(self, request)

    def dataReceived(self, data):
        parser = self._parser
        if parser is None or parser.state not in (STATUS, HEADER):
            return HTTP11ClientProtocol.dataReceived(self, data)
        self._head += len(data)
        HTTP11ClientProtocol.dataReceived(self, data)
        # Checked after parsing: bytes past the head's end in the same read
        # are body, and then the head is over.
        if (self._head > self.max_head and self._parser is parser
                and parser.state in (STATUS, HEADER)):
            self._giveUp(Failure(HeadTooLarge(self.max_head)))


class _HeadCappedFactory(_HTTP11ClientFactory):
    def __init__(self, quiescentCallback, metadata, max_head):
        _HTTP11ClientFactory.__init__(self, quiescentCallback, metadata)
        self.max_head = max_head

    def buildProtocol(self, addr):
        protocol = _HeadCappedProtocol(self._quiescentCallback)
        protocol.max_head = self.max_head
        return protocol


class HeadCappedPool(HTTPConnectionPool):
    """
    A persistent L{HTTPConnectionPool} of C{max_connections} per host whose
    connections refuse answer heads over C{max_head} bytes; it never retries
    a request by itself.
    """

    def __init__(self, reactor, max_connections, max_head):
        HTTPConnectionPool.__init__(self, reactor, persistent=True)
        self.maxPersistentPerHost = max_connections
        self.retryAutomatically = False
        self.max_head = max_head

    def _factory(self, quiescentCallback, metadata):
        # HTTPConnectionPool builds each connection's factory by calling
        # self._factory(quiescentCallback, metadata).
        return _HeadCappedFactory(quiescentCallback, metadata, self.max_head)


def _head_too_large(failure):
    """
    The L{HeadTooLarge} inside a failed request's wrapped reasons, or
    C{None}.
    """
    pending = [failure]
    while pending:
        f = pending.pop()
        if f.check(HeadTooLarge):
            return f.value
        pending.extend(r for r in getattr(f.value, "reasons", ())
                       if isinstance(r, Failure))
    return None


class _Discard(Protocol):
    """
    Takes a response body nobody will read, closing its connection.
    """

    def connectionMade(self):
        if self.transport is not None:
            self.transport.stopProducing()


class BackendStatusError(Exception):
    """
    A lifecycle event or registration got a non-2xx answer.

    @ivar retryable: whether trying again may help (5xx, 408, 429, or an
        unexpected 1xx/3xx); a 4xx otherwise says the body is refused.
    """

    def __init__(self, status):
        Exception.__init__(self, f"backend answered HTTP {status}")
        self.status = status
        self.retryable = not (400 <= status < 500) or status in (408, 429)


@implementer(IBackendClient)
class HTTPBackend:
    """
    Calls one backend base URL over a persistent connection pool.

    @param http: a treq-like client (for tests, L{treq.testing.StubTreq});
        by default one over a L{HeadCappedPool} of C{max_connections}
        connections and C{max_head} bytes of answer head.
    """

    def __init__(self, reactor, url, gate_id, timeout, secret="",
                 max_connections=256, http=None, max_body=4 << 20,
                 max_head=64 << 10):
        self._clock = reactor
        self.max_body = max_body
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._secret = secret.encode("utf-8") if secret else None
        self._gate_headers = {b"X-Mmogate-Gate": [gate_id.encode("utf-8")],
                              b"Content-Type": [b"application/json"]}
        self.gate_id = gate_id
        #: Whether the last call got an HTTP answer (None before any call);
        #: /ready reports the gate unready while it is False.
        self.reachable = None
        self._pool = None
        if http is None:
            self._pool = HeadCappedPool(reactor, max_connections, max_head)
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    def _post(self, path, body, read_body=True):
        data = encode(body)
        headers = dict(self._gate_headers)
        if self._secret is not None:
            headers[b"X-Mmogate-Signature"] = [
                sign(self._secret, data).encode("ascii")]
        d = self._http.post(self.url + path, data=data, headers=headers,
                            allow_redirects=False)
        d.addCallback(self._read if read_body else self._status_only)
        # One deadline over connect, headers and body. Cancelling an Agent
        # request fails it with ResponseNeverReceived, not CancelledError, so
        # whether the deadline passed is read off the timer itself.
        timer = self._clock.callLater(self.timeout, d.cancel)

        def settled(result):
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(settled)
        d.addCallbacks(self._answered, self._unreachable,
                       errbackArgs=(timer,))
        return d

    def _status_only(self, response):
        response.deliverBody(_Discard())
        return response.code, b""

    def _read(self, response):
        """
        The answer's C{(status, body)}, refusing a body over
        C{backend.max_body} before it is all in memory.
        """
        limit = self.max_body
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            # Read nothing of it: the connection is closed unused.
            response.deliverBody(_Discard())
            raise BodyTooLarge(limit, response.code)
        chunks = []
        size = [0]

        def collect(data):
            size[0] += len(data)
            if size[0] > limit:
                raise BodyTooLarge(limit, response.code)
            chunks.append(data)

        d = treq.collect(response, collect)
        return d.addCallback(lambda _: (response.code, b"".join(chunks)))

    def _answered(self, answer):
        self.reachable = True
        return answer

    def _unreachable(self, failure, timer):
        if failure.check(BodyTooLarge):
            raise BackendCallError(errors.BACKEND_ERROR, str(failure.value),
                                   status=failure.value.status)
        head = _head_too_large(failure)
        if head is not None:
            # It answered, endlessly: not down, but failing.
            raise BackendCallError(errors.BACKEND_ERROR, str(head),
                                   transport_failure=True)
        if not timer.called and failure.check(*_UNREACHABLE):
            # A slow answer says nothing of the backend as a whole (one
            # route may be slow); only a failed connection marks it down.
            self.reachable = False
        if timer.called or failure.check(TimeoutError, CancelledError):
            raise BackendCallError(errors.BACKEND_TIMEOUT,
                                   f"the backend did not answer within "
                                   f"{self.timeout:g}s",
                                   transport_failure=True)
        if failure.check(*_UNREACHABLE):
            raise BackendCallError(errors.BACKEND_UNAVAILABLE,
                                   "the backend cannot be reached",
                                   transport_failure=True)
        return failure

    def login(self, session_id, data):
        d = self._post("/login", {"gate_id": self.gate_id,
                                  "session_id": session_id, "data": data})
        return d.addCallback(self._login_answer)

    def _login_answer(self, answer):
        code, content = answer
        if code in (401, 403):
            error = _error_of(content)
            raise BackendCallError(errors.AUTH_FAILED,
                                   error[1] if error else "login refused",
                                   status=code)
        body = _ok_body(code, content)
        player_id = body.get("player_id")
        if not isinstance(player_id, str) or not player_id or len(player_id) > 256:
            raise BackendCallError(
                errors.BACKEND_ERROR,
                "the backend's login answer has no valid player_id",
                status=code)
        return player_id, body.get("data")

    def call(self, session_id, player_id, request_id, route, data):
        if not valid_route(route):
            raise GateError(errors.BAD_REQUEST, "invalid route")
        d = self._post("/rpc/" + route, {
            "gate_id": self.gate_id, "session_id": session_id,
            "player_id": player_id, "request_id": request_id,
            "route": route, "data": data})
        return d.addCallback(self._rpc_answer)

    def _rpc_answer(self, answer):
        code, content = answer
        if code == 404 and not content.strip():
            raise BackendCallError(errors.ROUTE_NOT_FOUND, "no such route",
                                   status=code)
        return _ok_body(code, content).get("data")

    def event(self, body):
        return self._post("/events", body, read_body=False).addCallback(
            _expect_2xx)

    def register(self, body):
        return self._post("/gates", body, read_body=False).addCallback(
            _expect_2xx)

    def close(self):
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return succeed(None)


def _expect_2xx(answer):
    code, content = answer
    if not 200 <= code < 300:
        raise BackendStatusError(code)
    return None


def _error_of(content):
    """
    C{(code, msg)} of a C{{"error": {"code": ..., "msg": ...}}} body, or
    C{None}.
    """
    try:
        body = loads(content)
    except (ValueError, RecursionError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str) \
            or not error["code"]:
        return None
    msg = error.get("msg")
    return error["code"][:64], msg if isinstance(msg, str) else ""


def _ok_body(code, content):
    """
    The JSON object of a 200 answer; any other answer becomes the
    L{BackendCallError} section 4 gives it, carrying C{code} as its status.
    """
    if code == 200:
        try:
            body = loads(content)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            raise BackendCallError(errors.BACKEND_ERROR,
                                   "the backend's answer is not a JSON object",
                                   status=code)
        return body
    if 400 <= code < 500:
        error = _error_of(content)
        if error is not None:
            raise BackendCallError(*error, status=code)
    raise BackendCallError(errors.BACKEND_ERROR,
                           f"the backend answered HTTP {code}", status=code)
