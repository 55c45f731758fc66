"""
Tests for L{backend.reference}, L{backend.signing} and L{backend.__main__}.

The resource is driven in memory through L{treq.testing.StubTreq}, time
through L{Clock}: no sockets, no sleeps.
"""

import hashlib
import hmac
import json

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from backend import __main__ as cli
from backend.pushclient import PushAPIError, PushClient
from backend.reference import MAX_NAME, MAX_SLOW_SECONDS, ReferenceBackend
from backend.signing import SIGNATURE_HEADER, sign, verify


class SigningTests(SynchronousTestCase):
    def test_sign_is_hex_hmac_sha256(self):
        body = b'{"a":1}'
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        self.assertEqual(sign(b"s3cret", body), expected)
        self.assertEqual(sign("s3cret", body), expected)

    def test_verify(self):
        body = b"payload"
        good = sign("k", body)
        self.assertTrue(verify("k", body, good))
        self.assertTrue(verify(b"k", body, good.encode("ascii")))
        self.assertTrue(verify("k", body, good.upper()))

    def test_verify_rejects(self):
        body = b"payload"
        good = sign("k", body)
        self.assertFalse(verify("k", body + b"!", good))
        self.assertFalse(verify("other", body, good))
        self.assertFalse(verify("k", body, None))
        self.assertFalse(verify("k", body, ""))
        self.assertFalse(verify("k", body, good[:-1]))
        self.assertFalse(verify("k", body, "é" * 64))
        self.assertFalse(verify("k", body, 12345))

    def test_bad_secret_type(self):
        self.assertRaises(TypeError, sign, 42, b"")


class FakePushClient:
    """
    Stands in for L{PushClient}: records pushes, answers with C{answer}
    (a value, an exception to fail with, or C{None} to stay pending).
    """

    def __init__(self, api_url, api_key, answer):
        self.api_url = api_url
        self.api_key = api_key
        self.answer = answer
        self.pushes = []
        self.pending = []
        self.closed = False

    def push(self, players, route, data, persist=True):
        self.pushes.append((players, route, data, persist))
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        if self.answer is None:
            d = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.answer)

    def close(self):
        self.closed = True
        return succeed(None)


PUSHED = {"delivered": 1, "queued": 0, "dropped": 0, "unknown": []}


class BackendTestCase(SynchronousTestCase):
    """
    A backend behind StubTreq, with a fake clock and fake push clients.
    """

    secret = None

    def setUp(self):
        self.clock = Clock()
        self.clients = {}
        self.pushAnswer = PUSHED
        self.backend = self.makeBackend()
        self.http = StubTreq(self.backend.resource())

    def makeBackend(self, **kwargs):
        kwargs.setdefault("secret", self.secret)
        return ReferenceBackend(
            self.clock, "api-key", push_client_factory=self.pushClient, **kwargs
        )

    def pushClient(self, api_url, api_key):
        client = FakePushClient(api_url, api_key, self.pushAnswer)
        self.clients[api_url] = client
        return client

    def request(self, path, body=None, raw=None, headers=None, method="POST"):
        """
        Send a request; a Deferred of C{(status, headers, json or bytes)}.
        """
        if raw is None:
            raw = json.dumps(body).encode("utf-8")
        d = self.http.request(
            method, "http://backend.invalid" + path, data=raw, headers=headers
        )
        d.addCallback(
            lambda r: r.content().addCallback(lambda c: (r.code, r.headers, _json(c)))
        )
        self.http.flush()
        return d

    def post(self, path, body=None, **kwargs):
        """
        A request answered at once: C{(status, json or bytes)}.
        """
        status, headers, content = self.successResultOf(
            self.request(path, body, **kwargs)
        )
        if content != b"":
            self.assertEqual(
                headers.getRawHeaders(b"content-type"), [b"application/json"]
            )
        return status, content

    def finish(self, d):
        """
        Deliver a deferred answer after the clock moved or a push answered.
        """
        self.http.flush()
        status, _, content = self.successResultOf(d)
        return status, content

    def rpc(self, route, data=None, player_id="alice"):
        body = {
            "gate_id": "g1",
            "session_id": "s1",
            "player_id": player_id,
            "request_id": 7,
            "route": route,
            "data": data,
        }
        return self.post("/rpc/" + route, body)

    def event(self, event, player_id, gate_id, session_id="s1", ts=1.5):
        body = {
            "event": event,
            "player_id": player_id,
            "gate_id": gate_id,
            "session_id": session_id,
            "ts": ts,
        }
        self.assertEqual(self.post("/events", body), (204, b""))

    def gate(self, gate_id, state="up", api_url=None):
        body = {
            "gate_id": gate_id,
            "state": state,
            "api_url": api_url or f"http://{gate_id}.invalid:8090",
            "listen": {"tcp": "127.0.0.1:8080"},
        }
        self.assertEqual(self.post("/gates", body), (204, b""))

    def assertError(self, answer, status, code):
        self.assertEqual(answer[0], status)
        self.assertEqual(answer[1]["error"]["code"], code)
        self.assertIsInstance(answer[1]["error"]["msg"], str)


