"""
Tests for L{gate.api}: the push and admin API of PROTOCOL.md section 5,
served by L{APISite} over a L{StringTransport} (real HTTP parsing, so
C{Content-Length}, chunked bodies and the body limit are the real ones).
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from gate.api import APIResource, APISite

from tests.fakes import API_KEY, GATE_ID, FailingMailboxStore, Stack, http_request

AUTH = {"Authorization": "Bearer " + API_KEY}


class FakeGate:
    """
    What the API uses of a L{gate.service.GateService}.
    """

    def __init__(self, stack):
        self.players = stack.players
        self.sessions = stack.sessions


class APITestCase(SynchronousTestCase):
    max_body = 1000

    def setUp(self):
        self.stack = Stack()
        self.site = APISite(APIResource(FakeGate(self.stack), API_KEY),
                            self.max_body)

    def request(self, method, path, body=None, headers=AUTH, chunks=None):
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        if method == "POST" and body is None and chunks is None:
            body = b""
        status, response_headers, content = http_request(
            self.site, method, path, body, headers, chunks,
            clock=self.stack.clock)
        self.last_headers = response_headers
        if not content:
            return status, None
        try:
            return status, json.loads(content)
        except ValueError:
            # Not the API's JSON (a server error page, say): the raw bytes,
            # which no assertion on a JSON answer accepts.
            return status, content

    def post(self, path, body, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def assertError(self, answer, status, code):
        got_status, body = answer
        self.assertEqual(got_status, status, body)
        self.assertEqual(body["error"]["code"], code)
        self.assertIsInstance(body["error"]["msg"], str)
        self.assertEqual(self.last_headers["content-type"], "application/json")
        return body

    def pushes(self, connection):
        return [m for m in connection.messages if m["t"] == "push"]


class AuthTests(APITestCase):
    def test_no_key(self):
        for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/push"),
                             ("GET", "/v1/nothing"), ("GET", "/")):
            self.assertError(self.request(method, path, headers={}), 401,
                             "unauthorized")

    def test_wrong_key(self):
        for value in ("Bearer wrong", "Bearer " + API_KEY + "x", API_KEY,
                      "Basic " + API_KEY, "bearer " + API_KEY, "Bearer"):
            self.assertError(self.get("/v1/sessions",
                                      headers={"Authorization": value}),
                             401, "unauthorized")

    def test_nothing_done_without_key(self):
        self.stack.login("alice")
        self.post("/v1/push", {"players": ["alice"], "route": "r"}, headers={})
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.last_seq("alice")), 0)

    def test_right_key(self):
        self.assertEqual(self.get("/v1/sessions"), (200, {"sessions": []}))
        self.assertEqual(self.last_headers["content-type"], "application/json")


class RoutingTests(APITestCase):
    def test_unknown_paths(self):
        for path in ("/", "/v1", "/v1/", "/v2/push", "/v1/nope",
                     "/v1/players", "/v1/players/a/b", "/v1/push/extra",
                     "/push", "/v1/sessions/x"):
            self.assertError(self.get(path), 404, "not_found")
            self.assertError(self.post(path, {}), 404, "not_found")

    def test_wrong_methods(self):
        for method, path, allowed in (("GET", "/v1/push", "POST"),
                                      ("GET", "/v1/broadcast", "POST"),
                                      ("GET", "/v1/batch", "POST"),
                                      ("GET", "/v1/kick", "POST"),
                                      ("PUT", "/v1/push", "POST"),
                                      ("DELETE", "/v1/kick", "POST"),
                                      ("POST", "/v1/sessions", "GET"),
                                      ("POST", "/v1/players/alice", "GET"),
                                      ("DELETE", "/v1/players/alice", "GET")):
            self.assertError(self.request(method, path), 405,
                             "method_not_allowed")
            self.assertEqual(self.last_headers["allow"], allowed)


class BodyTests(APITestCase):
    def test_not_json(self):
        for body in (b"{", b"", b"nope", b'{"players": ["a"]', b"\xff\xfe",
                     b"[1,]"):
            self.assertError(self.post("/v1/push", body), 400, "bad_request")

    def test_nan_is_not_json(self):
        """
        C{NaN} and C{Infinity} are not JSON: 400, not a server error.
        """
        self.stack.login("alice")
        for constant in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
            body = b'{"players": ["alice"], "route": "r", "data": ' + constant + b"}"
            self.assertError(self.post("/v1/push", body), 400, "bad_request")
            body = b'{"route": "r", "data": [' + constant + b"]}"
            self.assertError(self.post("/v1/broadcast", body), 400,
                             "bad_request")

    def test_deep_nesting(self):
        body = b'{"players": [], "route": "r", "data": ' + b"[" * 100000 \
            + b"]" * 100000 + b"}"
        self.site.max_body = len(body)
        self.assertError(self.post("/v1/push", body), 400, "bad_request")

    def test_max_depth(self):
        """
        Bodies nest at most C{max_depth} levels (64 unless the gate says
        otherwise); brackets in strings do not count.
        """
        def push(depth):
            data = "[" * (depth - 1) + "1" + "]" * (depth - 1)
            return ('{"players": [], "route": "r", "data": %s}'
                    % data).encode()
        self.assertEqual(self.post("/v1/push", push(64))[0], 200)
        answer = self.assertError(self.post("/v1/push", push(65)), 400,
                                  "bad_request")
        self.assertIn("64", answer["error"]["msg"])
        site = APISite(APIResource(FakeGate(self.stack), API_KEY,
                                   max_depth=3), self.max_body)
        self.site = site
        self.assertEqual(self.post("/v1/push", push(3))[0], 200)
        self.assertError(self.post("/v1/push", push(4)), 400, "bad_request")
        self.assertEqual(self.post("/v1/push", {"players": [], "route": "r",
                                                "data": "[[[[[[{{{"})[0], 200)

    def test_push_shapes(self):
        good = {"players": ["a"], "route": "r", "data": 1}
        self.assertEqual(self.post("/v1/push", good)[0], 200)
        bad = [[], "x", None, 1,
               {"route": "r"},
               dict(good, players="a"),
               dict(good, players={"a": 1}),
               dict(good, players=[1]),
               dict(good, players=[""]),
               dict(good, players=[None]),
               dict(good, players=["a", ["b"]]),
               dict(good, players=["x" * 257]),
               {"players": ["a"]},
               dict(good, route=""),
               dict(good, route=5),
               dict(good, route=None),
               dict(good, route="r" * 129),
               dict(good, persist="yes"),
               dict(good, persist=1),
               dict(good, persist=None)]
        for body in bad:
            self.assertError(self.post("/v1/push", body), 400, "bad_request")

    def test_limits_inclusive(self):
        body = {"players": ["x" * 256], "route": "r" * 128}
        self.assertEqual(self.post("/v1/push", body),
                         (200, {"delivered": 0, "queued": 0, "dropped": 0,
                                "unknown": ["x" * 256]}))


class BodyLimitTests(APITestCase):
    max_body = 200

    def body_of_size(self, size):
        body = json.dumps({"players": ["ghost"], "route": "r"}).encode()
        return body + b" " * (size - len(body))

    def test_exactly_max_body(self):
        body = self.body_of_size(200)
        self.assertEqual(len(body), 200)
        self.assertEqual(self.post("/v1/push", body)[0], 200)

    def test_over_max_body_content_length(self):
        self.assertError(self.post("/v1/push", self.body_of_size(201)), 413,
                         "too_large")

    def test_chunked_within_limit(self):
        body = self.body_of_size(200)
        status, answer = self.post("/v1/push", None,
                                   chunks=[body[:50], body[50:]])
        self.assertEqual((status, answer["unknown"]), (200, ["ghost"]))

    def test_chunked_over_limit(self):
        body = self.body_of_size(201)
        self.assertError(self.post("/v1/push", None,
                                   chunks=[body[:100], body[100:]]),
                         413, "too_large")

    def test_large_chunked_discarded(self):
        """
        A body far over the limit is refused without being pushed.
        """
        self.stack.login("alice")
        body = json.dumps({"players": ["alice"], "route": "r",
                           "data": "x" * 5000}).encode()
        chunks = [body[i:i + 100] for i in range(0, len(body), 100)]
        self.assertError(self.post("/v1/push", None, chunks=chunks), 413,
                         "too_large")
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.last_seq("alice")), 0)


class PushTests(APITestCase):
    def test_counts(self):
        s1, c1, _ = self.stack.login("on")
        s2, c2, _ = self.stack.login("off")
        s2.lost()
        answer = self.post("/v1/push", {"players": ["on", "off", "ghost"],
                                        "route": "chat", "data": {"m": "hi"}})
        self.assertEqual(answer, (200, {"delivered": 1, "queued": 1,
                                        "dropped": 0, "unknown": ["ghost"]}))
        (push,) = self.pushes(c1)
        self.assertEqual((push["route"], push["data"], push["seq"]),
                         ("chat", {"m": "hi"}, 1))
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("off")), 1)

    def test_transient(self):
        s1, c1, _ = self.stack.login("on")
        s2, c2, _ = self.stack.login("off")
        s2.lost()
        answer = self.post("/v1/push", {"players": ["on", "off", "ghost"],
                                        "route": "fx", "persist": False})
        self.assertEqual(answer, (200, {"delivered": 1, "queued": 0,
                                        "dropped": 1, "unknown": ["ghost"]}))
        (push,) = self.pushes(c1)
        self.assertNotIn("seq", push)
        self.assertIsNone(push["data"])
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("off")), 0)

    def test_empty_players(self):
        self.assertEqual(self.post("/v1/push", {"players": [], "route": "r"}),
                         (200, {"delivered": 0, "queued": 0, "dropped": 0,
                                "unknown": []}))

    def test_store_failure(self):
        """
        When the store fails, the push is not acknowledged: 503.
        """
        self.stack.players.mailboxes = FailingMailboxStore(self.stack.clock,
                                                           10, 10)
        self.stack.login("alice")
        status, body = self.post("/v1/push", {"players": ["alice"],
                                              "route": "r"})
        self.assertEqual(status, 503)
        self.assertEqual(body["error"]["code"], "unavailable")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_broadcast(self):
        s1, c1, _ = self.stack.login("a")
        s2, c2, _ = self.stack.login("b")
        s3, c3, _ = self.stack.login("c")
        s3.lost()
        self.assertEqual(self.post("/v1/broadcast",
                                   {"route": "news", "data": [1]}),
                         (200, {"delivered": 2}))
        for connection in (c1, c2):
            (push,) = self.pushes(connection)
            self.assertEqual((push["route"], push["data"]), ("news", [1]))
            self.assertNotIn("seq", push)

    def test_broadcast_shapes(self):
        for body in ([], "x", {}, {"route": ""}, {"route": 1},
                     {"route": "r" * 129}, {"data": 1}):
            self.assertError(self.post("/v1/broadcast", body), 400,
                             "bad_request")


class BatchTests(APITestCase):
    def test_results_in_order(self):
        s1, c1, _ = self.stack.login("a")
        s2, c2, _ = self.stack.login("b")
        s2.lost()
        answer = self.post("/v1/batch", {"ops": [
            {"players": ["a"], "route": "r1", "data": 1},
            {"players": ["b", "ghost"], "route": "r2"},
            {"players": ["a", "b"], "route": "r3", "persist": False}]})
        self.assertEqual(answer, (200, {"results": [
            {"delivered": 1, "queued": 0, "dropped": 0, "unknown": []},
            {"delivered": 0, "queued": 1, "dropped": 0, "unknown": ["ghost"]},
            {"delivered": 1, "queued": 0, "dropped": 1, "unknown": []}]}))
        self.assertEqual([p["route"] for p in self.pushes(c1)], ["r1", "r3"])

    def test_empty(self):
        self.assertEqual(self.post("/v1/batch", {"ops": []}),
                         (200, {"results": []}))

    def test_all_or_nothing(self):
        """
        One bad op refuses the whole batch before any push goes out.
        """
        s1, c1, _ = self.stack.login("a")
        for bad in ({"players": ["a"]}, {"players": "a", "route": "r"},
                    {"players": ["a"], "route": "r", "persist": "no"},
                    "not an op", None):
            status, body = self.post("/v1/batch", {"ops": [
                {"players": ["a"], "route": "first"}, bad,
                {"players": ["a"], "route": "third"}]})
            self.assertEqual(status, 400)
            self.assertEqual(body["error"]["code"], "bad_request")
            self.assertIn("ops[1]", body["error"]["msg"])
        self.assertEqual(self.pushes(c1), [])
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.last_seq("a")), 0)

    def test_shapes(self):
        for body in ([], {}, {"ops": "x"}, {"ops": {"a": 1}}, {"ops": None}):
            self.assertError(self.post("/v1/batch", body), 400, "bad_request")


class KickTests(APITestCase):
    def test_kick(self):
        s1, c1, _ = self.stack.login("alice")
        self.assertEqual(self.post("/v1/kick", {"player_id": "alice",
                                                "reason": "cheating"}),
                         (200, {"kicked": True}))
        self.assertEqual(c1.messages[-1], {"t": "kick", "reason": "admin",
                                           "msg": "cheating"})
        self.assertTrue(c1.closed)

    def test_default_reason(self):
        s1, c1, _ = self.stack.login("alice")
        self.assertEqual(self.post("/v1/kick", {"player_id": "alice"}),
                         (200, {"kicked": True}))
        self.assertEqual(c1.messages[-1]["reason"], "admin")
        self.assertTrue(c1.messages[-1]["msg"])

    def test_not_online(self):
        self.assertEqual(self.post("/v1/kick", {"player_id": "ghost"}),
                         (200, {"kicked": False}))
        s1, c1, _ = self.stack.login("alice")
        s1.lost()
        self.assertEqual(self.post("/v1/kick", {"player_id": "alice"}),
                         (200, {"kicked": False}))

    def test_shapes(self):
        for body in ([], {}, {"player_id": ""}, {"player_id": 5},
                     {"player_id": "x" * 257},
                     {"player_id": "a", "reason": 5},
                     {"player_id": "a", "reason": "r" * 513},
                     {"player_id": "a", "ban_seconds": "60"},
                     {"player_id": "a", "ban_seconds": True},
                     {"player_id": "a", "ban_seconds": -1},
                     {"player_id": "a", "ban_seconds": [1]},
                     {"player_id": "a", "ban_seconds": 10 ** 12}):
            self.assertError(self.post("/v1/kick", body), 400, "bad_request")
        self.assertFalse(self.stack.players.bans.banned("a"))
        self.assertIsNone(self.stack.players.bans.revoked_before("a"))

    def test_ban(self):
        s1, c1, resp = self.stack.login("alice")
        self.stack.clock.advance(1)
        self.assertEqual(self.post("/v1/kick", {"player_id": "alice",
                                                "reason": "cheating",
                                                "ban_seconds": 30.5}),
                         (200, {"kicked": True}))
        self.assertTrue(c1.closed)
        bans = self.stack.players.bans
        self.assertTrue(bans.banned("alice"))
        self.assertEqual(bans.revoked_before("alice"), 1)
        self.stack.clock.advance(30.5)
        self.assertFalse(bans.banned("alice"))

    def test_ban_without_session(self):
        self.assertEqual(self.post("/v1/kick", {"player_id": "ghost",
                                                "ban_seconds": 60}),
                         (200, {"kicked": False}))
        self.assertTrue(self.stack.players.bans.banned("ghost"))
        self.assertEqual(self.post("/v1/kick", {"player_id": "ghost",
                                                "ban_seconds": 0}),
                         (200, {"kicked": False}))
        self.assertFalse(self.stack.players.bans.banned("ghost"))

    def test_null_ban_is_none(self):
        self.assertEqual(self.post("/v1/kick", {"player_id": "ghost",
                                                "ban_seconds": None}),
                         (200, {"kicked": False}))
        self.assertIsNone(self.stack.players.bans.revoked_before("ghost"))


class PlayerAndSessionTests(APITestCase):
    def test_player(self):
        s1, c1, _ = self.stack.login("alice")
        self.stack.push(["alice"])
        self.stack.push(["alice"])
        self.assertEqual(self.get("/v1/players/alice"),
                         (200, {"player_id": "alice", "online": True,
                                "gate_id": GATE_ID, "session_id": s1.id,
                                "last_seq": 2, "mailbox": 2}))
        s1.lost()
        status, body = self.get("/v1/players/alice")
        self.assertEqual((status, body["online"], body["session_id"]),
                         (200, False, None))

    def test_unknown_player(self):
        self.assertError(self.get("/v1/players/ghost"), 404, "not_found")

    def test_quoted_player_id(self):
        s1, c1, _ = self.stack.login("a b/c")
        status, body = self.get("/v1/players/a%20b%2Fc")
        self.assertEqual((status, body["player_id"], body["session_id"]),
                         (200, "a b/c", s1.id))

    def test_sessions(self):
        self.stack.clock.advance(10)
        s1, c1, _ = self.stack.login("alice")
        s2, c2 = self.stack.connect("ws", "10.0.0.2:6000")
        status, body = self.get("/v1/sessions")
        self.assertEqual(status, 200)
        self.assertEqual(sorted(body["sessions"], key=lambda s: s["peer"]), [
            {"session_id": s1.id, "player_id": "alice", "transport": "tcp",
             "peer": "10.0.0.1:5000", "since": 10.0},
            {"session_id": s2.id, "player_id": None, "transport": "ws",
             "peer": "10.0.0.2:6000", "since": 10.0}])
