"""
End to end: every client envelope (PROTOCOL.md section 2) and the error
codes a gate produces for requests, over both client transports, through
real sockets to a real gate and its in-process reference backend.

Helpers: L{tests.e2e}.
"""

import jwt
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from tests.e2e import (AUTH_SECRET, CONNECTORS, HTTP, auth_token,
                       closed_port, events_of, start_gate, until)


class ClientProtocolMixin:
    """
    The tests, run once per transport (C{transport} is C{"tcp"} or
    C{"ws"}).
    """

    transport = None
    other = None

    def connect(self, gate, transport=None):
        return CONNECTORS[transport or self.transport](self, gate)

    # login, req, events

    async def test_login_binds_the_player(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        answer = await client.login("alice")
        self.assertEqual(answer["t"], "resp")
        self.assertEqual(answer["id"], 1)
        self.assertEqual(answer["player_id"], "alice")
        self.assertEqual(answer["data"], {"name": "alice",
                                          "welcome": "welcome, alice"})
        self.assertEqual(answer["last_seq"], 0)
        self.assertIsInstance(answer["resume_token"], str)
        self.assertTrue(answer["resume_token"])
        who = await client.request({"t": "req", "route": "whoami",
                                    "data": None})
        self.assertEqual(who, {"t": "resp", "id": 2,
                               "data": {"player_id": "alice"}})
        client.assert_nothing_pending()

    async def test_req_echo(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        await client.login("alice")
        data = {"n": 1, "list": [1, "two", None, True], "nested": {"é": "ü"},
                "f": 1.5}
        answer = await client.request({"t": "req", "id": 41, "route": "echo",
                                       "data": data})
        self.assertEqual(answer, {"t": "resp", "id": 41, "data": data})

    async def test_requests_answered_in_order(self):
        """
        Requests of one session reach the backend one at a time in order:
        a slow request first still answers first.
        """
        gate = start_gate(self)
        client = await self.connect(gate)
        await client.login("alice")
        client.send({"t": "req", "id": 10, "route": "slow",
                     "data": {"seconds": 0.2}})
        for rid in range(11, 16):
            client.send({"t": "req", "id": rid, "route": "echo",
                         "data": rid})
        answers = [await client.next() for _ in range(6)]
        self.assertEqual([a["id"] for a in answers], list(range(10, 16)))
        self.assertEqual(answers[0]["data"], {"slept": 0.2})
        self.assertEqual([a["data"] for a in answers[1:]],
                         list(range(11, 16)))
        self.assertEqual({a["t"] for a in answers}, {"resp"})

    async def test_lifecycle_events_reach_the_backend(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        client = await self.connect(gate)
        await client.login("alice")
        code, sessions, _ = await api.get("/v1/sessions")
        self.assertEqual(code, 200)
        [session] = sessions["sessions"]
        online = await until(lambda: events_of(gate, "alice", "online"),
                             "the online event at the backend")
        self.assertEqual(len(online), 1)
        self.assertEqual(online[0]["gate_id"], "e2e-gate")
        self.assertEqual(online[0]["session_id"], session["session_id"])
        self.assertIsInstance(online[0]["ts"], float)
        await client.close()
        offline = await until(lambda: events_of(gate, "alice", "offline"),
                              "the offline event at the backend")
        self.assertEqual(offline[0]["gate_id"], "e2e-gate")
        self.assertEqual(offline[0]["session_id"], session["session_id"])
        self.assertEqual([e["event"] for e in events_of(gate, "alice")],
                         ["online", "offline"])

    # auth

    async def test_auth_with_jwt(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        answer = await client.request({"t": "auth", "id": 5,
                                       "token": auth_token("carol")})
        self.assertEqual(answer["t"], "resp")
        self.assertEqual(answer["id"], 5)
        self.assertEqual(answer["player_id"], "carol")
        self.assertEqual(answer["last_seq"], 0)
        self.assertTrue(answer["resume_token"])
        who = await client.request({"t": "req", "route": "whoami"})
        self.assertEqual(who["data"], {"player_id": "carol"})
        await until(lambda: events_of(gate, "carol", "online"),
                    "the online event of an auth")

    async def test_auth_failed(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        login = await client.login("dave")
        bad = {
            "wrong secret": auth_token("carol", secret="x" * 40),
            "expired": auth_token("carol", lifetime=-10),
            "no exp": jwt.encode({"sub": "carol"}, AUTH_SECRET,
                                 algorithm="HS256"),
            "not a JWT": "not.a.jwt",
            "resume token": login["resume_token"],
        }
        other = await self.connect(gate)
        for why, token in bad.items():
            answer = await other.request({"t": "auth", "token": token})
            self.assertEqual(answer["t"], "err", why)
            self.assertEqual(answer["code"], "auth_failed", why)
            self.assertIsInstance(answer["msg"], str)
        # Still open and still not bound.
        answer = await other.request({"t": "req", "route": "whoami"})
        self.assertEqual(answer["code"], "not_authenticated")

    async def test_login_refused_by_backend(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        for data in (None, {}, {"name": ""}, {"name": 5}):
            answer = await client.request({"t": "login", "data": data})
            self.assertEqual((answer["t"], answer["code"]),
                             ("err", "auth_failed"), data)
        answer = await client.request({"t": "req", "route": "echo"})
        self.assertEqual(answer["code"], "not_authenticated")

    # resume

    async def test_resume_after_drop(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        first = await self.connect(gate)
        login = await first.login("alice")
        await first.abort()
        await api.wait_offline("alice")
        second = await self.connect(gate, self.other)
        answer = await second.request({
            "t": "resume", "id": 3, "player_id": "alice",
            "resume_token": login["resume_token"], "last_seq": 0})
        self.assertEqual(answer["t"], "resp")
        self.assertEqual(answer["id"], 3)
        self.assertEqual(answer["player_id"], "alice")
        self.assertEqual(answer["last_seq"], 0)
        self.assertTrue(answer["resume_token"])
        who = await second.request({"t": "req", "route": "whoami"})
        self.assertEqual(who["data"], {"player_id": "alice"})
        # The new resume token works too.
        await second.abort()
        await api.wait_offline("alice")
        third = await self.connect(gate)
        again = await third.request({
            "t": "resume", "player_id": "alice",
            "resume_token": answer["resume_token"], "last_seq": 0})
        self.assertEqual(again["t"], "resp")

    async def test_resume_rejected(self):
        gate = start_gate(self)
        alice = await self.connect(gate)
        alice_login = await alice.login("alice")
        bob = await self.connect(gate)
        bob_login = await bob.login("bob")
        client = await self.connect(gate)
        cases = {
            "garbage": ("alice", "garbage"),
            "another player's token": ("alice", bob_login["resume_token"]),
            "an auth token": ("alice", auth_token("alice")),
            "unknown player": ("nobody", auth_token("nobody")),
            "forged": ("alice", alice_login["resume_token"][:-4] + "AAAA"),
        }
        for why, (player_id, token) in cases.items():
            answer = await client.request({
                "t": "resume", "player_id": player_id, "resume_token": token,
                "last_seq": 0})
            self.assertEqual((answer["t"], answer["code"]),
                             ("err", "resume_rejected"), why)
        # Nobody was replaced.
        alice.assert_nothing_pending()
        bob.assert_nothing_pending()
        self.assertFalse(alice.is_lost or bob.is_lost)

    # replaced

    async def test_replaced_login(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        first = await self.connect(gate)
        await first.login("alice")
        second = await self.connect(gate, self.other)
        await second.login("alice")
        kick = await first.next()
        self.assertEqual(kick["t"], "kick")
        self.assertEqual(kick["reason"], "replaced")
        self.assertIsInstance(kick["msg"], str)
        await first.wait_lost()
        who = await second.request({"t": "req", "route": "whoami"})
        self.assertEqual(who["data"], {"player_id": "alice"})
        record = await api.player("alice")
        self.assertTrue(record["online"])
        code, sessions, _ = await api.get("/v1/sessions")
        self.assertEqual([(s["player_id"], s["transport"])
                          for s in sessions["sessions"]],
                         [("alice", self.other)])

    async def test_replaced_by_auth(self):
        gate = start_gate(self)
        first = await self.connect(gate)
        await first.login("alice")
        second = await self.connect(gate)
        answer = await second.request({"t": "auth",
                                       "token": auth_token("alice")})
        self.assertEqual(answer["t"], "resp")
        kick = await first.next()
        self.assertEqual((kick["t"], kick["reason"]), ("kick", "replaced"))
        await first.wait_lost()

    # ack

    async def test_ack_drops_pushes_from_the_mailbox(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        client = await self.connect(gate)
        await client.login("alice")
        for n in range(1, 4):
            answer = await api.push(["alice"], "news", {"n": n})
            self.assertEqual(answer, {"delivered": 1, "queued": 0,
                                      "dropped": 0, "unknown": []})
        pushes = [await client.next() for _ in range(3)]
        self.assertEqual([p["seq"] for p in pushes], [1, 2, 3])
        self.assertEqual((await api.player("alice"))["mailbox"], 3)
        client.send({"t": "ack", "seq": 2})
        # Envelopes of a session are read in order: the pong says the ack
        # was read.
        client.send({"t": "ping", "ts": "after-ack"})
        self.assertEqual(await client.next(), {"t": "pong", "ts": "after-ack"})
        record = await api.player("alice")
        self.assertEqual((record["mailbox"], record["last_seq"]), (1, 3))
        client.send({"t": "ack", "seq": 3})
        client.send({"t": "ping", "ts": 2})
        self.assertEqual(await client.next(), {"t": "pong", "ts": 2})
        self.assertEqual((await api.player("alice"))["mailbox"], 0)

    # ping / pong, heartbeat

    async def test_ping_pong(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        # Before login as after.
        for ts in (1, 1700000000.25, "abc"):
            client.send({"t": "ping", "ts": ts})
            self.assertEqual(await client.next(), {"t": "pong", "ts": ts})
        await client.login("alice")
        client.send({"t": "ping", "ts": 99})
        self.assertEqual(await client.next(), {"t": "pong", "ts": 99})
        client.send({"t": "ping"})
        pong = await client.next()
        self.assertEqual(pong["t"], "pong")
        self.assertIsNone(pong.get("ts"))

    async def test_heartbeat_kicks_a_silent_client(self):
        gate = start_gate(self, session={"heartbeat_ttl": 0.4})
        client = await self.connect(gate)
        await client.login("alice")
        ping = await client.next()
        self.assertEqual(ping["t"], "ping")
        self.assertIsInstance(ping["ts"], float)
        kick = await client.next()
        self.assertEqual((kick["t"], kick["reason"]), ("kick", "idle"))
        await client.wait_lost()
        await until(lambda: events_of(gate, "alice", "offline"),
                    "the offline event of an idle kick")

    async def test_heartbeat_pong_keeps_a_client(self):
        gate = start_gate(self, session={"heartbeat_ttl": 0.6})
        client = await self.connect(gate)
        await client.login("alice")
        for _ in range(3):
            ping = await client.next()
            self.assertEqual(ping["t"], "ping", ping)
            client.send({"t": "pong", "ts": ping["ts"]})
        self.assertFalse(client.is_lost)
        who = await client.request({"t": "req", "route": "whoami"})
        self.assertEqual(who["data"], {"player_id": "alice"})

    # chat through the backend and the push API

    async def test_say_pushes_to_another_player(self):
        gate = start_gate(self)
        alice = await self.connect(gate)
        await alice.login("alice")
        bob = await self.connect(gate, self.other)
        await bob.login("bob")
        answer = await alice.request({"t": "req", "route": "say",
                                      "data": {"to": "bob", "text": "hi"}})
        self.assertEqual(answer["t"], "resp", answer)
        self.assertEqual(answer["data"], {"delivered": 1, "queued": 0,
                                          "dropped": 0, "unknown": []})
        push = await bob.next()
        self.assertEqual(push["t"], "push")
        self.assertEqual(push["route"], "chat")
        self.assertEqual(push["data"], {"from": "alice", "text": "hi"})
        self.assertEqual(push["seq"], 1)
        self.assertIsInstance(push["ts"], float)
        alice.assert_nothing_pending()

    # errors of requests

    async def test_not_authenticated(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        answer = await client.request({"t": "req", "id": 9, "route": "echo",
                                       "data": 1})
        self.assertEqual((answer["t"], answer["id"], answer["code"]),
                         ("err", 9, "not_authenticated"))
        self.assertIsInstance(answer["msg"], str)

    async def test_route_not_found(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        await client.login("alice")
        answer = await client.request({"t": "req", "route": "no_such_route"})
        self.assertEqual((answer["t"], answer["code"]),
                         ("err", "route_not_found"))

    async def test_backend_error(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        await client.login("alice")
        answer = await client.request({"t": "req", "route": "fail"})
        self.assertEqual((answer["t"], answer["code"]),
                         ("err", "backend_error"))

    async def test_backend_code_passed_through(self):
        """
        A backend's 4xx error code reaches the client as that code.
        """
        gate = start_gate(self)
        client = await self.connect(gate)
        await client.login("alice")
        answer = await client.request({"t": "req", "route": "say",
                                       "data": {"to": 5}})
        self.assertEqual((answer["t"], answer["code"]), ("err", "bad_request"))
        self.assertIn("say needs", answer["msg"])

    async def test_backend_timeout(self):
        gate = start_gate(self, backend={"timeout": 0.3})
        client = await self.connect(gate)
        await client.login("alice")
        answer = await client.request({"t": "req", "id": 4, "route": "slow",
                                       "data": {"seconds": 5}})
        self.assertEqual((answer["t"], answer["id"], answer["code"]),
                         ("err", 4, "backend_timeout"))
        # The session goes on.
        answer = await client.request({"t": "req", "route": "echo",
                                       "data": "after"})
        self.assertEqual(answer["data"], "after")

    async def test_backend_unavailable(self):
        gate = start_gate(
            self, backend={"url": f"http://127.0.0.1:{closed_port()}",
                           "timeout": 2.0},
            shutdown={"grace": 0.5})
        client = await self.connect(gate)
        answer = await client.request({"t": "login", "id": 1,
                                       "data": {"name": "alice"}})
        self.assertEqual((answer["t"], answer["id"], answer["code"]),
                         ("err", 1, "backend_unavailable"))
        # Bound by a token instead, a request cannot reach the backend.
        answer = await client.request({"t": "auth",
                                       "token": auth_token("alice")})
        self.assertEqual(answer["t"], "resp")
        answer = await client.request({"t": "req", "id": 7, "route": "echo"})
        self.assertEqual((answer["t"], answer["id"], answer["code"]),
                         ("err", 7, "backend_unavailable"))
        metrics = HTTP(self, gate, "metrics")
        code, _, raw = await metrics.get("/ready")
        self.assertEqual(code, 503, raw)
        code, _, raw = await metrics.get("/health")
        self.assertEqual(code, 200)

    async def test_busy_session_inflight(self):
        gate = start_gate(self, session={"max_inflight": 2})
        client = await self.connect(gate)
        await client.login("alice")
        client.send({"t": "req", "id": 1, "route": "slow",
                     "data": {"seconds": 0.3}})
        client.send({"t": "req", "id": 2, "route": "echo", "data": 2})
        client.send({"t": "req", "id": 3, "route": "echo", "data": 3})
        busy = await client.next()
        self.assertEqual((busy["t"], busy["id"], busy["code"]),
                         ("err", 3, "busy"))
        first = await client.next()
        self.assertEqual((first["t"], first["id"]), ("resp", 1))
        second = await client.next()
        self.assertEqual((second["t"], second["id"], second["data"]),
                         ("resp", 2, 2))

    async def test_busy_worker_queue(self):
        gate = start_gate(self, workers={"min": 1, "max": 1,
                                         "max_queue": 1})
        clients = [await self.connect(gate) for _ in range(3)]
        for i, client in enumerate(clients):
            answer = await client.request({"t": "auth",
                                           "token": auth_token(f"p{i}")})
            self.assertEqual(answer["t"], "resp")
        # One call runs, one waits in the queue, the third is refused.
        clients[0].send({"t": "req", "id": 1, "route": "slow",
                         "data": {"seconds": 0.3}})
        clients[1].send({"t": "req", "id": 1, "route": "echo", "data": 1})
        # Only once both are at the gate does the third go.
        metrics = HTTP(self, gate, "metrics")

        async def queued():
            code, _, raw = await metrics.get("/metrics")
            return b"mmogate_worker_queue 1.0" in raw
        await until(queued, "one request waiting for a worker")
        busy = await clients[2].request({"t": "req", "route": "echo"})
        self.assertEqual((busy["t"], busy["code"]), ("err", "busy"))
        answers = await gatherResults([clients[0].next(), clients[1].next()])
        self.assertEqual([(a["t"], a["id"]) for a in answers],
                         [("resp", 1), ("resp", 1)])


class TCPClientProtocolTests(ClientProtocolMixin, TestCase):
    transport = "tcp"
    other = "ws"


class WebSocketClientProtocolTests(ClientProtocolMixin, TestCase):
    transport = "ws"
    other = "tcp"
