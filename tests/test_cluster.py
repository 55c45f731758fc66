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

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gate.envelope import PushTemplate, encode
from mmogate_plugins.redis import _b
from tests.e2e import (HTTP, auth_token, connect_tcp, connect_ws, events_of,
                       start_gate, until)
from tests.fakes import Stack
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
        # B's heartbeat says 3 online (and names B's process).
        await until(lambda: redis_command("GET", self.prefix + "g:B")
                    .addCallback(lambda beat: beat == b"3:" + _b(
                        b.store.boot)),
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
        push = PushTemplate.from_head(
            b'{"t":"push","route":"r","data":1,"ts":2.5')
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


# Review fixes: races and outages, made deterministic by holding replies
# and dropping connections explicitly.

def session_of(gate, player_id):
    """
    The session C{player_id} is bound to on C{gate}.
    """
    [session] = [s for s in gate.sessions.sessions.values()
                 if s.player_id == player_id]
    return session


def push_head(data, route="n"):
    """
    A push envelope's head as L{gate.cluster.Cluster.push} makes it.
    """
    return encode({"t": "push", "route": route, "data": data,
                   "ts": reactor.seconds()})[:-1]


async def silence(gate):
    """
    Drop C{gate}'s subscription and keep it down: pushes to its players
    are stored, not sent, as in an outage of the subscriber alone.
    """
    link = gate.store._sub
    link._running = False
    link._connection.transport.abortConnection()
    await until(lambda: link.proto is None and not gate.store.reachable,
                "the subscription to drop")


async def listen_again(gate):
    link = gate.store._sub
    link._running = True
    link._connect()
    await until(lambda: gate.store.reachable, "the gate to listen again")


def hold_claims(gate):
    """
    From now on C{gate}'s claims are made in Redis at once but answered
    only once the returned L{Deferred} fires, as a slow reply would be.
    """
    release = Deferred()
    original = gate.store.claim

    def claim(*args, **kwargs):
        answered = Deferred()

        def later(result):
            release.addCallback(lambda _: answered.callback(result))

        original(*args, **kwargs).addBoth(later)
        return answered

    gate.store.claim = claim
    return release


def claimed_by(test, gate, player_id):
    """
    Until the entry of C{player_id} names a session being bound on
    C{gate} (the claim was made; its answer may be held).
    """
    async def made():
        sessions = [sid for sid, p in gate.players.binding.items()
                    if p == player_id]
        if not sessions:
            return False
        current = await redis_command("HGET",
                                      test.prefix + "p:" + player_id, "s")
        return current == sessions[0].encode()
    return until(made, f"the claim of {player_id} on {gate.gate_id}")


def seqs(client):
    return [seq for seq, _ in pushes(client)]


class MissedPushTests(ClusterCase):
    """
    Pushes placed while a gate did not listen reach its sessions once,
    in order, before newer ones, whatever arrives first.
    """

    async def test_live_push_after_a_hole(self):
        """
        A live push arriving before the gate read what it missed (its
        subscriber came back first) is held while the missed ones are
        read: nothing is skipped.
        """
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        sid = session_of(a, "alice").id
        await silence(a)
        api_b = HTTP(self, b)
        for n in (1, 2, 3):
            self.assertEqual((await api_b.push(["alice"], "n", n))["queued"],
                             1)
        # Push 3 comes in live, as if the subscription were back before
        # the gate's resynchronisation read the mailbox.
        a.cluster.received({"op": "push", "to": [["alice", sid, 3]]},
                           push_head(3))
        for n in (1, 2, 3):
            push = await alice.next()
            self.assertEqual((push["seq"], push["data"]), (n, n))
        await listen_again(a)
        self.assertEqual((await api_b.push(["alice"], "n", 4))["delivered"],
                         1)
        push = await alice.next()
        self.assertEqual(push["seq"], 4)
        alice.assert_nothing_pending()

    async def test_failed_read_is_tried_again(self):
        """
        A read of missed pushes that fails keeps the held pushes held and
        is tried again; they are not released in its place.
        """
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        session = session_of(a, "alice")
        await silence(a)
        for n in (1, 2, 3):
            await HTTP(self, b).push(["alice"], "n", n)
        # Commands fail at once from now on (the connection is kept, and
        # not remade, until the test aborts it).
        commands = a.store._cmd
        proto = commands.proto
        commands.drop(proto)
        a.cluster.received({"op": "push", "to": [["alice", session.id, 3]]},
                           push_head(3))
        await until(lambda: session.missed.failures >= 1 or pushes(alice),
                    "a failed read")
        self.assertEqual(pushes(alice), [])
        self.assertTrue(session.holding)
        proto.transport.abortConnection()
        for n in (1, 2, 3):
            self.assertEqual((await alice.next())["seq"], n)
        await listen_again(a)
        alice.assert_nothing_pending()

    async def test_hole_in_pushes_held_by_a_login(self):
        """
        Pushes held while a login's claim is answered skip seqs (the
        subscription dropped meanwhile): the missing ones are read before
        they are written.
        """
        a, b = await self.two_gates()
        release = hold_claims(a)
        alice = await connect_tcp(self, a)
        alice.send({"t": "login", "id": 1, "data": {"name": "alice"}})
        await claimed_by(self, a, "alice")
        api_b = HTTP(self, b)
        self.assertEqual((await api_b.push(["alice"], "n", 1))["delivered"],
                         1)
        sid = next(iter(a.players.binding))
        await silence(a)
        for n in (2, 3):
            await api_b.push(["alice"], "n", n)
        a.cluster.received({"op": "push", "to": [["alice", sid, 3]]},
                           push_head(3))
        release.callback(None)
        answer = await alice.next()
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 0))
        for n in (1, 2, 3):
            self.assertEqual((await alice.next())["seq"], n)
        await listen_again(a)
        alice.assert_nothing_pending()


