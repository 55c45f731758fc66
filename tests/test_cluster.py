"""
Tests for L{gate.cluster}: two gates (two L{gate.service.GateService}s in
this process, each with its reference backend) sharing the machine's real
Redis under a prefix of the test's own, driven by real clients over
sockets and the push API (skipped without Redis, unless
C{MMOGATE_REQUIRE_SERVICES=1}).

The guarantees tested are those of C{docs/cluster.md}: pushes from any gate
numbered in one run and delivered in order wherever the player is; one
session per player across gates, also when many logins race; the push API
of any gate counting and reaching players of every gate; expiry only where
the player went offline last; resume tokens of an expired player rejected
everywhere.
"""

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from gate.cluster import RemotePush
from tests.e2e import (HTTP, auth_token, connect_tcp, connect_ws, events_of,
                       start_gate, until)
from tests.services import (REDIS_URL, redis_command, redis_prefix,
                            require_redis)


def cluster_gate(test, gate_id, prefix, url=REDIS_URL, store=None,
                 **sections):
    """
    A gate on the shared Redis store, once the store is reachable.
    """
    options = {"kind": "redis", "redis_url": url, "redis_prefix": prefix,
               "retry_max": 0.2, "timeout": 2.0, "gate_ttl": 1.5}
    options.update(store or {})
    return start_gate(test, gate={"id": gate_id}, store=options, **sections)


async def reachable(*gates):
    for gate in gates:
        await until(lambda: gate.store.reachable,
                    f"gate {gate.gate_id} to reach Redis")


def pushes(client):
    return [(m.get("seq"), m["data"]) for m in client.received
            if m["t"] == "push"]


class ClusterCase(TestCase):
    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)

    async def two_gates(self, **sections):
        a = cluster_gate(self, "A", self.prefix, **sections)
        b = cluster_gate(self, "B", self.prefix, **sections)
        await reachable(a, b)
        return a, b


