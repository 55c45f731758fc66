"""
Tests for L{backend.pushclient}.

Most run against a real twisted.web Site on a loopback port the OS picks,
so the pool, the headers and the bodies are the real ones; the timeout test
uses StubTreq and a L{Clock} instead of waiting.
"""

import json

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from backend.pushclient import (
    MAX_PERSISTENT_PER_HOST,
    IPushClient,
    PushAPIError,
    PushClient,
)
from backend.reference import ReferenceBackend

KEY = "the-api-key"

PLAYER = {
    "player_id": "a b/c",
    "online": True,
    "gate_id": "g1",
    "session_id": "s1",
    "last_seq": 3,
    "mailbox": 0,
}


class FakeAPI(Resource):
    """
    A gate's push API as far as the client can tell: checks the key, records
    each call, answers from C{self.answers} by path.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.calls = []
        self.answers = {
            b"/v1/push": (
                200,
                {"delivered": 1, "queued": 1, "dropped": 0, "unknown": ["x"]},
            ),
            b"/v1/broadcast": (200, {"delivered": 5}),
            b"/v1/batch": (200, {"results": [{"delivered": 1}]}),
            b"/v1/kick": (200, {"kicked": True}),
            b"/v1/players/a%20b%2Fc": (200, PLAYER),
            b"/v1/players/ghost": (404, {"error": {"code": "not_found", "msg": "no"}}),
            b"/v1/sessions": (200, {"sessions": []}),
            b"/v1/reconnect": (200, {"sent": 2}),
            b"/v1/drain": (200, {"draining": True}),
        }

    def render(self, request):
        # request.uri keeps the path as sent, before percent-decoding.
        path = request.uri
        body = request.content.read()
        self.calls.append(
            (
                request.method,
                path,
                request.getHeader(b"content-type"),
                json.loads(body) if body else None,
            )
        )
        if request.getHeader(b"authorization") != b"Bearer " + KEY.encode():
            request.setResponseCode(401)
            return b""
        status, answer = self.answers.get(
            path, (404, {"error": {"code": "not_found", "msg": "no such call"}})
        )
        request.setResponseCode(status)
        if isinstance(answer, bytes):
            return answer
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode()


class TrackingSite(Site):
    """
    A Site that can wait for its connections to close, so a test leaves a
    clean reactor behind.
    """

    def __init__(self, resource):
        Site.__init__(self, resource)
        self.lost = []

    def buildProtocol(self, addr):
        protocol = Site.buildProtocol(self, addr)
        lost = Deferred()
        self.lost.append(lost)
        connectionLost = protocol.connectionLost

        def notify(reason):
            connectionLost(reason)
            lost.callback(None)

        protocol.connectionLost = notify
        return protocol


class PushClientTests(TestCase):
    async def setUp(self):
        self.api = FakeAPI()
        site = self.site = TrackingSite(self.api)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        # Cleanups run last-added first: close the client's connections,
        # wait for the server to see them go, then stop listening.
        self.addCleanup(lambda: gatherResults(site.lost))
        self.url = f"http://127.0.0.1:{port.getHost().port}/"
        self.client = self.makeClient()

    def makeClient(self, key=KEY):
        client = PushClient(self.url, key, reactor=reactor)
        self.addCleanup(client.close)
        return client

    def assertCall(self, method, path, body):
        self.assertEqual(len(self.api.calls), 1)
        self.assertEqual(self.api.calls[0][:2], (method, path))
        self.assertEqual(self.api.calls[0][3], body)
        if body is not None:
            self.assertTrue(self.api.calls[0][2].startswith(b"application/json"))

    def test_interface(self):
        self.assertTrue(verifyObject(IPushClient, self.client))
        self.assertEqual(self.client.api_url, self.url.rstrip("/"))

    def test_own_pool(self):
        pool = self.client._ownPool
        self.assertTrue(pool.persistent)
        self.assertEqual(pool.maxPersistentPerHost, MAX_PERSISTENT_PER_HOST)

    async def test_push(self):
        answer = await self.client.push(["alice", "bob"], "chat", {"text": "hi"})
        self.assertEqual(answer, self.api.answers[b"/v1/push"][1])
        self.assertCall(
            b"POST",
            b"/v1/push",
            {
                "players": ["alice", "bob"],
                "route": "chat",
                "data": {"text": "hi"},
                "persist": True,
            },
        )

    async def test_transient_push(self):
        await self.client.push(iter(["alice"]), "tick", None, persist=False)
        self.assertEqual(self.api.calls[0][3]["persist"], False)
        self.assertEqual(self.api.calls[0][3]["players"], ["alice"])

    async def test_connections_are_reused(self):
        for _ in range(3):
            await self.client.broadcast("news", 1)
        self.assertEqual(len(self.api.calls), 3)
        self.assertEqual(len(self.site.lost), 1)

    async def test_broadcast(self):
        answer = await self.client.broadcast("news", {"n": 1})
        self.assertEqual(answer, {"delivered": 5})
        self.assertCall(b"POST", b"/v1/broadcast", {"route": "news", "data": {"n": 1}})

    async def test_batch(self):
        ops = [{"players": ["a"], "route": "r", "data": 1}]
        answer = await self.client.batch(ops)
        self.assertEqual(answer, {"results": [{"delivered": 1}]})
        self.assertCall(b"POST", b"/v1/batch", {"ops": ops})

    async def test_kick(self):
        self.assertEqual(await self.client.kick("bob"), {"kicked": True})
        self.assertCall(b"POST", b"/v1/kick", {"player_id": "bob", "reason": "admin"})

    async def test_kick_extra(self):
        await self.client.kick("bob", reason="shutdown", msg="bye")
        self.assertEqual(
            self.api.calls[0][3],
            {"player_id": "bob", "reason": "shutdown", "msg": "bye"},
        )

    async def test_player(self):
        self.assertEqual(await self.client.player("a b/c"), PLAYER)
        self.assertCall(b"GET", b"/v1/players/a%20b%2Fc", None)

    async def test_unknown_player_is_none(self):
        self.assertIsNone(await self.client.player("ghost"))
        # The connection survived the 404 and serves the next call.
        self.assertEqual(await self.client.player("a b/c"), PLAYER)

    async def test_sessions(self):
        self.assertEqual(await self.client.sessions(), {"sessions": []})
        self.assertCall(b"GET", b"/v1/sessions", None)

    async def test_reconnect_player(self):
        self.assertEqual(await self.client.reconnect("g2:8080", "bob"), {"sent": 2})
        body = {"addr": "g2:8080", "player_id": "bob"}
        self.assertCall(b"POST", b"/v1/reconnect", body)

    async def test_reconnect_all(self):
        await self.client.reconnect("ws://g2:8081/ws", all=True)
        body = {"addr": "ws://g2:8081/ws", "all": True}
        self.assertCall(b"POST", b"/v1/reconnect", body)

    def test_reconnect_needs_one_target(self):
        self.assertRaises(ValueError, self.client.reconnect, "g2:8080")
        self.assertRaises(ValueError, self.client.reconnect, "g2:8080", "bob", all=True)
        self.assertEqual(self.api.calls, [])

    async def test_drain(self):
        self.assertEqual(await self.client.drain("g2:8080", 30), {"draining": True})
        self.assertCall(b"POST", b"/v1/drain", {"addr": "g2:8080", "deadline": 30})

    async def test_unauthorized(self):
        client = self.makeClient(key="wrong")
        with self.assertRaises(PushAPIError) as caught:
            await client.push(["a"], "r", None)
        self.assertEqual(caught.exception.status, 401)
        self.assertEqual(caught.exception.code, "http_401")

    async def test_error_code(self):
        self.api.answers[b"/v1/push"] = (
            400,
            {"error": {"code": "bad_request", "msg": "players must be a list"}},
        )
        with self.assertRaises(PushAPIError) as caught:
            await self.client.push(["a"], "r", None)
        error = caught.exception
        self.assertEqual(
            (error.status, error.code, error.msg),
            (400, "bad_request", "players must be a list"),
        )
        self.assertIn("bad_request", str(error))

    async def test_error_without_json(self):
        self.api.answers[b"/v1/drain"] = (503, b"<html>" + b"x" * 1000)
        with self.assertRaises(PushAPIError) as caught:
            await self.client.drain("a:1", 1)
        error = caught.exception
        self.assertEqual((error.status, error.code), (503, "http_503"))
        self.assertTrue(error.msg.startswith("<html>"))
        self.assertLessEqual(len(error.msg), 200)

    async def test_other_404_raises(self):
        error = {"error": {"code": "not_found", "msg": "x"}}
        self.api.answers[b"/v1/kick"] = (404, error)
        with self.assertRaises(PushAPIError) as caught:
            await self.client.kick("bob")
        self.assertEqual(caught.exception.code, "not_found")

    async def test_answer_not_json(self):
        self.api.answers[b"/v1/sessions"] = (200, b"sessions!")
        with self.assertRaises(PushAPIError) as caught:
            await self.client.sessions()
        error = caught.exception
        self.assertEqual((error.status, error.code), (200, "bad_response"))

    async def test_reference_backend_say(self):
        """
        The reference backend's C{say} through its own pooled client.
        """
        backend = ReferenceBackend(reactor, KEY, api_url=self.url)
        self.addCleanup(backend.close)
        body = {"player_id": "alice", "data": {"to": "bob", "text": "hi"}}
        answer = await backend.handle(["rpc", "say"], json.dumps(body).encode())
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.body, {"data": self.api.answers[b"/v1/push"][1]})
        self.assertEqual(
            self.api.calls[0][3],
            {
                "players": ["bob"],
                "route": "chat",
                "data": {"from": "alice", "text": "hi"},
                "persist": True,
            },
        )


class Hang(Resource):
    """
    Never answers.
    """

    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


class InMemoryTests(SynchronousTestCase):
    def test_timeout(self):
        clock = Clock()
        client = PushClient(
            "http://gate.invalid", KEY, reactor=clock, http=StubTreq(Hang()), timeout=5
        )
        d = client.push(["a"], "r", None)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, TimeoutError)

    def test_cancel(self):
        clock = Clock()
        client = PushClient(
            "http://gate.invalid", KEY, reactor=clock, http=StubTreq(Hang()), timeout=5
        )
        d = client.push(["a"], "r", None)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_timeout(self):
        clock = Clock()
        client = PushClient(
            "http://gate.invalid",
            KEY,
            reactor=clock,
            http=StubTreq(Hang()),
            timeout=None,
        )
        d = client.push(["a"], "r", None)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertNoResult(d)

    def test_shared_pool_is_not_closed(self):
        closed = []

        class Pool:
            def closeCachedConnections(self):
                closed.append(True)

        client = PushClient("http://gate.invalid", KEY, reactor=Clock(), pool=Pool())
        self.successResultOf(client.close())
        self.assertEqual(closed, [])