class ReviewRaceTests(ClusterCase):
    async def test_login_last_seq_is_the_claims(self):
        """
        A login's C{last_seq} is the seq assigned when its claim was made:
        a push placed between the claim and its answer is sent after the
        answer, and has a higher seq.
        """
        a, b = await self.two_gates()
        first = await connect_tcp(self, a)
        await first.login("alice")
        await first.close()
        await HTTP(self, a).wait_offline("alice")
        await HTTP(self, b).push(["alice"], "n", 1)
        release = hold_claims(a)
        again = await connect_tcp(self, a)
        again.send({"t": "login", "id": 1, "data": {"name": "alice"}})
        await claimed_by(self, a, "alice")
        self.assertEqual((await HTTP(self, b).push(["alice"], "n", 2))[
            "delivered"], 1)
        release.callback(None)
        answer = await again.next()
        self.assertEqual((answer["t"], answer["last_seq"]), ("resp", 1))
        push = await again.next()
        self.assertEqual((push["seq"], push["data"]), (2, 2))

    async def test_token_of_a_claim_before_a_ban_is_revoked(self):
        """
        A resume whose claim Redis made before a ban gets a token issued
        as of that claim: the ban revokes it.
        """
        a, b = await self.two_gates()
        first = await connect_tcp(self, a)
        login = await first.login("alice")
        await first.close()
        await HTTP(self, a).wait_offline("alice")
        release = hold_claims(a)
        again = await connect_tcp(self, a)
        again.send({"t": "resume", "id": 1, "player_id": "alice",
                    "resume_token": login["resume_token"], "last_seq": 0})
        await claimed_by(self, a, "alice")
        await b.players.bans.ban("alice", reactor.seconds() + 0.3)
        release.callback(None)
        token = (await again.next())["resume_token"]

        async def over():
            client = await connect_tcp(self, b)
            answer = await client.request({"t": "login",
                                           "data": {"name": "alice"}})
            await client.close()
            return answer["t"] == "resp"

        # A real clock: the ban ends 0.3 s after it was made.
        await until(over, "the ban to end", interval=0.05)
        later = await connect_tcp(self, b)
        answer = await later.request({"t": "resume", "player_id": "alice",
                                      "last_seq": 0, "resume_token": token})
        self.assertEqual((answer["t"], answer["code"]),
                         ("err", "resume_rejected"))

    async def test_kick_for_an_earlier_claim_of_a_session(self):
        """
        A session that logs in again while another gate claims its player:
        the kick for its earlier claim arrives after its new claim, and is
        ignored; the other gate's session is the one replaced.
        """
        a, b = await self.two_gates()
        s = await connect_tcp(self, a)
        await s.login("p")
        held = []
        receiver = a.store._receiver

        class Holding:
            def received(self, header, payload):
                held.append((header, payload))

            def resync(self, missed):
                receiver.resync(missed)

        a.store._receiver = Holding()
        t = await connect_tcp(self, b)
        self.assertEqual((await t.request({"t": "auth",
                                           "token": auth_token("p")}))["t"],
                         "resp")
        await until(lambda: any(h["op"] == "kick_session" for h, _ in held),
                    "the kick for A's session")
        self.assertEqual((await s.request({"t": "auth",
                                           "token": auth_token("p")}))["t"],
                         "resp")
        kick = await t.expect(lambda m: m["t"] == "kick")
        self.assertEqual(kick["reason"], "replaced")
        a.store._receiver = receiver
        for header, payload in held:
            receiver.received(header, payload)
        session = session_of(a, "p")
        self.assertFalse(session.closing)
        record = await HTTP(self, b).player("p")
        self.assertEqual((record["online"], record["gate_id"],
                          record["session_id"]), (True, "A", session.id))
        self.assertEqual((await HTTP(self, b).push(["p"], "n", 1))[
            "delivered"], 1)
        self.assertEqual((await s.expect(lambda m: m["t"] == "push"))["seq"],
                         1)

    async def test_replaced_session_gives_its_claim_back(self):
        """
        A session kicked C{replaced} while the directory still names it
        (a kick the directory does not back) is released: the player is
        offline here, not a ghost online on a session gone.
        """
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        session = session_of(a, "alice")
        a.cluster.received({"op": "kick_session", "p": "alice",
                            "s": session.id, "c": 0},
                           encode({"reason": "replaced", "msg": "x"}))
        await alice.wait_lost()
        await HTTP(self, b).wait_offline("alice")
        await until(lambda: "offline" in [e["event"]
                                          for e in events_of(a, "alice")],
                    "the offline event")
        player = a.players.get("alice")
        self.assertIsNotNone(player)
        self.assertTrue(player.expiry.active())
        self.assertEqual((await HTTP(self, b).push(["alice"], "n", 1))[
            "queued"], 1)

    async def test_pending_release_of_a_session_bound_since(self):
        """
        A release kept for a session whose claim failed is not done once
        the session has claimed the player again.
        """
        a, b = await self.two_gates()
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        session = session_of(a, "alice")
        a.cluster.release_later("alice", session.id)
        a.cluster._release_pending()
        self.assertEqual(a.cluster.releases, set())
        record = await HTTP(self, b).player("alice")
        self.assertEqual((record["online"], record["session_id"]),
                         (True, session.id))