class PushTests(ClusterCase):
    async def test_push_from_any_gate(self):
        """
        Pushes sent through both gates' APIs at once reach the player on
        gate A numbered 1..n in one run, in order, each once.
        """
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        api_a, api_b = HTTP(self, a), HTTP(self, b)
        answers = await gatherResults([
            ensureDeferred(api.push(["alice"], "note", {"n": i, "via": name}))
            for i in range(20) for api, name in ((api_a, "A"), (api_b, "B"))])
        self.assertEqual([r["delivered"] for r in answers], [1] * 40)
        await until(lambda: len(pushes(alice)) == 40, "40 pushes")
        self.assertEqual([seq for seq, _ in pushes(alice)],
                         list(range(1, 41)))
        self.assertEqual(len({(d["n"], d["via"]) for _, d in pushes(alice)}),
                         40)

    async def test_unknown_queued_and_resumed_elsewhere(self):
        a, b = await self.two_gates()
        api_b = HTTP(self, b)
        self.assertEqual(await api_b.push(["ghost"], "note", 1),
                         {"delivered": 0, "queued": 0, "dropped": 0,
                          "unknown": ["ghost"]})
        alice = await connect_tcp(self, a)
        login = await alice.login("alice")
        self.assertEqual((await api_b.push(["alice"], "note", 1))["delivered"],
                         1)
        await alice.expect(lambda m: m["t"] == "push")
        await alice.close()
        await api_b.wait_offline("alice")
        self.assertEqual(await api_b.push(["alice"], "note", 2,
                                          persist=False),
                         {"delivered": 0, "queued": 0, "dropped": 1,
                          "unknown": []})
        self.assertEqual((await api_b.push(["alice"], "note", 3))["queued"],
                         1)
        # The player record, from either gate.
        for api in (HTTP(self, a), api_b):
            record = await api.player("alice")
            self.assertEqual(record, {"player_id": "alice", "online": False,
                                      "gate_id": "A", "session_id": None,
                                      "last_seq": 2, "mailbox": 2})
        # Resumed on B with A's token: the mailbox after last_seq 1.
        again = await connect_ws(self, b)
        answer = await again.request({"t": "resume", "player_id": "alice",
                                      "resume_token": login["resume_token"],
                                      "last_seq": 1})
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 2))
        push = await again.next()
        self.assertEqual((push["seq"], push["data"]), (2, 3))
        record = await api_b.player("alice")
        self.assertEqual((record["online"], record["gate_id"]), (True, "B"))
        # Live pushes from A's API now reach B.
        self.assertEqual((await HTTP(self, a).push(["alice"], "n", 4))[
            "delivered"], 1)
        push = await again.next()
        self.assertEqual((push["seq"], push["data"]), (3, 4))

    async def test_broadcast_counts_every_gate(self):
        a, b = await self.two_gates()
        clients = []
        for gate, n in ((a, 2), (b, 3)):
            for i in range(n):
                client = await connect_tcp(self, gate)
                await client.login(f"{gate.gate_id}{i}")
                clients.append(client)
        # B's heartbeat says 3 online.
        await until(lambda: redis_command("GET", self.prefix + "g:B")
                    .addCallback(lambda online: online == b"3"),
                    "B's heartbeat to report 3 players")
        code, answer, _ = await HTTP(self, a).post(
            "/v1/broadcast", {"route": "news", "data": "hi"})
        self.assertEqual((code, answer), (200, {"delivered": 5}))
        for client in clients:
            message = await client.expect(lambda m: m["t"] == "push")
            self.assertEqual((message["data"], "seq" in message),
                             ("hi", False))
        for client in clients:
            client.assert_nothing_pending()

    def test_remote_push_encoding(self):
        push = RemotePush(b'{"t":"push","route":"r","data":1,"ts":2.5')
        self.assertEqual(push.with_seq(7).payload,
                         b'{"t":"push","route":"r","data":1,"ts":2.5,"seq":7}')
        self.assertEqual(push.with_seq(7).seq, 7)
        self.assertIs(push.transient(), push.transient())
        self.assertEqual(push.transient().payload,
                         b'{"t":"push","route":"r","data":1,"ts":2.5}')


class OneSessionTests(ClusterCase):
    async def test_racing_logins_on_two_gates(self):
        """
        Ten logins of one player at once, five on each gate: exactly one
        session is left; every other one is kicked C{replaced}.
        """
        a, b = await self.two_gates()
        clients = []
        for i in range(10):
            client = await connect_tcp(self, a if i % 2 else b)
            client.gate = a if i % 2 else b
            clients.append(client)
        for client in clients:
            client.send({"t": "login", "id": 1, "data": {"name": "carol"}})
        await until(lambda: sum(c.is_lost for c in clients) == 9,
                    "nine of the ten sessions to be kicked")
        [survivor] = [c for c in clients if not c.is_lost]
        for client in clients:
            kinds = [(m["t"], m.get("reason")) for m in client.received]
            if client is survivor:
                self.assertEqual(kinds, [("resp", None)])
            else:
                self.assertIn(("kick", "replaced"), kinds)
                self.assertEqual(kinds[-1], ("kick", "replaced"))
        gate = survivor.gate
        [session] = [s for s in gate.sessions.sessions.values()
                     if s.player_id == "carol"]
        for g in (a, b):
            record = await HTTP(self, g).player("carol")
            self.assertEqual((record["online"], record["gate_id"],
                              record["session_id"]),
                             (True, gate.gate_id, session.id))
        other = b if gate is a else a
        self.assertEqual((gate.players.online, other.players.online), (1, 0))
        self.assertIsNone(other.players.get("carol"))
        # No offline event for a replaced session.
        for g in (a, b):
            self.assertNotIn("offline",
                             [e["event"] for e in events_of(g, "carol")])
        # The survivor still gets pushes.
        await HTTP(self, other).push(["carol"], "n", 1)
        push = await survivor.expect(lambda m: m["t"] == "push")
        self.assertEqual(push["seq"], 1)

    async def test_login_elsewhere_replaces(self):
        a, b = await self.two_gates()
        first = await connect_tcp(self, a)
        await first.login("dave")
        second = await connect_tcp(self, b)
        await second.login("dave")
        kick = await first.expect(lambda m: m["t"] == "kick")
        self.assertEqual(kick["reason"], "replaced")
        await first.wait_lost()
        self.assertEqual([e["event"] for e in events_of(a, "dave")],
                         ["online"])
        self.assertEqual([e["event"] for e in events_of(b, "dave")],
                         ["online"])
        self.assertIsNone(a.players.get("dave"))