def _json(content):
    try:
        return json.loads(content)
    except ValueError:
        return content


class LoginTests(BackendTestCase):
    def test_login(self):
        body = {"gate_id": "g1", "session_id": "s1", "data": {"name": "alice"}}
        status, answer = self.post("/login", body)
        self.assertEqual(status, 200)
        self.assertEqual(answer["player_id"], "alice")
        self.assertEqual(answer["data"]["name"], "alice")
        self.assertIsInstance(answer["data"]["welcome"], str)

    def test_unicode_name(self):
        status, answer = self.post("/login", {"data": {"name": "Zoë 🐉"}})
        self.assertEqual((status, answer["player_id"]), (200, "Zoë 🐉"))

    def test_longest_name(self):
        status, _ = self.post("/login", {"data": {"name": "n" * MAX_NAME}})
        self.assertEqual(status, 200)

    def test_bad_names(self):
        for data in [
            {},
            {"name": ""},
            {"name": "n" * (MAX_NAME + 1)},
            {"name": 42},
            {"name": None},
            "alice",
            None,
        ]:
            self.assertError(self.post("/login", {"data": data}), 401, "auth_failed")
        self.assertError(self.post("/login", {}), 401, "auth_failed")

    def test_bad_json(self):
        self.assertError(self.post("/login", raw=b"{nope"), 400, "bad_request")
        self.assertError(self.post("/login", raw=b""), 400, "bad_request")
        self.assertError(self.post("/login", raw=b"\xff\xfe"), 400, "bad_request")
        self.assertError(self.post("/login", raw=b"[1, 2]"), 400, "bad_request")
        self.assertError(
            self.post("/login", raw=b'{"data": {"name": NaN}}'), 400, "bad_request"
        )

    def test_body_too_large(self):
        self.backend.max_body = 100
        raw = json.dumps({"data": {"name": "a" * 200}}).encode()
        self.assertError(self.post("/login", raw=raw), 413, "too_large")

    def test_unknown_path(self):
        self.assertError(self.post("/nope", {}), 404, "not_found")
        self.assertError(self.post("/", {}), 404, "not_found")

    def test_only_post(self):
        for method in ["GET", "PUT", "DELETE"]:
            status, headers, content = self.successResultOf(
                self.request("/login", method=method)
            )
            self.assertEqual(status, 405)
            self.assertEqual(content["error"]["code"], "method_not_allowed")
            self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])


class SignatureTests(BackendTestCase):
    secret = "backend-secret"

    def signed(self, path, body, signature=None):
        raw = json.dumps(body).encode()
        if signature is None:
            signature = sign(self.secret, raw)
        return self.post(path, raw=raw, headers={SIGNATURE_HEADER: [signature]})

    def test_signed(self):
        status, answer = self.signed("/login", {"data": {"name": "alice"}})
        self.assertEqual((status, answer["player_id"]), (200, "alice"))

    def test_every_call_is_checked(self):
        for path in ["/login", "/rpc/echo", "/rpc", "/events", "/gates", "/nope"]:
            self.assertError(self.post(path, {}), 401, "bad_signature")
            self.assertError(self.signed(path, {}, "0" * 64), 401, "bad_signature")

    def test_signature_of_other_body(self):
        other = sign(self.secret, b"{}")
        self.assertError(
            self.signed("/login", {"data": {"name": "a"}}, other), 401, "bad_signature"
        )

    def test_wrong_secret(self):
        raw = b'{"data": {"name": "a"}}'
        wrong = sign("not-the-secret", raw)
        answer = self.post("/login", raw=raw, headers={SIGNATURE_HEADER: [wrong]})
        self.assertError(answer, 401, "bad_signature")

    def test_signed_rpc(self):
        body = {"player_id": "alice", "route": "echo", "data": {"x": 1}}
        self.assertEqual(self.signed("/rpc/echo", body), (200, {"data": {"x": 1}}))


