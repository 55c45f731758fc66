"""
Tests for L{gate.backend.HTTPBackend}: the gate's calls to its backend and
how every answer maps to the error codes of PROTOCOL.md section 4. HTTP is
served in memory by L{StubTreq}; timeouts run on a L{Clock}.
"""

import hashlib
import hmac
import json

import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import (Request, ResponseFailed,
                                    ResponseNeverReceived)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from gate import errors
from gate.backend import (BackendCallError, BackendStatusError,
                          HeadCappedPool, HeadTooLarge, HTTPBackend,
                          is_backend_fault)
from gate.errors import GateError
from gate.interfaces import IBackendClient

SECRET = "backend-secret-for-tests-0123456789"


class RecordingBackend(Resource):
    """
    A backend that records each request and answers from C{answers} by
    path: C{(status, body bytes)}, or C{None} to never answer.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []
        self.answers = {}
        self.default = (200, b'{"data": null}')

    def render(self, request):
        body = request.content.read()
        self.requests.append({
            "method": request.method, "path": request.path,
            "body": body,
            "gate": request.getHeader(b"x-mmogate-gate"),
            "signature": request.getHeader(b"x-mmogate-signature"),
            "content_type": request.getHeader(b"content-type")})
        answer = self.answers.get(request.path, self.default)
        if answer is None:
            return NOT_DONE_YET
        status, content = answer
        request.setResponseCode(status)
        return content


class FakeHTTP:
    """
    A treq-like client whose C{post} answers what the test says.
    """

    def __init__(self, answer):
        self.answer = answer
        self.posts = []

    def post(self, url, data=None, headers=None, allow_redirects=True):
        # A 3xx to a POST must reach the gate as an answer, not be followed.
        assert allow_redirects is False, "the gate must not follow redirects"
        self.posts.append((url, data, headers))
        return self.answer()


class HTTPBackendTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.resource = RecordingBackend()
        self.stub = StubTreq(self.resource)
        self.backend = self.make(SECRET)

    def make(self, secret, url="http://backend.test/", http=None):
        return HTTPBackend(self.clock, url, "gate-7", timeout=5.0,
                           secret=secret, http=http or self.stub)

    def answer(self, d):
        self.stub.flush()
        return self.successResultOf(d)

    def error(self, d):
        self.stub.flush()
        return self.failureResultOf(d, GateError).value

    def test_interface(self):
        self.assertTrue(verifyObject(IBackendClient, self.backend))
        self.assertTrue(verifyObject(IBackendClient, HTTPBackend(
            MemoryReactorClock(), "http://b", "g", 1.0)))

    # Requests.

    def test_login_request(self):
        self.resource.answers[b"/login"] = (200, b'{"player_id": "alice"}')
        self.answer(self.backend.login("s1", {"name": "alice"}))
        (request,) = self.resource.requests
        self.assertEqual(request["method"], b"POST")
        self.assertEqual(request["path"], b"/login")
        self.assertEqual(json.loads(request["body"]),
                         {"gate_id": "gate-7", "session_id": "s1",
                          "data": {"name": "alice"}})
        self.assertEqual(request["gate"], b"gate-7")
        self.assertEqual(request["content_type"], b"application/json")

    def test_rpc_request(self):
        self.resource.answers[b"/rpc/shop.buy"] = (200, b'{"data": 1}')
        self.answer(self.backend.call("s1", "alice", 12, "shop.buy",
                                      {"item": 3}))
        (request,) = self.resource.requests
        self.assertEqual(request["path"], b"/rpc/shop.buy")
        self.assertEqual(json.loads(request["body"]),
                         {"gate_id": "gate-7", "session_id": "s1",
                          "player_id": "alice", "request_id": 12,
                          "route": "shop.buy", "data": {"item": 3}})

    def test_url_with_path(self):
        backend = self.make(SECRET, url="http://backend.test/game/")
        self.answer(backend.call("s", "p", 1, "guild/list", None))
        self.assertEqual(self.resource.requests[0]["path"],
                         b"/game/rpc/guild/list")

    def test_event_and_register_requests(self):
        body = {"event": "online", "player_id": "a", "gate_id": "gate-7",
                "session_id": "s", "ts": 1.0}
        self.answer(self.backend.event(body))
        registration = {"gate_id": "gate-7", "state": "up",
                        "api_url": "http://g:8090", "listen": ["tcp://g:1"]}
        self.answer(self.backend.register(registration))
        events, gates = self.resource.requests
        self.assertEqual((events["path"], json.loads(events["body"])),
                         (b"/events", body))
        self.assertEqual((gates["path"], json.loads(gates["body"])),
                         (b"/gates", registration))
        self.assertEqual(gates["gate"], b"gate-7")

    def test_signature(self):
        """
        C{X-Mmogate-Signature} is the hex HMAC-SHA256 of the exact body
        sent, keyed with C{backend.secret}.
        """
        self.answer(self.backend.call("s1", "alice", 1, "echo", {"é": [1.5]}))
        self.answer(self.backend.event({"event": "offline"}))
        for request in self.resource.requests:
            expected = hmac.new(SECRET.encode(), request["body"],
                                hashlib.sha256).hexdigest()
            self.assertEqual(request["signature"], expected.encode("ascii"))
        self.assertEqual(len(self.resource.requests), 2)

    def test_no_secret_no_signature(self):
        backend = self.make("")
        self.answer(backend.call("s1", "alice", 1, "echo", None))
        self.assertIsNone(self.resource.requests[0]["signature"])
        self.assertEqual(self.resource.requests[0]["gate"], b"gate-7")

    # Login answers.

    def test_login_ok(self):
        self.resource.answers[b"/login"] = (
            200, b'{"player_id": "alice", "data": {"coins": 5}}')
        self.assertEqual(self.answer(self.backend.login("s", {})),
                         ("alice", {"coins": 5}))
        self.assertTrue(self.backend.reachable)

    def test_login_without_data(self):
        self.resource.answers[b"/login"] = (200, b'{"player_id": "alice"}')
        self.assertEqual(self.answer(self.backend.login("s", {})),
                         ("alice", None))

    def test_login_refused(self):
        for status in (401, 403):
            self.resource.answers[b"/login"] = (status, b"")
            e = self.error(self.backend.login("s", {}))
            self.assertEqual(e.code, errors.AUTH_FAILED)
        self.resource.answers[b"/login"] = (
            401, b'{"error": {"code": "bad_password", "msg": "try again"}}')
        e = self.error(self.backend.login("s", {}))
        self.assertEqual((e.code, e.msg), (errors.AUTH_FAILED, "try again"))

    def test_login_other_4xx(self):
        self.resource.answers[b"/login"] = (
            400, b'{"error": {"code": "banned", "msg": "until Monday"}}')
        e = self.error(self.backend.login("s", {}))
        self.assertEqual((e.code, e.msg), ("banned", "until Monday"))

    def test_login_bad_answers(self):
        for content in (b'{"data": 1}', b'{"player_id": ""}',
                        b'{"player_id": 5}', b'{"player_id": null}',
                        b'{"player_id": "' + b"x" * 257 + b'"}',
                        b"[]", b"not json", b""):
            self.resource.answers[b"/login"] = (200, content)
            e = self.error(self.backend.login("s", {}))
            self.assertEqual(e.code, errors.BACKEND_ERROR, content)

    def test_login_5xx(self):
        self.resource.answers[b"/login"] = (500, b'{"player_id": "a"}')
        self.assertEqual(self.error(self.backend.login("s", {})).code,
                         errors.BACKEND_ERROR)

    # RPC answers.

    def test_rpc_ok(self):
        self.resource.answers[b"/rpc/echo"] = (200, b'{"data": {"x": [1, 2]}}')
        self.assertEqual(self.answer(self.backend.call("s", "p", 1, "echo",
                                                       None)),
                         {"x": [1, 2]})

    def test_rpc_ok_without_data(self):
        self.resource.answers[b"/rpc/echo"] = (200, b"{}")
        self.assertIsNone(self.answer(self.backend.call("s", "p", 1, "echo",
                                                        None)))

    def test_rpc_error_code_passed_through(self):
        for status in (400, 403, 404, 409, 422, 429):
            self.resource.answers[b"/rpc/buy"] = (
                status, b'{"error": {"code": "not_enough_gold", "msg": "m"}}')
            e = self.error(self.backend.call("s", "p", 1, "buy", None))
            self.assertEqual((e.code, e.msg), ("not_enough_gold", "m"), status)

    def test_rpc_error_without_msg(self):
        self.resource.answers[b"/rpc/buy"] = (
            400, b'{"error": {"code": "nope"}}')
        e = self.error(self.backend.call("s", "p", 1, "buy", None))
        self.assertEqual((e.code, e.msg), ("nope", ""))

    def test_rpc_404_empty_is_route_not_found(self):
        for content in (b"", b"  \n"):
            self.resource.answers[b"/rpc/nothing"] = (404, content)
            e = self.error(self.backend.call("s", "p", 1, "nothing", None))
            self.assertEqual(e.code, errors.ROUTE_NOT_FOUND)

    def test_rpc_4xx_without_error_body(self):
        for content in (b"Bad Request", b'{"error": "text"}',
                        b'{"error": {"code": ""}}', b'{"error": {"code": 5}}',
                        b"[]", b""):
            self.resource.answers[b"/rpc/r"] = (400, content)
            e = self.error(self.backend.call("s", "p", 1, "r", None))
            self.assertEqual(e.code, errors.BACKEND_ERROR, content)
        self.resource.answers[b"/rpc/r"] = (404, b"<html>Not Found</html>")
        self.assertEqual(self.error(self.backend.call("s", "p", 1, "r",
                                                      None)).code,
                         errors.BACKEND_ERROR)

    def test_rpc_5xx(self):
        for status in (500, 502, 503, 504):
            self.resource.answers[b"/rpc/r"] = (
                status, b'{"error": {"code": "custom", "msg": "m"}}')
            e = self.error(self.backend.call("s", "p", 1, "r", None))
            self.assertEqual(e.code, errors.BACKEND_ERROR, status)
        self.assertTrue(self.backend.reachable)

    def test_rpc_non_json(self):
        for content in (b"<html>", b"", b'"just a string"', b"[1]", b"\xff"):
            self.resource.answers[b"/rpc/r"] = (200, content)
            e = self.error(self.backend.call("s", "p", 1, "r", None))
            self.assertEqual(e.code, errors.BACKEND_ERROR, content)

    def test_error_code_bounded(self):
        self.resource.answers[b"/rpc/r"] = (
            400, json.dumps({"error": {"code": "c" * 500}}).encode())
        e = self.error(self.backend.call("s", "p", 1, "r", None))
        self.assertEqual(e.code, "c" * 64)

    def test_invalid_route_not_sent(self):
        d = maybeDeferred(self.backend.call, "s", "p", 1, "../admin", None)
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         errors.BAD_REQUEST)
        self.assertEqual(self.resource.requests, [])

    # Events and registrations.

    def test_event_status(self):
        for status in (200, 201, 202, 204):
            self.resource.answers[b"/events"] = (status, b"")
            self.assertIsNone(self.answer(self.backend.event({})))
        for status in (400, 404, 500, 503):
            self.resource.answers[b"/events"] = (status, b"")
            d = self.backend.event({})
            self.stub.flush()
            self.failureResultOf(d, BackendStatusError)

    def test_register_status(self):
        self.resource.answers[b"/gates"] = (204, b"")
        self.assertIsNone(self.answer(self.backend.register({})))
        self.resource.answers[b"/gates"] = (500, b"")
        d = self.backend.register({})
        self.stub.flush()
        self.failureResultOf(d, BackendStatusError)

    # Unreachable and slow backends.

    def test_timeout(self):
        """
        A backend that does not answer within C{backend.timeout} gives
        C{backend_timeout}, at that time and not before.
        """
        self.resource.answers[b"/rpc/slow"] = None
        d = self.backend.call("s", "p", 1, "slow", None)
        self.stub.flush()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         errors.BACKEND_TIMEOUT)
        # A slow answer does not take the gate out of rotation (/ready):
        # one route may be slow while the backend is up.
        self.assertIsNone(self.backend.reachable)

    def test_timeout_fake_http(self):
        http = FakeHTTP(Deferred)
        backend = self.make(SECRET, http=http)
        for call in (lambda: backend.login("s", {}),
                     lambda: backend.call("s", "p", 1, "r", None)):
            d = call()
            self.clock.advance(5)
            self.assertEqual(self.failureResultOf(d, GateError).value.code,
                             errors.BACKEND_TIMEOUT)
        d = backend.event({})
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, GateError).value.code,
                         errors.BACKEND_TIMEOUT)

    def test_no_timer_left(self):
        self.answer(self.backend.call("s", "p", 1, "echo", None))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_refused(self):
        for exception in (ConnectionRefusedError(), DNSLookupError("nohost"),
                          ResponseNeverReceived([])):
            http = FakeHTTP(lambda: fail(exception))
            backend = self.make(SECRET, http=http)
            for d in (backend.login("s", {}), backend.call("s", "p", 1, "r", 1),
                      backend.event({}), backend.register({})):
                self.assertEqual(self.failureResultOf(d, GateError).value.code,
                                 errors.BACKEND_UNAVAILABLE, exception)
            self.assertIs(backend.reachable, False)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reachable_again(self):
        calls = []

        def answer():
            if not calls:
                calls.append(1)
                return fail(ConnectionRefusedError())
            return self.stub.post("http://backend.test/rpc/r", data=b"{}")

        backend = self.make(SECRET, http=FakeHTTP(answer))
        self.assertIsNone(backend.reachable)
        self.failureResultOf(backend.call("s", "p", 1, "r", None), GateError)
        self.assertIs(backend.reachable, False)
        d = backend.call("s", "p", 1, "r", None)
        self.stub.flush()
        self.successResultOf(d)
        self.assertIs(backend.reachable, True)

    def test_close(self):
        self.successResultOf(self.backend.close())
        backend = HTTPBackend(MemoryReactorClock(), "http://b", "g", 1.0)
        self.successResultOf(backend.close())


class BodyLimitTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.resource = RecordingBackend()
        self.stub = StubTreq(self.resource)
        self.backend = HTTPBackend(self.clock, "http://backend.test/", "g",
                                   timeout=5.0, http=self.stub,
                                   max_body=2048)

    def call(self):
        d = self.backend.call("s", "p", 1, "big", None)
        self.stub.flush()
        return d

    def test_over_limit(self):
        """
        An answer over C{backend.max_body} is C{backend_error}: a backend
        cannot make the gate hold an answer of any size.
        """
        body = b'{"data": "' + b"x" * 4096 + b'"}'
        self.resource.answers[b"/rpc/big"] = (200, body)
        e = self.failureResultOf(self.call(), GateError).value
        self.assertEqual(e.code, errors.BACKEND_ERROR)
        self.assertIn("max_body", e.msg)

    def test_at_limit(self):
        body = b'{"data": "' + b"x" * (2048 - 12) + b'"}'
        self.assertEqual(len(body), 2048)
        self.resource.answers[b"/rpc/big"] = (200, body)
        self.assertEqual(self.successResultOf(self.call()), "x" * 2036)


class EventBodyTests(SynchronousTestCase):
    def test_event_answer_body_ignored(self):
        """
        Only the status of an event's answer counts: a large 2xx body is
        not an error (which would be retried forever).
        """
        clock = Clock()
        resource = RecordingBackend()
        stub = StubTreq(resource)
        backend = HTTPBackend(clock, "http://backend.test/", "g", timeout=5.0,
                              http=stub, max_body=1024)
        resource.answers[b"/events"] = (200, b"x" * 5000)
        d = backend.event({"event": "online"})
        stub.flush()
        self.assertIsNone(self.successResultOf(d))


class FaultTests(SynchronousTestCase):
    """
    Every failed call says whether the backend itself is at fault, by HTTP
    status and transport, whatever code the client gets: what breakers and
    retries judge by (L{gate.balancer}).
    """

    def setUp(self):
        self.clock = Clock()
        self.resource = RecordingBackend()
        self.stub = StubTreq(self.resource)
        self.backend = HTTPBackend(self.clock, "http://backend.test/", "g",
                                   timeout=5.0, http=self.stub, max_body=2048)

    def error(self, d):
        self.stub.flush()
        return self.failureResultOf(d, BackendCallError).value

    def rpc(self, status, content):
        self.resource.answers[b"/rpc/r"] = (status, content)
        return self.error(self.backend.call("s", "p", 1, "r", None))

    def test_refusals_are_not_faults(self):
        for status, content, code in (
                (404, b"<html>Not Found</html>", errors.BACKEND_ERROR),
                (404, b"", errors.ROUTE_NOT_FOUND),
                (400, b'{"error": {"code": "backend_error"}}',
                 errors.BACKEND_ERROR),
                (409, b'{"error": {"code": "no_gold"}}', "no_gold"),
                (429, b"Too Many Requests", errors.BACKEND_ERROR),
                (404, b"x" * 5000, errors.BACKEND_ERROR)):
            e = self.rpc(status, content)
            self.assertEqual((e.code, e.status, e.transport_failure),
                             (code, status, False), content[:20])
            self.assertFalse(is_backend_fault(e), (status, content[:20]))
        for status in (401, 403):
            self.resource.answers[b"/login"] = (status, b"<html>no</html>")
            e = self.error(self.backend.login("s", {}))
            self.assertEqual((e.code, e.status), (errors.AUTH_FAILED, status))
            self.assertFalse(is_backend_fault(e))

    def test_faults(self):
        for status, content in ((500, b'{"error": {"code": "x"}}'),
                                (503, b""), (302, b""),
                                (200, b"<html>"), (200, b"[1]"),
                                (200, b'{"data": "' + b"x" * 5000 + b'"}')):
            e = self.rpc(status, content)
            self.assertEqual((e.code, e.status),
                             (errors.BACKEND_ERROR, status))
            self.assertTrue(is_backend_fault(e), (status, content[:20]))
        self.resource.answers[b"/login"] = (200, b'{"player_id": 5}')
        self.assertTrue(is_backend_fault(self.error(
            self.backend.login("s", {}))))

    def test_transport_failures_are_faults(self):
        self.resource.answers[b"/rpc/r"] = None
        d = self.backend.call("s", "p", 1, "r", None)
        self.stub.flush()
        self.clock.advance(5)
        e = self.failureResultOf(d, BackendCallError).value
        self.assertEqual((e.code, e.status, e.transport_failure),
                         (errors.BACKEND_TIMEOUT, None, True))
        self.assertTrue(is_backend_fault(e))
        backend = HTTPBackend(self.clock, "http://b", "g", 5.0,
                              http=FakeHTTP(lambda: fail(
                                  ConnectionRefusedError())))
        e = self.failureResultOf(backend.call("s", "p", 1, "r", None),
                                 BackendCallError).value
        self.assertEqual((e.code, e.transport_failure),
                         (errors.BACKEND_UNAVAILABLE, True))
        self.assertTrue(is_backend_fault(e))

    def test_other_errors(self):
        self.assertFalse(is_backend_fault(GateError(errors.BACKEND_ERROR,
                                                    "no status")))
        self.assertFalse(is_backend_fault(ValueError()))
        self.assertFalse(is_backend_fault(BackendStatusError(404)))
        self.assertFalse(is_backend_fault(BackendStatusError(429)))
        self.assertTrue(is_backend_fault(BackendStatusError(503)))


class HeadLimitTests(SynchronousTestCase):
    """
    An answer whose status line and headers go on past C{backend.max_head}
    is given up at once: Twisted bounds each header line, not their number.
    """

    def request(self):
        return Request(b"POST", b"/rpc/r", Headers({b"Host": [b"b"]}), None,
                       persistent=True)

    def connection(self, max_head=1024):
        pool = HeadCappedPool(MemoryReactorClock(), 4, max_head)
        protocol = pool._factory(lambda p: None, "test").buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d = protocol.request(self.request())
        return protocol, transport, d

    def test_endless_headers_cut(self):
        protocol, transport, d = self.connection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Pad: " + b"a" * 40 + b"\r\n"
        sent = 0
        while not d.called and sent < 100:
            protocol.dataReceived(line)
            sent += 1
        failure = self.failureResultOf(d, ResponseFailed)
        (reason,) = failure.value.reasons
        self.assertTrue(reason.check(HeadTooLarge))
        # Cut within one line of the limit, and the connection dropped.
        self.assertEqual(sent, (1024 - 17) // len(line) + 1)
        self.assertTrue(transport.disconnecting)

    def test_head_under_limit_and_body_pass(self):
        protocol, transport, d = self.connection()
        head = (b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n"
                + b"X-Pad: " + b"a" * 900 + b"\r\n\r\n")
        self.assertLess(len(head), 1024)
        # The head and a body far over the head limit, in one read.
        protocol.dataReceived(head + b"b" * 3000)
        response = self.successResultOf(d)
        self.assertEqual(self.successResultOf(treq.content(response)),
                         b"b" * 3000)
        self.assertFalse(transport.disconnecting)
        # The next answer on the connection is measured afresh.
        d = protocol.request(self.request())
        protocol.dataReceived(head + b"b" * 3000)
        self.successResultOf(d)

    def test_backend_error(self):
        """
        The call fails with C{backend_error}, a fault of a backend that is
        reachable (it answers, endlessly).
        """
        clock = Clock()
        failed = Failure(ResponseFailed([Failure(HeadTooLarge(1024))]))
        backend = HTTPBackend(clock, "http://b", "g", 5.0,
                              http=FakeHTTP(lambda: fail(failed)))
        e = self.failureResultOf(backend.call("s", "p", 1, "r", None),
                                 BackendCallError).value
        self.assertEqual(e.code, errors.BACKEND_ERROR)
        self.assertIn("max_head", e.msg)
        self.assertTrue(is_backend_fault(e))
        self.assertIsNone(backend.reachable)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_default_pool(self):
        backend = HTTPBackend(MemoryReactorClock(), "http://b", "g", 1.0,
                              max_connections=9, max_head=2048)
        self.assertIsInstance(backend._pool, HeadCappedPool)
        self.assertEqual((backend._pool.max_head,
                          backend._pool.maxPersistentPerHost,
                          backend._pool.retryAutomatically), (2048, 9, False))