class AdminTests(ClusterCase):
    async def test_kick_from_any_gate(self):
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        api_b = HTTP(self, b)
        code, answer, _ = await api_b.post("/v1/kick", {"player_id": "alice",
                                                        "reason": "cheating"})
        self.assertEqual((code, answer), (200, {"kicked": True}))
        kick = await alice.expect(lambda m: m["t"] == "kick")
        self.assertEqual((kick["reason"], kick["msg"]), ("admin", "cheating"))
        await alice.wait_lost()
        code, answer, _ = await api_b.post("/v1/kick", {"player_id": "alice"})
        self.assertEqual((code, answer), (200, {"kicked": False}))
        code, answer, _ = await api_b.post("/v1/kick", {"player_id": "ghost"})
        self.assertEqual((code, answer), (200, {"kicked": False}))

    async def test_reconnect_from_any_gate(self):
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        code, answer, _ = await HTTP(self, b).post(
            "/v1/reconnect", {"player_id": "alice", "addr": "b.example:1"})
        self.assertEqual((code, answer), (200, {"sent": 1}))
        message = await alice.expect(lambda m: m["t"] == "reconnect")
        self.assertEqual((message["addr"], message["reason"]),
                         ("b.example:1", "admin"))
        code, answer, _ = await HTTP(self, b).post(
            "/v1/reconnect", {"player_id": "ghost", "addr": "b.example:1"})
        self.assertEqual((code, answer), (200, {"sent": 0}))

    async def test_player_unknown_everywhere(self):
        a, b = await self.two_gates()
        for gate in (a, b):
            code, _, _ = await HTTP(self, gate).get("/v1/players/ghost")
            self.assertEqual(code, 404)


class ExpiryTests(ClusterCase):
    async def test_expiry_only_where_last_offline(self):
        """
        A player that went offline on A and resumed on B is untouched by
        A's idle timer; it expires from B, once, and its resume tokens are
        then rejected on every gate.
        """
        a, b = await self.two_gates(player={"idle_timeout": 0.6})
        alice = await connect_tcp(self, a)
        login = await alice.login("alice")
        await alice.close()
        await HTTP(self, a).wait_offline("alice")
        again = await connect_tcp(self, b)
        answer = await again.request({"t": "resume", "player_id": "alice",
                                      "resume_token": login["resume_token"],
                                      "last_seq": 0})
        self.assertEqual(answer["t"], "resp")
        # A's timer runs out and leaves the player alone.
        await until(lambda: a.players.get("alice") is None,
                    "A to let go of alice")
        record = await HTTP(self, a).player("alice")
        self.assertEqual((record["online"], record["gate_id"]), (True, "B"))
        self.assertNotIn("expired", [e["event"] for e in events_of(a, "alice")])
        await again.close()
        await until(lambda: [e["event"] for e in events_of(b, "alice")]
                    == ["online", "offline", "expired"],
                    "B to expire alice")
        for gate in (a, b):
            code, _, _ = await HTTP(self, gate).get("/v1/players/alice")
            self.assertEqual(code, 404)
            client = await connect_tcp(self, gate)
            answer = await client.request({
                "t": "resume", "player_id": "alice",
                "resume_token": login["resume_token"], "last_seq": 0})
            self.assertEqual((answer["t"], answer["code"]),
                             ("err", "resume_rejected"))
            await client.close()
        self.assertNotIn("expired", [e["event"] for e in events_of(a, "alice")])
        # A new incarnation numbers from 1, and its own token works.
        fresh = await connect_tcp(self, a)
        login = await fresh.login("alice")
        self.assertEqual(login["last_seq"], 0)
        self.assertEqual((await HTTP(self, b).push(["alice"], "n", 1))[
            "delivered"], 1)
        push = await fresh.expect(lambda m: m["t"] == "push")
        self.assertEqual(push["seq"], 1)