class RouteTests(BackendTestCase):
    def test_echo(self):
        for data in [{"a": [1, 2.5, None, True]}, "text", 0, None, ["ü", "€"]]:
            self.assertEqual(self.rpc("echo", data), (200, {"data": data}))

    def test_whoami(self):
        self.assertEqual(
            self.rpc("whoami", None, player_id="bob"),
            (200, {"data": {"player_id": "bob"}}),
        )

    def test_fail(self):
        self.assertError(self.rpc("fail", {}), 500, "backend_error")

    def test_unknown_route_is_404_without_body(self):
        status, headers, content = self.successResultOf(
            self.request("/rpc/nope", {"player_id": "alice", "data": None})
        )
        self.assertEqual((status, content), (404, b""))
        self.assertIsNone(headers.getRawHeaders(b"content-type"))

    def test_route_is_percent_decoded(self):
        status, content = self.post("/rpc/ech%6F", {"player_id": "a", "data": 3})
        self.assertEqual((status, content), (200, {"data": 3}))

    def test_player_id_required(self):
        self.assertError(self.post("/rpc/echo", {"data": 1}), 400, "bad_request")
        self.assertError(self.rpc("echo", 1, player_id=5), 400, "bad_request")

    def test_bad_json(self):
        self.assertError(self.post("/rpc/echo", raw=b"nope"), 400, "bad_request")
        self.assertError(self.post("/rpc/echo", raw=b'"str"'), 400, "bad_request")

    def test_slow(self):
        d = self.request("/rpc/slow", {"player_id": "a", "data": {"seconds": 2}})
        self.assertNoResult(d)
        self.clock.advance(1.9)
        self.http.flush()
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.finish(d), (200, {"data": {"slept": 2.0}}))

    def test_slow_is_capped(self):
        d = self.request("/rpc/slow", {"player_id": "a", "data": {"seconds": 1e9}})
        self.clock.advance(MAX_SLOW_SECONDS)
        self.assertEqual(self.finish(d), (200, {"data": {"slept": MAX_SLOW_SECONDS}}))

    def test_slow_zero(self):
        d = self.request("/rpc/slow", {"player_id": "a", "data": {"seconds": 0}})
        self.clock.advance(0)
        self.assertEqual(self.finish(d), (200, {"data": {"slept": 0.0}}))

    def test_slow_bad_seconds(self):
        for data in [None, {}, {"seconds": "1"}, {"seconds": -1}, {"seconds": True}]:
            self.assertError(self.rpc("slow", data), 400, "bad_request")

    def test_cancel_stops_slow(self):
        """
        A gate that gives up (the connection goes) leaves no timer behind.
        """
        d = self.backend.handle(
            ["rpc", "slow"], b'{"player_id": "a", "data": {"seconds": 5}}'
        )
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SayTests(BackendTestCase):
    def say(self, to="bob", text="hi", player_id="alice"):
        return self.rpc("say", {"to": to, "text": text}, player_id=player_id)

    def test_say_to_gate_of_player(self):
        self.gate("g1")
        self.gate("g2")
        self.event("online", "bob", "g1")
        self.assertEqual(self.say(), (200, {"data": PUSHED}))
        client = self.clients["http://g1.invalid:8090"]
        self.assertEqual(client.api_key, "api-key")
        self.assertEqual(
            client.pushes, [(["bob"], "chat", {"from": "alice", "text": "hi"}, True)]
        )

    def test_clients_are_reused(self):
        self.gate("g1")
        self.event("online", "bob", "g1")
        self.say()
        self.say()
        self.assertEqual(len(self.clients["http://g1.invalid:8090"].pushes), 2)

    def test_offline_player_goes_to_last_gate(self):
        """
        Without a shared store the mailbox is on the gate the player was on.
        """
        self.gate("g1")
        self.gate("g2")
        self.event("online", "bob", "g1")
        self.event("offline", "bob", "g1")
        self.say()
        self.assertEqual(len(self.clients["http://g1.invalid:8090"].pushes), 1)

    def test_falls_back_to_api_url(self):
        self.backend = self.makeBackend(api_url="http://configured.invalid")
        self.http = StubTreq(self.backend.resource())
        self.gate("g2")
        self.assertEqual(self.say(), (200, {"data": PUSHED}))
        self.assertEqual(list(self.clients), ["http://configured.invalid"])

    def test_falls_back_to_latest_up_gate(self):
        self.gate("g1")
        self.gate("g2")
        self.gate("g3", state="draining")
        self.say()
        self.assertEqual(list(self.clients), ["http://g2.invalid:8090"])

    def test_gate_down_is_skipped(self):
        self.gate("g1")
        self.event("online", "bob", "g1")
        self.gate("g2")
        self.gate("g1", state="down")
        self.say()
        self.assertEqual(list(self.clients), ["http://g2.invalid:8090"])

    def test_no_push_api_known(self):
        self.assertError(self.say(), 503, "push_unavailable")

    def test_push_api_error(self):
        self.gate("g1")
        self.pushAnswer = PushAPIError(401, "unauthorized", "bad key")
        self.assertError(self.say(), 502, "push_failed")

    def test_push_unreachable(self):
        self.gate("g1")
        self.pushAnswer = ConnectionRefusedError("nobody home")
        self.assertError(self.say(), 502, "push_failed")

    def test_waits_for_push(self):
        self.gate("g1")
        self.pushAnswer = None
        d = self.request(
            "/rpc/say", {"player_id": "alice", "data": {"to": "bob", "text": "x"}}
        )
        self.assertNoResult(d)
        self.clients["http://g1.invalid:8090"].pending[0].callback({"delivered": 0})
        self.assertEqual(self.finish(d), (200, {"data": {"delivered": 0}}))

    def test_bad_say(self):
        self.gate("g1")
        for data in [
            None,
            {},
            {"to": "bob"},
            {"text": "hi"},
            {"to": "", "text": "hi"},
            {"to": 1, "text": "hi"},
            {"to": "bob", "text": 5},
        ]:
            self.assertError(self.rpc("say", data), 400, "bad_request")
        self.assertEqual(self.clients, {})

    def test_close_closes_clients(self):
        self.gate("g1")
        self.say()
        self.successResultOf(self.backend.close())
        self.assertTrue(self.clients["http://g1.invalid:8090"].closed)


