"""
The gate's HTTP client for its game backend (PROTOCOL.md section 4).

One persistent connection pool serves every call (Twisted's default of two
connections per host costs about twice the CPU per call, PERF-NOTES.md);
each call has one overall deadline covering connect, headers and body; every
way a call can fail becomes the error code the client is owed.
"""


import treq
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, TimeoutError, succeed
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web._newclient import ResponseNeverReceived
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
    def __init__(self, limit):
        Exception.__init__(self, f"the backend's answer is over "
                                 f"backend.max_body ({limit} bytes)")


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
        by default one over a pool of C{max_connections} connections.
    """

    def __init__(self, reactor, url, gate_id, timeout, secret="",
                 max_connections=256, http=None, max_body=4 << 20):
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
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_connections
            self._pool.retryAutomatically = False
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
            raise BodyTooLarge(limit)
        chunks = []
        size = [0]

        def collect(data):
            size[0] += len(data)
            if size[0] > limit:
                raise BodyTooLarge(limit)
            chunks.append(data)

        d = treq.collect(response, collect)
        return d.addCallback(lambda _: (response.code, b"".join(chunks)))

    def _answered(self, answer):
        self.reachable = True
        return answer

    def _unreachable(self, failure, timer):
        if not timer.called and failure.check(*_UNREACHABLE):
            # A slow answer says nothing of the backend as a whole (one
            # route may be slow); only a failed connection marks it down.
            self.reachable = False
        if failure.check(BodyTooLarge):
            raise GateError(errors.BACKEND_ERROR, str(failure.value))
        if timer.called or failure.check(TimeoutError, CancelledError):
            raise GateError(errors.BACKEND_TIMEOUT,
                            f"the backend did not answer within "
                            f"{self.timeout:g}s")
        if failure.check(*_UNREACHABLE):
            raise GateError(errors.BACKEND_UNAVAILABLE,
                            "the backend cannot be reached")
        return failure

    def login(self, session_id, data):
        d = self._post("/login", {"gate_id": self.gate_id,
                                  "session_id": session_id, "data": data})
        return d.addCallback(self._login_answer)

    def _login_answer(self, answer):
        code, content = answer
        if code in (401, 403):
            error = _error_of(content)
            raise GateError(errors.AUTH_FAILED,
                            error[1] if error else "login refused")
        body = _ok_body(code, content)
        player_id = body.get("player_id")
        if not isinstance(player_id, str) or not player_id or len(player_id) > 256:
            raise GateError(errors.BACKEND_ERROR,
                            "the backend's login answer has no valid player_id")
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
            raise GateError(errors.ROUTE_NOT_FOUND, "no such route")
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
    L{GateError} section 4 gives it.
    """
    if code == 200:
        try:
            body = loads(content)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            raise GateError(errors.BACKEND_ERROR,
                            "the backend's answer is not a JSON object")
        return body
    if 400 <= code < 500:
        error = _error_of(content)
        if error is not None:
            raise GateError(*error)
        raise GateError(errors.BACKEND_ERROR,
                        f"the backend answered HTTP {code}")
    raise GateError(errors.BACKEND_ERROR, f"the backend answered HTTP {code}")