class BanTests(ClusterCase):
    """
    A kick with C{ban_seconds} on one gate holds on every gate: bans live
    in Redis and every claim checks them (C{docs/cluster.md}).
    """

    async def bind(self, gate, envelope):
        client = await connect_tcp(self, gate)
        answer = await client.request(envelope)
        await client.close()
        return answer["t"], answer.get("code")

    async def test_ban_on_every_gate(self):
        a, b = await self.two_gates()
        alice = await connect_tcp(self, b)
        login = await alice.login("alice")
        old = {"t": "resume", "player_id": "alice", "last_seq": 0,
               "resume_token": login["resume_token"]}
        code, answer, raw = await HTTP(self, a).post(
            "/v1/kick", {"player_id": "alice", "reason": "cheating",
                         "ban_seconds": 3})
        self.assertEqual((code, answer), (200, {"kicked": True}), raw)
        kick = await alice.expect(lambda m: m["t"] == "kick")
        self.assertEqual((kick["reason"], kick["msg"]), ("admin", "cheating"))
        await alice.wait_lost()
        for gate in (a, b):
            for envelope in ({"t": "login", "data": {"name": "alice"}},
                             {"t": "auth", "token": auth_token("alice")},
                             old):
                self.assertEqual(await self.bind(gate, envelope),
                                 ("err", "auth_failed"), envelope["t"])

        async def over():
            return (await self.bind(a, {"t": "login",
                                        "data": {"name": "alice"}}))[0] \
                == "resp"

        # A real clock: the ban ends 3 s after the kick.
        await until(over, "the ban to end", timeout=10.0, interval=0.1)
        for gate in (a, b):
            self.assertEqual(await self.bind(gate, old),
                             ("err", "resume_rejected"))
        again = await connect_tcp(self, b)
        login = await again.login("alice")
        await again.close()
        await HTTP(self, b).wait_offline("alice")
        self.assertEqual(await self.bind(a, {
            "t": "resume", "player_id": "alice", "last_seq": 0,
            "resume_token": login["resume_token"]}), ("resp", None))

    async def test_ban_of_player_elsewhere_or_unknown(self):
        """
        A ban holds for players no gate has, and a later kick on another
        gate replaces its end (0 lifts it).
        """
        a, b = await self.two_gates()
        code, answer, _ = await HTTP(self, a).post(
            "/v1/kick", {"player_id": "ghost", "ban_seconds": 3600})
        self.assertEqual((code, answer), (200, {"kicked": False}))
        self.assertEqual(await self.bind(b, {"t": "login",
                                             "data": {"name": "ghost"}}),
                         ("err", "auth_failed"))
        ttl = int(await redis_command("PTTL", self.prefix + "b:ghost"))
        # The ban's end or the resume token lifetime (7 days), the longer.
        self.assertGreater(ttl, 6 * 86400 * 1000)
        code, answer, _ = await HTTP(self, b).post(
            "/v1/kick", {"player_id": "ghost", "ban_seconds": 0})
        self.assertEqual(code, 200)
        self.assertEqual(await self.bind(a, {"t": "login",
                                             "data": {"name": "ghost"}}),
                         ("resp", None))