class RestartTests(ClusterCase):
    """
    A gate restarting under the same C{gate.id}.
    """

    def crash(self, gate):
        """
        C{gate} dies: no release, no leave, its connections to Redis gone
        and not remade.
        """
        gate.store._receiver = None
        for loop in gate.cluster._loops:
            loop.stop()
        gate.cluster._loops = []
        for link in (gate.store._cmd, gate.store._sub):
            link._running = False
            link._connection.transport.abortConnection()

    async def test_sessions_of_the_earlier_process_are_gone(self):
        """
        The players the dead process had are offline for the cluster (the
        new process of the same id has no such sessions): pushes are
        queued, kicks reach no one; the new process takes them over and
        expires them, telling the backend.
        """
        old = cluster_gate(self, "A", self.prefix,
                           player={"idle_timeout": 1.0})
        await reachable(old)
        bob = await connect_tcp(self, old)
        await bob.login("bob")
        session = session_of(old, "bob")
        self.crash(old)
        new = cluster_gate(self, "A", self.prefix,
                           player={"idle_timeout": 1.0})
        b = cluster_gate(self, "B", self.prefix,
                         player={"idle_timeout": 1.0})
        await reachable(new, b)
        await until(lambda: new.players.get("bob") is not None,
                    "the new process to take bob over")
        api_b = HTTP(self, b)
        self.assertEqual((await api_b.push(["bob"], "n", 1))["queued"], 1)
        record = await api_b.player("bob")
        self.assertEqual((record["online"], record["gate_id"]), (False, "A"))
        code, answer, _ = await api_b.post("/v1/kick", {"player_id": "bob"})
        self.assertEqual((code, answer), (200, {"kicked": False}))
        await until(lambda: [(e["event"], e["session_id"])
                             for e in events_of(new, "bob")]
                    == [("offline", session.id), ("expired", None)],
                    "the new process to expire bob")
        code, _, _ = await api_b.get("/v1/players/bob")
        self.assertEqual(code, 404)