class FakeGateAPI(Resource):
    """
    Just enough of a gate's C{POST /v1/push} for the end-to-end test.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.received = []

    def render_POST(self, request):
        self.received.append(
            (
                request.path,
                request.getHeader(b"authorization"),
                json.loads(request.content.read()),
            )
        )
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(PUSHED).encode()


class SayThroughPushClientTests(BackendTestCase):
    """
    C{say} with the real L{PushClient}, its HTTP in memory.
    """

    def pushClient(self, api_url, api_key):
        return PushClient(
            api_url, api_key, reactor=self.clock, http=StubTreq(self.gateAPI)
        )

    def test_say(self):
        self.gateAPI = FakeGateAPI()
        self.gate("g1")
        self.assertEqual(
            self.rpc("say", {"to": "bob", "text": "hi"}), (200, {"data": PUSHED})
        )
        self.assertEqual(
            self.gateAPI.received,
            [
                (
                    b"/v1/push",
                    b"Bearer api-key",
                    {
                        "players": ["bob"],
                        "route": "chat",
                        "data": {"from": "alice", "text": "hi"},
                        "persist": True,
                    },
                )
            ],
        )


    def test_cancelled_say(self):
        """
        A gate giving up on C{say} cancels the push quietly.
        """
        self.gateAPI = Hang()
        self.gate("g1")
        body = {"player_id": "alice", "data": {"to": "bob", "text": "hi"}}
        d = self.backend.handle(["rpc", "say"], json.dumps(body).encode())
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class Hang(Resource):
    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


class BatchTests(BackendTestCase):
    def call(self, route, data=None, player_id="alice"):
        return {"player_id": player_id, "route": route, "data": data, "request_id": 1}

    def test_batch(self):
        calls = [
            self.call("echo", {"n": 1}),
            self.call("nope"),
            self.call("whoami", player_id="bob"),
            self.call("fail"),
            self.call("slow", {"seconds": "x"}),
            self.call("echo", 2),
            "not a call",
            {"player_id": "a"},
        ]
        status, answer = self.post("/rpc", {"calls": calls})
        self.assertEqual(status, 200)
        results = answer["results"]
        self.assertEqual(len(results), len(calls))
        self.assertEqual(results[0], {"data": {"n": 1}})
        self.assertEqual(results[1]["error"]["code"], "route_not_found")
        self.assertEqual(results[2], {"data": {"player_id": "bob"}})
        self.assertEqual(results[3]["error"]["code"], "backend_error")
        self.assertEqual(results[4]["error"]["code"], "bad_request")
        self.assertEqual(results[5], {"data": 2})
        self.assertEqual(results[6]["error"]["code"], "bad_request")
        self.assertEqual(results[7]["error"]["code"], "bad_request")

    def test_empty(self):
        self.assertEqual(self.post("/rpc", {"calls": []}), (200, {"results": []}))

    def test_slow_call_holds_the_batch(self):
        calls = [self.call("slow", {"seconds": 3}), self.call("echo", 1)]
        d = self.request("/rpc", {"calls": calls})
        self.assertNoResult(d)
        self.clock.advance(3)
        self.assertEqual(
            self.finish(d), (200, {"results": [{"data": {"slept": 3.0}}, {"data": 1}]})
        )

    def test_cancel_stops_every_call(self):
        calls = [self.call("slow", {"seconds": 3}), self.call("slow", {"seconds": 4})]
        d = self.backend.handle(["rpc"], json.dumps({"calls": calls}).encode())
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_bad_batches(self):
        for body in [{}, {"calls": {}}, {"calls": "x"}]:
            self.assertError(self.post("/rpc", body), 400, "bad_request")
        self.backend.max_batch = 2
        calls = [self.call("echo")] * 3
        self.assertError(self.post("/rpc", {"calls": calls}), 400, "bad_request")


class EventTests(BackendTestCase):
    def test_events_are_kept(self):
        self.event("online", "bob", "g1", "s1", ts=10.0)
        self.assertEqual(
            list(self.backend.events),
            [
                {
                    "event": "online",
                    "player_id": "bob",
                    "gate_id": "g1",
                    "session_id": "s1",
                    "ts": 10.0,
                }
            ],
        )
        self.assertEqual(dict(self.backend.online), {"bob": "g1"})

    def test_offline(self):
        self.event("online", "bob", "g1", "s1")
        self.event("offline", "bob", "g1", "s1")
        self.assertEqual(dict(self.backend.online), {})

    def test_late_offline_of_replaced_session(self):
        self.event("online", "bob", "g1", "s1")
        self.event("online", "bob", "g2", "s2")
        self.event("offline", "bob", "g1", "s1")
        self.assertEqual(dict(self.backend.online), {"bob": "g2"})

    def test_duplicate_events(self):
        self.event("online", "bob", "g1", "s1")
        self.event("online", "bob", "g1", "s1")
        self.event("offline", "bob", "g1", "s1")
        self.event("offline", "bob", "g1", "s1")
        self.assertEqual(dict(self.backend.online), {})
        self.assertEqual(len(self.backend.events), 4)

    def test_expired(self):
        self.gate("g1")
        self.gate("g2")
        self.event("online", "bob", "g1")
        self.event("offline", "bob", "g1")
        self.event("expired", "bob", "g1", session_id=None)
        self.assertEqual(self.backend.push_url_for("bob"), "http://g2.invalid:8090")

    def test_events_are_bounded(self):
        self.backend = self.makeBackend(max_events=3, max_players=2)
        self.http = StubTreq(self.backend.resource())
        for n in range(5):
            self.event("online", f"p{n}", "g1", f"s{n}")
        players = [e["player_id"] for e in self.backend.events]
        self.assertEqual(players, ["p2", "p3", "p4"])
        self.assertEqual(dict(self.backend.online), {"p3": "g1", "p4": "g1"})
        # Evicted players left nothing behind.
        self.event("offline", "p0", "g1", "s0")
        self.assertEqual(len(self.backend._sessions), 2)
        self.assertEqual(len(self.backend._last_gate), 2)

    def test_bad_events(self):
        good = {"event": "online", "player_id": "b", "gate_id": "g", "session_id": "s"}
        for change in [
            {"event": "away"},
            {"event": None},
            {"player_id": None},
            {"player_id": 3},
            {"player_id": ""},
            {"player_id": "p" * 2000},
            {"gate_id": None},
            {"session_id": 5},
            {"ts": "yesterday"},
        ]:
            body = dict(good, **change)
            self.assertError(self.post("/events", body), 400, "bad_request")
        self.assertEqual(len(self.backend.events), 0)
        self.assertError(self.post("/events", raw=b"{"), 400, "bad_request")


class GateTests(BackendTestCase):
    def test_gates(self):
        self.clock.advance(100)
        self.gate("g1", api_url="http://127.0.0.1:8090")
        self.assertEqual(
            dict(self.backend.gates),
            {
                "g1": {
                    "state": "up",
                    "api_url": "http://127.0.0.1:8090",
                    "listen": {"tcp": "127.0.0.1:8080"},
                    "seen": 100.0,
                }
            },
        )
        self.gate("g1", state="draining", api_url="http://127.0.0.1:8090")
        self.assertEqual(self.backend.gates["g1"]["state"], "draining")

    def test_gates_are_bounded(self):
        self.backend = self.makeBackend(max_gates=2)
        self.http = StubTreq(self.backend.resource())
        for n in range(4):
            self.gate(f"g{n}")
        self.assertEqual(list(self.backend.gates), ["g2", "g3"])

    def test_bad_gates(self):
        good = {"gate_id": "g1", "state": "up", "api_url": "http://x", "listen": []}
        for change in [
            {"gate_id": None},
            {"gate_id": 1},
            {"state": "sideways"},
            {"api_url": 5},
            {"listen": "x" * 5000},
        ]:
            body = dict(good, **change)
            self.assertError(self.post("/gates", body), 400, "bad_request")
        self.assertEqual(dict(self.backend.gates), {})


class MainTests(SynchronousTestCase):
    def test_parse_args(self):
        args = cli.parse_args(
            ["--api-key", "K", "--api-url", "http://127.0.0.1:8090"], environ={}
        )
        self.assertEqual(args.listen, "tcp:8000:interface=127.0.0.1")
        self.assertEqual(args.api_key, "K")
        self.assertEqual(args.api_url, "http://127.0.0.1:8090")
        self.assertIsNone(args.secret)
        self.assertFalse(args.access_log)

    def test_environment(self):
        env = {"MMOGATE_API_KEY": "K", "MMOGATE_BACKEND_SECRET": "S"}
        args = cli.parse_args([], environ=env)
        self.assertEqual((args.api_key, args.secret), ("K", "S"))

    def test_api_key_required(self):
        self.patch(cli.argparse.ArgumentParser, "exit", _raise_exit)
        self.patch(cli.argparse.ArgumentParser, "print_usage", lambda *a: None)
        self.assertRaises(SystemExit, cli.parse_args, [], environ={})

    def test_serve(self):
        reactor = MemoryReactor()
        args = cli.parse_args(
            ["--listen", "tcp:8123:interface=127.0.0.1", "--api-key", "K"], environ={}
        )
        backend, port = self.successResultOf(cli.serve(reactor, args))
        self.assertIsInstance(backend, ReferenceBackend)
        portNumber, site, _, interface = reactor.tcpServers[0]
        self.assertEqual((portNumber, interface), (8123, "127.0.0.1"))
        self.assertIs(site.resource, backend.resource())
        [(close, _, _)] = reactor.triggers["before"]["shutdown"]
        self.assertEqual(close, backend.close)

    def test_run_serves_until_stopped(self):
        args = cli.parse_args(["--api-key", "K"], environ={})
        d = cli._run(MemoryReactor(), args)
        self.assertNoResult(d)

    def test_run_bad_endpoint(self):
        for listen in ["bogus:1", "tcp:notaport"]:
            args = cli.parse_args(["--api-key", "K", "--listen", listen], environ={})
            failure = self.failureResultOf(cli._run(MemoryReactor(), args), SystemExit)
            self.assertEqual(failure.value.code, 1)


def _raise_exit(self, status=0, message=None):
    raise SystemExit(status)
