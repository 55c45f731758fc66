"""
End to end: the push and admin API (PROTOCOL.md section 5), persistent
pushes across a dropped connection and a resume (section 3), and the
metrics listener (section 6), through real sockets.

Helpers: L{tests.e2e}.
"""

from twisted.trial.unittest import TestCase

from tests.e2e import HTTP, connect_tcp, connect_ws, start_gate


async def ping_sync(test, client, ts):
    """
    Send C{ping} and check that C{pong} is the next envelope: nothing else
    was sent to C{client} before the gate read the ping.
    """
    client.send({"t": "ping", "ts": ts})
    test.assertEqual(await client.next(), {"t": "pong", "ts": ts})


class PushTests(TestCase):
    async def offline_player(self, gate, api, name):
        """
        A player the gate knows who has no session; return the login resp.
        """
        client = await connect_tcp(self, gate)
        login = await client.login(name)
        await client.close()
        await api.wait_offline(name)
        return login

    async def test_push_statuses(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob_login = await self.offline_player(gate, api, "bob")
        answer = await api.push(["alice", "bob", "ghost", "alice"], "news",
                                {"headline": "hello"})
        self.assertEqual(answer, {"delivered": 1, "queued": 1, "dropped": 0,
                                  "unknown": ["ghost"]})
        push = await alice.next()
        self.assertEqual(set(push), {"t", "route", "data", "ts", "seq"})
        self.assertEqual((push["t"], push["route"], push["data"], push["seq"]),
                         ("push", "news", {"headline": "hello"}, 1))
        self.assertIsInstance(push["ts"], float)
        # Transient: only to online sessions, never queued, no seq.
        answer = await api.push(["alice", "bob", "ghost"], "blip", [1, 2],
                                persist=False)
        self.assertEqual(answer, {"delivered": 1, "queued": 0, "dropped": 1,
                                  "unknown": ["ghost"]})
        push = await alice.next()
        self.assertEqual(set(push), {"t", "route", "data", "ts"})
        self.assertEqual((push["route"], push["data"]), ("blip", [1, 2]))
        await ping_sync(self, alice, 1)
        # Bob gets the persistent push only.
        bob = await connect_ws(self, gate)
        answer = await bob.request({"t": "resume", "player_id": "bob",
                                    "resume_token": bob_login["resume_token"],
                                    "last_seq": 0})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 1))
        push = await bob.next()
        self.assertEqual((push["t"], push["route"], push["data"], push["seq"]),
                         ("push", "news", {"headline": "hello"}, 1))
        await ping_sync(self, bob, 2)

    async def test_push_to_nobody(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        self.assertEqual(await api.push([], "news", None),
                         {"delivered": 0, "queued": 0, "dropped": 0,
                          "unknown": []})
        self.assertEqual(await api.push(["x", "y"], "news", None),
                         {"delivered": 0, "queued": 0, "dropped": 0,
                          "unknown": ["x", "y"]})

    async def test_broadcast(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        carol_login = await self.offline_player(gate, api, "carol")
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob = await connect_ws(self, gate)
        await bob.login("bob")
        unbound = await connect_tcp(self, gate)
        code, answer, raw = await api.post("/v1/broadcast", {
            "route": "announce", "data": {"text": "maintenance"}})
        self.assertEqual((code, answer), (200, {"delivered": 2}), raw)
        for client in (alice, bob):
            push = await client.next()
            self.assertEqual(set(push), {"t", "route", "data", "ts"})
            self.assertEqual((push["t"], push["route"], push["data"]),
                             ("push", "announce", {"text": "maintenance"}))
        await ping_sync(self, unbound, "unbound")
        carol = await connect_tcp(self, gate)
        answer = await carol.request({
            "t": "resume", "player_id": "carol",
            "resume_token": carol_login["resume_token"], "last_seq": 0})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 0))
        await ping_sync(self, carol, "carol")

    async def test_batch(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_ws(self, gate)
        await alice.login("alice")
        await self.offline_player(gate, api, "bob")
        code, answer, raw = await api.post("/v1/batch", {"ops": [
            {"players": ["alice"], "route": "a", "data": 1},
            {"players": ["alice", "bob"], "route": "b", "data": 2},
            {"players": ["bob", "nobody"], "route": "c", "data": 3,
             "persist": False},
        ]})
        self.assertEqual(code, 200, raw)
        self.assertEqual(answer, {"results": [
            {"delivered": 1, "queued": 0, "dropped": 0, "unknown": []},
            {"delivered": 1, "queued": 1, "dropped": 0, "unknown": []},
            {"delivered": 0, "queued": 0, "dropped": 1,
             "unknown": ["nobody"]},
        ]})
        pushes = [await alice.next(), await alice.next()]
        self.assertEqual([(p["route"], p["data"], p["seq"]) for p in pushes],
                         [("a", 1, 1), ("b", 2, 2)])
        self.assertEqual((await api.player("bob"))["mailbox"], 1)

    async def test_kick(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob = await connect_ws(self, gate)
        await bob.login("bob")
        for client, name in ((alice, "alice"), (bob, "bob")):
            code, answer, raw = await api.post("/v1/kick", {
                "player_id": name, "reason": "cheating"})
            self.assertEqual((code, answer), (200, {"kicked": True}), raw)
            kick = await client.next()
            self.assertEqual(kick, {"t": "kick", "reason": "admin",
                                    "msg": "cheating"})
            await client.wait_lost()
            await api.wait_offline(name)
        code, answer, _ = await api.post("/v1/kick", {"player_id": "alice",
                                                      "reason": "again"})
        self.assertEqual((code, answer), (200, {"kicked": False}))
        code, answer, _ = await api.post("/v1/kick", {"player_id": "nobody",
                                                      "reason": "x"})
        self.assertEqual((code, answer), (200, {"kicked": False}))

    async def test_player_record(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        code, sessions, _ = await api.get("/v1/sessions")
        [session] = sessions["sessions"]
        code, record, raw = await api.get("/v1/players/alice")
        self.assertEqual(code, 200, raw)
        self.assertEqual(record, {
            "player_id": "alice", "online": True, "gate_id": "e2e-gate",
            "session_id": session["session_id"], "last_seq": 0,
            "mailbox": 0})
        await api.push(["alice"], "r", None)
        await api.push(["alice"], "r", None)
        await alice.close()
        await api.wait_offline("alice")
        code, record, raw = await api.get("/v1/players/alice")
        self.assertEqual(record, {
            "player_id": "alice", "online": False, "gate_id": "e2e-gate",
            "session_id": None, "last_seq": 2, "mailbox": 2})
        code, answer, raw = await api.get("/v1/players/nobody")
        self.assertEqual(code, 404, raw)
        self.assertIsInstance(answer["error"]["code"], str)
        code, answer, raw = await api.get("/v1/players/a%20b")
        self.assertEqual(code, 404, raw)

    async def test_sessions(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob = await connect_ws(self, gate)
        await bob.login("bob")
        anonymous = await connect_tcp(self, gate)
        await ping_sync(self, anonymous, 0)
        code, answer, raw = await api.get("/v1/sessions")
        self.assertEqual(code, 200, raw)
        sessions = sorted(answer["sessions"],
                          key=lambda s: s["player_id"] or "")
        self.assertEqual(len(sessions), 3)
        for session in sessions:
            self.assertEqual(set(session), {"session_id", "player_id",
                                            "transport", "peer", "since"})
            self.assertIsInstance(session["since"], float)
        self.assertEqual([(s["player_id"], s["transport"]) for s in sessions],
                         [(None, "tcp"), ("alice", "tcp"), ("bob", "ws")])
        peers = [f"127.0.0.1:{c.transport.getHost().port}"
                 for c in (anonymous, alice, bob)]
        self.assertEqual([s["peer"] for s in sessions], peers)
        self.assertEqual(len({s["session_id"] for s in sessions}), 3)
        await bob.close()
        await api.wait_offline("bob")
        code, answer, _ = await api.get("/v1/sessions")
        self.assertEqual(sorted(s["player_id"] or "" for s in
                                answer["sessions"]), ["", "alice"])


class APIErrorTests(TestCase):
    async def test_unauthorized(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        calls = [("GET", "/v1/sessions", None), ("GET", "/v1/players/a", None),
                 ("POST", "/v1/push", {"players": [], "route": "r"}),
                 ("POST", "/v1/broadcast", {"route": "r"}),
                 ("POST", "/v1/batch", {"ops": []}),
                 ("POST", "/v1/kick", {"player_id": "a"})]
        for method, path, body in calls:
            for key in ("", "wrong-key", "e2e-api-key-but-longer"):
                code, answer, raw = await api.call(method, path, body, key=key)
                self.assertEqual(code, 401, (method, path, key, raw))
            code, _, raw = await api.call(
                method, path, body, key="",
                headers={b"Authorization": [b"Basic ZTJlLWFwaS1rZXk="]})
            self.assertEqual(code, 401, (method, path, raw))
        # Nothing was done: the right key still sees the same empty gate.
        code, answer, _ = await api.get("/v1/sessions")
        self.assertEqual((code, answer), (200, {"sessions": []}))

    async def test_bad_request(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bad = [
            ("/v1/push", b"{not json"),
            ("/v1/push", b"\xff\xfe"),
            ("/v1/push", b""),
            ("/v1/push", b"[1, 2]"),
            ("/v1/push", b'{"players": "alice", "route": "r"}'),
            ("/v1/push", b'{"players": [5], "route": "r"}'),
            ("/v1/push", b'{"players": ["alice"]}'),
            ("/v1/push", b'{"players": ["alice"], "route": 7}'),
            ("/v1/push", b'{"players": ["alice"], "route": ""}'),
            ("/v1/push", b'{"players": ["alice"], "route": "r", '
                         b'"persist": "yes"}'),
            ("/v1/broadcast", b'{"data": 1}'),
            ("/v1/broadcast", b'"text"'),
            ("/v1/batch", b'{"ops": {}}'),
            ("/v1/batch", b'{"ops": [{"players": ["alice"], "route": "ok"}, '
                          b'{"players": ["alice"]}]}'),
            ("/v1/kick", b'{"reason": "x"}'),
            ("/v1/kick", b'{"player_id": 5}'),
            ("/v1/kick", b'{"player_id": "alice", "reason": 5}'),
        ]
        for path, data in bad:
            code, answer, raw = await api.post(path, data=data)
            self.assertEqual(code, 400, (path, data, raw))
            self.assertEqual(answer["error"]["code"], "bad_request",
                             (path, data))
            self.assertIsInstance(answer["error"]["msg"], str)
        # Nothing of it reached alice, or kicked her (the batch with one bad
        # op was refused whole).
        await ping_sync(self, alice, "clean")
        self.assertFalse(alice.is_lost)

    async def test_body_too_large(self):
        gate = start_gate(self, api={"max_body": 100})
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        body = {"players": ["alice"], "route": "r", "data": "x" * 200}
        code, answer, raw = await api.post("/v1/push", body)
        self.assertEqual(code, 413, raw)
        await ping_sync(self, alice, "nothing")
        code, answer, raw = await api.post("/v1/push", {
            "players": ["alice"], "route": "r", "data": "small"})
        self.assertEqual(code, 200, raw)
        push = await alice.next()
        self.assertEqual((push["data"], push["seq"]), ("small", 1))

    async def test_not_found(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        for path in ("/v1/nothing", "/v2/push", "/", "/v1/players/a/b"):
            code, _, raw = await api.get(path)
            self.assertEqual(code, 404, (path, raw))


class ResumeTests(TestCase):
    async def drop(self, gate, api, client, name):
        await client.abort()
        await api.wait_offline(name)

    async def test_resume_replays_queued_pushes(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        first = await connect_tcp(self, gate)
        login = await first.login("alice")
        await self.drop(gate, api, first, "alice")
        for n in range(1, 6):
            answer = await api.push(["alice"], "mail", {"n": n})
            self.assertEqual(answer, {"delivered": 0, "queued": 1,
                                      "dropped": 0, "unknown": []})
        second = await connect_ws(self, gate)
        resumed = await second.request({
            "t": "resume", "id": 1, "player_id": "alice",
            "resume_token": login["resume_token"], "last_seq": 0})
        self.assertEqual(
            (resumed["t"], resumed["player_id"], resumed["last_seq"]),
            ("resp", "alice", 5))
        pushes = [await second.next() for _ in range(5)]
        self.assertEqual([(p["t"], p["seq"], p["data"]) for p in pushes],
                         [("push", n, {"n": n}) for n in range(1, 6)])
        for push in pushes:
            self.assertEqual(push["route"], "mail")
            self.assertIsInstance(push["ts"], float)
        answer = await api.push(["alice"], "mail", {"n": 6})
        self.assertEqual(answer["delivered"], 1)
        live = await second.next()
        self.assertEqual((live["seq"], live["data"]), (6, {"n": 6}))
        await ping_sync(self, second, "once")
        # Unacknowledged, they are all still there: a resume after 3 gets
        # 4..6, once each, in order.
        await self.drop(gate, api, second, "alice")
        third = await connect_tcp(self, gate)
        answer = await third.request({
            "t": "resume", "player_id": "alice",
            "resume_token": resumed["resume_token"], "last_seq": 3})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 6))
        pushes = [await third.next() for _ in range(3)]
        self.assertEqual([p["seq"] for p in pushes], [4, 5, 6])
        await ping_sync(self, third, "twice")

    async def test_resume_after_ack(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        first = await connect_tcp(self, gate)
        login = await first.login("alice")
        for n in range(1, 5):
            await api.push(["alice"], "mail", n)
        self.assertEqual([(await first.next())["seq"] for _ in range(4)],
                         [1, 2, 3, 4])
        first.send({"t": "ack", "seq": 2})
        await ping_sync(self, first, "acked")
        await self.drop(gate, api, first, "alice")
        await api.push(["alice"], "mail", 5)
        second = await connect_tcp(self, gate)
        answer = await second.request({
            "t": "resume", "player_id": "alice",
            "resume_token": login["resume_token"], "last_seq": 0})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 5))
        # Acknowledged pushes are gone without a gap.
        pushes = [await second.next() for _ in range(3)]
        self.assertEqual([(p["t"], p["seq"], p["data"]) for p in pushes],
                         [("push", 3, 3), ("push", 4, 4), ("push", 5, 5)])
        await ping_sync(self, second, "done")

    async def test_resume_gap(self):
        gate = start_gate(self, player={"mailbox_max": 3})
        api = HTTP(self, gate)
        first = await connect_tcp(self, gate)
        login = await first.login("alice")
        await self.drop(gate, api, first, "alice")
        for n in range(1, 6):
            answer = await api.push(["alice"], "mail", n)
            self.assertEqual(answer["queued"], 1)
        self.assertEqual((await api.player("alice"))["mailbox"], 3)
        second = await connect_ws(self, gate)
        answer = await second.request({
            "t": "resume", "player_id": "alice",
            "resume_token": login["resume_token"], "last_seq": 0})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 5))
        gap = await second.next()
        self.assertEqual(gap, {"t": "gap", "from": 1, "to": 2})
        pushes = [await second.next() for _ in range(3)]
        self.assertEqual([(p["t"], p["seq"], p["data"]) for p in pushes],
                         [("push", 3, 3), ("push", 4, 4), ("push", 5, 5)])
        await api.push(["alice"], "mail", 6)
        live = await second.next()
        self.assertEqual((live["t"], live["seq"]), ("push", 6))
        await ping_sync(self, second, "after gap")


class MetricsListenerTests(TestCase):
    async def test_health_ready_metrics(self):
        gate = start_gate(self)
        metrics = HTTP(self, gate, "metrics")
        code, _, raw = await metrics.get("/health")
        self.assertEqual((code, raw), (200, b"ok\n"))
        code, _, raw = await metrics.get("/ready")
        self.assertEqual((code, raw), (200, b"ready\n"))
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob = await connect_ws(self, gate)
        await bob.login("bob")
        await alice.request({"t": "req", "route": "echo", "data": 1})
        code, _, raw = await metrics.get("/metrics")
        self.assertEqual(code, 200)
        text = raw.decode("utf-8")
        self.assertIn('mmogate_sessions{transport="tcp"} 1.0', text)
        self.assertIn('mmogate_sessions{transport="ws"} 1.0', text)
        self.assertIn('mmogate_requests_total{outcome="ok",route="echo"} 1.0',
                      text)
        code, _, _ = await metrics.get("/nothing")
        self.assertEqual(code, 404)