class PagedMailboxes:
    """
    An in-memory mailbox store that pages its reads as the Redis store
    does (C{page_size}), recording where each read started.
    """

    page_size = 3

    def __init__(self, store):
        self._store = store
        self.reads = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read_after(self, player_id, last_seq, count=None):
        self.reads.append(last_seq)
        return self._store.read_after(player_id, last_seq).addCallback(
            lambda found: (found[0], found[1][:count]))


class SessionFlowTests(SynchronousTestCase):
    """
    What a session sends its store: a long mailbox read a page at a time,
    as the client drains it; acks only when they move something, one at a
    time.
    """

    def test_replay_pages_as_the_client_drains(self):
        stack = Stack()
        session, _, answer = stack.login("alice")
        session.lost()
        for i in range(10):
            stack.push(["alice"], "note", i + 1)
        store = stack.players.mailboxes = PagedMailboxes(
            stack.players.mailboxes)
        session, connection = stack.connect()
        send = connection.send

        def send_then_fill(outgoing):
            send(outgoing)
            if len(connection.sent) == 4:
                connection.paused = True

        connection.send = send_then_fill
        stack.send(session, t="resume", id=1, player_id="alice",
                   resume_token=answer["resume_token"], last_seq=0)
        # The answer and the first page; the next is read once it drains.
        self.assertEqual(len(connection.sent), 4)
        self.assertEqual(store.reads, [0])
        stack.push(["alice"], "note", "live")
        connection.paused = False
        session.writable()
        self.assertEqual(store.reads, [0, 3, 6, 9])
        self.assertEqual([m["seq"] for m in connection.messages
                          if m["t"] == "push"], list(range(1, 12)))

    def test_acks_coalesce(self):
        stack = Stack(hold_mailbox=("ack",))
        session, _, _ = stack.login("alice")
        for i in range(4):
            stack.push(["alice"], "note", i)
        for seq in (1, 2, 3, 2, 3):
            stack.send(session, t="ack", seq=seq)
        late = stack.mailboxes
        self.assertEqual([p.args for p in late.pending],
                         [("ack", "alice", 1)])
        late.fire("ack")
        self.assertEqual([p.args for p in late.pending][1:],
                         [("ack", "alice", 3)])
        late.fire("ack")
        for seq in (1, 3):
            stack.send(session, t="ack", seq=seq)
        stack.send(session, t="ack", seq=4)
        self.assertEqual([p.args for p in late.pending][2:],
                         [("ack", "alice", 4)])
        late.fire("ack")
        self.assertEqual(self.successResultOf(
            stack.memory_mailboxes.size("alice")), 0)
